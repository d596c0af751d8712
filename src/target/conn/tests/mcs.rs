//! MC/S and error recovery, driven with raw PDUs: connections of one
//! session, session-wide CmdSN order, CID reuse, Logout reasons 1 and 2,
//! TASK REASSIGN, SNACK, per-connection faults.

use super::*;

/// Operational keys of a leading connection: MC/S with `erl`, bursts that
/// a two-block write with immediate data and one Data-Out fits.
fn lead_keys(erl: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("MaxConnections", "4"),
        ("ErrorRecoveryLevel", erl),
        ("DefaultTime2Retain", "20"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("FirstBurstLength", "1024"),
        ("MaxBurstLength", "1024"),
    ]
}

fn lead_with(s: &SharedTarget, keys: &[(&str, &str)]) -> (Peer, TextPairs) {
    let mut p = Peer::new(s.clone(), 0);
    let t = p.login_normal(keys);
    (p, t)
}

fn lead(s: &SharedTarget, erl: &'static str) -> Peer {
    let (p, t) = lead_with(s, &lead_keys(erl));
    assert_eq!(t.get("MaxConnections"), Some("4"));
    assert_eq!(t.get("ErrorRecoveryLevel"), Some(erl));
    p
}

/// A login of connection `cid` into `lead`'s session.
fn joiner(s: &SharedTarget, lead: &Peer, cid: u16) -> Peer {
    let mut p = Peer::new(s.clone(), 0);
    p.isid = lead.isid;
    p.tsih = lead.conn.tsih();
    p.cid = cid;
    p.cmd_sn = lead.cmd_sn;
    // ITTs are session-wide: keep them apart.
    p.itt = u32::from(cid) << 16;
    p
}

fn join(s: &SharedTarget, lead: &Peer, cid: u16) -> Peer {
    let mut p = joiner(s, lead, cid);
    p.login_normal(&[("MaxRecvDataSegmentLength", "65536")]);
    assert_eq!(p.conn.tsih(), lead.conn.tsih());
    assert_eq!(p.conn.cid(), cid);
    p
}

#[track_caller]
fn one_response(pdus: &[Pdu]) -> ScsiResponse {
    assert_eq!(pdus.len(), 1, "{pdus:?}");
    match &pdus[0].0 {
        PduHeader::ScsiResponse(r) => r.clone(),
        other => panic!("not a SCSI Response: {other:?}"),
    }
}

fn write_cmd(p: &mut Peer, lba: u32, blocks: u16, final_bit: bool) -> ScsiCommand {
    p.command(
        &write10_cdb(lba, blocks),
        false,
        true,
        u32::from(blocks) * 512,
        final_bit,
    )
}

fn data_out(itt: u32, ttt: u32, sn: u32, offset: u32, final_bit: bool) -> PduHeader {
    PduHeader::DataOut(DataOut {
        final_bit,
        lun: 0,
        itt,
        ttt,
        exp_stat_sn: Sn(0),
        data_sn: Sn(sn),
        buffer_offset: offset,
    })
}

fn logout(p: &mut Peer, reason: u8, cid: u16) -> LogoutResponse {
    let itt = p.next_itt();
    let h = PduHeader::LogoutRequest(LogoutRequest {
        immediate: true,
        reason,
        itt,
        cid,
        cmd_sn: p.cmd_sn,
        exp_stat_sn: Sn(0),
    });
    let pdus = p.send(h, &[]);
    assert_eq!(pdus.len(), 1, "{pdus:?}");
    match &pdus[0].0 {
        PduHeader::LogoutResponse(r) => r.clone(),
        other => panic!("not a Logout Response: {other:?}"),
    }
}

/// TASK REASSIGN of `task` on `p`: the TMF response code and what followed.
fn reassign(p: &mut Peer, task: u32, exp_data_sn: u32) -> (u8, Vec<Pdu>) {
    let itt = p.next_itt();
    let h = PduHeader::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function: tmf::TASK_REASSIGN,
        lun: 0,
        itt,
        referenced_task_tag: task,
        cmd_sn: p.cmd_sn,
        exp_stat_sn: Sn(0),
        ref_cmd_sn: Sn(0),
        exp_data_sn: Sn(exp_data_sn),
    });
    let mut pdus = p.send(h, &[]);
    assert!(!pdus.is_empty());
    let (PduHeader::TaskMgmtResponse(r), _) = pdus.remove(0) else {
        panic!("no TMF response first: {pdus:?}")
    };
    assert_eq!(r.itt, itt);
    (r.response, pdus)
}

fn snack(p: &mut Peer, kind: u8, itt: u32, beg_run: u32, run_length: u32) -> Vec<Pdu> {
    let h = PduHeader::Snack(Snack {
        kind,
        lun: 0,
        itt,
        ttt: RESERVED_TAG,
        exp_stat_sn: Sn(0),
        beg_run,
        run_length,
    });
    p.send(h, &[])
}

#[track_caller]
fn expect_reject(pdus: &[Pdu], reason: u8) {
    assert_eq!(pdus.len(), 1, "{pdus:?}");
    let PduHeader::Reject(r) = &pdus[0].0 else {
        panic!("not a Reject: {:?}", pdus[0])
    };
    assert_eq!(r.reason, reason);
}

#[test]
fn commands_run_in_cmd_sn_order_across_connections() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut a = lead(&s, "0");
    let mut b = join(&s, &a, 2);
    assert_eq!(a.conn.session_connections(), 2);
    assert_eq!(s.session_count(), 1, "one session, two connections");

    // CmdSN 100 is for A, 101 for B; B's arrives first and waits.
    let first = write_cmd(&mut a, 0, 1, true);
    b.cmd_sn = a.cmd_sn;
    let second = write_cmd(&mut b, 0, 1, true);
    a.cmd_sn = b.cmd_sn;
    assert!(b
        .send(PduHeader::ScsiCommand(second.clone()), &[0xbb; 512])
        .is_empty());
    assert!(b.conn.is_waiting_for_cmd_sn());
    assert!(b.tick().is_empty(), "still waiting for CmdSN 100");
    let ra = one_response(&a.send(PduHeader::ScsiCommand(first.clone()), &[0xaa; 512]));
    assert_eq!((ra.itt, ra.status), (first.itt, ScsiStatus::Good.as_u8()));
    assert_eq!(ra.exp_cmd_sn, Sn(101));
    // Now B's turn: its status goes out on B, with B's own StatSN.
    let rb = one_response(&b.tick());
    assert_eq!((rb.itt, rb.status), (second.itt, ScsiStatus::Good.as_u8()));
    assert_eq!(rb.exp_cmd_sn, Sn(102));
    assert_eq!(ra.stat_sn, rb.stat_sn, "StatSN counts per connection");
    assert!(!b.conn.is_waiting_for_cmd_sn());
    let mut block = vec![0u8; 512];
    s.luns[0].read(0, &mut block);
    assert_eq!(block, vec![0xbb; 512], "the later CmdSN wrote last");

    // A write whose unsolicited Data-Out waits with it: CmdSN 103 on A
    // (immediate data + one Data-Out) before 102 on B (a read of it).
    b.cmd_sn = Sn(102);
    a.cmd_sn = Sn(103);
    let w = write_cmd(&mut a, 2, 2, false);
    let data: Vec<u8> = (0..1024u32).map(|i| (i % 253) as u8).collect();
    assert!(a
        .send(PduHeader::ScsiCommand(w.clone()), &data[..512])
        .is_empty());
    assert!(a
        .send(data_out(w.itt, RESERVED_TAG, 0, 512, true), &data[512..])
        .is_empty());
    assert!(a.conn.is_waiting_for_cmd_sn());
    let (old, _) = collect_data_in(&b.read10(2, 2));
    assert_eq!(
        old,
        vec![0u8; 1024],
        "the read (102) ran before the write (103)"
    );
    let rw = one_response(&a.tick());
    assert_eq!((rw.itt, rw.status), (w.itt, ScsiStatus::Good.as_u8()));
    b.cmd_sn = Sn(104);
    let (new, _) = collect_data_in(&b.read10(2, 2));
    assert_eq!(new, data);

    // Immediate commands do not wait: a NOP-Out passes a waiting command.
    a.cmd_sn = Sn(106);
    let late = a.read10(0, 1);
    assert!(late.is_empty() && a.conn.is_waiting_for_cmd_sn());
    let itt = a.next_itt();
    let nop = PduHeader::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt,
        ttt: RESERVED_TAG,
        cmd_sn: Sn(106),
        exp_stat_sn: Sn(0),
    });
    let pong = a.send(nop, &[]);
    assert!(matches!(&pong[..], [(PduHeader::NopIn(n), _)] if n.itt == itt));
    b.cmd_sn = Sn(105);
    let _ = b.read10(0, 1);
    let (d, _) = collect_data_in(&a.tick());
    assert_eq!(d, vec![0xbb; 512]);
}

#[test]
fn joins_that_are_refused() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut keys = lead_keys("0");
    keys[0] = ("MaxConnections", "2");
    let (a, t) = lead_with(&s, &keys);
    assert_eq!(t.get("MaxConnections"), Some("2"));
    let _b = join(&s, &a, 2);
    let names = [
        ("InitiatorName", "iqn.2024-01.test:ini"),
        ("TargetName", IQN),
        ("SessionType", "Normal"),
    ];
    let try_join = |edit: &dyn Fn(&mut Peer)| {
        let mut p = joiner(&s, &a, 3);
        edit(&mut p);
        let (r, _) = p.login_step(Stage::Operational, Stage::FullFeature, true, &names);
        assert!(p.conn.is_closed());
        (r.status_class, r.status_detail)
    };
    assert_eq!(try_join(&|_| {}), (0x02, 0x09), "a third connection");
    assert_eq!(try_join(&|p| p.tsih = 0x7777), (0x02, 0x0a), "unknown TSIH");
    assert_eq!(
        try_join(&|p| p.isid = [0x80, 0, 0, 0, 0, 9]),
        (0x02, 0x0a),
        "the TSIH of another initiator port"
    );
    // A target that offers no MC/S.
    let one = shared(TargetConfig::ram(IQN, 1 << 20).max_connections(1));
    let (a1, t1) = lead_with(&one, &lead_keys("0"));
    assert_eq!(t1.get("MaxConnections"), Some("1"));
    let mut p = joiner(&one, &a1, 2);
    let (r, _) = p.login_step(Stage::Operational, Stage::FullFeature, true, &names);
    assert_eq!((r.status_class, r.status_detail), (0x02, 0x09));
}

#[test]
fn leading_only_keys_are_irrelevant_on_a_second_connection() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let a = lead(&s, "2");
    let mut b = joiner(&s, &a, 2);
    let t = b.login_normal(&[
        ("MaxBurstLength", "512"),
        ("ErrorRecoveryLevel", "0"),
        ("HeaderDigest", "CRC32C"),
    ]);
    assert_eq!(t.get("MaxBurstLength"), Some("Irrelevant"));
    assert_eq!(t.get("ErrorRecoveryLevel"), Some("Irrelevant"));
    assert_eq!(t.get("HeaderDigest"), Some("CRC32C"), "per connection");
    assert_eq!(b.conn.params().max_burst_len, 1024, "the session's value");
    assert_eq!(b.conn.params().error_recovery_level, 2);
    assert!(b.conn.params().digests().header);
    // The digest is this connection's only.
    assert!(!a.conn.params().digests().header);
    let (d, _) = collect_data_in(&b.read10(0, 1));
    assert_eq!(d.len(), 512);
}

/// A write on B half done and a read on B whose status was not
/// acknowledged; B is removed with Logout reason 2 on A, and both tasks
/// are reassigned to A, where the write gets R2Ts for the rest only.
#[test]
fn logout_reason_2_then_task_reassign() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut a = lead(&s, "2");
    let mut b = join(&s, &a, 2);
    s.luns[0].write(4 * 512, &[0x44; 512]);
    let read = b.read10(4, 1);
    let read_itt = b.itt;
    assert_eq!(collect_data_in(&read).0, vec![0x44; 512]);
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 251) as u8).collect();
    let w = write_cmd(&mut b, 8, 4, true);
    let out = b.send(PduHeader::ScsiCommand(w.clone()), &[]);
    let [(PduHeader::R2t(r0), _)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((r0.buffer_offset, r0.desired_len), (0, 1024));
    let out = b.send(data_out(w.itt, r0.ttt, 0, 0, true), &data[..1024]);
    let [(PduHeader::R2t(r1), _)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((r1.buffer_offset, r1.r2t_sn), (1024, Sn(1)));

    // B is lost; A removes it for recovery.
    a.cmd_sn = b.cmd_sn;
    let lo = logout(&mut a, 2, 2);
    assert_eq!((lo.response, lo.time2retain), (0, 20));
    assert!(b.tick().is_empty());
    assert!(b.conn.is_closed());
    assert!(b.conn.close_reason().unwrap().contains("recovery"));
    assert_eq!(a.conn.session_connections(), 1);
    assert_eq!(a.conn.orphaned_tasks(), 2);

    // The write continues on A from the byte B had received.
    let (code, out) = reassign(&mut a, w.itt, 0);
    assert_eq!(code, 0);
    let [(PduHeader::R2t(r2), _)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((r2.buffer_offset, r2.desired_len), (1024, 1024));
    assert_eq!(r2.r2t_sn, Sn(2), "R2TSN goes on");
    let done = one_response(&a.send(data_out(w.itt, r2.ttt, 0, 1024, true), &data[1024..]));
    assert_eq!((done.itt, done.status), (w.itt, ScsiStatus::Good.as_u8()));
    let mut back = vec![0u8; 2048];
    s.luns[0].read(8 * 512, &mut back);
    assert_eq!(back, data);
    // Once only: a second reassignment of it finds no task.
    assert_eq!(reassign(&mut a, w.itt, 0).0, 1);

    // The read's Data-In and status come again, on A, with A's StatSN.
    let (code, out) = reassign(&mut a, read_itt, 0);
    assert_eq!(code, 0);
    let (again, last) = collect_data_in(&out);
    assert_eq!(again, vec![0x44; 512]);
    assert!(last.status_present);
    // After the write's status: two TMF responses, then this status.
    assert_eq!(last.stat_sn, done.stat_sn.plus(3), "A's StatSN");
    assert_eq!(a.conn.orphaned_tasks(), 0);
}

/// A login with the CID of a live connection reinstates it (RFC 7143
/// §6.3.4): the old one closes, and at ERL 2 its task is reassigned to
/// the new one.
#[test]
fn cid_reuse_reinstates_the_connection() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let a = lead(&s, "2");
    let mut b = join(&s, &a, 2);
    let w = write_cmd(&mut b, 0, 2, true);
    let out = b.send(PduHeader::ScsiCommand(w.clone()), &[]);
    assert!(matches!(&out[..], [(PduHeader::R2t(_), _)]));
    let mut b2 = join(&s, &a, 2);
    assert_eq!(a.conn.session_connections(), 2, "CID 2 replaced, not added");
    let _ = b.tick();
    assert!(b.conn.is_closed());
    let (code, out) = reassign(&mut b2, w.itt, 0);
    assert_eq!(code, 0);
    let [(PduHeader::R2t(r), _)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((r.buffer_offset, r.desired_len), (0, 1024));
    let resp = one_response(&b2.send(data_out(w.itt, r.ttt, 0, 0, true), &[0x5a; 1024]));
    assert_eq!(resp.status, ScsiStatus::Good.as_u8());
    let mut back = vec![0u8; 1024];
    s.luns[0].read(0, &mut back);
    assert_eq!(back, vec![0x5a; 1024]);

    // Below ERL 2 the old connection's tasks end with it.
    let s0 = shared(TargetConfig::ram(IQN, 1 << 20));
    let a0 = lead(&s0, "1");
    let mut c = join(&s0, &a0, 2);
    let w0 = write_cmd(&mut c, 0, 2, true);
    let _ = c.send(PduHeader::ScsiCommand(w0), &[]);
    let _c2 = join(&s0, &a0, 2);
    let _ = c.tick();
    assert!(c.conn.is_closed());
    assert_eq!(a0.conn.orphaned_tasks(), 0);
}

#[test]
fn refused_recovery_gets_the_right_answers() {
    // ERL 0: no SNACK, no TASK REASSIGN, no logout for recovery.
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut a = lead(&s, "0");
    let mut b = join(&s, &a, 2);
    a.cmd_sn = b.cmd_sn;
    assert_eq!(
        reassign(&mut a, 0x1234, 0).0,
        4,
        "allegiance reassignment not supported"
    );
    assert_eq!(logout(&mut a, 2, 2).response, 2, "recovery not supported");
    expect_reject(&snack(&mut a, 1, RESERVED_TAG, 0, 0), reject::SNACK);
    // Logout reason 1 of an unknown CID, then of B: B closes, A lives on.
    assert_eq!(logout(&mut a, 1, 9).response, 1, "CID not found");
    assert_eq!(logout(&mut a, 1, 2).response, 0);
    let _ = b.tick();
    assert!(b.conn.is_closed() && !a.conn.is_closed());
    assert_eq!(a.conn.session_connections(), 1);
    let (d, _) = collect_data_in(&a.read10(0, 1));
    assert_eq!(d.len(), 512);

    // ERL 2: unknown task, a task still on this connection, a refusal.
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut a = lead(&s, "2");
    assert_eq!(reassign(&mut a, 0x4321, 0).0, 1, "task does not exist");
    let w = write_cmd(&mut a, 0, 2, true);
    let _ = a.send(PduHeader::ScsiCommand(w.clone()), &[]);
    assert_eq!(reassign(&mut a, w.itt, 0).0, 3, "task still allegiant");
    s.faults.refuse_task_reassign(1);
    assert_eq!(reassign(&mut a, w.itt, 0).0, 255, "function rejected");
    // A target that offers ERL 0 only.
    let s0 = shared(TargetConfig::ram(IQN, 1 << 20).max_error_recovery_level(0));
    let (_, t) = lead_with(&s0, &lead_keys("2"));
    assert_eq!(t.get("ErrorRecoveryLevel"), Some("0"));
    assert_eq!(t.get("DefaultTime2Retain"), Some("0"));
}

#[test]
fn snack_resends_a_dropped_data_in_and_a_status() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut p = Peer::new(s.clone(), 0);
    let t = p.login_normal(&[
        ("ErrorRecoveryLevel", "1"),
        ("MaxRecvDataSegmentLength", "512"),
    ]);
    assert_eq!(t.get("ErrorRecoveryLevel"), Some("1"));
    let block: Vec<u8> = (0..2048u32).map(|i| (i % 249) as u8).collect();
    s.luns[0].write(0, &block);
    // The first Data-In is lost, as on a data digest error.
    s.faults.drop_data_in(1, 1);
    let got = p.read10(0, 4);
    let itt = p.itt;
    let sns: Vec<u32> = got
        .iter()
        .map(|(h, _)| match h {
            PduHeader::DataIn(d) => d.data_sn.0,
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(sns, [1, 2, 3], "DataSN 0 left out");
    let PduHeader::DataIn(last) = &got[2].0 else {
        unreachable!()
    };
    assert!(last.status_present);
    // Data/R2T SNACK for DataSN 0.
    let again = snack(&mut p, 0, itt, 0, 1);
    let [(PduHeader::DataIn(d0), payload)] = &again[..] else {
        panic!("{again:?}")
    };
    assert_eq!((d0.data_sn, d0.buffer_offset), (Sn(0), 0));
    assert_eq!(&payload[..], &block[..512]);
    // Status SNACK for the status (carried in the last Data-In).
    let again = snack(&mut p, 1, RESERVED_TAG, last.stat_sn.0, 1);
    let [(PduHeader::DataIn(d3), _)] = &again[..] else {
        panic!("{again:?}")
    };
    assert!(d3.status_present && d3.stat_sn == last.stat_sn);
    // DataACK: nothing to answer. R-Data SNACK: not supported.
    assert!(snack(&mut p, 2, itt, 2, 0).is_empty());
    expect_reject(&snack(&mut p, 3, itt, 0, 0), reject::SNACK);
    // A write's R2T again.
    let w = write_cmd(&mut p, 8, 1, true);
    let out = p.send(PduHeader::ScsiCommand(w.clone()), &[]);
    let [(PduHeader::R2t(r), _)] = &out[..] else {
        panic!("{out:?}")
    };
    let again = snack(&mut p, 0, w.itt, 0, 0);
    assert!(matches!(&again[..], [(PduHeader::R2t(x), _)] if x.ttt == r.ttt && x.r2t_sn == Sn(0)));
    // Once the initiator acknowledges the read's status it is forgotten.
    let itt_nop = p.next_itt();
    let nop = PduHeader::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: itt_nop,
        ttt: RESERVED_TAG,
        cmd_sn: p.cmd_sn,
        exp_stat_sn: last.stat_sn.next(),
    });
    let _ = p.send(nop, &[]);
    expect_reject(&snack(&mut p, 0, itt, 0, 1), reject::SNACK);
}

#[test]
fn one_connection_of_a_session_hangs_or_dies() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut a = lead(&s, "2");
    let mut b = join(&s, &a, 2);
    s.faults.hang_connection(2);
    b.cmd_sn = a.cmd_sn;
    assert!(b.read10(0, 1).is_empty(), "hung: no answer");
    assert!(b.tick().is_empty());
    a.cmd_sn = b.cmd_sn;
    // A waits for B's CmdSN, which B holds unread.
    assert!(a.read10(0, 1).is_empty());
    s.faults.unhang_connection(2);
    let _ = b.tick();
    let (d, _) = collect_data_in(&a.tick());
    assert_eq!(d.len(), 512);

    // Killed: B closes at its next step, A goes on.
    s.faults.kill_connection(2);
    let _ = b.tick();
    assert!(b.conn.is_closed());
    assert!(b.conn.close_reason().unwrap().contains("killed"));
    s.faults.revive_connection(2);
    let (d, _) = collect_data_in(&a.read10(0, 1));
    assert_eq!(d.len(), 512);
    assert_eq!(a.conn.session_connections(), 1);
}

/// ERL 1: an R2T lost on the way (as to a header digest error) is asked
/// for again with a Data/R2T SNACK by R2TSN and comes as a replica (same
/// TTT, offset and length); once its data has come, asking for it again
/// is a protocol error (RFC 7143 §11.16).
#[test]
fn snack_asks_again_for_a_lost_r2t() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut p = Peer::new(s.clone(), 0);
    let t = p.login_normal(&[
        ("ErrorRecoveryLevel", "1"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "No"),
        ("FirstBurstLength", "1024"),
        ("MaxBurstLength", "1024"),
    ]);
    assert_eq!(t.get("ErrorRecoveryLevel"), Some("1"));
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 13 % 247) as u8).collect();
    s.faults.drop_r2t(p.cid, 1);
    let w = write_cmd(&mut p, 16, 4, true);
    assert!(
        p.send(PduHeader::ScsiCommand(w.clone()), &[]).is_empty(),
        "the first R2T is lost"
    );
    assert!(p.tick().is_empty(), "the write waits for data");

    let again = snack(&mut p, 0, w.itt, 0, 1);
    let [(PduHeader::R2t(r0), _)] = &again[..] else {
        panic!("{again:?}")
    };
    assert_eq!(
        (r0.itt, r0.r2t_sn, r0.buffer_offset, r0.desired_len),
        (w.itt, Sn(0), 0, 1024)
    );
    // Its data asks for the next R2T, which comes as usual.
    let out = p.send(data_out(w.itt, r0.ttt, 0, 0, true), &data[..1024]);
    let [(PduHeader::R2t(r1), _)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((r1.r2t_sn, r1.buffer_offset), (Sn(1), 1024));
    assert_ne!(r1.ttt, r0.ttt);
    // R2TSN 0 is answered: not to be sent again; RunLength 0 from 0 is
    // the R2Ts not answered, R2TSN 1 only.
    expect_reject(&snack(&mut p, 0, w.itt, 0, 1), reject::PROTOCOL_ERROR);
    let again = snack(&mut p, 0, w.itt, 0, 0);
    assert!(
        matches!(&again[..], [(PduHeader::R2t(x), _)] if x.ttt == r1.ttt && x.r2t_sn == Sn(1)),
        "{again:?}"
    );
    let done = one_response(&p.send(data_out(w.itt, r1.ttt, 0, 1024, true), &data[1024..]));
    assert_eq!((done.itt, done.status), (w.itt, ScsiStatus::Good.as_u8()));
    let mut back = vec![0u8; 2048];
    s.luns[0].read(16 * 512, &mut back);
    assert_eq!(back, data);
    // After the status: no R2T of the task is left to ask for.
    expect_reject(&snack(&mut p, 0, w.itt, 1, 1), reject::PROTOCOL_ERROR);
}
