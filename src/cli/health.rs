//! Path health flags shared by `bench` and `export-nbd`: multipath-tools'
//! `no_path_retry`, `failback` and `san_path_err_*` (docs/multipath.md,
//! "Path health").

use clap::Args;
use iscsi_bypass::multipath::health::NO_PATH_CHECK_INTERVAL;
use iscsi_bypass::multipath::{DeviceConfig, Failback, FlapDamping, NoPathRetry};

/// Path health flags.
#[derive(Args, Debug, Clone, Default)]
pub struct PathHealthArgs {
    /// What I/O does with no usable path (no_path_retry): fail at once,
    /// queue until a path returns, or N checks 5 s apart. Replaces
    /// --no-path-timeout where both apply.
    #[arg(long, value_name = "fail|queue|N")]
    pub no_path_retry: Option<NoPathRetry>,
    /// Under --policy failover, when to return to the first path once it is
    /// back: immediate, manual (default: never by itself) or after SECONDS.
    #[arg(long, value_name = "immediate|manual|SECONDS")]
    pub failback: Option<Failback>,
    /// Hold a flapping path down: THRESHOLD failures within WINDOW seconds
    /// keep it out for HOLD seconds (san_path_err_threshold, _forget_rate,
    /// _recovery_time), e.g. 3:60:120. Off by default.
    #[arg(long, value_name = "N:WINDOW:HOLD")]
    pub flap_damping: Option<FlapDamping>,
    /// ABORT TASK of a command unanswered this long on a live path (the
    /// first fence step; 0 turns it off). Default 10 s.
    #[arg(long, value_name = "SECONDS")]
    pub abort_after: Option<f64>,
    /// The reservation fence step: path i registers key KEY+i at login
    /// under a Write Exclusive - Registrants Only reservation, and a failed
    /// path whose portal group has no live path left is fenced by PREEMPT
    /// AND ABORT of its key. Other hosts sharing the LU must register to
    /// write. Off by default. KEY in decimal or 0x hex.
    #[arg(long, value_name = "KEY", value_parser = parse_key)]
    pub fence_reservation_key: Option<u64>,
    /// The last fence step: LOGICAL UNIT RESET through a live path for a
    /// failed session no other step fenced within SECONDS. Aborts every
    /// initiator's tasks on the LU. Off by default.
    #[arg(long, value_name = "SECONDS")]
    pub fence_lun_reset: Option<f64>,
    /// MC/S: the URLs (or discovered portals) become connections of one
    /// session (MaxConnections = the number of paths) instead of sessions
    /// of their own (MPIO). Fails when the target grants fewer.
    #[arg(long)]
    pub mcs: bool,
}

fn parse_key(s: &str) -> Result<u64, std::num::ParseIntError> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
}

fn seconds(s: f64) -> Option<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
}

impl PathHealthArgs {
    /// Puts the flags given into `c`.
    pub fn apply(&self, c: &mut DeviceConfig) {
        if let Some(r) = self.no_path_retry {
            c.set_no_path_retry(r, NO_PATH_CHECK_INTERVAL);
        }
        if let Some(f) = self.failback {
            c.failback = f;
        }
        if self.flap_damping.is_some() {
            c.flap_damping = self.flap_damping;
        }
        if let Some(s) = self.abort_after {
            c.abort_overdue = seconds(s).map(|after| iscsi_bypass::multipath::AbortPolicy {
                after,
                ..Default::default()
            });
        }
        if let Some(base_key) = self.fence_reservation_key {
            c.reservation_fence = Some(iscsi_bypass::multipath::ReservationFence { base_key });
        }
        if let Some(s) = self.fence_lun_reset {
            c.lun_reset_fence = seconds(s);
        }
        c.mcs |= self.mcs;
    }
}
