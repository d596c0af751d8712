//! Discovery sessions: `SendTargets=All` (RFC 7143 §13.3, Appendix C),
//! through a portal whose logins may be redirected ([`send_targets_at`]).

use super::login::{LoginConfig, SessionType};
use super::redirect::{LoginPortal, RedirectError};
use super::session::{Session, SessionConfig, SessionError};
use crate::transport::{Transport, TransportError};
use crate::wire::text::TextPairs;
use std::net::SocketAddr;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Portal {
    /// Address as the target wrote it (IPv4, name, or IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub tpgt: Option<u16>,
}

impl Portal {
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiscoveredTarget {
    pub name: String,
    pub portals: Vec<Portal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DiscoveryError {
    #[error("SendTargets answer has a TargetAddress before any TargetName")]
    AddressWithoutTarget,
    #[error("SendTargets answer has a malformed TargetAddress {0:?}")]
    BadAddress(String),
}

/// Parses a SendTargets answer. A target without TargetAddress is reachable
/// through the portal the discovery session used (`default_portal`).
pub fn parse_send_targets(
    pairs: &TextPairs,
    default_portal: &Portal,
) -> Result<Vec<DiscoveredTarget>, DiscoveryError> {
    let mut targets: Vec<DiscoveredTarget> = Vec::new();
    for (k, v) in pairs.iter() {
        match k {
            "TargetName" => targets.push(DiscoveredTarget {
                name: v.to_string(),
                portals: Vec::new(),
            }),
            "TargetAddress" => {
                let t = targets
                    .last_mut()
                    .ok_or(DiscoveryError::AddressWithoutTarget)?;
                t.portals.push(parse_address(v, default_portal.port)?);
            }
            _ => {}
        }
    }
    for t in &mut targets {
        if t.portals.is_empty() {
            t.portals.push(default_portal.clone());
        }
    }
    Ok(targets)
}

/// `host[:port][,tpgt]`, host may be `[IPv6]`.
fn parse_address(v: &str, default_port: u16) -> Result<Portal, DiscoveryError> {
    let bad = || DiscoveryError::BadAddress(v.chars().take(80).collect());
    let (hp, tpgt) = match v.rsplit_once(',') {
        Some((hp, t)) => (hp, Some(t.parse::<u16>().map_err(|_| bad())?)),
        None => (v, None),
    };
    let (host, port) = if let Some(rest) = hp.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => default_port,
        };
        (h.to_string(), port)
    } else {
        match hp.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
            None => (hp.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Portal { host, port, tpgt })
}

/// Why a discovery through a portal failed.
#[derive(Debug, Error)]
pub enum SendTargetsError {
    /// The discovery login, with the redirects it followed.
    #[error(transparent)]
    Login(#[from] RedirectError),
    /// The SendTargets exchange at the portal the login landed on.
    #[error("SendTargets at {at}: {source}")]
    Exchange {
        at: SocketAddr,
        #[source]
        source: SessionError,
    },
}

/// Logs in a discovery session over `transport`, asks `SendTargets=All`,
/// logs out. A login redirect ends it with `LoginError::Redirected`; use
/// [`send_targets_at`] to follow redirects.
pub fn send_targets<T: Transport>(
    transport: T,
    login: LoginConfig,
    timeout: Duration,
) -> Result<Vec<DiscoveredTarget>, SessionError> {
    let peer = transport.peer_addr();
    let session = Session::login(transport, &discovery_config(login, timeout))?;
    ask_send_targets(session, peer, timeout)
}

/// [`send_targets`] at `portal`, following login redirects as a normal
/// session's login does ([`LoginPortal::login`]: at most its bounded
/// number of hops, each named in errors; a permanent redirect moves
/// `portal`'s home). `connect` opens a transport to each address tried.
/// Targets the answer lists without a TargetAddress are reachable at the
/// portal the session landed on.
pub fn send_targets_at<T: Transport>(
    portal: &mut LoginPortal,
    connect: impl FnMut(SocketAddr) -> Result<T, TransportError>,
    login: LoginConfig,
    timeout: Duration,
) -> Result<Vec<DiscoveredTarget>, SendTargetsError> {
    let config = discovery_config(login, timeout);
    let (session, at) = portal.login(connect, &config)?;
    ask_send_targets(session, Some(at), timeout)
        .map_err(|source| SendTargetsError::Exchange { at, source })
}

/// A discovery session's configuration: no target name.
fn discovery_config(mut login: LoginConfig, timeout: Duration) -> SessionConfig {
    login.session_type = SessionType::Discovery;
    login.target_name = None;
    let mut config = SessionConfig::new(login);
    config.login_timeout = timeout;
    config
}

/// `SendTargets=All` on a logged-in discovery session, then logout;
/// `peer` is the portal it is logged in at.
fn ask_send_targets<T: Transport>(
    mut session: Session<T>,
    peer: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Vec<DiscoveredTarget>, SessionError> {
    let mut req = TextPairs::new();
    req.push("SendTargets", "All");
    let answer = session.text(&req, timeout)?;
    let _ = session.logout(timeout);
    let default_portal = Portal {
        host: peer.map(|p| p.ip().to_string()).unwrap_or_default(),
        port: peer.map(|p| p.port()).unwrap_or(3260),
        tpgt: None,
    };
    parse_send_targets(&answer, &default_portal).map_err(|e| {
        SessionError::Connection(super::connection::ConnError::Protocol(e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_targets_and_portals() {
        let t = TextPairs::parse(
            b"TargetName=iqn.a:1\0TargetAddress=10.0.0.1:3260,1\0TargetAddress=[fe80::1]:3261,2\0TargetName=iqn.a:2\0",
        )
        .unwrap();
        let d = Portal {
            host: "192.0.2.9".into(),
            port: 3260,
            tpgt: None,
        };
        let targets = parse_send_targets(&t, &d).unwrap();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].portals.len(), 2);
        assert_eq!(targets[0].portals[1].host, "fe80::1");
        assert_eq!(targets[0].portals[1].tpgt, Some(2));
        assert_eq!(targets[0].portals[1].address(), "[fe80::1]:3261");
        assert_eq!(targets[1].portals, vec![d.clone()]);
        let bad = TextPairs::parse(b"TargetAddress=1.2.3.4\0").unwrap();
        assert_eq!(
            parse_send_targets(&bad, &d),
            Err(DiscoveryError::AddressWithoutTarget)
        );
        let bad = TextPairs::parse(b"TargetName=x\0TargetAddress=1.2.3.4:http\0").unwrap();
        assert!(parse_send_targets(&bad, &d).is_err());
    }

    proptest::proptest! {
        /// `host:port,tpgt` as targets write TargetAddress parses back to the
        /// portal, IPv6 in brackets included.
        #[test]
        fn target_address_round_trip(
            host in proptest::prop_oneof![
                "[a-z][a-z0-9.-]{0,20}",
                "[0-9a-f]{1,4}(:[0-9a-f]{0,4}){2,6}",
            ],
            port in proptest::prelude::any::<u16>(),
            tpgt in proptest::option::of(proptest::prelude::any::<u16>()),
        ) {
            let p = Portal { host, port, tpgt };
            let mut text = p.address();
            if let Some(t) = tpgt {
                text.push_str(&format!(",{t}"));
            }
            proptest::prop_assert_eq!(parse_address(&text, 1), Ok(p));
        }

        #[test]
        fn send_targets_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            if let Ok(t) = TextPairs::parse(&bytes) {
                let d = Portal { host: "h".into(), port: 1, tpgt: None };
                if let Ok(targets) = parse_send_targets(&t, &d) {
                    proptest::prop_assert!(targets.iter().all(|t| !t.portals.is_empty()));
                }
            }
        }
    }
}
