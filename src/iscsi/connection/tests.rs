use super::*;
use crate::iscsi::login::LoginOutcome;
use crate::iscsi::window::SessionWindow;
use crate::wire::iscsi::{NopIn, R2t, ScsiResponse, TextResponse};
use std::sync::Arc;

fn outcome(params: Params) -> LoginOutcome {
    LoginOutcome {
        params,
        tsih: 1,
        isid: [0x80, 0, 0, 0, 0, 1],
        cid: 0,
        cmd_sn: Sn(10),
        exp_stat_sn: Sn(100),
        exp_cmd_sn: Sn(10),
        max_cmd_sn: Sn(41),
    }
}

fn params() -> Params {
    Params {
        max_recv_data_segment_len: 8192,
        max_xmit_data_segment_len: 4096,
        initial_r2t: true,
        immediate_data: true,
        first_burst_len: 8192,
        max_burst_len: 65536,
        ..Params::default()
    }
}

/// A scripted target: decodes what the connection sent.
struct Peer {
    framer: PduFramer,
    digests: Digests,
    stat_sn: Sn,
}

impl Peer {
    fn new(digests: Digests) -> Peer {
        Peer {
            framer: PduFramer {
                digests,
                max_data_segment_len: 1 << 20,
            },
            digests,
            stat_sn: Sn(100),
        }
    }

    #[track_caller]
    fn sent(&self, c: &mut Connection) -> Vec<(PduHeader, Vec<u8>)> {
        let bytes = c.pending_tx().to_vec();
        c.consume_tx(bytes.len());
        let mut at = 0;
        let mut out = Vec::new();
        while at < bytes.len() {
            let f = self
                .framer
                .frame(&bytes[at..])
                .unwrap()
                .expect("partial PDU");
            out.push((f.header.clone(), bytes[at..][f.data.clone()].to_vec()));
            at += f.total_len;
        }
        out
    }

    fn next_stat_sn(&mut self) -> Sn {
        let s = self.stat_sn;
        self.stat_sn = s.next();
        s
    }

    fn encode(&self, h: PduHeader, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_pdu(&mut v, &h, data, self.digests);
        v
    }

    fn data_in(
        &mut self,
        itt: u32,
        data_sn: u32,
        offset: u32,
        data: &[u8],
        status: bool,
    ) -> Vec<u8> {
        let stat_sn = if status {
            self.next_stat_sn()
        } else {
            self.stat_sn
        };
        self.encode(
            PduHeader::DataIn(DataIn {
                final_bit: status,
                ack: false,
                overflow: false,
                underflow: false,
                status_present: status,
                status: 0,
                lun: 0,
                itt,
                ttt: RESERVED_TAG,
                stat_sn,
                exp_cmd_sn: Sn(11),
                max_cmd_sn: Sn(42),
                data_sn: Sn(data_sn),
                buffer_offset: offset,
                residual: 0,
            }),
            data,
        )
    }

    fn response(&mut self, itt: u32, status: u8, sense: &[u8], max_cmd_sn: u32) -> Vec<u8> {
        let mut data = Vec::new();
        if !sense.is_empty() {
            data.extend_from_slice(&(sense.len() as u16).to_be_bytes());
            data.extend_from_slice(sense);
        }
        let stat_sn = self.next_stat_sn();
        self.encode(
            PduHeader::ScsiResponse(ScsiResponse {
                status,
                itt,
                stat_sn,
                exp_cmd_sn: Sn(max_cmd_sn.wrapping_sub(31)),
                max_cmd_sn: Sn(max_cmd_sn),
                ..ScsiResponse::default()
            }),
            &data,
        )
    }

    fn r2t(&self, itt: u32, ttt: u32, r2t_sn: u32, offset: u32, len: u32) -> Vec<u8> {
        self.encode(
            PduHeader::R2t(R2t {
                lun: 0,
                itt,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: Sn(11),
                max_cmd_sn: Sn(42),
                r2t_sn: Sn(r2t_sn),
                buffer_offset: offset,
                desired_len: len,
            }),
            &[],
        )
    }
}

fn read_cmd(len: usize, tag: u64) -> Command {
    let mut c = Command::new(0, &[0x88; 16], Direction::Read, vec![0; len]).unwrap();
    c.user_tag = tag;
    c
}

fn write_cmd(len: usize, tag: u64) -> Command {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut c = Command::new(0, &[0x8a; 16], Direction::Write, data).unwrap();
    c.user_tag = tag;
    c
}

#[track_caller]
fn completion(c: &mut Connection) -> Completion {
    match c.poll_event() {
        Some(Event::Completed(done)) => done,
        other => panic!("expected a completion, got {other:?}"),
    }
}

#[test]
fn read_across_several_data_in_with_status_in_last() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(10000, 7), now).unwrap();
    let sent = peer.sent(&mut c);
    let PduHeader::ScsiCommand(cmd) = &sent[0].0 else {
        panic!()
    };
    assert!(cmd.read && cmd.final_bit);
    assert_eq!(cmd.cmd_sn, Sn(10));
    assert_eq!(cmd.expected_data_len, 10000);
    let payload: Vec<u8> = (0..10000).map(|i| (i * 7) as u8).collect();
    let mut bytes = peer.data_in(cmd.itt, 0, 0, &payload[..8192], false);
    bytes.extend(peer.data_in(cmd.itt, 1, 8192, &payload[8192..], true));
    // Deliver in awkward pieces to exercise framing.
    for chunk in bytes.chunks(333) {
        c.receive(chunk, now).unwrap();
    }
    let done = completion(&mut c);
    assert_eq!(done.user_tag, 7);
    assert_eq!(done.status, 0);
    assert_eq!(done.buffer, payload);
    assert_eq!(done.transferred, 10000);
    assert_eq!(c.outstanding(), 0);
}

#[test]
fn write_sends_immediate_data_then_answers_r2t_in_pieces() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    let cmd = write_cmd(20000, 3);
    let expected = cmd.buffer.clone();
    c.submit(cmd, now).unwrap();
    let sent = peer.sent(&mut c);
    assert_eq!(sent.len(), 1);
    let PduHeader::ScsiCommand(sc) = &sent[0].0 else {
        panic!()
    };
    // Immediate data is limited by the target's MaxRecvDataSegmentLength.
    assert_eq!(sent[0].1.len(), 4096);
    assert!(sc.write && sc.final_bit);
    let itt = sc.itt;
    c.receive(&peer.r2t(itt, 0x55, 0, 4096, 15904), now)
        .unwrap();
    let sent = peer.sent(&mut c);
    let mut got = expected[..4096].to_vec();
    for (i, (h, d)) in sent.iter().enumerate() {
        let PduHeader::DataOut(o) = h else {
            panic!("{h:?}")
        };
        assert_eq!(o.ttt, 0x55);
        assert_eq!(o.data_sn, Sn(i as u32));
        assert_eq!(o.buffer_offset as usize, got.len());
        assert_eq!(o.final_bit, i == sent.len() - 1);
        assert!(d.len() <= 4096);
        got.extend_from_slice(d);
    }
    assert_eq!(got, expected);
    c.receive(&peer.response(itt, 0, &[], 42), now).unwrap();
    assert_eq!(completion(&mut c).user_tag, 3);
}

#[test]
fn unsolicited_data_out_when_initial_r2t_is_no() {
    let now = Instant::now();
    let p = Params {
        initial_r2t: false,
        immediate_data: false,
        ..params()
    };
    let mut c = Connection::new(&outcome(p), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(write_cmd(12000, 1), now).unwrap();
    let sent = peer.sent(&mut c);
    let PduHeader::ScsiCommand(sc) = &sent[0].0 else {
        panic!()
    };
    assert!(
        !sc.final_bit,
        "F must be clear when unsolicited Data-Out follows"
    );
    assert!(sent[0].1.is_empty());
    let total: usize = sent[1..].iter().map(|(_, d)| d.len()).sum();
    assert_eq!(total, 8192, "unsolicited data stops at FirstBurstLength");
    let PduHeader::DataOut(last) = &sent.last().unwrap().0 else {
        panic!()
    };
    assert!(last.final_bit);
    assert_eq!(last.ttt, RESERVED_TAG);
    let _ = peer.next_stat_sn();
}

#[test]
fn never_sends_outside_the_cmdsn_window() {
    let now = Instant::now();
    let mut o = outcome(params());
    o.max_cmd_sn = Sn(11); // room for CmdSN 10 and 11
    let mut c = Connection::new(&o, ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    for tag in 0..5 {
        c.submit(read_cmd(0, tag), now).unwrap();
    }
    let sent = peer.sent(&mut c);
    assert_eq!(sent.len(), 2);
    assert_eq!(c.window_space(), 0);
    let PduHeader::ScsiCommand(first) = &sent[0].0 else {
        panic!()
    };
    // The target completes one and opens the window by one.
    c.receive(&peer.response(first.itt, 0, &[], 12), now)
        .unwrap();
    let sent = peer.sent(&mut c);
    assert_eq!(sent.len(), 1);
    let PduHeader::ScsiCommand(third) = &sent[0].0 else {
        panic!()
    };
    assert_eq!(third.cmd_sn, Sn(12));
    // A MaxCmdSN that goes backwards is ignored.
    c.receive(&peer.response(third.itt, 0, &[], 5), now)
        .unwrap();
    assert!(peer.sent(&mut c).is_empty());
    assert_eq!(c.outstanding(), 3);
}

/// Regression: text requests are non-immediate, so they take a CmdSN and
/// must wait for window space like SCSI commands (they used to go out at
/// once, outside the window; continuations too).
#[test]
fn text_requests_wait_for_the_cmdsn_window() {
    let now = Instant::now();
    let mut o = outcome(params());
    o.max_cmd_sn = Sn(10); // room for CmdSN 10 only
    let mut c = Connection::new(&o, ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(0, 1), now).unwrap();
    let mut pairs = TextPairs::new();
    pairs.push("SendTargets", "All");
    c.text_request(&pairs, 9, now).unwrap();
    let sent = peer.sent(&mut c);
    assert_eq!(sent.len(), 1, "only the SCSI command fits: {sent:?}");
    let PduHeader::ScsiCommand(first) = &sent[0].0 else {
        panic!()
    };
    assert_eq!(first.cmd_sn, Sn(10));
    // The window opens by one: now the text request goes, with CmdSN 11.
    c.receive(&peer.response(first.itt, 0, &[], 11), now)
        .unwrap();
    let sent = peer.sent(&mut c);
    assert_eq!(sent.len(), 1);
    let PduHeader::TextRequest(t) = &sent[0].0 else {
        panic!("{sent:?}")
    };
    assert_eq!(t.cmd_sn, Sn(11));
    assert_eq!(sent[0].1, pairs.to_bytes());
    // A partial answer (C bit): the continuation request also waits.
    let stat_sn = peer.next_stat_sn();
    let partial = peer.encode(
        PduHeader::TextResponse(TextResponse {
            final_bit: false,
            cont: true,
            lun: 0,
            itt: t.itt,
            ttt: 0x55,
            stat_sn,
            exp_cmd_sn: Sn(12),
            max_cmd_sn: Sn(11),
        }),
        b"TargetName=iqn.x\0",
    );
    c.receive(&partial, now).unwrap();
    assert!(peer.sent(&mut c).is_empty(), "window closed");
    let stat_sn = peer.stat_sn;
    let nop = peer.encode(
        PduHeader::NopIn(NopIn {
            lun: 0,
            itt: RESERVED_TAG,
            ttt: RESERVED_TAG,
            stat_sn,
            exp_cmd_sn: Sn(12),
            max_cmd_sn: Sn(12),
        }),
        &[],
    );
    c.receive(&nop, now).unwrap();
    let sent = peer.sent(&mut c);
    let PduHeader::TextRequest(t2) = &sent[0].0 else {
        panic!("{sent:?}")
    };
    assert_eq!((t2.cmd_sn, t2.ttt), (Sn(12), 0x55));
}

#[test]
fn check_condition_carries_sense() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(512, 9), now).unwrap();
    let PduHeader::ScsiCommand(sc) = peer.sent(&mut c)[0].0.clone() else {
        panic!()
    };
    let sense = [
        0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0x00, 0, 0, 0, 0,
    ];
    c.receive(&peer.response(sc.itt, 2, &sense, 42), now)
        .unwrap();
    let done = completion(&mut c);
    assert_eq!(done.status, 2);
    assert_eq!(done.sense, sense);
}

#[test]
fn digests_on_both_ways() {
    let now = Instant::now();
    let p = Params {
        header_digest: super::super::params::DigestKind::Crc32c,
        data_digest: super::super::params::DigestKind::Crc32c,
        ..params()
    };
    let mut c = Connection::new(&outcome(p), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests {
        header: true,
        data: true,
    });
    c.submit(read_cmd(100, 1), now).unwrap();
    let PduHeader::ScsiCommand(sc) = peer.sent(&mut c)[0].0.clone() else {
        panic!()
    };
    let mut bytes = peer.data_in(sc.itt, 0, 0, &[5u8; 100], true);
    c.receive(&bytes, now).unwrap();
    assert_eq!(completion(&mut c).buffer, vec![5u8; 100]);
    // A flipped bit in the data now fails the connection.
    c.submit(read_cmd(100, 2), now).unwrap();
    let PduHeader::ScsiCommand(sc) = peer.sent(&mut c)[0].0.clone() else {
        panic!()
    };
    bytes = peer.data_in(sc.itt, 0, 0, &[5u8; 100], true);
    bytes[60] ^= 0x10;
    assert!(matches!(
        c.receive(&bytes, now),
        Err(ConnError::Wire(IscsiWireError::DataDigest { .. }))
    ));
    let back = c.take_outstanding();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].user_tag, 2);
}

#[test]
fn hostile_target_pdus_fail_the_connection_cleanly() {
    type Case = fn(&mut Peer, u32) -> Vec<u8>;
    let cases: Vec<(&str, Case)> = vec![
        ("data past end", |p, itt| {
            p.data_in(itt, 0, 4000, &[0; 200], false)
        }),
        ("unknown tag", |p, itt| {
            p.data_in(itt ^ 0x10000, 0, 0, &[0; 10], false)
        }),
        ("bad DataSN", |p, itt| p.data_in(itt, 3, 0, &[0; 10], false)),
        ("StatSN jump", |p, itt| {
            p.stat_sn = p.stat_sn.plus(5);
            p.response(itt, 0, &[], 42)
        }),
        ("R2T on read", |p, itt| p.r2t(itt, 1, 0, 0, 100)),
        ("target-only opcode", |p, _| {
            p.encode(
                PduHeader::NopOut(NopOut {
                    immediate: true,
                    lun: 0,
                    itt: 1,
                    ttt: RESERVED_TAG,
                    cmd_sn: Sn(0),
                    exp_stat_sn: Sn(0),
                }),
                &[],
            )
        }),
    ];
    for (name, make) in cases {
        let now = Instant::now();
        let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
        let mut peer = Peer::new(Digests::default());
        c.submit(read_cmd(4096, 1), now).unwrap();
        let PduHeader::ScsiCommand(sc) = peer.sent(&mut c)[0].0.clone() else {
            panic!()
        };
        let bytes = make(&mut peer, sc.itt);
        assert!(c.receive(&bytes, now).is_err(), "{name} was accepted");
        assert!(c.is_failed().is_some(), "{name}");
        assert!(c.submit(read_cmd(1, 2), now).is_err());
        assert_eq!(
            c.take_outstanding().len(),
            1,
            "{name}: the command must come back for retry"
        );
    }
}

#[test]
fn r2t_beyond_limits_is_refused() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let peer = Peer::new(Digests::default());
    c.submit(write_cmd(200_000, 1), now).unwrap();
    let PduHeader::ScsiCommand(sc) = peer.sent(&mut c)[0].0.clone() else {
        panic!()
    };
    // More than MaxBurstLength (65536).
    let e = c
        .receive(&peer.r2t(sc.itt, 1, 0, 4096, 100_000), now)
        .unwrap_err();
    assert!(e.to_string().contains("MaxBurstLength"), "{e}");
}

#[test]
fn answers_target_nop_in_and_pings_when_idle() {
    let now = Instant::now();
    let timers = ConnTimers {
        nop_interval: Some(Duration::from_secs(1)),
        nop_timeout: Duration::from_secs(1),
        command_timeout: None,
    };
    let mut c = Connection::new(&outcome(params()), timers, now);
    let mut peer = Peer::new(Digests::default());
    let nop = peer.encode(
        PduHeader::NopIn(NopIn {
            lun: 0,
            itt: RESERVED_TAG,
            ttt: 0x77,
            stat_sn: Sn(100),
            exp_cmd_sn: Sn(10),
            max_cmd_sn: Sn(41),
        }),
        b"ping",
    );
    c.receive(&nop, now).unwrap();
    let sent = peer.sent(&mut c);
    let PduHeader::NopOut(o) = &sent[0].0 else {
        panic!()
    };
    assert_eq!((o.ttt, o.itt), (0x77, RESERVED_TAG));
    assert_eq!(sent[0].1, b"ping");

    // Idle: after nop_interval a ping goes out; unanswered, the connection dies.
    assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(1)));
    c.handle_timeout(now + Duration::from_secs(1)).unwrap();
    let sent = peer.sent(&mut c);
    let PduHeader::NopOut(ping) = &sent[0].0 else {
        panic!()
    };
    assert!(ping.immediate && ping.itt != RESERVED_TAG);
    let stat_sn = peer.next_stat_sn();
    let answer = peer.encode(
        PduHeader::NopIn(NopIn {
            lun: 0,
            itt: ping.itt,
            ttt: RESERVED_TAG,
            stat_sn,
            exp_cmd_sn: Sn(10),
            max_cmd_sn: Sn(41),
        }),
        &[],
    );
    let t1 = now + Duration::from_millis(1200);
    c.receive(&answer, t1).unwrap();
    assert!(matches!(c.poll_event(), Some(Event::PingAnswered { .. })));
    c.handle_timeout(t1 + Duration::from_secs(1)).unwrap();
    assert!(!peer.sent(&mut c).is_empty());
    let e = c.handle_timeout(t1 + Duration::from_secs(3)).unwrap_err();
    assert!(matches!(e, ConnError::PingTimeout(_)));
}

#[test]
fn command_timeout_fails_connection() {
    let now = Instant::now();
    let timers = ConnTimers {
        nop_interval: None,
        nop_timeout: Duration::from_secs(1),
        command_timeout: Some(Duration::from_secs(2)),
    };
    let mut c = Connection::new(&outcome(params()), timers, now);
    c.submit(read_cmd(10, 1), now).unwrap();
    c.handle_timeout(now + Duration::from_secs(1)).unwrap();
    assert!(matches!(
        c.handle_timeout(now + Duration::from_secs(2)),
        Err(ConnError::CommandTimeout(_))
    ));
}

/// The command timeout's deadline comes from a floor of the submit times,
/// not a scan of every slot: the oldest command finishing leaves the floor
/// early, which must neither fail the connection when it passes nor hide a
/// younger command that is late.
#[test]
fn command_timeout_follows_the_oldest_outstanding_command() {
    let now = Instant::now();
    let ct = Duration::from_secs(2);
    let timers = ConnTimers {
        nop_interval: None,
        nop_timeout: Duration::from_secs(1),
        command_timeout: Some(ct),
    };
    // Answers the first command `c` sent (of those not seen yet) at `at`.
    let answer_first = |c: &mut Connection, peer: &mut Peer, at: Instant| {
        let sent = peer.sent(c);
        let PduHeader::ScsiCommand(first) = &sent[0].0 else {
            panic!("{:?}", sent[0].0)
        };
        c.receive(&peer.response(first.itt, 0, &[], 42), at)
            .unwrap();
        assert!(matches!(c.poll_event(), Some(Event::Completed(_))));
    };
    let mut c = Connection::new(&outcome(params()), timers, now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(16, 1), now).unwrap();
    let later = now + Duration::from_secs(1);
    c.submit(read_cmd(16, 2), later).unwrap();
    answer_first(&mut c, &mut peer, later);
    // The first command's deadline still comes (early), and passes quietly.
    assert_eq!(c.poll_timeout(), Some(now + ct));
    c.handle_timeout(now + ct).unwrap();
    // Then the deadline is the second command's, and it is late there.
    assert_eq!(c.poll_timeout(), Some(later + ct));
    c.handle_timeout(later + ct - Duration::from_millis(1))
        .unwrap();
    assert!(matches!(
        c.handle_timeout(later + ct),
        Err(ConnError::CommandTimeout(_))
    ));
    // With nothing outstanding there is no deadline at all.
    let mut idle = Connection::new(&outcome(params()), timers, now);
    idle.submit(read_cmd(16, 3), now).unwrap();
    answer_first(&mut idle, &mut Peer::new(Digests::default()), now);
    idle.handle_timeout(now + ct).unwrap();
    assert_eq!(idle.poll_timeout(), None);
}

/// Regression (found by fuzz_connection): a status for a command still
/// waiting for window space used to complete it while it stayed queued;
/// when the window opened, the initiator burnt a CmdSN on the freed slot
/// (a hole the target waits on forever) or sent the slot's next user twice.
#[test]
fn answers_for_commands_not_sent_yet_are_refused() {
    type Case = fn(&mut Peer, u32) -> Vec<u8>;
    let cases: Vec<(&str, Case)> = vec![
        ("SCSI status", |p, itt| p.response(itt, 0, &[], 10)),
        ("Data-In", |p, itt| p.data_in(itt, 0, 0, &[0; 16], false)),
        ("R2T", |p, itt| p.r2t(itt, 1, 0, 0, 16)),
    ];
    for (name, make) in cases {
        let now = Instant::now();
        let mut o = outcome(params());
        o.max_cmd_sn = Sn(10); // room for one command
        let mut c = Connection::new(&o, ConnTimers::default(), now);
        let mut peer = Peer::new(Digests::default());
        c.submit(read_cmd(16, 1), now).unwrap();
        let mut second = if name == "R2T" {
            write_cmd(16, 2)
        } else {
            read_cmd(16, 2)
        };
        second.user_tag = 2;
        c.submit(second, now).unwrap();
        let sent = peer.sent(&mut c);
        assert_eq!(sent.len(), 1);
        let PduHeader::ScsiCommand(first) = &sent[0].0 else {
            panic!()
        };
        // The waiting command's tag is the next generation in slot 1.
        let guessed = (((first.itt >> 16) + 1) << 16) | 1;
        let e = c.receive(&make(&mut peer, guessed), now).unwrap_err();
        assert!(e.to_string().contains("not sent yet"), "{name}: {e}");
        assert!(
            c.poll_event().is_none(),
            "{name}: completed a command never sent"
        );
        assert_eq!(c.take_outstanding().len(), 2, "{name}");
    }
}

#[test]
fn text_requests_wait_for_window_space() {
    let now = Instant::now();
    let mut o = outcome(params());
    o.max_cmd_sn = Sn(9); // closed
    let mut c = Connection::new(&o, ConnTimers::default(), now);
    let peer = Peer::new(Digests::default());
    let mut t = TextPairs::new();
    t.push("SendTargets", "All");
    c.text_request(&t, 5, now).unwrap();
    assert!(
        peer.sent(&mut c).is_empty(),
        "text request sent outside the window"
    );
    // A NOP-In opens the window; the request goes with CmdSN 10.
    let nop = peer.encode(
        PduHeader::NopIn(NopIn {
            lun: 0,
            itt: RESERVED_TAG,
            ttt: RESERVED_TAG,
            stat_sn: Sn(100),
            exp_cmd_sn: Sn(10),
            max_cmd_sn: Sn(10),
        }),
        &[],
    );
    c.receive(&nop, now).unwrap();
    let sent = peer.sent(&mut c);
    assert_eq!(sent.len(), 1);
    let PduHeader::TextRequest(r) = &sent[0].0 else {
        panic!("{:?}", sent[0].0)
    };
    assert_eq!(r.cmd_sn, Sn(10));
    assert_eq!(TextPairs::parse(&sent[0].1).unwrap(), t);
}

/// Regression (fuzz_connection): a Logout Response carrying a SCSI
/// command's task tag freed that command's slot, so it was neither
/// completed nor handed back by `take_outstanding` (lost, never retried).
#[test]
fn logout_response_for_a_scsi_task_is_refused() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(512, 1), now).unwrap();
    let PduHeader::ScsiCommand(cmd) = peer.sent(&mut c)[0].0.clone() else {
        panic!()
    };
    let stat_sn = peer.next_stat_sn();
    let rsp = peer.encode(
        PduHeader::LogoutResponse(crate::wire::iscsi::LogoutResponse {
            response: 0,
            itt: cmd.itt,
            stat_sn,
            exp_cmd_sn: Sn(11),
            max_cmd_sn: Sn(41),
            time2wait: 0,
            time2retain: 0,
        }),
        &[],
    );
    let e = c.receive(&rsp, now).unwrap_err();
    assert!(e.to_string().contains("not a logout"), "{e}");
    assert_eq!(c.take_outstanding().len(), 1, "the command must come back");
    // An unsolicited one (no logout pending) is refused too.
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    let stat_sn = peer.next_stat_sn();
    let rsp = peer.encode(
        PduHeader::LogoutResponse(crate::wire::iscsi::LogoutResponse {
            response: 0,
            itt: 0x1234,
            stat_sn,
            exp_cmd_sn: Sn(10),
            max_cmd_sn: Sn(41),
            time2wait: 0,
            time2retain: 0,
        }),
        &[],
    );
    assert!(c.receive(&rsp, now).is_err());
}

/// Reads `stream` the way the kernel transport does: `readv` into both
/// buffers of `rx_buffers`, at most `max_read` bytes per call.
fn read_like_readv(c: &mut Connection, mut stream: &[u8], max_read: usize, now: Instant) {
    while !stream.is_empty() {
        let (first, second) = c.rx_buffers();
        assert!(!first.is_empty(), "the connection offered no buffer");
        let mut n = 0;
        for buf in [first, second] {
            let take = buf.len().min(stream.len()).min(max_read - n);
            buf[..take].copy_from_slice(&stream[..take]);
            stream = &stream[take..];
            n += take;
        }
        c.commit_rx(n, now).unwrap();
    }
}

fn digest_params() -> Params {
    Params {
        header_digest: crate::iscsi::params::DigestKind::Crc32c,
        data_digest: crate::iscsi::params::DigestKind::Crc32c,
        ..params()
    }
}

#[test]
fn data_in_payload_is_copied_once_into_the_command_buffer() {
    // Both ways a transport hands bytes over: pushed (userspace stack, from
    // the frame) and read into rx_buffers (kernel socket, readv). With
    // digests and an odd length, so padding and CRCs sit between segments.
    for readv in [false, true] {
        let now = Instant::now();
        let p = digest_params();
        let mut c = Connection::new(&outcome(p), ConnTimers::default(), now);
        let mut peer = Peer::new(Digests {
            header: true,
            data: true,
        });
        let payload: Vec<u8> = (0..12_345u32).map(|i| (i * 13 + 5) as u8).collect();
        let mut stream = Vec::new();
        let mut itts = Vec::new();
        for tag in 0..3 {
            c.submit(read_cmd(payload.len(), tag), now).unwrap();
            let sent = peer.sent(&mut c);
            let PduHeader::ScsiCommand(cmd) = &sent[0].0 else {
                panic!()
            };
            itts.push(cmd.itt);
        }
        for &itt in &itts {
            stream.extend(peer.data_in(itt, 0, 0, &payload[..8192], false));
            stream.extend(peer.data_in(itt, 1, 8192, &payload[8192..], true));
        }
        if readv {
            read_like_readv(&mut c, &stream, 64 * 1024, now);
        } else {
            for chunk in stream.chunks(1448) {
                c.receive(chunk, now).unwrap();
            }
        }
        for tag in 0..3 {
            let done = completion(&mut c);
            assert_eq!(done.user_tag, tag);
            assert_eq!(done.buffer, payload, "readv={readv}");
        }
        assert_eq!(c.stats.rx_bytes_placed, 3 * payload.len() as u64);
        assert_eq!(
            c.stats.rx_bytes_staged, 0,
            "readv={readv}: a payload byte was copied twice"
        );
        assert_eq!(c.stats.pdus_in, 6);
    }
}

#[test]
fn read_ahead_after_responses_is_copied_again_and_counted() {
    // After a non-Data-In PDU the connection reads ahead (many small
    // responses per read); Data-In payload caught in that read-ahead is
    // copied a second time, and the counter says so.
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(0, 1), now).unwrap();
    c.submit(read_cmd(4096, 2), now).unwrap();
    let sent = peer.sent(&mut c);
    let itts: Vec<u32> = sent
        .iter()
        .map(|(h, _)| match h {
            PduHeader::ScsiCommand(cmd) => cmd.itt,
            _ => panic!(),
        })
        .collect();
    let payload = vec![0xa5u8; 4096];
    let mut stream = peer.response(itts[0], 0, &[], 42);
    stream.extend(peer.data_in(itts[1], 0, 0, &payload, true));
    // Start as if Data-In had not been flowing: the first read may run ahead.
    c.data_in_flowing = false;
    read_like_readv(&mut c, &stream, 64 * 1024, now);
    assert_eq!(completion(&mut c).user_tag, 1);
    let done = completion(&mut c);
    assert_eq!(done.buffer, payload);
    assert_eq!(
        c.stats.rx_bytes_placed + c.stats.rx_bytes_staged,
        payload.len() as u64
    );
    assert!(c.stats.rx_bytes_staged > 0);
}

#[test]
fn placed_data_with_a_bad_digest_fails_the_connection() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(digest_params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests {
        header: true,
        data: true,
    });
    c.submit(read_cmd(4096, 1), now).unwrap();
    let sent = peer.sent(&mut c);
    let PduHeader::ScsiCommand(cmd) = &sent[0].0 else {
        panic!()
    };
    let mut pdu = peer.data_in(cmd.itt, 0, 0, &[7u8; 4096], true);
    // Flip a payload byte: the header digest still holds, the data's not.
    pdu[48 + 4 + 100] ^= 1;
    let err = c.receive(&pdu, now).unwrap_err();
    assert!(
        matches!(err, ConnError::Wire(IscsiWireError::DataDigest { .. })),
        "{err}"
    );
    assert!(c.poll_event().is_none(), "a corrupt read must not complete");
    assert_eq!(c.take_outstanding().len(), 1);
}

impl Peer {
    fn async_message(&mut self, event: u8, p1: u16, p2: u16, p3: u16, data: &[u8]) -> Vec<u8> {
        let stat_sn = self.next_stat_sn();
        self.encode(
            PduHeader::AsyncMessage(crate::wire::iscsi::AsyncMessage {
                lun: 0,
                stat_sn,
                exp_cmd_sn: Sn(10),
                max_cmd_sn: Sn(41),
                event,
                vcode: 0,
                param1: p1,
                param2: p2,
                param3: p3,
            }),
            data,
        )
    }
}

#[test]
fn async_logout_request_is_reported_with_its_deadline() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.receive(&peer.async_message(1, 0, 0, 7, &[]), now)
        .unwrap();
    assert!(matches!(
        c.poll_event(),
        Some(Event::LogoutRequested { within: 7 })
    ));
    // The connection stays usable: in-flight work may finish first.
    assert!(c.is_failed().is_none());
    c.logout(now).unwrap();
    let sent = peer.sent(&mut c);
    assert!(matches!(sent[0].0, PduHeader::LogoutRequest(_)));
}

#[test]
fn async_drop_announcements_carry_time2wait_and_time2retain() {
    for event in [2u8, 3] {
        let now = Instant::now();
        let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
        let mut peer = Peer::new(Digests::default());
        let e = c
            .receive(&peer.async_message(event, 0, 3, 20, &[]), now)
            .unwrap_err();
        assert_eq!(
            e,
            ConnError::TargetDropped {
                event,
                time2wait: 3,
                time2retain: 20
            }
        );
        assert!(e.to_string().contains("Time2Wait 3 s"), "{e}");
    }
}

#[test]
fn async_scsi_event_surfaces_its_sense() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    let mut sense = vec![0u8; 18];
    sense[0] = 0x70;
    sense[2] = 0x06;
    sense[7] = 10;
    sense[12] = 0x2a;
    sense[13] = 0x09;
    let mut seg = (sense.len() as u16).to_be_bytes().to_vec();
    seg.extend_from_slice(&sense);
    c.receive(&peer.async_message(0, 0, 0, 0, &seg), now)
        .unwrap();
    match c.poll_event() {
        Some(Event::AsyncScsiEvent { sense: got, .. }) => assert_eq!(got, sense),
        other => panic!("{other:?}"),
    }
}

/// AsyncEvent 4: a Text Request declaring our MaxRecvDataSegmentLength
/// goes out by itself; the target's answer then bounds our Data-Out.
#[test]
fn async_renegotiation_sends_a_text_request_and_applies_the_answer() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.receive(&peer.async_message(4, 0, 0, 0, &[]), now)
        .unwrap();
    assert!(matches!(c.poll_event(), Some(Event::RenegotiationStarted)));
    let sent = peer.sent(&mut c);
    let PduHeader::TextRequest(t) = &sent[0].0 else {
        panic!("{sent:?}")
    };
    assert!(!t.immediate && t.final_bit);
    let pairs = TextPairs::parse(&sent[0].1).unwrap();
    assert_eq!(pairs.get("MaxRecvDataSegmentLength"), Some("8192"));
    let stat_sn = peer.next_stat_sn();
    let answer = peer.encode(
        PduHeader::TextResponse(TextResponse {
            final_bit: true,
            cont: false,
            lun: 0,
            itt: t.itt,
            ttt: RESERVED_TAG,
            stat_sn,
            exp_cmd_sn: Sn(11),
            max_cmd_sn: Sn(42),
        }),
        b"MaxRecvDataSegmentLength=1024\0",
    );
    c.receive(&answer, now).unwrap();
    assert!(matches!(
        c.poll_event(),
        Some(Event::Renegotiated {
            max_xmit_data_segment_len: 1024
        })
    ));
    assert!(c.poll_event().is_none(), "not reported as a user's text");
    // A write now: immediate data and Data-Out in 1024-byte segments.
    c.submit(write_cmd(3000, 5), now).unwrap();
    let sent = peer.sent(&mut c);
    assert_eq!(sent[0].1.len(), 1024);
    let PduHeader::ScsiCommand(sc) = &sent[0].0 else {
        panic!()
    };
    c.receive(&peer.r2t(sc.itt, 0x9, 0, 1024, 1976), now)
        .unwrap();
    let sent = peer.sent(&mut c);
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|(_, d)| d.len() <= 1024));
}

#[test]
fn renegotiation_answer_out_of_range_fails_the_connection() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.receive(&peer.async_message(4, 0, 0, 0, &[]), now)
        .unwrap();
    let sent = peer.sent(&mut c);
    let PduHeader::TextRequest(t) = &sent[0].0 else {
        panic!()
    };
    let stat_sn = peer.next_stat_sn();
    let answer = peer.encode(
        PduHeader::TextResponse(TextResponse {
            final_bit: true,
            cont: false,
            lun: 0,
            itt: t.itt,
            ttt: RESERVED_TAG,
            stat_sn,
            exp_cmd_sn: Sn(11),
            max_cmd_sn: Sn(42),
        }),
        b"MaxRecvDataSegmentLength=12\0",
    );
    let e = c.receive(&answer, now).unwrap_err();
    assert!(e.to_string().contains("§13.12"), "{e}");
}

/// MC/S: two connections of one session, one CmdSN window shared between
/// them (the leading login's window 10..=41, here narrowed to 10..=12).
fn mcs_pair(now: Instant) -> (Connection, Connection, Arc<SessionWindow>) {
    let window = Arc::new(SessionWindow::new(Sn(10), Sn(10), Sn(12)));
    let mut o = outcome(params());
    o.max_cmd_sn = Sn(12);
    let a = Connection::in_session(&o, ConnTimers::default(), now, window.clone(), 0);
    o.cid = 1;
    let b = Connection::in_session(&o, ConnTimers::default(), now, window.clone(), 1);
    (a, b, window)
}

fn scsi_itts(sent: &[(PduHeader, Vec<u8>)]) -> Vec<(u32, Sn)> {
    sent.iter()
        .filter_map(|(h, _)| match h {
            PduHeader::ScsiCommand(c) => Some((c.itt, c.cmd_sn)),
            _ => None,
        })
        .collect()
}

#[test]
fn mcs_connections_take_cmdsns_from_one_window() {
    let now = Instant::now();
    let (mut a, mut b, window) = mcs_pair(now);
    let mut pa = Peer::new(Digests::default());
    let mut pb = Peer::new(Digests::default());
    a.submit(read_cmd(512, 1), now).unwrap();
    b.submit(read_cmd(512, 2), now).unwrap();
    a.submit(read_cmd(512, 3), now).unwrap();
    b.submit(read_cmd(512, 4), now).unwrap();
    let sa = scsi_itts(&pa.sent(&mut a));
    let sb = scsi_itts(&pb.sent(&mut b));
    // One numbering across both connections, and the window is full at 12.
    assert_eq!(sa.iter().map(|x| x.1).collect::<Vec<_>>(), [Sn(10), Sn(12)]);
    assert_eq!(sb.iter().map(|x| x.1).collect::<Vec<_>>(), [Sn(11)]);
    assert_eq!(window.space(), 0);
    // Tags never collide between the connections of a session.
    assert!(sa.iter().all(|(itt, _)| itt & 0xf000 == 0));
    assert!(sb.iter().all(|(itt, _)| itt & 0xf000 == 0x1000));
    // A response on A opens the window; B's queued command goes out with
    // the next CmdSN once B looks at the window again.
    a.receive(&pa.response(sa[0].0, 0, &[], 13), now).unwrap();
    assert_eq!(completion(&mut a).user_tag, 1);
    assert_eq!(window.max_cmd_sn(), Sn(13));
    assert!(pb.sent(&mut b).is_empty());
    b.send_queued();
    assert_eq!(
        scsi_itts(&pb.sent(&mut b))
            .iter()
            .map(|x| x.1)
            .collect::<Vec<_>>(),
        [Sn(13)]
    );
    // A stale, smaller MaxCmdSN on B does not shrink the window.
    b.receive(&pb.response(sb[0].0, 0, &[], 12), now).unwrap();
    assert_eq!(completion(&mut b).user_tag, 2);
    assert_eq!(window.max_cmd_sn(), Sn(13));
    // Immediate PDUs carry the session's next CmdSN and take none.
    a.ping(now).unwrap();
    let PduHeader::NopOut(n) = &pa.sent(&mut a)[0].0 else {
        panic!()
    };
    assert!(n.immediate);
    assert_eq!(n.cmd_sn, Sn(14));
    assert_eq!(window.next_cmd_sn(), Sn(14));
}

/// Connection allegiance (RFC 7143 §5.1): a status for a task of
/// connection A that arrives on connection B is a protocol error that says
/// so, and A's task is still there to be finished on A.
#[test]
fn mcs_response_on_the_wrong_connection_is_refused_clearly() {
    let now = Instant::now();
    let (mut a, mut b, _) = mcs_pair(now);
    let mut pa = Peer::new(Digests::default());
    let mut pb = Peer::new(Digests::default());
    a.submit(read_cmd(512, 1), now).unwrap();
    let (itt, _) = scsi_itts(&pa.sent(&mut a))[0];
    let e = b
        .receive(&pb.response(itt, 0, &[], 13), now)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("arrived on connection CID 1")
            && e.contains("belongs to connection #0")
            && e.contains("§5.1"),
        "{e}"
    );
    assert!(b.is_failed().is_some());
    assert_eq!(a.outstanding(), 1);
    a.receive(&pa.response(itt, 0, &[], 13), now).unwrap();
    assert_eq!(completion(&mut a).user_tag, 1);
}

/// StatSN is per connection: each connection of the session counts its
/// own, and one that jumps fails that connection only.
#[test]
fn mcs_statsn_is_per_connection_and_a_jump_fails_only_that_one() {
    let now = Instant::now();
    let (mut a, mut b, _) = mcs_pair(now);
    let mut pa = Peer::new(Digests::default());
    let mut pb = Peer::new(Digests::default());
    a.submit(read_cmd(512, 1), now).unwrap();
    b.submit(read_cmd(512, 2), now).unwrap();
    a.submit(read_cmd(512, 3), now).unwrap();
    let sa = scsi_itts(&pa.sent(&mut a));
    let sb = scsi_itts(&pb.sent(&mut b));
    // Both targets' streams start at StatSN 100: no conflict.
    a.receive(&pa.response(sa[0].0, 0, &[], 13), now).unwrap();
    pb.stat_sn = Sn(105);
    let e = b
        .receive(&pb.response(sb[0].0, 0, &[], 13), now)
        .unwrap_err()
        .to_string();
    assert!(e.contains("StatSN 105 out of order (expected 100)"), "{e}");
    assert!(b.is_failed().is_some());
    a.receive(&pa.response(sa[1].0, 0, &[], 13), now).unwrap();
    assert_eq!(completion(&mut a).user_tag, 1);
    assert_eq!(completion(&mut a).user_tag, 3);
    assert!(a.is_failed().is_none());
}

#[test]
fn logout_names_its_reason_and_cid() {
    let now = Instant::now();
    let (mut a, mut b, window) = mcs_pair(now);
    let pa = Peer::new(Digests::default());
    let pb = Peer::new(Digests::default());
    // Remove connection CID 1 for recovery, sent on connection CID 0.
    a.logout_reason(2, 1, now).unwrap();
    let PduHeader::LogoutRequest(l) = &pa.sent(&mut a)[0].0 else {
        panic!()
    };
    assert_eq!((l.reason, l.cid, l.cmd_sn), (2, 1, Sn(10)));
    assert!(l.immediate);
    // The session's logout goes on the connection's own CID.
    b.logout(now).unwrap();
    let PduHeader::LogoutRequest(l) = &pb.sent(&mut b)[0].0 else {
        panic!()
    };
    assert_eq!((l.reason, l.cid), (0, 1));
    assert_eq!(window.next_cmd_sn(), Sn(10));
}

fn tmf_response(peer: &mut Peer, itt: u32, response: u8) -> Vec<u8> {
    let stat_sn = peer.next_stat_sn();
    peer.encode(
        PduHeader::TaskMgmtResponse(crate::wire::iscsi::TaskMgmtResponse {
            response,
            itt,
            stat_sn,
            exp_cmd_sn: Sn(11),
            max_cmd_sn: Sn(42),
        }),
        &[],
    )
}

/// ERL 2: a write sent on connection A, which fails before its status;
/// connection B takes it over with TASK REASSIGN naming A's tag and the
/// CmdSN, then answers the target's R2T for the whole buffer and the
/// status completes the write on B, once.
#[test]
fn task_reassign_moves_a_write_of_a_failed_connection() {
    let now = Instant::now();
    let (mut a, mut b, window) = mcs_pair(now);
    let pa = Peer::new(Digests::default());
    let mut pb = Peer::new(Digests::default());
    let cmd = write_cmd(12000, 9);
    let data = cmd.buffer.clone();
    a.submit(cmd, now).unwrap();
    let (itt, cmd_sn) = scsi_itts(&pa.sent(&mut a))[0];
    a.set_failed(ConnError::Failed("link down".into()));
    let (orphans, unsent) = a.take_orphans();
    assert!(unsent.is_empty());
    assert_eq!(orphans.len(), 1);
    assert_eq!((orphans[0].itt, orphans[0].cmd_sn), (itt, cmd_sn));
    b.reassign(orphans.into_iter().next().unwrap(), now)
        .unwrap();
    let sent = pb.sent(&mut b);
    let PduHeader::TaskMgmtRequest(t) = &sent[0].0 else {
        panic!("{sent:?}")
    };
    assert_eq!(t.function, TMF_TASK_REASSIGN);
    assert!(t.immediate);
    assert_eq!((t.referenced_task_tag, t.ref_cmd_sn), (itt, cmd_sn));
    assert_eq!(t.exp_data_sn, Sn(0));
    // Immediate: it takes no CmdSN of the session.
    assert_eq!(window.next_cmd_sn(), cmd_sn.next());
    let tmf_itt = t.itt;
    b.receive(&tmf_response(&mut pb, tmf_itt, 0), now).unwrap();
    match b.poll_event() {
        Some(Event::Reassigned {
            user_tag: 9,
            response: 0,
            refused: None,
        }) => {}
        other => panic!("{other:?}"),
    }
    // The target asks for all of it again, on B, with A's tag.
    b.receive(&pb.r2t(itt, 0x77, 0, 0, 12000), now).unwrap();
    let mut got = Vec::new();
    for (h, d) in pb.sent(&mut b) {
        let PduHeader::DataOut(o) = h else {
            panic!("{h:?}")
        };
        assert_eq!((o.itt, o.ttt), (itt, 0x77));
        got.extend_from_slice(&d);
    }
    assert_eq!(got, data);
    b.receive(&pb.response(itt, 0, &[], 42), now).unwrap();
    let done = completion(&mut b);
    assert_eq!((done.user_tag, done.status), (9, 0));
    assert_eq!(b.outstanding(), 0);
    assert!(b.poll_event().is_none());
}

/// ERL 2 reinstatement: the connection that replaces a failed one has its
/// index (its tags carry the same connection bits, its generations start
/// again), takes over its predecessor's write by TASK REASSIGN, finds the
/// target's R2T and status for that tag, and never gives a new task the
/// adopted tag.
#[test]
fn reinstated_connection_takes_over_its_predecessors_task_under_its_tag() {
    let now = Instant::now();
    let window = Arc::new(SessionWindow::new(Sn(10), Sn(10), Sn(40)));
    let mut o = outcome(params());
    o.max_cmd_sn = Sn(40);
    o.cid = 1;
    let mut old = Connection::in_session(&o, ConnTimers::default(), now, window.clone(), 1);
    let pa = Peer::new(Digests::default());
    let mut pb = Peer::new(Digests::default());
    let cmd = write_cmd(4096, 7);
    let data = cmd.buffer.clone();
    old.submit(cmd, now).unwrap();
    let (itt, _) = scsi_itts(&pa.sent(&mut old))[0];
    old.set_failed(ConnError::Failed("killed".into()));
    let (orphans, _) = old.take_orphans();
    let mut new = Connection::in_session(&o, ConnTimers::default(), now, window.clone(), 1);
    new.reassign(orphans.into_iter().next().unwrap(), now)
        .unwrap();
    let PduHeader::TaskMgmtRequest(t) = &pb.sent(&mut new)[0].0 else {
        panic!()
    };
    let tmf_itt = t.itt;
    assert_eq!(t.referenced_task_tag, itt);
    assert_ne!(tmf_itt, itt, "the TMF has a tag of its own");
    // New commands on the reinstated connection: none takes the old tag
    // (the same slot and generation would give it).
    for tag in 100..104 {
        new.submit(read_cmd(512, tag), now).unwrap();
    }
    let fresh = scsi_itts(&pb.sent(&mut new));
    assert_eq!(fresh.len(), 4);
    assert!(
        fresh.iter().all(|(i, _)| *i != itt),
        "{fresh:x?} vs {itt:#x}"
    );
    new.receive(&tmf_response(&mut pb, tmf_itt, 0), now)
        .unwrap();
    assert!(matches!(
        new.poll_event(),
        Some(Event::Reassigned {
            user_tag: 7,
            response: 0,
            refused: None
        })
    ));
    new.receive(&pb.r2t(itt, 0x55, 0, 0, 4096), now).unwrap();
    let got: Vec<u8> = pb.sent(&mut new).into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(got, data);
    new.receive(&pb.response(itt, 0, &[], 50), now).unwrap();
    let done = completion(&mut new);
    assert_eq!((done.user_tag, done.status), (7, 0));
    assert!(new.is_failed().is_none());
}

/// A target that refuses TASK REASSIGN (here: allegiance reassignment not
/// supported) gets the command back, buffer and all, not done and not
/// lost; the connection stays up.
#[test]
fn refused_task_reassign_gives_the_command_back() {
    let now = Instant::now();
    let (mut a, mut b, _) = mcs_pair(now);
    let pa = Peer::new(Digests::default());
    let mut pb = Peer::new(Digests::default());
    let cmd = write_cmd(4096, 5);
    let data = cmd.buffer.clone();
    a.submit(cmd, now).unwrap();
    let _ = pa.sent(&mut a);
    a.set_failed(ConnError::Failed("link down".into()));
    let (orphans, _) = a.take_orphans();
    b.reassign(orphans.into_iter().next().unwrap(), now)
        .unwrap();
    let PduHeader::TaskMgmtRequest(t) = &pb.sent(&mut b)[0].0 else {
        panic!()
    };
    b.receive(&tmf_response(&mut pb, t.itt, 4), now).unwrap();
    match b.poll_event() {
        Some(Event::Reassigned {
            user_tag: 5,
            response: 4,
            refused: Some(cmd),
        }) => assert_eq!(cmd.buffer, data),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.outstanding(), 0);
    assert!(b.is_failed().is_none());
}

/// ERL 2, immediate commands of a failed connection: a retry keeps the I
/// bit and carries the session's next CmdSN (the immediate command's own
/// CmdSN was never taken and is behind by now), taking none; a
/// non-immediate retry keeps its own CmdSN with the I bit clear; a TASK
/// REASSIGN the target refuses gives the command back still immediate,
/// and a new submit sends it with the I bit and the next CmdSN again.
#[test]
fn retried_and_reassigned_immediate_commands_keep_the_cmdsn_rules() {
    let now = Instant::now();
    let (mut a, mut b, window) = mcs_pair(now);
    let pa = Peer::new(Digests::default());
    let mut pb = Peer::new(Digests::default());
    let mut urgent = read_cmd(512, 1);
    urgent.immediate = true;
    a.submit(urgent, now).unwrap();
    a.submit(read_cmd(512, 2), now).unwrap();
    let mut again = read_cmd(512, 3);
    again.immediate = true;
    a.submit(again, now).unwrap();
    let sent = scsi_itts(&pa.sent(&mut a));
    // Both immediates carried the next CmdSN then; the ordered one took 10.
    assert_eq!(
        sent.iter().map(|s| s.1).collect::<Vec<_>>(),
        [Sn(10), Sn(10), Sn(11)]
    );
    // B's own command moves the session's CmdSN on meanwhile.
    b.submit(read_cmd(512, 4), now).unwrap();
    let _ = pb.sent(&mut b);
    assert_eq!(window.next_cmd_sn(), Sn(12));
    a.set_failed(ConnError::Failed("link down".into()));
    let (orphans, _) = a.take_orphans();
    let mut by_tag: Vec<_> = orphans.into_iter().collect();
    by_tag.sort_by_key(|o| o.cmd.user_tag);
    let mut it = by_tag.into_iter();
    let (urgent, ordered, again) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    assert!(urgent.cmd.immediate && !ordered.cmd.immediate);
    b.retry(urgent, now).unwrap();
    b.retry(ordered, now).unwrap();
    let cmds: Vec<_> = pb
        .sent(&mut b)
        .into_iter()
        .filter_map(|(h, _)| match h {
            PduHeader::ScsiCommand(c) => Some((c.immediate, c.cmd_sn)),
            _ => None,
        })
        .collect();
    assert_eq!(cmds, [(true, Sn(12)), (false, Sn(10))]);
    assert_eq!(window.next_cmd_sn(), Sn(12), "a retry takes no CmdSN");
    b.reassign(again, now).unwrap();
    let PduHeader::TaskMgmtRequest(t) = &pb.sent(&mut b)[0].0 else {
        panic!()
    };
    assert!(t.immediate);
    assert_eq!((t.cmd_sn, t.ref_cmd_sn), (Sn(12), Sn(11)));
    b.receive(&tmf_response(&mut pb, t.itt, 1), now).unwrap();
    let back = match b.poll_event() {
        Some(Event::Reassigned {
            user_tag: 3,
            response: 1,
            refused: Some(cmd),
        }) => *cmd,
        other => panic!("{other:?}"),
    };
    assert!(back.immediate, "the I flag comes back with the command");
    b.submit(back, now).unwrap();
    let sent = pb.sent(&mut b);
    let PduHeader::ScsiCommand(c) = &sent[0].0 else {
        panic!("{sent:?}")
    };
    assert!(c.immediate);
    assert_eq!(c.cmd_sn, Sn(12));
    assert_eq!(window.next_cmd_sn(), Sn(12));
}

/// Everything the connection has to send, taken through `tx_parts` in
/// pieces of at most `step` bytes, as a transport that takes a little at a
/// time would; `hold` keeps a clone of every shared buffer it saw.
fn drain_parts(c: &mut Connection, step: usize, hold: &mut Vec<Arc<Vec<u8>>>) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut parts = [TxPart::Bytes(&[]); 4];
        let n = c.tx_parts(&mut parts);
        if n == 0 {
            return out;
        }
        let mut taken = 0;
        for part in &parts[..n] {
            if let TxPart::Shared { buf, .. } = part {
                hold.push(Arc::clone(buf));
            }
            let bytes = part.bytes();
            let k = bytes.len().min(step - taken);
            out.extend_from_slice(&bytes[..k]);
            taken += k;
            if taken == step {
                break;
            }
        }
        c.consume_tx(taken);
    }
}

#[test]
fn write_payload_by_reference_sends_the_same_bytes_without_copying() {
    // Digests and an odd length: padding and CRCs sit after each payload.
    let now = Instant::now();
    let p = Params {
        initial_r2t: false,
        first_burst_len: 9000,
        ..digest_params()
    };
    let streams: Vec<(Vec<u8>, Connection)> = [false, true]
        .into_iter()
        .map(|by_ref| {
            let mut c = Connection::new(&outcome(p.clone()), ConnTimers::default(), now);
            c.set_tx_by_reference(by_ref);
            c.submit(write_cmd(20001, 9), now).unwrap();
            let mut hold = Vec::new();
            let bytes = drain_parts(&mut c, 777, &mut hold);
            assert_eq!(hold.is_empty(), !by_ref);
            (bytes, c)
        })
        .collect();
    assert_eq!(streams[0].0, streams[1].0, "same PDUs either way");
    let (copied, shared) = (&streams[0].1.stats, &streams[1].1.stats);
    assert_eq!((copied.tx_bytes_copied, copied.tx_bytes_shared), (9000, 0));
    assert_eq!((shared.tx_bytes_copied, shared.tx_bytes_shared), (0, 9000));
    // The peer reads the PDUs back: the data is the command's.
    let peer = Peer::new(p.digests());
    let mut at = 0;
    let mut data = Vec::new();
    while at < streams[1].0.len() {
        let f = peer.framer.frame(&streams[1].0[at..]).unwrap().unwrap();
        data.extend_from_slice(&streams[1].0[at..][f.data.clone()]);
        at += f.total_len;
    }
    assert_eq!(data, write_cmd(20001, 9).buffer[..9000]);
}

#[test]
fn write_buffer_comes_back_whole_and_copied_only_while_still_held() {
    let now = Instant::now();
    for still_held in [false, true] {
        let mut peer = Peer::new(Digests::default());
        let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
        c.set_tx_by_reference(true);
        c.submit(write_cmd(3000, 4), now).unwrap();
        let mut hold = Vec::new();
        let sent = drain_parts(&mut c, 100_000, &mut hold);
        let f = peer.framer.frame(&sent).unwrap().unwrap();
        let PduHeader::ScsiCommand(sc) = &f.header else {
            panic!()
        };
        if !still_held {
            hold.clear(); // the transport's bytes were acknowledged
        }
        c.receive(&peer.response(sc.itt, 0, &[], 42), now).unwrap();
        let done = completion(&mut c);
        assert_eq!(done.buffer, write_cmd(3000, 4).buffer);
        assert_eq!(c.stats.tx_buffers_copied_back, u64::from(still_held));
    }
}

// ---------------------------------------------------------------- ERL 1

fn erl1(p: Params) -> Params {
    Params {
        error_recovery_level: 1,
        ..p
    }
}

/// The SNACKs among what the connection sent: (type, ITT, BegRun,
/// RunLength, ExpStatSN).
fn snacks(sent: &[(PduHeader, Vec<u8>)]) -> Vec<(u8, u32, u32, u32, Sn)> {
    sent.iter()
        .filter_map(|(h, _)| match h {
            PduHeader::Snack(k) => Some((k.kind, k.itt, k.beg_run, k.run_length, k.exp_stat_sn)),
            _ => None,
        })
        .collect()
}

fn one_itt(peer: &Peer, c: &mut Connection) -> u32 {
    scsi_itts(&peer.sent(c))[0].0
}

/// ERL 1: a Data-In lost on the way (a DataSN gap) is asked for again
/// with a Data SNACK from the lost DataSN on (RunLength 0); what came
/// after the gap is left out until the answer, the status is taken only
/// with its data, and the read completes whole.
#[test]
fn erl1_data_sn_gap_is_asked_for_again_by_snack() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(erl1(params())), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(12_288, 5), now).unwrap();
    let itt = one_itt(&peer, &mut c);
    let payload: Vec<u8> = (0..12_288u32).map(|i| (i * 31 + 7) as u8).collect();
    let d0 = peer.data_in(itt, 0, 0, &payload[..4096], false);
    let d1 = peer.data_in(itt, 1, 4096, &payload[4096..8192], false);
    let d2 = peer.data_in(itt, 2, 8192, &payload[8192..], true);
    // DataSN 1 is lost.
    c.receive(&d0, now).unwrap();
    c.receive(&d2, now).unwrap();
    assert!(c.is_failed().is_none());
    assert!(c.poll_event().is_none(), "no completion with a hole");
    // ExpStatSN has not passed the status: the target keeps what it sent.
    assert_eq!(snacks(&peer.sent(&mut c)), [(0, itt, 1, 0, Sn(100))]);
    // The target sends everything from DataSN 1 again.
    for chunk in [d1, d2].concat().chunks(700) {
        c.receive(chunk, now).unwrap();
    }
    let done = completion(&mut c);
    assert_eq!((done.user_tag, done.status), (5, 0));
    assert_eq!(done.buffer, payload);
    assert_eq!((c.stats.snacks, c.stats.data_in_discarded), (1, 1));
    assert!(c.poll_event().is_none());
    // The status was taken once: ExpStatSN is 101.
    c.ping(now).unwrap();
    let PduHeader::NopOut(n) = &peer.sent(&mut c)[0].0 else {
        panic!()
    };
    assert_eq!(n.exp_stat_sn, Sn(101));
}

/// ERL 1: a Data-In whose data digest is wrong is asked for again (with
/// everything after it) instead of failing the connection; the bad bytes
/// that landed are overwritten by the good ones.
#[test]
fn erl1_data_digest_error_on_data_in_is_asked_for_again() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(erl1(digest_params())), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests {
        header: true,
        data: true,
    });
    c.submit(read_cmd(8192, 9), now).unwrap();
    let itt = one_itt(&peer, &mut c);
    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 3 + 1) as u8).collect();
    let d0 = peer.data_in(itt, 0, 0, &payload[..4096], false);
    let d1 = peer.data_in(itt, 1, 4096, &payload[4096..], true);
    let mut bad = d0.clone();
    bad[48 + 4 + 100] ^= 0x40;
    read_like_readv(&mut c, &[bad, d1.clone()].concat(), 64 * 1024, now);
    assert!(c.is_failed().is_none());
    assert!(c.poll_event().is_none());
    assert_eq!(snacks(&peer.sent(&mut c)), [(0, itt, 0, 0, Sn(100))]);
    read_like_readv(&mut c, &[d0, d1].concat(), 64 * 1024, now);
    let done = completion(&mut c);
    assert_eq!(done.buffer, payload);
    assert_eq!(
        c.stats.data_in_discarded, 2,
        "the bad one and the one after"
    );
}

/// At ERL 0 the same digest error still fails the connection (see
/// `placed_data_with_a_bad_digest_fails_the_connection`), and a DataSN gap
/// too: no SNACK is sent.
#[test]
fn erl0_data_sn_gap_still_fails_the_connection() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(params()), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(8192, 1), now).unwrap();
    let itt = one_itt(&peer, &mut c);
    let e = c
        .receive(&peer.data_in(itt, 1, 4096, &[1; 4096], true), now)
        .unwrap_err();
    assert!(e.to_string().contains("DataSN 1 out of order"), "{e}");
    assert!(snacks(&peer.sent(&mut c)).is_empty());
}

/// ERL 1: a status lost on the way shows as a StatSN gap on a later PDU
/// (another command's status, or the answer to our ping): a Status SNACK
/// asks for it; the status sent again completes its command, and a copy of
/// a status taken already is dropped.
#[test]
fn erl1_lost_status_is_asked_for_by_status_snack() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(erl1(params())), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(512, 1), now).unwrap();
    c.submit(read_cmd(512, 2), now).unwrap();
    let itts = scsi_itts(&peer.sent(&mut c));
    let a = peer.data_in(itts[0].0, 0, 0, &[0xa; 512], true); // StatSN 100, lost
    let b = peer.data_in(itts[1].0, 0, 0, &[0xb; 512], true); // StatSN 101
    c.receive(&b, now).unwrap();
    assert_eq!(completion(&mut c).user_tag, 2);
    assert_eq!(
        snacks(&peer.sent(&mut c)),
        [(1, RESERVED_TAG, 100, 1, Sn(100))]
    );
    // The answer: A's status again (and, overlapping, B's: dropped).
    c.receive(&a, now).unwrap();
    c.receive(&b, now).unwrap();
    let done = completion(&mut c);
    assert_eq!((done.user_tag, done.buffer), (1, vec![0xa; 512]));
    assert!(c.poll_event().is_none());
    assert_eq!(c.stats.statuses_again, 1);
    assert!(c.is_failed().is_none());

    // The last status lost, nothing after it: the ping's answer shows it.
    c.submit(read_cmd(0, 3), now).unwrap();
    let itt = one_itt(&peer, &mut c);
    let lost = peer.response(itt, 0, &[], 42); // StatSN 102
    c.ping(now).unwrap();
    let PduHeader::NopOut(ping) = &peer.sent(&mut c)[0].0 else {
        panic!()
    };
    let answer = peer.encode(
        PduHeader::NopIn(NopIn {
            lun: 0,
            itt: ping.itt,
            ttt: RESERVED_TAG,
            stat_sn: peer.stat_sn, // 103
            exp_cmd_sn: Sn(13),
            max_cmd_sn: Sn(44),
        }),
        &[],
    );
    c.receive(&answer, now).unwrap();
    assert!(matches!(c.poll_event(), Some(Event::PingAnswered { .. })));
    assert_eq!(
        snacks(&peer.sent(&mut c)),
        [(1, RESERVED_TAG, 102, 1, Sn(102))]
    );
    c.receive(&lost, now).unwrap();
    assert_eq!(completion(&mut c).user_tag, 3);
    // Everything taken: ExpStatSN 104.
    c.ping(now).unwrap();
    let PduHeader::NopOut(n) = &peer.sent(&mut c)[0].0 else {
        panic!()
    };
    assert_eq!(n.exp_stat_sn, Sn(104));
}

/// ERL 1: an R2T lost on the way (an R2TSN gap) is asked for again with
/// an R2T SNACK; the R2T after it is answered at once, the lost one when
/// it comes again, and a copy of one answered already is ignored.
#[test]
fn erl1_lost_r2t_is_asked_for_by_r2t_snack() {
    let now = Instant::now();
    let p = Params {
        immediate_data: false,
        max_outstanding_r2t: 2,
        ..erl1(params())
    };
    let mut c = Connection::new(&outcome(p), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(write_cmd(8192, 4), now).unwrap();
    let itt = one_itt(&peer, &mut c);
    // R2TSN 0 (bytes 0..4096) is lost; R2TSN 1 (4096..8192) arrives.
    c.receive(&peer.r2t(itt, 0x51, 1, 4096, 4096), now).unwrap();
    let sent = peer.sent(&mut c);
    assert_eq!(snacks(&sent), [(0, itt, 0, 1, Sn(100))]);
    let offsets = |sent: &[(PduHeader, Vec<u8>)]| -> Vec<u32> {
        sent.iter()
            .filter_map(|(h, _)| match h {
                PduHeader::DataOut(d) => Some(d.buffer_offset),
                _ => None,
            })
            .collect()
    };
    assert_eq!(offsets(&sent), [4096]);
    c.receive(&peer.r2t(itt, 0x50, 0, 0, 4096), now).unwrap();
    assert_eq!(offsets(&peer.sent(&mut c)), [0]);
    // A copy of R2TSN 1: nothing more is sent for it.
    c.receive(&peer.r2t(itt, 0x51, 1, 4096, 4096), now).unwrap();
    assert!(peer.sent(&mut c).is_empty());
    c.receive(&peer.response(itt, 0, &[], 42), now).unwrap();
    assert_eq!(completion(&mut c).user_tag, 4);
    assert!(c.is_failed().is_none());
}

/// ERL 1: a StatSN far ahead is no lost status but a broken target: it
/// fails the connection with a typed error naming the connection.
#[test]
fn erl1_stat_sn_far_ahead_fails_the_connection() {
    let now = Instant::now();
    let mut c = Connection::new(&outcome(erl1(params())), ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(0, 1), now).unwrap();
    let itt = one_itt(&peer, &mut c);
    peer.stat_sn = Sn(100 + MAX_STATUS_GAP + 1);
    let e = c.receive(&peer.response(itt, 0, &[], 42), now).unwrap_err();
    assert!(
        matches!(
            e,
            ConnError::StatSn {
                cid: 0,
                expected: Sn(100),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(c.take_outstanding().len(), 1, "the command comes back");
}

// ------------------------------------------------------ immediate commands

/// An immediate SCSI command (RFC 7143 §3.2.2.1) goes out at once with
/// the I bit and the next CmdSN, which it does not take, even while the
/// CmdSN window is full and other commands wait for it.
#[test]
fn immediate_command_goes_out_at_once_with_the_next_cmdsn() {
    let now = Instant::now();
    let mut o = outcome(params());
    o.max_cmd_sn = Sn(10); // room for CmdSN 10 only
    let mut c = Connection::new(&o, ConnTimers::default(), now);
    let mut peer = Peer::new(Digests::default());
    c.submit(read_cmd(512, 1), now).unwrap();
    c.submit(read_cmd(512, 2), now).unwrap();
    let mut tur = Command::new(0, &[0; 6], Direction::None, Vec::new()).unwrap();
    tur.user_tag = 3;
    tur.immediate = true;
    c.submit(tur, now).unwrap();
    let sent = peer.sent(&mut c);
    let cmds: Vec<(bool, Sn)> = sent
        .iter()
        .filter_map(|(h, _)| match h {
            PduHeader::ScsiCommand(c) => Some((c.immediate, c.cmd_sn)),
            _ => None,
        })
        .collect();
    assert_eq!(cmds, [(false, Sn(10)), (true, Sn(11))]);
    assert_eq!(c.window().next_cmd_sn(), Sn(11), "the immediate took none");
    assert_eq!(c.stats.window_stalls, 1, "command 2 waits for the window");
    let itt = scsi_itts(&sent)[1].0;
    c.receive(&peer.response(itt, 0, &[], 10), now).unwrap();
    assert_eq!(completion(&mut c).user_tag, 3);
    // The window opens: command 2 goes out with CmdSN 11, the one the
    // immediate command carried.
    c.receive(&peer.response(scsi_itts(&sent)[0].0, 0, &[], 11), now)
        .unwrap();
    assert_eq!(completion(&mut c).user_tag, 1);
    assert_eq!(
        scsi_itts(&peer.sent(&mut c))
            .iter()
            .map(|x| x.1)
            .collect::<Vec<_>>(),
        [Sn(11)]
    );
}
