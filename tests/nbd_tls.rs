//! NBD over TLS (`NBD_OPT_STARTTLS`) against libnbd's own clients
//! (`nbdinfo`, `nbdcopy`, built with GnuTLS), with certificates the test
//! makes itself (rcgen): a good CA, a second CA, expired certificates.
//! And the plaintext refusals of the CLI (`export-nbd`, `target`).
//!
//! A missing tool fails the test when `CI=true`, else prints SKIPPED.

mod common;
#[path = "common/export.rs"]
mod export;

use export::Backend;
use iscsi_bypass::nbd::wire::{self, opt, rep, InfoRequest};
use iscsi_bypass::nbd::{check_exposure, ExportConfig, NbdServerHandle, TlsConfig, TlsPolicy};
use iscsi_bypass::target::TargetConfig;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:nbd-tls-test";
const INITIATOR: &str = "iqn.2026-11.org.iscsi-bypass:nbd-tls-test-ini";
const SIZE: u64 = 16 << 20;

fn have(tool: &str) -> bool {
    if common::which(tool).is_some() {
        return true;
    }
    assert!(!common::required(), "CI requires {tool}");
    eprintln!("SKIPPED: {tool} not installed");
    false
}

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A leaf certificate signed by `ca`; `expired` puts its validity in 2020.
fn leaf(ca: &Ca, name: &str, server: bool, expired: bool) -> (String, String) {
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 1, 2);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Certificates on disk: the server's files, and libnbd client directories
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
struct Pki {
    dir: PathBuf,
    good: Ca,
    other: Ca,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            good: ca("nbd test CA"),
            other: ca("some other CA"),
        }
    }

    /// Server cert + key + the CA that client certs must chain to.
    fn server(&self, name: &str, expired: bool) -> (PathBuf, PathBuf, PathBuf) {
        let (c, k) = leaf(&self.good, "server", true, expired);
        let cert = self.dir.join(format!("{name}-cert.pem"));
        let key = self.dir.join(format!("{name}-key.pem"));
        let ca = self.dir.join("server-ca.pem");
        std::fs::write(&cert, c).unwrap();
        std::fs::write(&key, k).unwrap();
        std::fs::write(&ca, self.good.cert.pem()).unwrap();
        (cert, key, ca)
    }

    /// A libnbd certificates directory. `trust_other`: the client trusts
    /// the wrong CA; `client_by_other`: its certificate is signed by the
    /// wrong CA; `expired`: its certificate has expired.
    fn client(
        &self,
        name: &str,
        trust_other: bool,
        client_by_other: bool,
        expired: bool,
    ) -> PathBuf {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let trust = if trust_other { &self.other } else { &self.good };
        std::fs::write(d.join("ca-cert.pem"), trust.cert.pem()).unwrap();
        let signer = if client_by_other {
            &self.other
        } else {
            &self.good
        };
        let (c, k) = leaf(signer, "client", false, expired);
        std::fs::write(d.join("client-cert.pem"), c).unwrap();
        std::fs::write(d.join("client-key.pem"), k).unwrap();
        d
    }
}

struct Bed {
    be: Backend,
    dir: PathBuf,
    pki: Pki,
}

impl Bed {
    fn new(name: &str) -> Bed {
        let be = Backend::start(TargetConfig::ram(IQN, SIZE).loopback_portals(1), INITIATOR);
        let dir = std::env::temp_dir().join(format!("nbd-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = Pki::new(&dir);
        Bed { be, dir, pki }
    }

    /// A TCP export on loopback with `tls`; returns it and its port.
    fn serve(&self, tls: Option<TlsConfig>) -> (NbdServerHandle, u16) {
        let (h, addr) = self.be.serve_tcp(ExportConfig {
            name: "lun0".into(),
            tls,
            ..ExportConfig::default()
        });
        (h, addr.port())
    }

    fn tls(&self, policy: TlsPolicy, client_certs: bool, expired: bool) -> TlsConfig {
        let (cert, key, ca) = self.pki.server("server", expired);
        TlsConfig::from_pem_files(&cert, &key, client_certs.then_some(ca.as_path()), policy)
            .unwrap()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nbds(port: u16, certs: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/lun0?tls-certificates={}",
        certs.display()
    )
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn nbdinfo_size(uri: &str) -> Output {
    Command::new("nbdinfo")
        .args(["--size", uri])
        .output()
        .expect("run nbdinfo")
}

/// Waits until the server has no client left (the connection was closed).
fn wait_idle(h: &NbdServerHandle) {
    let t = Instant::now();
    while h.stats().active.load(Ordering::Relaxed) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "connection not closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls_with_client_certificates() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let bed = Bed::new("copy");
    let (h, port) = bed.serve(Some(bed.tls(TlsPolicy::Require, true, false)));
    let certs = bed.pki.client("client-good", false, false, false);
    let uri = nbds(port, &certs);
    let o = nbdinfo_size(&uri);
    assert!(o.status.success(), "nbdinfo over TLS: {}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), SIZE.to_string());

    let data: Vec<u8> = (0..SIZE as u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    let src = bed.dir.join("src.img");
    let back = bed.dir.join("back.img");
    std::fs::write(&src, &data).unwrap();
    let o = Command::new("nbdcopy")
        .args([src.to_str().unwrap(), &uri])
        .output()
        .unwrap();
    assert!(o.status.success(), "nbdcopy to nbds://: {}", text(&o));
    let o = Command::new("nbdcopy")
        .args([&uri, back.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "nbdcopy from nbds://: {}", text(&o));
    let got = std::fs::read(&back).unwrap();
    assert!(got == data, "data came back over TLS");
    // Through iSCSI directly too: the bytes reached the LU.
    let mut q = bed.be.device.queue_pair();
    let mut direct = vec![0u8; 1 << 20];
    q.read_at(0, &mut direct).unwrap();
    assert!(direct == data[..1 << 20]);
    wait_idle(&h);
    let st = h.stats();
    assert!(st.tls_sessions.load(Ordering::Relaxed) >= 3);
    assert_eq!(st.handshake_failures.load(Ordering::Relaxed), 0);
}

#[test]
fn a_client_without_tls_is_refused_by_require_and_served_by_allow() {
    if !have("nbdinfo") {
        return;
    }
    let bed = Bed::new("plain");
    let (h, port) = bed.serve(Some(bed.tls(TlsPolicy::Require, false, false)));
    let o = nbdinfo_size(&format!("nbd://127.0.0.1:{port}/lun0"));
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.to_lowercase().contains("tls"), "clear error: {t}");
    eprintln!("plaintext client refused: {}", t.trim());
    wait_idle(&h);

    // A raw client: GO is answered "TLS required"; EXPORT_NAME closes.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut d = Vec::new();
    InfoRequest {
        name: b"",
        requests: vec![],
    }
    .emit(&mut d);
    let mut v = Vec::new();
    wire::emit_option(opt::GO, &d, &mut v);
    s.write_all(&v).unwrap();
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    let reply_type = u32::from_be_bytes([r[12], r[13], r[14], r[15]]);
    assert_eq!(reply_type, rep::ERR_TLS_REQD);
    let len = u32::from_be_bytes([r[16], r[17], r[18], r[19]]) as usize;
    let mut msg = vec![0u8; len];
    s.read_exact(&mut msg).unwrap();
    assert!(String::from_utf8_lossy(&msg).contains("requires TLS"));
    let mut v = Vec::new();
    wire::emit_option(opt::EXPORT_NAME, b"", &mut v);
    s.write_all(&v).unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "closed, nothing sent");
    wait_idle(&h);
    drop(h);

    // allow: plaintext and TLS clients are both served.
    let (h, port) = bed.serve(Some(bed.tls(TlsPolicy::Allow, false, false)));
    let o = nbdinfo_size(&format!("nbd://127.0.0.1:{port}/lun0"));
    assert!(o.status.success(), "plaintext under allow: {}", text(&o));
    let certs = bed.pki.client("client-allow", false, false, false);
    let o = nbdinfo_size(&nbds(port, &certs));
    assert!(o.status.success(), "TLS under allow: {}", text(&o));
    wait_idle(&h);
    assert_eq!(h.stats().tls_sessions.load(Ordering::Relaxed), 1);
}

/// Runs nbdinfo with `certs` and expects a TLS failure: a non-zero exit,
/// a message naming the certificate problem, and the connection closed.
fn refused(h: &NbdServerHandle, port: u16, certs: &Path, words: &[&str]) -> String {
    let o = nbdinfo_size(&nbds(port, certs));
    let t = text(&o);
    assert!(!o.status.success(), "must fail: {t}");
    let lower = t.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(w)),
        "error should name the problem ({words:?}): {t}"
    );
    wait_idle(h);
    eprintln!("refused as expected: {}", t.trim());
    t
}

#[test]
fn wrong_ca_is_refused_on_both_sides() {
    if !have("nbdinfo") {
        return;
    }
    let bed = Bed::new("ca");
    let (h, port) = bed.serve(Some(bed.tls(TlsPolicy::Require, true, false)));
    // The client does not trust the server's CA.
    let certs = bed.pki.client("client-trusts-other", true, false, false);
    refused(&h, port, &certs, &["certificate", "verif", "issuer"]);
    // The server does not trust the client's CA.
    let before = h.stats().handshake_failures.load(Ordering::Relaxed);
    let certs = bed.pki.client("client-signed-by-other", false, true, false);
    refused(&h, port, &certs, &["certificate", "tls", "handshake"]);
    assert!(h.stats().handshake_failures.load(Ordering::Relaxed) > before);
    // No client certificate at all, where one is required.
    let d = bed.dir.join("client-no-cert");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("ca-cert.pem"), bed.pki.good.cert.pem()).unwrap();
    refused(&h, port, &d, &["certificate", "tls", "handshake"]);
    assert_eq!(h.stats().tls_sessions.load(Ordering::Relaxed), 0);
}

#[test]
fn expired_certificates_are_refused_on_both_sides() {
    if !have("nbdinfo") {
        return;
    }
    let bed = Bed::new("expired");
    // The server's certificate has expired: the client refuses it.
    let (h, port) = bed.serve(Some(bed.tls(TlsPolicy::Require, true, true)));
    let certs = bed.pki.client("client-ok", false, false, false);
    refused(&h, port, &certs, &["expired", "certificate", "verif"]);
    drop(h);
    // The client's certificate has expired: the server refuses it.
    let (h, port) = bed.serve(Some(bed.tls(TlsPolicy::Require, true, false)));
    let certs = bed.pki.client("client-expired", false, false, true);
    refused(&h, port, &certs, &["certificate", "tls", "handshake"]);
    assert_eq!(h.stats().handshake_failures.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats().tls_sessions.load(Ordering::Relaxed), 0);
}

#[test]
fn garbage_instead_of_a_tls_client_hello_closes_the_connection() {
    let bed = Bed::new("garbage");
    let (h, port) = bed.serve(Some(bed.tls(TlsPolicy::Require, false, false)));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut v = Vec::new();
    wire::emit_option(opt::STARTTLS, &[], &mut v);
    s.write_all(&v).unwrap();
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes([r[12], r[13], r[14], r[15]]), rep::ACK);
    s.write_all(&[0x42; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest); // perhaps an alert, then EOF
    wait_idle(&h);
    assert_eq!(h.stats().handshake_failures.load(Ordering::Relaxed), 1);
}

#[test]
fn tls_config_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("nbd-tls-{}-cfg", std::process::id()));
    let pki = Pki::new(&dir);
    let (cert, key, _) = pki.server("s", false);
    let missing = dir.join("missing.pem");
    let e = TlsConfig::from_pem_files(&missing, &key, None, TlsPolicy::Require).unwrap_err();
    assert!(e.to_string().contains("missing.pem"), "{e}");
    let e = TlsConfig::from_pem_files(&cert, &cert, None, TlsPolicy::Require).unwrap_err();
    assert!(e.to_string().contains("key"), "{e}");
    // require on a non-loopback address passes the exposure check; allow does not.
    let any: SocketAddr = "0.0.0.0:10809".parse().unwrap();
    let req = TlsConfig::from_pem_files(&cert, &key, None, TlsPolicy::Require).unwrap();
    assert!(check_exposure(any, Some(&req), false).is_ok());
    let allow = TlsConfig::from_pem_files(&cert, &key, None, TlsPolicy::Allow).unwrap();
    let e = check_exposure(any, Some(&allow), false).unwrap_err();
    assert!(e.to_string().contains("--tls allow"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the CLI and expects it to refuse quickly, without serving.
fn cli_refuses(args: &[&str], words: &[&str]) {
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
        .args(args)
        .output()
        .unwrap();
    let t_ = text(&o);
    assert!(!o.status.success(), "{args:?} must be refused: {t_}");
    for w in words {
        assert!(t_.contains(w), "{args:?}: message should say {w:?}: {t_}");
    }
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn cli_refuses_plaintext_exports_and_unauthenticated_portals_beyond_loopback() {
    // Refused before any login or bind (the URL's target does not exist).
    let url = "iscsi://127.0.0.1:1/iqn.2026-11.org.example:none/0";
    cli_refuses(
        &["export-nbd", url, "--listen", "0.0.0.0:0"],
        &[
            "not a loopback address",
            "--tls-cert",
            "--insecure-plaintext",
        ],
    );
    cli_refuses(
        &["export-nbd", url, "--listen", "[::]:0"],
        &["not a loopback address"],
    );
    cli_refuses(
        &["target", "--portal", "0.0.0.0:0", "--seconds", "0"],
        &["without CHAP", "--chap-user", "--no-auth"],
    );
    // Loopback needs neither.
    let o = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
        .args(["target", "--portal", "127.0.0.1:0", "--seconds", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_client_silent_after_starttls_is_dropped_at_the_handshake_deadline() {
    let bed = Bed::new("tls-silent");
    let (h, addr) = bed.be.serve_tcp(ExportConfig {
        tls: Some(bed.tls(TlsPolicy::Require, false, false)),
        handshake_timeout: Duration::from_millis(800),
        ..ExportConfig::default()
    });
    let port = addr.port();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut v = Vec::new();
    wire::emit_option(opt::STARTTLS, &[], &mut v);
    s.write_all(&v).unwrap();
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    let t = Instant::now();
    // Say nothing: no ClientHello.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "dropped at the deadline"
    );
    wait_idle(&h);
    assert_eq!(h.stats().handshake_failures.load(Ordering::Relaxed), 1);
}
