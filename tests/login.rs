//! Logins against the embedded target over loopback TCP: every CHAP
//! algorithm one-way and mutual, the algorithm lists of both sides (library
//! `Options`, `LoginConfig`, and the CLI's `--chap-algorithms`), and the
//! error when the two sides have none in common; login redirects,
//! temporary and permanent, through the library and the CLI.

use iscsi_bypass::iscsi::chap::{ChapAlgorithm, Credentials, Secret};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::redirect::{Hop, LoginPortal, RedirectError};
use iscsi_bypass::iscsi::session::{Session, SessionConfig, SessionError};
use iscsi_bypass::scsi::lun::LunHandle;
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle};
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use iscsi_bypass::transport::TransportError;
use iscsi_bypass::{Chap, Device, IdleMode, Options};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:login-tests";
const INITIATOR: &str = "iqn.2026-11.org.iscsi-bypass:login-tests-initiator";
const USER: &str = "db-host";
const SECRET: &[u8] = b"initiator-secret-1";
const TARGET_USER: &str = "array";
const TARGET_SECRET: &[u8] = b"target-secret-22";

fn creds(user: &str, secret: &[u8]) -> Credentials {
    Credentials {
        user: user.into(),
        secret: Secret::new(secret.to_vec()),
    }
}

/// A target requiring (mutual-capable) CHAP with only `accepted` algorithms.
fn chap_target(accepted: &[ChapAlgorithm]) -> TargetHandle {
    Target::start(
        TargetConfig::ram(IQN, 1 << 20)
            .chap(USER, SECRET.to_vec())
            .mutual_chap(TARGET_USER, TARGET_SECRET.to_vec())
            .chap_algorithms(accepted),
    )
    .expect("embedded target")
}

fn login(
    portal: SocketAddr,
    edit: impl FnOnce(&mut LoginConfig),
) -> Result<Session<KernelTcp>, SessionError> {
    let mut c = LoginConfig::new(INITIATOR, Some(IQN));
    c.chap = Some(creds(USER, SECRET));
    edit(&mut c);
    let mut config = SessionConfig::new(c);
    config.login_timeout = Duration::from_secs(3);
    let t = KernelTcp::connect(portal, &KernelTcpOptions::default()).expect("connect");
    Session::login(t, &config)
}

/// One round trip of real I/O on a logged-in session.
fn write_read(session: Session<KernelTcp>) {
    let mut lun = LunHandle::new(session, 0);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    lun.write(8, data.clone()).expect("write");
    assert_eq!(lun.read(8, 8).expect("read"), data);
    let _ = lun.into_session().logout(Duration::from_secs(2));
}

#[test]
fn every_chap_algorithm_one_way_and_mutual() {
    for algorithm in ChapAlgorithm::PREFERRED {
        // The target takes only this algorithm; we offer the default list,
        // so the login can only succeed with this one.
        let target = chap_target(&[algorithm]);
        let portal = target.portals()[0];
        let s = login(portal, |_| {}).unwrap_or_else(|e| panic!("{algorithm} one-way: {e}"));
        write_read(s);
        let s = login(portal, |c| {
            c.mutual_chap = Some(creds(TARGET_USER, TARGET_SECRET))
        })
        .unwrap_or_else(|e| panic!("{algorithm} mutual: {e}"));
        write_read(s);
        // The other direction of each check: a wrong initiator secret is
        // refused by the target, a wrong target secret by us.
        let e = login(portal, |c| c.chap = Some(creds(USER, b"not-the-secret")))
            .expect_err("wrong initiator secret");
        assert!(
            e.to_string().contains("authentication failed"),
            "{algorithm}: {e}"
        );
        let e = login(portal, |c| {
            c.mutual_chap = Some(creds(TARGET_USER, b"not-the-target-secret"))
        })
        .expect_err("wrong target secret");
        assert!(
            e.to_string().contains("failed mutual CHAP"),
            "{algorithm}: {e}"
        );
        target.stop();
    }
}

#[test]
fn our_order_decides_among_algorithms_both_accept() {
    // The target accepts all; offering one algorithm at a time must work
    // for each (the target takes our first, and only, choice).
    let target = chap_target(&ChapAlgorithm::PREFERRED);
    let portal = target.portals()[0];
    for algorithm in ChapAlgorithm::PREFERRED {
        let s = login(portal, |c| {
            c.chap_algorithms = vec![algorithm];
            c.mutual_chap = Some(creds(TARGET_USER, TARGET_SECRET));
        })
        .unwrap_or_else(|e| panic!("offering only {algorithm}: {e}"));
        write_read(s);
    }
}

#[test]
fn no_algorithm_in_common_names_both_sides() {
    let target = chap_target(&[ChapAlgorithm::Md5]);
    let e = login(target.portals()[0], |c| {
        c.chap_algorithms = vec![ChapAlgorithm::Sha3_256, ChapAlgorithm::Sha256]
    })
    .expect_err("no common algorithm");
    let msg = e.to_string();
    assert!(
        msg.contains("we offered CHAP_A=8,7: SHA3-256 (8), SHA-256 (7)")
            && msg.contains("the target accepts only CHAP_A=5: MD5 (5)"),
        "{msg}"
    );
}

#[test]
fn library_options_choose_the_algorithms() {
    let target = chap_target(&[ChapAlgorithm::Sha1]);
    let url = format!("iscsi://{}/{IQN}/0", target.portals()[0]);
    let opts = |algorithms: Vec<ChapAlgorithm>| Options {
        chap: Some(Chap::new(USER, SECRET.to_vec()).mutual(TARGET_USER, TARGET_SECRET.to_vec())),
        chap_algorithms: algorithms,
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        login_timeout: Duration::from_secs(3),
        ..Options::default()
    };
    // The default list includes SHA-1.
    let dev = Device::open_urls(&[&url], &opts(ChapAlgorithm::PREFERRED.to_vec())).expect("open");
    let mut q = dev.queue_pair();
    let data = vec![0x5au8; 512];
    q.write_at(0, &data).expect("write");
    let mut back = vec![0u8; 512];
    q.read_at(0, &mut back).expect("read");
    assert_eq!(back, data);
    drop(q);
    dev.close();
    let Err(e) = Device::open_urls(&[&url], &opts(vec![ChapAlgorithm::Md5])) else {
        panic!("MD5 only against a SHA-1 target must fail")
    };
    let msg = e.to_string();
    assert!(
        msg.contains("CHAP_A=5: MD5 (5)") && msg.contains("accepts only CHAP_A=6"),
        "{msg}"
    );
}

/// A child process killed and reaped when dropped: also when the test
/// fails before its end.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cli_chap_algorithms_on_both_sides() {
    let bin = env!("CARGO_BIN_EXE_iscsi-bypass");
    let dir = std::env::temp_dir().join(format!("iscsi-bypass-login-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, "cli-secret-123\n").unwrap();
    // The target binds port 0 and says which port it got: a port picked
    // here and bound later by the target can be taken in between (by any
    // connect's ephemeral port), and a probe connect to a port nobody
    // listens on yet can even connect to itself (TCP simultaneous open).
    let mut target = KillOnDrop(
        Command::new(bin)
            .args([
                "target",
                "--portal",
                "127.0.0.1:0",
                "--iqn",
                IQN,
                "--size",
                "1m",
                "--chap-user",
                "cli-user",
                "--chap-secret-file",
                secret_file.to_str().unwrap(),
                "--chap-algorithms",
                "sha256,md5",
                "--seconds",
                "30",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // "target <iqn> listening on 127.0.0.1:<port>", printed once it listens.
    // The pipe stays open until the target is killed: its later lines
    // would otherwise hit a closed pipe.
    let mut target_out = std::io::BufReader::new(target.0.stdout.take().expect("target stdout"));
    let mut first_line = String::new();
    std::io::BufRead::read_line(&mut target_out, &mut first_line)
        .expect("read the CLI target's first line");
    let portal = first_line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|p| p.parse::<std::net::SocketAddr>().is_ok())
        .unwrap_or_else(|| panic!("CLI target did not say where it listens: {first_line:?}"))
        .to_string();
    let url = format!("iscsi://{portal}/{IQN}/0");
    let run = |algorithms: &str| {
        Command::new(bin)
            .args([
                "inquiry",
                &url,
                "--chap-user",
                "cli-user",
                "--chap-secret-file",
                secret_file.to_str().unwrap(),
                "--chap-algorithms",
                algorithms,
                "--timeout",
                "3",
            ])
            .output()
            .unwrap()
    };
    let ok = run("sha3-256,sha256");
    let refused = run("sha3-256,sha1");
    let unknown = run("sha512");
    drop(target);
    drop(target_out);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("we offered CHAP_A=8,6: SHA3-256 (8), SHA-1 (6)")
            && err.contains("accepts only CHAP_A=7,5"),
        "{err}"
    );
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && err.contains("--chap-algorithms") && err.contains("sha512"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Login redirects (status 0x0101 / 0x0102) with the embedded target's
// redirect fault: portal 0 plays the array's group address.

fn kernel_connect(addr: SocketAddr) -> Result<KernelTcp, TransportError> {
    KernelTcp::connect(addr, &KernelTcpOptions::default())
}

fn plain_config() -> SessionConfig {
    let mut c = SessionConfig::new(LoginConfig::new(INITIATOR, Some(IQN)));
    c.login_timeout = Duration::from_secs(3);
    c
}

fn two_portal_target() -> (TargetHandle, SocketAddr, SocketAddr) {
    let t = Target::start(TargetConfig::ram(IQN, 1 << 20).loopback_portals(2)).expect("target");
    let p = t.portals();
    (t, p[0], p[1])
}

#[test]
fn temporary_redirect_is_followed_and_reconnects_start_at_the_original() {
    let (target, group, member) = two_portal_target();
    target.faults().portal(0).redirect_logins(member, false);
    let mut portal = LoginPortal::new(group);
    let (s, at) = portal
        .login(kernel_connect, &plain_config())
        .expect("login");
    assert_eq!(at, member);
    assert_eq!(
        portal.last_hops(),
        [Hop {
            from: group,
            to: member,
            permanent: false
        }]
    );
    assert_eq!(
        portal.home(),
        group,
        "a temporary redirect keeps the original"
    );
    write_read(s);
    // The next login (a reconnect) goes to the group address again.
    let (_s, at) = portal
        .login(kernel_connect, &plain_config())
        .expect("again");
    assert_eq!((at, portal.last_hops()[0].from), (member, group));
    // Once the group address stops redirecting, logins stay there.
    target.faults().portal(0).stop_redirecting();
    let (_s, at) = portal
        .login(kernel_connect, &plain_config())
        .expect("direct");
    assert_eq!(at, group);
    assert!(portal.last_hops().is_empty());
}

#[test]
fn permanent_redirect_moves_later_logins_to_the_new_address() {
    let (target, group, member) = two_portal_target();
    target.faults().portal(0).redirect_logins(member, true);
    let mut portal = LoginPortal::new(group);
    let (s, at) = portal
        .login(kernel_connect, &plain_config())
        .expect("login");
    assert_eq!(at, member);
    assert!(portal.last_hops()[0].permanent);
    assert_eq!(portal.home(), member);
    write_read(s);
    // The reconnect goes straight to the new address; the old one would
    // still redirect, and one that stopped answering is not tried.
    target.faults().portal(0).refuse_logins(0x03, 0x01);
    let (_s, at) = portal
        .login(kernel_connect, &plain_config())
        .expect("reconnect");
    assert_eq!(at, member);
    assert!(portal.last_hops().is_empty());
    assert_eq!(portal.original(), group);
}

#[test]
fn redirect_errors_say_where_the_login_was_sent() {
    let (target, group, member) = two_portal_target();
    // A loop between the two portals ends after the bounded hops.
    target.faults().portal(0).redirect_logins(member, false);
    target.faults().portal(1).redirect_logins(group, false);
    let e = LoginPortal::new(group)
        .login(kernel_connect, &plain_config())
        .expect_err("loop");
    let msg = e.to_string();
    assert!(
        matches!(e, RedirectError::TooManyRedirects { max: 4, ref hops } if hops.len() == 5),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "{group} redirected temporarily to {member}, then {member}"
        )),
        "{msg}"
    );
    // No redirects allowed: the first one is the error.
    let e = LoginPortal::new(group)
        .max_redirects(0)
        .login(kernel_connect, &plain_config())
        .expect_err("no hops allowed");
    assert!(e.to_string().contains("more than 0 times"), "{e}");
    // A TargetAddress that is no address.
    target
        .faults()
        .portal(0)
        .redirect_logins_to("[::1".into(), true);
    let e = LoginPortal::new(group)
        .login(kernel_connect, &plain_config())
        .expect_err("bad address");
    assert!(
        e.to_string().contains(&format!(
            "login at {group} redirected to TargetAddress=\"[::1\""
        )),
        "{e}"
    );
    // Redirected to a portal where nothing listens, and the login after
    // the hop failing: both name the hop.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    target.faults().portal(0).redirect_logins(closed, false);
    let e = LoginPortal::new(group)
        .login(kernel_connect, &plain_config())
        .expect_err("dead member");
    assert_eq!(
        e.to_string().split(": ").next().unwrap(),
        format!("connecting to {closed} (after {group} redirected temporarily to {closed})")
    );
    target.faults().portal(1).clear();
    target.faults().portal(1).refuse_logins(0x02, 0x02);
    target.faults().portal(0).redirect_logins(member, false);
    let e = LoginPortal::new(group)
        .login(kernel_connect, &plain_config())
        .expect_err("member refuses");
    assert!(
        e.to_string().starts_with(&format!(
            "login at {member} (after {group} redirected temporarily to {member}): "
        )) && e.to_string().contains("not authorized"),
        "{e}"
    );
}

#[test]
fn cli_follows_redirects() {
    let (target, group, member) = two_portal_target();
    target.faults().portal(0).redirect_logins(member, false);
    let bin = env!("CARGO_BIN_EXE_iscsi-bypass");
    let out = Command::new(bin)
        .args([
            "inquiry",
            &format!("iscsi://{group}/{IQN}/0"),
            "--timeout",
            "3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.faults().portal(1).refuse_logins(0x02, 0x03);
    let out = Command::new(bin)
        .args([
            "inquiry",
            &format!("iscsi://{group}/{IQN}/0"),
            "--timeout",
            "3",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!("{group} redirected temporarily to {member}"))
            && err.contains("target not found"),
        "{err}"
    );
}
