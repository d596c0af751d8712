//! Receive-side scaling the way NICs do it (Microsoft RSS: the Toeplitz
//! hash of a received packet's addresses and ports, looked up in the
//! redirection table), so a connection can pick the one source port whose
//! return traffic the NIC steers to the queue its worker polls. With that,
//! one multi-queue port carries one connection per queue, each owned by one
//! worker, with no software steering (as mTCP and F-Stack do).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;

/// The Toeplitz hash of `input` under `key` (`key` must be at least 4
/// bytes longer than `input`; NIC keys are 40 or 52 bytes).
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    debug_assert!(key.len() >= input.len() + 4, "RSS key too short");
    let mut hash = 0u32;
    // The 32-bit window of the key that lines up with the current input bit.
    let mut window = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    for (i, &byte) in input.iter().enumerate() {
        let incoming = key.get(i + 4).copied().unwrap_or(0);
        for bit in (0..8).rev() {
            if byte & (1 << bit) != 0 {
                hash ^= window;
            }
            window = (window << 1) | u32::from((incoming >> bit) & 1);
        }
    }
    hash
}

/// The hash input of an IPv4 TCP packet: source address, destination
/// address, source port, destination port, all as on the wire.
pub fn ipv4_tcp_input(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16) -> [u8; 12] {
    let mut input = [0u8; 12];
    input[..4].copy_from_slice(&src.octets());
    input[4..8].copy_from_slice(&dst.octets());
    input[8..10].copy_from_slice(&src_port.to_be_bytes());
    input[10..].copy_from_slice(&dst_port.to_be_bytes());
    input
}

/// A port's RSS configuration: its hash key and redirection table (hash
/// modulo the table size picks the entry, the entry is the rx queue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RssSteering {
    pub key: Vec<u8>,
    pub reta: Vec<u16>,
}

impl RssSteering {
    /// The rx queue the NIC puts a TCP segment from `remote` to `local` on.
    pub fn rx_queue(&self, local: SocketAddrV4, remote: SocketAddrV4) -> u16 {
        let input = ipv4_tcp_input(*remote.ip(), *local.ip(), remote.port(), local.port());
        let hash = toeplitz(&self.key, &input);
        self.reta[hash as usize % self.reta.len()]
    }

    /// A source port in `range` whose return traffic from `remote` lands on
    /// `queue`, trying ports from `start` on (a random start keeps
    /// reconnects off the port just closed). None if no port qualifies (the
    /// table does not name `queue`).
    pub fn pick_local_port(
        &self,
        local_ip: Ipv4Addr,
        remote: SocketAddrV4,
        queue: u16,
        range: RangeInclusive<u16>,
        start: u16,
    ) -> Option<u16> {
        if self.reta.is_empty() || self.key.len() < 16 || !self.reta.contains(&queue) {
            return None;
        }
        let (low, high) = (u32::from(*range.start()), u32::from(*range.end()));
        let span = high.checked_sub(low)? + 1;
        let first = u32::from(start).wrapping_sub(low) % span;
        (0..span)
            .map(|i| (low + (first + i) % span) as u16)
            .find(|&port| self.rx_queue(SocketAddrV4::new(local_ip, port), remote) == queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of Microsoft's RSS verification suite (also DPDK's and
    /// many NICs' default).
    const MS_KEY: [u8; 40] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f,
        0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30,
        0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ];

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// Microsoft's published IPv4 verification values: (destination,
    /// source, IPv4-only hash, IPv4+TCP hash).
    #[test]
    fn matches_the_microsoft_verification_suite() {
        let cases = [
            (
                "161.142.100.80",
                1766,
                "66.9.149.187",
                2794,
                0x323e8fc2u32,
                0x51ccc178u32,
            ),
            (
                "65.69.140.83",
                4739,
                "199.92.111.2",
                14230,
                0xd718262a,
                0xc626b0ea,
            ),
            (
                "12.22.207.184",
                38024,
                "24.19.198.95",
                12898,
                0xd2d0a5de,
                0x5c2b394a,
            ),
            (
                "209.142.163.6",
                2217,
                "38.27.205.30",
                48228,
                0x82989176,
                0xafc7327f,
            ),
            (
                "202.188.127.2",
                1303,
                "153.39.163.191",
                44251,
                0x5d1809c5,
                0x10e828a2,
            ),
        ];
        for (dst, dport, src, sport, ip_only, with_tcp) in cases {
            let input = ipv4_tcp_input(ip(src), ip(dst), sport, dport);
            assert_eq!(toeplitz(&MS_KEY, &input[..8]), ip_only, "{src} -> {dst}");
            assert_eq!(
                toeplitz(&MS_KEY, &input),
                with_tcp,
                "{src}:{sport} -> {dst}:{dport}"
            );
        }
    }

    #[test]
    fn picked_ports_land_on_their_queue() {
        let rss = RssSteering {
            key: MS_KEY.to_vec(),
            // 128 entries over 4 queues, as DPDK's default spread.
            reta: (0..128).map(|i| i % 4).collect(),
        };
        let local = ip("10.0.0.2");
        let remote = SocketAddrV4::new(ip("10.0.0.1"), 3260);
        for queue in 0..4 {
            for start in [49152u16, 50000, 65535] {
                let port = rss
                    .pick_local_port(local, remote, queue, 49152..=65535, start)
                    .expect("a port for every queue");
                assert!((49152..=65535).contains(&port));
                assert_eq!(rss.rx_queue(SocketAddrV4::new(local, port), remote), queue);
            }
        }
        // Different starts give different ports (reconnects move on).
        let a = rss.pick_local_port(local, remote, 1, 49152..=65535, 50000);
        let b = rss.pick_local_port(local, remote, 1, 49152..=65535, 60000);
        assert_ne!(a, b);
        // A queue the table never names has no port.
        assert_eq!(
            rss.pick_local_port(local, remote, 7, 49152..=65535, 50000),
            None
        );
        // A one-port range: that port or nothing.
        let only = rss
            .pick_local_port(local, remote, 2, 49152..=65535, 49152)
            .unwrap();
        assert_eq!(
            rss.pick_local_port(local, remote, 2, only..=only, 1),
            Some(only)
        );
    }
}
