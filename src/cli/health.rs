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
    }
}
