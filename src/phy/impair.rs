//! A [`Device`] adapter that loses, reorders and corrupts IPv4 frames with
//! seeded randomness, for tests of the stack against real peers (a kernel TCP over
//! DPDK) where the kernel's own impairment (netem) is not available.
//! Not for production paths: held-back frames are copied.

use super::{Device, DeviceCaps, PhyError, RxMeta, TxOffload};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Probabilities per IPv4 frame (ARP and others pass untouched).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ImpairConfig {
    pub rx_loss: f64,
    pub tx_loss: f64,
    /// Hold a frame back and deliver it after the next one.
    pub rx_reorder: f64,
    pub tx_reorder: f64,
    /// Flip one bit of the last byte of a received IPv4 packet (past the
    /// headers when it carries data), as a link that garbles a frame the
    /// FCS let through: the checksum must catch it.
    pub rx_corrupt: f64,
    pub seed: u64,
}

/// What the adapter did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImpairCounters {
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub rx_reordered: u64,
    pub tx_reordered: u64,
    pub rx_corrupted: u64,
}

pub struct Impaired<D: Device> {
    inner: D,
    config: ImpairConfig,
    rng: SmallRng,
    held_rx: Option<(Vec<u8>, RxMeta)>,
    held_tx: Option<(Vec<u8>, TxOffload)>,
    scratch: Vec<u8>,
    counters: ImpairCounters,
}

fn is_ipv4(frame: &[u8]) -> bool {
    frame.len() > 14 && frame[12..14] == [0x08, 0x00]
}

/// Where the last byte of the IPv4 packet in `frame` lies (its total
/// length, not the Ethernet padding after it), if the frame holds it.
fn last_ip_byte(frame: &[u8]) -> Option<usize> {
    let total = usize::from(u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]));
    let at = (14 + total).checked_sub(1)?;
    (total > 20 && at < frame.len()).then_some(at)
}

impl<D: Device> Impaired<D> {
    pub fn new(inner: D, config: ImpairConfig) -> Self {
        Impaired {
            inner,
            config,
            rng: SmallRng::seed_from_u64(config.seed),
            held_rx: None,
            held_tx: None,
            scratch: Vec::new(),
            counters: ImpairCounters::default(),
        }
    }
    pub fn counters(&self) -> ImpairCounters {
        self.counters
    }
    pub fn inner(&self) -> &D {
        &self.inner
    }
    /// Changes the probabilities (e.g. none for setup, then lossy).
    pub fn set_config(&mut self, config: ImpairConfig) {
        self.config = config;
    }

    fn send_held(&mut self) -> Result<(), PhyError> {
        if let Some((frame, offload)) = self.held_tx.take() {
            let res = self
                .inner
                .tx_frame(frame.len(), offload, &mut |buf| buf.copy_from_slice(&frame));
            if res.is_err() {
                self.held_tx = Some((frame, offload));
            }
            res?;
        }
        Ok(())
    }
}

impl<D: Device> Device for Impaired<D> {
    fn caps(&self) -> DeviceCaps {
        self.inner.caps()
    }

    fn rx_burst(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        let Impaired {
            inner,
            config,
            rng,
            held_rx,
            counters,
            scratch,
            ..
        } = self;
        let earlier = held_rx.take();
        let mut delivered = 0;
        let mut fresh_hold = None;
        let n = inner.rx_burst(max, &mut |frame, meta| {
            if is_ipv4(frame) {
                if rng.gen_bool(config.rx_loss) {
                    counters.rx_dropped += 1;
                    return;
                }
                if fresh_hold.is_none() && rng.gen_bool(config.rx_reorder) {
                    counters.rx_reordered += 1;
                    fresh_hold = Some((frame.to_vec(), meta));
                    return;
                }
                // (No draw when off: seeded runs without it keep their sequence.)
                let corrupt = config.rx_corrupt > 0.0 && rng.gen_bool(config.rx_corrupt);
                if let Some(at) = last_ip_byte(frame).filter(|_| corrupt) {
                    counters.rx_corrupted += 1;
                    scratch.clear();
                    scratch.extend_from_slice(frame);
                    scratch[at] ^= 0x10;
                    on_frame(scratch, meta);
                    delivered += 1;
                    return;
                }
            }
            on_frame(frame, meta);
            delivered += 1;
        });
        // A frame held in an earlier burst goes out after this burst's.
        if let Some((frame, meta)) = earlier {
            on_frame(&frame, meta);
            delivered += 1;
        }
        *held_rx = fresh_hold;
        if n > 0 || delivered > 0 {
            delivered.max(1)
        } else {
            0
        }
    }

    fn tx_frame(
        &mut self,
        len: usize,
        offload: TxOffload,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), PhyError> {
        let lossy = self.config.tx_loss > 0.0 || self.config.tx_reorder > 0.0;
        if !lossy {
            return self.inner.tx_frame(len, offload, fill);
        }
        self.scratch.clear();
        self.scratch.resize(len, 0);
        fill(&mut self.scratch);
        if is_ipv4(&self.scratch) {
            if self.rng.gen_bool(self.config.tx_loss) {
                self.counters.tx_dropped += 1;
                return Ok(());
            }
            if self.held_tx.is_none() && self.rng.gen_bool(self.config.tx_reorder) {
                self.counters.tx_reordered += 1;
                self.held_tx = Some((self.scratch.clone(), offload));
                return Ok(());
            }
        }
        let scratch = &self.scratch;
        self.inner
            .tx_frame(len, offload, &mut |buf| buf.copy_from_slice(scratch))?;
        // The held frame follows the one sent after it.
        let _ = self.send_held();
        Ok(())
    }

    fn tx_flush(&mut self) -> usize {
        let _ = self.send_held();
        self.inner.tx_flush()
    }
}
