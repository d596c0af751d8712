//! The neighbour cache: IPv4 → MAC with expiry, plus static entries.

use crate::clock::Instant;
use crate::wire::ethernet::EthernetAddress;
use std::net::Ipv4Addr;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
struct Entry {
    ip: Ipv4Addr,
    mac: EthernetAddress,
    /// `None` for static entries.
    expires_at: Option<Instant>,
}

/// A small fixed-size cache; a worker talks to a handful of neighbours.
#[derive(Debug)]
pub struct ArpCache {
    entries: Vec<Entry>,
    capacity: usize,
    timeout: Duration,
}

impl ArpCache {
    pub fn new(capacity: usize, timeout: Duration) -> ArpCache {
        ArpCache {
            entries: Vec::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
            timeout,
        }
    }

    pub fn lookup(&self, ip: Ipv4Addr, now: Instant) -> Option<EthernetAddress> {
        self.entries
            .iter()
            .find(|e| e.ip == ip && e.expires_at.is_none_or(|t| now < t))
            .map(|e| e.mac)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.entries.iter().any(|e| e.ip == ip)
    }

    pub fn insert_static(&mut self, ip: Ipv4Addr, mac: EthernetAddress) {
        self.entries.retain(|e| e.ip != ip);
        if self.entries.len() == self.capacity {
            self.entries.remove(0);
        }
        self.entries.push(Entry {
            ip,
            mac,
            expires_at: None,
        });
    }

    /// Learns or refreshes a dynamic entry; static entries win.
    pub fn fill(&mut self, ip: Ipv4Addr, mac: EthernetAddress, now: Instant) {
        let expires_at = Some(now + self.timeout);
        if let Some(e) = self.entries.iter_mut().find(|e| e.ip == ip) {
            if e.expires_at.is_some() {
                e.mac = mac;
                e.expires_at = expires_at;
            }
            return;
        }
        if self.entries.len() == self.capacity {
            // Evict an expired entry, else the one expiring first.
            let victim = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.expires_at.is_some())
                .min_by_key(|(_, e)| e.expires_at)
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    self.entries.swap_remove(i);
                }
                None => return,
            }
        }
        self.entries.push(Entry {
            ip,
            mac,
            expires_at,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const MAC1: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const MAC2: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

    #[test]
    fn expires() {
        let mut cache = ArpCache::new(4, Duration::from_secs(10));
        cache.fill(A, MAC1, Instant::ZERO);
        assert_eq!(cache.lookup(A, Instant::from_millis(9_999)), Some(MAC1));
        assert_eq!(cache.lookup(A, Instant::from_millis(10_000)), None);
    }

    #[test]
    fn static_entries_are_not_overwritten_or_evicted() {
        let mut cache = ArpCache::new(2, Duration::from_secs(10));
        cache.insert_static(A, MAC1);
        cache.fill(A, MAC2, Instant::ZERO);
        assert_eq!(cache.lookup(A, Instant::from_millis(1_000_000)), Some(MAC1));
        cache.fill(B, MAC2, Instant::ZERO);
        cache.fill(Ipv4Addr::new(10, 0, 0, 3), MAC2, Instant::ZERO);
        assert_eq!(cache.lookup(A, Instant::ZERO), Some(MAC1));
        assert_eq!(cache.lookup(B, Instant::ZERO), None);
    }
}
