//! NBD wire formats (sans-IO): the newstyle handshake messages, option
//! requests and replies, transmission requests and simple replies.
//!
//! Everything here parses from byte slices and emits into `Vec<u8>`; no
//! function panics on any input. See the protocol description at
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use thiserror::Error;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle handshake magic, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: leave out the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (sent with the export size).
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The medium is rotational (a hint).
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Several connections to this export see one consistent device (flush
    /// on one covers writes acknowledged on all).
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Option codes (client to server, during the handshake).
pub mod opt {
    /// Old-style selection of the export; no option reply.
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake without entering transmission.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// TLS (not supported).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Structured replies (not supported).
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export (answer to `NBD_OPT_LIST`).
    pub const SERVER: u32 = 2;
    /// One piece of export information (answer to `INFO`/`GO`).
    pub const INFO: u32 = 3;
    /// Error flag (bit 31).
    pub const ERR: u32 = 1 << 31;
    /// Unsupported option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Syntactically or semantically invalid option.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No export of that name.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// Request too big.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types in `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags (always sent).
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// A human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the request).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch (not supported).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status (needs structured replies; not supported).
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflags {
    /// Force unit access: the data is durable when the reply comes.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES`: do not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Fast zero (only with `WRITE_ZEROES`).
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// NBD error values in replies (Linux errno numbers, as the protocol fixes them).
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left (write beyond the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of an option request header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// Malformed client input. Every variant ends the connection (the stream
/// can no longer be framed), except where the caller decides otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// A request did not start with the request magic.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// An option's data is longer than we accept.
    #[error("option data of {0} bytes is too long")]
    OptionTooLong(u32),
    /// A write's payload is longer than we accept.
    #[error("write payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLong {
        /// Requested length.
        len: u32,
        /// Largest accepted.
        max: u32,
    },
    /// The client flags carry bits we do not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// Option data that does not parse.
    #[error("malformed {what} option data")]
    BadOptionData {
        /// Which option.
        what: &'static str,
    },
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// The server's opening: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
pub fn emit_server_greeting(flags: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
}

/// Parses the client's 4-byte flags; `Ok(None)` when more bytes are needed.
/// Returns the flags and the bytes consumed.
pub fn parse_client_flags(b: &[u8]) -> Result<Option<(u32, usize)>, WireError> {
    let Some(f) = be_u32(b, 0) else {
        return Ok(None);
    };
    if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(WireError::UnknownClientFlags(f));
    }
    Ok(Some((f, 4)))
}

/// One option request with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest<'a> {
    /// Option code (`opt::*`).
    pub option: u32,
    /// The option's data.
    pub data: &'a [u8],
}

/// Parses one option request; `Ok(None)` when more bytes are needed.
/// Returns the option and the bytes consumed. Options with more than
/// `max_data` bytes of data are refused (the connection should close).
pub fn parse_option(
    b: &[u8],
    max_data: u32,
) -> Result<Option<(OptionRequest<'_>, usize)>, WireError> {
    let (Some(magic), Some(option), Some(len)) = (be_u64(b, 0), be_u32(b, 8), be_u32(b, 12)) else {
        return Ok(None);
    };
    if magic != IHAVEOPT {
        return Err(WireError::BadOptionMagic(magic));
    }
    if len > max_data {
        return Err(WireError::OptionTooLong(len));
    }
    let end = OPTION_HEADER_LEN + len as usize;
    let Some(data) = b.get(OPTION_HEADER_LEN..end) else {
        return Ok(None);
    };
    Ok(Some((OptionRequest { option, data }, end)))
}

/// Emits an option request (client side; for tests and tools).
pub fn emit_option(option: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and requested
/// information types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name (may be empty: the default export).
    pub name: &'a [u8],
    /// Requested `info::*` types.
    pub requests: Vec<u16>,
}

impl<'a> InfoRequest<'a> {
    /// Parses the option data of `INFO`/`GO`.
    pub fn parse(data: &'a [u8]) -> Result<InfoRequest<'a>, WireError> {
        let bad = WireError::BadOptionData { what: "INFO/GO" };
        let name_len = be_u32(data, 0).ok_or(bad.clone())? as usize;
        let name_end = 4usize.checked_add(name_len).ok_or(bad.clone())?;
        let name = data.get(4..name_end).ok_or(bad.clone())?;
        let n = be_u16(data, name_end).ok_or(bad.clone())? as usize;
        let list_at = name_end + 2;
        if data.len() != list_at + 2 * n {
            return Err(bad);
        }
        let requests = (0..n)
            .filter_map(|i| be_u16(data, list_at + 2 * i))
            .collect();
        Ok(InfoRequest { name, requests })
    }

    /// Emits the option data (client side; for tests).
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name);
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
    }
}

/// Emits one option reply.
pub fn emit_option_reply(option: u32, reply_type: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A parsed option reply (client side; for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply<'a> {
    /// The option it answers.
    pub option: u32,
    /// `rep::*`.
    pub reply_type: u32,
    /// Reply data.
    pub data: &'a [u8],
}

/// Parses one option reply; `None` when more bytes are needed or the magic
/// is wrong (client side; for tests).
pub fn parse_option_reply(b: &[u8]) -> Option<(OptionReply<'_>, usize)> {
    if be_u64(b, 0)? != OPTION_REPLY_MAGIC {
        return None;
    }
    let option = be_u32(b, 8)?;
    let reply_type = be_u32(b, 12)?;
    let len = be_u32(b, 16)? as usize;
    let data = b.get(20..20usize.checked_add(len)?)?;
    Some((
        OptionReply {
            option,
            reply_type,
            data,
        },
        20 + len,
    ))
}

/// `NBD_INFO_EXPORT` data: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` data.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..].copy_from_slice(&max.to_be_bytes());
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes
/// unless the client asked for no zeroes.
pub fn emit_export_name_reply(size: u64, flags: u16, no_zeroes: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cflags::*`).
    pub flags: u16,
    /// Command type (`cmd::*`).
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (of the payload for writes).
    pub length: u32,
}

impl Request {
    /// Parses a request header; `Ok(None)` when fewer than 28 bytes are there.
    pub fn parse(b: &[u8]) -> Result<Option<Request>, WireError> {
        let (Some(magic), Some(flags), Some(kind), Some(handle), Some(offset), Some(length)) = (
            be_u32(b, 0),
            be_u16(b, 4),
            be_u16(b, 6),
            be_u64(b, 8),
            be_u64(b, 16),
            be_u32(b, 24),
        ) else {
            return Ok(None);
        };
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadRequestMagic(magic));
        }
        Ok(Some(Request {
            flags,
            kind,
            handle,
            offset,
            length,
        }))
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.kind == cmd::WRITE {
            self.length as usize
        } else {
            0
        }
    }

    /// Emits the header (client side; for tests).
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.handle.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// A request header, its payload, and the bytes it took on the wire.
pub type FramedRequest<'a> = (Request, &'a [u8], usize);

/// Parses one complete request with its payload. `Ok(None)` when more
/// bytes are needed; otherwise the header, the payload and the bytes consumed.
/// Write payloads over `max_payload` are refused (the stream cannot be
/// resynchronised cheaply, so the connection should close).
pub fn parse_request(b: &[u8], max_payload: u32) -> Result<Option<FramedRequest<'_>>, WireError> {
    let Some(r) = Request::parse(b)? else {
        return Ok(None);
    };
    if r.kind == cmd::WRITE && r.length > max_payload {
        return Err(WireError::PayloadTooLong {
            len: r.length,
            max: max_payload,
        });
    }
    let end = REQUEST_LEN + r.payload_len();
    match b.get(REQUEST_LEN..end) {
        Some(p) => Ok(Some((r, p, end))),
        None => Ok(None),
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&handle.to_be_bytes());
    b
}

/// Parses a simple reply header (client side; for tests): error and handle.
pub fn parse_simple_reply(b: &[u8]) -> Option<(u32, u64)> {
    if be_u32(b, 0)? != SIMPLE_REPLY_MAGIC {
        return None;
    }
    Some((be_u32(b, 4)?, be_u64(b, 8)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_layout() {
        let mut v = Vec::new();
        emit_server_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, &mut v);
        assert_eq!(&v[..8], b"NBDMAGIC");
        assert_eq!(&v[8..16], b"IHAVEOPT");
        assert_eq!(&v[16..], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(&[0, 0, 0]), Ok(None));
        assert_eq!(parse_client_flags(&[0, 0, 0, 3]), Ok(Some((3, 4))));
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 4]),
            Err(WireError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn option_framing() {
        let mut v = Vec::new();
        emit_option(opt::LIST, &[], &mut v);
        emit_option(opt::GO, b"abc", &mut v);
        let (o, n) = parse_option(&v, 4096).unwrap().unwrap();
        assert_eq!((o.option, o.data, n), (opt::LIST, &b""[..], 16));
        let (o, n2) = parse_option(&v[n..], 4096).unwrap().unwrap();
        assert_eq!((o.option, o.data, n2), (opt::GO, &b"abc"[..], 19));
        assert_eq!(parse_option(&v[n..n + 18], 4096), Ok(None));
        assert_eq!(parse_option(&v, 2).map(|_| ()), Ok(()));
        let mut big = Vec::new();
        emit_option(opt::GO, &[0; 10], &mut big);
        assert_eq!(parse_option(&big, 9), Err(WireError::OptionTooLong(10)));
        big[0] = 0;
        assert!(matches!(
            parse_option(&big, 4096),
            Err(WireError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn info_request_round_trip_and_errors() {
        let r = InfoRequest {
            name: b"disk",
            requests: vec![info::BLOCK_SIZE, info::NAME],
        };
        let mut v = Vec::new();
        r.emit(&mut v);
        assert_eq!(InfoRequest::parse(&v).unwrap(), r);
        assert!(InfoRequest::parse(&v[..v.len() - 1]).is_err());
        let mut longer = v.clone();
        longer.push(0);
        assert!(InfoRequest::parse(&longer).is_err());
        // Name length pointing past the end.
        assert!(InfoRequest::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
    }

    #[test]
    fn request_framing() {
        let r = Request {
            flags: cflags::FUA,
            kind: cmd::WRITE,
            handle: 0x1122_3344_5566_7788,
            offset: 4096,
            length: 3,
        };
        let mut v = Vec::new();
        r.emit(&mut v);
        assert_eq!(parse_request(&v, 1 << 20), Ok(None), "payload missing");
        v.extend_from_slice(b"xyz");
        let (p, payload, n) = parse_request(&v, 1 << 20).unwrap().unwrap();
        assert_eq!((p, payload, n), (r, &b"xyz"[..], 31));
        assert_eq!(
            parse_request(&v, 2),
            Err(WireError::PayloadTooLong { len: 3, max: 2 })
        );
        // A read's length is not a payload.
        let rd = Request {
            kind: cmd::READ,
            length: 1 << 30,
            ..r
        };
        let mut v = Vec::new();
        rd.emit(&mut v);
        assert_eq!(parse_request(&v, 2).unwrap().unwrap().2, 28);
        v[0] ^= 1;
        assert!(matches!(
            parse_request(&v, 2),
            Err(WireError::BadRequestMagic(_))
        ));
    }

    #[test]
    fn replies() {
        let h = simple_reply(errno::EIO, 7);
        assert_eq!(parse_simple_reply(&h), Some((5, 7)));
        let mut v = Vec::new();
        emit_option_reply(opt::GO, rep::ERR_UNKNOWN, b"no", &mut v);
        let (r, n) = parse_option_reply(&v).unwrap();
        assert_eq!(
            (r.option, r.reply_type, r.data, n),
            (7, rep::ERR_UNKNOWN, &b"no"[..], 22)
        );
        let mut v = Vec::new();
        emit_export_name_reply(1 << 20, tflags::HAS_FLAGS, false, &mut v);
        assert_eq!(v.len(), 134);
        let mut v = Vec::new();
        emit_export_name_reply(1 << 20, tflags::HAS_FLAGS, true, &mut v);
        assert_eq!(v.len(), 10);
        assert_eq!(info_export(5, 1)[..2], [0, 0]);
        assert_eq!(info_block_size(1, 2, 3)[..2], [0, 3]);
    }

    proptest! {
        #[test]
        fn no_panic_on_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..200), max in any::<u32>()) {
            let _ = parse_client_flags(&b);
            let _ = parse_option(&b, max);
            let _ = InfoRequest::parse(&b);
            let _ = parse_request(&b, max);
            let _ = parse_option_reply(&b);
            let _ = parse_simple_reply(&b);
        }

        #[test]
        fn request_round_trip(flags in any::<u16>(), kind in 0u16..10, handle in any::<u64>(), offset in any::<u64>(), length in 0u32..64) {
            let r = Request { flags, kind, handle, offset, length };
            let mut v = Vec::new();
            r.emit(&mut v);
            v.resize(v.len() + r.payload_len(), 0x5a);
            let (p, payload, n) = parse_request(&v, 64).unwrap().unwrap();
            prop_assert_eq!(p, r);
            prop_assert_eq!(payload.len(), r.payload_len());
            prop_assert_eq!(n, v.len());
        }

        #[test]
        fn info_request_round_trip(name in proptest::collection::vec(any::<u8>(), 0..40), reqs in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { name: &name, requests: reqs };
            let mut v = Vec::new();
            r.emit(&mut v);
            prop_assert_eq!(InfoRequest::parse(&v).unwrap(), r);
        }
    }
}
