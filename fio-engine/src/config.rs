//! The engine options (fio's `iscsi_*` options) turned into library
//! [`Options`], checked once in fio's `setup` so a bad option fails the job
//! before any login.

use iscsi_bypass::iscsi::url::IscsiUrl;
use iscsi_bypass::{Chap, IdleMode, Options, Policy};
use std::time::Duration;

/// The options as fio stored them (`None`: not given).
#[derive(Debug, Default, Clone)]
pub struct RawConfig {
    pub paths: Option<String>,
    pub transport: Option<String>,
    pub policy: Option<String>,
    pub initiator: Option<String>,
    pub chap_user: Option<String>,
    pub chap_secret_file: Option<String>,
    pub target_user: Option<String>,
    pub target_secret_file: Option<String>,
    pub cores: Option<String>,
    pub busy_poll: bool,
    /// Seconds; 0: the library default.
    pub no_path_timeout_s: u32,
    /// Seconds; 0: the library default.
    pub login_timeout_s: u32,
    /// fio's iodepth.
    pub queue_depth: u32,
    /// fio's nr_files.
    pub nr_files: u32,
}

/// A bad engine option, named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// The checked engine configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// URLs of the extra paths (`iscsi_paths`), added to the file's own URL.
    pub extra_paths: Vec<String>,
    /// Library options (transport, policy, CHAP, idle mode, depth).
    pub options: Options,
    /// The fio thread backs off (sleeps this long) after a run of empty
    /// polls; `None` with `iscsi_busy_poll` (spins).
    pub idle_sleep: Option<Duration>,
}

/// Where CHAP comes from: a user from `iscsi_chap_user` with the secret in
/// `iscsi_chap_secret_file`, or from the environment (`ISCSI_CHAP_USER`,
/// `ISCSI_CHAP_PASSWORD`, ...), never from fio's command line.
fn chap(
    raw: &RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Chap>, ConfigError> {
    let read = |what: &str, file: &str| -> Result<String, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| err(format!("{what} {file}: {e}")))?;
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if line.is_empty() {
            return Err(err(format!("{what} {file} is empty")));
        }
        Ok(line.to_string())
    };
    let env_first = |names: &[&str]| names.iter().find_map(|n| env(n).filter(|v| !v.is_empty()));
    let user = raw
        .chap_user
        .clone()
        .or_else(|| env_first(&["ISCSI_CHAP_USER", "LIBISCSI_CHAP_USERNAME"]));
    let Some(user) = user else {
        if raw.chap_secret_file.is_some() || raw.target_user.is_some() {
            return Err(err(
                "iscsi_chap_secret_file / iscsi_target_user given without a CHAP user \
                 (iscsi_chap_user or ISCSI_CHAP_USER)",
            ));
        }
        return Ok(None);
    };
    let secret = match &raw.chap_secret_file {
        Some(f) => read("iscsi_chap_secret_file", f)?,
        None => env_first(&["ISCSI_CHAP_PASSWORD", "LIBISCSI_CHAP_PASSWORD"]).ok_or_else(|| {
            err(format!(
                "CHAP user {user:?} but no secret: give iscsi_chap_secret_file=FILE or set ISCSI_CHAP_PASSWORD"
            ))
        })?,
    };
    let mut c = Chap::new(user, secret.into_bytes());
    let target_user = raw
        .target_user
        .clone()
        .or_else(|| env_first(&["ISCSI_CHAP_TARGET_USER", "LIBISCSI_CHAP_TARGET_USERNAME"]));
    if let Some(tu) = target_user {
        let ts = match &raw.target_secret_file {
            Some(f) => read("iscsi_target_secret_file", f)?,
            None => env_first(&[
                "ISCSI_CHAP_TARGET_PASSWORD",
                "LIBISCSI_CHAP_TARGET_PASSWORD",
            ])
            .ok_or_else(|| {
                err(format!(
                    "mutual CHAP user {tu:?} but no secret: give iscsi_target_secret_file=FILE \
                         or set ISCSI_CHAP_TARGET_PASSWORD"
                ))
            })?,
        };
        c = c.mutual(tu, ts.into_bytes());
    }
    Ok(Some(c))
}

/// Checks one URL: it parses, names a target, and carries no password
/// (fio prints file names in its output; secrets go in a file or the
/// environment).
pub fn check_url(url: &str) -> Result<(), ConfigError> {
    let u = IscsiUrl::parse(url).map_err(|e| err(format!("{url}: {e}")))?;
    u.require_target().map_err(|e| err(format!("{url}: {e}")))?;
    if u.password.is_some() || u.target_password.is_some() {
        return Err(err(
            "a CHAP secret in the URL would be printed by fio: use iscsi_chap_secret_file=FILE \
             or ISCSI_CHAP_PASSWORD instead",
        ));
    }
    Ok(())
}

impl EngineConfig {
    /// Checks and converts the options; `env` reads the environment.
    pub fn parse(
        raw: &RawConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<EngineConfig, ConfigError> {
        let mut options = Options::default();
        match raw.transport.as_deref().unwrap_or("kernel") {
            "kernel" => {}
            "dpdk" => return Err(err(
                "iscsi_transport=dpdk: the fio engine runs kernel TCP only (fio forks its jobs \
                     after sizing the files, and a DPDK port cannot be shared across that fork); \
                     use `iscsi-bypass bench --transport dpdk` for the userspace stack",
            )),
            other => return Err(err(format!("iscsi_transport={other:?}: expected kernel"))),
        }
        if let Some(p) = &raw.policy {
            options.policy = p
                .parse::<Policy>()
                .map_err(|e| err(format!("iscsi_policy: {e}")))?;
        }
        if let Some(i) = &raw.initiator {
            if !i.starts_with("iqn.") && !i.starts_with("eui.") && !i.starts_with("naa.") {
                return Err(err(format!(
                    "iscsi_initiator={i:?}: an iSCSI name starts with iqn., eui. or naa."
                )));
            }
            options.initiator = i.clone();
        }
        if let Some(c) = &raw.cores {
            options.cores = c
                .split(|ch: char| ch == ',' || ch.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<usize>()
                        .map_err(|_| err(format!("iscsi_cores: {s:?} is not a core number")))
                })
                .collect::<Result<_, _>>()?;
        }
        options.chap = chap(raw, env)?;
        options.queue_depth = raw.queue_depth.max(1) as usize;
        if raw.no_path_timeout_s > 0 {
            options.no_path_timeout = Duration::from_secs(raw.no_path_timeout_s.into());
        }
        if raw.login_timeout_s > 0 {
            options.login_timeout = Duration::from_secs(raw.login_timeout_s.into());
        }
        // As `iscsi-bypass bench` does: spin briefly, then block.
        let (idle, idle_sleep) = if raw.busy_poll {
            (IdleMode::BusyPoll, None)
        } else {
            (
                IdleMode::Block(Duration::from_micros(10)),
                Some(Duration::from_micros(20)),
            )
        };
        options.idle = idle;
        let extra_paths: Vec<String> = raw
            .paths
            .as_deref()
            .unwrap_or("")
            .split(|ch: char| ch == ',' || ch.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        for u in &extra_paths {
            check_url(u).map_err(|e| err(format!("iscsi_paths: {e}")))?;
        }
        if !extra_paths.is_empty() && raw.nr_files > 1 {
            return Err(err(format!(
                "iscsi_paths adds paths to one LU, but the job has {} files: give one filename",
                raw.nr_files
            )));
        }
        Ok(EngineConfig {
            extra_paths,
            options,
            idle_sleep,
        })
    }

    /// The paths of the LU at `url` (a fio file name): it, then the extra ones.
    pub fn urls_for(&self, url: &str) -> Result<Vec<String>, ConfigError> {
        check_url(url)?;
        let mut v = vec![url.to_string()];
        v.extend(
            self.extra_paths
                .iter()
                .filter(|u| u.as_str() != url)
                .cloned(),
        );
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const URL: &str = "iscsi://127.0.0.1:3260/iqn.2003-01.org.example:disk/0";

    #[test]
    fn defaults_are_kernel_queue_depth_block_idle() {
        let raw = RawConfig {
            queue_depth: 32,
            nr_files: 1,
            ..RawConfig::default()
        };
        let c = EngineConfig::parse(&raw, &no_env).unwrap();
        assert_eq!(c.options.queue_depth, 32);
        assert_eq!(c.options.policy, Policy::QueueDepth);
        assert!(matches!(c.options.idle, IdleMode::Block(_)));
        assert!(c.options.chap.is_none());
        assert_eq!(c.urls_for(URL).unwrap(), vec![URL.to_string()]);
    }

    #[test]
    fn extra_paths_policy_busy_poll_cores_timeouts() {
        let other = "iscsi://127.0.0.2:3260/iqn.2003-01.org.example:disk/0";
        let raw = RawConfig {
            paths: Some(format!("{other}, {URL}")),
            policy: Some("round-robin:4".into()),
            busy_poll: true,
            cores: Some("2,3".into()),
            no_path_timeout_s: 7,
            login_timeout_s: 3,
            queue_depth: 1,
            nr_files: 1,
            ..RawConfig::default()
        };
        let c = EngineConfig::parse(&raw, &no_env).unwrap();
        // The file's own URL first, a repeat of it dropped.
        assert_eq!(
            c.urls_for(URL).unwrap(),
            vec![URL.to_string(), other.to_string()]
        );
        assert_eq!(c.options.policy, Policy::RoundRobin { ios_per_path: 4 });
        assert!(matches!(c.options.idle, IdleMode::BusyPoll));
        assert!(c.idle_sleep.is_none());
        assert_eq!(c.options.cores, vec![2, 3]);
        assert_eq!(c.options.no_path_timeout, Duration::from_secs(7));
        assert_eq!(c.options.login_timeout, Duration::from_secs(3));
    }

    #[test]
    fn bad_options_are_named() {
        let cases: Vec<(RawConfig, &str)> = vec![
            (
                RawConfig {
                    transport: Some("rdma".into()),
                    ..RawConfig::default()
                },
                "iscsi_transport",
            ),
            (
                RawConfig {
                    transport: Some("dpdk".into()),
                    ..RawConfig::default()
                },
                "kernel TCP only",
            ),
            (
                RawConfig {
                    policy: Some("fastest".into()),
                    ..RawConfig::default()
                },
                "iscsi_policy",
            ),
            (
                RawConfig {
                    paths: Some("http://x/y".into()),
                    ..RawConfig::default()
                },
                "iscsi_paths",
            ),
            (
                RawConfig {
                    paths: Some(URL.into()),
                    nr_files: 2,
                    ..RawConfig::default()
                },
                "one filename",
            ),
            (
                RawConfig {
                    cores: Some("1,x".into()),
                    ..RawConfig::default()
                },
                "iscsi_cores",
            ),
            (
                RawConfig {
                    initiator: Some("host1".into()),
                    ..RawConfig::default()
                },
                "iscsi_initiator",
            ),
            (
                RawConfig {
                    chap_user: Some("u".into()),
                    ..RawConfig::default()
                },
                "no secret",
            ),
            (
                RawConfig {
                    chap_user: Some("u".into()),
                    chap_secret_file: Some("/nonexistent/secret".into()),
                    ..RawConfig::default()
                },
                "/nonexistent/secret",
            ),
            (
                RawConfig {
                    chap_secret_file: Some("/etc/hostname".into()),
                    ..RawConfig::default()
                },
                "without a CHAP user",
            ),
        ];
        for (raw, needle) in cases {
            let e = EngineConfig::parse(&raw, &no_env).unwrap_err();
            assert!(e.0.contains(needle), "{raw:?}: {e} lacks {needle:?}");
        }
    }

    #[test]
    fn urls_with_secrets_or_without_target_are_refused() {
        let c = EngineConfig::parse(&RawConfig::default(), &no_env).unwrap();
        let e = c
            .urls_for("iscsi://u%secret@127.0.0.1/iqn.2003-01.org.example:disk/0")
            .unwrap_err();
        assert!(e.0.contains("iscsi_chap_secret_file"), "{e}");
        assert!(!e.0.contains("secret@"), "the secret is not echoed: {e}");
        assert!(c.urls_for("iscsi://127.0.0.1").is_err());
        assert!(c.urls_for("/dev/sda").is_err());
    }

    #[test]
    fn chap_from_file_and_environment() {
        let dir = std::env::temp_dir().join(format!("fio-engine-chap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, "filesecret-12\nignored\n").unwrap();
        let raw = RawConfig {
            chap_user: Some("alice".into()),
            chap_secret_file: Some(f.display().to_string()),
            ..RawConfig::default()
        };
        let c = EngineConfig::parse(&raw, &no_env).unwrap();
        assert_eq!(
            c.options.chap,
            Some(Chap::new("alice", b"filesecret-12".to_vec()))
        );

        let env = |k: &str| match k {
            "ISCSI_CHAP_USER" => Some("bob".to_string()),
            "ISCSI_CHAP_PASSWORD" => Some("envsecret-123".to_string()),
            "ISCSI_CHAP_TARGET_USER" => Some("tgt".to_string()),
            "ISCSI_CHAP_TARGET_PASSWORD" => Some("tgtsecret-123".to_string()),
            _ => None,
        };
        let c = EngineConfig::parse(&RawConfig::default(), &env).unwrap();
        assert_eq!(
            c.options.chap,
            Some(
                Chap::new("bob", b"envsecret-123".to_vec())
                    .mutual("tgt", b"tgtsecret-123".to_vec())
            )
        );
        std::fs::write(&f, "\n").unwrap();
        let e = EngineConfig::parse(&raw, &no_env).unwrap_err();
        assert!(e.0.contains("is empty"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
