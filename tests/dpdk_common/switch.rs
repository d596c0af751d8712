//! A learning Ethernet switch over several DPDK queues, as one
//! `phy::Device`: the embedded target's one stack serves several ring
//! ports through it (tests/dpdk_fence.rs, tests/dpdk_mcs.rs).

use iscsi_bypass::phy::dpdk::DpdkQueue;
use iscsi_bypass::phy::{Device, DeviceCaps, PhyError, RxMeta, TxOffload};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Frames from any queue go up; a frame sent goes to the queue its
/// destination MAC was last seen on (to all of them when unknown or
/// broadcast). A port whose cut flag is set drops what it receives and
/// gets nothing, like a pulled cable.
pub struct Switch {
    ports: Vec<DpdkQueue>,
    cut: Arc<[AtomicBool]>,
    /// (MAC, queue it was seen on).
    learned: Vec<([u8; 6], usize)>,
    frame: Vec<u8>,
}

impl Switch {
    pub fn new(ports: Vec<DpdkQueue>) -> Switch {
        let cut = ports.iter().map(|_| AtomicBool::new(false)).collect();
        Switch {
            ports,
            cut,
            learned: Vec::new(),
            frame: Vec::new(),
        }
    }

    /// One flag per port, in port order: set to cut that port's link.
    pub fn cut_flags(&self) -> Arc<[AtomicBool]> {
        self.cut.clone()
    }
}

impl Device for Switch {
    fn caps(&self) -> DeviceCaps {
        self.ports[0].caps()
    }

    fn rx_burst(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        let mut n = 0;
        let learned = &mut self.learned;
        for (i, port) in self.ports.iter_mut().enumerate() {
            let cut = self.cut[i].load(Ordering::Relaxed);
            n += port.rx_burst(max, &mut |frame, meta| {
                if cut {
                    return;
                }
                if let Some(src) = frame.get(6..12) {
                    let src: [u8; 6] = src.try_into().unwrap_or_default();
                    match learned.iter_mut().find(|(mac, _)| *mac == src) {
                        Some(entry) => entry.1 = i,
                        None => learned.push((src, i)),
                    }
                }
                on_frame(frame, meta)
            });
        }
        n
    }

    fn tx_frame(
        &mut self,
        len: usize,
        offload: TxOffload,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), PhyError> {
        self.frame.resize(len, 0);
        fill(&mut self.frame);
        let dst: [u8; 6] = self.frame[..6].try_into().unwrap_or_default();
        let to = self
            .learned
            .iter()
            .find(|(mac, _)| *mac == dst)
            .map(|&(_, port)| port);
        let frame = &self.frame;
        for (i, port) in self.ports.iter_mut().enumerate() {
            if to.is_none_or(|p| p == i) && !self.cut[i].load(Ordering::Relaxed) {
                port.tx_frame(len, offload, &mut |buf| buf.copy_from_slice(frame))?;
            }
        }
        Ok(())
    }

    fn tx_flush(&mut self) -> usize {
        self.ports.iter_mut().map(|p| p.tx_flush()).sum()
    }
}
