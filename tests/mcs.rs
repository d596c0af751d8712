//! MC/S (several connections in one session) and error recovery against
//! real targets on loopback: tgtd (Debian `tgt`), and the embedded target
//! (`src/target/`, which grants MC/S and ERL 2 and injects faults per
//! connection): ERL 1 SNACK, immediate commands, the hostile answers of
//! #14, and ERL 2 TASK REASSIGN of a connection killed mid-write.

mod common;

use common::{tgtd_unavailable, Tgtd, TgtdOptions};
use iscsi_bypass::iscsi::connection::{Command, ConnTimers, Direction, Event};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::mcs::{McsError, McsSession};
use iscsi_bypass::iscsi::session::{Session, SessionConfig};
use iscsi_bypass::scsi::Lun;
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle};
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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

// ---------------------------------------------------------------------------
// Against the embedded target

const EMBEDDED: &str = "iqn.2026-12.org.iscsi-bypass:erl";
/// Every wait on the embedded target is at most this long.
const T: Duration = Duration::from_secs(10);

fn embedded(size: u64) -> TargetHandle {
    Target::start(TargetConfig::ram(EMBEDDED, size)).expect("embedded target")
}

fn dial(addr: SocketAddr) -> KernelTcp {
    KernelTcp::connect(addr, &KernelTcpOptions::default()).unwrap()
}

/// A session configuration for the embedded target: MaxConnections 4
/// offered, quick pings (they find a status lost with nothing after it).
fn embedded_config(edit: impl FnOnce(&mut SessionConfig)) -> SessionConfig {
    let mut login = LoginConfig::new(INITIATOR, Some(EMBEDDED));
    login.offer.max_connections = 4;
    let mut c = SessionConfig::new(login);
    c.timers = ConnTimers {
        nop_interval: Some(Duration::from_millis(200)),
        nop_timeout: Duration::from_secs(5),
        command_timeout: Some(Duration::from_secs(20)),
    };
    edit(&mut c);
    c
}

/// ERL 2, and writes that take many R2Ts (InitialR2T, no immediate data,
/// 16 KiB bursts), so that a write is easily caught part way.
fn erl2(c: &mut SessionConfig) {
    let o = &mut c.login.offer;
    o.error_recovery_level = 2;
    o.default_time2retain = 20;
    o.initial_r2t = true;
    o.immediate_data = false;
    o.max_burst_len = 16 * 1024;
    o.first_burst_len = 16 * 1024;
}

fn scsi(cdb: &[u8], direction: Direction, buffer: Vec<u8>, tag: u64) -> Command {
    let mut c = Command::new(0, cdb, direction, buffer).unwrap();
    c.user_tag = tag;
    c
}

/// WRITE(10) with FUA, which the embedded target counts as it starts each
/// one (`Lun::fua_writes`): a write started twice would count twice.
fn write_fua(lba: u32, blocks: u16, data: Vec<u8>, tag: u64) -> Command {
    let mut cdb = rw10(0x2a, lba, blocks);
    cdb[1] = 0x08;
    scsi(&cdb, Direction::Write, data, tag)
}

/// ERL 1 against the embedded target: Data-In PDUs that it leaves out (its
/// per-connection drop fault, as a digest error would drop them) are asked
/// for again by SNACK and the reads complete whole, both a DataSN gap and
/// a lost status with nothing after it (found by the next ping's StatSN);
/// at ERL 0 the same loss fails the connection, as before.
#[test]
fn erl1_snack_recovers_data_in_the_target_left_out() {
    let target = embedded(4 << 20);
    let faults = target.faults();
    let addr = target.portals()[0];
    let c = embedded_config(|c| {
        c.login.offer.error_recovery_level = 1;
        c.login.offer.max_recv_data_segment_len = 8192;
    });
    let mut s = Session::login(dial(addr), &c).expect("login");
    assert_eq!(s.connection().params().error_recovery_level, 1, "ERL 1");
    let cid = s.outcome().cid;
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    let w = s
        .execute(
            scsi(&rw10(0x2a, 0, 128), Direction::Write, data.clone(), 1),
            T,
        )
        .unwrap();
    assert_eq!(w.status, 0);
    // A 64 KiB read comes in 8 Data-In: the first is left out.
    faults.drop_data_in(cid, 1);
    let r = s
        .execute(
            scsi(&rw10(0x28, 0, 128), Direction::Read, vec![0; 65536], 2),
            T,
        )
        .expect("read recovered by a Data SNACK");
    assert_eq!(r.status, 0);
    assert!(r.buffer == data, "the read came back whole");
    let st = s.connection().stats.clone();
    assert!(st.snacks >= 1 && st.data_in_discarded >= 1, "{st:?}");
    // A 4 KiB read's one Data-In, which carries the status, is left out.
    faults.drop_data_in(cid, 1);
    let t0 = Instant::now();
    let r = s
        .execute(
            scsi(&rw10(0x28, 8, 8), Direction::Read, vec![0; 4096], 3),
            T,
        )
        .expect("status recovered by a Status SNACK");
    assert!(r.buffer[..] == data[4096..8192]);
    assert!(s.connection().stats.snacks > st.snacks);
    eprintln!(
        "lost status recovered after {:?} (ping interval 200 ms); stats {:?}",
        t0.elapsed(),
        s.connection().stats
    );
    s.logout(T).expect("logout");

    // ERL 0: the same loss fails the connection.
    let c0 = embedded_config(|c| c.login.offer.max_recv_data_segment_len = 8192);
    let mut s0 = Session::login(dial(addr), &c0).expect("login at ERL 0");
    assert_eq!(s0.connection().params().error_recovery_level, 0);
    faults.drop_data_in(s0.outcome().cid, 1);
    let e = s0
        .execute(
            scsi(&rw10(0x28, 0, 128), Direction::Read, vec![0; 65536], 4),
            T,
        )
        .unwrap_err();
    assert!(e.to_string().contains("DataSN 1 out of order"), "{e}");
}

/// Immediate SCSI commands (the I bit, RFC 7143 §3.2.2.1) against the
/// embedded target in strict mode (which checks that an immediate PDU
/// carries the next CmdSN and takes none): a write and a read sent
/// immediate run, between ordinary commands, and the session's CmdSN
/// count moves only for the ordinary ones.
#[test]
fn immediate_commands_run_and_take_no_cmdsn() {
    let target = Target::start(TargetConfig::ram(EMBEDDED, 1 << 20).strict(true)).expect("target");
    let mut s = Session::login(dial(target.portals()[0]), &embedded_config(|_| {})).unwrap();
    let first = s.connection().window().next_cmd_sn();
    let mut w = write_fua(4, 2, vec![0x3c; 1024], 1);
    w.immediate = true;
    assert_eq!(s.execute(w, T).unwrap().status, 0);
    let plain = s
        .execute(scsi(&[0; 6], Direction::None, Vec::new(), 2), T)
        .unwrap();
    assert_eq!(plain.status, 0);
    let mut r = scsi(&rw10(0x28, 4, 2), Direction::Read, vec![0; 1024], 3);
    r.immediate = true;
    let r = s.execute(r, T).unwrap();
    assert_eq!((r.status, r.buffer), (0, vec![0x3c; 1024]));
    assert_eq!(
        s.connection().window().next_cmd_sn(),
        first.next(),
        "only the TUR took a CmdSN"
    );
    assert_eq!(target.lun(0).unwrap().fua_writes(), 1);
    assert!(target.violations().is_empty(), "{:?}", target.violations());
    s.logout(T).unwrap();
}

/// An MC/S session of two connections (CIDs 0 and 1) on the embedded
/// target.
fn mcs_pair(target: &TargetHandle, edit: impl FnOnce(&mut SessionConfig)) -> McsSession<KernelTcp> {
    let addr = target.portals()[0];
    let mut s = McsSession::open(dial(addr), &embedded_config(edit)).expect("leading login");
    assert_eq!(s.granted(), 4);
    s.add_connection(dial(addr), 1).expect("second connection");
    s
}

/// Hostile input of #14 on the embedded target: a target that granted
/// MaxConnections and then refuses the second login, and a CID reused
/// for a new connection while its connection lives: each a clear, typed
/// error, and the session's connections go on with nothing lost.
#[test]
fn mcs_refused_second_login_and_reused_cid_lose_nothing() {
    let target = embedded(1 << 20);
    let faults = target.faults();
    let addr = target.portals()[0];
    let mut s = McsSession::open(dial(addr), &embedded_config(|_| {})).expect("leading login");
    assert_eq!(s.granted(), 4);
    // A write in flight on CID 0 while the second login is refused.
    s.submit(write_fua(0, 8, vec![0x11; 4096], 1)).unwrap();
    faults.refuse_logins(3, 1);
    let e = s.add_connection(dial(addr), 1).unwrap_err();
    assert!(
        matches!(
            e,
            McsError::LoginRefused {
                cid: 1,
                granted: 4,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("granted MaxConnections=4, then refused the login of connection CID 1"),
        "{e}"
    );
    faults.accept_logins();
    assert_eq!(s.cids(), [0]);
    let done = loop {
        match s.next_event(T).unwrap() {
            Some((0, Event::Completed(c))) => break c,
            Some(_) => {}
            None => panic!("the write on CID 0 did not complete"),
        }
    };
    assert_eq!((done.user_tag, done.status), (1, 0));
    // Now CID 1 joins; a second connection with CID 1 is refused.
    s.add_connection(dial(addr), 1).expect("second connection");
    let e = s.add_connection(dial(addr), 1).unwrap_err();
    assert!(matches!(e, McsError::CidInUse { cid: 1, .. }), "{e}");
    assert_eq!(s.cids(), [0, 1]);
    let mut cids = target.session_cids(s.tsih()).unwrap();
    cids.sort_unstable();
    assert_eq!(cids, [0, 1], "the target's session is as it was");
    // Both connections still carry I/O, and the write is there.
    let r = |tag| scsi(&rw10(0x28, 0, 8), Direction::Read, vec![0; 4096], tag);
    s.submit_on(0, r(2)).unwrap();
    s.submit_on(1, r(3)).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match s.next_event(T).unwrap() {
            Some((cid, Event::Completed(c))) => {
                assert_eq!((c.status, &c.buffer[..]), (0, &[0x11; 4096][..]));
                seen.push((cid, c.user_tag));
            }
            Some(_) => {}
            None => panic!("reads did not complete: {seen:?}"),
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, [(0, 2), (1, 3)]);
    assert_eq!(target.lun(0).unwrap().fua_writes(), 1);
    s.logout(T).unwrap();
}

/// Submits `writes` on CID 1, waits until the target has every one of them
/// (ExpCmdSN past the last), then hangs CID 1 (it stops reading, so its
/// writes stop part way) and kills it; returns the tags completed before
/// the failure was seen.
fn kill_cid1_mid_write(
    s: &mut McsSession<KernelTcp>,
    target: &TargetHandle,
    writes: Vec<Command>,
) -> Vec<u64> {
    for w in writes {
        s.submit_on(1, w).unwrap();
    }
    let last = s.window().next_cmd_sn();
    let deadline = Instant::now() + T;
    while s.window().exp_cmd_sn().lt(last) {
        s.poll_io().expect("both connections up");
        assert!(
            Instant::now() < deadline,
            "the target never took the writes"
        );
    }
    let faults = target.faults();
    faults.hang_connection(1);
    faults.kill_connection(1);
    let mut done = Vec::new();
    loop {
        match s.next_event(T) {
            Ok(Some((cid, Event::Completed(c)))) => {
                assert_eq!((cid, c.status), (1, 0));
                done.push(c.user_tag);
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("CID 1 was never seen to fail"),
            Err(McsError::ConnectionFailed { cid: 1, .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    faults.unhang_connection(1);
    faults.revive_connection(1);
    done
}

const K: u64 = 8;
const BLOCKS: u16 = 256; // 128 KiB: 8 bursts of 16 KiB
const BYTES: usize = BLOCKS as usize * 512;

fn generation(g: u8, i: u64) -> Vec<u8> {
    (0..BYTES)
        .map(|b| (b as u8).wrapping_mul(3) ^ g.wrapping_mul(37) ^ (i as u8).wrapping_mul(11))
        .collect()
}

fn lba_of(i: u64) -> u32 {
    (i * u64::from(BLOCKS)) as u32
}

/// #14, done when "a connection killed mid-write loses nothing, and no
/// write is executed twice": an MC/S session of two connections at ERL 2
/// on the embedded target writes generation 1 everywhere, then sends
/// generation 2 of every region on CID 1, which is killed part way
/// (per-CID fault). Recovery (logout reason 2, TASK REASSIGN of what the
/// target holds) moves its writes onto CID 0; every one completes there,
/// every region reads back generation 2 (through the session and at the
/// LUN), and the target started each write once (its FUA count).
#[test]
fn erl2_connection_killed_mid_write_loses_nothing_and_runs_each_write_once() {
    let target = embedded(8 << 20);
    let lun = target.lun(0).unwrap();
    let mut s = mcs_pair(&target, erl2);
    assert_eq!(s.params().error_recovery_level, 2);
    let gen1 = (0..K)
        .map(|i| write_fua(lba_of(i), BLOCKS, generation(1, i), i))
        .collect();
    run_all(&mut s, gen1);
    assert_eq!(lun.fua_writes(), K);
    let gen2 = (0..K)
        .map(|i| write_fua(lba_of(i), BLOCKS, generation(2, i), 100 + i))
        .collect();
    let before = kill_cid1_mid_write(&mut s, &target, gen2);
    // Mid-write: some of the 8 bursts of each write were asked for (and
    // sent) on CID 1, not all.
    let r2ts = s
        .session(1)
        .expect("CID 1 kept until recovered")
        .connection()
        .stats
        .r2ts;
    assert!(
        (1..K * 8).contains(&r2ts),
        "CID 1 answered {r2ts} of the {} R2Ts",
        K * 8
    );
    let moved = s.recover(1, 0, T).expect("ERL 2 recovery onto CID 0");
    eprintln!("CID 1 had answered {r2ts} of {} R2Ts", K * 8);
    eprintln!(
        "{} writes done before CID 1 died, {moved} moved to CID 0",
        before.len()
    );
    assert_eq!(before.len() + moved, K as usize);
    assert!(moved >= 1, "CID 1 was killed with no write in flight");
    let mut done = before.len();
    while done < K as usize {
        match s.next_event(T).expect("CID 0 stays up") {
            Some((cid, Event::Completed(c))) => {
                assert_eq!((cid, c.status), (0, 0), "tag {}: {:?}", c.user_tag, c.sense);
                done += 1;
            }
            Some((
                _,
                Event::Reassigned {
                    user_tag,
                    response,
                    refused,
                },
            )) => assert!(
                response == 0 && refused.is_none(),
                "TASK REASSIGN of tag {user_tag} answered {response}"
            ),
            Some(_) => {}
            None => panic!("timed out with {done} of {K} generation-2 writes done"),
        }
    }
    assert_eq!(lun.fua_writes(), 2 * K, "each write started once");
    let mut back = vec![0u8; BYTES];
    for i in 0..K {
        lun.read(u64::from(lba_of(i)) * 512, &mut back);
        assert!(
            back == generation(2, i),
            "region {i} at the LUN is not generation 2"
        );
    }
    let reads = (0..K)
        .map(|i| {
            scsi(
                &rw10(0x28, lba_of(i), BLOCKS),
                Direction::Read,
                vec![0; BYTES],
                200 + i,
            )
        })
        .collect();
    let r = run_all(&mut s, reads);
    for i in 0..K {
        assert!(
            r[&(200 + i)].1 == generation(2, i),
            "region {i} reads back stale"
        );
    }
    assert_eq!(target.session_cids(s.tsih()).unwrap(), [0]);
    s.logout(T).unwrap();
}

/// #14 hostile input: a TASK REASSIGN that the target refuses (its fault
/// answers 255). The refused tasks come back to the caller as failed
/// (`Event::Reassigned` with the response and the command), nothing
/// waits for them, the session goes on, and the commands sent again as
/// new ones complete: every region reads back what was last written.
#[test]
fn mcs_refused_task_reassign_gives_the_commands_back_and_nothing_hangs() {
    let target = embedded(8 << 20);
    let lun = target.lun(0).unwrap();
    let mut s = mcs_pair(&target, erl2);
    let writes = (0..K)
        .map(|i| write_fua(lba_of(i), BLOCKS, generation(3, i), i))
        .collect();
    let before = kill_cid1_mid_write(&mut s, &target, writes);
    target.faults().refuse_task_reassign(u32::MAX);
    let t0 = Instant::now();
    let moved = s.recover(1, 0, T).expect("recovery is attempted");
    let mut refused = Vec::new();
    let mut done = before.len();
    while done + refused.len() < K as usize {
        match s.next_event(T).expect("CID 0 stays up") {
            Some((
                _,
                Event::Reassigned {
                    user_tag,
                    response,
                    refused: Some(cmd),
                },
            )) => {
                assert_eq!(response, 255);
                assert_eq!(cmd.user_tag, user_tag);
                refused.push(*cmd);
            }
            Some((_, Event::Reassigned { response, .. })) => {
                panic!("a refused TASK REASSIGN ({response}) without its command")
            }
            Some((0, Event::Completed(c))) => {
                // Retried ones (the target never had them) run on CID 0.
                assert_eq!(c.status, 0);
                done += 1;
            }
            Some(_) => {}
            None => panic!(
                "hung: {done} done, {} refused of {K} ({moved} moved)",
                refused.len()
            ),
        }
    }
    assert!(!refused.is_empty(), "no TASK REASSIGN was refused");
    eprintln!(
        "{} refused, {done} done, in {:?}",
        refused.len(),
        t0.elapsed()
    );
    // The caller sends them again as new commands: they complete.
    let n = refused.len();
    let again = run_all(&mut s, refused);
    assert_eq!(again.len(), n);
    let reads = (0..K)
        .map(|i| {
            scsi(
                &rw10(0x28, lba_of(i), BLOCKS),
                Direction::Read,
                vec![0; BYTES],
                300 + i,
            )
        })
        .collect();
    let r = run_all(&mut s, reads);
    for i in 0..K {
        assert!(r[&(300 + i)].1 == generation(3, i), "region {i}");
    }
    // Each refused task was started at the target once before and once as a new command.
    assert_eq!(lun.fua_writes(), K + n as u64);
    s.logout(T).unwrap();
}
