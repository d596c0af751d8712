//! ALUA end to end: the multipath device against the embedded target with
//! two portals in two target port groups, whose access states the test
//! changes while I/O runs. The target reports each change with UNIT
//! ATTENTION 2A/06 on every session (and refuses I/O in standby with NOT
//! READY 04/0B); the device must re-read REPORT TARGET PORT GROUPS and move
//! I/O to the optimized path, with no application error and no lost write.
//! Kernel TCP on loopback: the ALUA logic does not depend on the transport.

use iscsi_bypass::multipath::{Io, IoCompletion};
use iscsi_bypass::target::{AluaState, Target, TargetConfig, TargetHandle};
use iscsi_bypass::{Device, IdleMode, IoQueue, Options, Policy};
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:alua";
const BLOCKS: u32 = 8;

struct Load {
    per_path: [u64; 2],
    errors: u64,
}

/// 4 KiB writes at queue depth 8 for `dur`, each stamped with its chunk
/// and generation; `generation` tracks what each chunk must hold.
fn write_load(q: &mut IoQueue, dur: Duration, generation: &mut [u32]) -> Load {
    let bs = q.block_size() as usize;
    let chunk = BLOCKS as usize * bs;
    let mut load = Load {
        per_path: [0; 2],
        errors: 0,
    };
    let mut free: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; chunk]).collect();
    let mut pending = vec![0u32; generation.len()];
    let mut out: Vec<IoCompletion> = Vec::new();
    let mut next = 0usize;
    let start = Instant::now();
    loop {
        let running = start.elapsed() < dur;
        while running && !free.is_empty() {
            let c = next % generation.len();
            // One write per chunk in flight: the check below relies on it.
            if pending[c] != 0 {
                break;
            }
            let mut buf = free.pop().unwrap();
            let g = generation[c] + 1;
            stamp(&mut buf, c, g);
            pending[c] = g;
            next += 1;
            if let Err(e) = q.submit(Io::write(
                c as u64 * u64::from(BLOCKS),
                BLOCKS,
                buf,
                c as u64,
            )) {
                pending[c] = 0;
                next -= 1;
                free.push(e.into_io().buffer);
                break;
            }
        }
        if !running && q.in_flight() == 0 {
            return load;
        }
        out.clear();
        q.wait_completions(&mut out, 1, Duration::from_millis(50));
        for c in out.drain(..) {
            let chunk = c.user_tag as usize;
            match &c.result {
                Ok(()) => generation[chunk] = pending[chunk],
                Err(e) => {
                    load.errors += 1;
                    eprintln!("write of chunk {chunk} failed: {e}");
                }
            }
            pending[chunk] = 0;
            if let Some(p) = c.path {
                load.per_path[p] += 1;
            }
            free.push(c.buffer);
        }
    }
}

fn stamp(buf: &mut [u8], chunk: usize, generation: u32) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = (chunk as u64) << 32 | u64::from(generation) | (i as u64) << 56;
        w.copy_from_slice(&v.to_le_bytes());
    }
}

fn verify(q: &mut IoQueue, generation: &[u32]) {
    let chunk = BLOCKS as usize * q.block_size() as usize;
    let (mut got, mut want) = (vec![0u8; chunk], vec![0u8; chunk]);
    for (c, &g) in generation.iter().enumerate() {
        if g == 0 {
            continue;
        }
        q.read_at(c as u64 * u64::from(BLOCKS), &mut got)
            .expect("read back");
        stamp(&mut want, c, g);
        assert!(got == want, "chunk {c}: acknowledged generation {g} lost");
    }
}

fn alua_of(dev: &Device) -> Vec<Option<String>> {
    dev.paths().iter().map(|p| p.alua.clone()).collect()
}

fn set(target: &TargetHandle, group1: AluaState, group2: AluaState) {
    target.set_alua_state(1, group1).unwrap();
    target.set_alua_state(2, group2).unwrap();
}

#[test]
fn io_follows_alua_state_changes_without_errors() {
    let target = Target::start(TargetConfig::ram(IQN, 64 << 20).loopback_portals(2))
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
    let l = write_load(&mut q, phase, &mut generation);
    println!("optimized path 0: per path {:?}", l.per_path);
    assert_eq!(l.errors, 0);
    assert_eq!(l.per_path[1], 0, "a non-optimized path was used");

    // 2. The target moves the optimized group: path 0 goes standby (its
    // I/O is refused with 04/0B), path 1 becomes optimized. After the
    // first I/Os learn of it, everything runs on path 1.
    set(&target, AluaState::Standby, AluaState::ActiveOptimized);
    let l = write_load(&mut q, phase, &mut generation);
    println!(
        "switch to path 1: per path {:?}, alua {:?}",
        l.per_path,
        alua_of(&dev)
    );
    assert_eq!(l.errors, 0);
    let l = write_load(&mut q, phase, &mut generation);
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
    let l = write_load(&mut q, phase, &mut generation);
    assert_eq!(l.errors, 0);
    // Path 0 hears of it by a UA on its next command, which it only gets
    // once path 1 (told by its own UA) dropped to non-optimized.
    let l = write_load(&mut q, phase, &mut generation);
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
    let l = write_load(&mut q, phase * 2, &mut generation);
    println!("optimized path down: per path {:?}", l.per_path);
    assert_eq!(l.errors, 0);
    assert!(l.per_path[1] > 0, "the non-optimized path took over");
    verify(&mut q, &generation);
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
    let l = write_load(&mut q, phase, &mut generation);
    assert_eq!(l.errors, 0);
    assert_eq!(l.per_path[1], 0, "the standby path was used");
    // The initiator never moves groups while an optimized path is up.
    assert_eq!(target.alua_state(2), Some(AluaState::Standby));

    // Path 0's controller fails: its group goes unavailable and its
    // connections drop (it logs in again, which fences what it had in
    // flight, and finds its group unavailable).
    target.set_alua_state(1, AluaState::Unavailable).unwrap();
    target.faults().portal(0).drop_connections_now();
    let l = write_load(&mut q, phase * 3, &mut generation);
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
    let l = write_load(&mut q, phase, &mut generation);
    assert_eq!(l.errors, 0);
    assert_eq!(l.per_path[0], 0, "the unavailable path was used");
    assert!(l.per_path[1] > 0);
    verify(&mut q, &generation);
    drop(q);
    dev.close();
}
