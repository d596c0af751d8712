//! SCSI commands hosts rely on, through the library against the embedded
//! target: WRITE with FUA (`Io::write_durable`, `IoQueue::write_at_durable`),
//! COMPARE AND WRITE (`LunHandle::compare_and_write`).

use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::session::{Session, SessionConfig};
use iscsi_bypass::scsi::lun::{LunError, LunHandle};
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle};
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use iscsi_bypass::{Device, IdleMode, MultipathDevice, Options};
use iscsi_bypass::{Io, IoOp};
use std::time::Duration;

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:scsi-commands";

fn open(target: &TargetHandle) -> MultipathDevice {
    let url = format!("iscsi://{}/{IQN}/0", target.portals()[0]);
    let opts = Options {
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        login_timeout: Duration::from_secs(3),
        ..Options::default()
    };
    Device::open_urls(&[&url], &opts).expect("open")
}

#[test]
fn durable_writes_carry_fua_and_plain_ones_do_not() {
    let target = Target::start(TargetConfig::ram(IQN, 4 << 20)).expect("target");
    let dev = open(&target);
    let lun = target.lun(0).unwrap();
    let mut q = dev.queue_pair();
    let data = vec![0xc3u8; 8192];
    q.write_at(0, &data).unwrap();
    assert_eq!((lun.fua_writes(), lun.cache_syncs()), (0, 0));
    q.write_at_durable(16, &data, true).unwrap();
    assert_eq!((lun.fua_writes(), lun.cache_syncs()), (1, 0));
    q.write_at_durable(32, &data, false).unwrap();
    assert_eq!(lun.fua_writes(), 1);
    // The asynchronous interface: Io::write_durable.
    q.submit(Io::write_durable(48, 16, data.clone(), true, 7))
        .map_err(|e| e.to_string())
        .unwrap();
    let mut done = Vec::new();
    q.wait_completions(&mut done, 1, Duration::from_secs(5));
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].user_tag, done[0].op), (7, IoOp::WriteFua));
    done[0].result.clone().unwrap();
    assert_eq!((lun.fua_writes(), lun.cache_syncs()), (2, 0));
    q.flush().unwrap();
    assert_eq!(lun.cache_syncs(), 1);
    let mut back = vec![0u8; 8192];
    for lba in [0, 16, 32, 48] {
        q.read_at(lba, &mut back).unwrap();
        assert_eq!(back, data, "LBA {lba}");
    }
    drop(q);
    dev.close();
}

fn lun_handle(target: &TargetHandle) -> LunHandle<KernelTcp> {
    let t = KernelTcp::connect(target.portals()[0], &KernelTcpOptions::default()).unwrap();
    let mut c = SessionConfig::new(LoginConfig::new(
        "iqn.2026-11.org.iscsi-bypass:scsi-commands-ini",
        Some(IQN),
    ));
    c.login_timeout = Duration::from_secs(3);
    LunHandle::new(Session::login(t, &c).expect("login"), 0)
}

#[test]
fn compare_and_write_writes_on_match_and_reports_the_miscompare_offset() {
    let target = Target::start(TargetConfig::ram(IQN, 4 << 20)).expect("target");
    let mut lun = lun_handle(&target);
    let old: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    lun.write(100, old.clone()).unwrap();
    // The ATS pattern: expected = what we read, new = our lock record.
    let new = vec![0x42u8; 1024];
    lun.compare_and_write(100, &old, &new).expect("match");
    assert_eq!(lun.read(100, 2).unwrap(), new);
    // Someone else changed it: a miscompare at the first differing byte
    // (byte 700 of the 2 blocks), and nothing is written.
    let mut stale = new.clone();
    stale[700] ^= 1;
    let theirs = vec![0x17u8; 1024];
    match lun.compare_and_write(100, &stale, &theirs) {
        Err(LunError::Miscompare { offset }) => assert_eq!(offset, 700),
        other => panic!("expected a miscompare, got {other:?}"),
    }
    assert_eq!(
        lun.read(100, 2).unwrap(),
        new,
        "nothing written on miscompare"
    );
    // Bad input is refused before anything is sent, or by the target.
    let e = lun.compare_and_write(100, &new, &new[..512]).unwrap_err();
    assert!(
        e.to_string().contains("1024 bytes to compare but 512"),
        "{e}"
    );
    let e = lun
        .compare_and_write(100, &new[..100], &new[..100])
        .unwrap_err();
    assert!(matches!(e, LunError::Unaligned { .. }), "{e}");
    let e = lun
        .compare_and_write(8191, &new, &new)
        .expect_err("past the end");
    assert!(matches!(e, LunError::OutOfRange { .. }), "{e}");
    // More than the Block Limits' MAXIMUM COMPARE AND WRITE LENGTH (16).
    let big = vec![0u8; 17 * 512];
    let e = lun.compare_and_write(0, &big, &big).unwrap_err();
    assert!(e.to_string().contains("ILLEGAL REQUEST"), "{e}");
}

#[test]
fn compare_and_write_is_atomic_between_racing_initiators() {
    // Two sessions race to take the same "lock block" from the same
    // expected state: exactly one wins each round.
    let target = Target::start(TargetConfig::ram(IQN, 4 << 20)).expect("target");
    let mut a = lun_handle(&target);
    let b = lun_handle(&target);
    let free = vec![0u8; 512];
    a.write(7, free.clone()).unwrap();
    let wins = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let rounds = 50;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let spawn = |mut lun: LunHandle<KernelTcp>, me: u8| {
        let (wins, barrier, free) = (wins.clone(), barrier.clone(), free.clone());
        std::thread::spawn(move || {
            for round in 0..rounds {
                barrier.wait();
                let mine = vec![me; 512];
                let won = match lun.compare_and_write(7, &free, &mine) {
                    Ok(()) => true,
                    Err(LunError::Miscompare { .. }) => false,
                    Err(e) => panic!("round {round}: {e}"),
                };
                // Both have tried before the winner releases the lock.
                barrier.wait();
                if won {
                    wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    lun.compare_and_write(7, &mine, &free).unwrap();
                }
                barrier.wait();
            }
        })
    };
    let ta = spawn(a, 1);
    let tb = spawn(b, 2);
    ta.join().unwrap();
    tb.join().unwrap();
    // Each round at least one wins (the lock is free at its start); both
    // can win only if one released before the other tried.
    let w = wins.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (rounds..=2 * rounds).contains(&w),
        "{w} wins in {rounds} rounds"
    );
}
