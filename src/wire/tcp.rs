//! TCP segments (RFC 9293) with the MSS, window scale (RFC 7323), SACK
//! (RFC 2018) and timestamp (RFC 7323) options.

use super::ipv4::protocol;
use super::packet::{checksum, Checksum, PacketError};
use std::cmp::Ordering;
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::{Add, AddAssign, Sub};

pub const HEADER_LEN: usize = 20;
/// Option space is limited by the 4-bit data offset.
pub const MAX_OPTIONS_LEN: usize = 40;
/// Largest window scale shift (RFC 7323 §2.3).
pub const MAX_WINDOW_SCALE: u8 = 14;
/// At most this many SACK blocks are carried in one segment.
pub const MAX_SACK_BLOCKS: usize = 4;

/// A TCP sequence number with RFC 1982 serial arithmetic. Ordering is only
/// meaningful for numbers less than 2^31 apart, so there is no `Ord`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SeqNumber(pub u32);

impl SeqNumber {
    /// Signed distance `self - earlier`.
    pub fn wrapping_diff(self, earlier: SeqNumber) -> i32 {
        self.0.wrapping_sub(earlier.0) as i32
    }
    /// Bytes from `earlier` to `self`; 0 when `earlier` is after `self`.
    pub fn since(self, earlier: SeqNumber) -> usize {
        usize::try_from(self.wrapping_diff(earlier)).unwrap_or(0)
    }
    pub fn max(self, other: SeqNumber) -> SeqNumber {
        if self.wrapping_diff(other) >= 0 {
            self
        } else {
            other
        }
    }
    pub fn min(self, other: SeqNumber) -> SeqNumber {
        if self.wrapping_diff(other) <= 0 {
            self
        } else {
            other
        }
    }
}

impl PartialOrd for SeqNumber {
    fn partial_cmp(&self, other: &SeqNumber) -> Option<Ordering> {
        Some(self.wrapping_diff(*other).cmp(&0))
    }
}

impl Add<usize> for SeqNumber {
    type Output = SeqNumber;
    fn add(self, rhs: usize) -> SeqNumber {
        // Callers add lengths of at most a window; truncation is the wrap.
        SeqNumber(self.0.wrapping_add(rhs as u32))
    }
}

impl AddAssign<usize> for SeqNumber {
    fn add_assign(&mut self, rhs: usize) {
        *self = *self + rhs;
    }
}

impl Sub<usize> for SeqNumber {
    type Output = SeqNumber;
    fn sub(self, rhs: usize) -> SeqNumber {
        SeqNumber(self.0.wrapping_sub(rhs as u32))
    }
}

impl fmt::Display for SeqNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

mod field {
    use std::ops::Range;
    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const SEQ_NUM: Range<usize> = 4..8;
    pub const ACK_NUM: Range<usize> = 8..12;
    pub const FLAGS: Range<usize> = 12..14;
    pub const WIN_SIZE: Range<usize> = 14..16;
    pub const CHECKSUM: Range<usize> = 16..18;
    pub const URGENT: Range<usize> = 18..20;
}

pub mod flag {
    pub const FIN: u16 = 0x001;
    pub const SYN: u16 = 0x002;
    pub const RST: u16 = 0x004;
    pub const PSH: u16 = 0x008;
    pub const ACK: u16 = 0x010;
    pub const URG: u16 = 0x020;
}

mod option_kind {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WINDOW_SCALE: u8 = 3;
    pub const SACK_PERMITTED: u8 = 4;
    pub const SACK: u8 = 5;
    pub const TIMESTAMP: u8 = 8;
}

/// A view of a TCP segment.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Checks the buffer holds the whole header, options included.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, PacketError> {
        let packet = Packet { buffer };
        let bytes = packet.buffer.as_ref();
        let len = bytes.len();
        // The data offset read from the fixed 20 bytes (one bounds check).
        let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(PacketError::Truncated);
        };
        let header_len = usize::from(h[field::FLAGS.start] >> 4) * 4;
        if header_len < HEADER_LEN {
            return Err(PacketError::Malformed);
        }
        if len < header_len {
            return Err(PacketError::Truncated);
        }
        Ok(packet)
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    fn u16_at(&self, r: std::ops::Range<usize>) -> u16 {
        match self.bytes().get(r) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]),
            None => 0,
        }
    }
    fn u32_at(&self, r: std::ops::Range<usize>) -> u32 {
        match self.bytes().get(r) {
            Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    pub fn src_port(&self) -> u16 {
        self.u16_at(field::SRC_PORT)
    }
    pub fn dst_port(&self) -> u16 {
        self.u16_at(field::DST_PORT)
    }
    pub fn seq_number(&self) -> SeqNumber {
        SeqNumber(self.u32_at(field::SEQ_NUM))
    }
    pub fn ack_number(&self) -> SeqNumber {
        SeqNumber(self.u32_at(field::ACK_NUM))
    }
    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> u8 {
        (self.u16_at(field::FLAGS) >> 12) as u8 * 4
    }
    /// The flag bits (low 12 bits of the offset/flags word).
    pub fn flags(&self) -> u16 {
        self.u16_at(field::FLAGS) & 0x0fff
    }
    pub fn fin(&self) -> bool {
        self.flags() & flag::FIN != 0
    }
    pub fn syn(&self) -> bool {
        self.flags() & flag::SYN != 0
    }
    pub fn rst(&self) -> bool {
        self.flags() & flag::RST != 0
    }
    pub fn psh(&self) -> bool {
        self.flags() & flag::PSH != 0
    }
    pub fn ack(&self) -> bool {
        self.flags() & flag::ACK != 0
    }
    pub fn window_len(&self) -> u16 {
        self.u16_at(field::WIN_SIZE)
    }
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }
    pub fn urgent_at(&self) -> u16 {
        self.u16_at(field::URGENT)
    }
    pub fn options(&self) -> &[u8] {
        self.bytes()
            .get(HEADER_LEN..usize::from(self.header_len()))
            .unwrap_or(&[])
    }
    pub fn payload(&self) -> &[u8] {
        self.bytes()
            .get(usize::from(self.header_len())..)
            .unwrap_or(&[])
    }
    /// Sequence space the segment occupies (payload + SYN + FIN).
    pub fn segment_len(&self) -> usize {
        self.payload().len() + usize::from(self.syn()) + usize::from(self.fin())
    }
    /// Verifies the checksum over the pseudo header and the whole buffer.
    #[inline]
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let len = self.bytes().len() as u32;
        let pseudo = checksum::pseudo_header(src, dst, protocol::TCP, len);
        checksum::fold(checksum::sum_with(pseudo, self.bytes())) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_checksum(&mut self, value: u16) {
        if let Some(b) = self.buffer.as_mut().get_mut(field::CHECKSUM) {
            b.copy_from_slice(&value.to_be_bytes());
        }
    }
    pub fn set_seq_number(&mut self, seq: SeqNumber) {
        if let Some(b) = self.buffer.as_mut().get_mut(field::SEQ_NUM) {
            b.copy_from_slice(&seq.0.to_be_bytes());
        }
    }
    /// Replaces the flag bits, keeping the data offset.
    pub fn set_flags(&mut self, flags: u16) {
        let word = (self.u16_at(field::FLAGS) & 0xf000) | (flags & 0x0fff);
        if let Some(b) = self.buffer.as_mut().get_mut(field::FLAGS) {
            b.copy_from_slice(&word.to_be_bytes());
        }
    }
    /// Computes and writes the full checksum.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let len = self.bytes().len() as u32;
        let sum = checksum::combine(&[
            checksum::pseudo_header(src, dst, protocol::TCP, len),
            checksum::sum(self.bytes()),
        ]);
        self.set_checksum(checksum::finish(sum));
    }
}

/// Pseudo-header sum a NIC expects in the checksum field for TCP checksum
/// offload. With TSO the TCP length is left out (the NIC adds it per segment).
pub fn offload_pseudo_header_checksum(src: Ipv4Addr, dst: Ipv4Addr, tcp_len: Option<usize>) -> u16 {
    let len = tcp_len.map_or(0, |l| l as u32);
    checksum::fold(checksum::pseudo_header(src, dst, protocol::TCP, len))
}

/// The control flags the stack acts on (URG/ECE/CWR are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub psh: bool,
}

/// RFC 7323 timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpTimestamp {
    pub tsval: u32,
    pub tsecr: u32,
}

/// Up to four SACK blocks (left edge, right edge), in order of importance.
#[derive(Debug, Clone, Copy, Default)]
pub struct SackBlocks {
    blocks: [(SeqNumber, SeqNumber); MAX_SACK_BLOCKS],
    len: u8,
}

impl PartialEq for SackBlocks {
    fn eq(&self, other: &SackBlocks) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for SackBlocks {}

impl SackBlocks {
    pub fn push(&mut self, left: SeqNumber, right: SeqNumber) -> bool {
        let len = usize::from(self.len);
        if len >= MAX_SACK_BLOCKS {
            return false;
        }
        self.blocks[len] = (left, right);
        self.len += 1;
        true
    }
    pub fn as_slice(&self) -> &[(SeqNumber, SeqNumber)] {
        &self.blocks[..usize::from(self.len).min(MAX_SACK_BLOCKS)]
    }
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len as u8);
    }
}

/// The options the stack understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpOptions {
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    pub sack_blocks: SackBlocks,
    pub timestamp: Option<TcpTimestamp>,
}

impl TcpOptions {
    /// Parses the option bytes. Unknown options are skipped.
    #[inline]
    pub fn parse(data: &[u8]) -> Result<TcpOptions, PacketError> {
        // The common case on an established connection: NOP NOP and a
        // timestamp, the layout `emit` writes (and Linux does).
        if let Some((&[option_kind::NOP, option_kind::NOP, option_kind::TIMESTAMP, 10], ts)) =
            data.split_first_chunk::<4>()
        {
            if let Ok(&[a0, a1, a2, a3, b0, b1, b2, b3]) = <&[u8; 8]>::try_from(ts) {
                return Ok(TcpOptions {
                    timestamp: Some(TcpTimestamp {
                        tsval: u32::from_be_bytes([a0, a1, a2, a3]),
                        tsecr: u32::from_be_bytes([b0, b1, b2, b3]),
                    }),
                    ..TcpOptions::default()
                });
            }
        }
        TcpOptions::parse_any(data)
    }

    /// The general parser: any options in any order.
    #[inline(never)]
    fn parse_any(mut data: &[u8]) -> Result<TcpOptions, PacketError> {
        let mut opts = TcpOptions::default();
        while let Some(&kind) = data.first() {
            match kind {
                option_kind::END => break,
                option_kind::NOP => {
                    data = &data[1..];
                    continue;
                }
                _ => {}
            }
            let len = usize::from(*data.get(1).ok_or(PacketError::Malformed)?);
            if len < 2 || len > data.len() {
                return Err(PacketError::Malformed);
            }
            let body = &data[2..len];
            match (kind, body.len()) {
                (option_kind::MSS, 2) => opts.mss = Some(u16::from_be_bytes([body[0], body[1]])),
                (option_kind::WINDOW_SCALE, 1) => {
                    opts.window_scale = Some(body[0].min(MAX_WINDOW_SCALE))
                }
                (option_kind::SACK_PERMITTED, 0) => opts.sack_permitted = true,
                (option_kind::SACK, n) if n % 8 == 0 && n > 0 => {
                    opts.sack_blocks.clear();
                    for block in body.chunks_exact(8) {
                        let left = u32::from_be_bytes([block[0], block[1], block[2], block[3]]);
                        let right = u32::from_be_bytes([block[4], block[5], block[6], block[7]]);
                        opts.sack_blocks.push(SeqNumber(left), SeqNumber(right));
                    }
                }
                (option_kind::TIMESTAMP, 8) => {
                    opts.timestamp = Some(TcpTimestamp {
                        tsval: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                        tsecr: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    })
                }
                (option_kind::MSS | option_kind::WINDOW_SCALE | option_kind::SACK_PERMITTED, _)
                | (option_kind::SACK | option_kind::TIMESTAMP, _) => {
                    return Err(PacketError::Malformed)
                }
                _ => {}
            }
            data = &data[len..];
        }
        Ok(opts)
    }

    fn base_len(&self) -> usize {
        let mut len = 0;
        if self.mss.is_some() {
            len += 4;
        }
        if self.window_scale.is_some() {
            len += 4;
        }
        len += match (self.sack_permitted, self.timestamp.is_some()) {
            (_, true) => 12,
            (true, false) => 4,
            (false, false) => 0,
        };
        len
    }

    /// SACK blocks that fit after the other options.
    fn sack_blocks_emitted(&self) -> usize {
        let room = MAX_OPTIONS_LEN.saturating_sub(self.base_len() + 4);
        self.sack_blocks.len().min(room / 8)
    }

    /// Bytes the options take on the wire (a multiple of 4).
    pub fn buffer_len(&self) -> usize {
        let blocks = self.sack_blocks_emitted();
        self.base_len() + if blocks > 0 { 4 + 8 * blocks } else { 0 }
    }

    /// Writes `buffer_len()` bytes, NOP-aligned as common stacks do.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), PacketError> {
        let len = self.buffer_len();
        let b = buf.get_mut(..len).ok_or(PacketError::BufferTooSmall)?;
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            b[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        if let Some(mss) = self.mss {
            let m = mss.to_be_bytes();
            put(&[option_kind::MSS, 4, m[0], m[1]]);
        }
        match (self.sack_permitted, self.timestamp) {
            (sack, Some(ts)) => {
                if sack {
                    put(&[option_kind::SACK_PERMITTED, 2]);
                } else {
                    put(&[option_kind::NOP, option_kind::NOP]);
                }
                put(&[option_kind::TIMESTAMP, 10]);
                put(&ts.tsval.to_be_bytes());
                put(&ts.tsecr.to_be_bytes());
            }
            (true, None) => put(&[
                option_kind::NOP,
                option_kind::NOP,
                option_kind::SACK_PERMITTED,
                2,
            ]),
            (false, None) => {}
        }
        if let Some(shift) = self.window_scale {
            put(&[option_kind::NOP, option_kind::WINDOW_SCALE, 3, shift]);
        }
        let blocks = self.sack_blocks_emitted();
        if blocks > 0 {
            put(&[
                option_kind::NOP,
                option_kind::NOP,
                option_kind::SACK,
                (2 + 8 * blocks) as u8,
            ]);
            for &(left, right) in &self.sack_blocks.as_slice()[..blocks] {
                put(&left.0.to_be_bytes());
                put(&right.0.to_be_bytes());
            }
        }
        Ok(())
    }
}

/// A parsed TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpRepr<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub flags: TcpFlags,
    pub seq_number: SeqNumber,
    pub ack_number: Option<SeqNumber>,
    pub window_len: u16,
    pub options: TcpOptions,
    pub payload: &'a [u8],
}

impl<'a> TcpRepr<'a> {
    /// Parses a checked segment, verifying the checksum unless told not to.
    ///
    /// The fixed header is decoded once from its 20 bytes (one bounds
    /// check, each field read once), and the function is inlined into the
    /// receive path so the `TcpRepr` is built in place.
    #[inline]
    pub fn parse(
        packet: &Packet<&'a [u8]>,
        src_addr: Ipv4Addr,
        dst_addr: Ipv4Addr,
        checksum: Checksum,
    ) -> Result<Self, PacketError> {
        if checksum.verify_rx() && !packet.verify_checksum(src_addr, dst_addr) {
            return Err(PacketError::Checksum);
        }
        let buffer: &'a [u8] = packet.buffer;
        // Shorter than a header: only through `new_unchecked`; ports of 0.
        let h = buffer
            .first_chunk::<HEADER_LEN>()
            .ok_or(PacketError::Malformed)?;
        let be16 = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
        let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let (src_port, dst_port) = (be16(field::SRC_PORT.start), be16(field::DST_PORT.start));
        if src_port == 0 || dst_port == 0 {
            return Err(PacketError::Malformed);
        }
        let word = be16(field::FLAGS.start);
        let bits = word & 0x0fff;
        let flags = TcpFlags {
            syn: bits & flag::SYN != 0,
            fin: bits & flag::FIN != 0,
            rst: bits & flag::RST != 0,
            psh: bits & flag::PSH != 0,
        };
        if flags.syn && (flags.fin || flags.rst) {
            return Err(PacketError::Malformed);
        }
        let header_len = usize::from(word >> 12) * 4;
        let options = buffer.get(HEADER_LEN..header_len).unwrap_or(&[]);
        Ok(TcpRepr {
            src_port,
            dst_port,
            flags,
            seq_number: SeqNumber(be32(field::SEQ_NUM.start)),
            ack_number: (bits & flag::ACK != 0).then(|| SeqNumber(be32(field::ACK_NUM.start))),
            window_len: be16(field::WIN_SIZE.start),
            options: TcpOptions::parse(options)?,
            payload: buffer.get(header_len..).unwrap_or(&[]),
        })
    }

    pub fn header_len(&self) -> usize {
        HEADER_LEN + self.options.buffer_len()
    }

    pub fn buffer_len(&self) -> usize {
        self.header_len() + self.payload.len()
    }

    /// Sequence space the segment occupies.
    pub fn segment_len(&self) -> usize {
        self.payload.len() + usize::from(self.flags.syn) + usize::from(self.flags.fin)
    }

    /// Writes header, options and payload into `buf[..buffer_len()]`.
    /// `Checksum::Both`/`Tx` computes the checksum; otherwise the field is
    /// left zero for the caller (offload) to fill.
    pub fn emit(
        &self,
        buf: &mut [u8],
        src_addr: Ipv4Addr,
        dst_addr: Ipv4Addr,
        checksum: Checksum,
    ) -> Result<(), PacketError> {
        let header_len = self.header_len();
        let total = self.buffer_len();
        let b = buf.get_mut(..total).ok_or(PacketError::BufferTooSmall)?;
        b[field::SRC_PORT].copy_from_slice(&self.src_port.to_be_bytes());
        b[field::DST_PORT].copy_from_slice(&self.dst_port.to_be_bytes());
        b[field::SEQ_NUM].copy_from_slice(&self.seq_number.0.to_be_bytes());
        b[field::ACK_NUM].copy_from_slice(&self.ack_number.unwrap_or_default().0.to_be_bytes());
        let mut flags = 0u16;
        for (set, bit) in [
            (self.flags.fin, flag::FIN),
            (self.flags.syn, flag::SYN),
            (self.flags.rst, flag::RST),
            (self.flags.psh, flag::PSH),
            (self.ack_number.is_some(), flag::ACK),
        ] {
            if set {
                flags |= bit;
            }
        }
        let word = ((header_len as u16 / 4) << 12) | flags;
        b[field::FLAGS].copy_from_slice(&word.to_be_bytes());
        b[field::WIN_SIZE].copy_from_slice(&self.window_len.to_be_bytes());
        b[field::CHECKSUM].copy_from_slice(&[0, 0]);
        b[field::URGENT].copy_from_slice(&[0, 0]);
        self.options.emit(&mut b[HEADER_LEN..header_len])?;
        b[header_len..].copy_from_slice(self.payload);
        if checksum.compute_tx() {
            Packet::new_unchecked(b).fill_checksum(src_addr, dst_addr);
        }
        Ok(())
    }
}

impl TcpRepr<'_> {
    /// [`emit`](Self::emit) with the payload given as `pieces`, written one
    /// after the other after the header (`self.payload` must be empty; the
    /// segment is `header_len()` plus the pieces' bytes long). The
    /// checksum, when computed, takes each piece's sum as it is copied into
    /// the frame: no second pass over the whole segment.
    pub fn emit_gather(
        &self,
        buf: &mut [u8],
        pieces: &[&[u8]],
        src_addr: Ipv4Addr,
        dst_addr: Ipv4Addr,
        checksum: Checksum,
    ) -> Result<(), PacketError> {
        if !self.payload.is_empty() {
            return Err(PacketError::Malformed);
        }
        let header_len = self.header_len();
        let total = header_len + pieces.iter().map(|p| p.len()).sum::<usize>();
        let b = buf.get_mut(..total).ok_or(PacketError::BufferTooSmall)?;
        self.emit(&mut b[..header_len], src_addr, dst_addr, Checksum::None)?;
        let compute = checksum.compute_tx();
        let mut acc = if compute {
            checksum::combine(&[
                checksum::pseudo_header(src_addr, dst_addr, protocol::TCP, total as u32),
                checksum::sum(&b[..header_len]),
            ])
        } else {
            0
        };
        let mut at = header_len;
        for piece in pieces {
            let out = &mut b[at..at + piece.len()];
            if compute {
                // One pass: the checksum is taken as the bytes are copied.
                acc = checksum::combine(&[acc, checksum::copy_and_sum_at(out, piece, at)]);
            } else {
                out.copy_from_slice(piece);
            }
            at += piece.len();
        }
        if compute {
            Packet::new_unchecked(b).set_checksum(checksum::finish(acc));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

    #[test]
    fn serial_arithmetic_wraps() {
        let a = SeqNumber(u32::MAX - 1);
        let b = a + 4;
        assert_eq!(b, SeqNumber(2));
        assert!(a < b);
        assert!(b > a);
        assert_eq!(b.since(a), 4);
        assert_eq!(a.since(b), 0);
        assert_eq!(a.max(b), b);
        assert_eq!(b - 4, a);
    }

    #[test]
    fn syn_options_round_trip() {
        let mut opts = TcpOptions {
            mss: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            timestamp: Some(TcpTimestamp { tsval: 1, tsecr: 0 }),
            ..Default::default()
        };
        assert_eq!(opts.buffer_len(), 20);
        let mut buf = [0u8; 40];
        opts.emit(&mut buf).unwrap();
        assert_eq!(TcpOptions::parse(&buf[..20]).unwrap(), opts);
        opts.sack_blocks.push(SeqNumber(1), SeqNumber(2));
        assert_eq!(opts.buffer_len(), 32);
    }

    #[test]
    fn sack_blocks_limited_by_option_space() {
        let mut opts = TcpOptions {
            timestamp: Some(TcpTimestamp::default()),
            ..Default::default()
        };
        for i in 0..4 {
            opts.sack_blocks
                .push(SeqNumber(i * 10), SeqNumber(i * 10 + 5));
        }
        assert_eq!(opts.buffer_len(), 40); // 12 + 4 + 3 * 8
        let mut buf = [0u8; 40];
        opts.emit(&mut buf).unwrap();
        let parsed = TcpOptions::parse(&buf).unwrap();
        assert_eq!(parsed.sack_blocks.len(), 3);
    }

    /// The timestamp-only fast path gives what the general parser gives,
    /// and anything else (a longer or shorter run, another layout) goes
    /// to the general parser.
    #[test]
    fn timestamp_fast_path_agrees_with_the_general_parser() {
        let ts = [1, 1, 8, 10, 0x80, 0, 0, 1, 0xff, 0xff, 0xff, 0xfe];
        let fast = TcpOptions::parse(&ts).unwrap();
        assert_eq!(fast, TcpOptions::parse_any(&ts).unwrap());
        assert_eq!(
            fast.timestamp,
            Some(TcpTimestamp {
                tsval: 0x8000_0001,
                tsecr: 0xffff_fffe
            })
        );
        let mut with_sack = ts.to_vec();
        with_sack.extend_from_slice(&[1, 1, 5, 10, 0, 0, 0, 5, 0, 0, 0, 9]);
        let parsed = TcpOptions::parse(&with_sack).unwrap();
        assert_eq!(parsed, TcpOptions::parse_any(&with_sack).unwrap());
        assert_eq!(
            parsed.sack_blocks.as_slice(),
            &[(SeqNumber(5), SeqNumber(9))]
        );
        assert_eq!(parsed.timestamp, fast.timestamp);
        assert_eq!(TcpOptions::parse(&ts[..11]), Err(PacketError::Malformed));
        let mut bad_len = ts;
        bad_len[3] = 9;
        assert_eq!(TcpOptions::parse(&bad_len), Err(PacketError::Malformed));
    }

    #[test]
    fn malformed_options_rejected() {
        assert_eq!(TcpOptions::parse(&[2, 4, 5]), Err(PacketError::Malformed));
        assert_eq!(TcpOptions::parse(&[2, 1]), Err(PacketError::Malformed));
        assert_eq!(TcpOptions::parse(&[2, 3, 5]), Err(PacketError::Malformed));
        assert_eq!(TcpOptions::parse(&[99]), Err(PacketError::Malformed));
        assert_eq!(
            TcpOptions::parse(&[3, 3, 30]).unwrap().window_scale,
            Some(14)
        );
        assert!(TcpOptions::parse(&[99, 3, 0, 1, 0]).is_ok());
    }

    #[test]
    fn checksum_detects_corruption_and_can_be_skipped() {
        let repr = TcpRepr {
            src_port: 1,
            dst_port: 2,
            flags: TcpFlags::default(),
            seq_number: SeqNumber(10),
            ack_number: Some(SeqNumber(20)),
            window_len: 100,
            options: TcpOptions::default(),
            payload: b"hello",
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf, SRC, DST, Checksum::Both).unwrap();
        buf[21] ^= 0x40;
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(
            TcpRepr::parse(&p, SRC, DST, Checksum::Both),
            Err(PacketError::Checksum)
        );
        assert!(TcpRepr::parse(&p, SRC, DST, Checksum::Tx).is_ok());
    }

    #[test]
    fn offload_pseudo_header_completes_to_full_checksum() {
        let repr = TcpRepr {
            src_port: 1000,
            dst_port: 3260,
            flags: TcpFlags {
                psh: true,
                ..Default::default()
            },
            seq_number: SeqNumber(1),
            ack_number: Some(SeqNumber(2)),
            window_len: 1,
            options: TcpOptions::default(),
            payload: b"abc",
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf, SRC, DST, Checksum::None).unwrap();
        let len = buf.len();
        let mut p = Packet::new_unchecked(&mut buf[..]);
        p.set_checksum(offload_pseudo_header_checksum(SRC, DST, Some(len)));
        // What a NIC does: sum the segment (the field holds the pseudo sum) and invert.
        let sum = checksum::finish(checksum::sum(&buf));
        Packet::new_unchecked(&mut buf[..]).set_checksum(sum);
        assert!(Packet::new_checked(&buf[..])
            .unwrap()
            .verify_checksum(SRC, DST));
    }

    fn arb_options() -> impl Strategy<Value = TcpOptions> {
        (
            proptest::option::of(any::<u16>()),
            proptest::option::of(0u8..=14),
            any::<bool>(),
            proptest::collection::vec((any::<u32>(), any::<u32>()), 0..4),
            proptest::option::of((any::<u32>(), any::<u32>())),
        )
            .prop_map(|(mss, ws, sp, blocks, ts)| {
                let mut o = TcpOptions {
                    mss,
                    window_scale: ws,
                    sack_permitted: sp,
                    timestamp: ts.map(|(tsval, tsecr)| TcpTimestamp { tsval, tsecr }),
                    ..Default::default()
                };
                for (l, r) in blocks {
                    o.sack_blocks.push(SeqNumber(l), SeqNumber(r));
                }
                // Only the blocks that fit survive emission.
                let fit = o.sack_blocks_emitted();
                o.sack_blocks.truncate(fit);
                o
            })
    }

    proptest! {
        #[test]
        fn parse_emit_round_trip(src_port in 1u16.., dst_port in 1u16.., seq in any::<u32>(),
                                 ack in proptest::option::of(any::<u32>()), win in any::<u16>(),
                                 syn in any::<bool>(), fin in any::<bool>(), rst in any::<bool>(), psh in any::<bool>(),
                                 options in arb_options(),
                                 payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let flags = TcpFlags { syn, fin: fin && !syn, rst: rst && !syn, psh };
            let repr = TcpRepr {
                src_port, dst_port, flags, seq_number: SeqNumber(seq), ack_number: ack.map(SeqNumber),
                window_len: win, options, payload: &payload,
            };
            let mut buf = vec![0u8; repr.buffer_len()];
            repr.emit(&mut buf, SRC, DST, Checksum::Both).unwrap();
            let p = Packet::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(TcpRepr::parse(&p, SRC, DST, Checksum::Both).unwrap(), repr);
        }

        /// The one-pass header decode of `parse` reads what the view's
        /// getters read, on any bytes.
        #[test]
        fn parse_agrees_with_the_view(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let Ok(p) = Packet::new_checked(&bytes[..]) else { return Ok(()) };
            match TcpRepr::parse(&p, SRC, DST, Checksum::None) {
                Ok(r) => {
                    prop_assert_eq!((r.src_port, r.dst_port), (p.src_port(), p.dst_port()));
                    prop_assert_eq!(r.seq_number, p.seq_number());
                    prop_assert_eq!(r.ack_number, p.ack().then(|| p.ack_number()));
                    prop_assert_eq!(r.window_len, p.window_len());
                    prop_assert_eq!((r.flags.syn, r.flags.fin, r.flags.rst, r.flags.psh), (p.syn(), p.fin(), p.rst(), p.psh()));
                    prop_assert_eq!(r.payload, p.payload());
                    prop_assert_eq!(Ok(r.options), TcpOptions::parse_any(p.options()));
                }
                Err(_) => {
                    let bad_ports = p.src_port() == 0 || p.dst_port() == 0;
                    let bad_flags = p.syn() && (p.fin() || p.rst());
                    prop_assert!(bad_ports || bad_flags || TcpOptions::parse_any(p.options()).is_err());
                }
            }
        }

        #[test]
        fn gathered_payload_emits_the_same_segment(
            options in arb_options(),
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(0usize..3000, 0..5),
        ) {
            let repr = TcpRepr {
                src_port: 3260, dst_port: 50000, flags: TcpFlags { psh: true, ..TcpFlags::default() },
                seq_number: SeqNumber(7), ack_number: Some(SeqNumber(9)),
                window_len: 100, options, payload: &payload,
            };
            let mut whole = vec![0u8; repr.buffer_len()];
            repr.emit(&mut whole, SRC, DST, Checksum::Both).unwrap();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(payload.len())).collect();
            cuts.extend([0, payload.len()]);
            cuts.sort_unstable();
            let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &payload[w[0]..w[1]]).collect();
            // The buffer holds an older frame: every byte must be written.
            let mut gathered = vec![0xa5u8; repr.buffer_len()];
            TcpRepr { payload: &[], ..repr }
                .emit_gather(&mut gathered, &pieces, SRC, DST, Checksum::Both)
                .unwrap();
            prop_assert_eq!(&gathered, &whole);
            prop_assert!(Packet::new_checked(&gathered[..]).unwrap().verify_checksum(SRC, DST));
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = TcpRepr::parse(&p, SRC, DST, Checksum::Both);
                let _ = TcpRepr::parse(&p, SRC, DST, Checksum::None);
                let _ = p.segment_len();
            }
        }
    }
}
