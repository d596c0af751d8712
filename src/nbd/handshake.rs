//! The server side of the fixed newstyle handshake, sans-IO: bytes in,
//! bytes out, and the decision to enter transmission or close.
//!
//! ```text
//! server: NBDMAGIC IHAVEOPT flags      client: flags
//! client: option ...                   server: option reply ...
//!   NBD_OPT_GO (ACK)  or  NBD_OPT_EXPORT_NAME (size, flags)  -> transmission
//!   NBD_OPT_ABORT (ACK) -> close
//!   NBD_OPT_STARTTLS (ACK) -> TLS handshake, then options again, encrypted
//! ```
//!
//! With [`TlsPolicy::Require`] every option but `STARTTLS` and `ABORT` is
//! answered `NBD_REP_ERR_TLS_REQD` until TLS is up (`EXPORT_NAME`, which
//! cannot carry an error, closes the connection).

use super::wire::{self, info, opt, rep, InfoRequest, WireError};

/// What the handshake tells clients about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's name; clients may also ask for the empty (default) name.
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`wire::tflags::*`).
    pub flags: u16,
    /// Minimum block size (advertised when the client asks for it).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest request payload we take.
    pub max_payload: u32,
}

/// Largest option data we accept (names are at most 4 KiB by the spec).
pub const MAX_OPTION_DATA: u32 = 16 * 1024;
/// Options a client may send before we give up on it.
pub const MAX_OPTIONS: u32 = 1024;

/// Whether the handshake offers TLS, and whether it insists on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS configured: `STARTTLS` is answered `NBD_REP_ERR_UNSUP`.
    Off,
    /// TLS on request; plaintext clients are served too.
    Allow,
    /// Nothing but `STARTTLS` (or `ABORT`) until TLS is up.
    Require,
}

/// Where the handshake goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Keep feeding input.
    Continue,
    /// Send what was written to `out`, then enter transmission.
    Transmission,
    /// Send what was written to `out`, then close, for this reason.
    Close(String),
    /// Send what was written to `out` (the `STARTTLS` ACK) in plaintext,
    /// run the TLS handshake, then call [`Handshake::tls_started`] and feed
    /// the decrypted bytes. Bytes after the option are the client's first
    /// TLS record, not options: they were not consumed.
    StartTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Done,
}

/// Server handshake state.
#[derive(Debug, Clone)]
pub struct Handshake {
    export: ExportInfo,
    state: State,
    no_zeroes: bool,
    fixed: bool,
    options: u32,
    tls: TlsPolicy,
    tls_active: bool,
}

impl Handshake {
    /// Starts a handshake without TLS; writes the server greeting to `out`.
    pub fn new(export: ExportInfo, out: &mut Vec<u8>) -> Handshake {
        Handshake::with_tls(export, TlsPolicy::Off, out)
    }

    /// Starts a handshake with a TLS policy; writes the greeting to `out`.
    pub fn with_tls(export: ExportInfo, tls: TlsPolicy, out: &mut Vec<u8>) -> Handshake {
        wire::emit_server_greeting(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES, out);
        Handshake {
            export,
            state: State::ClientFlags,
            no_zeroes: false,
            fixed: false,
            options: 0,
            tls,
            tls_active: false,
        }
    }

    /// The TLS handshake that [`Step::StartTls`] asked for has completed.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
    }

    /// Whether the option haggling now runs over TLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Consumes as much of `input` as forms complete messages, writing
    /// replies to `out`. Returns the bytes consumed and the next step.
    /// An error means the client spoke garbage: close without a reply.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, Step), WireError> {
        let mut used = 0;
        loop {
            let rest = input.get(used..).unwrap_or(&[]);
            match self.state {
                State::Done => return Ok((used, Step::Continue)),
                State::ClientFlags => match wire::parse_client_flags(rest)? {
                    None => return Ok((used, Step::Continue)),
                    Some((flags, n)) => {
                        used += n;
                        self.fixed = flags & wire::FLAG_C_FIXED_NEWSTYLE != 0;
                        self.no_zeroes = flags & wire::FLAG_C_NO_ZEROES != 0;
                        self.state = State::Options;
                    }
                },
                State::Options => {
                    let Some((o, n)) = wire::parse_option(rest, MAX_OPTION_DATA)? else {
                        return Ok((used, Step::Continue));
                    };
                    used += n;
                    self.options += 1;
                    if self.options > MAX_OPTIONS {
                        self.state = State::Done;
                        return Ok((used, Step::Close("too many options".into())));
                    }
                    let step = self.option(o.option, o.data, out);
                    if step == Step::StartTls {
                        // The rest of the input is TLS: stop here.
                        return Ok((used, step));
                    }
                    if step != Step::Continue {
                        self.state = State::Done;
                        return Ok((used, step));
                    }
                }
            }
        }
    }

    /// Whether the client asked for the 124 zero bytes to be left out.
    pub fn no_zeroes(&self) -> bool {
        self.no_zeroes
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export.name.as_bytes()
    }

    fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        if option == opt::STARTTLS {
            return self.starttls(data, out);
        }
        if self.tls == TlsPolicy::Require && !self.tls_active {
            return match option {
                opt::ABORT => {
                    wire::emit_option_reply(option, rep::ACK, &[], out);
                    Step::Close("client aborted the handshake".into())
                }
                opt::EXPORT_NAME => Step::Close(
                    "client asked for the export without TLS, and TLS is required".into(),
                ),
                _ if !self.fixed => Step::Close(
                    "a non-fixed-newstyle client cannot negotiate the TLS this server requires"
                        .into(),
                ),
                _ => {
                    error_reply(
                        option,
                        rep::ERR_TLS_REQD,
                        "this server requires TLS: use NBD_OPT_STARTTLS",
                        out,
                    );
                    Step::Continue
                }
            };
        }
        let e = &self.export;
        match option {
            opt::EXPORT_NAME => {
                if !self.name_matches(data) {
                    // No way to report an error here: the spec says close.
                    return Step::Close(format!(
                        "client asked for unknown export {:?}",
                        String::from_utf8_lossy(data)
                    ));
                }
                wire::emit_export_name_reply(e.size, e.flags, self.no_zeroes, out);
                Step::Transmission
            }
            opt::ABORT => {
                wire::emit_option_reply(option, rep::ACK, &[], out);
                Step::Close("client aborted the handshake".into())
            }
            opt::LIST => {
                if !data.is_empty() {
                    error_reply(option, rep::ERR_INVALID, "LIST takes no data", out);
                    return Step::Continue;
                }
                let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                d.extend_from_slice(e.name.as_bytes());
                d.extend_from_slice(e.description.as_bytes());
                wire::emit_option_reply(option, rep::SERVER, &d, out);
                wire::emit_option_reply(option, rep::ACK, &[], out);
                Step::Continue
            }
            opt::INFO | opt::GO => {
                let req = match InfoRequest::parse(data) {
                    Ok(r) => r,
                    Err(_) => {
                        error_reply(option, rep::ERR_INVALID, "malformed INFO/GO data", out);
                        return Step::Continue;
                    }
                };
                if !self.name_matches(req.name) {
                    error_reply(option, rep::ERR_UNKNOWN, "no such export", out);
                    return Step::Continue;
                }
                wire::emit_option_reply(
                    option,
                    rep::INFO,
                    &wire::info_export(e.size, e.flags),
                    out,
                );
                if req.requests.contains(&info::NAME) {
                    let mut d = info::NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    wire::emit_option_reply(option, rep::INFO, &d, out);
                }
                if req.requests.contains(&info::DESCRIPTION) && !e.description.is_empty() {
                    let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(e.description.as_bytes());
                    wire::emit_option_reply(option, rep::INFO, &d, out);
                }
                if req.requests.contains(&info::BLOCK_SIZE) {
                    let b = wire::info_block_size(e.min_block, e.preferred_block, e.max_payload);
                    wire::emit_option_reply(option, rep::INFO, &b, out);
                }
                wire::emit_option_reply(option, rep::ACK, &[], out);
                if option == opt::GO {
                    Step::Transmission
                } else {
                    Step::Continue
                }
            }
            _ => {
                if !self.fixed {
                    // Plain newstyle clients do not understand error replies.
                    return Step::Close(format!(
                        "unsupported option {option} from a non-fixed-newstyle client"
                    ));
                }
                error_reply(option, rep::ERR_UNSUP, "option not supported", out);
                Step::Continue
            }
        }
    }
}

impl Handshake {
    fn starttls(&mut self, data: &[u8], out: &mut Vec<u8>) -> Step {
        let option = opt::STARTTLS;
        if self.tls == TlsPolicy::Off {
            error_reply(
                option,
                rep::ERR_UNSUP,
                "TLS is not configured on this server",
                out,
            );
        } else if self.tls_active {
            error_reply(option, rep::ERR_INVALID, "TLS is already active", out);
        } else if !data.is_empty() {
            error_reply(option, rep::ERR_INVALID, "STARTTLS takes no data", out);
        } else {
            wire::emit_option_reply(option, rep::ACK, &[], out);
            return Step::StartTls;
        }
        Step::Continue
    }
}

fn error_reply(option: u32, kind: u32, msg: &str, out: &mut Vec<u8>) {
    wire::emit_option_reply(option, kind, msg.as_bytes(), out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::tflags;
    use proptest::prelude::*;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "lun0".into(),
            description: "test".into(),
            size: 1 << 20,
            flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH,
            min_block: 512,
            preferred_block: 4096,
            max_payload: 1 << 25,
        }
    }

    fn start() -> Handshake {
        let mut out = Vec::new();
        let h = Handshake::new(export(), &mut out);
        assert_eq!(out.len(), 18);
        h
    }

    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while let Some((r, n)) = wire::parse_option_reply(b) {
            v.push((r.option, r.reply_type, r.data.to_vec()));
            b = &b[n..];
        }
        assert!(b.is_empty(), "trailing bytes");
        v
    }

    fn go(name: &[u8], reqs: Vec<u16>) -> Vec<u8> {
        let mut d = Vec::new();
        InfoRequest {
            name,
            requests: reqs,
        }
        .emit(&mut d);
        let mut v = Vec::new();
        wire::emit_option(opt::GO, &d, &mut v);
        v
    }

    #[test]
    fn go_with_block_size_enters_transmission() {
        let mut h = start();
        let mut input = vec![0, 0, 0, 3];
        let mut list = Vec::new();
        wire::emit_option(opt::LIST, &[], &mut list);
        input.extend_from_slice(&list);
        input.extend_from_slice(&go(b"", vec![info::BLOCK_SIZE, info::NAME]));
        // Byte by byte: framing must not depend on read sizes.
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut step = Step::Continue;
        for &b in &input {
            buf.push(b);
            let (n, s) = h.feed(&buf, &mut out).unwrap();
            buf.drain(..n);
            step = s;
            if step != Step::Continue {
                break;
            }
        }
        assert_eq!(step, Step::Transmission);
        assert!(buf.is_empty());
        assert!(h.no_zeroes());
        let r = replies(&out);
        let kinds: Vec<_> = r.iter().map(|x| (x.0, x.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (opt::LIST, rep::SERVER),
                (opt::LIST, rep::ACK),
                (opt::GO, rep::INFO),
                (opt::GO, rep::INFO),
                (opt::GO, rep::INFO),
                (opt::GO, rep::ACK)
            ]
        );
        assert_eq!(&r[0].2[..4], &[0, 0, 0, 4]);
        assert_eq!(r[2].2, wire::info_export(1 << 20, export().flags).to_vec());
        assert_eq!(&r[3].2[2..], b"lun0");
        assert_eq!(r[4].2, wire::info_block_size(512, 4096, 1 << 25).to_vec());
    }

    #[test]
    fn unknown_export_and_bad_data_are_errors_not_closes() {
        let mut h = start();
        let mut out = Vec::new();
        let mut input = vec![0, 0, 0, 1];
        input.extend_from_slice(&go(b"other", vec![]));
        let mut bad = Vec::new();
        wire::emit_option(opt::INFO, &[0, 0], &mut bad);
        input.extend_from_slice(&bad);
        let mut unknown = Vec::new();
        wire::emit_option(99, b"zz", &mut unknown);
        input.extend_from_slice(&unknown);
        let (n, step) = h.feed(&input, &mut out).unwrap();
        assert_eq!((n, step), (input.len(), Step::Continue));
        let r = replies(&out);
        assert_eq!(r[0].1, rep::ERR_UNKNOWN);
        assert_eq!(r[1].1, rep::ERR_INVALID);
        assert_eq!(r[2].1, rep::ERR_UNSUP);
        assert!(!h.no_zeroes());
    }

    #[test]
    fn export_name_and_abort() {
        let mut h = start();
        let mut out = Vec::new();
        let mut input = vec![0, 0, 0, 1];
        wire::emit_option(opt::EXPORT_NAME, b"lun0", &mut input);
        let (_, step) = h.feed(&input, &mut out).unwrap();
        assert_eq!(step, Step::Transmission);
        assert_eq!(out.len(), 8 + 2 + 124);

        let mut h = start();
        let mut out = Vec::new();
        let mut input = vec![0, 0, 0, 3];
        wire::emit_option(opt::EXPORT_NAME, b"nope", &mut input);
        assert!(matches!(
            h.feed(&input, &mut out).unwrap().1,
            Step::Close(_)
        ));
        assert!(out.is_empty());

        let mut h = start();
        let mut out = Vec::new();
        let mut input = vec![0, 0, 0, 3];
        wire::emit_option(opt::ABORT, &[], &mut input);
        assert!(matches!(
            h.feed(&input, &mut out).unwrap().1,
            Step::Close(_)
        ));
        assert_eq!(replies(&out)[0].1, rep::ACK);
    }

    #[test]
    fn garbage_is_an_error() {
        let mut h = start();
        let mut out = Vec::new();
        assert!(h.feed(&[0, 0, 0, 0x10], &mut out).is_err());
        let mut h = start();
        let mut input = vec![0, 0, 0, 1];
        input.extend_from_slice(&[0xff; 16]);
        assert!(h.feed(&input, &mut out).is_err());
    }

    fn option(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        wire::emit_option(o, data, &mut v);
        v
    }

    fn start_tls(policy: TlsPolicy) -> Handshake {
        let mut out = Vec::new();
        Handshake::with_tls(export(), policy, &mut out)
    }

    #[test]
    fn starttls_without_tls_configured_is_unsupported() {
        let mut h = start();
        let mut out = Vec::new();
        let mut input = vec![0, 0, 0, 3];
        input.extend_from_slice(&option(opt::STARTTLS, &[]));
        let (n, step) = h.feed(&input, &mut out).unwrap();
        assert_eq!((n, step), (input.len(), Step::Continue));
        assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
    }

    #[test]
    fn require_refuses_everything_but_starttls_then_serves_over_tls() {
        let mut h = start_tls(TlsPolicy::Require);
        let mut out = Vec::new();
        let mut input = vec![0, 0, 0, 3];
        input.extend_from_slice(&option(opt::LIST, &[]));
        input.extend_from_slice(&go(b"", vec![]));
        input.extend_from_slice(&option(opt::STARTTLS, b"x"));
        input.extend_from_slice(&option(opt::STARTTLS, &[]));
        let tls_hello = [0x16, 0x03, 0x01, 0x00];
        input.extend_from_slice(&tls_hello);
        let (n, step) = h.feed(&input, &mut out).unwrap();
        assert_eq!(step, Step::StartTls);
        // The TLS record after STARTTLS is left for the TLS layer.
        assert_eq!(n, input.len() - tls_hello.len());
        let kinds: Vec<_> = replies(&out).iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (opt::LIST, rep::ERR_TLS_REQD),
                (opt::GO, rep::ERR_TLS_REQD),
                (opt::STARTTLS, rep::ERR_INVALID),
                (opt::STARTTLS, rep::ACK),
            ]
        );
        assert!(!h.tls_active());
        h.tls_started();
        let mut out = Vec::new();
        let mut input = option(opt::STARTTLS, &[]);
        input.extend_from_slice(&go(b"lun0", vec![]));
        let (n, step) = h.feed(&input, &mut out).unwrap();
        assert_eq!((n, step), (input.len(), Step::Transmission));
        let kinds: Vec<_> = replies(&out).iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (opt::STARTTLS, rep::ERR_INVALID),
                (opt::GO, rep::INFO),
                (opt::GO, rep::ACK)
            ]
        );
    }

    #[test]
    fn require_closes_export_name_without_tls_and_allow_serves_it() {
        let mut input = vec![0, 0, 0, 3];
        input.extend_from_slice(&option(opt::EXPORT_NAME, b""));
        let mut out = Vec::new();
        let step = start_tls(TlsPolicy::Require)
            .feed(&input, &mut out)
            .unwrap()
            .1;
        assert!(matches!(step, Step::Close(ref why) if why.contains("TLS is required")));
        assert!(out.is_empty());
        let step = start_tls(TlsPolicy::Allow)
            .feed(&input, &mut out)
            .unwrap()
            .1;
        assert_eq!(step, Step::Transmission);
        // Allow also upgrades on request.
        let mut out = Vec::new();
        let mut input = vec![0, 0, 0, 3];
        input.extend_from_slice(&option(opt::STARTTLS, &[]));
        let step = start_tls(TlsPolicy::Allow)
            .feed(&input, &mut out)
            .unwrap()
            .1;
        assert_eq!(step, Step::StartTls);
        assert_eq!(replies(&out)[0].1, rep::ACK);
    }

    #[test]
    fn require_aborts_cleanly_and_closes_plain_newstyle_clients() {
        let mut out = Vec::new();
        let mut input = vec![0, 0, 0, 3];
        input.extend_from_slice(&option(opt::ABORT, &[]));
        let step = start_tls(TlsPolicy::Require)
            .feed(&input, &mut out)
            .unwrap()
            .1;
        assert!(matches!(step, Step::Close(_)));
        assert_eq!(replies(&out)[0].1, rep::ACK);
        let mut input = vec![0, 0, 0, 2];
        input.extend_from_slice(&option(opt::LIST, &[]));
        let step = start_tls(TlsPolicy::Require)
            .feed(&input, &mut Vec::new())
            .unwrap()
            .1;
        assert!(matches!(step, Step::Close(ref why) if why.contains("TLS")));
    }

    proptest! {
        #[test]
        fn no_panic_on_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut h = start();
            let mut out = Vec::new();
            let _ = h.feed(&b, &mut out);
            let mut h = start();
            let mut with_flags = vec![0, 0, 0, 1];
            with_flags.extend_from_slice(&b);
            let _ = h.feed(&with_flags, &mut out);
        }

        #[test]
        fn no_panic_on_any_option(option in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut h = start();
            let mut out = Vec::new();
            let mut input = vec![0, 0, 0, 3];
            wire::emit_option(option, &data, &mut input);
            let (n, _) = h.feed(&input, &mut out).unwrap();
            prop_assert_eq!(n, input.len());
        }
    }
}
