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
    /// Sums little-endian words, then folds and swaps the result into
    /// network order: RFC 1071 §2 (A) and (B), the sum does not depend on
    /// the word size or the byte order it is taken in. From 256 bytes on
    /// (`BLOCK`), 64 bytes a step go through eight independent lanes
    /// (`Acc::wide`), which LLVM turns into SSE2 `paddq`/`psrlq` on four
    /// xmm registers: up to 16 bytes a cycle, where one `adc` chain, bound
    /// by the carry flag's latency, takes 8 (about 1.8 times the bytes per
    /// ns on 4 KiB, at twice the instructions). The last bytes, and
    /// shorter inputs, go through short `adc` chains (`Acc::tail`).
    pub fn sum(data: &[u8]) -> u32 {
        sum_into(Acc::default(), data)
    }

    /// [`sum`] of `data` plus `seed` (a partial sum in network order, such
    /// as [`pseudo_header`]'s), folded once at the end: what a receiver
    /// checks (the result is 0xffff when the checksum is right) without a
    /// fold of each part and a [`combine`] after.
    pub fn sum_with(seed: u32, data: &[u8]) -> u32 {
        // The accumulator adds little-endian words: a folded network-order
        // sum joins it byte-swapped (RFC 1071 §2 (B)).
        sum_into(Acc(u64::from(fold(seed).swap_bytes())), data)
    }

    #[inline(always)]
    fn sum_into(mut acc: Acc, data: &[u8]) -> u32 {
        let rest = if data.len() >= BLOCK {
            acc.wide(data)
        } else {
            data
        };
        acc.tail(rest);
        acc.finish()
    }

    /// [`sum`] of a fixed-size piece (an IPv4 header), inlined: with the
    /// length known the chains and the tail's branches fold away, a few
    /// instructions instead of a call through the general loop.
    #[inline(always)]
    pub fn sum_fixed<const N: usize>(data: &[u8; N]) -> u32 {
        const { assert!(N < BLOCK, "sum_fixed is for headers, shorter than a block") };
        let mut acc = Acc::default();
        acc.tail(data);
        acc.finish()
    }

    /// Copies `src` into `dst` (equal lengths; a longer `dst` keeps its
    /// tail) and returns `sum(src)`: the checksum is taken in the same pass
    /// as the copy, each 256-byte block (each 64-byte step of the wide
    /// loop, from 768 bytes on) summed as it is stored, so the payload is
    /// read once (a copy then a [`sum`] reads it twice).
    pub fn copy_and_sum(dst: &mut [u8], src: &[u8]) -> u32 {
        let n = src.len().min(dst.len());
        let (src, dst) = (&src[..n], &mut dst[..n]);
        let mut acc = Acc::default();
        let wide = if n >= COPY_WIDE { n / STEP * STEP } else { 0 };
        let ((src_wide, src), (dst_wide, dst)) = (src.split_at(wide), dst.split_at_mut(wide));
        if wide > 0 {
            acc.add(wide_copy(dst_wide, src_wide));
        }
        let (blocks, rest) = src.as_chunks::<BLOCK>();
        let (outs, out_rest) = dst.as_chunks_mut::<BLOCK>();
        for (block, out) in blocks.iter().zip(outs.iter_mut()) {
            *out = *block;
            acc.chain(block);
        }
        out_rest.copy_from_slice(rest);
        acc.tail(rest);
        acc.finish()
    }

    /// The length from which [`copy_and_sum`] takes the wide loop: below
    /// it, copying and summing each 256-byte block as one `adc` chain is
    /// as fast or faster (in a microbenchmark the wide loop's copy is
    /// 15 % slower at 256 bytes, even at about 700, 15 % faster at 1,024
    /// and 25 % at 1,448).
    const COPY_WIDE: usize = 768;

    /// The length from which [`sum`] takes the wide loop: below it the
    /// tail's straight-line chains are as fast (the wide loop's setup and
    /// the fold of its lanes cost about as much as they save), and
    /// [`sum_fixed`]'s headers stay inlined short code. Also the bytes of
    /// each of [`copy_and_sum`]'s `adc` chains below [`COPY_WIDE`].
    const BLOCK: usize = 256;

    /// Bytes per step of the wide loop: eight 64-bit words, one per lane.
    const STEP: usize = 64;

    /// Steps summed before the wide loop's lanes are folded into the
    /// accumulator: at most 2^31 words in all, so neither the sum of the
    /// words' high halves nor that of their low halves can reach 2^64.
    const SPAN_STEPS: usize = 1 << 28;

    /// The running sum of [`sum`] and [`copy_and_sum`]: a 64-bit one's
    /// complement accumulator. A carry out of a chain is added back at its
    /// end and never carries again: when an add carries out, its result is
    /// at most 2^64 - 2 (inputs at most 2^64 - 1 each, plus a carry of 1),
    /// so adding that carry back cannot overflow.
    #[derive(Default)]
    struct Acc(u64);

    /// The wide loop's lanes, one per word of a step: `all` adds whole
    /// 64-bit words (wrapping), `high` their high 32-bit halves (exactly).
    /// No add depends on the carry of another, so LLVM keeps them in xmm
    /// registers: per 16 bytes a `movdqu`, a `psrlq` and two `paddq`.
    #[derive(Default)]
    struct Lanes {
        all: [u64; STEP / 8],
        high: [u64; STEP / 8],
    }

    impl Lanes {
        #[inline(always)]
        fn add(&mut self, step: &[u8; STEP]) {
            let (words, _) = step.as_chunks::<8>();
            for ((all, high), w) in self.all.iter_mut().zip(&mut self.high).zip(words) {
                let w = u64::from_le_bytes(*w);
                *all = all.wrapping_add(w);
                *high += w >> 32;
            }
        }
    }

    /// [`Acc::wide`] that also copies each step of `src` (whole steps)
    /// into `dst` (as long), returning the sum of the lanes. Out of line,
    /// so that the short copies do not pay for its registers (inlined,
    /// copies of 20-48 bytes took about 1 ns more in a microbenchmark).
    #[inline(never)]
    fn wide_copy(dst: &mut [u8], src: &[u8]) -> u64 {
        let mut acc = Acc::default();
        let (steps, _) = src.as_chunks::<STEP>();
        let (outs, _) = dst.as_chunks_mut::<STEP>();
        let mut start = 0;
        while start < steps.len() {
            let end = steps.len().min(start + SPAN_STEPS);
            let mut lanes = Lanes::default();
            for (step, out) in steps[start..end].iter().zip(&mut outs[start..end]) {
                *out = *step;
                lanes.add(step);
            }
            acc.fold_lanes(&lanes);
            start = end;
        }
        acc.0
    }

    impl Acc {
        /// Adds `x` with end-around carry.
        #[inline(always)]
        fn add(&mut self, x: u64) {
            let (s, carry) = self.0.overflowing_add(x);
            self.0 = s + u64::from(carry);
        }

        /// Adds the lanes of up to [`SPAN_STEPS`] steps. The high halves'
        /// sum `h` is exact; the low halves' sum is `all - h * 2^32`
        /// (mod 2^64, and exact, being under 2^64). As 2^32 ≡ 1 modulo
        /// 2^16 - 1, the words' one's complement sum is that of the two.
        #[inline(always)]
        fn fold_lanes(&mut self, lanes: &Lanes) {
            let all = lanes.all.iter().fold(0u64, |a, &x| a.wrapping_add(x));
            let high: u64 = lanes.high.iter().sum();
            self.add(all.wrapping_sub(high << 32));
            self.add(high);
        }

        /// Adds `data` a [`STEP`] at a time through [`Lanes`] and returns
        /// the bytes left (fewer than a step).
        #[inline(always)]
        fn wide<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
            let (steps, rest) = data.as_chunks::<STEP>();
            for span in steps.chunks(SPAN_STEPS) {
                let mut lanes = Lanes::default();
                for step in span {
                    lanes.add(step);
                }
                self.fold_lanes(&lanes);
            }
            rest
        }

        /// Adds `N / 8` words as one carry chain (`N` a multiple of 8).
        #[inline(always)]
        fn chain<const N: usize>(&mut self, bytes: &[u8; N]) {
            let (words, _) = bytes.as_chunks::<8>();
            let (mut s, mut carry) = (self.0, false);
            for w in words {
                (s, carry) = s.carrying_add(u64::from_le_bytes(*w), carry);
            }
            self.0 = s + u64::from(carry);
        }

        /// Adds the last bytes (fewer than [`BLOCK`]): one chain each of
        /// 128, 64, 32, 16 and 8 bytes as the length has them, then the final
        /// partial word padded with zeros, built from 4-, 2- and 1-byte
        /// loads (straight-line code, no call to memcpy for a few bytes:
        /// an IPv4 header is 16 + 4 bytes).
        #[inline(always)]
        fn tail(&mut self, mut rest: &[u8]) {
            if let Some((b, more)) = rest.split_first_chunk::<128>() {
                self.chain(b);
                rest = more;
            }
            if let Some((b, more)) = rest.split_first_chunk::<64>() {
                self.chain(b);
                rest = more;
            }
            if let Some((b, more)) = rest.split_first_chunk::<32>() {
                self.chain(b);
                rest = more;
            }
            if let Some((b, more)) = rest.split_first_chunk::<16>() {
                self.chain(b);
                rest = more;
            }
            if let Some((b, more)) = rest.split_first_chunk::<8>() {
                self.chain(b);
                rest = more;
            }
            if rest.is_empty() {
                return;
            }
            let mut w = 0u64;
            let mut shift = 0;
            if let Some((four, more)) = rest.split_first_chunk::<4>() {
                w = u64::from(u32::from_le_bytes(*four));
                shift = 32;
                rest = more;
            }
            if let Some((two, more)) = rest.split_first_chunk::<2>() {
                w |= u64::from(u16::from_le_bytes(*two)) << shift;
                shift += 16;
                rest = more;
            }
            if let Some(&one) = rest.first() {
                w |= u64::from(one) << shift;
            }
            self.chain(&w.to_le_bytes());
        }

        fn finish(self) -> u32 {
            // 64 → 32 → 16 bits, end-around carries included.
            let acc = (self.0 & 0xffff_ffff) + (self.0 >> 32);
            let acc = (acc & 0xffff_ffff) + (acc >> 32);
            let acc = (acc & 0xffff) + (acc >> 16);
            let acc = (acc & 0xffff) + (acc >> 16);
            u32::from((acc as u16).swap_bytes())
        }
    }

    /// [`copy_and_sum`] for a piece that starts `at` bytes into the summed
    /// data (see [`sum_at`]).
    pub fn copy_and_sum_at(dst: &mut [u8], src: &[u8], at: usize) -> u32 {
        let s = fold(copy_and_sum(dst, src));
        u32::from(if at % 2 == 1 { s.swap_bytes() } else { s })
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
    /// Not folded: at most seven 16-bit words (under 2^19), which the
    /// caller's fold or [`combine`] takes as it is.
    pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u32) -> u32 {
        let (src, dst) = (u32::from(src), u32::from(dst));
        (src >> 16)
            + (src & 0xffff)
            + (dst >> 16)
            + (dst & 0xffff)
            + u32::from(protocol)
            + (length >> 16)
            + (length & 0xffff)
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
        reference_with(0, data)
    }

    /// [`reference`] of `data` with `seed` (a network-order partial sum)
    /// added in, 16-bit word by word.
    fn reference_with(seed: u32, data: &[u8]) -> u16 {
        let mut acc = u64::from(seed);
        for pair in data.chunks(2) {
            acc += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// Random bytes, all-ones bytes (a carry out of every add, in every
    /// lane) or mostly all-ones, up to 10,007 bytes: past many steps of the
    /// wide loop, with every remainder.
    fn payload() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..10_008),
            (0usize..10_008).prop_map(|n| vec![0xff; n]),
            proptest::collection::vec(prop_oneof![8 => Just(0xffu8), 1 => any::<u8>()], 0..10_008),
        ]
    }

    proptest::proptest! {
        /// The wide loop (and the tail after it) against RFC 1071's
        /// 16-bit words, for any length (odd ones included), any start
        /// 0..8 (unaligned words), any seed; the copying sum too.
        #[test]
        fn wide_loop_matches_rfc1071(data in payload(), from in 0usize..8, seed in proptest::num::u32::ANY) {
            let src = &data[from.min(data.len())..];
            proptest::prop_assert_eq!(fold(sum(src)), reference(src));
            proptest::prop_assert_eq!(fold(sum_with(seed, src)), reference_with(seed, src));
            let mut out = vec![0u8; src.len()];
            proptest::prop_assert_eq!(fold(copy_and_sum(&mut out, src)), reference(src));
            proptest::prop_assert_eq!(&out[..], src);
        }

        #[test]
        fn wide_sum_matches_rfc1071(data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000)) {
            proptest::prop_assert_eq!(fold(sum(&data)), reference(&data));
        }

        /// Mostly all-ones bytes (a carry out of nearly every add), from
        /// any start, any length.
        #[test]
        fn carry_heavy_sum_matches_rfc1071(
            data in proptest::collection::vec(
                proptest::prop_oneof![4 => proptest::strategy::Just(0xffu8), 1 => proptest::num::u8::ANY],
                0..3000,
            ),
            from in 0usize..64,
        ) {
            let src = &data[from.min(data.len())..];
            proptest::prop_assert_eq!(fold(sum(src)), reference(src));
        }

        /// The inlined fixed-length sum agrees with RFC 1071 at the
        /// lengths it is used at (the IPv4 header) and around them.
        #[test]
        fn fixed_sum_matches_rfc1071(data in proptest::array::uniform24(proptest::num::u8::ANY)) {
            let twenty: &[u8; 20] = data[..20].try_into().unwrap();
            let odd: &[u8; 23] = data[..23].try_into().unwrap();
            proptest::prop_assert_eq!(fold(sum_fixed(twenty)), reference(twenty));
            proptest::prop_assert_eq!(fold(sum_fixed(odd)), reference(odd));
            proptest::prop_assert_eq!(fold(sum_fixed(&data)), reference(&data));
        }

        /// A seed joins the sum as one more piece at an even offset would.
        #[test]
        fn seeded_sum_matches_combined_pieces(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            seed in 0u32..(1 << 19),
        ) {
            let combined = fold(combine(&[seed, sum(&data)]));
            proptest::prop_assert_eq!(fold(sum_with(seed, &data)), combined);
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

        /// The checksum folded into the copy gives the plain checksum of
        /// the bytes copied, and the copy is exact, for any start and length
        /// (odd ones included) within the source and the destination.
        #[test]
        fn copy_and_sum_matches_the_plain_sum(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            from in 0usize..3000,
            len in 0usize..3000,
            to in 0usize..17,
        ) {
            let from = from.min(data.len());
            let src = &data[from..(from + len).min(data.len())];
            let mut out = vec![0xa5u8; to + src.len() + 9];
            let got = copy_and_sum(&mut out[to..to + src.len()], src);
            proptest::prop_assert_eq!(got, sum(src));
            proptest::prop_assert_eq!(fold(got), reference(src));
            proptest::prop_assert_eq!(&out[to..to + src.len()], src);
            proptest::prop_assert!(out[..to].iter().all(|&b| b == 0xa5), "bytes before untouched");
            proptest::prop_assert!(out[to + src.len()..].iter().all(|&b| b == 0xa5), "bytes after untouched");
            proptest::prop_assert_eq!(copy_and_sum_at(&mut out[to..to + src.len()], src, to), sum_at(src, to));
        }

        #[test]
        fn copied_pieces_sum_to_the_whole(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..1600),
            cuts in proptest::collection::vec(0usize..1600, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort_unstable();
            let mut out = vec![0u8; data.len()];
            let parts: Vec<u32> = cuts
                .windows(2)
                .map(|w| copy_and_sum_at(&mut out[w[0]..w[1]], &data[w[0]..w[1]], w[0]))
                .collect();
            proptest::prop_assert_eq!(&out, &data);
            proptest::prop_assert_eq!(fold(combine(&parts)), reference(&data));
        }
    }

    /// Words that carry out of every add: all-ones and near-all-ones
    /// bytes (the carry chain's end-around carry, and the fold of a sum
    /// that is 0xffff), at every length 0..=300 and start 0..16.
    #[test]
    fn carries_at_every_length_and_alignment() {
        for fill in [0xffu8, 0xfe, 0x80, 0x7f] {
            let mut data = vec![fill; 320];
            // A word below all-ones in the middle, so a chain sees both.
            data[100] = 0xfe;
            for at in 0..16 {
                for len in 0..=300 {
                    let src = &data[at..at + len];
                    assert_eq!(
                        fold(sum(src)),
                        reference(src),
                        "fill {fill:#x} at {at} len {len}"
                    );
                    let mut out = vec![0u8; len];
                    assert_eq!(fold(copy_and_sum(&mut out, src)), reference(src));
                    assert_eq!(out, src);
                }
            }
        }
    }

    /// The pseudo header's sum is the sum of its 12 bytes.
    #[test]
    fn pseudo_header_is_the_sum_of_its_bytes() {
        let cases = [
            ([0, 0, 0, 0], [0, 0, 0, 0], 0u8, 0u32),
            ([255, 255, 255, 255], [255, 255, 255, 255], 255, 0xffff),
            ([10, 217, 0, 2], [10, 217, 0, 1], 6, 1480),
            ([192, 168, 1, 1], [172, 16, 0, 9], 6, 65_535 + 40),
        ];
        for (src, dst, protocol, length) in cases {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&src);
            bytes.extend_from_slice(&dst);
            bytes.extend_from_slice(&[0, protocol]);
            bytes.extend_from_slice(&(length as u16).to_be_bytes());
            let got = pseudo_header(src.into(), dst.into(), protocol, length);
            // A length above 16 bits adds its high word too.
            let want = combine(&[u32::from(reference(&bytes)), length >> 16]);
            assert_eq!(fold(got), fold(want), "{src:?} {dst:?} {protocol} {length}");
        }
    }

    #[test]
    fn copy_and_sum_of_odd_lengths_at_odd_offsets() {
        // Every length 0..=40 at every offset 0..8 of a fixed pattern.
        let data: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
        for at in 0..8 {
            for len in 0..=40 {
                let src = &data[at..at + len];
                let mut out = [0u8; 64];
                assert_eq!(
                    copy_and_sum(&mut out[at..at + len], src),
                    sum(src),
                    "at {at} len {len}"
                );
                assert_eq!(&out[at..at + len], src);
            }
        }
    }
}
