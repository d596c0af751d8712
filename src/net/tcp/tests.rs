//! One test per state transition, with template segments (smoltcp style).

use super::*;
use crate::wire::tcp::SackBlocks;

const LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 49500);
const REMOTE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 3260);
const LOCAL_ISS: SeqNumber = SeqNumber(1000);
const REMOTE_ISS: SeqNumber = SeqNumber(5000);
const MSS: usize = 1000;

/// A segment as the socket sent it (payload copied out).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seg {
    flags: TcpFlags,
    seq: SeqNumber,
    ack: Option<SeqNumber>,
    window: u16,
    options: TcpOptions,
    payload: Vec<u8>,
}

fn config() -> TcpConfig {
    TcpConfig {
        rx_buffer: 8192,
        tx_buffer: 8192,
        window_scaling: false,
        timestamps: false,
        sack: false,
        delayed_ack: None,
        ..TcpConfig::default()
    }
}

/// A segment from the peer, acknowledging our SYN.
fn seg_in(seq: SeqNumber, ack: Option<SeqNumber>) -> TcpRepr<'static> {
    TcpRepr {
        src_port: REMOTE.port(),
        dst_port: LOCAL.port(),
        flags: TcpFlags::default(),
        seq_number: seq,
        ack_number: ack,
        window_len: 8192,
        options: TcpOptions::default(),
        payload: &[],
    }
}

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

fn dispatch_all(s: &mut TcpSocket, now: Instant) -> Vec<Seg> {
    let mut out = Vec::new();
    s.dispatch(now, &mut |repr, _| {
        out.push(Seg {
            flags: repr.flags,
            seq: repr.seq_number,
            ack: repr.ack_number,
            window: repr.window_len,
            options: repr.options,
            payload: repr.payload.to_vec(),
        });
        Ok(())
    })
    .unwrap();
    out
}

#[track_caller]
fn recv(s: &mut TcpSocket, now: Instant, seg: TcpRepr) -> ProcessOutcome {
    s.process(now, REMOTE, LOCAL, &seg)
}

#[track_caller]
fn expect_one(s: &mut TcpSocket, now: Instant) -> Seg {
    let segs = dispatch_all(s, now);
    assert_eq!(segs.len(), 1, "expected one segment, got {segs:#?}");
    segs.into_iter().next().unwrap()
}

#[track_caller]
fn expect_nothing(s: &mut TcpSocket, now: Instant) {
    let segs = dispatch_all(s, now);
    assert!(segs.is_empty(), "expected nothing, got {segs:#?}");
}

#[track_caller]
fn expect_ack(seg: &Seg, seq: SeqNumber, ack: SeqNumber) {
    assert!(
        !seg.flags.syn && !seg.flags.fin && !seg.flags.rst,
        "flags {:?}",
        seg.flags
    );
    assert_eq!((seg.seq, seg.ack), (seq, Some(ack)), "seq/ack");
}

fn syn_sent(config: TcpConfig) -> TcpSocket {
    let mut s = TcpSocket::new(config);
    s.set_link_limits(MSS, 0);
    s.connect(t(0), LOCAL, REMOTE, LOCAL_ISS, 0).unwrap();
    let syn = expect_one(&mut s, t(0));
    assert!(syn.flags.syn && syn.ack.is_none());
    s
}

fn synack(options: TcpOptions) -> TcpRepr<'static> {
    TcpRepr {
        flags: TcpFlags {
            syn: true,
            ..Default::default()
        },
        options: TcpOptions {
            mss: Some(MSS as u16),
            ..options
        },
        ..seg_in(REMOTE_ISS, Some(LOCAL_ISS + 1))
    }
}

fn established() -> TcpSocket {
    let mut s = syn_sent(config());
    recv(&mut s, t(10), synack(TcpOptions::default()));
    assert_eq!(s.state(), State::Established);
    expect_ack(&expect_one(&mut s, t(10)), LOCAL_ISS + 1, REMOTE_ISS + 1);
    s
}

/// Data from the peer at `offset` bytes into its stream.
fn data_in(offset: usize, payload: &'static [u8]) -> TcpRepr<'static> {
    TcpRepr {
        payload,
        ..seg_in(REMOTE_ISS + 1 + offset, Some(LOCAL_ISS + 1))
    }
}

fn ack_in(ack: SeqNumber) -> TcpRepr<'static> {
    seg_in(REMOTE_ISS + 1, Some(ack))
}

// ---- SYN-SENT -----------------------------------------------------------

#[test]
fn connect_sends_syn_with_options() {
    let mut s = TcpSocket::new(TcpConfig {
        window_scaling: true,
        timestamps: true,
        sack: true,
        ..config()
    });
    s.set_link_limits(1460, 0);
    s.connect(t(0), LOCAL, REMOTE, LOCAL_ISS, 77).unwrap();
    let syn = expect_one(&mut s, t(0));
    assert_eq!(syn.seq, LOCAL_ISS);
    assert_eq!(syn.options.mss, Some(1460));
    assert_eq!(syn.options.window_scale, Some(0)); // 8 KiB buffer needs no shift
    assert!(syn.options.sack_permitted);
    assert_eq!(syn.options.timestamp.map(|ts| ts.tsecr), Some(0));
    assert_eq!(s.state(), State::SynSent);
}

#[test]
fn syn_sent_syn_ack_establishes() {
    let s = established();
    assert_eq!(s.state(), State::Established);
    assert!(s.may_send());
}

#[test]
fn syn_sent_rst_with_good_ack_is_refused() {
    let mut s = syn_sent(config());
    let rst = TcpRepr {
        flags: TcpFlags {
            rst: true,
            ..Default::default()
        },
        ..seg_in(SeqNumber(0), Some(LOCAL_ISS + 1))
    };
    recv(&mut s, t(5), rst);
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.error(), Some(TcpError::Refused));
}

#[test]
fn syn_sent_bad_ack_gets_reset_and_bad_rst_is_ignored() {
    let mut s = syn_sent(config());
    assert_eq!(
        recv(&mut s, t(5), seg_in(REMOTE_ISS, Some(LOCAL_ISS + 100))),
        ProcessOutcome::SendReset
    );
    let rst = TcpRepr {
        flags: TcpFlags {
            rst: true,
            ..Default::default()
        },
        ..seg_in(SeqNumber(0), Some(LOCAL_ISS + 9))
    };
    assert_eq!(recv(&mut s, t(5), rst), ProcessOutcome::Done);
    assert_eq!(s.state(), State::SynSent);
}

#[test]
fn syn_retransmitted_with_backoff_then_times_out() {
    let mut s = syn_sent(TcpConfig {
        syn_retries: 2,
        ..config()
    });
    expect_nothing(&mut s, t(999));
    assert_eq!(expect_one(&mut s, t(1000)).seq, LOCAL_ISS);
    expect_nothing(&mut s, t(2999));
    assert!(expect_one(&mut s, t(3000)).flags.syn);
    expect_nothing(&mut s, t(6999));
    assert_eq!(s.poll_at(), Some(t(7000)));
    expect_nothing(&mut s, t(7000));
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.error(), Some(TcpError::TimedOut));
}

#[test]
fn simultaneous_open_goes_through_syn_received() {
    let mut s = syn_sent(config());
    let syn = TcpRepr {
        flags: TcpFlags {
            syn: true,
            ..Default::default()
        },
        ..seg_in(REMOTE_ISS, None)
    };
    recv(&mut s, t(5), syn);
    assert_eq!(s.state(), State::SynReceived);
    let synack = expect_one(&mut s, t(5));
    assert!(synack.flags.syn);
    assert_eq!((synack.seq, synack.ack), (LOCAL_ISS, Some(REMOTE_ISS + 1)));
    recv(&mut s, t(10), ack_in(LOCAL_ISS + 1));
    assert_eq!(s.state(), State::Established);
}

#[test]
fn options_negotiated_from_syn_ack() {
    let mut s = syn_sent(TcpConfig {
        window_scaling: true,
        timestamps: true,
        sack: true,
        rx_buffer: 1 << 20,
        ..config()
    });
    let opts = TcpOptions {
        window_scale: Some(3),
        sack_permitted: true,
        timestamp: Some(TcpTimestamp {
            tsval: 500,
            tsecr: 1,
        }),
        ..Default::default()
    };
    recv(&mut s, t(10), synack(opts));
    assert_eq!(s.state(), State::Established);
    assert_eq!(s.effective_mss(), MSS - 12);
    let ack = expect_one(&mut s, t(10));
    assert_eq!(ack.options.timestamp.map(|ts| ts.tsecr), Some(500));
    // 1 MiB buffer advertised with our shift of 5.
    assert_eq!(usize::from(ack.window) << 5, 1 << 20);
    // Peer windows are scaled by its shift of 3.
    recv(
        &mut s,
        t(20),
        TcpRepr {
            window_len: 100,
            ..ack_in(LOCAL_ISS + 1)
        },
    );
    assert_eq!(s.snd_wnd, 800);
}

// ---- LISTEN / SYN-RECEIVED ------------------------------------------------

fn listening() -> TcpSocket {
    let mut s = TcpSocket::new(config());
    s.set_link_limits(MSS, 0);
    s.listen(
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, LOCAL.port()),
        LOCAL_ISS,
        0,
    )
    .unwrap();
    s
}

#[test]
fn listen_syn_then_ack_establishes() {
    let mut s = listening();
    assert!(s.accepts(REMOTE, LOCAL));
    let syn = TcpRepr {
        flags: TcpFlags {
            syn: true,
            ..Default::default()
        },
        options: TcpOptions {
            mss: Some(1200),
            ..Default::default()
        },
        ..seg_in(REMOTE_ISS, None)
    };
    recv(&mut s, t(0), syn);
    assert_eq!(s.state(), State::SynReceived);
    let synack = expect_one(&mut s, t(0));
    assert!(synack.flags.syn);
    assert_eq!(synack.ack, Some(REMOTE_ISS + 1));
    assert_eq!(synack.options.window_scale, None, "not offered by the peer");
    // A duplicate SYN gets the SYN-ACK again.
    recv(&mut s, t(1), syn);
    assert!(expect_one(&mut s, t(1)).flags.syn);
    recv(&mut s, t(2), ack_in(LOCAL_ISS + 1));
    assert_eq!(s.state(), State::Established);
    assert_eq!(s.local_endpoint(), LOCAL);
    assert_eq!(s.remote_endpoint(), REMOTE);
}

#[test]
fn listen_rejects_ack_and_ignores_rst() {
    let mut s = listening();
    assert_eq!(
        recv(&mut s, t(0), ack_in(LOCAL_ISS)),
        ProcessOutcome::SendReset
    );
    let rst = TcpRepr {
        flags: TcpFlags {
            rst: true,
            ..Default::default()
        },
        ..seg_in(REMOTE_ISS, None)
    };
    assert_eq!(recv(&mut s, t(0), rst), ProcessOutcome::Done);
    assert_eq!(s.state(), State::Listen);
}

#[test]
fn syn_received_bad_ack_gets_reset() {
    let mut s = listening();
    recv(
        &mut s,
        t(0),
        TcpRepr {
            flags: TcpFlags {
                syn: true,
                ..Default::default()
            },
            ..seg_in(REMOTE_ISS, None)
        },
    );
    expect_one(&mut s, t(0));
    assert_eq!(
        recv(&mut s, t(1), ack_in(LOCAL_ISS + 7)),
        ProcessOutcome::SendReset
    );
}

// ---- ESTABLISHED: data -----------------------------------------------------

#[test]
fn data_in_is_acked_and_readable() {
    let mut s = established();
    recv(&mut s, t(20), data_in(0, b"hello"));
    expect_ack(&expect_one(&mut s, t(20)), LOCAL_ISS + 1, REMOTE_ISS + 6);
    let mut buf = [0u8; 16];
    assert_eq!(s.recv_slice(&mut buf), Ok(5));
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(s.recv_slice(&mut buf), Ok(0));
}

#[test]
fn out_of_order_data_is_sacked_and_reassembled() {
    let mut s = syn_sent(TcpConfig {
        sack: true,
        ..config()
    });
    recv(
        &mut s,
        t(10),
        synack(TcpOptions {
            sack_permitted: true,
            ..Default::default()
        }),
    );
    expect_one(&mut s, t(10));
    recv(&mut s, t(20), data_in(5, b"world"));
    let dup = expect_one(&mut s, t(20));
    expect_ack(&dup, LOCAL_ISS + 1, REMOTE_ISS + 1);
    let mut blocks = SackBlocks::default();
    blocks.push(REMOTE_ISS + 6, REMOTE_ISS + 11);
    assert_eq!(dup.options.sack_blocks, blocks);
    recv(&mut s, t(21), data_in(0, b"hello"));
    let ack = expect_one(&mut s, t(21));
    expect_ack(&ack, LOCAL_ISS + 1, REMOTE_ISS + 11);
    assert!(ack.options.sack_blocks.is_empty());
    let mut buf = [0u8; 16];
    assert_eq!(s.recv_slice(&mut buf), Ok(10));
    assert_eq!(&buf[..10], b"helloworld");
}

#[test]
fn delayed_ack_waits_then_fires_and_every_second_segment_is_acked() {
    let mut s = syn_sent(TcpConfig {
        delayed_ack: Some(Duration::from_millis(40)),
        ..config()
    });
    recv(&mut s, t(10), synack(TcpOptions::default()));
    expect_one(&mut s, t(10));
    recv(&mut s, t(20), data_in(0, b"a"));
    expect_nothing(&mut s, t(20));
    assert_eq!(s.poll_at(), Some(t(60)));
    expect_ack(&expect_one(&mut s, t(60)), LOCAL_ISS + 1, REMOTE_ISS + 2);
    recv(&mut s, t(70), data_in(1, b"b"));
    expect_nothing(&mut s, t(70));
    recv(&mut s, t(71), data_in(2, b"c"));
    expect_ack(&expect_one(&mut s, t(71)), LOCAL_ISS + 1, REMOTE_ISS + 4);
}

#[test]
fn unacceptable_old_segment_is_answered_with_ack() {
    let mut s = established();
    recv(&mut s, t(20), data_in(0, b"hello"));
    expect_one(&mut s, t(20));
    recv(&mut s, t(30), data_in(0, b"hel"));
    expect_ack(&expect_one(&mut s, t(30)), LOCAL_ISS + 1, REMOTE_ISS + 6);
}

#[test]
fn send_data_and_ack_drains_buffer() {
    let mut s = established();
    assert_eq!(s.send_slice(&[7u8; 2500]), Ok(2500));
    let segs = dispatch_all(&mut s, t(20));
    assert_eq!(
        segs.iter().map(|s| s.payload.len()).collect::<Vec<_>>(),
        vec![1000, 1000, 500]
    );
    assert_eq!(segs[1].seq, LOCAL_ISS + 1001);
    assert!(segs[2].flags.psh);
    recv(&mut s, t(40), ack_in(LOCAL_ISS + 2501));
    assert_eq!(s.send_queue(), 0);
    assert_eq!(s.timer_rtx, None);
    assert!(s.smoothed_rtt() <= Duration::from_millis(30));
}

// ---- retransmission --------------------------------------------------------

#[test]
fn rto_retransmits_with_backoff_and_karn() {
    let mut s = established();
    s.send_slice(b"abc").unwrap();
    let first = expect_one(&mut s, t(20));
    let rto = s.rto();
    expect_nothing(&mut s, t(20) + rto - Duration::from_millis(1));
    let again = expect_one(&mut s, t(20) + rto);
    assert_eq!(
        (again.seq, again.payload.clone()),
        (first.seq, first.payload)
    );
    assert_eq!(s.rto(), rto * 2);
    assert_eq!(s.cwnd(), s.effective_mss());
    assert_eq!(s.counters().timeouts, 1);
    // The ACK of a retransmitted segment gives no RTT sample (Karn).
    let srtt = s.smoothed_rtt();
    recv(&mut s, t(5000), ack_in(LOCAL_ISS + 4));
    assert_eq!(s.smoothed_rtt(), srtt);
}

#[test]
fn three_dup_acks_trigger_fast_retransmit() {
    let mut s = established();
    s.send_slice(&[1u8; 5000]).unwrap();
    assert_eq!(dispatch_all(&mut s, t(20)).len(), 5);
    recv(&mut s, t(30), ack_in(LOCAL_ISS + 1001));
    for i in 0..2 {
        recv(&mut s, t(31 + i), ack_in(LOCAL_ISS + 1001));
        expect_nothing(&mut s, t(31 + i));
    }
    recv(&mut s, t(33), ack_in(LOCAL_ISS + 1001));
    let rtx = expect_one(&mut s, t(33));
    assert_eq!(rtx.seq, LOCAL_ISS + 1001);
    assert_eq!(rtx.payload.len(), 1000);
    assert_eq!(s.counters().fast_retransmits, 1);
    assert!(s.in_recovery);
    // Partial ACK: the next hole is resent at once (RFC 6582).
    recv(&mut s, t(40), ack_in(LOCAL_ISS + 2001));
    assert_eq!(expect_one(&mut s, t(40)).seq, LOCAL_ISS + 2001);
    // Full ACK ends recovery.
    recv(&mut s, t(50), ack_in(LOCAL_ISS + 5001));
    assert!(!s.in_recovery);
}

#[test]
fn sack_retransmits_only_holes() {
    let mut s = syn_sent(TcpConfig {
        sack: true,
        ..config()
    });
    recv(
        &mut s,
        t(10),
        synack(TcpOptions {
            sack_permitted: true,
            ..Default::default()
        }),
    );
    expect_one(&mut s, t(10));
    s.send_slice(&[1u8; 5000]).unwrap();
    assert_eq!(dispatch_all(&mut s, t(20)).len(), 5);
    // Segments 1 and 3 (of 0..5) lost; 2 and 4 arrive.
    let sack = |blocks: &[(usize, usize)]| {
        let mut opts = TcpOptions::default();
        for &(l, r) in blocks {
            opts.sack_blocks.push(LOCAL_ISS + 1 + l, LOCAL_ISS + 1 + r);
        }
        TcpRepr {
            options: opts,
            ..ack_in(LOCAL_ISS + 1001)
        }
    };
    recv(&mut s, t(30), ack_in(LOCAL_ISS + 1001));
    recv(&mut s, t(31), sack(&[(2000, 3000)]));
    recv(&mut s, t(32), sack(&[(2000, 3000), (4000, 5000)]));
    recv(&mut s, t(33), sack(&[(2000, 3000), (4000, 5000)]));
    let first = expect_one(&mut s, t(33));
    assert_eq!(first.seq, LOCAL_ISS + 1001);
    recv(&mut s, t(34), sack(&[(2000, 3000), (4000, 5000)]));
    let second = expect_one(&mut s, t(34));
    assert_eq!(second.seq, LOCAL_ISS + 3001, "skips the SACKed segment");
}

// ---- closing ---------------------------------------------------------------

#[test]
fn active_close_fin_wait_to_time_wait_to_closed() {
    let mut s = established();
    s.close();
    assert_eq!(s.state(), State::FinWait1);
    let fin = expect_one(&mut s, t(20));
    assert!(fin.flags.fin);
    assert_eq!(fin.seq, LOCAL_ISS + 1);
    recv(&mut s, t(30), ack_in(LOCAL_ISS + 2));
    assert_eq!(s.state(), State::FinWait2);
    let peer_fin = TcpRepr {
        flags: TcpFlags {
            fin: true,
            ..Default::default()
        },
        ..ack_in(LOCAL_ISS + 2)
    };
    recv(&mut s, t(40), peer_fin);
    assert_eq!(s.state(), State::TimeWait);
    expect_ack(&expect_one(&mut s, t(40)), LOCAL_ISS + 2, REMOTE_ISS + 2);
    // A retransmitted FIN is acknowledged again and restarts the timer.
    recv(&mut s, t(1000), peer_fin);
    expect_ack(&expect_one(&mut s, t(1000)), LOCAL_ISS + 2, REMOTE_ISS + 2);
    let mut buf = [0u8; 4];
    assert_eq!(s.recv_slice(&mut buf), Err(TcpError::Finished));
    let time_wait = s.config.time_wait;
    expect_nothing(&mut s, t(1000) + time_wait - Duration::from_millis(1));
    assert_eq!(s.state(), State::TimeWait);
    expect_nothing(&mut s, t(1000) + time_wait);
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.error(), None);
}

#[test]
fn fin_follows_queued_data() {
    let mut s = established();
    s.send_slice(b"bye").unwrap();
    s.close();
    let seg = expect_one(&mut s, t(20));
    assert!(seg.flags.fin);
    assert_eq!(seg.payload, b"bye");
    assert!(s.send_slice(b"more").is_err());
}

#[test]
fn passive_close_close_wait_last_ack_closed() {
    let mut s = established();
    let fin = TcpRepr {
        flags: TcpFlags {
            fin: true,
            ..Default::default()
        },
        ..ack_in(LOCAL_ISS + 1)
    };
    recv(&mut s, t(20), fin);
    assert_eq!(s.state(), State::CloseWait);
    expect_ack(&expect_one(&mut s, t(20)), LOCAL_ISS + 1, REMOTE_ISS + 2);
    assert!(s.may_send());
    s.close();
    assert_eq!(s.state(), State::LastAck);
    assert!(expect_one(&mut s, t(30)).flags.fin);
    recv(&mut s, t(40), seg_in(REMOTE_ISS + 2, Some(LOCAL_ISS + 2)));
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.error(), None);
}

#[test]
fn simultaneous_close_goes_through_closing() {
    let mut s = established();
    s.close();
    expect_one(&mut s, t(20));
    let fin = TcpRepr {
        flags: TcpFlags {
            fin: true,
            ..Default::default()
        },
        ..ack_in(LOCAL_ISS + 1)
    };
    recv(&mut s, t(21), fin);
    assert_eq!(s.state(), State::Closing);
    expect_one(&mut s, t(21));
    recv(&mut s, t(30), seg_in(REMOTE_ISS + 2, Some(LOCAL_ISS + 2)));
    assert_eq!(s.state(), State::TimeWait);
}

#[test]
fn fin_lost_is_retransmitted() {
    let mut s = established();
    s.close();
    expect_one(&mut s, t(20));
    let rto = s.rto();
    let again = expect_one(&mut s, t(20) + rto);
    assert!(again.flags.fin);
    assert_eq!(again.seq, LOCAL_ISS + 1);
}

// ---- resets and challenges ---------------------------------------------------

#[test]
fn exact_rst_resets_in_window_rst_is_challenged() {
    let mut s = established();
    let rst = |seq| TcpRepr {
        flags: TcpFlags {
            rst: true,
            ..Default::default()
        },
        ..seg_in(seq, None)
    };
    recv(&mut s, t(20), rst(REMOTE_ISS + 100));
    assert_eq!(s.state(), State::Established);
    expect_ack(&expect_one(&mut s, t(20)), LOCAL_ISS + 1, REMOTE_ISS + 1);
    assert_eq!(s.counters().challenge_acks, 1);
    recv(&mut s, t(21), rst(REMOTE_ISS + 1));
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.error(), Some(TcpError::Reset));
    let mut buf = [0u8; 1];
    assert_eq!(s.recv_slice(&mut buf), Err(TcpError::Reset));
}

#[test]
fn syn_in_established_is_challenged() {
    let mut s = established();
    let syn = TcpRepr {
        flags: TcpFlags {
            syn: true,
            ..Default::default()
        },
        ..seg_in(REMOTE_ISS + 1, None)
    };
    recv(&mut s, t(20), syn);
    assert_eq!(s.state(), State::Established);
    expect_ack(&expect_one(&mut s, t(20)), LOCAL_ISS + 1, REMOTE_ISS + 1);
}

#[test]
fn abort_sends_rst() {
    let mut s = established();
    s.abort();
    let rst = expect_one(&mut s, t(20));
    assert!(rst.flags.rst);
    assert_eq!(rst.seq, LOCAL_ISS + 1);
    assert_eq!(s.state(), State::Closed);
}

// ---- windows, probes, keepalive, timestamps ------------------------------------

#[test]
fn zero_window_is_probed_and_reopens() {
    let mut s = established();
    recv(
        &mut s,
        t(20),
        TcpRepr {
            window_len: 0,
            ..ack_in(LOCAL_ISS + 1)
        },
    );
    s.send_slice(b"data").unwrap();
    expect_nothing(&mut s, t(20));
    let at = s.poll_at().expect("persist timer");
    let probe = expect_one(&mut s, at);
    assert_eq!((probe.seq, probe.payload.len()), (LOCAL_ISS + 1, 1));
    assert_eq!(s.counters().zero_window_probes, 1);
    // Still closed: the next probe waits longer.
    recv(
        &mut s,
        at,
        TcpRepr {
            window_len: 0,
            ..ack_in(LOCAL_ISS + 1)
        },
    );
    let next = s.poll_at().unwrap();
    assert!(next - at > at - t(20));
    recv(
        &mut s,
        next,
        TcpRepr {
            window_len: 100,
            ..ack_in(LOCAL_ISS + 1)
        },
    );
    let seg = expect_one(&mut s, next);
    assert_eq!(seg.payload, b"data");
    assert_eq!(s.state(), State::Established);
}

/// A segment from a peer whose receive window is shut.
fn closed(seg: TcpRepr<'static>) -> TcpRepr<'static> {
    TcpRepr {
        window_len: 0,
        ..seg
    }
}

/// A zero-window probe's byte lies past the peer's window, which a peer
/// refuses (Linux drops it as TCPBeyondWindow): the ACKs we send while the
/// window stays shut must not count it, since a segment that starts past
/// RCV.NXT + RCV.WND is dropped too, ACK and all. Else the peer never sees
/// its own data acknowledged and, when its application is blocked sending
/// to us, never reopens the window: the dpdk_interop stall (the kernel's
/// echo server blocked writing, its receive queue full).
#[test]
fn acks_while_probing_a_zero_window_stay_inside_it() {
    let mut s = established();
    recv(&mut s, t(20), closed(ack_in(LOCAL_ISS + 1)));
    s.send_slice(b"data").unwrap();
    expect_nothing(&mut s, t(20));
    let at = s.poll_at().expect("persist timer");
    let probe = expect_one(&mut s, at);
    assert_eq!((probe.seq, probe.payload.len()), (LOCAL_ISS + 1, 1));
    // The peer refused the byte and keeps sending; its data is acked at
    // its RCV.NXT, not past it.
    recv(&mut s, at, closed(data_in(0, b"echo")));
    expect_ack(&expect_one(&mut s, at), LOCAL_ISS + 1, REMOTE_ISS + 5);
    // A duplicate (unacceptable) segment is answered the same way.
    recv(&mut s, at, closed(data_in(0, b"echo")));
    assert_eq!(s.counters().unacceptable_segments, 1);
    expect_ack(&expect_one(&mut s, at), LOCAL_ISS + 1, REMOTE_ISS + 5);
    // The window opens: the probed byte goes again, with the rest.
    recv(&mut s, at, seg_in(REMOTE_ISS + 5, Some(LOCAL_ISS + 1)));
    let seg = expect_one(&mut s, at);
    assert_eq!((seg.seq, &seg.payload[..]), (LOCAL_ISS + 1, &b"data"[..]));
    // A reset after a probe is inside the window too.
    let mut s = established();
    recv(&mut s, t(20), closed(ack_in(LOCAL_ISS + 1)));
    s.send_slice(b"data").unwrap();
    expect_nothing(&mut s, t(20));
    let at = s.poll_at().expect("persist timer");
    assert_eq!(expect_one(&mut s, at).payload.len(), 1);
    s.abort();
    let rst = expect_one(&mut s, at);
    assert!(rst.flags.rst);
    assert_eq!(rst.seq, LOCAL_ISS + 1);
}

/// A FIN sent into a closed window is refused like a probe's byte: the
/// ACKs after it stay at the window's edge until the peer takes the FIN.
#[test]
fn acks_after_a_fin_into_a_zero_window_stay_inside_it() {
    let mut s = established();
    recv(&mut s, t(20), closed(ack_in(LOCAL_ISS + 1)));
    s.close();
    let fin = expect_one(&mut s, t(20));
    assert!(fin.flags.fin);
    assert_eq!(fin.seq, LOCAL_ISS + 1);
    recv(&mut s, t(21), closed(data_in(0, b"echo")));
    expect_ack(&expect_one(&mut s, t(21)), LOCAL_ISS + 1, REMOTE_ISS + 5);
    // Once the FIN is acknowledged, ACKs carry the sequence after it.
    recv(&mut s, t(22), closed(data_in(4, b"more")));
    let ack = expect_one(&mut s, t(22));
    expect_ack(&ack, LOCAL_ISS + 1, REMOTE_ISS + 9);
    recv(
        &mut s,
        t(23),
        closed(seg_in(REMOTE_ISS + 9, Some(LOCAL_ISS + 2))),
    );
    assert_eq!(s.state(), State::FinWait2);
    recv(&mut s, t(24), closed(data_in(8, b"last")));
    expect_ack(&expect_one(&mut s, t(24)), LOCAL_ISS + 2, REMOTE_ISS + 13);
}

#[test]
fn own_zero_window_then_update_after_read() {
    let mut s = established();
    static BIG: [u8; 8192] = [9u8; 8192];
    recv(&mut s, t(20), data_in(0, &BIG));
    let ack = expect_one(&mut s, t(20));
    assert_eq!(ack.window, 0);
    let mut buf = [0u8; 8192];
    assert_eq!(s.recv_slice(&mut buf), Ok(8192));
    let update = expect_one(&mut s, t(21));
    assert_eq!(update.window, 8192);
}

#[test]
fn keepalive_probes_then_times_out() {
    let keepalive = Keepalive {
        idle: Duration::from_secs(10),
        interval: Duration::from_secs(1),
        probes: 2,
    };
    let mut s = syn_sent(TcpConfig {
        keepalive: Some(keepalive),
        ..config()
    });
    recv(&mut s, t(0), synack(TcpOptions::default()));
    expect_one(&mut s, t(0));
    let probe = expect_one(&mut s, t(10_000));
    assert_eq!(probe.seq, LOCAL_ISS, "one below snd_una");
    assert!(probe.payload.is_empty());
    // An answer resets the count.
    recv(&mut s, t(10_010), ack_in(LOCAL_ISS + 1));
    expect_nothing(&mut s, t(11_000));
    expect_one(&mut s, t(20_010));
    expect_one(&mut s, t(21_010));
    expect_nothing(&mut s, t(22_010));
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.error(), Some(TcpError::TimedOut));
}

#[test]
fn paws_drops_old_timestamps() {
    let mut s = syn_sent(TcpConfig {
        timestamps: true,
        ..config()
    });
    let ts = |tsval| TcpOptions {
        timestamp: Some(TcpTimestamp { tsval, tsecr: 1 }),
        ..Default::default()
    };
    recv(&mut s, t(10), synack(ts(1000)));
    expect_one(&mut s, t(10));
    recv(
        &mut s,
        t(20),
        TcpRepr {
            options: ts(1001),
            ..data_in(0, b"new")
        },
    );
    expect_one(&mut s, t(20));
    recv(
        &mut s,
        t(30),
        TcpRepr {
            options: ts(900),
            ..data_in(3, b"old")
        },
    );
    let ack = expect_one(&mut s, t(30));
    assert_eq!(ack.ack, Some(REMOTE_ISS + 4), "old segment not accepted");
    assert_eq!(s.counters().paws_rejected, 1);
    assert_eq!(ack.options.timestamp.map(|t| t.tsecr), Some(1001));
}

#[test]
fn timestamps_give_rtt_samples() {
    let mut s = syn_sent(TcpConfig {
        timestamps: true,
        ..config()
    });
    let opts = TcpOptions {
        timestamp: Some(TcpTimestamp { tsval: 1, tsecr: 1 }),
        ..Default::default()
    };
    recv(&mut s, t(10), synack(opts));
    expect_one(&mut s, t(10));
    s.send_slice(b"x").unwrap();
    let seg = expect_one(&mut s, t(100));
    let tsval = seg.options.timestamp.unwrap().tsval;
    let ack = TcpRepr {
        options: TcpOptions {
            timestamp: Some(TcpTimestamp {
                tsval: 2,
                tsecr: tsval,
            }),
            ..Default::default()
        },
        ..ack_in(LOCAL_ISS + 2)
    };
    recv(&mut s, t(150), ack);
    // Samples: 10 ms (SYN), then 50 ms; srtt = 7/8 * 10 + 1/8 * 50.
    assert_eq!(s.smoothed_rtt(), Duration::from_millis(15));
}

#[test]
fn congestion_window_grows_in_slow_start() {
    let mut s = established();
    let initial = s.cwnd();
    s.send_slice(&[0u8; 4000]).unwrap();
    dispatch_all(&mut s, t(20));
    recv(&mut s, t(30), ack_in(LOCAL_ISS + 4001));
    assert!(s.cwnd() > initial);
}

#[test]
fn newreno_is_selectable() {
    let s = TcpSocket::new(TcpConfig {
        congestion: CongestionAlgorithm::NewReno,
        ..config()
    });
    assert_eq!(s.cc.algorithm(), CongestionAlgorithm::NewReno);
    assert_eq!(
        TcpSocket::new(config()).cc.algorithm(),
        CongestionAlgorithm::Cubic
    );
}

// ---- sending by reference ---------------------------------------------------

/// Like [`dispatch_all`], through `dispatch_gather`: each segment's pieces
/// joined, and how many pieces it had.
fn dispatch_gather_all(s: &mut TcpSocket, now: Instant) -> Vec<(Seg, usize)> {
    let mut out = Vec::new();
    s.dispatch_gather(now, &mut |repr, pieces, _| {
        assert!(repr.payload.is_empty());
        out.push((
            Seg {
                flags: repr.flags,
                seq: repr.seq_number,
                ack: repr.ack_number,
                window: repr.window_len,
                options: repr.options,
                payload: pieces.concat(),
            },
            pieces.len(),
        ));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn shared_payload_goes_out_with_its_headers_and_is_released_when_acked() {
    let mut s = established();
    let data: SharedBytes = std::sync::Arc::new((0..3000u32).map(|i| (i % 251) as u8).collect());
    let header = [0xaau8; 48];
    assert_eq!(s.send_slice(&header), Ok(48));
    assert_eq!(s.send_shared(&data, 0, 3000), Ok(3000));
    assert_eq!(s.send_slice(&[0u8; 4]), Ok(4));
    assert_eq!(s.send_queue(), 3052);
    assert_eq!(s.send_queue_shared(), 3000);
    assert_eq!(
        (s.counters().tx_bytes_copied, s.counters().tx_bytes_shared),
        (52, 3000)
    );
    let mut stream = header.to_vec();
    stream.extend_from_slice(&data);
    stream.extend_from_slice(&[0u8; 4]);
    let segs = dispatch_gather_all(&mut s, t(20));
    // Full segments across the header/data/trailer boundaries.
    assert_eq!(
        segs.iter()
            .map(|(s, pieces)| (s.payload.len(), *pieces))
            .collect::<Vec<_>>(),
        vec![(1000, 2), (1000, 1), (1000, 1), (52, 2)]
    );
    let sent: Vec<u8> = segs.iter().flat_map(|(s, _)| s.payload.clone()).collect();
    assert_eq!(sent, stream);
    assert!(segs[3].0.flags.psh);
    assert_eq!(std::sync::Arc::strong_count(&data), 2, "held until acked");

    // The second segment is lost: three duplicate ACKs, and the resent
    // bytes come from the caller's buffer again.
    recv(&mut s, t(30), ack_in(LOCAL_ISS + 1001));
    for i in 0..3 {
        recv(&mut s, t(31 + i), ack_in(LOCAL_ISS + 1001));
    }
    let rtx = dispatch_gather_all(&mut s, t(34));
    assert_eq!(rtx.len(), 1, "{rtx:#?}");
    assert_eq!(rtx[0].0.seq, LOCAL_ISS + 1001);
    assert_eq!(rtx[0].0.payload, stream[1000..2000]);
    assert_eq!(s.counters().retransmitted_bytes, 1000);
    assert_eq!(std::sync::Arc::strong_count(&data), 2);
    recv(&mut s, t(40), ack_in(LOCAL_ISS + 1 + 3052));
    assert_eq!(s.send_queue(), 0);
    assert_eq!(
        std::sync::Arc::strong_count(&data),
        1,
        "released on the ACK"
    );

    // A timeout resends from the buffer too, and the plain ring still works.
    assert_eq!(s.send_shared(&data, 100, 50), Ok(50));
    let first = dispatch_gather_all(&mut s, t(50));
    let rto = s.rto();
    let again = dispatch_gather_all(&mut s, t(50) + rto);
    assert_eq!(first.len(), 1);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0.payload, data[100..150]);
    assert_eq!(again[0].0.seq, first[0].0.seq);
    recv(&mut s, t(5000), ack_in(LOCAL_ISS + 1 + 3102));
    assert_eq!(std::sync::Arc::strong_count(&data), 1);
    assert_eq!(s.send_slice(b"plain"), Ok(5));
    let plain = dispatch_all(&mut s, t(5001));
    assert_eq!(plain[0].payload, b"plain");
}

#[test]
fn plain_dispatch_sends_shared_bytes_one_slice_per_segment() {
    let mut s = established();
    let data: SharedBytes = std::sync::Arc::new(vec![5u8; 1500]);
    s.send_slice(&[1u8; 10]).unwrap();
    s.send_shared(&data, 0, 1500).unwrap();
    let segs = dispatch_all(&mut s, t(20));
    // Segment boundaries at the slice boundary; nothing lost or doubled.
    let lens: Vec<usize> = segs.iter().map(|s| s.payload.len()).collect();
    assert_eq!(lens.iter().sum::<usize>(), 1510, "{lens:?}");
    assert_eq!(segs[0].payload, [1u8; 10]);
}
