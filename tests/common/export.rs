//! The NBD tests' back end: the embedded target on loopback, a multipath
//! device with a path to each of its portals, and NBD exports of it.
//! Shared by tests/nbd.rs, tests/nbd_tls.rs and tests/nbd_hostile.rs
//! (`#[path = "common/export.rs"] mod export;`).
#![allow(dead_code)]

use iscsi_bypass::nbd::{ExportConfig, Listener, NbdServer, NbdServerHandle};
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle};
use iscsi_bypass::worker::{DeviceConfig, IdleMode, WorkerDevice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A started target and the device over all its portals (LUN 0).
pub struct Backend {
    pub target: TargetHandle,
    pub device: Arc<WorkerDevice>,
}

impl Backend {
    /// Starts `config`'s target and opens LUN 0 on every portal as
    /// `initiator`; the workers nap instead of busy-polling (the test
    /// machine's cores are shared).
    pub fn start(config: TargetConfig, initiator: &str) -> Backend {
        Backend::start_with(config, initiator, |_| {})
    }

    /// As [`Backend::start`], with `tune` applied to the device's
    /// configuration before it opens.
    pub fn start_with(
        config: TargetConfig,
        initiator: &str,
        tune: impl FnOnce(&mut DeviceConfig),
    ) -> Backend {
        let iqn = config.iqn.clone();
        let target = Target::start(config).expect("embedded target");
        let urls: Vec<String> = target
            .portals()
            .iter()
            .map(|p| format!("iscsi://{p}/{iqn}/0"))
            .collect();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let mut dc = DeviceConfig::from_urls(&urls, initiator, &[]).expect("device config");
        dc.idle = IdleMode::Sleep(Duration::from_micros(50));
        tune(&mut dc);
        let device = Arc::new(WorkerDevice::open(dc).expect("open the device"));
        Backend { target, device }
    }

    /// An export of the device on `listener`.
    pub fn serve(&self, config: ExportConfig, listener: Listener) -> NbdServerHandle {
        NbdServer::spawn(self.device.clone(), config, listener).expect("spawn the NBD export")
    }

    /// An export of the device on a free TCP port of 127.0.0.1: the
    /// server and the address clients connect to.
    pub fn serve_tcp(&self, config: ExportConfig) -> (NbdServerHandle, SocketAddr) {
        let l = Listener::tcp("127.0.0.1:0".parse().unwrap()).expect("NBD listener");
        let addr: SocketAddr = l
            .uri()
            .trim_start_matches("nbd://")
            .parse()
            .expect("nbd://ADDR");
        (self.serve(config, l), addr)
    }
}
