//! SCSI persistent reservations through the library, two hosts (two
//! initiator names, so distinct I_T nexuses) on one LU: against the
//! embedded target (host A over two portals, so two nexuses of its own)
//! and against tgtd (Debian `tgt`, SPC-3 reservations; its 1.0.85 has
//! PREEMPT AND ABORT switched off, which the test checks it refuses).
//!
//! Both register; A reserves, B's writes (and under EA its reads) get
//! RESERVATION CONFLICT; READ KEYS / READ RESERVATION show it; B preempts
//! (and aborts) A, after which A is the one refused; RELEASE and CLEAR
//! open the LU again.

mod common;

use common::{tgtd_unavailable, Tgtd, TgtdOptions};
use iscsi_bypass::target::{Target, TargetConfig};
use iscsi_bypass::{Device, IdleMode, IoQueue, Options, PrError, PrType, SenseKey};
use std::time::Duration;

const KEY_A: u64 = 0xa1a1_0000_0000_0001;
const KEY_B: u64 = 0xb2b2_0000_0000_0002;

fn host(name: &str, urls: &[String]) -> Device {
    let opts = Options {
        initiator: format!("iqn.2026-12.org.iscsi-bypass:{name}"),
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        login_timeout: Duration::from_secs(5),
        no_path_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    Device::open_urls(&urls, &opts).expect("open")
}

/// A write of one 4 KiB block at `lba`: Ok, or whether it was a conflict.
fn write(q: &mut IoQueue, lba: u64, fill: u8) -> Result<(), bool> {
    q.write_at(lba, &vec![fill; 4096])
        .map_err(|e| e.is_reservation_conflict())
}

fn read(q: &mut IoQueue, lba: u64) -> Result<Vec<u8>, bool> {
    let mut b = vec![0u8; 4096];
    q.read_at(lba, &mut b)
        .map(|()| b)
        .map_err(|e| e.is_reservation_conflict())
}

fn scenario(a_urls: &[String], b_urls: &[String], preempt_and_abort: bool) {
    let a = host("node-a", a_urls);
    let b = host("node-b", b_urls);
    let (mut qa, mut qb) = (a.queue_pair(), b.queue_pair());
    // Start clean (a tgtd LU file may be reused by nothing, but be sure).
    a.pr_register_and_ignore(KEY_A).expect("register A");
    a.pr_clear(KEY_A).expect("clear");

    let caps = a.pr_capabilities().expect("REPORT CAPABILITIES");
    for t in [
        PrType::WriteExclusive,
        PrType::ExclusiveAccess,
        PrType::WriteExclusiveRegistrantsOnly,
        PrType::ExclusiveAccessRegistrantsOnly,
    ] {
        assert!(
            !caps.type_mask_valid || caps.types.contains(&t),
            "{t} missing from {caps:?}"
        );
    }

    a.pr_register_and_ignore(KEY_A).expect("register A");
    b.pr_register(0, KEY_B).expect("register B");
    let keys = b.pr_read_keys().expect("READ KEYS");
    let a_count = keys.keys.iter().filter(|&&k| k == KEY_A).count();
    assert_eq!(
        a_count,
        a_urls.len(),
        "one registration per path of A: {keys:?}"
    );
    assert!(keys.keys.contains(&KEY_B), "{keys:?}");
    // A wrong old key is a typed conflict.
    let e = b.pr_register(0x1234, KEY_B).unwrap_err();
    assert!(e.is_reservation_conflict(), "{e}");

    // WE-RO: registrants write, the unregistered only read.
    a.pr_reserve(KEY_A, PrType::WriteExclusiveRegistrantsOnly)
        .expect("reserve WE-RO");
    let r = b.pr_read_reservation().expect("READ RESERVATION");
    let held = r.reservation.expect("reserved");
    assert_eq!(
        (held.key, held.pr_type()),
        (KEY_A, Some(PrType::WriteExclusiveRegistrantsOnly))
    );
    write(&mut qa, 0, 0xa1).expect("A writes");
    write(&mut qb, 8, 0xb1).expect("B is registered: it writes too");
    b.pr_register(KEY_B, 0).expect("B unregisters");
    assert_eq!(write(&mut qb, 8, 0xb2), Err(true), "B: conflict");
    assert_eq!(read(&mut qb, 0).expect("B reads")[0], 0xa1);
    // Release by a non-holder does nothing; A's release ends it.
    a.pr_release(KEY_A, PrType::WriteExclusiveRegistrantsOnly)
        .expect("release");
    assert!(a.pr_read_reservation().unwrap().reservation.is_none());
    write(&mut qb, 8, 0xb3).expect("no reservation: B writes");

    // EA: only the holder (one I_T nexus) reads or writes.
    b.pr_register(0, KEY_B).expect("register B again");
    let one_path_a = a_urls.len() == 1;
    a.pr_reserve(KEY_A, PrType::ExclusiveAccess)
        .expect("reserve EA");
    assert_eq!(write(&mut qb, 8, 0xb4), Err(true), "EA: B may not write");
    assert_eq!(read(&mut qb, 8), Err(true), "EA: B may not read");
    if one_path_a {
        write(&mut qa, 0, 0xa2).expect("the holder writes");
    }
    // B fences A: PREEMPT AND ABORT of A's key; B now holds EA.
    if preempt_and_abort {
        b.pr_preempt_and_abort(KEY_B, KEY_A, PrType::ExclusiveAccess)
            .expect("preempt and abort");
    } else {
        // tgt 1.0.85 has PREEMPT AND ABORT commented out of its service
        // action table (usr/spc.c): ILLEGAL REQUEST, INVALID FIELD IN CDB.
        let e = b
            .pr_preempt_and_abort(KEY_B, KEY_A, PrType::ExclusiveAccess)
            .unwrap_err();
        let sense = match &e {
            PrError::Scsi { error, .. } => error.sense().copied(),
            _ => None,
        };
        assert_eq!(
            sense.map(|s| (s.key, s.asc, s.ascq)),
            Some((SenseKey::IllegalRequest, 0x24, 0)),
            "{e}"
        );
        b.pr_preempt(KEY_B, KEY_A, PrType::ExclusiveAccess)
            .expect("preempt");
    }
    let keys = b.pr_read_keys().unwrap();
    assert_eq!(keys.keys, vec![KEY_B], "A's registrations are gone");
    let held = b.pr_read_reservation().unwrap().reservation.unwrap();
    assert_eq!(
        (held.key, held.pr_type()),
        (KEY_B, Some(PrType::ExclusiveAccess))
    );
    assert_eq!(write(&mut qa, 0, 0xa3), Err(true), "A is fenced");
    assert_eq!(read(&mut qa, 0), Err(true), "A is fenced (EA)");
    write(&mut qb, 8, 0xb5).expect("B, the holder, writes");
    let e = a.pr_reserve(KEY_A, PrType::ExclusiveAccess).unwrap_err();
    assert!(e.is_reservation_conflict(), "{e}");

    // Plain PREEMPT: A registers again, B takes its key away again.
    a.pr_register_and_ignore(KEY_A).unwrap();
    b.pr_preempt(KEY_B, KEY_A, PrType::ExclusiveAccess)
        .expect("preempt");
    assert_eq!(b.pr_read_keys().unwrap().keys, vec![KEY_B]);

    // CLEAR: nothing left, everybody writes.
    b.pr_clear(KEY_B).expect("clear");
    let keys = a.pr_read_keys().unwrap();
    assert!(keys.keys.is_empty(), "{keys:?}");
    assert!(a.pr_read_reservation().unwrap().reservation.is_none());
    write(&mut qa, 0, 0xa4).expect("A writes after CLEAR");
    assert_eq!(read(&mut qb, 0).unwrap()[0], 0xa4);
    drop((qa, qb));
    a.close();
    b.close();
}

#[test]
fn reservations_against_the_embedded_target() {
    let iqn = "iqn.2026-12.org.iscsi-bypass:pr";
    let target = Target::start(TargetConfig::ram(iqn, 16 << 20).loopback_portals(2))
        .expect("embedded target");
    let urls: Vec<String> = target
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{iqn}/0"))
        .collect();
    scenario(&urls, &urls[1..], true);
    // Host A over one path: the EA holder itself writes.
    scenario(&urls[..1], &urls[1..], true);
}

#[test]
fn reservations_against_tgtd() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions {
        lun_sizes: vec![16 << 20],
        ..TgtdOptions::default()
    });
    let url = vec![t.url(1)];
    scenario(&url, &url, false);
}
