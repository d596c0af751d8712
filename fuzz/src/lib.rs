//! Bodies of the fuzz targets, one function per target: every parser that
//! sees network bytes has one (`docs/fuzzing.md`, `docs/architecture.md`).
//!
//! `fuzz_targets/<name>.rs` hands libFuzzer's input to the function of the
//! same name; `tests/replay.rs` runs the committed corpora and a
//! deterministic pseudo-random stream through the same functions on stable
//! Rust, so the properties are checked even where cargo-fuzz cannot run.
//!
//! Every function must not panic on any input, except through the asserts
//! that state the property it checks.

use iscsi_bypass::iscsi::chap;
use iscsi_bypass::iscsi::connection::{
    Command, ConnTimers, Connection, Direction, Event, SubmitError,
};
use iscsi_bypass::iscsi::discovery::{parse_send_targets, Portal};
use iscsi_bypass::iscsi::login::{
    Login, LoginConfig, LoginOutcome, LoginProgress, SessionType, LOGIN_MAX_DATA,
};
use iscsi_bypass::iscsi::params::{DigestKind, Params};
use iscsi_bypass::iscsi::url::IscsiUrl;
use iscsi_bypass::wire::iscsi::{
    encode_pdu, Bhs, Digests, PduFramer, PduHeader, Sn, MAX_DATA_SEGMENT_LEN, RESERVED_TAG,
};
use iscsi_bypass::wire::scsi::{
    BlockLimits, Cdb, CdbRepr, DataRepr, DeviceIdentification, InquiryData,
    LogicalBlockProvisioning, ModeSense10Data, ReadCapacity10Data, ReadCapacity16Data,
    ReportLunsData, SenseData, SupportedVpdPages, TargetPortGroupsData, UnitSerialNumber,
    UnmapParameterList,
};
use iscsi_bypass::wire::text::TextPairs;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::time::{Duration, Instant};

/// Reads configuration bytes off the front of an input; zeros once it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

// ---------------------------------------------------------------------------
// wire::iscsi

/// Frames a byte stream into PDUs with every digest/limit setting; whatever
/// frames re-encodes (header emit + `encode_pdu`) to bytes that frame to the
/// same header and data, and header parse→emit→parse is stable.
pub fn iscsi_pdu(data: &[u8]) {
    let mut input = Input(data);
    let cfg = input.u8();
    let digests = Digests {
        header: cfg & 1 != 0,
        data: cfg & 2 != 0,
    };
    let max = [512, 8192, 65536, MAX_DATA_SEGMENT_LEN][(cfg >> 2) as usize & 3];
    let framer = PduFramer {
        digests,
        max_data_segment_len: max,
    };
    let mut buf = input.rest();
    // Header parsing on its own, at every offset of the first bytes.
    for at in 0..buf.len().min(8) {
        if let Ok(b) = Bhs::new_checked(&buf[at..]) {
            header_round_trip(&b);
        }
    }
    while let Ok(Some(f)) = framer.frame(buf) {
        assert!(f.total_len >= 48 && f.total_len <= buf.len(), "{f:?}");
        assert!(f.ahs.end <= f.data.start && f.data.end <= f.total_len);
        assert!(f.data.len() as u32 <= max);
        let payload = &buf[f.data.clone()];
        header_round_trip(&Bhs::new_checked(buf).expect("framed"));
        // Our encoder writes no AHS; with none, the bytes must match too.
        let mut again = Vec::new();
        encode_pdu(&mut again, &f.header, payload, digests);
        let g = framer
            .frame(&again)
            .expect("re-encoded PDU frames")
            .expect("re-encoded PDU is complete");
        assert_eq!(g.header, f.header);
        assert_eq!(&again[g.data.clone()], payload);
        assert_eq!(g.total_len, again.len());
        if f.ahs.is_empty() {
            assert_eq!(g.total_len, f.total_len);
        }
        buf = &buf[f.total_len..];
    }
}

fn header_round_trip(b: &Bhs<'_>) {
    let _ = format!("{b:?}");
    if let Ok(h) = PduHeader::parse(b) {
        let bytes = h.emit(b.total_ahs_len(), b.data_segment_len());
        let h2 = PduHeader::parse(&Bhs::new_checked(&bytes).expect("48 bytes")).expect("re-parse");
        assert_eq!(h, h2);
        let _ = h.opcode().to_string();
    }
}

// ---------------------------------------------------------------------------
// wire::text

/// Text pairs: parse never panics; what parses re-emits to the same pairs.
pub fn text(data: &[u8]) {
    let parsed = TextPairs::parse(data);
    let unique = TextPairs::parse_unique(data);
    if let Ok(u) = &unique {
        assert_eq!(
            Ok(u),
            parsed.as_ref(),
            "parse_unique accepted more than parse"
        );
    }
    if let Ok(t) = parsed {
        let bytes = t.to_bytes();
        assert_eq!(TextPairs::parse(&bytes), Ok(t.clone()));
        for (k, v) in t.iter() {
            assert!(!k.is_empty() && !k.contains('=') && !k.contains('\0'));
            assert!(!v.contains('\0'));
        }
    }
    if let Err(e) = TextPairs::parse(data) {
        // Error text is bounded even for huge inputs.
        assert!(e.to_string().len() < 512, "{e}");
    }
}

// ---------------------------------------------------------------------------
// wire::scsi

/// Whatever parses re-emits to bytes that parse back to the same value, and
/// `emit` refuses a buffer one byte short.
fn stable<T: DataRepr + PartialEq + Debug>(b: &[u8]) -> Option<T> {
    let v = T::parse(b).ok()?;
    let again = v.to_vec();
    assert_eq!(again.len(), v.buffer_len());
    assert_eq!(T::parse(&again).as_ref(), Ok(&v), "re-emitted {again:02x?}");
    let mut small = vec![0u8; v.buffer_len().saturating_sub(1)];
    assert!(v.emit(&mut small).is_err() || v.buffer_len() == 0);
    let mut big = vec![0xa5u8; v.buffer_len() + 7];
    assert_eq!(v.emit(&mut big), Ok(v.buffer_len()));
    assert!(
        big[v.buffer_len()..].iter().all(|&x| x == 0xa5),
        "emit wrote past buffer_len"
    );
    Some(v)
}

/// SCSI data-in structures; the first byte picks the structure.
pub fn scsi_data(data: &[u8]) {
    let mut input = Input(data);
    let which = input.u8();
    let b = input.rest();
    match which % 13 {
        0 => {
            if let Some(d) = stable::<InquiryData>(b) {
                let _ = (d.vendor_str(), d.product_str(), d.revision_str());
            }
        }
        1 => {
            if let Some(p) = stable::<SupportedVpdPages>(b) {
                let _ = p.supports(0x83);
            }
        }
        2 => {
            if let Some(s) = stable::<UnitSerialNumber>(b) {
                let _ = s.serial_str();
            }
        }
        3 => {
            if let Some(d) = stable::<DeviceIdentification>(b) {
                for x in &d.designators {
                    let _ = (x.to_string(), x.naa_type(), x.lu_identity_rank());
                }
                let _ = (d.lu_designator(), d.relative_target_port());
                let _ = (d.target_port_group(), d.target_port_name());
            }
        }
        4 => {
            stable::<BlockLimits>(b);
        }
        5 => {
            stable::<LogicalBlockProvisioning>(b);
        }
        6 => {
            if let Some(c) = stable::<ReadCapacity10Data>(b) {
                let _ = (c.needs_rc16(), c.block_count());
            }
        }
        7 => {
            if let Some(c) = stable::<ReadCapacity16Data>(b) {
                let _ = (c.block_count(), c.physical_block_len());
            }
        }
        8 => {
            let _ = ReportLunsData::required_len(b);
            if let Some(r) = stable::<ReportLunsData>(b) {
                for l in &r.luns {
                    let _ = (l.to_string(), l.number(), l.address());
                }
            }
        }
        9 => {
            if let Some(t) = stable::<TargetPortGroupsData>(b) {
                for g in &t.groups {
                    let _ = g.state.to_string();
                }
                let _ = (t.group_of_port(1), t.group(1));
            }
        }
        10 => {
            if let Some(m) = stable::<ModeSense10Data>(b) {
                let _ = (m.write_cache_enabled(), m.page(8, None));
            }
        }
        11 => {
            stable::<UnmapParameterList>(b);
        }
        _ => sense(b),
    }
}

/// CDB decoding: what parses re-emits to the same command.
pub fn cdb(data: &[u8]) {
    if let Ok(r) = CdbRepr::parse(data) {
        let c = r.emit();
        assert_eq!(c.len(), r.buffer_len());
        assert_eq!(Cdb::parse(c.as_slice()), Ok(r), "{r:?}");
        assert_eq!(r.opcode(), c.opcode());
        let _ = (r.to_string(), r.allocation_len(), r.lba_range());
    }
    if let Ok(c) = Cdb::from_slice(data) {
        assert_eq!(c.as_slice(), &data[..c.len()]);
        let _ = c.repr();
    }
}

/// Sense data and the status/sense classification built on it.
pub fn sense(data: &[u8]) {
    if let Some(s) = stable::<SenseData>(data) {
        let _ = (s.to_string(), s.text(), s.field_pointer(), s.progress());
        let _ = (s.code(), s.response_code());
        let _ = iscsi_bypass::scsi::classify_sense(&s);
    }
    if let Some((&status, sense)) = data.split_first() {
        if let Err(e) = iscsi_bypass::scsi::check_status(status, sense) {
            let _ = (e.to_string(), e.is_retryable(), e.unit_attention());
        }
    }
}

// ---------------------------------------------------------------------------
// iscsi::login

pub const FUZZ_ISID: [u8; 6] = [0x80, 0, 0, 0, 0, 1];

/// The login configuration a fuzz_login input selects with its first byte.
pub fn login_config(cfg: u8) -> LoginConfig {
    let creds = |u: &str, s: &str| chap::Credentials {
        user: u.into(),
        secret: chap::Secret::new(s.as_bytes()),
    };
    let mut c = if cfg & 4 != 0 {
        LoginConfig::new("iqn.2024-01.org.example:initiator", None)
    } else {
        LoginConfig::new(
            "iqn.2024-01.org.example:initiator",
            Some("iqn.2024-01.org.example:target"),
        )
    };
    c.isid = FUZZ_ISID;
    match cfg & 3 {
        1 => c.chap = Some(creds("user", "secretsecret")),
        2 => {
            c.chap = Some(creds("user", "secretsecret"));
            c.mutual_chap = Some(creds("target", "targetsecret"));
        }
        _ => {}
    }
    if cfg & 8 != 0 {
        c.offer.header_digest = vec![DigestKind::Crc32c, DigestKind::None];
        c.offer.data_digest = vec![DigestKind::Crc32c, DigestKind::None];
    }
    c
}

/// Feeds a byte stream of login responses into the initiator's login state
/// machine. Every request it writes is a well-formed Login Request within
/// the login limits, and a finished login has sane parameters.
pub fn login(data: &[u8]) {
    let mut input = Input(data);
    let cfg = input.u8();
    let config = login_config(cfg);
    let session_type = config.session_type;
    let offered_mrdsl = config.offer.max_recv_data_segment_len;
    let mut login = Login::new(config, 0, Sn(1));
    let mut out = Vec::new();
    login.start(&mut out);
    check_login_requests(&out);
    let framer = PduFramer {
        digests: Digests::default(),
        max_data_segment_len: 65536,
    };
    let mut buf = input.rest();
    while let Ok(Some(f)) = framer.frame(buf) {
        let payload = &buf[f.data.clone()];
        buf = &buf[f.total_len..];
        let PduHeader::LoginResponse(rsp) = &f.header else {
            return;
        };
        out.clear();
        match login.on_response(rsp, payload, &mut out) {
            Ok(LoginProgress::Continue) => {
                assert!(!out.is_empty(), "login continues but sent nothing");
                check_login_requests(&out);
            }
            Ok(LoginProgress::Done(o)) => {
                check_outcome(&o, offered_mrdsl, session_type);
                return;
            }
            Err(e) => {
                assert!(e.to_string().len() < 1024, "{e}");
                return;
            }
        }
    }
}

fn check_login_requests(out: &[u8]) {
    let framer = PduFramer {
        digests: Digests::default(),
        max_data_segment_len: MAX_DATA_SEGMENT_LEN,
    };
    let mut buf = out;
    let mut n = 0;
    while !buf.is_empty() {
        let f = framer
            .frame(buf)
            .expect("our login request frames")
            .expect("our login request is complete");
        let PduHeader::LoginRequest(r) = &f.header else {
            panic!("sent {:?} during login", f.header);
        };
        assert!(f.data.len() <= LOGIN_MAX_DATA);
        assert!(!(r.transit && r.cont), "T and C together");
        assert_eq!(r.itt, 0);
        assert_eq!(r.isid, FUZZ_ISID);
        buf = &buf[f.total_len..];
        n += 1;
    }
    assert_eq!(n, 1, "one request per response");
}

fn check_outcome(o: &LoginOutcome, offered_mrdsl: u32, session_type: SessionType) {
    let p = &o.params;
    assert!(p.first_burst_len <= p.max_burst_len, "{p:?}");
    assert!((512..=16_777_215).contains(&p.max_burst_len), "{p:?}");
    assert!(
        (512..=16_777_215).contains(&p.max_xmit_data_segment_len),
        "{p:?}"
    );
    assert_eq!(p.max_recv_data_segment_len, offered_mrdsl);
    assert!(p.max_outstanding_r2t >= 1);
    assert!(p.error_recovery_level <= 2);
    let _ = (p.to_string(), session_type);
}

// ---------------------------------------------------------------------------
// iscsi::connection

/// Shadow of the CmdSN window the connection may use (RFC 7143 §4.2.2.1).
struct Window {
    exp: Sn,
    max: Sn,
}

impl Window {
    fn update(&mut self, exp: Sn, max: Sn) {
        if max.lt(Sn(exp.0.wrapping_sub(1))) {
            return;
        }
        if exp.gt(self.exp) {
            self.exp = exp;
        }
        if max.gt(self.max) {
            self.max = max;
        }
    }
    fn see(&mut self, h: &PduHeader) {
        let (e, m) = match h {
            PduHeader::NopIn(p) => (p.exp_cmd_sn, p.max_cmd_sn),
            PduHeader::ScsiResponse(p) => (p.exp_cmd_sn, p.max_cmd_sn),
            PduHeader::TaskMgmtResponse(p) => (p.exp_cmd_sn, p.max_cmd_sn),
            PduHeader::TextResponse(p) => (p.exp_cmd_sn, p.max_cmd_sn),
            PduHeader::DataIn(p) => (p.exp_cmd_sn, p.max_cmd_sn),
            PduHeader::LogoutResponse(p) => (p.exp_cmd_sn, p.max_cmd_sn),
            PduHeader::R2t(p) => (p.exp_cmd_sn, p.max_cmd_sn),
            PduHeader::AsyncMessage(p) => (p.exp_cmd_sn, p.max_cmd_sn),
            PduHeader::Reject(p) => (p.exp_cmd_sn, p.max_cmd_sn),
            _ => return,
        };
        self.update(e, m);
    }
}

/// The connection setup a fuzz_connection input selects with its first
/// five bytes: parameters, window, timers.
pub struct ConnSetup {
    pub outcome: LoginOutcome,
    pub timers: ConnTimers,
    pub chunk_seed: u8,
}

pub const CONN_CMD_SN: u32 = 10;
pub const CONN_STAT_SN: u32 = 100;

pub fn conn_setup(input: &mut Input<'_>) -> ConnSetup {
    let a = input.u8();
    let b = input.u8();
    let w = input.u8();
    let chunk_seed = input.u8();
    let t = input.u8();
    let max_burst_len = [512, 4096, 65536, 262_144][b as usize & 3];
    let params = Params {
        header_digest: if a & 1 != 0 {
            DigestKind::Crc32c
        } else {
            DigestKind::None
        },
        data_digest: if a & 2 != 0 {
            DigestKind::Crc32c
        } else {
            DigestKind::None
        },
        immediate_data: a & 4 != 0,
        initial_r2t: a & 8 != 0,
        max_recv_data_segment_len: [512, 4096, 8192, 65536][(a >> 4) as usize & 3],
        max_xmit_data_segment_len: [512, 1024, 4096, 8192][(a >> 6) as usize & 3],
        max_burst_len,
        first_burst_len: [512, 4096, 8192, 65536][(b >> 2) as usize & 3].min(max_burst_len),
        max_outstanding_r2t: 1 + ((b >> 4) as u32 & 3),
        ..Params::default()
    };
    let outcome = LoginOutcome {
        params,
        tsih: 1,
        isid: FUZZ_ISID,
        cid: 0,
        cmd_sn: Sn(CONN_CMD_SN),
        exp_stat_sn: Sn(CONN_STAT_SN),
        exp_cmd_sn: Sn(CONN_CMD_SN),
        // 0..=7 commands of window; 0 = closed.
        max_cmd_sn: Sn(CONN_CMD_SN + (w as u32 % 8)).plus(u32::MAX),
    };
    let timers = ConnTimers {
        nop_interval: if t & 1 != 0 {
            Some(Duration::from_millis(50))
        } else {
            None
        },
        nop_timeout: Duration::from_millis(50),
        command_timeout: if t & 2 != 0 {
            Some(Duration::from_millis(100))
        } else {
            None
        },
    };
    ConnSetup {
        outcome,
        timers,
        chunk_seed,
    }
}

/// The SCSI commands every fuzz_connection run submits: (tag, direction, length).
pub const CONN_COMMANDS: [(u64, Direction, usize); 5] = [
    (1, Direction::Read, 512),
    (2, Direction::Write, 2048),
    (3, Direction::None, 0),
    (4, Direction::Read, 1500),
    (5, Direction::Write, 600),
];

/// Submitted after the first chunk when the chunk byte has bit 3 set, so a
/// slot freed by then may be reused.
pub const LATE_COMMAND: (u64, Direction, usize) = (6, Direction::Read, 512);

fn command_len(tag: u64) -> usize {
    CONN_COMMANDS
        .iter()
        .chain([&LATE_COMMAND])
        .find(|(t, _, _)| *t == tag)
        .map(|c| c.2)
        .unwrap_or_else(|| panic!("completion for tag {tag}, never submitted"))
}

fn make_command((tag, dir, len): (u64, Direction, usize)) -> Command {
    let cdb: &[u8] = match dir {
        Direction::Read => &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        Direction::Write => &[0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        Direction::None => &[0, 0, 0, 0, 0, 0],
    };
    let buffer = (0..len).map(|i| (i as u8) ^ (tag as u8)).collect();
    let mut cmd = Command::new(0, cdb, dir, buffer).expect("cdb fits");
    cmd.user_tag = tag;
    cmd
}

/// Builds the connection and submits the commands (plus a ping and a text
/// request); returns it with the bytes it sent so far.
pub fn conn_start(setup: &ConnSetup, now: Instant) -> Connection {
    let mut c = Connection::new(&setup.outcome, setup.timers, now);
    for spec in CONN_COMMANDS {
        c.submit(make_command(spec), now).expect("submit");
    }
    c.ping(now).expect("ping");
    let mut t = TextPairs::new();
    t.push("SendTargets", "All");
    c.text_request(&t, 99, now).expect("text");
    c
}

#[derive(Default)]
struct Sent {
    /// ITT → (tag index, direction, length) of each SCSI Command PDU sent.
    commands: BTreeMap<u32, (Direction, usize)>,
    cmd_sns: BTreeSet<u32>,
}

/// What the target side sees the connection send: every PDU well-formed,
/// SCSI commands inside the CmdSN window, each command sent once, Data-Out
/// inside the command's buffer.
fn check_tx(c: &mut Connection, window: &Window, digests: Digests, sent: &mut Sent) {
    let framer = PduFramer {
        digests,
        max_data_segment_len: MAX_DATA_SEGMENT_LEN,
    };
    let max_xmit = c.params().max_xmit_data_segment_len as usize;
    let bytes = c.pending_tx().to_vec();
    c.consume_tx(bytes.len());
    let mut buf = &bytes[..];
    while !buf.is_empty() {
        let f = framer
            .frame(buf)
            .expect("our PDU frames with our digests")
            .expect("we never send a partial PDU");
        let dlen = f.data.len();
        match &f.header {
            PduHeader::ScsiCommand(s) => {
                assert!(!s.immediate);
                assert!(
                    s.cmd_sn.le(window.max),
                    "CmdSN {} sent outside the window (MaxCmdSN {})",
                    s.cmd_sn,
                    window.max
                );
                assert!(sent.cmd_sns.insert(s.cmd_sn.0), "CmdSN {} reused", s.cmd_sn);
                let dir = match (s.read, s.write) {
                    (true, false) => Direction::Read,
                    (false, true) => Direction::Write,
                    (false, false) => Direction::None,
                    _ => panic!("bidirectional command sent"),
                };
                let prev = sent
                    .commands
                    .insert(s.itt, (dir, s.expected_data_len as usize));
                assert!(prev.is_none(), "task {:#x} sent twice", s.itt);
                assert!(dlen <= max_xmit && dlen <= s.expected_data_len as usize);
            }
            PduHeader::DataOut(d) => {
                let Some(&(dir, len)) = sent.commands.get(&d.itt) else {
                    panic!("Data-Out for task {:#x} never sent", d.itt);
                };
                assert_eq!(dir, Direction::Write);
                assert!(dlen <= max_xmit);
                assert!(
                    d.buffer_offset as usize + dlen <= len,
                    "Data-Out past the buffer"
                );
            }
            PduHeader::TextRequest(t) => {
                assert!(!t.immediate);
                if t.ttt == RESERVED_TAG {
                    // A new request (not a continuation the target asked for).
                    assert!(
                        t.cmd_sn.le(window.max),
                        "text CmdSN {} sent outside the window (MaxCmdSN {})",
                        t.cmd_sn,
                        window.max
                    );
                }
                assert!(sent.cmd_sns.insert(t.cmd_sn.0), "CmdSN {} reused", t.cmd_sn);
            }
            PduHeader::NopOut(_) | PduHeader::TaskMgmtRequest(_) | PduHeader::LogoutRequest(_) => {}
            other => panic!("initiator sent {other:?}"),
        }
        buf = &buf[f.total_len..];
    }
}

/// A small deterministic generator for chunk sizes.
fn xorshift(s: &mut u32) -> u32 {
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    *s
}

/// A connection in full feature phase with five SCSI commands (reads,
/// writes, no-data; some may wait for window space), a ping and a text
/// request, fed arbitrary target bytes in arbitrary chunks. Nothing panics,
/// the initiator never sends outside the window or a command twice, no
/// buffer changes size, and completions plus `take_outstanding()` account
/// for every submitted command exactly once.
pub fn connection(data: &[u8]) {
    let mut input = Input(data);
    let setup = conn_setup(&mut input);
    let stream = input.rest();
    let digests = setup.outcome.params.digests();
    let t0 = Instant::now();
    let mut c = conn_start(&setup, t0);
    let mut window = Window {
        exp: setup.outcome.exp_cmd_sn,
        max: setup.outcome.max_cmd_sn,
    };
    let mut sent = Sent::default();
    check_tx(&mut c, &window, digests, &mut sent);

    // The shadow window follows every PDU the stream holds, so it is never
    // narrower than the connection's own.
    let shadow = PduFramer {
        digests,
        max_data_segment_len: setup.outcome.params.max_recv_data_segment_len,
    };
    let mut completed: BTreeMap<u64, usize> = BTreeMap::new();
    let mut seed = (u32::from(setup.chunk_seed) * 0x0101_0101) | 1;
    let max_chunk = match setup.chunk_seed & 3 {
        0 => usize::MAX,
        1 => 1,
        2 => 64,
        _ => 4096,
    };
    let mut fed = 0;
    let mut shadow_at = 0;
    let mut now = t0;
    let mut failed = false;
    let mut late_submitted = false;
    let mut expected: Vec<u64> = CONN_COMMANDS.iter().map(|c| c.0).collect();
    while fed < stream.len() && !failed {
        let n = if max_chunk == usize::MAX {
            stream.len()
        } else {
            1 + xorshift(&mut seed) as usize % max_chunk
        }
        .min(stream.len() - fed);
        while let Ok(Some(f)) = shadow.frame(&stream[shadow_at..fed + n]) {
            window.see(&f.header);
            shadow_at += f.total_len;
        }
        // The connection acts on a header (ExpCmdSN/MaxCmdSN included) as
        // soon as it is in, before the data segment, so it may place Data-In
        // straight into the command's buffer: so does the shadow.
        if let Ok(Some((header, _, _))) = shadow.frame_header(&stream[shadow_at..fed + n]) {
            window.see(&header);
        }
        let r = c.receive(&stream[fed..fed + n], now);
        fed += n;
        failed |= r.is_err();
        if setup.chunk_seed & 4 != 0 {
            now += Duration::from_millis(30);
            failed |= c.handle_timeout(now).is_err();
            let _ = c.poll_timeout();
        }
        check_tx(&mut c, &window, digests, &mut sent);
        drain_events(&mut c, &mut completed);
        if setup.chunk_seed & 8 != 0 && !late_submitted {
            late_submitted = true;
            match c.submit(make_command(LATE_COMMAND), now) {
                Ok(()) => expected.push(LATE_COMMAND.0),
                Err(e) => assert!(c.is_failed().is_some(), "late submit refused: {e}"),
            }
            check_tx(&mut c, &window, digests, &mut sent);
        }
    }
    // Every non-immediate PDU took the next CmdSN: no holes the target
    // would wait on forever.
    let want: BTreeSet<u32> = (0..sent.cmd_sns.len() as u32)
        .map(|i| CONN_CMD_SN.wrapping_add(i))
        .collect();
    assert_eq!(sent.cmd_sns, want, "CmdSNs sent with a hole");
    if let Some(e) = c.is_failed() {
        assert!(e.to_string().len() < 1024, "{e}");
        assert!(matches!(
            c.submit(
                Command::new(0, &[0; 6], Direction::None, Vec::new()).unwrap(),
                now
            ),
            Err(SubmitError::Down(_))
        ));
    }
    drain_events(&mut c, &mut completed);
    let outstanding_count = c.outstanding();
    let back = c.take_outstanding();
    assert_eq!(back.len(), outstanding_count);
    for cmd in &back {
        *completed.entry(cmd.user_tag).or_default() += 1;
        let len = command_len(cmd.user_tag);
        assert_eq!(
            cmd.buffer.len(),
            len,
            "buffer of {} changed size",
            cmd.user_tag
        );
    }
    for &tag in &expected {
        assert_eq!(
            completed.get(&tag).copied().unwrap_or(0),
            1,
            "command {tag} accounted for {:?} times (completions + take_outstanding)",
            completed.get(&tag)
        );
    }
    assert_eq!(completed.len(), expected.len(), "{completed:?}");
    assert_eq!(c.outstanding(), 0);
}

fn drain_events(c: &mut Connection, completed: &mut BTreeMap<u64, usize>) {
    while let Some(e) = c.poll_event() {
        if let Event::Completed(done) = e {
            let len = command_len(done.user_tag);
            assert_eq!(done.buffer.len(), len, "buffer changed size");
            assert!(done.transferred <= done.buffer.len());
            *completed.entry(done.user_tag).or_default() += 1;
        }
    }
}

// ---------------------------------------------------------------------------
// iscsi::discovery, url, chap

/// SendTargets answers: parse never panics; every target has a portal.
pub fn send_targets(data: &[u8]) {
    let Ok(pairs) = TextPairs::parse(data) else {
        return;
    };
    let default = Portal {
        host: "192.0.2.1".into(),
        port: 3260,
        tpgt: None,
    };
    if let Ok(targets) = parse_send_targets(&pairs, &default) {
        for t in targets {
            assert!(!t.portals.is_empty());
            for p in &t.portals {
                assert!(!p.host.is_empty());
                let _ = p.address();
            }
        }
    }
}

/// iSCSI URLs: parse never panics; `Display` (which drops passwords and the
/// query) parses back to the same URL without them.
pub fn url(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match IscsiUrl::parse(s) {
        Ok(u) => {
            let shown = u.to_string();
            let _ = format!("{u:?}");
            let back = IscsiUrl::parse(&shown)
                .unwrap_or_else(|e| panic!("{shown:?} (from {s:?}) does not parse: {e}"));
            let expect = IscsiUrl {
                password: None,
                target_user: None,
                target_password: None,
                ..u.clone()
            };
            assert_eq!(back, expect, "{s:?} shown as {shown:?}");
            // What is shown does not depend on the secrets at all.
            let other = IscsiUrl {
                password: u.password.as_ref().map(|_| "other-secret".to_string()),
                target_password: u.target_password.as_ref().map(|_| "x".to_string()),
                ..u.clone()
            };
            assert_eq!(other.to_string(), shown, "Display depends on a password");
            assert_eq!(format!("{other:?}"), format!("{u:?}"));
            let _ = u.require_target();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// CHAP binary values, identifiers and algorithm lists from a target.
pub fn chap(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = chap::decode_binary(s) {
        assert!(!v.is_empty());
        assert!(v.len() <= s.len());
        let hex = chap::encode_hex(&v);
        assert_eq!(chap::decode_binary(&hex), Ok(v.clone()));
        let secret = chap::Secret::new(b"secretsecret".to_vec());
        for alg in chap::ChapAlgorithm::PREFERRED {
            let r = chap::response(alg, 1, &secret, &v);
            assert_eq!(r.len(), alg.digest_len());
            assert_eq!(chap::verify(alg, 1, &secret, &v, &r), Ok(()));
            assert!(chap::verify(alg, 1, &secret, &v, &v).is_err() || v == r);
        }
    }
    let _ = chap::parse_identifier(s);
    let _ = chap::check_algorithm(s, &chap::ChapAlgorithm::PREFERRED);
    let _ = chap::choose_algorithm(s, &chap::ChapAlgorithm::PREFERRED);
    let _ = chap::ChapAlgorithm::parse_list(s);
}

// ---------------------------------------------------------------------------
// wire::{ethernet, arp, ipv4, icmp, tcp} and the userspace stack

use iscsi_bypass::net::{Instant as NetInstant, Interface, InterfaceConfig};
use iscsi_bypass::phy::{Device, DeviceCaps, PhyError, RxMeta, TxOffload};
use iscsi_bypass::wire::packet::Checksum;
use iscsi_bypass::wire::{arp, ethernet, icmp, ipv4, tcp};
use std::net::Ipv4Addr;

/// Addresses the net fuzz targets use (the stack is 10.0.0.1/24).
pub const NET_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const NET_PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const NET_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const NET_PORT: u16 = 3260;

/// Ethernet, ARP, IPv4, ICMP and TCP views; the first byte picks the layer
/// (and whether checksums are checked). Whatever parses re-emits to bytes
/// that parse to the same value.
pub fn net_packet(data: &[u8]) {
    let mut input = Input(data);
    let sel = input.u8();
    let b = input.rest();
    let cs = if sel & 0x80 != 0 {
        Checksum::None
    } else {
        Checksum::Both
    };
    match sel & 7 {
        0 => {
            if let Ok(f) = ethernet::Frame::new_checked(b) {
                let r = ethernet::EthernetRepr::parse(&f).expect("checked frame parses");
                let mut out = vec![0u8; r.buffer_len()];
                r.emit(&mut out).unwrap();
                let f2 = ethernet::Frame::new_checked(&out[..]).unwrap();
                assert_eq!(ethernet::EthernetRepr::parse(&f2).unwrap(), r);
            }
        }
        1 => {
            if let Ok(p) = arp::Packet::new_checked(b) {
                if let Ok(r) = arp::ArpRepr::parse(&p) {
                    let mut out = vec![0u8; r.buffer_len()];
                    r.emit(&mut out).unwrap();
                    let p2 = arp::Packet::new_checked(&out[..]).unwrap();
                    assert_eq!(arp::ArpRepr::parse(&p2).unwrap(), r);
                }
            }
        }
        2 => {
            if let Ok(p) = ipv4::Packet::new_checked(b) {
                if let Ok(r) = ipv4::Ipv4Repr::parse(&p, cs) {
                    let mut out = vec![0u8; r.buffer_len() + r.payload_len];
                    r.emit(&mut out, Checksum::Both).unwrap();
                    let p2 = ipv4::Packet::new_checked(&out[..]).expect("re-emitted IPv4");
                    assert_eq!(ipv4::Ipv4Repr::parse(&p2, Checksum::Both).unwrap(), r);
                }
            }
        }
        3 => {
            if let Ok(p) = icmp::Packet::new_checked(b) {
                if let Ok(r) = icmp::Icmpv4Repr::parse(&p, cs) {
                    let mut out = vec![0u8; r.buffer_len()];
                    r.emit(&mut out).unwrap();
                    let p2 = icmp::Packet::new_checked(&out[..]).unwrap();
                    assert_eq!(icmp::Icmpv4Repr::parse(&p2, Checksum::Both).unwrap(), r);
                }
            }
        }
        4 => {
            if let Ok(p) = tcp::Packet::new_checked(b) {
                if let Ok(r) = tcp::TcpRepr::parse(&p, NET_PEER, NET_IP, cs) {
                    // Options the stack does not know are dropped and SACK
                    // blocks beyond the option space are cut, so compare
                    // after one normalising emit.
                    let emit = |r: &tcp::TcpRepr<'_>| {
                        let mut out = vec![0u8; r.buffer_len()];
                        r.emit(&mut out, NET_PEER, NET_IP, Checksum::Both).unwrap();
                        out
                    };
                    let b1 = emit(&r);
                    let p1 = tcp::Packet::new_checked(&b1[..]).expect("re-emitted TCP");
                    let r1 = tcp::TcpRepr::parse(&p1, NET_PEER, NET_IP, Checksum::Both).unwrap();
                    assert_eq!(
                        (r1.src_port, r1.dst_port, r1.flags, r1.seq_number),
                        (r.src_port, r.dst_port, r.flags, r.seq_number)
                    );
                    assert_eq!((r1.ack_number, r1.window_len), (r.ack_number, r.window_len));
                    assert_eq!(r1.payload, r.payload);
                    let b2 = emit(&r1);
                    assert_eq!(b1, b2, "TCP emit not stable");
                    let _ = r.segment_len();
                }
            }
        }
        _ => {
            if let Ok(o) = tcp::TcpOptions::parse(b) {
                let mut out = vec![0u8; o.buffer_len()];
                o.emit(&mut out).unwrap();
                assert_eq!(out.len() % 4, 0);
                let o1 = tcp::TcpOptions::parse(&out).expect("re-emitted options");
                assert_eq!((o1.mss, o1.window_scale), (o.mss, o.window_scale));
                assert_eq!(
                    (o1.sack_permitted, o1.timestamp),
                    (o.sack_permitted, o.timestamp)
                );
                let mut again = vec![0u8; o1.buffer_len()];
                o1.emit(&mut again).unwrap();
                assert_eq!(out, again);
            }
        }
    }
}

/// A device whose receive side plays the fuzz input and whose transmit side
/// checks every frame the stack writes.
struct FuzzDevice<'a> {
    frames: Vec<&'a [u8]>,
    next: usize,
    caps: DeviceCaps,
    tx: usize,
}

impl Device for FuzzDevice<'_> {
    fn caps(&self) -> DeviceCaps {
        self.caps
    }
    fn rx_burst(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        let mut n = 0;
        while n < max.min(4) && self.next < self.frames.len() {
            on_frame(self.frames[self.next], RxMeta::default());
            self.next += 1;
            n += 1;
        }
        n
    }
    fn tx_frame(
        &mut self,
        len: usize,
        _offload: TxOffload,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), PhyError> {
        assert!(len <= self.caps.max_tx_frame, "frame of {len} bytes");
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        let f = ethernet::Frame::new_checked(&buf[..]).expect("stack sent a runt frame");
        let r = ethernet::EthernetRepr::parse(&f).unwrap();
        assert_eq!(r.src_addr, ethernet::EthernetAddress(NET_MAC));
        self.tx += 1;
        Ok(())
    }
    fn tx_flush(&mut self) -> usize {
        0
    }
}

/// Splits `b` into frames, each prefixed by a 2-byte big-endian length.
pub fn split_frames(mut b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([b[0], b[1]])).min(b.len() - 2);
        out.push(&b[2..2 + n]);
        b = &b[2 + n..];
    }
    out
}

/// The userspace stack's receive path (Ethernet → ARP/IPv4 → ICMP/TCP with a
/// listening socket), fed length-prefixed frames; time advances between
/// polls so timers run. Nothing panics and every frame sent is well-formed.
pub fn net_iface(data: &[u8]) {
    let mut input = Input(data);
    let cfg = input.u8();
    let frames = split_frames(input.rest());
    let caps = DeviceCaps {
        mac: NET_MAC,
        mtu: 1500,
        rx_checksum: false,
        tx_checksum: false,
        tso: false,
        max_tx_frame: 1514,
    };
    let mut config = InterfaceConfig::new(NET_IP, 24);
    config.seed = u64::from(cfg);
    let mut iface = Interface::new(config, caps);
    let listener = iface.add_socket(None);
    iface.listen(listener, NET_PORT).expect("listen");
    let mut dev = FuzzDevice {
        frames,
        next: 0,
        caps,
        tx: 0,
    };
    let mut now = NetInstant::from_millis(1000);
    let step = Duration::from_millis(1 + u64::from(cfg & 0x7f) * 10);
    let mut rounds = 0;
    while dev.next < dev.frames.len() || rounds < 3 {
        iface.poll(now, &mut dev);
        let s = iface.socket_mut(listener);
        let mut sink = [0u8; 2048];
        let _ = s.recv_slice(&mut sink);
        if cfg & 0x80 != 0 {
            let _ = s.send_slice(b"iSCSI");
        }
        let _ = iface.poll_at(now);
        now += step;
        rounds += 1;
    }
    let _ = (iface.counters(), dev.tx);
}

// ---------------------------------------------------------------------------
// The embedded target's connection (it parses initiators' bytes)

use iscsi_bypass::target::{TargetConfig, TargetConn};
use std::sync::Arc;

pub const TARGET_IQN: &str = "iqn.2024-01.org.example:target";

pub fn target_shared() -> Arc<iscsi_bypass::target::TargetShared> {
    target_shared_strict(false)
}

/// [`target_shared`] with strict mode on or off.
pub fn target_shared_strict(strict: bool) -> Arc<iscsi_bypass::target::TargetShared> {
    let cfg = TargetConfig::ram(TARGET_IQN, 1 << 20).strict(strict);
    let addrs = ["127.0.0.1:3260".parse().unwrap()];
    Arc::new(iscsi_bypass::target::TargetShared::new(cfg, &addrs).expect("target config"))
}

/// The embedded target's sans-IO connection fed arbitrary initiator bytes in
/// arbitrary chunks, in strict mode or not (bit 3 of the first byte), with
/// an Async Message pending (bits 4-6: none, or AsyncEvent 0-4). Nothing
/// panics, and what it answers stays bounded.
pub fn target_conn(data: &[u8]) {
    use iscsi_bypass::target::fault::InjectedSense;
    use iscsi_bypass::target::AsyncEvent;
    let mut input = Input(data);
    let chunk_seed = input.u8();
    let stream = input.rest();
    let t0 = Instant::now();
    let shared = target_shared_strict(chunk_seed & 8 != 0);
    let mut conn = TargetConn::new(shared.clone(), 0, t0);
    let event = match (chunk_seed >> 4) & 7 {
        1 => Some(AsyncEvent::Scsi {
            lun: 0,
            sense: InjectedSense {
                key: 6,
                asc: 0x2a,
                ascq: 0x06,
            },
        }),
        2 => Some(AsyncEvent::RequestLogout { within: 1 }),
        3 => Some(AsyncEvent::DropConnection {
            time2wait: 0,
            time2retain: 0,
        }),
        4 => Some(AsyncEvent::DropSession {
            time2wait: 1,
            time2retain: 1,
        }),
        5 => Some(AsyncEvent::Renegotiate {
            max_recv_data_segment_len: Some(512),
        }),
        _ => None,
    };
    // Sent once the connection is in the full feature phase.
    let mut event = event;
    let mut seed = (u32::from(chunk_seed) * 0x0101_0101) | 1;
    let max_chunk = match chunk_seed & 3 {
        0 => usize::MAX,
        1 => 1,
        2 => 64,
        _ => 4096,
    };
    let mut fed = 0;
    let mut now = t0;
    while fed < stream.len() && !conn.is_closed() {
        let n = if max_chunk == usize::MAX {
            stream.len()
        } else {
            1 + xorshift(&mut seed) as usize % max_chunk
        }
        .min(stream.len() - fed);
        conn.receive(&stream[fed..fed + n], now);
        fed += n;
        if conn.is_full_feature() {
            if let Some(e) = event.take() {
                shared.faults.send_async_event(e);
                conn.handle_timeout(now);
            }
        }
        // A 1 MiB LUN: no answer to one chunk can be much larger than it.
        assert!(
            conn.output().len() < (4 << 20),
            "{} bytes",
            conn.output().len()
        );
        conn.clear_output();
        if chunk_seed & 4 != 0 {
            now += Duration::from_millis(500);
            conn.handle_timeout(now);
            let _ = conn.poll_timeout();
        }
    }
    let _ = (conn.close_reason(), conn.is_full_feature(), conn.params());
}

// ---------------------------------------------------------------------------
// nbd: the export's handshake and request framing

/// The export `nbd` negotiates.
pub fn nbd_export(max_payload: u32) -> iscsi_bypass::nbd::ExportInfo {
    use iscsi_bypass::nbd::wire::tflags;
    iscsi_bypass::nbd::ExportInfo {
        name: "lun0".into(),
        description: "fuzz export".into(),
        size: 64 << 20,
        flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::SEND_TRIM,
        min_block: 512,
        preferred_block: 4096,
        max_payload,
    }
}

/// Max payloads `nbd` picks from (bits 3-4 of byte 0).
pub const NBD_MAX_PAYLOADS: [u32; 4] = [0, 512, 65_536, 32 << 20];

/// Client bytes into the NBD server [`Handshake`] in chunks, then the rest
/// into the transmission request framing (`parse_request`). Byte 0: TLS
/// policy (bits 0-1: off, allow, require, require), whether a requested
/// TLS handshake succeeds (bit 2), the max payload (bits 3-4); byte 1: the
/// chunk size (0: everything at once). Checks:
/// - the server's output is its 18-byte greeting, then whole option replies
///   (plus, on `EXPORT_NAME`, the size/flags reply), replies never announce
///   more than the export is, and error replies carry UTF-8 text;
/// - with TLS required and not started: no export information (INFO,
///   SERVER) goes out and transmission is never entered; STARTTLS is only
///   offered when TLS is configured, once;
/// - the bytes consumed never exceed those fed, and nothing fed is lost
///   across chunks (what transmission gets is exactly the unconsumed rest);
/// - `InfoRequest`, option and request headers re-emit to the same bytes;
///   framed requests have their payload, and none longer than the max.
///
/// [`Handshake`]: iscsi_bypass::nbd::handshake::Handshake
pub fn nbd(data: &[u8]) {
    use iscsi_bypass::nbd::handshake::{Handshake, Step};
    use iscsi_bypass::nbd::wire::{self, InfoRequest, Request, WireError};
    use iscsi_bypass::nbd::TlsPolicy;

    let mut input = Input(data);
    let cfg = input.u8();
    let chunk = match input.u8() {
        0 => usize::MAX,
        n => n as usize,
    };
    let policy = [
        TlsPolicy::Off,
        TlsPolicy::Allow,
        TlsPolicy::Require,
        TlsPolicy::Require,
    ][cfg as usize & 3];
    let tls_ok = cfg & 4 != 0;
    let max_payload = NBD_MAX_PAYLOADS[(cfg >> 3) as usize & 3];
    let bytes = input.rest();
    let export = nbd_export(max_payload);

    // Wire pieces on their own: parse -> emit gives the same bytes.
    if let Ok(r) = InfoRequest::parse(bytes) {
        let mut v = Vec::new();
        r.emit(&mut v);
        assert_eq!(v, bytes);
    }
    if let Ok(Some((o, n))) = wire::parse_option(bytes, u32::MAX) {
        let mut v = Vec::new();
        wire::emit_option(o.option, o.data, &mut v);
        assert_eq!(&v[..], &bytes[..n]);
    }

    let mut out = Vec::new();
    let mut hs = Handshake::with_tls(export.clone(), policy, &mut out);
    assert_eq!(out.len(), 18, "greeting");
    assert_eq!(&out[..8], b"NBDMAGIC");
    out.clear();
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut tls_active = false;
    let mut starttls_seen = false;
    loop {
        let n = chunk.min(bytes.len() - fed);
        buf.extend_from_slice(&bytes[fed..fed + n]);
        fed += n;
        let step = match hs.feed(&buf, &mut out) {
            Ok((used, step)) => {
                assert!(used <= buf.len(), "used {used} of {}", buf.len());
                buf.drain(..used);
                step
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                assert!(
                    !matches!(e, WireError::BadRequestMagic(_) | WireError::PayloadTooLong { .. }),
                    "a transmission error in the handshake: {e:?}"
                );
                nbd_check_replies(&out, &export, false, policy, tls_active);
                return;
            }
        };
        let transmission = step == Step::Transmission;
        nbd_check_replies(&out, &export, transmission, policy, tls_active);
        out.clear();
        match step {
            Step::Continue => {
                if fed == bytes.len() {
                    assert_eq!(hs.tls_active(), tls_active);
                    return;
                }
            }
            Step::Close(why) => {
                assert!(!why.is_empty());
                return;
            }
            Step::StartTls => {
                assert_ne!(policy, TlsPolicy::Off, "STARTTLS accepted without TLS");
                assert!(!starttls_seen && !tls_active, "STARTTLS accepted twice");
                starttls_seen = true;
                if !tls_ok {
                    return;
                }
                // What follows stands for the decrypted stream.
                hs.tls_started();
                tls_active = true;
                assert!(hs.tls_active());
            }
            Step::Transmission => {
                assert!(
                    policy != TlsPolicy::Require || tls_active,
                    "transmission without the TLS the server requires"
                );
                buf.extend_from_slice(&bytes[fed..]);
                break;
            }
        }
    }

    // Transmission: frame requests out of the rest.
    let mut rest = &buf[..];
    loop {
        match wire::parse_request(rest, max_payload) {
            Ok(None) => {
                let need = match Request::parse(rest) {
                    Ok(Some(r)) => wire::REQUEST_LEN + r.payload_len(),
                    _ => wire::REQUEST_LEN,
                };
                assert!(rest.len() < need, "{} bytes left, {need} needed", rest.len());
                return;
            }
            Ok(Some((r, payload, n))) => {
                assert_eq!(n, wire::REQUEST_LEN + r.payload_len());
                assert_eq!(payload.len(), r.payload_len());
                assert!(payload.len() <= max_payload as usize);
                assert_eq!(payload, &rest[wire::REQUEST_LEN..n]);
                let mut v = Vec::new();
                r.emit(&mut v);
                assert_eq!(&v[..], &rest[..wire::REQUEST_LEN]);
                assert_eq!(Request::parse(&v), Ok(Some(r)));
                rest = &rest[n..];
            }
            Err(e) => {
                match e {
                    WireError::BadRequestMagic(m) => {
                        assert_ne!(m, wire::REQUEST_MAGIC)
                    }
                    WireError::PayloadTooLong { len, max } => {
                        assert!(len > max && max == max_payload)
                    }
                    other => panic!("unexpected transmission error {other:?}"),
                }
                return;
            }
        }
    }
}

/// Checks one feed's output of the NBD handshake (see [`nbd`]).
fn nbd_check_replies(
    mut out: &[u8],
    export: &iscsi_bypass::nbd::ExportInfo,
    transmission: bool,
    policy: iscsi_bypass::nbd::TlsPolicy,
    tls_active: bool,
) {
    use iscsi_bypass::nbd::wire::{self, info, rep};
    let locked = policy == iscsi_bypass::nbd::TlsPolicy::Require && !tls_active;
    while let Some((r, n)) = wire::parse_option_reply(out) {
        let mut v = Vec::new();
        wire::emit_option_reply(r.option, r.reply_type, r.data, &mut v);
        assert_eq!(&v[..], &out[..n]);
        if r.reply_type & rep::ERR != 0 {
            assert!(std::str::from_utf8(r.data).is_ok(), "error text {:?}", r.data);
        } else {
            assert!(
                matches!(r.reply_type, rep::ACK | rep::SERVER | rep::INFO),
                "reply type {:#x}",
                r.reply_type
            );
            if r.reply_type == rep::ACK {
                assert!(r.data.is_empty());
            }
            assert!(
                !(locked && matches!(r.reply_type, rep::SERVER | rep::INFO)),
                "export information before the required TLS"
            );
            if r.reply_type == rep::INFO && r.data.get(..2) == Some(&info::EXPORT.to_be_bytes()) {
                assert_eq!(
                    &r.data[..],
                    &wire::info_export(export.size, export.flags)[..]
                );
            }
        }
        out = &out[n..];
    }
    if out.is_empty() {
        return;
    }
    // Only the reply to NBD_OPT_EXPORT_NAME is not an option reply.
    assert!(transmission, "{} stray bytes", out.len());
    assert!(out.len() == 10 || out.len() == 134, "{} bytes", out.len());
    assert_eq!(&out[..8], &export.size.to_be_bytes());
    assert_eq!(&out[8..10], &export.flags.to_be_bytes());
    assert!(out[10..].iter().all(|&b| b == 0));
}
