//! Userspace-stack transports on a DPDK port: [`DpdkStack`] initialises EAL
//! (once per process), starts one port with one queue pair per path/worker
//! and opens [`UserTcp`] connections over those queues. A connector for the
//! multipath device or the bench is [`DpdkStack::connector`]: one queue,
//! taken again on every reconnect.
//!
//! Layer order: this uses `phy::dpdk` (the only `unsafe` code) and `net`;
//! it adds no `unsafe` of its own.

use super::user::{UserTcp, UserTcpConfig};
use super::{Transport, TransportError};
use crate::phy::dpdk::{
    data_room_for_frame, data_room_for_mtu, driver_name, DpdkQueue, Eal, Mempool, Port, PortConfig,
    AF_XDP_DRIVER,
};
use crate::phy::{ChecksumMode, Device, PhyError};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// The largest frame the stack hands a TSO port (32 KiB of TCP payload and
/// its headers): larger frames save little more per byte, and each tx
/// buffer of a TSO port is this large.
pub const TSO_FRAME: usize = 32 * 1024 + 128;

/// Why a DPDK stack could not be set up; each names what failed.
#[derive(Debug, Error)]
pub enum DpdkSetupError {
    #[error("DPDK EAL initialisation failed (EAL args {args:?}): {source}")]
    Eal { args: Vec<String>, source: PhyError },
    #[error("no DPDK port named {name:?} (ports EAL probed: {available}); add it with --vdev or -a in the EAL args")]
    NoSuchPort { name: String, available: String },
    #[error("DPDK mempool for port {port:?}: {source}")]
    Mempool { port: String, source: PhyError },
    #[error("starting DPDK port {port:?} with {queues} queue(s): {source}")]
    Port {
        port: String,
        queues: u16,
        source: PhyError,
    },
    #[error("invalid DPDK option: {0}")]
    Invalid(String),
}

/// How to bring up a port and address the stacks on it.
#[derive(Debug, Clone)]
pub struct DpdkOptions {
    /// EAL options (`-l 1 --in-memory --vdev net_af_packet0,iface=veth0`).
    /// Ignored when EAL is already initialised in this process.
    pub eal_args: Vec<String>,
    /// DPDK device name of the port (`net_af_packet0`, `0000:03:00.0`).
    pub port: String,
    /// Queue pairs to configure, one per path/worker.
    pub queues: u16,
    pub local_ip: Ipv4Addr,
    /// Stack settings: prefix length, static neighbours, MTU, offloads, TCP.
    pub user: UserTcpConfig,
    pub gateway: Option<Ipv4Addr>,
    /// Port settings (`queues` above overrides `port_config.queues`).
    pub port_config: PortConfig,
    /// Mbufs in the port's pool (rx rings plus tx in flight).
    pub mbufs: u32,
}

impl DpdkOptions {
    pub fn new(eal_args: Vec<String>, port: &str, local_ip: Ipv4Addr, prefix_len: u8) -> Self {
        DpdkOptions {
            eal_args,
            port: port.to_string(),
            queues: 1,
            local_ip,
            user: UserTcpConfig {
                prefix_len,
                ..UserTcpConfig::default()
            },
            gateway: None,
            port_config: PortConfig::default(),
            mbufs: 0,
        }
    }
}

/// Parses `A.B.C.D/NN` (prefix defaults to 24).
pub fn parse_ip_prefix(text: &str) -> Result<(Ipv4Addr, u8), DpdkSetupError> {
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, p)) => (
            ip,
            p.parse::<u8>()
                .ok()
                .filter(|p| (1..=32).contains(p))
                .ok_or_else(|| DpdkSetupError::Invalid(format!("bad prefix length in {text:?}")))?,
        ),
        None => (text, 24),
    };
    let ip = ip
        .parse()
        .map_err(|_| DpdkSetupError::Invalid(format!("bad IPv4 address {ip:?}")))?;
    Ok((ip, prefix))
}

/// Parses `IP=aa:bb:cc:dd:ee:ff` (a static neighbour).
pub fn parse_neighbour(text: &str) -> Result<(Ipv4Addr, [u8; 6]), DpdkSetupError> {
    let bad = || DpdkSetupError::Invalid(format!("bad neighbour {text:?}, want IP=MAC"));
    let (ip, mac) = text.split_once('=').ok_or_else(bad)?;
    let ip = ip.parse().map_err(|_| bad())?;
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        *byte = u8::from_str_radix(parts.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok((ip, out))
}

/// One started DPDK port and the settings of the stacks on its queues.
pub struct DpdkStack {
    port: Port,
    /// With TSO on: the pool of large tx buffers (a TSO frame in one mbuf)
    /// every queue of the port sends from; else the queues send from the
    /// rx pool.
    tx_pool: Option<Arc<Mempool>>,
    options: DpdkOptions,
    /// Distinct seeds per connection: ISN, ephemeral port, timestamps.
    next_seed: AtomicU64,
}

impl std::fmt::Debug for DpdkStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpdkStack")
            .field("port", &self.options.port)
            .field("queues", &self.options.queues)
            .field("local_ip", &self.options.local_ip)
            .finish()
    }
}

/// The memif ring buffer size (`bsize`) DPDK's net_memif uses by default.
pub const MEMIF_DEFAULT_BUFFER: usize = 2048;

/// The `--vdev` argument (its index in `args`) creating `port`, and its
/// text after the device name (`role=client,socket=...`).
fn vdev_of<'a>(args: &'a [String], port: &str) -> Option<(usize, &'a str)> {
    let mut i = 0;
    while i < args.len() {
        let (at, value) = match args[i].strip_prefix("--vdev") {
            Some("") => (i + 1, args.get(i + 1).map(String::as_str)),
            Some(rest) => (i, rest.strip_prefix('=')),
            None => (i, None),
        };
        if let Some(value) = value {
            let (name, params) = value.split_once(',').unwrap_or((value, ""));
            if name == port {
                return Some((at, params));
            }
        }
        i += 1;
    }
    None
}

/// The ring buffer size of the net_memif port `port` created by a `--vdev`
/// in `args` (its `bsize=`, else 2048); None if no memif vdev makes it.
pub fn memif_buffer_size(args: &[String], port: &str) -> Option<usize> {
    if !port.starts_with("net_memif") {
        return None;
    }
    let (_, params) = vdev_of(args, port)?;
    let bsize = params
        .split(',')
        .find_map(|p| p.strip_prefix("bsize="))
        .and_then(|v| v.parse().ok());
    Some(bsize.unwrap_or(MEMIF_DEFAULT_BUFFER))
}

/// `args` with the net_memif vdev of `port` given ring buffers that hold a
/// whole `frame`-byte frame (`bsize=`, rounded up to 1 KiB), if its own
/// (or memif's 2 KiB default) are smaller; unchanged otherwise.
///
/// DPDK 22.11's net_memif spreads a longer frame over several buffers
/// (descriptors flagged NEXT) but clears that flag only on the second and
/// later descriptors of a frame, never on the first: a descriptor that
/// once carried the start of a long frame keeps NEXT when it is reused for
/// a short one, so the receiver glues that frame to the next (which is
/// lost: the IP length cuts it off), or reads into descriptors not yet
/// written. At MTU 9000 with 2 KiB buffers that lost a frame every few
/// ring turns, and TCP stalled on the retransmissions.
pub fn with_memif_buffers(args: &[String], port: &str, frame: usize) -> Vec<String> {
    let mut args = args.to_vec();
    match memif_buffer_size(&args, port) {
        Some(size) if size < frame => {}
        _ => return args,
    }
    let Some((at, _)) = vdev_of(&args, port) else {
        return args;
    };
    let bsize = frame.div_ceil(1024) * 1024;
    let arg = &mut args[at];
    let kept: Vec<&str> = arg
        .split(',')
        .filter(|p| !p.starts_with("bsize="))
        .collect();
    *arg = format!("{},bsize={bsize}", kept.join(","));
    args
}

/// EAL for this process: initialised with `args` the first time, reused after.
pub fn eal(args: &[String]) -> Result<Eal, DpdkSetupError> {
    if let Some(eal) = Eal::get() {
        return Ok(eal);
    }
    Eal::init(args).map_err(|source| DpdkSetupError::Eal {
        args: args.to_vec(),
        source,
    })
}

impl DpdkStack {
    /// Initialises EAL if needed, finds the port and starts it.
    pub fn open(options: DpdkOptions) -> Result<Arc<DpdkStack>, DpdkSetupError> {
        if options.queues == 0 {
            return Err(DpdkSetupError::Invalid(
                "a DPDK port needs at least one queue".into(),
            ));
        }
        let offload = options.user.offload;
        if options.port_config.checksum == ChecksumMode::Trusted
            && !(offload.rx_checksum && offload.tx_checksum)
        {
            return Err(DpdkSetupError::Invalid(format!(
                "checksum mode trusted on {} skips the stack's checksums through its checksum \
                 offloads, which are switched off (rx {}, tx {}; --dpdk-no-offload?): \
                 use one or the other",
                options.port, offload.rx_checksum, offload.tx_checksum
            )));
        }
        // Whole frames in one memif buffer (see `with_memif_buffers`).
        let frame = options.port_config.mtu.map_or(1500, usize::from) + 14;
        let eal_args = with_memif_buffers(&options.eal_args, &options.port, frame);
        if Eal::get().is_some() {
            if let Some(size) = memif_buffer_size(&options.eal_args, &options.port) {
                if size < frame {
                    return Err(DpdkSetupError::Invalid(format!(
                        "{} has {size}-byte ring buffers and MTU {} needs {frame}-byte \
                         frames, which net_memif spreads over several buffers and corrupts; \
                         EAL is up already: give its --vdev bsize={} or more",
                        options.port,
                        frame - 14,
                        frame.div_ceil(1024) * 1024
                    )));
                }
            }
        }
        let eal = eal(&eal_args)?;
        let port_id = eal
            .port_by_name(&options.port)
            .map_err(|_| DpdkSetupError::NoSuchPort {
                name: options.port.clone(),
                available: port_names(&eal),
            })?;
        let mut port_config = options.port_config.clone();
        port_config.queues = options.queues;
        let rings = u32::from(options.queues)
            * (u32::from(port_config.rx_ring_size) + u32::from(port_config.tx_ring_size));
        let mbufs = options.mbufs.max(rings + 2048 * u32::from(options.queues));
        let pool_name = format!("ib_p{port_id}");
        // Buffers that hold a whole frame at the port's MTU (jumbo frames
        // in one mbuf: no chains on rx, one piece per frame on tx).
        let mtu = port_config.mtu.map_or(1500, usize::from);
        let pool_error = |source| DpdkSetupError::Mempool {
            port: options.port.clone(),
            source,
        };
        // net_af_xdp builds its UMEM over the rx pool and needs the buffers
        // packed in one chunk (`Mempool::new_packed`); others get a default
        // pool, whose buffers are IOVA-contiguous for DMA.
        let af_xdp = driver_name(&eal, port_id).is_ok_and(|d| d == AF_XDP_DRIVER);
        let new_pool = if af_xdp {
            Mempool::new_packed
        } else {
            Mempool::new
        };
        let pool = new_pool(&eal, &pool_name, mbufs, 256, data_room_for_mtu(mtu), -1)
            .map_err(pool_error)?;
        let port = Port::start(&eal, port_id, &port_config, pool).map_err(|source| {
            DpdkSetupError::Port {
                port: options.port.clone(),
                queues: options.queues,
                source,
            }
        })?;
        // TSO: the stack hands the port frames of up to TSO_FRAME bytes,
        // each in one mbuf from a pool of its own (the rx pool's buffers
        // hold one MTU-sized frame).
        let tx_pool = if port.tso() {
            let per_queue = u32::from(port_config.tx_ring_size) / 2 + 256;
            let pool = Mempool::new(
                &eal,
                &format!("ib_t{port_id}"),
                per_queue * u32::from(options.queues),
                64,
                data_room_for_frame(TSO_FRAME.max(mtu + 14)),
                -1,
            )
            .map_err(pool_error)?;
            Some(pool)
        } else {
            None
        };
        log::info!(
            "DPDK port {:?} ({}): MTU {}, TSO {}, LRO {}, checksum offload rx/tx {:?}, checksums {}",
            options.port,
            port.driver(),
            port.mtu(),
            port.tso(),
            port.lro(),
            port.checksum_offload(),
            port.checksum_mode()
        );
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id()) << 32;
        Ok(Arc::new(DpdkStack {
            port,
            tx_pool,
            options,
            next_seed: AtomicU64::new(seed),
        }))
    }

    pub fn port(&self) -> &Port {
        &self.port
    }

    /// The stack's MAC: the port's, or for a port without one (ring ports
    /// made by `Eal::ring_pair` are all 00:00:00:00:00:00) a locally
    /// administered 02:69:62:00:00:<port id>, so two such ports differ.
    pub fn mac(&self) -> [u8; 6] {
        match self.port.mac() {
            [0, 0, 0, 0, 0, 0] => [0x02, 0x69, 0x62, 0, 0, self.port.id() as u8],
            mac => mac,
        }
    }
    pub fn queues(&self) -> u16 {
        self.options.queues
    }
    pub fn options(&self) -> &DpdkOptions {
        &self.options
    }

    /// Takes queue pair `queue` (free again once the transport is dropped),
    /// resolves the next hop and connects.
    pub fn connect(
        &self,
        queue: u16,
        remote: SocketAddrV4,
    ) -> Result<UserTcp<DpdkQueue>, TransportError> {
        let device = self.take_queue(queue, remote)?;
        self.connect_on(device, Some(queue), remote)
    }

    /// Queue pair `queue` of the port (free again once dropped), sending
    /// from the stack's TSO pool when the port has TSO: what a listener on
    /// the stack (the embedded target) serves on.
    pub fn queue(&self, queue: u16) -> Result<DpdkQueue, PhyError> {
        match &self.tx_pool {
            Some(pool) => self.port.queue_with_tx_pool(queue, Arc::clone(pool)),
            None => self.port.queue(queue),
        }
    }

    /// Queue pair `queue` as a bare device (e.g. to wrap it in
    /// `phy::impair::Impaired`), for [`DpdkStack::connect_device`].
    pub fn take_queue(
        &self,
        queue: u16,
        remote: SocketAddrV4,
    ) -> Result<DpdkQueue, TransportError> {
        self.queue(queue).map_err(|e| TransportError::Connect {
            addr: remote.into(),
            source: std::io::Error::other(format!("DPDK port {:?}: {e}", self.options.port)),
        })
    }

    /// Connects over `device` (one of this port's queues, maybe wrapped)
    /// with this stack's addresses and settings.
    /// With several queues on the port, pass the queue the device stands
    /// for to [`DpdkStack::connect_device_on`] instead, so the connection
    /// is steered to it.
    pub fn connect_device<D: Device>(
        &self,
        device: D,
        remote: SocketAddrV4,
    ) -> Result<UserTcp<D>, TransportError> {
        self.connect_on(device, None, remote)
    }

    /// [`DpdkStack::connect_device`] for a device wrapping queue `queue`:
    /// on a multi-queue port the source port is chosen so that RSS brings
    /// the replies back to that queue.
    pub fn connect_device_on<D: Device>(
        &self,
        device: D,
        queue: u16,
        remote: SocketAddrV4,
    ) -> Result<UserTcp<D>, TransportError> {
        self.connect_on(device, Some(queue), remote)
    }

    fn connect_on<D: Device>(
        &self,
        device: D,
        queue: Option<u16>,
        remote: SocketAddrV4,
    ) -> Result<UserTcp<D>, TransportError> {
        // (The queue's first burst gives this thread an EAL lcore id.)
        let mut config = self.options.user.clone();
        config.seed = self
            .next_seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        config.local_port = self.steered_port(queue, remote, config.seed)?;
        let mut t = UserTcp::connect(
            device,
            self.options.local_ip,
            Some(self.mac()),
            self.options.gateway,
            remote,
            config,
        )?;
        // A side connection (a fence login) on this queue: steered the same.
        if let (Some(queue), Some(rss), true) =
            (queue, self.port.rss_steering(), self.options.queues > 1)
        {
            t.steer_side_connections(rss.clone(), queue);
        }
        Ok(t)
    }

    /// A connector (for `multipath::PathConfig` or the bench) that opens a
    /// connection to `remote` on queue `queue` each time it is called.
    pub fn connector(
        self: &Arc<Self>,
        queue: u16,
        remote: SocketAddrV4,
    ) -> impl FnMut() -> Result<Box<dyn Transport>, TransportError> + Send + 'static {
        let stack = Arc::clone(self);
        move || {
            let t = stack.connect(queue, remote)?;
            Ok(Box::new(t) as Box<dyn Transport>)
        }
    }
}

impl DpdkStack {
    /// A connector to any address over queue pair `queue`, for paths that
    /// follow login redirects (`multipath::PathConnector::Portal`); IPv6
    /// addresses are refused (the stack speaks IPv4 only).
    pub fn addr_connector(
        self: &Arc<Self>,
        queue: u16,
    ) -> impl FnMut(SocketAddr) -> Result<Box<dyn Transport>, TransportError> + Send + 'static {
        let stack = Arc::clone(self);
        move |to| match to {
            SocketAddr::V4(to) => {
                let t = stack.connect(queue, to)?;
                Ok(Box::new(t) as Box<dyn Transport>)
            }
            SocketAddr::V6(_) => Err(TransportError::Connect {
                addr: to,
                source: std::io::Error::other(
                    "the userspace stack speaks IPv4 only (login redirected to IPv6?)",
                ),
            }),
        }
    }
}

impl DpdkStack {
    /// With several queues, the source port whose return traffic the NIC's
    /// RSS puts on `queue` (None: one queue, any port will do). A port that
    /// spreads flows without saying how cannot carry a connection per queue.
    fn steered_port(
        &self,
        queue: Option<u16>,
        remote: SocketAddrV4,
        seed: u64,
    ) -> Result<Option<u16>, TransportError> {
        let (Some(queue), true) = (queue, self.options.queues > 1) else {
            return Ok(None);
        };
        let unsteerable = |why: String| TransportError::Connect {
            addr: remote.into(),
            source: std::io::Error::other(why),
        };
        let rss = self.port.rss_steering().ok_or_else(|| {
            unsteerable(format!(
                "DPDK port {:?} has {} queues but reports no RSS key and redirection table, \
                 so connection {queue} cannot be steered to its queue (give each path a port \
                 of its own)",
                self.options.port, self.options.queues
            ))
        })?;
        let start = 49152 + (seed % 16384) as u16;
        rss.pick_local_port(self.options.local_ip, remote, queue, 49152..=65535, start)
            .map(Some)
            .ok_or_else(|| {
                unsteerable(format!(
                    "no source port steers {remote}'s replies to queue {queue} of DPDK port {:?} \
                     (its redirection table never names that queue)",
                    self.options.port
                ))
            })
    }
}

fn port_names(eal: &Eal) -> String {
    let names = eal.port_names();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn memif_buffers_grow_to_hold_a_frame() {
        let eal = args(
            "-l 0 --vdev net_memif0,role=client,socket=/run/a.sock \
             --vdev=net_memif1,role=server,bsize=4096 --vdev net_af_xdp0,iface=v0",
        );
        assert_eq!(memif_buffer_size(&eal, "net_memif0"), Some(2048));
        assert_eq!(memif_buffer_size(&eal, "net_memif1"), Some(4096));
        assert_eq!(memif_buffer_size(&eal, "net_memif2"), None);
        assert_eq!(memif_buffer_size(&eal, "net_af_xdp0"), None);

        // MTU 1500 frames fit the default: nothing changes.
        assert_eq!(with_memif_buffers(&eal, "net_memif0", 1514), eal);
        // MTU 9000: 9014-byte frames, 9 KiB buffers.
        let jumbo = with_memif_buffers(&eal, "net_memif0", 9014);
        assert_eq!(
            jumbo[3],
            "net_memif0,role=client,socket=/run/a.sock,bsize=9216"
        );
        assert_eq!(memif_buffer_size(&jumbo, "net_memif0"), Some(9216));
        assert_eq!(jumbo[4..], eal[4..]);
        // A bsize too small is replaced, in the --vdev=... form too.
        let jumbo = with_memif_buffers(&eal, "net_memif1", 9014);
        assert_eq!(jumbo[4], "--vdev=net_memif1,role=server,bsize=9216");
        // Big enough already, or not a memif port: unchanged.
        let big = args("--vdev net_memif0,bsize=10240");
        assert_eq!(with_memif_buffers(&big, "net_memif0", 9014), big);
        assert_eq!(with_memif_buffers(&eal, "net_af_xdp0", 9014), eal);
    }

    #[test]
    fn parses_prefix_and_neighbour() {
        assert_eq!(
            parse_ip_prefix("10.1.2.3/16").unwrap(),
            (Ipv4Addr::new(10, 1, 2, 3), 16)
        );
        assert_eq!(
            parse_ip_prefix("10.1.2.3").unwrap(),
            (Ipv4Addr::new(10, 1, 2, 3), 24)
        );
        assert!(parse_ip_prefix("10.1.2.3/33").is_err());
        assert!(parse_ip_prefix("10.1.2/8").is_err());
        assert_eq!(
            parse_neighbour("10.0.0.1=02:00:00:00:00:0a").unwrap(),
            (Ipv4Addr::new(10, 0, 0, 1), [2, 0, 0, 0, 0, 10])
        );
        assert!(parse_neighbour("10.0.0.1=02:00:00:00:00").is_err());
        assert!(parse_neighbour("10.0.0.1").is_err());
    }
}
