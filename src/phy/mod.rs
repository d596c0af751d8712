//! Packet devices: the DPDK port/queue wrapper (the only place outside dpdk-sys
//! with `unsafe`) and an in-memory simulated link for deterministic tests.
//!
//! A [`Device`] moves Ethernet frames in bursts. It never allocates per frame
//! in steady state: received frames are lent to a callback, transmitted
//! frames are written in place into the device's own buffer (an mbuf on DPDK).

use thiserror::Error;

#[cfg(feature = "dpdk")]
pub mod dpdk;

/// Errors of the packet-device layer.
#[derive(Debug, Error)]
pub enum PhyError {
    #[error("no transmit buffer available (mempool or tx ring exhausted)")]
    NoBuffer,
    #[error("frame of {len} bytes exceeds the device limit of {max}")]
    FrameTooLong { len: usize, max: usize },
    #[error("device error: {0}")]
    Device(String),
}

/// What the device did for a received frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// The NIC verified the IPv4 header checksum (and it was good).
    pub ipv4_checksum_good: bool,
    /// The NIC verified the TCP/UDP checksum (and it was good).
    pub l4_checksum_good: bool,
}

/// What the stack asks the device to do for a transmitted frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffload {
    /// Fill in the IPv4 header checksum.
    pub ipv4_checksum: bool,
    /// Fill in the TCP checksum (the stack has put the pseudo-header sum in).
    pub tcp_checksum: bool,
    /// Segment this frame into TCP segments of this payload size (TSO); 0 = off.
    pub tso_segment_size: u16,
    /// Header lengths, needed by the NIC for the offloads above.
    pub l2_len: u8,
    pub l3_len: u8,
    pub l4_len: u8,
}

/// What a device can do; the stack uses an offload only when it is here and
/// the user did not switch it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCaps {
    pub mac: [u8; 6],
    /// Largest IP packet (MTU), without the Ethernet header.
    pub mtu: usize,
    pub rx_checksum: bool,
    pub tx_checksum: bool,
    pub tso: bool,
    /// Largest frame `tx_frame` accepts (bigger than mtu + 14 only with TSO).
    pub max_tx_frame: usize,
}

/// How a port treats the IPv4 and TCP checksums (`--checksum sw|trusted`).
///
/// - [`Sw`](ChecksumMode::Sw), the default: every received frame is
///   verified and every sent frame carries correct checksums, by the PMD's
///   offload where it has one (`rte_eth_dev_info` capabilities, results in
///   the mbuf's `ol_flags`), else in software. Safe with any peer and link.
/// - [`Trusted`](ChecksumMode::Trusted), for a virtual link between two
///   processes of one host that cannot corrupt a frame (net_memif, net_ring:
///   shared memory, no wire, no DMA): received frames count as verified,
///   and sent frames leave their checksums to the PMD's offload where it
///   has one, else they carry only the pseudo-header sum an offload would
///   start from. So **both ends must be `trusted`**: a peer that verifies
///   drops every TCP segment, and the connection never comes up (it fails
///   closed: no byte is taken that a checksum would have refused). Ports
///   on other PMDs (a NIC, af_packet, af_xdp, tap: a wire or a kernel
///   stack that verifies) refuse the mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ChecksumMode {
    #[default]
    Sw,
    Trusted,
}

impl ChecksumMode {
    /// The name on the command line and in bench output (`sw`, `trusted`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumMode::Sw => "sw",
            ChecksumMode::Trusted => "trusted",
        }
    }
}

impl std::fmt::Display for ChecksumMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A checksum mode that is neither `sw` nor `trusted`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "unknown checksum mode {0:?}: want sw (verify every frame, correct checksums, by the \
     NIC's offload where it has one) or trusted (memif/net_ring only, both ends trusted: \
     no software checksums)"
)]
pub struct ChecksumModeError(pub String);

impl std::str::FromStr for ChecksumMode {
    type Err = ChecksumModeError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "sw" => Ok(ChecksumMode::Sw),
            "trusted" => Ok(ChecksumMode::Trusted),
            other => Err(ChecksumModeError(other.to_string())),
        }
    }
}

/// A packet device carrying one queue pair, owned by one worker.
pub trait Device {
    fn caps(&self) -> DeviceCaps;
    /// Receives up to `max` frames; each is lent to `on_frame` and is only
    /// valid during that call. Returns the number of frames received.
    fn rx_burst(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8], RxMeta)) -> usize;
    /// Queues one frame of `len` bytes, written in place by `fill`, which
    /// must write every one of them: the buffer may still hold an older
    /// frame (devices do not zero it; that would be a pass over every byte
    /// sent).
    fn tx_frame(
        &mut self,
        len: usize,
        offload: TxOffload,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), PhyError>;
    /// Sends the queued frames as one burst; returns how many left.
    fn tx_flush(&mut self) -> usize;
}
pub mod impair;
pub mod rss;
pub mod sim;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_mode_parses_its_two_names_and_names_a_bad_one() {
        assert_eq!("sw".parse(), Ok(ChecksumMode::Sw));
        assert_eq!("trusted".parse(), Ok(ChecksumMode::Trusted));
        assert_eq!(ChecksumMode::default(), ChecksumMode::Sw);
        for mode in [ChecksumMode::Sw, ChecksumMode::Trusted] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
        for bad in ["", "hw", "SW", "trusted ", "none"] {
            let err = bad.parse::<ChecksumMode>().unwrap_err();
            assert_eq!(err, ChecksumModeError(bad.to_string()));
            let text = err.to_string();
            assert!(text.contains(&format!("{bad:?}")), "{text}");
            assert!(text.contains("sw") && text.contains("trusted"), "{text}");
        }
    }
}
