//! Logging a path in and finding out what is behind it: which logical unit
//! (VPD 83h designator), through which target port group, in which ALUA
//! state, and the capacity. Runs off the I/O path (at open and on reconnect).

use super::config::{BoxedTransport, PathConnector};
use super::io::LuCaps;
use super::MultipathError;
use crate::iscsi::connection::{Command, ConnTimers, Direction};
use crate::iscsi::login::LoginConfig;
use crate::iscsi::session::{IdlePolicy, Session, SessionConfig};
use crate::scsi::{
    check_status, AluaState, ErrorClass, ScsiCommand, ScsiError, TargetPortGroupsData,
};
use crate::scsi::{SupportedCommands, TransferLimits};
use crate::wire::scsi::{
    BlockLimits, DataRepr, DeviceIdentification, InquiryData, OpcodeRequest, ReadCapacity16Data,
    SupportedOpcodes, Tpgs,
};
use std::time::Duration;

/// A logged-in path and what it reported.
pub struct PathProbe {
    /// The logged-in session, handed on to the path's worker.
    pub session: Session<BoxedTransport>,
    /// The LU's identity, e.g. `naa.60000...` (VPD 83h).
    pub lu_id: String,
    /// Target port group of the port this path reaches (VPD 83h), if reported.
    pub target_port_group: Option<u16>,
    /// Relative target port identifier of that port (VPD 83h), if reported.
    pub relative_port: Option<u16>,
    /// None: the target does not do ALUA (or REPORT TARGET PORT GROUPS failed).
    pub alua: Option<AluaState>,
    /// The LU's size in logical blocks (READ CAPACITY(16)).
    pub capacity_blocks: u64,
    /// Logical block size in bytes (READ CAPACITY(16)).
    pub block_size: u32,
    /// Negotiated DefaultTime2Wait.
    pub time2wait: Duration,
    /// Where the login landed when the target redirected it, with the
    /// hops (`127.0.0.1:3261 (after 127.0.0.1:3260 redirected temporarily
    /// to 127.0.0.1:3261)`); None when it was not redirected.
    pub redirected_to: Option<String>,
    /// ALUA support from standard INQUIRY (TPGS).
    pub tpgs: Tpgs,
    /// Supported-states byte of this path's target port group (REPORT
    /// TARGET PORT GROUPS), if reported.
    pub group_supported: Option<u8>,
    /// REPORT SUPPORTED OPERATION CODES and Block Limits.
    pub caps: LuCaps,
}

impl std::fmt::Debug for PathProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathProbe")
            .field("lu_id", &self.lu_id)
            .field("tpg", &self.target_port_group)
            .field("alua", &self.alua)
            .field("capacity_blocks", &self.capacity_blocks)
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

/// What `probe` needs besides the connector.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// The path's name, used in errors.
    pub name: String,
    /// Login parameters for the path's session.
    pub login: LoginConfig,
    /// The LUN in its 8-byte wire encoding (`Lun::to_u64`), not the plain
    /// LU number.
    pub lun: u64,
    /// NOP-Out and command timers of the session.
    pub timers: ConnTimers,
    /// Time allowed for connect + login.
    pub login_timeout: Duration,
    /// The reservation fence's key of this path
    /// (`multipath::fence::ReservationFence`): registered at every login,
    /// before the path carries I/O, and the LU reserved Write Exclusive –
    /// Registrants Only under it if nobody holds a reservation.
    pub pr_key: Option<u64>,
    /// With `pr_key`: the device's fence board, so that a login does not
    /// register while a PREEMPT AND ABORT of this path's key is in flight
    /// (see [`PreemptGate`]). None: register at once.
    pub preempt_gate: Option<PreemptGate>,
}

/// Keeps a path's login from registering its reservation key while a
/// PREEMPT AND ABORT of that key (fencing the path's failed session) is in
/// flight: the target would run the preempt after the registration and
/// remove it, and the path would get RESERVATION CONFLICT until its next
/// login. The login waits for the preempt's answer (up to its
/// `login_timeout`) and, through [`FenceBoard::hold_preempts`], keeps new
/// preempts of its key from being claimed until the worker takes the
/// session ([`FenceBoard::release_preempts`]).
///
/// [`FenceBoard::hold_preempts`]: super::fence::FenceBoard::hold_preempts
/// [`FenceBoard::release_preempts`]: super::fence::FenceBoard::release_preempts
#[derive(Debug, Clone)]
pub struct PreemptGate {
    /// The device's fence board.
    pub board: std::sync::Arc<super::fence::FenceBoard>,
    /// This path's index.
    pub path: usize,
}

impl PreemptGate {
    /// Returns once no preempt of this path's key is in flight (and none
    /// will be claimed); `Err(waited)` if one still is after `within`.
    pub fn wait_clear(&self, within: Duration) -> Result<(), Duration> {
        let t0 = std::time::Instant::now();
        while self.board.hold_preempts(self.path) {
            if t0.elapsed() >= within {
                return Err(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The fence login of `multipath::fence`: connects through `connector` (a
/// live path's, to its own portal) and logs in with the failed path's login
/// (its ISID, TSIH 0). Returns the session once the target has answered
/// with the failed session's portal group: by then the target has ended
/// that session (RFC 7143 §6.3.5). The caller logs it out.
pub fn fence_login(
    connector: &mut PathConnector,
    need: &super::fence::FenceNeed,
    timers: ConnTimers,
    login_timeout: Duration,
) -> Result<Session<BoxedTransport>, super::fence::FenceError> {
    use super::fence::FenceError;
    let mut login = need.login.clone();
    login.tsih = 0;
    let mut sc = SessionConfig::new(login);
    sc.timers = timers;
    sc.login_timeout = login_timeout;
    sc.idle = IdlePolicy::Wait(Duration::from_millis(1));
    let session = match connector {
        PathConnector::Fixed(connect) => {
            let transport = connect().map_err(|e| FenceError::Connect(e.to_string()))?;
            Session::login(BoxedTransport(transport), &sc)
                .map_err(|e| FenceError::Login(e.to_string()))?
        }
        // The live path's portal, redirects followed as its own logins do.
        PathConnector::Portal { portal, connect } => {
            portal
                .login(|addr| connect(addr).map(BoxedTransport), &sc)
                .map_err(|e| FenceError::Login(e.to_string()))?
                .0
        }
    };
    let got = session.connection().params().target_portal_group_tag;
    if got != Some(need.tpgt) {
        // A session of its own in another group: it ended nothing.
        let _ = session.logout(Duration::from_millis(500));
        return Err(FenceError::OtherPortalGroup {
            want: need.tpgt,
            got,
        });
    }
    Ok(session)
}

/// Connects, logs in and inspects the LU.
pub fn probe(
    connector: &mut PathConnector,
    cfg: &ProbeConfig,
) -> Result<PathProbe, MultipathError> {
    let login_err = |e: String| MultipathError::Login {
        path: cfg.name.clone(),
        reason: e,
    };
    let mut sc = SessionConfig::new(cfg.login.clone());
    sc.timers = cfg.timers;
    sc.login_timeout = cfg.login_timeout;
    sc.idle = IdlePolicy::Wait(Duration::from_millis(1));
    let (session, redirected_to) = match connector {
        PathConnector::Fixed(connect) => {
            let transport = connect().map_err(|e| login_err(e.to_string()))?;
            let s = Session::login(BoxedTransport(transport), &sc)
                .map_err(|e| login_err(e.to_string()))?;
            (s, None)
        }
        PathConnector::Portal { portal, connect } => {
            // Errors name every hop ("login at B (after A redirected
            // temporarily to B): ...").
            let (s, at) = portal
                .login(|addr| connect(addr).map(BoxedTransport), &sc)
                .map_err(|e| login_err(e.to_string()))?;
            let hops = portal.last_hops();
            let landed = (!hops.is_empty()).then(|| {
                let list: Vec<String> = hops.iter().map(ToString::to_string).collect();
                format!("{at} (after {})", list.join(", then "))
            });
            (s, landed)
        }
    };
    inspect(session, redirected_to, cfg)
}

/// What [`probe`] does after the login: inspects the LU through the
/// logged-in `session` (also a connection that joined an MC/S session).
pub fn inspect(
    mut session: Session<BoxedTransport>,
    redirected_to: Option<String>,
    cfg: &ProbeConfig,
) -> Result<PathProbe, MultipathError> {
    let time2wait = Duration::from_secs(u64::from(session.connection().params().default_time2wait));
    let scsi_err = |what: &'static str| {
        let name = cfg.name.clone();
        move |e: ProbeExecError| match e {
            ProbeExecError::Scsi(error) => MultipathError::Scsi {
                path: name.clone(),
                what,
                error,
            },
            e @ (ProbeExecError::Command(_) | ProbeExecError::Session(_)) => {
                MultipathError::Login {
                    path: name.clone(),
                    reason: e.to_string(),
                }
            }
        }
    };
    // The first command after login usually meets a power-on UNIT
    // ATTENTION; `execute` retries those.
    execute(&mut session, cfg.lun, ScsiCommand::test_unit_ready())
        .map_err(scsi_err("TEST UNIT READY"))?;
    let cap = execute(&mut session, cfg.lun, ScsiCommand::read_capacity16())
        .map_err(scsi_err("READ CAPACITY(16)"))?;
    let cap = ReadCapacity16Data::parse(&cap).map_err(|e| MultipathError::Scsi {
        path: cfg.name.clone(),
        what: "READ CAPACITY(16)",
        error: ScsiError::BadData(e),
    })?;
    let vpd = execute(&mut session, cfg.lun, ScsiCommand::device_identification())
        .map_err(scsi_err("INQUIRY VPD 83h"))?;
    let id = DeviceIdentification::parse(&vpd).map_err(|e| MultipathError::Scsi {
        path: cfg.name.clone(),
        what: "INQUIRY VPD 83h",
        error: ScsiError::BadData(e),
    })?;
    let lu_id =
        id.lu_designator()
            .map(|d| d.to_string())
            .ok_or_else(|| MultipathError::NoLuIdentity {
                path: cfg.name.clone(),
            })?;
    let tpg = id.target_port_group();
    let rel = id.relative_target_port();
    // Targets without ALUA answer ILLEGAL REQUEST: then every path is equal.
    let groups = execute(
        &mut session,
        cfg.lun,
        ScsiCommand::report_target_port_groups(1024),
    )
    .ok()
    .and_then(|d| TargetPortGroupsData::parse(&d).ok());
    let alua = groups.as_ref().and_then(|d| alua_state_of(d, tpg, rel));
    let group_supported = groups
        .as_ref()
        .and_then(|d| group_of(d, tpg, rel))
        .map(|g| g.supported);
    // TPGS: whether the LU does implicit or explicit ALUA (or none).
    let tpgs = execute(&mut session, cfg.lun, ScsiCommand::inquiry())
        .ok()
        .and_then(|d| InquiryData::parse(&d).ok())
        .map_or(Tpgs::None, |i| i.tpgs);
    // What the LU supports, and its limits: a target without these
    // answers ILLEGAL REQUEST, and then everything is tried, unsplit.
    let commands = execute(
        &mut session,
        cfg.lun,
        ScsiCommand::report_supported_opcodes(OpcodeRequest::All, 8192),
    )
    .ok()
    .and_then(|d| SupportedOpcodes::parse(&d).ok());
    let limits = execute(&mut session, cfg.lun, ScsiCommand::block_limits())
        .ok()
        .and_then(|d| BlockLimits::parse(&d).ok())
        .map_or(TransferLimits::default(), |b| TransferLimits::from(&b));
    if let Some(key) = cfg.pr_key {
        if let Some(gate) = &cfg.preempt_gate {
            gate.wait_clear(cfg.login_timeout).map_err(|waited| {
                MultipathError::Login {
                    path: cfg.name.clone(),
                    reason: format!(
                        "a PREEMPT AND ABORT of this path's key {key:#x} (fencing its failed session) is still unanswered after {waited:?}; registering before its answer would be undone by it"
                    ),
                }
            })?;
        }
        register_fence_key(&mut session, cfg.lun, key, &cfg.name, &scsi_err)?;
    }
    Ok(PathProbe {
        session,
        lu_id,
        target_port_group: tpg,
        relative_port: rel,
        alua,
        capacity_blocks: cap.block_count(),
        block_size: cap.block_len,
        time2wait,
        redirected_to,
        tpgs,
        group_supported,
        caps: LuCaps {
            commands: SupportedCommands(commands),
            limits,
        },
    })
}

/// The descriptor of the group this path's port belongs to.
pub fn group_of(
    data: &TargetPortGroupsData,
    tpg: Option<u16>,
    relative_port: Option<u16>,
) -> Option<&crate::wire::scsi::TargetPortGroup> {
    tpg.and_then(|g| data.group(g))
        .or_else(|| relative_port.and_then(|p| data.group_of_port(p)))
}

/// The access state of the group this path's port belongs to.
pub fn alua_state_of(
    data: &TargetPortGroupsData,
    tpg: Option<u16>,
    relative_port: Option<u16>,
) -> Option<AluaState> {
    group_of(data, tpg, relative_port).map(|g| g.state)
}

/// Why a probe command failed.
#[derive(Debug, thiserror::Error)]
enum ProbeExecError {
    /// The target answered with an error status, or never with success.
    #[error(transparent)]
    Scsi(ScsiError),
    /// The command could not be built (e.g. a CDB too long).
    #[error("building the command: {0}")]
    Command(#[source] crate::iscsi::connection::SubmitError),
    /// The session failed while the command ran.
    #[error(transparent)]
    Session(#[from] crate::iscsi::session::SessionError),
}

/// The reservation fence at login: REGISTER AND IGNORE EXISTING KEY with
/// this path's `key` (its I_T nexus may have lost its key to a PREEMPT AND
/// ABORT), then, if the LU has no reservation, RESERVE Write Exclusive –
/// Registrants Only with it: every registered path may write, and one
/// path's key can be preempted (with its tasks aborted) through another.
fn register_fence_key<F>(
    session: &mut Session<BoxedTransport>,
    lun: u64,
    key: u64,
    name: &str,
    scsi_err: &impl Fn(&'static str) -> F,
) -> Result<(), MultipathError>
where
    F: FnMut(ProbeExecError) -> MultipathError,
{
    use crate::wire::scsi::pr::{PrInAction, PrOutAction, PrOutParams, PrReservation, PrType};
    let (cmd, data) = ScsiCommand::persistent_reserve_out(
        PrOutAction::RegisterAndIgnoreExistingKey,
        None,
        &PrOutParams {
            sa_key: key,
            ..PrOutParams::default()
        },
    );
    execute_data(session, lun, cmd, Some(data)).map_err(scsi_err(
        "PERSISTENT RESERVE OUT (REGISTER AND IGNORE EXISTING KEY)",
    ))?;
    let held = execute(
        session,
        lun,
        ScsiCommand::persistent_reserve_in(PrInAction::ReadReservation, 64),
    )
    .map_err(scsi_err("PERSISTENT RESERVE IN (READ RESERVATION)"))?;
    let held = PrReservation::parse(&held).map_err(|e| MultipathError::Scsi {
        path: name.to_string(),
        what: "PERSISTENT RESERVE IN (READ RESERVATION)",
        error: ScsiError::BadData(e),
    })?;
    if held.reservation.is_none() {
        let (cmd, data) = ScsiCommand::persistent_reserve_out(
            PrOutAction::Reserve,
            Some(PrType::WriteExclusiveRegistrantsOnly),
            &PrOutParams {
                key,
                ..PrOutParams::default()
            },
        );
        // Another path may have reserved meanwhile: RESERVATION CONFLICT
        // then is fine, if the LU is reserved now.
        if let Err(e) = execute_data(session, lun, cmd, Some(data)) {
            let again = execute(
                session,
                lun,
                ScsiCommand::persistent_reserve_in(PrInAction::ReadReservation, 64),
            )
            .ok()
            .and_then(|d| PrReservation::parse(&d).ok());
            if again.and_then(|r| r.reservation).is_none() {
                return Err(scsi_err("PERSISTENT RESERVE OUT (RESERVE)")(e));
            }
        }
    }
    Ok(())
}

/// Runs one command, retrying retryable SCSI errors a few times.
fn execute(
    session: &mut Session<BoxedTransport>,
    lun: u64,
    cmd: ScsiCommand,
) -> Result<Vec<u8>, ProbeExecError> {
    execute_data(session, lun, cmd, None)
}

/// `execute` with the data-out to send (None: zeros).
fn execute_data(
    session: &mut Session<BoxedTransport>,
    lun: u64,
    cmd: ScsiCommand,
    data: Option<Vec<u8>>,
) -> Result<Vec<u8>, ProbeExecError> {
    let (direction, len) = match cmd.direction {
        crate::scsi::DataDirection::None => (Direction::None, 0),
        crate::scsi::DataDirection::Read(n) => (Direction::Read, n as usize),
        crate::scsi::DataDirection::Write(n) => (Direction::Write, n as usize),
    };
    let mut last = None;
    for attempt in 0..6u32 {
        let buffer = data.clone().unwrap_or_else(|| vec![0; len]);
        let c = Command::new(lun, cmd.cdb_bytes(), direction, buffer)
            .map_err(ProbeExecError::Command)?;
        let done = session.execute(c, PROBE_TIMEOUT)?;
        match check_status(done.status, &done.sense) {
            Ok(()) => {
                let mut data = done.buffer;
                data.truncate(done.transferred);
                return Ok(data);
            }
            Err(e) if e.class() == ErrorClass::Fatal => return Err(ProbeExecError::Scsi(e)),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(10 << attempt.min(5)));
            }
        }
    }
    Err(ProbeExecError::Scsi(last.unwrap_or(ScsiError::Busy)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::scsi::TargetPortGroup;

    fn group(id: u16, state: AluaState, ports: Vec<u16>) -> TargetPortGroup {
        TargetPortGroup {
            pref: false,
            state,
            supported: TargetPortGroup::ALL_STATES,
            id,
            status_code: 0,
            vendor_specific: 0,
            ports,
        }
    }

    #[test]
    fn alua_state_by_group_or_port() {
        let d = TargetPortGroupsData {
            implicit_transition_time: None,
            groups: vec![
                group(1, AluaState::ActiveOptimized, vec![1]),
                group(2, AluaState::ActiveNonOptimized, vec![2, 3]),
            ],
        };
        assert_eq!(
            alua_state_of(&d, Some(2), None),
            Some(AluaState::ActiveNonOptimized)
        );
        assert_eq!(
            alua_state_of(&d, None, Some(1)),
            Some(AluaState::ActiveOptimized)
        );
        assert_eq!(
            alua_state_of(&d, Some(9), Some(3)),
            Some(AluaState::ActiveNonOptimized)
        );
        assert_eq!(alua_state_of(&d, None, None), None);
    }
}
