//! ALUA end to end: the multipath device against the embedded target with
//! two portals in two target port groups, whose access states the test
//! changes while I/O runs. The target reports each change with UNIT
//! ATTENTION 2A/06 on every session (and refuses I/O in standby with NOT
//! READY 04/0B); the device must re-read REPORT TARGET PORT GROUPS and move
//! I/O to the optimized path, with no application error and no lost write.
//! Kernel TCP on loopback: the ALUA logic does not depend on the transport.

use iscsi_bypass::target::{AluaState, Target, TargetConfig, TargetHandle};
use iscsi_bypass::{Device, IdleMode, Options, Policy};
#[path = "common/chunks.rs"]
mod chunks;
use chunks::{verify, write_load};
use std::time::Duration;

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:alua";
const BLOCKS: u32 = 8;

fn alua_of(dev: &Device) -> Vec<Option<String>> {
    dev.paths().iter().map(|p| p.alua.clone()).collect()
}

fn set(target: &TargetHandle, group1: AluaState, group2: AluaState) {
    target.set_alua_state(1, group1).unwrap();
    target.set_alua_state(2, group2).unwrap();
}

#[test]
fn io_follows_alua_state_changes_without_errors() {
    // One iSCSI portal group, as arrays and tgtd have: a write caught on the
    // path that dies in step 4 is fenced through the other portal.
    let target = Target::start(
        TargetConfig::ram(IQN, 64 << 20)
            .loopback_portals(2)
            .one_portal_group(1),
    )
    .expect("embedded target");
    assert_eq!(target.alua_groups(), vec![1, 2]);
    set(
        &target,
        AluaState::ActiveOptimized,
        AluaState::ActiveNonOptimized,
    );
    let urls: Vec<String> = target
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let opts = Options {
        policy: Policy::QueueDepth,
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        no_path_timeout: Duration::from_secs(20),
        ..Options::default()
    };
    let dev = Device::open_urls(&urls, &opts).expect("open the device");
    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 1024];
    let phase = Duration::from_millis(800);

    // 1. Optimized path 0, non-optimized path 1: only path 0 carries I/O.
    assert_eq!(
        alua_of(&dev),
        vec![
            Some("active/optimized".into()),
            Some("active/non-optimized".into())
        ]
    );
    let l = write_load(&mut q, phase, BLOCKS, &mut generation);
    println!("optimized path 0: per path {:?}", l.per_path);
    assert_eq!(l.errors, 0);
    assert_eq!(l.per_path[1], 0, "a non-optimized path was used");

    // 2. The target moves the optimized group: path 0 goes standby (its
    // I/O is refused with 04/0B), path 1 becomes optimized. After the
    // first I/Os learn of it, everything runs on path 1.
    set(&target, AluaState::Standby, AluaState::ActiveOptimized);
    let l = write_load(&mut q, phase, BLOCKS, &mut generation);
    println!(
        "switch to path 1: per path {:?}, alua {:?}",
        l.per_path,
        alua_of(&dev)
    );
    assert_eq!(l.errors, 0);
    let l = write_load(&mut q, phase, BLOCKS, &mut generation);
    println!("after the switch: per path {:?}", l.per_path);
    assert_eq!(l.errors, 0);
    assert_eq!(l.per_path[0], 0, "the standby path was used");
    assert!(l.per_path[1] > 0);
    assert_eq!(
        alua_of(&dev),
        vec![Some("standby".into()), Some("active/optimized".into())]
    );

    // 3. And back (an ALUA fail-back): path 0 optimized again.
    set(
        &target,
        AluaState::ActiveOptimized,
        AluaState::ActiveNonOptimized,
    );
    let l = write_load(&mut q, phase, BLOCKS, &mut generation);
    assert_eq!(l.errors, 0);
    // Path 0 hears of it by a UA on its next command, which it only gets
    // once path 1 (told by its own UA) dropped to non-optimized.
    let l = write_load(&mut q, phase, BLOCKS, &mut generation);
    println!(
        "switched back: per path {:?}, alua {:?}",
        l.per_path,
        alua_of(&dev)
    );
    assert_eq!(l.errors, 0);
    assert_eq!(l.per_path[1], 0, "the non-optimized path was used");

    // 4. The optimized path dies: the non-optimized one takes over.
    target.faults().portal(0).refuse_logins(0x03, 0x01);
    target.faults().portal(0).drop_connections_now();
    let l = write_load(&mut q, phase * 2, BLOCKS, &mut generation);
    println!("optimized path down: per path {:?}", l.per_path);
    assert_eq!(l.errors, 0);
    assert!(l.per_path[1] > 0, "the non-optimized path took over");
    verify(&mut q, BLOCKS, &generation);
    for p in dev.paths() {
        println!(
            "path {} {:?} alua {:?} cmds {} resubmitted {} events {:?}",
            p.name,
            p.state,
            p.alua,
            p.commands,
            p.resubmitted,
            p.events
                .iter()
                .map(|e| (e.state, e.reason.clone()))
                .collect::<Vec<_>>()
        );
    }
    drop(q);
    dev.close();
}

/// Explicit ALUA (issue #16): a target that moves no group by itself
/// (INQUIRY TPGS 10b). Path 0's group is optimized, path 1's standby.
/// Path 0's group becomes unavailable and its connection drops: no active/optimized path
/// is left, so the device sends SET TARGET PORT GROUPS to make path 1's
/// group active/optimized, re-reads REPORT TARGET PORT GROUPS, and carries
/// on there with no application error and no lost write.
#[test]
fn explicit_alua_moves_a_standby_group_when_no_optimized_path_is_left() {
    let target = Target::start(
        TargetConfig::ram(IQN, 64 << 20)
            .loopback_portals(2)
            .alua_explicit(true),
    )
    .expect("embedded target");
    set(&target, AluaState::ActiveOptimized, AluaState::Standby);
    let urls: Vec<String> = target
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let opts = Options {
        policy: Policy::QueueDepth,
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        no_path_timeout: Duration::from_secs(20),
        ..Options::default()
    };
    let dev = Device::open_urls(&urls, &opts).expect("open the device");
    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 512];
    let phase = Duration::from_millis(600);
    let l = write_load(&mut q, phase, BLOCKS, &mut generation);
    assert_eq!(l.errors, 0);
    assert_eq!(l.per_path[1], 0, "the standby path was used");
    // The initiator never moves groups while an optimized path is up.
    assert_eq!(target.alua_state(2), Some(AluaState::Standby));

    // Path 0's controller fails: its group goes unavailable and its
    // connections drop (it logs in again, which fences what it had in
    // flight, and finds its group unavailable).
    target.set_alua_state(1, AluaState::Unavailable).unwrap();
    target.faults().portal(0).drop_connections_now();
    let l = write_load(&mut q, phase * 3, BLOCKS, &mut generation);
    println!(
        "after path 0 died: per path {:?}, alua {:?}, target group 2 {:?}",
        l.per_path,
        alua_of(&dev),
        target.alua_state(2)
    );
    assert_eq!(l.errors, 0);
    assert_eq!(
        target.alua_state(2),
        Some(AluaState::ActiveOptimized),
        "the initiator did not send SET TARGET PORT GROUPS"
    );
    assert!(l.per_path[1] > 0, "I/O did not continue on path 1");
    assert_eq!(alua_of(&dev)[1], Some("active/optimized".into()));
    let l = write_load(&mut q, phase, BLOCKS, &mut generation);
    assert_eq!(l.errors, 0);
    assert_eq!(l.per_path[0], 0, "the unavailable path was used");
    assert!(l.per_path[1] > 0);
    verify(&mut q, BLOCKS, &generation);
    drop(q);
    dev.close();
}
