//! IPv4 headers (RFC 791). Options are accepted on receive and never emitted.

use super::packet::{checksum, Checksum, PacketError};
use std::net::Ipv4Addr;

pub const HEADER_LEN: usize = 20;

pub mod protocol {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

mod field {
    use std::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLG_OFF: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC_ADDR: Range<usize> = 12..16;
    pub const DST_ADDR: Range<usize> = 16..20;
}

/// A view of an IPv4 packet. After `new_checked`, the header length and the
/// total length are consistent with the buffer.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Checks version, header length and total length against the buffer
    /// (the buffer may be longer: Ethernet padding). The fields it checks
    /// are read once from the fixed 20 bytes (one bounds check), as the
    /// receive path does for every frame.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, PacketError> {
        let packet = Packet { buffer };
        let bytes = packet.buffer.as_ref();
        let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(PacketError::Truncated);
        };
        if h[field::VER_IHL] >> 4 != 4 {
            return Err(PacketError::Unsupported);
        }
        let header_len = usize::from(h[field::VER_IHL] & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        if header_len < HEADER_LEN || total_len < header_len {
            return Err(PacketError::Malformed);
        }
        if bytes.len() < total_len {
            // (total_len >= header_len: the header is short too, or not.)
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
    fn byte(&self, i: usize) -> u8 {
        self.bytes().get(i).copied().unwrap_or(0)
    }
    fn u16_at(&self, r: std::ops::Range<usize>) -> u16 {
        match self.bytes().get(r) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]),
            None => 0,
        }
    }
    fn ip_at(&self, r: std::ops::Range<usize>) -> Ipv4Addr {
        match self.bytes().get(r) {
            Some(b) => Ipv4Addr::new(b[0], b[1], b[2], b[3]),
            None => Ipv4Addr::UNSPECIFIED,
        }
    }

    pub fn version(&self) -> u8 {
        self.byte(field::VER_IHL) >> 4
    }
    /// Header length in bytes.
    pub fn header_len(&self) -> u8 {
        (self.byte(field::VER_IHL) & 0x0f) * 4
    }
    pub fn dscp_ecn(&self) -> u8 {
        self.byte(field::DSCP_ECN)
    }
    pub fn total_len(&self) -> u16 {
        self.u16_at(field::LENGTH)
    }
    pub fn ident(&self) -> u16 {
        self.u16_at(field::IDENT)
    }
    pub fn dont_frag(&self) -> bool {
        self.u16_at(field::FLG_OFF) & 0x4000 != 0
    }
    pub fn more_frags(&self) -> bool {
        self.u16_at(field::FLG_OFF) & 0x2000 != 0
    }
    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> u16 {
        (self.u16_at(field::FLG_OFF) & 0x1fff) << 3
    }
    /// Part of a fragmented datagram (first, middle or last fragment).
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }
    pub fn ttl(&self) -> u8 {
        self.byte(field::TTL)
    }
    pub fn protocol(&self) -> u8 {
        self.byte(field::PROTOCOL)
    }
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }
    pub fn src_addr(&self) -> Ipv4Addr {
        self.ip_at(field::SRC_ADDR)
    }
    pub fn dst_addr(&self) -> Ipv4Addr {
        self.ip_at(field::DST_ADDR)
    }
    /// The header checksum is right.
    pub fn verify_checksum(&self) -> bool {
        let header = self
            .bytes()
            .get(..usize::from(self.header_len()))
            .unwrap_or(&[]);
        header_checksum_ok(header)
    }
    /// The payload, without link-layer padding.
    pub fn payload(&self) -> &[u8] {
        let start = usize::from(self.header_len());
        let end = usize::from(self.total_len());
        self.bytes().get(start..end).unwrap_or(&[])
    }
}

/// Does an IPv4 header (options included) sum to 0xffff? Nearly every
/// header has no options: those 20 bytes are summed inline.
#[inline(always)]
fn header_checksum_ok(header: &[u8]) -> bool {
    let sum = match <&[u8; HEADER_LEN]>::try_from(header) {
        Ok(fixed) => checksum::sum_fixed(fixed),
        Err(_) => checksum::sum(header),
    };
    checksum::fold(sum) == 0xffff
}

/// A parsed IPv4 header (no options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    pub src_addr: Ipv4Addr,
    pub dst_addr: Ipv4Addr,
    pub protocol: u8,
    pub payload_len: usize,
    pub ttl: u8,
    pub ident: u16,
    pub dont_frag: bool,
}

impl Ipv4Repr {
    /// Parses a checked packet. Fragments are reported as
    /// `PacketError::Unsupported` (the stack never reassembles).
    pub fn parse<T: AsRef<[u8]>>(
        packet: &Packet<T>,
        checksum: Checksum,
    ) -> Result<Self, PacketError> {
        Ok(Self::parse_with_payload(packet, checksum)?.0)
    }

    /// [`parse`](Self::parse), and the payload (without link-layer
    /// padding, as [`Packet::payload`]): the receive path's decode, inlined,
    /// each field read once from the fixed 20 bytes (one bounds check)
    /// instead of through the packet's getters, which check each read.
    #[inline]
    pub fn parse_with_payload<T: AsRef<[u8]>>(
        packet: &Packet<T>,
        checksum: Checksum,
    ) -> Result<(Self, &[u8]), PacketError> {
        let bytes = packet.buffer.as_ref();
        let h = bytes
            .first_chunk::<HEADER_LEN>()
            .ok_or(PacketError::Truncated)?;
        let header_len = usize::from(h[field::VER_IHL] & 0x0f) * 4;
        if checksum.verify_rx() && !header_checksum_ok(bytes.get(..header_len).unwrap_or(&[])) {
            return Err(PacketError::Checksum);
        }
        let be16 = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
        let flags_offset = be16(field::FLG_OFF.start);
        // More fragments, or a fragment offset: part of a fragmented datagram.
        if flags_offset & 0x3fff != 0 {
            return Err(PacketError::Unsupported);
        }
        let total_len = usize::from(be16(field::LENGTH.start));
        let payload = bytes.get(header_len..total_len).unwrap_or(&[]);
        let ip = |at: usize| Ipv4Addr::new(h[at], h[at + 1], h[at + 2], h[at + 3]);
        Ok((
            Ipv4Repr {
                src_addr: ip(field::SRC_ADDR.start),
                dst_addr: ip(field::DST_ADDR.start),
                protocol: h[field::PROTOCOL],
                payload_len: payload.len(),
                ttl: h[field::TTL],
                ident: be16(field::IDENT.start),
                dont_frag: flags_offset & 0x4000 != 0,
            },
            payload,
        ))
    }

    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the 20-byte header. With `checksum.compute_tx()` false the
    /// checksum field is zero, for the NIC to fill.
    pub fn emit(&self, buf: &mut [u8], checksum: Checksum) -> Result<(), PacketError> {
        let total = HEADER_LEN + self.payload_len;
        let total = u16::try_from(total).map_err(|_| PacketError::Malformed)?;
        let b: &mut [u8; HEADER_LEN] = buf
            .get_mut(..HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(PacketError::BufferTooSmall)?;
        b[field::VER_IHL] = 0x45;
        b[field::DSCP_ECN] = 0;
        b[field::LENGTH].copy_from_slice(&total.to_be_bytes());
        b[field::IDENT].copy_from_slice(&self.ident.to_be_bytes());
        let flags: u16 = if self.dont_frag { 0x4000 } else { 0 };
        b[field::FLG_OFF].copy_from_slice(&flags.to_be_bytes());
        b[field::TTL] = self.ttl;
        b[field::PROTOCOL] = self.protocol;
        b[field::CHECKSUM].copy_from_slice(&[0, 0]);
        b[field::SRC_ADDR].copy_from_slice(&self.src_addr.octets());
        b[field::DST_ADDR].copy_from_slice(&self.dst_addr.octets());
        if checksum.compute_tx() {
            let sum = checksum::finish(checksum::sum_fixed(b));
            b[field::CHECKSUM].copy_from_slice(&sum.to_be_bytes());
        }
        Ok(())
    }
}

/// Recomputes the header checksum in place (used by the simulated NIC).
pub fn fill_checksum(header: &mut [u8]) {
    if header.len() < HEADER_LEN {
        return;
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header.len() < header_len {
        return;
    }
    header[field::CHECKSUM].copy_from_slice(&[0, 0]);
    let sum = checksum::finish(checksum::sum(&header[..header_len]));
    header[field::CHECKSUM].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Ipv4Repr {
        Ipv4Repr {
            src_addr: Ipv4Addr::new(10, 0, 0, 1),
            dst_addr: Ipv4Addr::new(10, 0, 0, 2),
            protocol: protocol::TCP,
            payload_len: 4,
            ttl: 64,
            ident: 7,
            dont_frag: true,
        }
    }

    #[test]
    fn checksum_verified_and_skippable() {
        let mut buf = [0u8; 24];
        sample().emit(&mut buf, Checksum::Both).unwrap();
        assert!(Packet::new_checked(&buf[..]).unwrap().verify_checksum());
        buf[8] = 63;
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(
            Ipv4Repr::parse(&p, Checksum::Both),
            Err(PacketError::Checksum)
        );
        assert!(Ipv4Repr::parse(&p, Checksum::None).is_ok());
    }

    #[test]
    fn fragments_and_bad_lengths_rejected() {
        let mut buf = [0u8; 24];
        sample().emit(&mut buf, Checksum::Both).unwrap();
        buf[6] = 0x20; // MF
        fill_checksum(&mut buf);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert!(p.is_fragment());
        assert_eq!(
            Ipv4Repr::parse(&p, Checksum::Both),
            Err(PacketError::Unsupported)
        );
        assert_eq!(
            Packet::new_checked(&buf[..23]).unwrap_err(),
            PacketError::Truncated
        );
        buf[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&buf[..]).unwrap_err(),
            PacketError::Malformed
        );
        buf[0] = 0x65;
        assert_eq!(
            Packet::new_checked(&buf[..]).unwrap_err(),
            PacketError::Unsupported
        );
    }

    #[test]
    fn padding_is_not_payload() {
        let mut buf = [0u8; 60];
        sample().emit(&mut buf, Checksum::Both).unwrap();
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.payload().len(), 4);
    }

    proptest! {
        #[test]
        fn parse_emit_round_trip(src in any::<u32>(), dst in any::<u32>(), proto in any::<u8>(),
                                 len in 0usize..1480, ttl in any::<u8>(), ident in any::<u16>(), df in any::<bool>()) {
            let repr = Ipv4Repr {
                src_addr: Ipv4Addr::from(src), dst_addr: Ipv4Addr::from(dst), protocol: proto,
                payload_len: len, ttl, ident, dont_frag: df,
            };
            let mut buf = vec![0u8; HEADER_LEN + len];
            repr.emit(&mut buf, Checksum::Both).unwrap();
            let p = Packet::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(Ipv4Repr::parse(&p, Checksum::Both).unwrap(), repr);
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = Ipv4Repr::parse(&p, Checksum::Both);
                let _ = p.payload();
            }
        }
    }
}
