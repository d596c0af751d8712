//! An `iscsi-test-cu`-style self-check of our initiator: the embedded
//! target in strict mode checks every rule an initiator must keep (CmdSN
//! window and immediate CmdSN, ExpStatSN, DataSN order, the segment and
//! burst lengths, InitialR2T/ImmediateData, F bits, reserved fields).
//!
//! First our initiator runs workloads against it (reads; writes with R2T,
//! immediate and unsolicited data; task management; NOPs both ways; text;
//! logout; the multipath device) and no violation may be recorded. Then,
//! for each rule, a deliberately broken PDU stream (raw PDUs from the
//! `wire::iscsi` builders over the logged-in TCP stream) must be flagged
//! with exactly that rule, and the connection dropped.

use iscsi_bypass::iscsi::connection::{Command, Direction, Event};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::session::{Session, SessionConfig};
use iscsi_bypass::multipath::Io;
use iscsi_bypass::target::strict::Rule;
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle, TargetLimits};
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use iscsi_bypass::transport::{Transport, TransportError};
use iscsi_bypass::wire::iscsi::{
    encode_pdu, DataOut, Digests, NopOut, PduFramer, PduHeader, ScsiCommand, Sn, RESERVED_TAG,
};
use iscsi_bypass::{Device, IdleMode, Options};
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-12.org.iscsi-bypass:selfcheck";
const T: Duration = Duration::from_secs(5);

fn strict(limits: TargetLimits) -> TargetHandle {
    Target::start(TargetConfig::ram(IQN, 16 << 20).limits(limits).strict(true))
        .expect("embedded target")
}

fn login(target: &TargetHandle) -> Session<KernelTcp> {
    let t = KernelTcp::connect(target.portals()[0], &KernelTcpOptions::default()).unwrap();
    let cfg = SessionConfig::new(LoginConfig::new("iqn.2026-12.test:selfcheck", Some(IQN)));
    Session::login(t, &cfg).expect("login")
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write(s: &mut Session<KernelTcp>, lba: u32, data: Vec<u8>) {
    let cdb = rw10(0x2a, lba, (data.len() / 512) as u16);
    let c = s
        .execute(Command::new(0, &cdb, Direction::Write, data).unwrap(), T)
        .expect("write");
    assert_eq!(c.status, 0, "write status");
}

fn read(s: &mut Session<KernelTcp>, lba: u32, len: usize) -> Vec<u8> {
    let cdb = rw10(0x28, lba, (len / 512) as u16);
    let c = s
        .execute(
            Command::new(0, &cdb, Direction::Read, vec![0; len]).unwrap(),
            T,
        )
        .expect("read");
    assert_eq!(c.status, 0, "read status");
    c.buffer
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[track_caller]
fn no_violations(target: &TargetHandle) {
    let v = target.violations();
    assert!(v.is_empty(), "strict mode caught: {v:#?}");
}

/// Writes and reads of several sizes, task management, a ping each way, a
/// text request and a logout on one session.
fn session_workload(target: &TargetHandle) {
    let mut s = login(target);
    for (i, len) in [512usize, 4096, 12 * 1024, 100 * 1024, 300 * 1024]
        .into_iter()
        .enumerate()
    {
        let lba = i as u32 * 1024;
        let data = pattern(len, i as u8);
        write(&mut s, lba, data.clone());
        assert!(read(&mut s, lba, len) == data, "{len} bytes read back");
    }
    // Several commands in flight at once.
    for k in 0..16u64 {
        let cdb = rw10(0x2a, 8192 + k as u32 * 16, 16);
        let mut c = Command::new(0, &cdb, Direction::Write, pattern(8192, k as u8)).unwrap();
        c.user_tag = k;
        s.submit(c).unwrap();
    }
    let mut done = 0;
    while done < 16 {
        match s.next_event(T).unwrap() {
            Some(Event::Completed(c)) => {
                assert_eq!(c.status, 0);
                done += 1;
            }
            Some(_) => {}
            None => panic!("writes in flight did not complete"),
        }
    }
    // LOGICAL UNIT RESET (function 5) and ABORT TASK of nothing (1).
    assert_eq!(s.task_management(5, 0, None, T).unwrap(), 0);
    let _ = s.task_management(1, 0, None, T).unwrap();
    // A ping.
    s.connection_mut().ping(Instant::now()).unwrap();
    let deadline = Instant::now() + T;
    loop {
        match s.next_event(Duration::from_millis(100)).unwrap() {
            Some(Event::PingAnswered { .. }) => break,
            _ => assert!(Instant::now() < deadline, "ping not answered"),
        }
    }
    // Idle long enough for the target's NOP-In pings (answered by us).
    let idle = Instant::now() + Duration::from_millis(400);
    while Instant::now() < idle {
        let _ = s.next_event(Duration::from_millis(50)).unwrap();
    }
    let mut pairs = iscsi_bypass::wire::text::TextPairs::new();
    pairs.push("SendTargets", "All");
    let answer = s.text(&pairs, T).unwrap();
    assert_eq!(answer.get("TargetName"), Some(IQN));
    s.logout(T).unwrap();
}

fn limits(
    initial_r2t: bool,
    immediate_data: bool,
    mrdsl: u32,
    first: u32,
    burst: u32,
    r2ts: u32,
) -> TargetLimits {
    TargetLimits {
        max_recv_data_segment_len: mrdsl,
        max_burst_len: burst,
        first_burst_len: first,
        max_outstanding_r2t: r2ts,
        initial_r2t,
        immediate_data,
        allow_digests: true,
    }
}

#[test]
fn workloads_keep_every_rule() {
    let cases = [
        // R2T only, no immediate data, small segments and bursts.
        limits(true, false, 4096, 8192, 16384, 1),
        // Immediate data, then R2Ts.
        limits(true, true, 4096, 8192, 16384, 2),
        // Immediate plus unsolicited Data-Out up to FirstBurstLength.
        limits(false, true, 4096, 8192, 16384, 4),
        // Unsolicited Data-Out without immediate data.
        limits(false, false, 8192, 65536, 65536, 8),
        // The target's defaults.
        TargetLimits::default(),
    ];
    for l in cases {
        let target = Target::start(
            TargetConfig::ram(IQN, 16 << 20)
                .limits(l)
                .nop_in_interval(Some(Duration::from_millis(100)))
                .strict(true),
        )
        .unwrap();
        session_workload(&target);
        println!("{l:?}: no violation");
        no_violations(&target);
    }
}

/// The multipath device (two paths, queue depth 32, mixed sizes).
#[test]
fn multipath_device_keeps_every_rule() {
    let target = Target::start(
        TargetConfig::ram(IQN, 16 << 20)
            .loopback_portals(2)
            .limits(limits(false, true, 8192, 16384, 32768, 2))
            .strict(true),
    )
    .unwrap();
    let urls: Vec<String> = target
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let opts = Options {
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        ..Options::default()
    };
    let dev = Device::open_urls(&urls, &opts).unwrap();
    let mut q = dev.queue_pair();
    let mut out = Vec::new();
    let sizes = [1u32, 8, 64, 256];
    // Batches of 8 writes and 8 reads in flight.
    for batch in 0..5u32 {
        for k in 0..8u32 {
            let round = batch * 8 + k;
            let blocks = sizes[round as usize % 4];
            let buf = pattern(blocks as usize * 512, round as u8);
            let lba = u64::from(round) * 300;
            q.submit(Io::write(lba, blocks, buf, u64::from(round)))
                .unwrap();
            let rbuf = vec![0; blocks as usize * 512];
            q.submit(Io::read(lba + 16000, blocks, rbuf, 1000 + u64::from(round)))
                .unwrap();
        }
        let mut done = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while done < 16 {
            out.clear();
            q.wait_completions(&mut out, 1, Duration::from_millis(100));
            for c in &out {
                c.result.as_ref().expect("I/O");
                done += 1;
            }
            assert!(Instant::now() < deadline, "I/O did not complete");
        }
    }
    for round in 0..40u32 {
        let blocks = [1u32, 8, 64, 256][round as usize % 4];
        let mut got = vec![0u8; blocks as usize * 512];
        q.read_at(u64::from(round) * 300, &mut got).unwrap();
        assert!(got == pattern(blocks as usize * 512, round as u8));
    }
    dev.close();
    no_violations(&target);
}

// ---------------------------------------------------------------- negative

/// A logged-in session's raw stream, for sending broken PDUs.
struct Raw {
    t: KernelTcp,
    cmd_sn: Sn,
    exp_stat_sn: Sn,
    framer: PduFramer,
    inbox: Vec<u8>,
}

impl Raw {
    fn new(target: &TargetHandle) -> Raw {
        let s = login(target);
        let o = s.outcome().clone();
        let (t, _) = s.into_parts();
        Raw {
            t,
            cmd_sn: o.cmd_sn,
            exp_stat_sn: o.exp_stat_sn,
            framer: PduFramer {
                digests: Digests::default(),
                max_data_segment_len: 1 << 24,
            },
            inbox: Vec::new(),
        }
    }

    fn pdu(h: &PduHeader, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_pdu(&mut v, h, data, Digests::default());
        v
    }

    fn send(&mut self, mut bytes: &[u8]) {
        let deadline = Instant::now() + T;
        while !bytes.is_empty() {
            match self.t.send(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) => panic!("send: {e}"),
            }
            assert!(Instant::now() < deadline, "send stalled");
            if !bytes.is_empty() {
                let _ = self.t.wait(Duration::from_millis(5));
            }
        }
    }

    /// The next PDU from the target (None: the connection closed).
    fn recv(&mut self) -> Option<PduHeader> {
        let deadline = Instant::now() + T;
        loop {
            if let Ok(Some(f)) = self.framer.frame(&self.inbox) {
                let h = f.header.clone();
                self.inbox.drain(..f.total_len);
                return Some(h);
            }
            let mut buf = [0u8; 65536];
            match self.t.recv(&mut buf) {
                Ok(0) => {
                    let _ = self.t.wait(Duration::from_millis(10));
                }
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(TransportError::Closed) | Err(TransportError::Reset(_)) => return None,
                Err(TransportError::Io(_)) => return None,
                Err(e) => panic!("recv: {e}"),
            }
            assert!(Instant::now() < deadline, "nothing from the target");
        }
    }

    fn command(
        &mut self,
        cdb: &[u8],
        read: bool,
        write: bool,
        len: u32,
        final_bit: bool,
    ) -> ScsiCommand {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let cmd = ScsiCommand {
            immediate: false,
            final_bit,
            read,
            write,
            attr: 1,
            lun: 0,
            itt: 0x100 + self.cmd_sn.0,
            expected_data_len: len,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: c,
        };
        self.cmd_sn = self.cmd_sn.next();
        cmd
    }

    fn data_out(&self, itt: u32, ttt: u32, data_sn: u32, offset: u32, final_bit: bool) -> DataOut {
        DataOut {
            final_bit,
            lun: 0,
            itt,
            ttt,
            exp_stat_sn: self.exp_stat_sn,
            data_sn: Sn(data_sn),
            buffer_offset: offset,
        }
    }

    fn nop(&self, cmd_sn: Sn, exp_stat_sn: Sn) -> PduHeader {
        PduHeader::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 0x77,
            ttt: RESERVED_TAG,
            cmd_sn,
            exp_stat_sn,
        })
    }
}

/// Waits for the violation and the close; asserts exactly `rule`.
#[track_caller]
fn flagged(target: &TargetHandle, raw: &mut Raw, rule: Rule) {
    // The target drops the connection after the violation.
    while raw.recv().is_some() {}
    let v = target.violations();
    assert_eq!(v.len(), 1, "one violation: {v:#?}");
    assert_eq!(v[0].rule, rule, "{}", v[0]);
    let text = v[0].to_string();
    assert!(
        text.contains(&format!("RFC 7143 §{}", rule.section())),
        "{text}"
    );
    println!("{text}");
}

#[test]
fn cmd_sn_outside_the_window_is_flagged() {
    let target = strict(TargetLimits::default());
    let mut raw = Raw::new(&target);
    raw.cmd_sn = Sn(raw.cmd_sn.0 + 5);
    let c = raw.command(&[0; 6], false, false, 0, true);
    raw.send(&Raw::pdu(&PduHeader::ScsiCommand(c), &[]));
    flagged(&target, &mut raw, Rule::CmdSnWindow);
}

#[test]
fn immediate_pdu_with_another_cmd_sn_is_flagged() {
    let target = strict(TargetLimits::default());
    let mut raw = Raw::new(&target);
    let h = raw.nop(Sn(raw.cmd_sn.0 + 3), raw.exp_stat_sn);
    raw.send(&Raw::pdu(&h, &[]));
    flagged(&target, &mut raw, Rule::ImmediateCmdSn);
}

#[test]
fn exp_stat_sn_ahead_of_the_target_is_flagged() {
    let target = strict(TargetLimits::default());
    let mut raw = Raw::new(&target);
    let h = raw.nop(raw.cmd_sn, Sn(raw.exp_stat_sn.0 + 10));
    raw.send(&Raw::pdu(&h, &[]));
    flagged(&target, &mut raw, Rule::ExpStatSn);
}

#[test]
fn data_sn_out_of_order_is_flagged() {
    let target = strict(limits(false, false, 65536, 65536, 65536, 1));
    let mut raw = Raw::new(&target);
    let c = raw.command(&rw10(0x2a, 0, 8), false, true, 4096, false);
    let itt = c.itt;
    raw.send(&Raw::pdu(&PduHeader::ScsiCommand(c), &[]));
    // The first Data-Out of the sequence must be DataSN 0.
    let d = raw.data_out(itt, RESERVED_TAG, 1, 0, true);
    raw.send(&Raw::pdu(&PduHeader::DataOut(d), &[0u8; 4096]));
    flagged(&target, &mut raw, Rule::DataSnOrder);
}

#[test]
fn segment_over_max_recv_data_segment_length_is_flagged() {
    let target = strict(limits(false, true, 4096, 65536, 65536, 1));
    let mut raw = Raw::new(&target);
    let c = raw.command(&rw10(0x2a, 0, 16), false, true, 8192, true);
    raw.send(&Raw::pdu(&PduHeader::ScsiCommand(c), &[0u8; 8192]));
    flagged(&target, &mut raw, Rule::MaxRecvDataSegmentLength);
}

#[test]
fn unsolicited_data_over_first_burst_length_is_flagged() {
    let target = strict(limits(false, true, 65536, 4096, 65536, 1));
    let mut raw = Raw::new(&target);
    let c = raw.command(&rw10(0x2a, 0, 16), false, true, 8192, true);
    raw.send(&Raw::pdu(&PduHeader::ScsiCommand(c), &[0u8; 8192]));
    flagged(&target, &mut raw, Rule::FirstBurstLength);
}

#[test]
fn data_out_beyond_its_r2t_is_flagged() {
    let target = strict(limits(true, false, 65536, 4096, 4096, 1));
    let mut raw = Raw::new(&target);
    let c = raw.command(&rw10(0x2a, 0, 16), false, true, 8192, true);
    let itt = c.itt;
    raw.send(&Raw::pdu(&PduHeader::ScsiCommand(c), &[]));
    let Some(PduHeader::R2t(r2t)) = raw.recv() else {
        panic!("no R2T")
    };
    assert_eq!(r2t.desired_len, 4096);
    // 8 KiB for an R2T of 4 KiB (MaxBurstLength 4096).
    let d = raw.data_out(itt, r2t.ttt, 0, 0, true);
    raw.send(&Raw::pdu(&PduHeader::DataOut(d), &[0u8; 8192]));
    flagged(&target, &mut raw, Rule::MaxBurstLength);
}

#[test]
fn unsolicited_data_out_with_initial_r2t_is_flagged() {
    let target = strict(limits(true, false, 65536, 65536, 65536, 1));
    let mut raw = Raw::new(&target);
    let c = raw.command(&rw10(0x2a, 0, 8), false, true, 4096, true);
    let itt = c.itt;
    raw.send(&Raw::pdu(&PduHeader::ScsiCommand(c), &[]));
    let d = raw.data_out(itt, RESERVED_TAG, 0, 0, true);
    raw.send(&Raw::pdu(&PduHeader::DataOut(d), &[0u8; 4096]));
    flagged(&target, &mut raw, Rule::UnsolicitedData);
}

#[test]
fn missing_final_bit_is_flagged() {
    let target = strict(TargetLimits::default());
    let mut raw = Raw::new(&target);
    // A read without the F bit: nothing unsolicited can follow it.
    let c = raw.command(&rw10(0x28, 0, 8), true, false, 4096, false);
    raw.send(&Raw::pdu(&PduHeader::ScsiCommand(c), &[]));
    flagged(&target, &mut raw, Rule::FinalBit);
}

#[test]
fn final_bit_missing_at_the_end_of_an_r2t_sequence_is_flagged() {
    let target = strict(limits(true, false, 65536, 4096, 4096, 1));
    let mut raw = Raw::new(&target);
    let c = raw.command(&rw10(0x2a, 0, 8), false, true, 4096, true);
    let itt = c.itt;
    raw.send(&Raw::pdu(&PduHeader::ScsiCommand(c), &[]));
    let Some(PduHeader::R2t(r2t)) = raw.recv() else {
        panic!("no R2T")
    };
    let d = raw.data_out(itt, r2t.ttt, 0, 0, false);
    raw.send(&Raw::pdu(&PduHeader::DataOut(d), &[0u8; 4096]));
    flagged(&target, &mut raw, Rule::FinalBit);
}

#[test]
fn reserved_bits_set_are_flagged() {
    let target = strict(TargetLimits::default());
    let mut raw = Raw::new(&target);
    let h = raw.nop(raw.cmd_sn, raw.exp_stat_sn);
    let mut bytes = Raw::pdu(&h, &[]);
    bytes[2] = 0x01; // NOP-Out bytes 2-3 are reserved
    raw.send(&bytes);
    flagged(&target, &mut raw, Rule::ReservedZero);
}

/// The same broken stream with strict mode off: no violation recorded (a
/// gap in CmdSN is only logged), and the connection keeps working.
#[test]
fn strict_mode_off_records_nothing() {
    let target = Target::start(TargetConfig::ram(IQN, 16 << 20)).unwrap();
    let mut raw = Raw::new(&target);
    let h = raw.nop(raw.cmd_sn, raw.exp_stat_sn);
    let mut bytes = Raw::pdu(&h, &[]);
    bytes[2] = 0x01;
    raw.send(&bytes);
    assert!(matches!(raw.recv(), Some(PduHeader::NopIn(_))));
    assert!(target.violations().is_empty());
}
