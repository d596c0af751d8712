//! A small embedded iSCSI target: the default target of `iscsi-bypass bench`,
//! a null/RAM LUN for benchmarking the initiator alone, and a fault injector
//! for tests.
//!
//! - [`conn`]: the sans-IO connection state machine (bytes in, bytes out):
//!   login with CHAP, negotiation, discovery, SCSI command flow (immediate
//!   data, unsolicited Data-Out, R2T, Data-In), NOP, task management, logout.
//! - [`scsi`]: the SCSI device emulation behind it (INQUIRY/VPD, READ
//!   CAPACITY, READ/WRITE, REPORT LUNS, ALUA REPORT TARGET PORT GROUPS, ...).
//! - [`lun`]: RAM-backed (sharded locks, shared by every connection) or null
//!   logical units.
//! - [`session`]: what the connections of one session share (MC/S: the
//!   CmdSN window and order, connections by CID, tasks awaiting TASK
//!   REASSIGN).
//! - [`fault`]: the [`FaultInjector`] (atomics; cheap to clone), per portal
//!   or per connection (CID).
//! - [`server`]: the runtime over kernel TCP, one thread per connection.
//! - [`user`]: the runtime over the userspace stack on a packet device
//!   (DPDK), one poll-mode thread for every connection.

pub mod conn;
pub mod fault;
pub mod lun;
pub mod pr;
pub mod scsi;
pub mod server;
pub(crate) mod session;
pub mod strict;
pub mod user;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

use crate::iscsi::chap::{ChapAlgorithm, Credentials, Secret};

pub use conn::TargetConn;
pub use fault::{AsyncEvent, FaultInjector};
pub use lun::{Lun, WriteExecution};
pub use server::{Target, TargetHandle};
pub use user::UserListenConfig;

/// Errors of the embedded target's runtime and configuration.
#[derive(Debug, Error)]
pub enum TargetError {
    #[error("cannot listen on portal {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid target configuration: {0}")]
    Config(String),
    #[error("no ALUA target port group {0} on this target")]
    UnknownAluaGroup(u16),
    #[error(
        "ALUA state {0} is not one the target serves (LBA-dependent and reserved codes are not)"
    )]
    UnsupportedAluaState(AluaState),
    #[error("cannot start a target thread: {0}")]
    Spawn(std::io::Error),
    #[error(
        "refusing to serve portal {portal} without CHAP: {ip} is not a loopback address, so \
         anyone who can reach it could read and write the LUNs. Add --chap-user NAME \
         --chap-secret-file FILE, or --no-auth if this network is trusted",
        ip = portal.ip()
    )]
    Unauthenticated { portal: SocketAddr },
}

/// The asymmetric access state of a target port group: the crate's one
/// type (SPC-4 §6.37), shared with the initiator's REPORT TARGET PORT
/// GROUPS parser. The target serves every state but LBA-dependent and the
/// reserved codes ([`served`]).
pub use crate::wire::scsi::AluaState;

/// Whether the target serves ALUA state `state`: the six states its REPORT
/// TARGET PORT GROUPS says it supports (T_SUP, O_SUP, U_SUP, S_SUP, AN_SUP,
/// AO_SUP), not LBA-dependent or a reserved code.
pub(crate) fn served(state: AluaState) -> bool {
    !matches!(state, AluaState::LbaDependent | AluaState::Reserved(_))
}

/// What stores a logical unit's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LunBacking {
    /// RAM, allocated lazily in chunks; shared by all connections and portals
    /// and kept for the life of the target.
    Ram,
    /// Reads return zeros, writes are discarded: for benchmarking the initiator.
    Null,
}

/// One logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunConfig {
    /// LUN number (0..16383, single-level addressing).
    pub lun: u16,
    pub backing: LunBacking,
    pub size_bytes: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// VPD 0x80 unit serial number; derived from the IQN and LUN when `None`.
    pub serial: Option<String>,
}

impl LunConfig {
    pub fn ram(lun: u16, size_bytes: u64) -> LunConfig {
        LunConfig {
            lun,
            backing: LunBacking::Ram,
            size_bytes,
            block_size: 512,
            serial: None,
        }
    }

    pub fn null(lun: u16, size_bytes: u64) -> LunConfig {
        LunConfig {
            backing: LunBacking::Null,
            ..LunConfig::ram(lun, size_bytes)
        }
    }

    pub fn block_size(mut self, block_size: u32) -> LunConfig {
        self.block_size = block_size;
        self
    }

    pub fn serial(mut self, serial: impl Into<String>) -> LunConfig {
        self.serial = Some(serial.into());
        self
    }

    pub fn blocks(&self) -> u64 {
        self.size_bytes / u64::from(self.block_size.max(1))
    }
}

/// One network portal: a listen address and the ALUA target port group its
/// target port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortalConfig {
    /// Port 0 picks a free port; see [`TargetHandle::portals`].
    pub addr: SocketAddr,
    pub alua_group: u16,
    /// iSCSI TargetPortalGroupTag; None: a group of its own (portal index +
    /// 1). Portals of one group share I_T nexuses, so a login with a known
    /// ISID on any of them reinstates that session (RFC 7143 §6.3.5).
    pub portal_group: Option<u16>,
}

/// CHAP settings. `initiator` is what the initiator must prove it knows;
/// `target` (mutual CHAP) is what we answer with when challenged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapConfig {
    pub initiator: Credentials,
    pub target: Option<Credentials>,
    /// CHAP_A values accepted (default: all four); the initiator's first
    /// offered one that is here is chosen.
    pub algorithms: Vec<ChapAlgorithm>,
    /// Require CHAP on discovery sessions too (normal sessions always do).
    pub on_discovery: bool,
}

/// Values the target allows in operational negotiation (the initiator's
/// offer is met with the RFC 7143 result function against these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetLimits {
    /// The largest data segment we accept (our MaxRecvDataSegmentLength).
    pub max_recv_data_segment_len: u32,
    pub max_burst_len: u32,
    pub first_burst_len: u32,
    pub max_outstanding_r2t: u32,
    /// Our InitialR2T value (OR-ed with the initiator's).
    pub initial_r2t: bool,
    /// Our ImmediateData value (AND-ed with the initiator's).
    pub immediate_data: bool,
    /// Accept CRC32C header/data digests when offered.
    pub allow_digests: bool,
}

/// The Block Limits VPD page (B0h) the target reports, and enforces: a
/// READ/WRITE, UNMAP or WRITE SAME beyond them is refused with ILLEGAL
/// REQUEST (INVALID FIELD IN CDB, or IN PARAMETER LIST for UNMAP), so an
/// initiator that does not split fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimitsConfig {
    /// MAXIMUM TRANSFER LENGTH in bytes (reported in blocks).
    pub max_transfer_bytes: u32,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY in blocks (0: not reported).
    pub optimal_granularity: u16,
    /// MAXIMUM UNMAP LBA COUNT per UNMAP command.
    pub max_unmap_blocks: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptors: u32,
    /// OPTIMAL UNMAP GRANULARITY in blocks.
    pub unmap_granularity: u32,
    /// UNMAP GRANULARITY ALIGNMENT (reported with UGAVALID when set).
    pub unmap_alignment: Option<u32>,
    /// MAXIMUM WRITE SAME LENGTH in blocks (0: no limit, not reported).
    pub max_write_same_blocks: u64,
}

impl Default for BlockLimitsConfig {
    fn default() -> BlockLimitsConfig {
        BlockLimitsConfig {
            max_transfer_bytes: 16 << 20,
            optimal_granularity: 0,
            max_unmap_blocks: u32::MAX,
            max_unmap_descriptors: 256,
            unmap_granularity: 1,
            unmap_alignment: None,
            max_write_same_blocks: 0,
        }
    }
}

impl Default for TargetLimits {
    fn default() -> TargetLimits {
        TargetLimits {
            max_recv_data_segment_len: 262_144,
            max_burst_len: 1_048_576,
            first_burst_len: 262_144,
            max_outstanding_r2t: 8,
            initial_r2t: false,
            immediate_data: true,
            allow_digests: true,
        }
    }
}

/// Everything [`Target::start`] needs. Build it with [`TargetConfig::ram`] /
/// [`TargetConfig::null`] and the builder methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    pub iqn: String,
    pub alias: Option<String>,
    pub luns: Vec<LunConfig>,
    /// Empty means one portal on 127.0.0.1 with a free port.
    pub portals: Vec<PortalConfig>,
    pub chap: Option<ChapConfig>,
    /// Commands the initiator may have outstanding per session (the CmdSN window).
    pub queue_depth: u32,
    pub limits: TargetLimits,
    /// Report UNIT ATTENTIONs: 29/00 (power on/reset) once per LUN per new
    /// session, and 29/03 on the other sessions after a LUN reset.
    pub unit_attentions: bool,
    /// Send our own NOP-In pings this often when the connection is idle; a
    /// ping still unanswered at the next interval closes the connection.
    pub nop_in_interval: Option<Duration>,
    /// Strict mode ([`strict`]): check every rule an initiator must keep;
    /// a broken one ends the connection and is recorded
    /// ([`TargetHandle::violations`]).
    pub strict: bool,
    /// Block Limits reported and enforced.
    pub block_limits: BlockLimitsConfig,
    /// ALUA with explicit transitions only: INQUIRY TPGS 10b, SET TARGET
    /// PORT GROUPS accepted. Otherwise implicit only (TPGS 01b) and SET
    /// TARGET PORT GROUPS is refused.
    pub alua_explicit: bool,
    /// Operation codes answered INVALID COMMAND OPERATION CODE and left out
    /// of REPORT SUPPORTED OPERATION CODES (to play a target without them).
    pub disabled_opcodes: Vec<u8>,
    /// MaxConnections the target allows per session (MC/S; 1 turns it
    /// off). A login with a session's ISID and TSIH and a new CID adds a
    /// connection to it.
    pub max_connections: u16,
    /// The highest ErrorRecoveryLevel the target offers (0..=2): 1 adds
    /// SNACK, 2 connection recovery and TASK REASSIGN.
    pub max_error_recovery_level: u8,
}

impl TargetConfig {
    /// A target with no LUNs and no portals yet.
    pub fn new(iqn: impl Into<String>) -> TargetConfig {
        TargetConfig {
            iqn: iqn.into(),
            alias: None,
            luns: Vec::new(),
            portals: Vec::new(),
            chap: None,
            queue_depth: 128,
            limits: TargetLimits::default(),
            unit_attentions: false,
            nop_in_interval: None,
            strict: false,
            block_limits: BlockLimitsConfig::default(),
            alua_explicit: false,
            disabled_opcodes: Vec::new(),
            max_connections: 4,
            max_error_recovery_level: 2,
        }
    }

    /// MaxConnections offered (1: no MC/S).
    pub fn max_connections(mut self, n: u16) -> TargetConfig {
        self.max_connections = n;
        self
    }

    /// The highest ErrorRecoveryLevel offered (0..=2).
    pub fn max_error_recovery_level(mut self, erl: u8) -> TargetConfig {
        self.max_error_recovery_level = erl;
        self
    }

    pub fn block_limits(mut self, limits: BlockLimitsConfig) -> TargetConfig {
        self.block_limits = limits;
        self
    }

    /// Plays a target without these operation codes (see
    /// [`TargetConfig::disabled_opcodes`]).
    pub fn without_opcodes(mut self, opcodes: &[u8]) -> TargetConfig {
        self.disabled_opcodes.extend_from_slice(opcodes);
        self
    }

    /// Explicit ALUA only: the initiator moves port groups with SET TARGET
    /// PORT GROUPS; the target never changes a state by itself.
    pub fn alua_explicit(mut self, on: bool) -> TargetConfig {
        self.alua_explicit = on;
        self
    }

    /// One RAM-backed LUN 0 of `size_bytes` with 512-byte blocks.
    pub fn ram(iqn: impl Into<String>, size_bytes: u64) -> TargetConfig {
        TargetConfig::new(iqn).lun(LunConfig::ram(0, size_bytes))
    }

    /// One null LUN 0 (reads zeros, discards writes) with 512-byte blocks.
    pub fn null(iqn: impl Into<String>, size_bytes: u64) -> TargetConfig {
        TargetConfig::new(iqn).lun(LunConfig::null(0, size_bytes))
    }

    pub fn lun(mut self, lun: LunConfig) -> TargetConfig {
        self.luns.push(lun);
        self
    }

    /// Sets the block size of every LUN configured so far.
    pub fn block_size(mut self, block_size: u32) -> TargetConfig {
        for l in &mut self.luns {
            l.block_size = block_size;
        }
        self
    }

    /// Adds a portal in its own ALUA group (group id = portal index + 1).
    pub fn portal(mut self, addr: SocketAddr) -> TargetConfig {
        let alua_group = self.portals.len() as u16 + 1;
        self.portals.push(PortalConfig {
            addr,
            alua_group,
            portal_group: None,
        });
        self
    }

    /// Puts every portal configured so far in iSCSI portal group `tpgt`
    /// (as tgtd does with all its portals), keeping their ALUA groups.
    pub fn one_portal_group(mut self, tpgt: u16) -> TargetConfig {
        for p in &mut self.portals {
            p.portal_group = Some(tpgt);
        }
        self
    }

    /// Adds a portal in the given ALUA target port group.
    pub fn portal_in_group(mut self, addr: SocketAddr, alua_group: u16) -> TargetConfig {
        self.portals.push(PortalConfig {
            addr,
            alua_group,
            portal_group: None,
        });
        self
    }

    /// Adds `n` portals on 127.0.0.1 with free ports, each in its own ALUA group.
    pub fn loopback_portals(mut self, n: usize) -> TargetConfig {
        for _ in 0..n {
            self = self.portal(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        }
        self
    }

    /// Requires one-way CHAP: the initiator must know `user`/`secret`.
    pub fn chap(mut self, user: impl Into<String>, secret: impl Into<Vec<u8>>) -> TargetConfig {
        let initiator = Credentials {
            user: user.into(),
            secret: Secret::new(secret),
        };
        match &mut self.chap {
            Some(c) => c.initiator = initiator,
            None => {
                self.chap = Some(ChapConfig {
                    initiator,
                    target: None,
                    algorithms: ChapAlgorithm::PREFERRED.to_vec(),
                    on_discovery: false,
                })
            }
        }
        self
    }

    /// The target's own credentials for mutual CHAP. Call after [`chap`](Self::chap).
    pub fn mutual_chap(
        mut self,
        user: impl Into<String>,
        secret: impl Into<Vec<u8>>,
    ) -> TargetConfig {
        if let Some(c) = &mut self.chap {
            c.target = Some(Credentials {
                user: user.into(),
                secret: Secret::new(secret),
            });
        }
        self
    }

    /// The CHAP algorithms accepted. Call after [`chap`](Self::chap).
    pub fn chap_algorithms(mut self, algorithms: &[ChapAlgorithm]) -> TargetConfig {
        if let Some(c) = &mut self.chap {
            c.algorithms = algorithms.to_vec();
        }
        self
    }

    /// Requires CHAP on discovery sessions as well.
    pub fn chap_on_discovery(mut self, on: bool) -> TargetConfig {
        if let Some(c) = &mut self.chap {
            c.on_discovery = on;
        }
        self
    }

    pub fn queue_depth(mut self, depth: u32) -> TargetConfig {
        self.queue_depth = depth;
        self
    }

    pub fn limits(mut self, limits: TargetLimits) -> TargetConfig {
        self.limits = limits;
        self
    }

    pub fn unit_attentions(mut self, on: bool) -> TargetConfig {
        self.unit_attentions = on;
        self
    }

    /// Strict mode: the target checks the initiator (see [`strict`]).
    pub fn strict(mut self, on: bool) -> TargetConfig {
        self.strict = on;
        self
    }

    pub fn nop_in_interval(mut self, interval: Option<Duration>) -> TargetConfig {
        self.nop_in_interval = interval;
        self
    }

    pub fn alias(mut self, alias: impl Into<String>) -> TargetConfig {
        self.alias = Some(alias.into());
        self
    }

    /// Refuses, before anything is bound, to serve without CHAP on a portal
    /// beyond this host, unless `no_auth` says the network is trusted.
    pub fn check_exposure(&self, no_auth: bool) -> Result<(), TargetError> {
        if self.chap.is_some() || no_auth {
            return Ok(());
        }
        match self
            .portals
            .iter()
            .find(|p| !p.addr.ip().to_canonical().is_loopback())
        {
            Some(p) => Err(TargetError::Unauthenticated { portal: p.addr }),
            None => Ok(()),
        }
    }

    /// Checks what [`Target::start`] would refuse.
    pub fn validate(&self) -> Result<(), TargetError> {
        let bad = |s: String| Err(TargetError::Config(s));
        if self.iqn.is_empty() || self.iqn.len() > 223 {
            return bad(format!("target name {:?} must be 1..=223 bytes", self.iqn));
        }
        if self.queue_depth == 0 {
            return bad("queue depth must be at least 1".into());
        }
        if self.max_connections == 0 {
            return bad("MaxConnections must be at least 1".into());
        }
        if self.max_error_recovery_level > 2 {
            return bad(format!(
                "ErrorRecoveryLevel {} is beyond 2, the highest RFC 7143 defines",
                self.max_error_recovery_level
            ));
        }
        let l = &self.limits;
        if !(512..=16_777_215).contains(&l.max_recv_data_segment_len)
            || !(512..=16_777_215).contains(&l.max_burst_len)
            || !(512..=16_777_215).contains(&l.first_burst_len)
            || l.max_outstanding_r2t == 0
        {
            return bad("negotiation limits are outside the RFC 7143 ranges".into());
        }
        let bl = &self.block_limits;
        if bl.max_transfer_bytes < 4096 || bl.max_unmap_blocks == 0 || bl.max_unmap_descriptors == 0
        {
            return bad(
                "block limits: maximum transfer must be at least 4096 bytes, and the UNMAP \
                 limits at least 1"
                    .into(),
            );
        }
        for (i, lun) in self.luns.iter().enumerate() {
            if lun.block_size != 512 && lun.block_size != 4096 {
                return bad(format!("LUN {}: block size must be 512 or 4096", lun.lun));
            }
            if lun.blocks() == 0 {
                return bad(format!("LUN {}: size is smaller than one block", lun.lun));
            }
            if lun.lun > 0x3fff {
                return bad(format!("LUN {} is beyond single-level addressing", lun.lun));
            }
            if self.luns[..i].iter().any(|o| o.lun == lun.lun) {
                return bad(format!("LUN {} is configured twice", lun.lun));
            }
        }
        Ok(())
    }
}

/// One portal as the running target knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortalInfo {
    /// The bound address (the real port when port 0 was asked for).
    pub addr: SocketAddr,
    /// iSCSI TargetPortalGroupTag (its own, index + 1, unless configured).
    pub tpgt: u16,
    /// The SCSI relative target port identifier (index + 1).
    pub relative_port: u16,
    pub alua_group: u16,
}

/// State shared by every connection of one target: configuration, LUNs,
/// portals, ALUA states, TSIH allocation and faults.
#[derive(Debug)]
pub struct TargetShared {
    pub config: TargetConfig,
    pub luns: Vec<Lun>,
    pub portals: Vec<PortalInfo>,
    alua: Vec<(u16, AtomicU8)>,
    /// Bumped on every ALUA state change: each session that has not seen
    /// the current value owes its initiator a UNIT ATTENTION 2A/06.
    alua_generation: AtomicU64,
    next_tsih: AtomicU16,
    /// Live normal sessions by I_T nexus, for reinstatement.
    sessions: std::sync::Mutex<Vec<SessionEntry>>,
    pub faults: FaultInjector,
    /// What strict mode caught, oldest first.
    violations: std::sync::Mutex<Vec<strict::Violation>>,
}

/// One live normal session in the target's session table.
#[derive(Debug)]
struct SessionEntry {
    initiator: String,
    isid: [u8; 6],
    tpgt: u16,
    tsih: u16,
    /// Set when a newer login of the same I_T nexus ended this session.
    ended: Arc<std::sync::atomic::AtomicBool>,
    /// What its connections share (MC/S).
    session: Arc<session::Session>,
}

/// Why a login that names an existing session (TSIH not 0) cannot join it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinRefusal {
    /// No such session for this initiator port (status 0x020a).
    NoSession,
    /// It has MaxConnections connections already (status 0x0209).
    TooManyConnections,
}

impl TargetShared {
    /// Builds the shared state for portals already bound at `addrs` (one per
    /// entry of `config.portals`, or one when that list is empty).
    pub fn new(config: TargetConfig, addrs: &[SocketAddr]) -> Result<TargetShared, TargetError> {
        config.validate()?;
        let portals: Vec<PortalInfo> = addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| PortalInfo {
                addr,
                tpgt: config
                    .portals
                    .get(i)
                    .and_then(|p| p.portal_group)
                    .unwrap_or(i as u16 + 1),
                relative_port: i as u16 + 1,
                alua_group: config.portals.get(i).map_or(i as u16 + 1, |p| p.alua_group),
            })
            .collect();
        let mut alua: Vec<(u16, AtomicU8)> = Vec::new();
        for p in &portals {
            if !alua.iter().any(|(g, _)| *g == p.alua_group) {
                alua.push((
                    p.alua_group,
                    AtomicU8::new(AluaState::ActiveOptimized.bits()),
                ));
            }
        }
        let luns = config
            .luns
            .iter()
            .map(|l| Lun::new(&config.iqn, l))
            .collect();
        let faults = FaultInjector::new(portals.len());
        Ok(TargetShared {
            config,
            luns,
            portals,
            alua,
            alua_generation: AtomicU64::new(0),
            next_tsih: AtomicU16::new(1),
            sessions: std::sync::Mutex::new(Vec::new()),
            faults,
            violations: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Strict mode caught `v`.
    pub fn record_violation(&self, v: strict::Violation) {
        log::warn!("strict mode: {v}");
        self.violations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(v);
    }

    /// What strict mode caught so far, oldest first.
    pub fn violations(&self) -> Vec<strict::Violation> {
        self.violations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn alua_state(&self, group: u16) -> Option<AluaState> {
        self.alua
            .iter()
            .find(|(g, _)| *g == group)
            .map(|(_, s)| AluaState::from_bits(s.load(Ordering::Relaxed)))
    }

    pub fn set_alua_state(&self, group: u16, state: AluaState) -> Result<(), TargetError> {
        let (_, s) = self
            .alua
            .iter()
            .find(|(g, _)| *g == group)
            .ok_or(TargetError::UnknownAluaGroup(group))?;
        if !served(state) {
            return Err(TargetError::UnsupportedAluaState(state));
        }
        if s.swap(state.bits(), Ordering::AcqRel) != state.bits() {
            // SPC-4 5.15.2.4: every I_T nexus hears of the change by a
            // UNIT ATTENTION (ASYMMETRIC ACCESS STATE CHANGED).
            self.alua_generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// How many ALUA state changes there have been.
    pub fn alua_generation(&self) -> u64 {
        self.alua_generation.load(Ordering::Acquire)
    }

    /// ALUA group ids in the order they first appear among the portals.
    pub fn alua_groups(&self) -> impl Iterator<Item = u16> + '_ {
        self.alua.iter().map(|(g, _)| *g)
    }

    pub fn lun_index(&self, lun: u16) -> Option<usize> {
        self.luns.iter().position(|l| l.number() == lun)
    }

    /// Enters a new normal session of `initiator` + `isid` on portal group
    /// `tpgt` (its I_T nexus). A session of the same nexus that is still
    /// there is ended: a login with a known ISID and TSIH 0 reinstates the
    /// session (RFC 7143 §6.3.5), and the old connections must not run
    /// another command. Returns the flag that tells the new session's
    /// connection the same, later, and how many sessions it ended.
    pub(crate) fn enter_session(
        &self,
        initiator: &str,
        isid: [u8; 6],
        tpgt: u16,
        session: Arc<session::Session>,
    ) -> (Arc<std::sync::atomic::AtomicBool>, usize) {
        let tsih = session.tsih;
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let Ok(mut table) = self.sessions.lock() else {
            return (ended, 0);
        };
        let before = table.len();
        table.retain(|e| {
            let same = e.initiator == initiator && e.isid == isid && e.tpgt == tpgt;
            if same {
                log::debug!(
                    "session TSIH {} of {initiator} reinstated by TSIH {tsih}",
                    e.tsih
                );
                e.ended.store(true, Ordering::Release);
            }
            !same
        });
        let reinstated = before - table.len();
        table.push(SessionEntry {
            initiator: initiator.to_string(),
            isid,
            tpgt,
            tsih,
            ended: ended.clone(),
            session,
        });
        (ended, reinstated)
    }

    /// The session a login with a TSIH wants to add a connection to (RFC
    /// 7143 §6.3.3): the same initiator, ISID, portal group and TSIH.
    pub(crate) fn find_session(
        &self,
        initiator: &str,
        isid: [u8; 6],
        tpgt: u16,
        tsih: u16,
        cid: u16,
    ) -> Result<(Arc<session::Session>, Arc<std::sync::atomic::AtomicBool>), JoinRefusal> {
        let table = self.sessions.lock().map_err(|_| JoinRefusal::NoSession)?;
        let e = table
            .iter()
            .find(|e| {
                e.initiator == initiator && e.isid == isid && e.tpgt == tpgt && e.tsih == tsih
            })
            .filter(|e| !e.ended.load(Ordering::Acquire))
            .ok_or(JoinRefusal::NoSession)?;
        if !e.session.has_room_for(cid) {
            return Err(JoinRefusal::TooManyConnections);
        }
        Ok((e.session.clone(), e.ended.clone()))
    }
    /// The session behind `ended` is gone (its connection closed).
    pub(crate) fn leave_session(&self, ended: &Arc<std::sync::atomic::AtomicBool>) {
        if let Ok(mut table) = self.sessions.lock() {
            table.retain(|e| !Arc::ptr_eq(&e.ended, ended));
        }
    }

    /// Normal sessions in the table now.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().map_or(0, |t| t.len())
    }

    /// The CIDs of the connections of the session with this TSIH (MC/S),
    /// or None when there is no such session.
    pub fn session_cids(&self, tsih: u16) -> Option<Vec<u16>> {
        let table = self.sessions.lock().ok()?;
        table
            .iter()
            .find(|e| e.tsih == tsih && !e.ended.load(Ordering::Acquire))
            .map(|e| e.session.cids())
    }

    /// A fresh non-zero TSIH.
    fn allocate_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }
}

/// Shared state behind an `Arc`, as connections hold it.
pub type SharedTarget = Arc<TargetShared>;

/// FNV-1a: a stable hash for identifiers derived from the IQN (serial
/// numbers, NAA designators) so they survive restarts.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod exposure_tests {
    use super::*;

    #[test]
    fn no_chap_beyond_loopback_is_refused_unless_no_auth() {
        let iqn = "iqn.2026-11.org.iscsi-bypass:exposure";
        let local = TargetConfig::new(iqn)
            .portal("127.0.0.1:3260".parse().unwrap())
            .portal("[::1]:3260".parse().unwrap());
        assert!(local.check_exposure(false).is_ok());
        let open = local.clone().portal("0.0.0.0:3260".parse().unwrap());
        let e = open.check_exposure(false).unwrap_err().to_string();
        assert!(
            e.contains("0.0.0.0:3260") && e.contains("not a loopback address"),
            "{e}"
        );
        assert!(e.contains("--chap-user") && e.contains("--no-auth"), "{e}");
        assert!(open.check_exposure(true).is_ok());
        assert!(open
            .chap("user", b"secret-of-12+".to_vec())
            .check_exposure(false)
            .is_ok());
    }
}
