//! SCSI commands hosts rely on, through the library against the embedded
//! target: WRITE with FUA (`Io::write_durable`, `IoQueue::write_at_durable`),
//! COMPARE AND WRITE (`LunHandle::compare_and_write`).

use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::session::{Session, SessionConfig};
use iscsi_bypass::scsi::lun::{LunError, LunHandle};
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle};
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use iscsi_bypass::{Device, IdleMode, Options, WorkerDevice};
use iscsi_bypass::{Io, IoOp};
use std::time::Duration;

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:scsi-commands";

fn open(target: &TargetHandle) -> WorkerDevice {
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

// ---- Block Limits, GET LBA STATUS, REPORT SUPPORTED OPERATION CODES,
// ---- SET TARGET PORT GROUPS (issue #16) -----------------------------------

use iscsi_bypass::scsi::{Feature, ProvisioningStatus, ScsiCommand};
use iscsi_bypass::target::BlockLimitsConfig;
use iscsi_bypass::wire::scsi::{AluaState as WireAlua, SenseKey, UnmapDescriptor};
use iscsi_bypass::{IoError, SubmitError};

/// ILLEGAL REQUEST with this ASC (ASCQ 0), from a LunHandle error.
#[track_caller]
fn assert_illegal(e: &LunError, asc: u8) {
    let LunError::Scsi(s) = e else {
        panic!("expected CHECK CONDITION, got {e}");
    };
    let sense = s.sense().unwrap_or_else(|| panic!("no sense in {e}"));
    assert_eq!(
        (sense.key, sense.asc, sense.ascq),
        (SenseKey::IllegalRequest, asc, 0),
        "{e}"
    );
}

/// 16-block transfers (granularity 4), 64-block / 2-descriptor UNMAPs,
/// 32-block WRITE SAMEs.
fn small_limits() -> BlockLimitsConfig {
    BlockLimitsConfig {
        max_transfer_bytes: 16 * 512,
        optimal_granularity: 4,
        max_unmap_blocks: 64,
        max_unmap_descriptors: 2,
        unmap_granularity: 8,
        unmap_alignment: Some(0),
        max_write_same_blocks: 32,
    }
}

fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * 512)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn block_limits_the_target_enforces_are_split_to_by_the_library() {
    let target = Target::start(TargetConfig::ram(IQN, 4 << 20).block_limits(small_limits()))
        .expect("target");
    let mut lun = lun_handle(&target);
    // Unsplit commands over the limits fail: the splitting below is needed.
    let read17 = ScsiCommand::read16(0, 17, 512).unwrap();
    assert_illegal(&lun.run(&read17, vec![0; 17 * 512]).unwrap_err(), 0x24);
    let (unmap65, list) = ScsiCommand::unmap(&[UnmapDescriptor { lba: 0, blocks: 65 }]).unwrap();
    assert_illegal(&lun.run(&unmap65, list).unwrap_err(), 0x26);
    let three: Vec<UnmapDescriptor> = (0..3)
        .map(|i| UnmapDescriptor {
            lba: i * 8,
            blocks: 8,
        })
        .collect();
    let (unmap3, list) = ScsiCommand::unmap(&three).unwrap();
    assert_illegal(&lun.run(&unmap3, list).unwrap_err(), 0x26);
    let ws33 = ScsiCommand::write_same16(0, 33, 512, false);
    assert_illegal(&lun.run(&ws33, vec![1; 512]).unwrap_err(), 0x24);

    let (_, limits) = lun.capabilities().unwrap();
    assert_eq!(
        (
            limits.max_transfer_blocks,
            limits.io_chunk_blocks(),
            limits.max_unmap_blocks,
            limits.max_unmap_descriptors,
            limits.unmap_granularity,
            limits.max_write_same_blocks
        ),
        (16, 16, 64, 2, 8, 32)
    );
    // READ/WRITE of 100 blocks: 7 commands each way.
    let data = pattern(100, 3);
    lun.write(10, data.clone()).unwrap();
    assert_eq!(lun.read(10, 100).unwrap(), data);
    // WRITE SAME of 100 blocks: 4 commands.
    let block = vec![0x5au8; 512];
    lun.write_same(200, 100, &block, false).unwrap();
    assert!(lun.read(200, 100).unwrap().iter().all(|&b| b == 0x5a));
    // UNMAP of 200 blocks: 4 commands; reads back as zeroes.
    lun.unmap(10, 200).unwrap();
    assert!(lun.read(10, 200).unwrap().iter().all(|&b| b == 0));
    assert!(lun.read(210, 90).unwrap().iter().all(|&b| b == 0x5a));

    // The multipath device: the asynchronous interface refuses what is
    // over the limits (nothing sent); the blocking helpers split.
    let dev = open(&target);
    assert_eq!(dev.limits(), limits);
    let mut q = dev.queue_pair();
    match q.submit(Io::read(0, 17, Vec::new(), 1)) {
        Err(SubmitError::Invalid {
            error:
                IoError::TooLarge {
                    blocks: 17,
                    max: 16,
                    ..
                },
            ..
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    match q.submit(Io::unmap(0, 65, Vec::new(), 1)) {
        Err(SubmitError::Invalid {
            error: IoError::TooLarge { max: 64, .. },
            ..
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let data = pattern(77, 9);
    q.write_at_durable(500, &data, true).unwrap();
    let mut back = vec![0u8; data.len()];
    q.read_at(500, &mut back).unwrap();
    assert_eq!(back, data);
    q.write_same_at(600, 70, &block).unwrap();
    q.unmap_at(500, 77).unwrap();
    q.read_at(500, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    let mut ws = vec![0u8; 70 * 512];
    q.read_at(600, &mut ws).unwrap();
    assert!(ws.iter().all(|&b| b == 0x5a));
    drop(q);
    dev.close();
}

#[test]
fn get_lba_status_reports_what_unmap_and_write_same_deallocated() {
    let target = Target::start(TargetConfig::ram(IQN, 1 << 20)).expect("target");
    let mut lun = lun_handle(&target);
    // Never written: one deallocated run to the end (2048 blocks).
    let d = lun.get_lba_status(0).unwrap();
    assert_eq!(d.descriptors.len(), 1);
    assert_eq!(
        (
            d.descriptors[0].lba,
            d.descriptors[0].blocks,
            d.descriptors[0].status
        ),
        (0, 2048, ProvisioningStatus::Deallocated)
    );
    lun.write(0, pattern(64, 1)).unwrap();
    lun.unmap(8, 8).unwrap();
    lun.write_same(32, 4, &[0u8; 512], true).unwrap();
    // WRITE SAME of zeroes without UNMAP writes (stays mapped).
    lun.write_same(40, 4, &[0u8; 512], false).unwrap();
    let runs: Vec<(u64, u32, ProvisioningStatus)> = lun
        .get_lba_status(0)
        .unwrap()
        .descriptors
        .iter()
        .map(|d| (d.lba, d.blocks, d.status))
        .collect();
    use ProvisioningStatus::{Deallocated as D, Mapped as M};
    assert_eq!(
        runs,
        vec![
            (0, 8, M),
            (8, 8, D),
            (16, 16, M),
            (32, 4, D),
            (36, 28, M),
            (64, 1984, D)
        ]
    );
    // From an LBA inside a run: the first descriptor starts there.
    let d = lun.get_lba_status(10).unwrap();
    assert_eq!((d.descriptors[0].lba, d.descriptors[0].blocks), (10, 6));
    // Past the end: nothing sent.
    assert!(matches!(
        lun.get_lba_status(2048),
        Err(LunError::OutOfRange { .. })
    ));
    // The target's own view agrees.
    assert_eq!(
        target.lun(0).unwrap().mapping_runs(8, 1),
        vec![(8, 8, false)]
    );
}

#[test]
fn report_supported_opcodes_is_truthful_and_decides_what_is_sent() {
    // A full target: every command it carries out is listed, STPG only
    // with explicit ALUA.
    let target = Target::start(TargetConfig::ram(IQN, 1 << 20)).expect("target");
    let mut lun = lun_handle(&target);
    let all = lun.report_supported_opcodes().unwrap();
    for (op, sa) in [
        (0x28, None),
        (0x8a, None),
        (0x42, None),
        (0x93, None),
        (0x41, None),
        (0x89, None),
        (0x9e, Some(0x10)),
        (0x9e, Some(0x12)),
        (0xa3, Some(0x0c)),
    ] {
        assert!(all.supports(op, sa), "{op:#x}/{sa:?} missing");
    }
    assert!(
        !all.supports(0xa4, Some(0x0a)),
        "STPG without explicit ALUA"
    );
    assert!(
        !all.supports(0x2e, None),
        "WRITE AND VERIFY is not implemented"
    );
    assert!(lun
        .report_supported_opcode(0x42, None)
        .unwrap()
        .is_supported());
    let gls = lun.report_supported_opcode(0x9e, Some(0x12)).unwrap();
    assert!(gls.is_supported());
    assert_eq!(gls.cdb_usage.len(), 16);
    assert_eq!(gls.cdb_usage[0], 0x9e);
    assert!(!lun
        .report_supported_opcode(0x2e, None)
        .unwrap()
        .is_supported());
    // Asking for a command with service actions without one is invalid.
    assert_illegal(&lun.report_supported_opcode(0x9e, None).unwrap_err(), 0x24);
    let e = lun.set_target_port_groups(&[(1, WireAlua::ActiveOptimized)]);
    assert!(
        matches!(e, Err(LunError::Unsupported(Feature::SetTargetPortGroups))),
        "{e:?}"
    );
    drop(lun);
    drop(target);

    // A target without UNMAP, WRITE SAME(16), COMPARE AND WRITE and GET
    // LBA STATUS's opcode: clear errors, no command sent; WRITE SAME goes
    // out as WRITE SAME(10).
    let target =
        Target::start(TargetConfig::ram(IQN, 1 << 20).without_opcodes(&[0x42, 0x93, 0x89, 0x9e]))
            .expect("target");
    let mut lun = lun_handle(&target);
    // READ CAPACITY(16) is gone with 9Eh: READ CAPACITY(10) serves.
    assert_eq!(lun.read_capacity().unwrap().block_count, 2048);
    let all = lun.report_supported_opcodes().unwrap();
    assert!(!all.supports(0x42, None) && !all.supports(0x93, None));
    assert!(all.supports(0x41, None));
    let e = lun.unmap(0, 8).unwrap_err();
    assert!(matches!(e, LunError::Unsupported(Feature::Unmap)), "{e}");
    assert_eq!(
        e.to_string(),
        "target does not support UNMAP (not in its REPORT SUPPORTED OPERATION CODES); not sent"
    );
    let e = lun.compare_and_write(0, &[0; 512], &[1; 512]).unwrap_err();
    assert!(
        matches!(e, LunError::Unsupported(Feature::CompareAndWrite)),
        "{e}"
    );
    let e = lun.get_lba_status(0).unwrap_err();
    assert!(
        matches!(e, LunError::Unsupported(Feature::GetLbaStatus)),
        "{e}"
    );
    lun.write_same(5, 3, &[0x77; 512], false).unwrap();
    assert!(lun.read(5, 3).unwrap().iter().all(|&b| b == 0x77));
}

#[test]
fn the_device_checks_supported_commands_before_sending() {
    let target = Target::start(TargetConfig::ram(IQN, 1 << 20).without_opcodes(&[0x42, 0x93]))
        .expect("target");
    let dev = open(&target);
    assert!(dev.caps().commands.known());
    let mut q = dev.queue_pair();
    match q.submit(Io::unmap(0, 8, Vec::new(), 1)) {
        Err(SubmitError::Invalid {
            error: IoError::Unsupported(Feature::Unmap),
            ..
        }) => {}
        other => panic!("expected Unsupported(UNMAP), got {other:?}"),
    }
    let e = q.unmap_at(0, 8).unwrap_err();
    assert!(
        e.to_string().contains("target does not support UNMAP"),
        "{e}"
    );
    // WRITE SAME(10) instead of (16).
    q.write_same_at(10, 20, &[0x3c; 512]).unwrap();
    let mut back = vec![0u8; 20 * 512];
    q.read_at(10, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x3c));
    drop(q);
    dev.close();
}

#[test]
fn set_target_port_groups_moves_groups_on_an_explicit_alua_target() {
    use iscsi_bypass::target::AluaState;
    let target = Target::start(
        TargetConfig::ram(IQN, 1 << 20)
            .loopback_portals(2)
            .alua_explicit(true),
    )
    .expect("target");
    target.set_alua_state(2, AluaState::Standby).unwrap();
    let mut lun = lun_handle(&target);
    assert_eq!(
        lun.inquiry().unwrap().tpgs,
        iscsi_bypass::wire::scsi::Tpgs::Explicit
    );
    assert!(lun
        .report_supported_opcodes()
        .unwrap()
        .supports(0xa4, Some(0x0a)));
    lun.set_target_port_groups(&[
        (2, WireAlua::ActiveOptimized),
        (1, WireAlua::ActiveNonOptimized),
    ])
    .unwrap();
    assert_eq!(target.alua_state(2), Some(AluaState::ActiveOptimized));
    assert_eq!(target.alua_state(1), Some(AluaState::ActiveNonOptimized));
    let groups = lun.report_target_port_groups().unwrap();
    assert_eq!(groups.group(2).unwrap().state, WireAlua::ActiveOptimized);
    assert_eq!(groups.group(1).unwrap().state, WireAlua::ActiveNonOptimized);
    // An unknown group or a state STPG cannot set: nothing changes.
    assert_illegal(
        &lun.set_target_port_groups(&[(2, WireAlua::Standby), (9, WireAlua::Standby)])
            .unwrap_err(),
        0x26,
    );
    assert_illegal(
        &lun.set_target_port_groups(&[(1, WireAlua::Offline)])
            .unwrap_err(),
        0x26,
    );
    assert_eq!(target.alua_state(2), Some(AluaState::ActiveOptimized));
}
