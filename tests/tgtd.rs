//! The iSCSI core against a real target: tgtd (Debian `tgt`) on loopback,
//! started by each test on a free port with file-backed LUNs, and compared
//! with libiscsi's tools on the same LUN.

mod common;

use common::{tgtd_unavailable, which, Tgtd, TgtdOptions};
use iscsi_bypass::iscsi::chap::{ChapAlgorithm, Credentials, Secret};
use iscsi_bypass::iscsi::discovery;
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::params::DigestKind;
use iscsi_bypass::iscsi::session::{Session, SessionConfig, SessionError};
use iscsi_bypass::scsi::lun::LunHandle;
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use rand::{Rng, SeedableRng};
use std::process::Command;
use std::time::Duration;

const INITIATOR: &str = "iqn.2026-11.org.iscsi-bypass:test";

fn connect(t: &Tgtd) -> KernelTcp {
    KernelTcp::connect(t.portal().parse().unwrap(), &KernelTcpOptions::default()).unwrap()
}

fn login_with(
    t: &Tgtd,
    edit: impl FnOnce(&mut LoginConfig),
) -> Result<Session<KernelTcp>, SessionError> {
    let mut c = LoginConfig::new(INITIATOR, Some(&t.iqn));
    edit(&mut c);
    Session::login(connect(t), &SessionConfig::new(c))
}

fn lun(t: &Tgtd, edit: impl FnOnce(&mut LoginConfig)) -> LunHandle<KernelTcp> {
    LunHandle::new(login_with(t, edit).expect("login"), 1)
}

fn creds(user: &str, secret: &str) -> Credentials {
    Credentials {
        user: user.into(),
        secret: Secret::new(secret.as_bytes().to_vec()),
    }
}

/// Writes `size` random bytes at random block offsets, reads each back and
/// compares byte for byte.
fn write_read_random(lun: &mut LunHandle<KernelTcp>, seed: u64, size: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cap = lun.read_capacity().unwrap();
    let bs = cap.block_size as usize;
    let blocks = (size / bs) as u64;
    for _ in 0..4 {
        let lba = rng.gen_range(0..cap.block_count - blocks);
        let data: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
        lun.write(lba, data.clone()).unwrap();
        let back = lun.read(lba, blocks as u32).unwrap();
        assert!(back == data, "read-back mismatch at LBA {lba}");
    }
}

#[test]
fn discovery_lists_the_target_and_portal() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions {
        portals: vec!["127.0.0.1".into(), "127.0.0.2".into()],
        ..Default::default()
    });
    // tgtd answers SendTargets with the portal the question came in on, so
    // ask through each one (the embedded target lists all its portals in
    // one answer; tests/bench.rs covers that).
    for host in ["127.0.0.1", "127.0.0.2"] {
        let addr = format!("{host}:{}", t.port).parse().unwrap();
        let transport = KernelTcp::connect(addr, &KernelTcpOptions::default()).unwrap();
        let targets = discovery::send_targets(
            transport,
            LoginConfig::new(INITIATOR, None),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].name, t.iqn);
        assert!(
            targets[0]
                .portals
                .iter()
                .any(|p| p.port == t.port && p.host == host),
            "{host} missing: {targets:?}"
        );
    }
}

#[test]
fn inquiry_capacity_and_report_luns_match_the_backing_files() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions {
        lun_sizes: vec![64 << 20, 8 << 20],
        block_size: 4096,
        ..Default::default()
    });
    let mut l = lun(&t, |_| {});
    let info = l.lun_info().unwrap();
    assert_eq!(info.vendor, "IET");
    assert_eq!(info.block_size, 4096);
    assert_eq!(info.capacity_bytes, 64 << 20);
    assert!(info.lu_id.is_some(), "VPD 0x83 gives an LU designator");
    let luns: Vec<u16> = l
        .report_luns()
        .unwrap()
        .luns
        .iter()
        .filter_map(|l| l.number())
        .collect();
    assert_eq!(luns, vec![0, 1, 2]);
    let mut l2 = LunHandle::new(l.into_session(), 2);
    assert_eq!(l2.read_capacity().unwrap().bytes(), 8 << 20);
    // Reading past the end is refused before it reaches the wire.
    let e = l2.read(2048, 1).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
}

#[test]
fn write_then_read_back_1mib_at_random_offsets() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions::default());
    let mut l = lun(&t, |_| {});
    write_read_random(&mut l, 1, 1 << 20);
    // What we wrote is in the backing file too.
    l.write(10, vec![0xa5; 512]).unwrap();
    l.synchronize_cache().unwrap();
    let file = std::fs::read(&t.lun_files[0]).unwrap();
    assert!(file[10 * 512..11 * 512].iter().all(|&b| b == 0xa5));
}

#[test]
fn chap_one_way_and_mutual_and_wrong_secrets() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions {
        chap: Some(("alice".into(), "alicesecret1".into())),
        mutual: Some(("tgtuser".into(), "targetsecret9".into())),
        ..Default::default()
    });
    // One-way CHAP with MD5, the one algorithm tgtd and we share.
    let md5 = vec![ChapAlgorithm::Md5];
    let mut l = lun(&t, |c| {
        c.chap = Some(creds("alice", "alicesecret1"));
        c.chap_algorithms = md5.clone();
    });
    write_read_random(&mut l, 2, 64 << 10);
    // tgtd skips the values it does not know (8, 6) and takes MD5.
    use ChapAlgorithm::{Sha1, Sha3_256};
    let sha3_sha1_md5 = vec![Sha3_256, Sha1, ChapAlgorithm::Md5];
    let mut l = lun(&t, |c| {
        c.chap = Some(creds("alice", "alicesecret1"));
        c.chap_algorithms = sha3_sha1_md5.clone();
    });
    l.test_unit_ready().unwrap();
    // tgt defines CHAP_A=7 as SHA-1 (the IANA registry: SHA-256), so our
    // default list (8,7,6,5) gets 7 chosen and a SHA-256 response refused:
    // the error says which algorithm and why.
    let e = login_with(&t, |c| c.chap = Some(creds("alice", "alicesecret1"))).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("refused our CHAP response, computed with SHA-256 (7)")
            && msg.contains("tgt's tgtd takes CHAP_A=7 to mean SHA-1"),
        "{msg}"
    );
    // Mutual CHAP: we verify the target too.
    for algorithms in [md5.clone(), sha3_sha1_md5] {
        let mut l = lun(&t, |c| {
            c.chap = Some(creds("alice", "alicesecret1"));
            c.mutual_chap = Some(creds("tgtuser", "targetsecret9"));
            c.chap_algorithms = algorithms;
        });
        l.test_unit_ready().unwrap();
    }
    // Wrong initiator secret: the target refuses with a clear message.
    let e = login_with(&t, |c| {
        c.chap = Some(creds("alice", "wrongsecret1"));
        c.chap_algorithms = md5.clone();
    })
    .unwrap_err();
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert!(e.to_string().contains("computed with MD5 (5)"), "{e}");
    // No credentials at all for a target that requires them.
    let e = login_with(&t, |_| {}).unwrap_err();
    assert!(
        e.to_string().contains("authentication failed") || e.to_string().contains("CHAP"),
        "{e}"
    );
    // Wrong target secret: we refuse the target.
    let e = login_with(&t, |c| {
        c.chap = Some(creds("alice", "alicesecret1"));
        c.mutual_chap = Some(creds("tgtuser", "notthesecret"));
        c.chap_algorithms = md5;
    })
    .unwrap_err();
    assert!(e.to_string().contains("mutual CHAP"), "{e}");
    assert!(!e.to_string().contains("notthesecret"));
}

#[test]
fn fua_writes_through_the_library() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions::default());
    let opts = iscsi_bypass::Options {
        initiator: INITIATOR.into(),
        idle: iscsi_bypass::IdleMode::Sleep(Duration::from_micros(50)),
        ..Default::default()
    };
    let url = t.url(1);
    let dev = iscsi_bypass::Device::open_urls(&[&url], &opts).expect("open");
    let mut q = dev.queue_pair();
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 29 % 251) as u8).collect();
    // WRITE(16) with FUA: tgtd accepts it and the data is in the backing
    // file when the write completes (no SYNCHRONIZE CACHE sent; whether
    // tgtd syncs the file for FUA is its business).
    q.write_at_durable(40, &data, true).expect("FUA write");
    let file = std::fs::read(&t.lun_files[0]).unwrap();
    assert!(file[40 * 512..40 * 512 + data.len()] == data[..]);
    let mut back = vec![0u8; data.len()];
    q.read_at(40, &mut back).unwrap();
    assert!(back == data);
    drop(q);
    dev.close();
}

#[test]
fn digests_on_and_off() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions {
        params: vec![
            ("HeaderDigest".into(), "CRC32C,None".into()),
            ("DataDigest".into(), "CRC32C,None".into()),
        ],
        ..Default::default()
    });
    for (hd, dd) in [(true, true), (true, false), (false, true), (false, false)] {
        let pick = |on| {
            if on {
                DigestKind::Crc32c
            } else {
                DigestKind::None
            }
        };
        let mut l = lun(&t, |c| {
            c.offer.header_digest = vec![pick(hd)];
            c.offer.data_digest = vec![pick(dd)];
        });
        let p = l.session().connection().params().clone();
        assert_eq!((p.header_digest, p.data_digest), (pick(hd), pick(dd)));
        write_read_random(&mut l, 3, 256 << 10);
    }
}

#[test]
fn r2t_only_writes_and_many_small_data_in_pdus() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions {
        params: vec![
            ("ImmediateData".into(), "No".into()),
            ("InitialR2T".into(), "Yes".into()),
            ("MaxBurstLength".into(), "65536".into()),
        ],
        ..Default::default()
    });
    let mut l = lun(&t, |c| {
        c.offer.immediate_data = false;
        c.offer.initial_r2t = true;
        // 512-byte data segments: a 1 MiB read is 2048 Data-In PDUs.
        c.offer.max_recv_data_segment_len = 512;
    });
    let p = l.session().connection().params().clone();
    assert!(p.initial_r2t && !p.immediate_data, "{p}");
    assert_eq!(p.max_recv_data_segment_len, 512);
    write_read_random(&mut l, 4, 1 << 20);
    let stats = l.session().connection().stats.clone();
    assert!(
        stats.r2ts >= 4 * 16,
        "1 MiB writes with 64 KiB bursts need R2Ts: {stats:?}"
    );
    assert!(stats.pdus_in >= 4 * 2048, "{stats:?}");
}

#[test]
fn cli_and_libiscsi_agree_on_inquiry_and_capacity() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let Some(inq) = which("iscsi-inq") else {
        assert!(!common::required(), "libiscsi-bin missing in CI");
        eprintln!("SKIPPED: iscsi-inq not installed");
        return;
    };
    let t = Tgtd::start(TgtdOptions {
        lun_sizes: vec![48 << 20],
        ..Default::default()
    });
    let url = t.url(1);
    let ours = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
        .args(["--json", "inquiry", &url])
        .output()
        .unwrap();
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let ours: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
    let theirs = String::from_utf8(Command::new(inq).arg(&url).output().unwrap().stdout).unwrap();
    let field = |name: &str| {
        theirs
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(ours["vendor"].as_str().unwrap(), field("Vendor:"));
    assert_eq!(ours["product"].as_str().unwrap(), field("Product:"));
    assert_eq!(ours["revision"].as_str().unwrap(), field("Revision:"));

    let ours = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
        .args(["--json", "readcap", &url])
        .output()
        .unwrap();
    let ours: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
    assert_eq!(ours["capacity_bytes"].as_u64(), Some(48 << 20));
    match which("iscsi-readcapacity16") {
        Some(rc) => {
            let theirs =
                String::from_utf8(Command::new(rc).arg(&url).output().unwrap().stdout).unwrap();
            let total = theirs
                .lines()
                .find_map(|l| l.trim().strip_prefix("Total size:"))
                .map(|v| v.trim().parse::<u64>().unwrap());
            assert_eq!(total, Some(48 << 20), "iscsi-readcapacity16 said: {theirs}");
        }
        None => {
            assert!(!common::required(), "libiscsi-bin missing in CI");
            eprintln!("SKIPPED: the iscsi-readcapacity16 cross-check (not installed)");
        }
    }
}

#[test]
fn cli_write_read_round_trip_and_clear_errors() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions::default());
    let bin = env!("CARGO_BIN_EXE_iscsi-bypass");
    let dir = t.dir.join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.bin");
    let output = dir.join("out.bin");
    let data: Vec<u8> = (0..(300 * 512)).map(|i| (i * 31 % 256) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    let url = t.url(1);
    let w = Command::new(bin)
        .args([
            "write",
            &url,
            "--lba",
            "777",
            "--sync",
            "--in",
            input.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let r = Command::new(bin)
        .args([
            "read",
            &url,
            "--lba",
            "777",
            "--blocks",
            "300",
            "--out",
            output.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&output).unwrap(), data);

    // Bad input: one clear line on stderr, non-zero exit.
    let bad_target = format!("iscsi://127.0.0.1:{}/iqn.2026-11.nope:x/1", t.port);
    let cases: [(&[&str], &str); 3] = [
        (&["inquiry", "iscsi://127.0.0.1"], "target URL"),
        (&["inquiry", &bad_target], "target not found"),
        (&["inquiry", "http://x/y/1"], "iscsi://"),
    ];
    for (args, needle) in cases {
        let o = Command::new(bin).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// tgt 1.0.85's SBC emulation has no COMPARE AND WRITE (opcode 89h), and
/// its REPORT SUPPORTED OPERATION CODES says so: the library refuses it
/// without sending it, and sent anyway it comes back as a clear ILLEGAL
/// REQUEST, with nothing written.
#[test]
fn compare_and_write_against_tgtd_is_refused_clearly() {
    use iscsi_bypass::scsi::lun::LunError;
    use iscsi_bypass::scsi::{Feature, ScsiCommand};
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions::default());
    let mut l = lun(&t, |_| {});
    let old = vec![0x11u8; 512];
    l.write(20, old.clone()).unwrap();
    let new = vec![0x22u8; 512];
    let e = l.compare_and_write(20, &old, &new).unwrap_err();
    assert!(
        matches!(e, LunError::Unsupported(Feature::CompareAndWrite)),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("target does not support COMPARE AND WRITE"),
        "{e}"
    );
    let cmd = ScsiCommand::compare_and_write(20, 1, 512, false).unwrap();
    let mut data = old.clone();
    data.extend_from_slice(&new);
    let e = l.run(&cmd, data).unwrap_err();
    assert!(
        e.to_string()
            .contains("ILLEGAL REQUEST: invalid command operation code"),
        "{e}"
    );
    assert_eq!(l.read(20, 1).unwrap(), old);
}

/// Issue #16 against tgt: REPORT SUPPORTED OPERATION CODES, GET LBA
/// STATUS, the Block Limits page, SET TARGET PORT GROUPS. What tgt 1.0.85
/// answers is in docs/login-and-commands.md.
#[test]
fn supported_opcodes_lba_status_block_limits_and_stpg_against_tgtd() {
    use iscsi_bypass::scsi::lun::LunError;
    use iscsi_bypass::scsi::{Feature, ProvisioningStatus};
    use iscsi_bypass::wire::scsi::AluaState;
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions::default());
    let mut l = lun(&t, |_| {});
    // tgt answers the all-commands form: what we use is there, COMPARE AND
    // WRITE and SET TARGET PORT GROUPS are not.
    let rsoc = l.report_supported_opcodes().expect("tgtd answers RSOC");
    for (op, sa) in [
        (0x28, None),
        (0x8a, None),
        (0x42, None),
        (0x93, None),
        (0x41, None),
        (0x9e, Some(0x10)),
        (0x9e, Some(0x12)),
    ] {
        assert!(rsoc.supports(op, sa), "tgtd lacks {op:#x}/{sa:?}: {rsoc:?}");
    }
    assert!(!rsoc.supports(0x89, None) && !rsoc.supports(0xa4, Some(0x0a)));
    let one = l.report_supported_opcode(0x28, None).unwrap();
    assert!(one.is_supported());
    assert_eq!(one.cdb_usage.first(), Some(&0x28));
    let (ops, limits) = l.capabilities().unwrap();
    assert!(ops.known());
    println!("tgtd Block Limits as honoured: {limits:?}");
    // SET TARGET PORT GROUPS: not offered, so not sent.
    let e = l
        .set_target_port_groups(&[(1, AluaState::ActiveOptimized)])
        .unwrap_err();
    assert!(
        matches!(e, LunError::Unsupported(Feature::SetTargetPortGroups)),
        "{e}"
    );
    // GET LBA STATUS follows the sparse backing file: a fresh LU is one
    // deallocated run; written blocks are mapped.
    let cap = l.read_capacity().unwrap();
    let d = l.get_lba_status(0).unwrap();
    println!("tgtd GET LBA STATUS (fresh): {d:?}");
    assert_eq!(d.descriptors[0].lba, 0);
    assert_eq!(d.descriptors[0].status, ProvisioningStatus::Deallocated);
    l.write(0, vec![0xabu8; 64 << 10]).unwrap();
    let d = l.get_lba_status(0).unwrap();
    println!("tgtd GET LBA STATUS (64 KiB written): {d:?}");
    assert_eq!(
        (d.descriptors[0].lba, d.descriptors[0].status),
        (0, ProvisioningStatus::Mapped)
    );
    assert!(d.descriptors[0].blocks >= 128);
    assert!(u64::from(d.descriptors[0].blocks) < cap.block_count);
    // tgt lists UNMAP but, without thin provisioning set on the LU (the
    // default), answers it INVALID COMMAND OPERATION CODE: its list is not
    // the whole truth, and the CHECK CONDITION comes back as it is.
    let e = l.unmap(0, 128).unwrap_err();
    assert!(
        e.to_string()
            .contains("ILLEGAL REQUEST: invalid command operation code"),
        "{e}"
    );
    assert_eq!(
        l.get_lba_status(0).unwrap().descriptors[0].status,
        ProvisioningStatus::Mapped
    );
    // Reads and writes split at whatever tgtd reports still round-trip.
    write_read_random(&mut l, 16, 1 << 20);
}
