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

    /// One's-complement sum of `data` (folded to 16 bits, not inverted).
    ///
    /// Adds little-endian 32-bit words into a 64-bit accumulator (no carry
    /// to propagate per word, so the loop vectorizes) and swaps the folded
    /// result into network order: RFC 1071 §2 (A) and (B), the sum does not
    /// depend on the word size or the byte order it is taken in.
    pub fn sum(data: &[u8]) -> u32 {
        let mut acc: u64 = 0;
        let mut words = data.chunks_exact(4);
        for w in &mut words {
            acc += u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
        let rest = words.remainder();
        let mut last = [0u8; 4];
        last[..rest.len()].copy_from_slice(rest);
        acc += u64::from(u32::from_le_bytes(last));
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        u32::from((acc as u16).swap_bytes())
    }

    /// The sum of a piece that starts `at` bytes into the summed data: a
    /// piece at an odd offset has its bytes in the other half of each
    /// 16-bit word (RFC 1071 §2 (B): swap the sum).
    pub fn sum_at(data: &[u8], at: usize) -> u32 {
        let s = fold(sum(data));
        u32::from(if at % 2 == 1 { s.swap_bytes() } else { s })
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

    /// RFC 1071's definition, 16-bit big-endian words one at a time.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        for pair in data.chunks(2) {
            acc += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    proptest::proptest! {
        #[test]
        fn wide_sum_matches_rfc1071(data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000)) {
            proptest::prop_assert_eq!(fold(sum(&data)), reference(&data));
        }

        #[test]
        fn pieces_sum_to_the_whole(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            cuts in proptest::collection::vec(0usize..600, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort_unstable();
            let parts: Vec<u32> = cuts.windows(2).map(|w| sum_at(&data[w[0]..w[1]], w[0])).collect();
            proptest::prop_assert_eq!(fold(combine(&parts)), reference(&data));
        }
    }
}
