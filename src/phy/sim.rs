//! An in-memory link between two endpoints for deterministic tests: seeded
//! loss, duplication, reordering, corruption, delay, MTU and bandwidth, on
//! virtual time (or the real clock, for blocking transports).
//!
//! The simulated NIC also does what a real one would for the offloads it
//! advertises: it finishes IPv4/TCP checksums from the pseudo-header sum the
//! stack left, splits TSO frames, and marks received checksums as verified.

use super::{Device, DeviceCaps, PhyError, RxMeta, TxOffload};
use crate::clock::Instant;
use crate::wire::packet::checksum;
use crate::wire::{ethernet, ipv4, tcp};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Link behaviour. Probabilities are per frame.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub loss: f64,
    pub duplicate: f64,
    /// Probability a frame is held back by up to `reorder_delay` extra.
    pub reorder: f64,
    pub reorder_delay: Duration,
    /// Probability one byte of a frame is flipped (checksums must catch it).
    pub corrupt: f64,
    pub delay: Duration,
    /// Bits per second; `None` is infinitely fast.
    pub bandwidth: Option<u64>,
    /// IP MTU.
    pub mtu: usize,
    pub rx_checksum: bool,
    pub tx_checksum: bool,
    pub tso: bool,
    /// Frames waiting per direction beyond which new ones are dropped.
    pub queue_limit: usize,
    /// Print a line per frame put on the link (debugging a failing seed).
    pub trace: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(2),
            corrupt: 0.0,
            delay: Duration::from_micros(500),
            bandwidth: None,
            mtu: 1500,
            rx_checksum: false,
            tx_checksum: false,
            tso: false,
            queue_limit: 10_000,
            trace: false,
        }
    }
}

/// What happened on the link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimCounters {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub corrupted: u64,
    pub delivered: u64,
    pub queue_drops: u64,
}

#[derive(Debug)]
enum Clock {
    Manual(Instant),
    Real(std::time::Instant),
}

#[derive(Debug)]
struct InFlight {
    arrive: Instant,
    order: u64,
    frame: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InFlight {
    // Min-heap on (arrival, order).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.arrive, other.order).cmp(&(self.arrive, self.order))
    }
}

#[derive(Debug)]
struct Medium {
    config: SimConfig,
    rng: SmallRng,
    clock: Clock,
    /// `queues[i]`: frames travelling towards endpoint `i`.
    queues: [BinaryHeap<InFlight>; 2],
    link_free_at: [Instant; 2],
    order: u64,
    counters: SimCounters,
}

impl Medium {
    fn now(&self) -> Instant {
        match self.clock {
            Clock::Manual(t) => t,
            Clock::Real(epoch) => Instant::from_micros(epoch.elapsed().as_micros() as u64),
        }
    }

    fn transmit(&mut self, to: usize, frame: Vec<u8>) {
        self.counters.sent += 1;
        let lost = self.rng.gen_bool(self.config.loss.clamp(0.0, 1.0));
        if self.config.trace {
            eprintln!(
                "{} {}->{} {}{}",
                self.now(),
                1 - to,
                to,
                describe(&frame),
                if lost { " LOST" } else { "" }
            );
        }
        if lost {
            self.counters.lost += 1;
            return;
        }
        let copies = if self.rng.gen_bool(self.config.duplicate.clamp(0.0, 1.0)) {
            self.counters.duplicated += 1;
            2
        } else {
            1
        };
        let now = self.now();
        let serialization = match self.config.bandwidth {
            Some(bps) if bps > 0 => {
                Duration::from_nanos((frame.len() as u64 * 8).saturating_mul(1_000_000_000) / bps)
            }
            _ => Duration::ZERO,
        };
        let start = self.link_free_at[to].max(now);
        self.link_free_at[to] = start + serialization;
        for _ in 0..copies {
            if self.queues[to].len() >= self.config.queue_limit {
                self.counters.queue_drops += 1;
                return;
            }
            let mut arrive = start + serialization + self.config.delay;
            if self.rng.gen_bool(self.config.reorder.clamp(0.0, 1.0)) {
                self.counters.reordered += 1;
                let extra = self
                    .rng
                    .gen_range(0..=self.config.reorder_delay.as_micros() as u64);
                arrive += Duration::from_micros(extra);
            }
            let mut frame = frame.clone();
            if !frame.is_empty() && self.rng.gen_bool(self.config.corrupt.clamp(0.0, 1.0)) {
                self.counters.corrupted += 1;
                let at = self.rng.gen_range(0..frame.len());
                let bit = self.rng.gen_range(0..8);
                frame[at] ^= 1 << bit;
                if self.config.trace {
                    eprintln!(
                        "{} {}->{} CORRUPTED byte {at} bit {bit}: {}",
                        self.now(),
                        1 - to,
                        to,
                        describe(&frame)
                    );
                }
            }
            self.order += 1;
            self.queues[to].push(InFlight {
                arrive,
                order: self.order,
                frame,
            });
        }
    }
}

/// One end of a simulated link.
#[derive(Debug, Clone)]
pub struct SimDevice {
    medium: Arc<Mutex<Medium>>,
    side: usize,
    mac: [u8; 6],
}

/// Creates the two ends of a link on virtual time starting at zero.
pub fn link(config: SimConfig, seed: u64) -> (SimDevice, SimDevice) {
    link_with_clock(config, seed, Clock::Manual(Instant::ZERO))
}

/// Creates a link whose time is the real clock (for blocking transports).
pub fn link_real_time(config: SimConfig, seed: u64) -> (SimDevice, SimDevice) {
    link_with_clock(config, seed, Clock::Real(std::time::Instant::now()))
}

fn link_with_clock(config: SimConfig, seed: u64, clock: Clock) -> (SimDevice, SimDevice) {
    let medium = Arc::new(Mutex::new(Medium {
        config,
        rng: SmallRng::seed_from_u64(seed),
        clock,
        queues: [BinaryHeap::new(), BinaryHeap::new()],
        link_free_at: [Instant::ZERO; 2],
        order: 0,
        counters: SimCounters::default(),
    }));
    let a = SimDevice {
        medium: medium.clone(),
        side: 0,
        mac: [0x02, 0, 0, 0, 0, 0x0a],
    };
    let b = SimDevice {
        medium,
        side: 1,
        mac: [0x02, 0, 0, 0, 0, 0x0b],
    };
    (a, b)
}

impl SimDevice {
    fn medium(&self) -> MutexGuard<'_, Medium> {
        // A panic elsewhere poisons the lock; the data is still usable.
        self.medium.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the virtual time of the link (both ends).
    pub fn set_now(&self, now: Instant) {
        let mut m = self.medium();
        if let Clock::Manual(t) = &mut m.clock {
            *t = now;
        }
    }

    pub fn now(&self) -> Instant {
        self.medium().now()
    }

    /// When the next frame (in either direction) arrives.
    pub fn next_arrival(&self) -> Option<Instant> {
        let m = self.medium();
        m.queues
            .iter()
            .filter_map(|q| q.peek().map(|f| f.arrive))
            .min()
    }

    pub fn counters(&self) -> SimCounters {
        self.medium().counters
    }

    /// Changes the link behaviour (e.g. stop losing frames for a clean close).
    pub fn set_config(&self, config: SimConfig) {
        self.medium().config = config;
    }

    pub fn config(&self) -> SimConfig {
        self.medium().config.clone()
    }

    pub fn set_mac(&mut self, mac: [u8; 6]) {
        self.mac = mac;
    }
}

/// What the simulated NIC does to a frame with offload requests.
fn apply_tx_offload(mut frame: Vec<u8>, offload: TxOffload, out: &mut dyn FnMut(Vec<u8>)) {
    let l2 = usize::from(offload.l2_len);
    let l3 = usize::from(offload.l3_len);
    let l4 = usize::from(offload.l4_len);
    let headers = l2 + l3 + l4;
    let is_tcp = offload.tcp_checksum && frame.len() >= headers && l3 >= ipv4::HEADER_LEN;
    if offload.tso_segment_size > 0 && is_tcp {
        let mss = usize::from(offload.tso_segment_size);
        let payload_len = frame.len() - headers;
        let seq = tcp::Packet::new_unchecked(&frame[l2 + l3..]).seq_number();
        let flags = tcp::Packet::new_unchecked(&frame[l2 + l3..]).flags();
        let ident = u16::from_be_bytes([frame[l2 + 4], frame[l2 + 5]]);
        let count = payload_len.div_ceil(mss).max(1);
        for i in 0..count {
            let start = headers + i * mss;
            let end = (start + mss).min(frame.len());
            let mut seg = Vec::with_capacity(headers + mss);
            seg.extend_from_slice(&frame[..headers]);
            seg.extend_from_slice(&frame[start..end]);
            let ip_total = (seg.len() - l2) as u16;
            seg[l2 + 2..l2 + 4].copy_from_slice(&ip_total.to_be_bytes());
            seg[l2 + 4..l2 + 6].copy_from_slice(&ident.wrapping_add(i as u16).to_be_bytes());
            {
                let mut p = tcp::Packet::new_unchecked(&mut seg[l2 + l3..]);
                p.set_seq_number(seq + i * mss);
                let last = i + 1 == count;
                let mut f = flags;
                if !last {
                    f &= !(tcp::flag::FIN | tcp::flag::PSH);
                }
                p.set_flags(f);
            }
            finish_checksums(&mut seg, l2, l3, true, true, true);
            out(seg);
        }
        return;
    }
    finish_checksums(&mut frame, l2, l3, offload.ipv4_checksum, is_tcp, false);
    out(frame);
}

/// Completes checksums as a NIC does: the TCP field holds the pseudo-header
/// sum, without the TCP length for TSO (the NIC adds it per segment).
fn finish_checksums(frame: &mut [u8], l2: usize, l3: usize, ip: bool, tcp_sum: bool, tso: bool) {
    if ip && frame.len() >= l2 + l3 {
        ipv4::fill_checksum(&mut frame[l2..l2 + l3]);
    }
    if tcp_sum && frame.len() >= l2 + l3 + tcp::HEADER_LEN {
        let segment = &frame[l2 + l3..];
        let len = segment.len() as u32;
        let mut sum = checksum::sum(segment);
        if tso {
            sum = checksum::combine(&[sum, len >> 16, len & 0xffff]);
        }
        let value = checksum::finish(sum);
        tcp::Packet::new_unchecked(&mut frame[l2 + l3..]).set_checksum(value);
    }
}

/// One line about a frame, for traces.
pub fn describe(frame: &[u8]) -> String {
    let Ok(eth) = ethernet::Frame::new_checked(frame) else {
        return "runt".into();
    };
    if eth.ethertype() != ethernet::EtherType::Ipv4 {
        return format!("{:?}", eth.ethertype());
    }
    let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) else {
        return "bad ipv4".into();
    };
    let Ok(seg) = tcp::Packet::new_checked(ip.payload()) else {
        return format!("ip proto {}", ip.protocol());
    };
    let f = seg.flags();
    let mut flags = String::new();
    for (bit, c) in [
        (tcp::flag::SYN, 'S'),
        (tcp::flag::FIN, 'F'),
        (tcp::flag::RST, 'R'),
        (tcp::flag::PSH, 'P'),
        (tcp::flag::ACK, '.'),
    ] {
        if f & bit != 0 {
            flags.push(c);
        }
    }
    let opts = tcp::TcpOptions::parse(seg.options()).unwrap_or_default();
    format!(
        "{}>{} [{flags}] seq {} ack {} win {} len {} sack {:?} ts {:?}",
        seg.src_port(),
        seg.dst_port(),
        seg.seq_number(),
        seg.ack_number(),
        seg.window_len(),
        seg.payload().len(),
        opts.sack_blocks.as_slice(),
        opts.timestamp.map(|t| (t.tsval, t.tsecr))
    )
}

/// Receive-side verification the simulated NIC reports in `RxMeta`.
fn verify_rx(frame: &[u8]) -> RxMeta {
    let mut meta = RxMeta::default();
    let Ok(eth) = ethernet::Frame::new_checked(frame) else {
        return meta;
    };
    if eth.ethertype() != ethernet::EtherType::Ipv4 {
        return meta;
    }
    let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) else {
        return meta;
    };
    meta.ipv4_checksum_good = ip.verify_checksum();
    if ip.protocol() == ipv4::protocol::TCP {
        if let Ok(seg) = tcp::Packet::new_checked(ip.payload()) {
            meta.l4_checksum_good = seg.verify_checksum(ip.src_addr(), ip.dst_addr());
        }
    }
    meta
}

impl Device for SimDevice {
    fn caps(&self) -> DeviceCaps {
        let m = self.medium();
        DeviceCaps {
            mac: self.mac,
            mtu: m.config.mtu,
            rx_checksum: m.config.rx_checksum,
            tx_checksum: m.config.tx_checksum,
            tso: m.config.tso,
            max_tx_frame: if m.config.tso {
                65535 + ethernet::HEADER_LEN
            } else {
                m.config.mtu + ethernet::HEADER_LEN
            },
        }
    }

    fn rx_burst(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        let mut count = 0;
        while count < max {
            let (frame, rx_checksum) = {
                let mut m = self.medium();
                let now = m.now();
                match m.queues[self.side].peek() {
                    Some(f) if f.arrive <= now => {}
                    _ => break,
                }
                let Some(f) = m.queues[self.side].pop() else {
                    break;
                };
                m.counters.delivered += 1;
                (f.frame, m.config.rx_checksum)
            };
            let meta = if rx_checksum {
                verify_rx(&frame)
            } else {
                RxMeta::default()
            };
            // The lock is not held here: the callback may transmit.
            on_frame(&frame, meta);
            count += 1;
        }
        count
    }

    fn tx_frame(
        &mut self,
        len: usize,
        offload: TxOffload,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), PhyError> {
        let (mtu, max_frame) = {
            let caps = self.caps();
            (caps.mtu, caps.max_tx_frame)
        };
        if len > max_frame {
            return Err(PhyError::FrameTooLong {
                len,
                max: max_frame,
            });
        }
        let mut frame = vec![0u8; len];
        fill(&mut frame);
        let to = 1 - self.side;
        let mut too_long = None;
        let mut m = self.medium();
        apply_tx_offload(frame, offload, &mut |seg| {
            if seg.len() > mtu + ethernet::HEADER_LEN {
                too_long = Some(seg.len());
            } else {
                m.transmit(to, seg);
            }
        });
        match too_long {
            Some(len) => Err(PhyError::FrameTooLong {
                len,
                max: mtu + ethernet::HEADER_LEN,
            }),
            None => Ok(()),
        }
    }

    fn tx_flush(&mut self) -> usize {
        0
    }
}
