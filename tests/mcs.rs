//! MC/S (several connections in one session) against real targets: tgtd
//! (Debian `tgt`) on loopback.

mod common;

use common::{tgtd_unavailable, Tgtd, TgtdOptions};
use iscsi_bypass::iscsi::connection::{Command, Direction, Event};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::mcs::{McsError, McsSession};
use iscsi_bypass::iscsi::session::SessionConfig;
use iscsi_bypass::scsi::Lun;
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::Duration;

/// tgtd's LUN 1 (LUN 0 is its controller), as the 8-byte LUN field.
fn lun1() -> u64 {
    Lun::from_number(1).to_u64()
}

const INITIATOR: &str = "iqn.2026-11.org.iscsi-bypass:mcs-test";

fn connect(t: &Tgtd) -> KernelTcp {
    KernelTcp::connect(t.portal().parse().unwrap(), &KernelTcpOptions::default()).unwrap()
}

fn config(t: &Tgtd, max_connections: u32) -> SessionConfig {
    let mut c = LoginConfig::new(INITIATOR, Some(&t.iqn));
    c.offer.max_connections = max_connections;
    SessionConfig::new(c)
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = op;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// Submits every command at once and waits for all of them; returns, per
/// tag, the connection it ran on and its buffer.
fn run_all<T: iscsi_bypass::transport::Transport>(
    s: &mut McsSession<T>,
    cmds: Vec<Command>,
) -> HashMap<u64, (u16, Vec<u8>)> {
    let n = cmds.len();
    let mut sent_on = HashMap::new();
    for c in cmds {
        let tag = c.user_tag;
        sent_on.insert(tag, s.submit(c).expect("submit"));
    }
    let mut done = HashMap::new();
    while done.len() < n {
        match s.next_event(Duration::from_secs(10)).expect("session") {
            Some((cid, Event::Completed(c))) => {
                assert_eq!(c.status, 0, "tag {} failed: {:?}", c.user_tag, c.sense);
                assert_eq!(
                    sent_on[&c.user_tag], cid,
                    "completion on another connection"
                );
                done.insert(c.user_tag, (cid, c.buffer));
            }
            Some(_) => {}
            None => panic!("timed out with {} of {n} done", done.len()),
        }
    }
    done
}

/// tgtd as Debian ships it answers MaxConnections=1 to an offer of 4:
/// the session stays one connection and a second one is refused before any
/// login, with the reason.
#[test]
fn tgtd_by_default_grants_one_connection() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions::default());
    let mut c = config(&t, 4);
    c.login.offer.error_recovery_level = 2;
    let mut s = McsSession::open(connect(&t), &c).expect("leading login");
    println!(
        "tgtd answers MaxConnections={} to 4 and ErrorRecoveryLevel={} to 2",
        s.granted(),
        s.params().error_recovery_level
    );
    assert_eq!(s.granted(), 1);
    let e = s.add_connection(connect(&t), 1).unwrap_err();
    assert!(
        matches!(
            e,
            McsError::NotGranted {
                offered: 4,
                granted: 1,
                wanted: 2
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("MPIO"), "{e}");
    let done = s
        .execute(
            Command::new(lun1(), &[0; 6], Direction::None, Vec::new()).unwrap(),
            Duration::from_secs(5),
        )
        .expect("the first connection goes on");
    assert_eq!(done.status, 2, "power-on UNIT ATTENTION");
    s.logout(Duration::from_secs(5)).expect("logout");
}

/// tgtd with its target's MaxConnections set to 4 grants 4: writes and
/// reads with verify striped over two connections of one session (both
/// carry I/O, the data reads back the same, the second connection has the
/// session's TSIH), then a connection removed and another added.
#[test]
fn tgtd_max_connections_and_striped_verified_io() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions {
        params: vec![("MaxConnections".into(), "4".into())],
        ..TgtdOptions::default()
    });
    let mut s = McsSession::open(connect(&t), &config(&t, 4)).expect("leading login");
    let granted = s.granted();
    println!("tgtd grants MaxConnections={granted} to an offer of 4 (target set to 4)");
    match s.add_connection(connect(&t), 1) {
        Ok(()) => {}
        Err(e) => panic!("tgtd granted {granted}, second connection: {e}"),
    }
    assert_eq!(s.cids(), [0, 1]);
    assert_eq!(
        s.session(1).unwrap().outcome().tsih,
        s.tsih(),
        "the second connection is in the same session"
    );
    // The power-on UNIT ATTENTION is for the I_T nexus: one session, one
    // UNIT ATTENTION, whichever connection takes it.
    let tur = || Command::new(lun1(), &[0; 6], Direction::None, Vec::new()).unwrap();
    let first = s.execute(tur(), Duration::from_secs(5)).expect("TUR");
    assert_eq!(first.status, 2, "UNIT ATTENTION first");
    for _ in 0..2 {
        assert_eq!(s.execute(tur(), Duration::from_secs(5)).unwrap().status, 0);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let blocks = 64u16; // 32 KiB of 512-byte blocks
    let bytes = usize::from(blocks) * 512;
    let mut expect = Vec::new();
    let mut writes = Vec::new();
    for i in 0..32u64 {
        let lba = (i * 97 % 2000) as u32 * u32::from(blocks);
        let data: Vec<u8> = (0..bytes).map(|_| rng.gen()).collect();
        let mut c = Command::new(
            lun1(),
            &rw10(0x2a, lba, blocks),
            Direction::Write,
            data.clone(),
        )
        .unwrap();
        c.user_tag = i;
        writes.push(c);
        expect.push((lba, data));
    }
    let w = run_all(&mut s, writes);
    let per_conn =
        |m: &HashMap<u64, (u16, Vec<u8>)>, cid| m.values().filter(|v| v.0 == cid).count();
    assert!(
        per_conn(&w, 0) > 0 && per_conn(&w, 1) > 0,
        "writes on both: {w:?}"
    );
    let reads = expect
        .iter()
        .enumerate()
        .map(|(i, (lba, _))| {
            let mut c = Command::new(
                lun1(),
                &rw10(0x28, *lba, blocks),
                Direction::Read,
                vec![0; bytes],
            )
            .unwrap();
            c.user_tag = 100 + i as u64;
            c
        })
        .collect();
    let r = run_all(&mut s, reads);
    assert!(per_conn(&r, 0) > 0 && per_conn(&r, 1) > 0);
    for (i, (lba, data)) in expect.iter().enumerate() {
        assert!(
            r[&(100 + i as u64)].1 == *data,
            "LBA {lba} reads back different"
        );
    }
    // One numbering for the session: 3 TURs and 64 commands, from CmdSN 1.
    assert_eq!(s.window().next_cmd_sn().0, 1 + 3 + 64);
    // Removing connection 1 leaves the session on connection 0.
    s.remove_connection(1, Duration::from_secs(5))
        .expect("logout of CID 1");
    assert_eq!(s.cids(), [0]);
    let mut c = Command::new(lun1(), &rw10(0x28, 0, 1), Direction::Read, vec![0; 512]).unwrap();
    c.user_tag = 7;
    let done = s
        .execute(c, Duration::from_secs(5))
        .expect("read after removal");
    assert_eq!(done.status, 0);
    // And a connection can join again, with a new CID.
    s.add_connection(connect(&t), 2).expect("re-add");
    s.logout(Duration::from_secs(5)).expect("logout");
}
