//! A malicious or broken target must never make the initiator panic, hang,
//! allocate without bound, or write outside the caller's buffer.
//!
//! Each test runs a scripted fake target on a loopback `TcpListener` in a
//! thread: it performs a valid login (or a broken one), then misbehaves in
//! one specific way. The real `Session` (and `LunHandle`) drive the
//! initiator side over the kernel TCP transport. Every test asserts the
//! error names the problem, and that it came within a bounded time.

use iscsi_bypass::iscsi::chap::{Credentials, Secret};
use iscsi_bypass::iscsi::connection::{Command, ConnError, ConnTimers, Direction, Event};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::mcs::{McsError, McsSession};
use iscsi_bypass::iscsi::params::DigestKind;
use iscsi_bypass::iscsi::session::{Session, SessionConfig, SessionError};
use iscsi_bypass::scsi::lun::LunHandle;
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use iscsi_bypass::wire::iscsi::*;
use iscsi_bypass::wire::text::TextPairs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const INITIATOR: &str = "iqn.2026-11.org.iscsi-bypass:hostile-test";
const TARGET: &str = "iqn.2026-11.org.iscsi-bypass:hostile-target";
/// Our MaxRecvDataSegmentLength in these tests.
const OUR_MRDSL: u32 = 8192;
/// Every initiator-side wait in these tests is at most this long.
const SHORT: Duration = Duration::from_secs(2);
/// Every test must finish within this.
const BOUND: Duration = Duration::from_secs(6);

// ---------------------------------------------------------------------------
// The fake target

/// The target end of one connection, with blocking reads that give up after
/// a few seconds so a script can never hang the test.
struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
    digests: Digests,
    stat_sn: Sn,
    exp_cmd_sn: Sn,
    /// The MaxCmdSN the target advertises in every PDU.
    max_cmd_sn: Sn,
    /// The largest MaxCmdSN ever advertised (for window checks).
    max_advertised: Sn,
    /// CmdSNs of every SCSI Command received.
    cmd_sns: Vec<Sn>,
    /// Set when the initiator sent a command outside the advertised window.
    window_violation: Option<String>,
}

/// How the scripted login negotiates.
#[derive(Clone)]
struct LoginScript {
    /// Answers replacing the default echo, or extra keys to send.
    answers: Vec<(&'static str, String)>,
    /// Commands the target lets in after login (MaxCmdSN - ExpCmdSN + 1).
    window: u32,
}

impl Default for LoginScript {
    fn default() -> Self {
        LoginScript {
            answers: Vec::new(),
            window: 32,
        }
    }
}

impl Peer {
    fn new(stream: TcpStream) -> Peer {
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Peer {
            stream,
            buf: Vec::new(),
            digests: Digests::default(),
            stat_sn: Sn(0x100),
            exp_cmd_sn: Sn(1),
            max_cmd_sn: Sn(1),
            max_advertised: Sn(1),
            cmd_sns: Vec::new(),
            window_violation: None,
        }
    }

    /// The next PDU from the initiator, or None after `wait` without one
    /// (or on EOF).
    fn recv_within(&mut self, wait: Duration) -> Option<(PduHeader, Vec<u8>)> {
        let framer = PduFramer {
            digests: self.digests,
            max_data_segment_len: MAX_DATA_SEGMENT_LEN,
        };
        let deadline = Instant::now() + wait;
        loop {
            if let Some(f) = framer.frame(&self.buf).expect("initiator sent a bad PDU") {
                let data = self.buf[f.data.clone()].to_vec();
                self.buf.drain(..f.total_len);
                if let PduHeader::ScsiCommand(c) = &f.header {
                    if c.cmd_sn.gt(self.max_advertised) {
                        self.window_violation = Some(format!(
                            "CmdSN {} sent while MaxCmdSN was {}",
                            c.cmd_sn, self.max_advertised
                        ));
                    }
                    self.cmd_sns.push(c.cmd_sn);
                }
                return Some((f.header, data));
            }
            if Instant::now() >= deadline {
                return None;
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
        }
    }

    fn recv(&mut self) -> Option<(PduHeader, Vec<u8>)> {
        self.recv_within(Duration::from_secs(3))
    }

    /// The next SCSI Command (NOP-Outs and Data-Outs are skipped).
    fn next_command(&mut self) -> Option<(ScsiCommand, Vec<u8>)> {
        loop {
            match self.recv()? {
                (PduHeader::ScsiCommand(c), d) => {
                    if c.cmd_sn.ge(self.exp_cmd_sn) {
                        self.exp_cmd_sn = c.cmd_sn.next();
                    }
                    return Some((c, d));
                }
                _ => continue,
            }
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    fn send(&mut self, h: &PduHeader, data: &[u8]) {
        let mut v = Vec::new();
        encode_pdu(&mut v, h, data, self.digests);
        self.send_raw(&v);
    }

    fn take_stat_sn(&mut self) -> Sn {
        let s = self.stat_sn;
        self.stat_sn = s.next();
        s
    }

    fn advertise(&mut self, max: Sn) {
        self.max_cmd_sn = max;
        if max.gt(self.max_advertised) {
            self.max_advertised = max;
        }
    }

    fn login_response(
        &mut self,
        req: &LoginRequest,
        transit: bool,
        nsg: Stage,
        pairs: &[(&str, String)],
    ) -> (LoginResponse, Vec<u8>) {
        let mut t = TextPairs::new();
        for (k, v) in pairs {
            t.push(k, v.clone());
        }
        let stat_sn = self.take_stat_sn();
        (
            LoginResponse {
                transit,
                cont: false,
                csg: req.csg,
                nsg,
                version_max: 0,
                version_active: 0,
                isid: req.isid,
                tsih: if transit && nsg == Stage::FullFeature {
                    7
                } else {
                    0
                },
                itt: req.itt,
                stat_sn,
                exp_cmd_sn: req.cmd_sn,
                max_cmd_sn: req.cmd_sn,
                status_class: 0,
                status_detail: 0,
            },
            t.to_bytes(),
        )
    }

    fn next_login_request(&mut self) -> Option<(LoginRequest, TextPairs)> {
        match self.recv()? {
            (PduHeader::LoginRequest(r), d) => Some((r, TextPairs::parse(&d).unwrap())),
            (other, _) => panic!("expected a login request, got {other:?}"),
        }
    }

    /// The security stage with AuthMethod=None: answers the first request.
    fn security_none(&mut self) -> Option<()> {
        let (req, _) = self.next_login_request()?;
        let (rsp, data) = self.login_response(
            &req,
            true,
            Stage::Operational,
            &[
                ("AuthMethod", "None".into()),
                ("TargetPortalGroupTag", "1".into()),
            ],
        );
        self.send(&PduHeader::LoginResponse(rsp), &data);
        Some(())
    }

    /// The operational stage: echoes each offer (first choice of lists),
    /// with `script.answers` replacing or adding keys.
    fn operational(&mut self, script: &LoginScript) -> Option<()> {
        let (req, offers) = self.next_login_request()?;
        let mut pairs: Vec<(&str, String)> = Vec::new();
        for (k, v) in offers.iter() {
            if let Some((_, a)) = script.answers.iter().find(|(ak, _)| *ak == k) {
                pairs.push((leak(k), a.clone()));
                continue;
            }
            let a = match k {
                "MaxRecvDataSegmentLength" => "65536".to_string(),
                "HeaderDigest" | "DataDigest" => v.split(',').next().unwrap().to_string(),
                _ => v.to_string(),
            };
            pairs.push((leak(k), a));
        }
        for (k, v) in &script.answers {
            if offers.get(k).is_none() {
                pairs.push((k, v.clone()));
            }
        }
        let (mut rsp, data) = self.login_response(&req, true, Stage::FullFeature, &pairs);
        self.exp_cmd_sn = req.cmd_sn;
        rsp.exp_cmd_sn = req.cmd_sn;
        rsp.max_cmd_sn = req.cmd_sn.plus(script.window).plus(u32::MAX);
        self.advertise(rsp.max_cmd_sn);
        self.send(&PduHeader::LoginResponse(rsp), &data);
        let pick = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v == "CRC32C")
                .unwrap_or(false)
        };
        self.digests = Digests {
            header: pick("HeaderDigest"),
            data: pick("DataDigest"),
        };
        Some(())
    }

    fn login(&mut self, script: &LoginScript) -> Option<()> {
        self.security_none()?;
        self.operational(script)
    }

    fn scsi_response(&mut self, itt: u32, status: u8) -> PduHeader {
        let stat_sn = self.take_stat_sn();
        PduHeader::ScsiResponse(ScsiResponse {
            status,
            itt,
            stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
            ..ScsiResponse::default()
        })
    }

    fn data_in(&self, itt: u32, data_sn: u32, offset: u32, status: Option<Sn>) -> DataIn {
        DataIn {
            final_bit: status.is_some(),
            ack: false,
            overflow: false,
            underflow: false,
            status_present: status.is_some(),
            status: 0,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            stat_sn: status.unwrap_or(self.stat_sn),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
            data_sn: Sn(data_sn),
            buffer_offset: offset,
            residual: 0,
        }
    }

    fn r2t(&self, itt: u32, r2t_sn: u32, offset: u32, len: u32) -> PduHeader {
        PduHeader::R2t(R2t {
            lun: 0,
            itt,
            ttt: 0x4000 + r2t_sn,
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
            r2t_sn: Sn(r2t_sn),
            buffer_offset: offset,
            desired_len: len,
        })
    }
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// Starts a fake target running `script` on its first connection. The
/// handle returns what the script returns.
fn fake_target<R: Send + 'static>(
    script: impl FnOnce(&mut Peer) -> R + Send + 'static,
) -> (SocketAddr, JoinHandle<R>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut p = Peer::new(s);
        script(&mut p)
    });
    (addr, h)
}

fn config(edit: impl FnOnce(&mut SessionConfig)) -> SessionConfig {
    let mut login = LoginConfig::new(INITIATOR, Some(TARGET));
    login.offer.max_recv_data_segment_len = OUR_MRDSL;
    let mut c = SessionConfig::new(login);
    c.login_timeout = SHORT;
    c.timers = ConnTimers {
        nop_interval: None,
        nop_timeout: SHORT,
        command_timeout: Some(SHORT),
    };
    edit(&mut c);
    c
}

fn login(addr: SocketAddr, c: &SessionConfig) -> Result<Session<KernelTcp>, SessionError> {
    let t = KernelTcp::connect(addr, &KernelTcpOptions::default()).unwrap();
    Session::login(t, c)
}

fn read_cmd(len: usize) -> Command {
    let blocks = (len / 512) as u32;
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Command::new(0, &cdb, Direction::Read, vec![0u8; len]).unwrap()
}

fn write_cmd(len: usize) -> Command {
    let blocks = (len / 512) as u32;
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a;
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Command::new(0, &cdb, Direction::Write, vec![0x5a; len]).unwrap()
}

/// Runs `f`, asserting it returns an error whose text contains every one of
/// `needles`, within the time bound.
#[track_caller]
fn expect_error<T: std::fmt::Debug, E: std::fmt::Display>(
    started: Instant,
    r: Result<T, E>,
    needles: &[&str],
) -> String {
    let elapsed = started.elapsed();
    let msg = match r {
        Ok(v) => panic!("expected an error containing {needles:?}, got Ok({v:?})"),
        Err(e) => e.to_string(),
    };
    eprintln!("initiator error after {elapsed:?}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
    assert!(elapsed < BOUND, "took {elapsed:?} to fail with {msg:?}");
    msg
}

/// Logs in against a target that runs the default login and then `after`,
/// and runs `cmd` to completion.
fn run_one<R: Send + 'static>(
    script: LoginScript,
    cmd: Command,
    after: impl FnOnce(&mut Peer) -> Option<R> + Send + 'static,
) -> (
    Result<iscsi_bypass::iscsi::connection::Completion, SessionError>,
    JoinHandle<Option<R>>,
) {
    let (addr, h) = fake_target(move |p| {
        p.login(&script)?;
        after(p)
    });
    let mut s = login(addr, &config(|_| {})).expect("login");
    let r = s.execute(cmd, SHORT);
    (r, h)
}

// ---------------------------------------------------------------------------
// Full feature phase

#[test]
fn data_segment_longer_than_our_max_recv_data_segment_length() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let (c, _) = p.next_command()?;
        // A header that announces 64 KiB; the bytes never need to come.
        let d = p.data_in(c.itt, 0, 0, None);
        let mut bhs = PduHeader::DataIn(d).emit(0, 65536);
        bhs[5..8].copy_from_slice(&[0x01, 0x00, 0x00]);
        p.send_raw(&bhs);
        Some(())
    });
    expect_error(
        t0,
        r,
        &["DataSegmentLength 65536 exceeds the negotiated maximum of 8192"],
    );
    h.join().unwrap();
}

#[test]
fn data_in_past_the_expected_transfer_length() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let (c, _) = p.next_command()?;
        let d = p.data_in(c.itt, 0, 0, None);
        p.send(&PduHeader::DataIn(d), &[0xee; 1024]);
        Some(())
    });
    expect_error(
        t0,
        r,
        &[
            "Data-In past the expected transfer length",
            "0 + 1024 > 512",
        ],
    );
    h.join().unwrap();
}

#[test]
fn data_in_at_an_offset_past_the_buffer() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(4096), |p| {
        let (c, _) = p.next_command()?;
        let d = p.data_in(c.itt, 0, u32::MAX - 10, None);
        p.send(&PduHeader::DataIn(d), &[0xee; 512]);
        Some(())
    });
    expect_error(t0, r, &["Data-In past the expected transfer length"]);
    h.join().unwrap();
}

#[test]
fn data_in_out_of_order_data_sn() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(1024), |p| {
        let (c, _) = p.next_command()?;
        let d = p.data_in(c.itt, 1, 0, None);
        p.send(&PduHeader::DataIn(d), &[1; 512]);
        Some(())
    });
    expect_error(t0, r, &["DataSN 1 out of order (expected 0)"]);
    h.join().unwrap();
}

#[test]
fn data_in_for_an_unknown_task_tag() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let _ = p.next_command()?;
        let d = p.data_in(0xdead_beef, 0, 0, None);
        p.send(&PduHeader::DataIn(d), &[1; 512]);
        Some(())
    });
    expect_error(t0, r, &["Data-In for unknown task tag 0xdeadbeef"]);
    h.join().unwrap();
}

#[test]
fn scsi_response_for_an_unknown_task_tag() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let _ = p.next_command()?;
        let rsp = p.scsi_response(0x0bad_0bad, 0);
        p.send(&rsp, &[]);
        Some(())
    });
    expect_error(t0, r, &["SCSI status for unknown task tag 0xbad0bad"]);
    h.join().unwrap();
}

#[test]
fn stat_sn_jump() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let (c, _) = p.next_command()?;
        p.stat_sn = p.stat_sn.plus(1000);
        let rsp = p.scsi_response(c.itt, 0);
        p.send(&rsp, &[]);
        Some(())
    });
    expect_error(t0, r, &["StatSN", "out of order (expected"]);
    h.join().unwrap();
}

#[test]
fn reject_of_our_command() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let (c, _) = p.next_command()?;
        let stat_sn = p.take_stat_sn();
        let rej = PduHeader::Reject(Reject {
            reason: 0x09,
            stat_sn,
            exp_cmd_sn: p.exp_cmd_sn,
            max_cmd_sn: p.max_cmd_sn,
            data_sn: Sn(0),
        });
        let rejected = PduHeader::ScsiCommand(c.clone()).emit(0, 0);
        p.send(&rej, &rejected);
        Some(c.itt)
    });
    let msg = expect_error(
        t0,
        r,
        &["target rejected a PDU: invalid PDU field (reason 0x09, task tag"],
    );
    let itt = h.join().unwrap().unwrap();
    assert!(msg.contains(&format!("{itt:#x}")), "{msg}");
}

#[test]
fn target_closes_mid_command() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(4096), |p| {
        let (c, _) = p.next_command()?;
        let d = p.data_in(c.itt, 0, 0, None);
        p.send(&PduHeader::DataIn(d), &[7; 1024]);
        let _ = p.stream.shutdown(std::net::Shutdown::Both);
        Some(())
    });
    expect_error(t0, r, &["connection closed by peer"]);
    h.join().unwrap();
}

#[test]
fn target_never_answers_a_command() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let _ = p.next_command()?;
        // Keep the connection open past the command timeout, then go.
        let _ = p.recv_within(Duration::from_secs(3));
        Some(())
    });
    expect_error(t0, r, &["timed out after 2s"]);
    h.join().unwrap();
}

#[test]
fn header_digest_error() {
    let t0 = Instant::now();
    let script = LoginScript::default();
    let (addr, h) = fake_target(move |p| {
        p.login(&script)?;
        let (c, _) = p.next_command()?;
        let rsp = p.scsi_response(c.itt, 0);
        let mut v = Vec::new();
        encode_pdu(&mut v, &rsp, &[], p.digests);
        v[20] ^= 0xff; // corrupt a header byte, keep the digest
        p.send_raw(&v);
        Some(())
    });
    let mut s = login(
        addr,
        &config(|c| {
            c.login.offer.header_digest = vec![DigestKind::Crc32c];
            c.login.offer.data_digest = vec![DigestKind::Crc32c];
        }),
    )
    .unwrap();
    assert!(s.connection().params().header_digest == DigestKind::Crc32c);
    let r = s.execute(read_cmd(512), SHORT);
    expect_error(t0, r, &["header digest mismatch"]);
    h.join().unwrap();
}

#[test]
fn data_digest_error() {
    let t0 = Instant::now();
    let script = LoginScript::default();
    let (addr, h) = fake_target(move |p| {
        p.login(&script)?;
        let (c, _) = p.next_command()?;
        let d = p.data_in(c.itt, 0, 0, Some(p.stat_sn));
        p.stat_sn = p.stat_sn.next();
        let mut v = Vec::new();
        encode_pdu(&mut v, &PduHeader::DataIn(d), &[3; 512], p.digests);
        let n = v.len();
        v[n - 10] ^= 1; // corrupt a data byte, keep the digest
        p.send_raw(&v);
        Some(())
    });
    let mut s = login(
        addr,
        &config(|c| {
            c.login.offer.header_digest = vec![DigestKind::Crc32c];
            c.login.offer.data_digest = vec![DigestKind::Crc32c];
        }),
    )
    .unwrap();
    let r = s.execute(read_cmd(512), SHORT);
    expect_error(t0, r, &["data digest mismatch"]);
    h.join().unwrap();
}

#[test]
fn r2t_for_more_than_the_command_writes() {
    let t0 = Instant::now();
    let script = LoginScript {
        answers: vec![("InitialR2T", "Yes".into()), ("ImmediateData", "No".into())],
        ..Default::default()
    };
    let (r, h) = run_one(script, write_cmd(4096), |p| {
        let (c, _) = p.next_command()?;
        let r2t = p.r2t(c.itt, 0, 0, 8192);
        p.send(&r2t, &[]);
        // The initiator must not send any Data-Out for it.
        let mut data_out = 0;
        while let Some((h, _)) = p.recv_within(Duration::from_millis(300)) {
            if matches!(h, PduHeader::DataOut(_)) {
                data_out += 1;
            }
        }
        Some(data_out)
    });
    expect_error(
        t0,
        r,
        &["R2T for bytes 0..8192, past the 4096 bytes of the command"],
    );
    assert_eq!(h.join().unwrap(), Some(0), "Data-Out sent for a bad R2T");
}

#[test]
fn r2t_beyond_max_burst_length() {
    let t0 = Instant::now();
    let script = LoginScript {
        answers: vec![
            ("InitialR2T", "Yes".into()),
            ("ImmediateData", "No".into()),
            ("MaxBurstLength", "4096".into()),
        ],
        ..Default::default()
    };
    let (r, h) = run_one(script, write_cmd(16384), |p| {
        let (c, _) = p.next_command()?;
        let r2t = p.r2t(c.itt, 0, 0, 8192);
        p.send(&r2t, &[]);
        Some(())
    });
    expect_error(t0, r, &["R2T asks for 8192 bytes; MaxBurstLength is 4096"]);
    h.join().unwrap();
}

#[test]
fn r2t_for_a_read_command() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(4096), |p| {
        let (c, _) = p.next_command()?;
        let r2t = p.r2t(c.itt, 0, 0, 4096);
        p.send(&r2t, &[]);
        Some(())
    });
    expect_error(t0, r, &["which writes no data"]);
    h.join().unwrap();
}

#[test]
fn max_cmd_sn_going_backwards_never_widens_what_we_send() {
    // Login opens a window of 3 commands; the target then answers the first
    // with a MaxCmdSN that goes backwards. The initiator must keep to what
    // was advertised: never a CmdSN beyond the largest MaxCmdSN seen.
    let t0 = Instant::now();
    let script = LoginScript {
        window: 3,
        ..Default::default()
    };
    let (addr, h) = fake_target(move |p| {
        p.login(&script)?;
        let (c, _) = p.next_command()?;
        // Backwards: MaxCmdSN = ExpCmdSN - 1 (a closed window) after having
        // advertised ExpCmdSN + 2.
        p.max_cmd_sn = c.cmd_sn;
        let rsp = p.scsi_response(c.itt, 0);
        p.send(&rsp, &[]);
        // Count what arrives while the window is (claimed) closed.
        let mut seen = vec![c.cmd_sn];
        while let Some((h, _)) = p.recv_within(Duration::from_millis(400)) {
            if let PduHeader::ScsiCommand(c) = h {
                seen.push(c.cmd_sn);
            }
        }
        // Now open the window wide and answer everything.
        p.advertise(p.exp_cmd_sn.plus(100));
        let nop = PduHeader::NopIn(NopIn {
            lun: 0,
            itt: RESERVED_TAG,
            ttt: RESERVED_TAG,
            stat_sn: p.stat_sn,
            exp_cmd_sn: p.exp_cmd_sn,
            max_cmd_sn: p.max_cmd_sn,
        });
        p.send(&nop, &[]);
        let all = p.cmd_sns.clone();
        Some((seen, all, p.window_violation.clone(), p.max_advertised))
    });
    let mut s = login(addr, &config(|_| {})).unwrap();
    for tag in 0..6 {
        let mut c = Command::new(0, &[0, 0, 0, 0, 0, 0], Direction::None, Vec::new()).unwrap();
        c.user_tag = tag;
        s.submit(c).unwrap();
    }
    let mut done = 0;
    let deadline = Instant::now() + SHORT;
    while Instant::now() < deadline && done < 1 {
        if let Ok(Some(Event::Completed(_))) = s.next_event(Duration::from_millis(100)) {
            done += 1;
        }
    }
    // Pump a while so anything the initiator would send goes out.
    let _ = s.next_event(Duration::from_millis(300));
    let (seen, all, violation, max) = h.join().unwrap().expect("target script");
    assert_eq!(violation, None);
    assert!(all.iter().all(|sn| sn.le(max)), "{all:?} vs {max}");
    // 3 fit the first window; nothing more until the window opened.
    assert_eq!(seen.len(), 3, "commands sent: {seen:?}");
    assert!(t0.elapsed() < BOUND);
}

#[test]
fn async_message_dropping_the_connection() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let _ = p.next_command()?;
        let stat_sn = p.take_stat_sn();
        let a = PduHeader::AsyncMessage(AsyncMessage {
            lun: 0,
            stat_sn,
            exp_cmd_sn: p.exp_cmd_sn,
            max_cmd_sn: p.max_cmd_sn,
            event: 3,
            vcode: 0,
            param1: 0,
            param2: 2,
            param3: 0,
        });
        p.send(&a, &[]);
        Some(())
    });
    expect_error(
        t0,
        r,
        &["target announced it drops the session (AsyncEvent 3, Time2Wait 2 s"],
    );
    h.join().unwrap();
}

#[test]
fn unknown_opcode_from_the_target() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let _ = p.next_command()?;
        let mut bhs = [0u8; 48];
        bhs[0] = 0x1c;
        p.send_raw(&bhs);
        Some(())
    });
    expect_error(t0, r, &["unknown iSCSI opcode 0x1c"]);
    h.join().unwrap();
}

#[test]
fn initiator_only_pdu_from_the_target() {
    let t0 = Instant::now();
    let (r, h) = run_one(LoginScript::default(), read_cmd(512), |p| {
        let (c, _) = p.next_command()?;
        // Echo our own SCSI Command back at us.
        p.send(&PduHeader::ScsiCommand(c), &[]);
        Some(())
    });
    expect_error(t0, r, &["initiator-only PDU (SCSI Command)"]);
    h.join().unwrap();
}

#[test]
fn endless_text_response_is_bounded() {
    let t0 = Instant::now();
    let (addr, h) = fake_target(move |p| {
        p.login(&LoginScript::default())?;
        // Answer every text request with another 60 KB continuation.
        let chunk = vec![b'a'; 60_000];
        while let Some((hdr, _)) = p.recv() {
            let PduHeader::TextRequest(t) = hdr else {
                continue;
            };
            let stat_sn = p.take_stat_sn();
            let rsp = PduHeader::TextResponse(TextResponse {
                final_bit: false,
                cont: true,
                lun: 0,
                itt: t.itt,
                ttt: 0x99,
                stat_sn,
                exp_cmd_sn: t.cmd_sn.next(),
                max_cmd_sn: t.cmd_sn.plus(32),
            });
            // Larger than our MRDSL is refused at once; send legal sizes.
            for part in chunk.chunks(OUR_MRDSL as usize).take(1) {
                p.send(&rsp, part);
            }
        }
        Some(())
    });
    let mut s = login(addr, &config(|_| {})).unwrap();
    let mut req = TextPairs::new();
    req.push("SendTargets", "All");
    let r = s.text(&req, Duration::from_secs(5));
    expect_error(t0, r, &["text response larger than 1 MiB"]);
    drop(s);
    h.join().unwrap();
}

#[test]
fn lun_handle_survives_short_inquiry_data() {
    // A LunHandle on top: a 3-byte INQUIRY answer is a clear error, not a
    // panic or an out-of-bounds read.
    let t0 = Instant::now();
    let (addr, h) = fake_target(move |p| {
        p.login(&LoginScript::default())?;
        let (c, _) = p.next_command()?;
        let stat_sn = p.take_stat_sn();
        let mut d = p.data_in(c.itt, 0, 0, Some(stat_sn));
        d.underflow = true;
        d.residual = c.expected_data_len - 3;
        p.send(&PduHeader::DataIn(d), &[0, 0, 5]);
        Some(())
    });
    let s = login(addr, &config(|_| {})).unwrap();
    let mut lun = LunHandle::new(s, 0);
    lun.timeout = SHORT;
    let r = lun.inquiry();
    expect_error(t0, r, &["too short"]);
    drop(lun);
    h.join().unwrap();
}

// ---------------------------------------------------------------------------
// Login

/// Logs in against `script` run as the target, expecting an error.
#[track_caller]
fn login_fails(
    edit: impl FnOnce(&mut SessionConfig),
    script: impl FnOnce(&mut Peer) -> Option<()> + Send + 'static,
    needles: &[&str],
) -> String {
    let t0 = Instant::now();
    let (addr, h) = fake_target(script);
    let c = config(edit);
    let r = login(addr, &c);
    let msg = expect_error(t0, r, needles);
    // A panic in the script (a PDU it did not expect) fails the test.
    if let Err(panic) = h.join() {
        std::panic::resume_unwind(panic);
    }
    msg
}

#[test]
fn login_response_switching_to_a_stage_we_did_not_ask_for() {
    // We ask to go Security -> Operational; the target jumps to full feature.
    login_fails(
        |_| {},
        |p| {
            let (req, _) = p.next_login_request()?;
            let (rsp, data) = p.login_response(
                &req,
                true,
                Stage::FullFeature,
                &[("AuthMethod", "None".into())],
            );
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["target switched to stage FullFeature that we did not ask for"],
    );
}

#[test]
fn login_response_in_the_wrong_current_stage() {
    login_fails(
        |_| {},
        |p| {
            let (req, _) = p.next_login_request()?;
            let (mut rsp, data) = p.login_response(
                &req,
                true,
                Stage::FullFeature,
                &[("AuthMethod", "None".into())],
            );
            rsp.csg = Stage::Operational;
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["target answered in stage Operational while we are in Security"],
    );
}

#[test]
fn login_response_going_back_to_security() {
    login_fails(
        |_| {},
        |p| {
            p.security_none()?;
            let (req, _) = p.next_login_request()?;
            let (rsp, data) = p.login_response(&req, true, Stage::Security, &[]);
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["transit back to the security stage"],
    );
}

#[test]
fn login_response_with_t_and_c_bits() {
    login_fails(
        |_| {},
        |p| {
            let (req, _) = p.next_login_request()?;
            let (mut rsp, data) = p.login_response(
                &req,
                true,
                Stage::Operational,
                &[("AuthMethod", "None".into())],
            );
            rsp.cont = true;
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["both the T and the C bit"],
    );
}

#[test]
fn login_key_repeated() {
    login_fails(
        |_| {},
        |p| {
            p.security_none()?;
            let (req, _) = p.next_login_request()?;
            let (rsp, data) = p.login_response(
                &req,
                true,
                Stage::FullFeature,
                &[
                    ("MaxBurstLength", "65536".into()),
                    ("MaxBurstLength", "262144".into()),
                ],
            );
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["key MaxBurstLength appears twice"],
    );
}

#[test]
fn login_key_out_of_range() {
    let script = LoginScript {
        answers: vec![("MaxBurstLength", "1".into())],
        ..Default::default()
    };
    login_fails(
        |_| {},
        move |p| p.login(&script),
        &["MaxBurstLength=1", "out of range"],
    );
}

#[test]
fn login_answer_above_our_offer() {
    let script = LoginScript {
        answers: vec![("MaxBurstLength", "16777215".into())],
        ..Default::default()
    };
    login_fails(
        |_| {},
        move |p| p.login(&script),
        &["MaxBurstLength=16777215", "must not exceed the offer"],
    );
}

#[test]
fn login_target_mrdsl_out_of_range() {
    let script = LoginScript {
        answers: vec![("MaxRecvDataSegmentLength", "0".into())],
        ..Default::default()
    };
    login_fails(
        |_| {},
        move |p| p.login(&script),
        &["MaxRecvDataSegmentLength=0", "out of range"],
    );
}

#[test]
fn login_not_a_number() {
    let script = LoginScript {
        answers: vec![("FirstBurstLength", "lots".into())],
        ..Default::default()
    };
    login_fails(
        |_| {},
        move |p| p.login(&script),
        &["FirstBurstLength=lots", "not a number"],
    );
}

fn chap_config(c: &mut SessionConfig) {
    c.login.chap = Some(Credentials {
        user: "user".into(),
        secret: Secret::new(b"secretsecret".to_vec()),
    });
}

/// Answers AuthMethod=CHAP, then `chap` to our CHAP_A.
fn chap_target(chap: Vec<(&'static str, String)>) -> impl FnOnce(&mut Peer) -> Option<()> + Send {
    move |p| {
        let (req, _) = p.next_login_request()?;
        let (rsp, data) = p.login_response(
            &req,
            false,
            Stage::Security,
            &[("AuthMethod", "CHAP".into())],
        );
        p.send(&PduHeader::LoginResponse(rsp), &data);
        let (req, got) = p.next_login_request()?;
        assert_eq!(got.get("CHAP_A"), Some("8,7,6,5"), "our default offer");
        let (rsp, data) = p.login_response(&req, false, Stage::Security, &chap);
        p.send(&PduHeader::LoginResponse(rsp), &data);
        // Wait for the initiator to go.
        let _ = p.recv_within(Duration::from_millis(500));
        Some(())
    }
}

#[test]
fn chap_with_an_algorithm_we_did_not_offer() {
    login_fails(
        chap_config,
        chap_target(vec![
            ("CHAP_A", "9".into()),
            ("CHAP_I", "1".into()),
            ("CHAP_C", "0x00112233445566778899aabbccddeeff".into()),
        ]),
        &[
            "target chose CHAP_A=9, which is not one we offered",
            "SHA3-256 (8), SHA-256 (7), SHA-1 (6), MD5 (5)",
        ],
    );
}

#[test]
fn chap_algorithm_rejected_by_the_target() {
    login_fails(
        chap_config,
        chap_target(vec![("CHAP_A", "Reject".into())]),
        &[
            "no CHAP algorithm in common",
            "accepts none of them (CHAP_A=Reject)",
        ],
    );
}

#[test]
fn chap_with_a_short_challenge() {
    login_fails(
        chap_config,
        chap_target(vec![
            ("CHAP_A", "5".into()),
            ("CHAP_I", "1".into()),
            ("CHAP_C", "0x01".into()),
        ]),
        &["challenge is 1 bytes"],
    );
}

#[test]
fn chap_with_a_malformed_challenge() {
    login_fails(
        chap_config,
        chap_target(vec![
            ("CHAP_A", "5".into()),
            ("CHAP_I", "1".into()),
            ("CHAP_C", "0xzz112233445566778899aabbccddeeff".into()),
        ]),
        &["is not 0x-hex or 0b-base64"],
    );
}

#[test]
fn chap_required_without_credentials() {
    login_fails(
        |_| {},
        |p| {
            let (req, _) = p.next_login_request()?;
            let (rsp, data) = p.login_response(
                &req,
                false,
                Stage::Security,
                &[("AuthMethod", "CHAP".into())],
            );
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["target requires CHAP"],
    );
}

#[test]
fn mutual_chap_with_a_wrong_target_response() {
    login_fails(
        |c| {
            chap_config(c);
            c.login.mutual_chap = Some(Credentials {
                user: "target".into(),
                secret: Secret::new(b"targetsecret".to_vec()),
            });
        },
        |p| {
            let (req, _) = p.next_login_request()?;
            let (rsp, data) = p.login_response(
                &req,
                false,
                Stage::Security,
                &[("AuthMethod", "CHAP".into())],
            );
            p.send(&PduHeader::LoginResponse(rsp), &data);
            let (req, _) = p.next_login_request()?;
            let chap = [
                ("CHAP_A", "5".to_string()),
                ("CHAP_I", "1".into()),
                ("CHAP_C", "0x00112233445566778899aabbccddeeff".into()),
            ];
            let (rsp, data) = p.login_response(&req, false, Stage::Security, &chap);
            p.send(&PduHeader::LoginResponse(rsp), &data);
            let (req, _) = p.next_login_request()?;
            let (rsp, data) = p.login_response(
                &req,
                true,
                Stage::Operational,
                &[
                    ("CHAP_N", "target".into()),
                    ("CHAP_R", "0x0123456789abcdef0123456789abcdef".into()),
                ],
            );
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["target failed mutual CHAP"],
    );
}

#[test]
fn login_timeout_when_the_target_never_answers() {
    let msg = login_fails(
        |_| {},
        |p| {
            let _ = p.next_login_request()?;
            // Hold the connection open, silent, past the login timeout.
            let _ = p.recv_within(Duration::from_secs(3));
            Some(())
        },
        &["login timed out after 2s"],
    );
    assert!(!msg.is_empty());
}

#[test]
fn login_timeout_when_the_target_stalls_the_login_forever() {
    // The target answers every request at once but never lets us leave the
    // security stage: the login deadline must still hold.
    login_fails(
        |_| {},
        |p| {
            let deadline = Instant::now() + Duration::from_secs(4);
            while Instant::now() < deadline {
                let Some((req, _)) = p.next_login_request() else {
                    return Some(());
                };
                let (rsp, data) = p.login_response(
                    &req,
                    false,
                    Stage::Security,
                    &[("AuthMethod", "None".into())],
                );
                p.send(&PduHeader::LoginResponse(rsp), &data);
            }
            Some(())
        },
        &["login timed out after 2s"],
    );
}

#[test]
fn login_flooded_with_unsolicited_responses() {
    // Responses stream in without waiting for requests: the deadline holds
    // even though bytes never stop arriving.
    login_fails(
        |_| {},
        |p| {
            let (req, _) = p.next_login_request()?;
            let deadline = Instant::now() + Duration::from_secs(4);
            let mut n = 0u32;
            while Instant::now() < deadline {
                let (rsp, data) = p.login_response(
                    &req,
                    false,
                    Stage::Security,
                    &[("AuthMethod", "None".into())],
                );
                let mut v = Vec::new();
                encode_pdu(&mut v, &PduHeader::LoginResponse(rsp), &data, p.digests);
                if p.stream.write_all(&v).is_err() {
                    break;
                }
                n += 1;
                if n.is_multiple_of(64) {
                    // Drain what the initiator sends so it never blocks,
                    // whole PDUs only: clearing the buffer could drop half a
                    // PDU and leave the framer reading from its middle.
                    while p.recv_within(Duration::from_millis(1)).is_some() {}
                }
            }
            Some(())
        },
        &["login"],
    );
}

#[test]
fn login_text_without_end() {
    // The target keeps the C bit set forever: bounded by MAX_LOGIN_TEXT.
    login_fails(
        |_| {},
        |p| {
            let big = vec![b'x'; 8000];
            while let Some((req, _)) = p.next_login_request() {
                let (mut rsp, _) = p.login_response(&req, false, Stage::Security, &[]);
                rsp.cont = true;
                p.send(&PduHeader::LoginResponse(rsp), &big);
            }
            Some(())
        },
        &["more than 65536 bytes of login text"],
    );
}

#[test]
fn login_response_with_the_wrong_task_tag() {
    login_fails(
        |_| {},
        |p| {
            let (req, _) = p.next_login_request()?;
            let (mut rsp, data) = p.login_response(
                &req,
                true,
                Stage::Operational,
                &[("AuthMethod", "None".into())],
            );
            rsp.itt = 0x1234;
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["login response for task tag 0x1234, expected 0x0"],
    );
}

#[test]
fn non_login_pdu_during_login() {
    login_fails(
        |_| {},
        |p| {
            let _ = p.next_login_request()?;
            let rsp = p.scsi_response(0, 0);
            p.send(&rsp, &[]);
            Some(())
        },
        &["target sent a SCSI Response PDU during login"],
    );
}

#[test]
fn login_data_segment_too_long() {
    login_fails(
        |_| {},
        |p| {
            let (req, _) = p.next_login_request()?;
            let (rsp, _) = p.login_response(&req, true, Stage::Operational, &[]);
            let mut bhs = PduHeader::LoginResponse(rsp).emit(0, 0);
            bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
            p.send_raw(&bhs);
            Some(())
        },
        &["DataSegmentLength 16777215 exceeds the negotiated maximum"],
    );
}

#[test]
fn login_authentication_failure_status() {
    login_fails(
        |_| {},
        |p| {
            let (req, _) = p.next_login_request()?;
            let (mut rsp, data) = p.login_response(&req, false, Stage::Security, &[]);
            rsp.status_class = 2;
            rsp.status_detail = 1;
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["authentication failed (status 0x0201)"],
    );
}

#[test]
fn login_unsupported_version() {
    login_fails(
        |_| {},
        |p| {
            let (req, _) = p.next_login_request()?;
            let (mut rsp, data) = p.login_response(&req, true, Stage::Operational, &[]);
            rsp.version_active = 9;
            p.send(&PduHeader::LoginResponse(rsp), &data);
            Some(())
        },
        &["unsupported iSCSI version"],
    );
}

#[test]
fn target_closes_during_login() {
    login_fails(
        |_| {},
        |p| {
            let _ = p.next_login_request()?;
            let _ = p.stream.shutdown(std::net::Shutdown::Both);
            Some(())
        },
        &["connection closed by peer"],
    );
}

// ---------------------------------------------------------------------------
// MC/S: two connections of one session (#14)

/// Accepts one connection within `BOUND`, blocking again once accepted.
fn accept_within(l: &TcpListener) -> Option<TcpStream> {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + BOUND;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    }
}

/// A fake MC/S target: its first connection runs `lead`, its second
/// `more`, each on a thread of its own. The second counts StatSN from
/// 0x900 (StatSN is per connection).
fn fake_mcs_target<A: Send + 'static, B: Send + 'static>(
    lead: impl FnOnce(&mut Peer) -> Option<A> + Send + 'static,
    more: impl FnOnce(&mut Peer) -> Option<B> + Send + 'static,
) -> (SocketAddr, JoinHandle<Option<A>>, JoinHandle<Option<B>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<TcpListener>();
    let a = std::thread::spawn(move || {
        let s = accept_within(&l)?;
        tx.send(l).ok()?;
        lead(&mut Peer::new(s))
    });
    let b = std::thread::spawn(move || {
        let l = rx.recv_timeout(BOUND).ok()?;
        let mut p = Peer::new(accept_within(&l)?);
        p.stat_sn = Sn(0x900);
        more(&mut p)
    });
    (addr, a, b)
}

fn mcs_login_script() -> LoginScript {
    LoginScript {
        answers: vec![("MaxConnections", "2".into())],
        ..Default::default()
    }
}

/// Opens the MC/S session (leading login, then CID 1) and submits a
/// 512-byte read on each connection: tag 1 on CID 0, tag 2 on CID 1.
fn mcs_two_reads(addr: SocketAddr) -> McsSession<KernelTcp> {
    let c = config(|c| c.login.offer.max_connections = 4);
    let dial = || KernelTcp::connect(addr, &KernelTcpOptions::default()).unwrap();
    let mut s = McsSession::open(dial(), &c).expect("leading login");
    assert_eq!(s.granted(), 2);
    s.add_connection(dial(), 1).expect("second connection");
    for (cid, tag) in [(0, 1), (1, 2)] {
        let mut r = read_cmd(512);
        r.user_tag = tag;
        s.submit_on(cid, r).unwrap();
    }
    s
}

/// Runs the session until CID 1 has failed and CID 0's read is done;
/// returns the failure, and the completion with the CID it came on.
fn mcs_failure_and_completion(
    s: &mut McsSession<KernelTcp>,
    t0: Instant,
) -> (McsError, (u16, u64, Vec<u8>)) {
    let (mut failed, mut done) = (None, None);
    while failed.is_none() || done.is_none() {
        assert!(t0.elapsed() < BOUND, "failed {failed:?}, done {done:?}");
        match s.next_event(SHORT) {
            Ok(Some((cid, Event::Completed(c)))) => done = Some((cid, c.user_tag, c.buffer)),
            Ok(Some(_)) => {}
            Ok(None) => panic!("no event: failed {failed:?}, done {done:?}"),
            Err(e) => failed = Some(e),
        }
    }
    (failed.unwrap(), done.unwrap())
}

/// #14: a response that arrives on the wrong connection. Connection CID 1
/// gets a SCSI Response for the task of CID 0 (its ITT names connection
/// #0): CID 1 fails with a typed error naming both (RFC 7143 §5.1), its
/// own read comes back to be retried, and CID 0's read completes on CID 0
/// when its answer comes there: nothing is lost.
#[test]
fn mcs_response_on_the_wrong_connection() {
    let t0 = Instant::now();
    let (itt_tx, itt_rx) = std::sync::mpsc::channel::<u32>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (addr, a, b) = fake_mcs_target(
        move |p| {
            p.login(&mcs_login_script())?;
            let (c, _) = p.next_command()?;
            itt_tx.send(c.itt).ok()?;
            go_rx.recv_timeout(BOUND).ok()?;
            let stat_sn = p.take_stat_sn();
            let d = p.data_in(c.itt, 0, 0, Some(stat_sn));
            p.send(&PduHeader::DataIn(d), &[0xa1; 512]);
            let _ = p.recv_within(SHORT);
            Some(())
        },
        move |p| {
            p.login(&LoginScript::default())?;
            let _ = p.next_command()?;
            let theirs = itt_rx.recv_timeout(BOUND).ok()?;
            let rsp = p.scsi_response(theirs, 0);
            p.send(&rsp, &[]);
            go_tx.send(()).ok()?;
            let _ = p.recv_within(SHORT);
            Some(theirs)
        },
    );
    let mut s = mcs_two_reads(addr);
    let (e, (cid, tag, buf)) = mcs_failure_and_completion(&mut s, t0);
    let msg = e.to_string();
    assert!(
        matches!(
            &e,
            McsError::ConnectionFailed {
                cid: 1,
                source: SessionError::Connection(ConnError::WrongConnection {
                    what: "SCSI status",
                    cid: 1,
                    owner: 0,
                    ..
                })
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("belongs to connection #0") && msg.contains("§5.1"),
        "{msg}"
    );
    assert_eq!((cid, tag, buf), (0, 1, vec![0xa1; 512]));
    let back = s.take_failed(1).expect("CID 1 failed");
    assert_eq!(back.iter().map(|c| c.user_tag).collect::<Vec<_>>(), [2]);
    assert_eq!(s.cids(), [0]);
    a.join().unwrap().expect("lead script");
    let theirs = b.join().unwrap().expect("second script");
    assert_eq!(theirs & 0xf000, 0, "the ITT was connection #0's");
}

/// #14: a StatSN per connection that jumps. Each connection counts its own
/// StatSN (0x100.. and 0x900.. here); CID 1's jumps by 1000: CID 1 fails
/// with the typed StatSN error naming it, its read comes back, and CID 0
/// goes on: its read completes.
#[test]
fn mcs_stat_sn_jump_on_one_connection() {
    let t0 = Instant::now();
    let (addr, a, b) = fake_mcs_target(
        move |p| {
            p.login(&mcs_login_script())?;
            let (c, _) = p.next_command()?;
            let stat_sn = p.take_stat_sn();
            let d = p.data_in(c.itt, 0, 0, Some(stat_sn));
            p.send(&PduHeader::DataIn(d), &[0xa2; 512]);
            let _ = p.recv_within(SHORT);
            Some(())
        },
        move |p| {
            p.login(&LoginScript::default())?;
            let (c, _) = p.next_command()?;
            p.stat_sn = p.stat_sn.plus(1000);
            let rsp = p.scsi_response(c.itt, 0);
            p.send(&rsp, &[]);
            let _ = p.recv_within(SHORT);
            Some(())
        },
    );
    let mut s = mcs_two_reads(addr);
    let (e, done) = mcs_failure_and_completion(&mut s, t0);
    match &e {
        McsError::ConnectionFailed {
            cid: 1,
            source:
                SessionError::Connection(ConnError::StatSn {
                    cid: 1,
                    expected,
                    got,
                }),
        } => assert_eq!(got.diff(*expected), 1000, "{e}"),
        other => panic!("expected CID 1's StatSN jump, got {other}"),
    }
    assert!(e.to_string().contains("on connection CID 1"), "{e}");
    assert_eq!(done, (0, 1, vec![0xa2; 512]));
    let back = s.take_failed(1).expect("CID 1 failed");
    assert_eq!(back.iter().map(|c| c.user_tag).collect::<Vec<_>>(), [2]);
    a.join().unwrap().expect("lead script");
    b.join().unwrap().expect("second script");
}
