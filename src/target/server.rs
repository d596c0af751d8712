//! The target's runtime over kernel TCP: a listener thread per portal and a
//! thread per connection with a blocking `TcpStream` (TCP_NODELAY), each
//! driving one [`TargetConn`].

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{
    AluaState, FaultInjector, Lun, SharedTarget, TargetConfig, TargetConn, TargetError,
    TargetShared,
};

/// How often idle threads look at the stop flag and timers.
const TICK: Duration = Duration::from_millis(50);
/// How often a listener polls for a new connection (accept is non-blocking
/// so that stopping never depends on waking a blocked accept).
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// Entry point: `Target::start(config)`.
pub struct Target;

impl Target {
    /// Binds every portal, then serves until the handle is stopped or dropped.
    pub fn start(config: TargetConfig) -> Result<TargetHandle, TargetError> {
        config.validate()?;
        let wanted: Vec<SocketAddr> = if config.portals.is_empty() {
            vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))]
        } else {
            config.portals.iter().map(|p| p.addr).collect()
        };
        let mut listeners = Vec::with_capacity(wanted.len());
        let mut bound = Vec::with_capacity(wanted.len());
        for addr in wanted {
            let bind_err = |source| TargetError::Bind { addr, source };
            let l = TcpListener::bind(addr).map_err(bind_err)?;
            l.set_nonblocking(true).map_err(bind_err)?;
            bound.push(l.local_addr().map_err(bind_err)?);
            listeners.push(l);
        }
        let shared = Arc::new(TargetShared::new(config, &bound)?);
        let runtime = Arc::new(Runtime::default());
        let mut handle = TargetHandle {
            shared: shared.clone(),
            runtime: runtime.clone(),
            listeners: Vec::new(),
        };
        for (portal, listener) in listeners.into_iter().enumerate() {
            let (shared, runtime) = (shared.clone(), runtime.clone());
            let t = thread::Builder::new()
                .name(format!("iscsi-tgt-l{portal}"))
                .spawn(move || listen(shared, runtime, portal, listener))
                .map_err(TargetError::Spawn)?;
            // On error, dropping `handle` stops the listeners started so far.
            handle.listeners.push(t);
        }
        log::info!(
            "iSCSI target {} listening on {:?}",
            shared.config.iqn,
            bound
        );
        Ok(handle)
    }
}

#[derive(Debug, Default)]
pub(super) struct Runtime {
    pub(super) stop: AtomicBool,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

/// A running target. Dropping it stops the target (joins every thread and
/// closes every socket), as does [`stop`](Self::stop).
#[derive(Debug)]
pub struct TargetHandle {
    shared: SharedTarget,
    runtime: Arc<Runtime>,
    listeners: Vec<JoinHandle<()>>,
}

impl TargetHandle {
    /// A handle over threads started by another runtime (the userspace
    /// stack's poll thread): stopping sets `runtime.stop` and joins them.
    pub(super) fn from_parts(
        shared: SharedTarget,
        runtime: Arc<Runtime>,
        threads: Vec<JoinHandle<()>>,
    ) -> TargetHandle {
        TargetHandle {
            shared,
            runtime,
            listeners: threads,
        }
    }

    /// The bound portal addresses, in configuration order (real ports).
    pub fn portals(&self) -> Vec<SocketAddr> {
        self.shared.portals.iter().map(|p| p.addr).collect()
    }

    pub fn iqn(&self) -> &str {
        &self.shared.config.iqn
    }

    /// Fault switches for all portals; `.portal(i)` scopes them to one.
    pub fn faults(&self) -> FaultInjector {
        self.shared.faults.clone()
    }

    /// The rules strict mode saw broken ([`TargetConfig::strict`]), oldest
    /// first; empty when it is off.
    pub fn violations(&self) -> Vec<super::strict::Violation> {
        self.shared.violations()
    }

    /// Changes the ALUA state reported for (and enforced on) a target port group.
    pub fn set_alua_state(&self, group: u16, state: AluaState) -> Result<(), TargetError> {
        self.shared.set_alua_state(group, state)
    }

    pub fn alua_state(&self, group: u16) -> Option<AluaState> {
        self.shared.alua_state(group)
    }

    /// The ALUA group of each portal, in the order of [`portals`](Self::portals).
    pub fn alua_groups(&self) -> Vec<u16> {
        self.shared.portals.iter().map(|p| p.alua_group).collect()
    }

    /// Normal sessions now.
    pub fn session_count(&self) -> usize {
        self.shared.session_count()
    }

    /// The CIDs of the connections of the session with this TSIH (MC/S).
    pub fn session_cids(&self, tsih: u16) -> Option<Vec<u16>> {
        self.shared.session_cids(tsih)
    }

    /// A LUN's store, e.g. to seed or check data in tests.
    pub fn lun(&self, lun: u16) -> Option<&Lun> {
        self.shared.lun_index(lun).map(|i| &self.shared.luns[i])
    }

    /// Stops the target: closes listeners and connections, joins threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.runtime.stop.store(true, Ordering::SeqCst);
        self.shared.faults.shutdown_all();
        for l in self.listeners.drain(..) {
            let _ = l.join();
        }
        // Listeners are gone, so no connection thread can be added now.
        let conns = std::mem::take(
            &mut *self
                .runtime
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for c in conns {
            let _ = c.join();
        }
    }
}

impl Drop for TargetHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn listen(shared: SharedTarget, runtime: Arc<Runtime>, portal: usize, listener: TcpListener) {
    while !runtime.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let (shared2, runtime2) = (shared.clone(), runtime.clone());
                let spawned = thread::Builder::new()
                    .name(format!("iscsi-tgt-c{portal}"))
                    .spawn(move || serve(shared2, runtime2, portal, stream, peer));
                let mut conns = runtime
                    .connections
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                // Reap finished connection threads so the list stays short.
                let (done, live): (Vec<_>, Vec<_>) = conns.drain(..).partition(|h| h.is_finished());
                *conns = live;
                match spawned {
                    Ok(h) => conns.push(h),
                    Err(e) => log::warn!("cannot start a connection thread: {e}"),
                }
                drop(conns);
                for h in done {
                    let _ = h.join();
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(e) => {
                log::warn!("accept on portal {portal}: {e}");
                thread::sleep(TICK);
            }
        }
    }
}

fn serve(
    shared: SharedTarget,
    runtime: Arc<Runtime>,
    portal: usize,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let faults = shared.faults.clone();
    let Some(id) = faults.register(portal, &stream) else {
        return;
    };
    // Registered before this check, so a concurrent stop either sees us or
    // we see its flag.
    if !runtime.stop.load(Ordering::SeqCst) {
        let reason = drive(&shared, &runtime, portal, &mut stream);
        log::debug!("connection from {peer} on portal {portal} ended: {reason}");
    }
    let _ = stream.shutdown(Shutdown::Both);
    faults.unregister(id);
}

/// Moves bytes between the socket and the state machine; returns why it ended.
fn drive(
    shared: &SharedTarget,
    runtime: &Runtime,
    portal: usize,
    stream: &mut TcpStream,
) -> String {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_nodelay(true));
    if let Err(e) = setup {
        return format!("socket setup: {e}");
    }
    let mut conn = TargetConn::new(shared.clone(), portal, Instant::now());
    if let Ok(local) = stream.local_addr() {
        conn.set_local_addr(local);
    }
    let faults = &shared.faults;
    let mut discard = [0u8; 4096];
    let mut timeout = TICK;
    // One syscall per change, not per read.
    let mut timeout_set = None;
    loop {
        if runtime.stop.load(Ordering::Relaxed) {
            return "target stopped".into();
        }
        if timeout_set != Some(timeout) {
            if stream.set_read_timeout(Some(timeout)).is_err() {
                return "cannot set a read timeout".into();
            }
            timeout_set = Some(timeout);
        }
        // A stalled portal reads and forgets: the initiator sees a hang.
        let stalled = faults.is_stalled(portal);
        let buf: &mut [u8] = if stalled {
            &mut discard
        } else {
            conn.recv_buffer()
        };
        match stream.read(buf) {
            Ok(0) => return "closed by the initiator".into(),
            Ok(n) if !stalled => conn.received(n, Instant::now()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                conn.handle_timeout(Instant::now())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return format!("read: {e}"),
        }
        if !conn.output().is_empty() && !faults.is_stalled(portal) {
            let delay = faults.response_delay(portal);
            if !delay.is_zero() {
                thread::sleep(delay);
            }
            if let Err(e) = stream.write_all(conn.output()) {
                return format!("write: {e}");
            }
        }
        conn.clear_output();
        if conn.is_closed() {
            return conn.close_reason().unwrap_or("closed").to_string();
        }
        timeout = conn
            .poll_timeout()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(TICK)
            .clamp(Duration::from_micros(100), TICK);
    }
}
