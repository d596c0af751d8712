//! Shared pieces of the Ethernet/ARP/IPv4/ICMP/TCP views: the error type and
//! the Internet checksum (RFC 1071).

use std::net::Ipv4Addr;
use thiserror::Error;

/// Errors found while decoding or encoding a network-layer packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PacketError {
    #[error("packet truncated")]
    Truncated,
    #[error("malformed packet")]
    Malformed,
    #[error("bad checksum")]
    Checksum,
    #[error("unsupported packet")]
    Unsupported,
    #[error("buffer too small to emit the packet")]
    BufferTooSmall,
}

/// Whether checksums are computed/verified in software or left to the NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksum {
    /// Verify on receive, compute on transmit.
    #[default]
    Both,
    /// Skip verification on receive (the NIC verified it).
    Tx,
    /// Verify on receive; on transmit leave the field for the NIC (TCP: the
    /// pseudo-header sum is written so the NIC can finish it).
    Rx,
    /// Neither.
    None,
}

impl Checksum {
    pub fn verify_rx(self) -> bool {
        matches!(self, Checksum::Both | Checksum::Rx)
    }
    pub fn compute_tx(self) -> bool {
        matches!(self, Checksum::Both | Checksum::Tx)
    }
}

pub mod checksum {
    use super::Ipv4Addr;

    /// One's-complement sum of `data` (not folded, not inverted).
    pub fn sum(data: &[u8]) -> u32 {
        let mut acc: u64 = 0;
        let mut chunks = data.chunks_exact(2);
        for pair in &mut chunks {
            acc += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        if let [last] = chunks.remainder() {
            acc += u64::from(u16::from_be_bytes([*last, 0]));
        }
        fold64(acc)
    }

    fn fold64(mut acc: u64) -> u32 {
        while acc > 0xffff_ffff {
            acc = (acc & 0xffff_ffff) + (acc >> 32);
        }
        acc as u32
    }

    /// Folds a 32-bit partial sum into 16 bits.
    pub fn fold(mut acc: u32) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// Adds partial sums.
    pub fn combine(sums: &[u32]) -> u32 {
        fold64(sums.iter().map(|&s| u64::from(s)).sum())
    }

    /// The final checksum of a sum: folded and inverted.
    pub fn finish(acc: u32) -> u16 {
        !fold(acc)
    }

    /// Sum of the IPv4 pseudo header (RFC 793 / 9293 §3.1).
    pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u32) -> u32 {
        let mut acc = sum(&src.octets());
        acc = combine(&[acc, sum(&dst.octets()), u32::from(protocol)]);
        combine(&[acc, length >> 16, length & 0xffff])
    }
}

#[cfg(test)]
mod tests {
    use super::checksum::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 worked example: sum of 0001 f203 f4f5 f6f7 = 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(finish(sum(&data)), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(fold(sum(&[0x12, 0x34, 0x56])), 0x1234 + 0x5600);
    }
}
