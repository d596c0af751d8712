//! Login redirection (RFC 7143 §11.13.5, status class 1): a target, often
//! a group or virtual address of an array, answers the login with
//! "temporarily moved" (0x0101) or "permanently moved" (0x0102) and a
//! `TargetAddress`. [`LoginPortal`] follows such answers a bounded number of
//! hops and remembers where the next login of the same path must start:
//! back at the original address after a temporary redirect, at the new
//! address after a permanent one.

use super::login::LoginError;
use super::session::{Session, SessionConfig, SessionError};
use crate::transport::{Transport, TransportError};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use thiserror::Error;

/// Hops followed before a login gives up (a redirect loop ends here).
pub const MAX_REDIRECTS: usize = 4;

/// One redirect met on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// Where that login was sent.
    pub from: SocketAddr,
    /// Where the target sent it (resolved `TargetAddress`).
    pub to: SocketAddr,
    /// 0x0102 (permanently moved) rather than 0x0101 (temporarily).
    pub permanent: bool,
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.permanent {
            "permanently"
        } else {
            "temporarily"
        };
        write!(f, "{} redirected {kind} to {}", self.from, self.to)
    }
}

/// The hops as one phrase for errors: ` (after 10.0.0.1:3260 redirected
/// temporarily to 10.0.0.2:3260)`, empty without hops.
fn via(hops: &[Hop]) -> String {
    if hops.is_empty() {
        return String::new();
    }
    let list: Vec<String> = hops.iter().map(Hop::to_string).collect();
    format!(" (after {})", list.join(", then "))
}

#[derive(Debug, Error)]
pub enum RedirectError {
    #[error("login at {addr}{}: {source}", via(.hops))]
    Login {
        addr: SocketAddr,
        hops: Vec<Hop>,
        source: Box<SessionError>,
    },
    #[error("connecting to {addr}{}: {source}", via(.hops))]
    Connect {
        addr: SocketAddr,
        hops: Vec<Hop>,
        source: TransportError,
    },
    #[error("login at {addr}{} redirected to TargetAddress={address:?}, which is not usable: {why}", via(.hops))]
    BadAddress {
        addr: SocketAddr,
        hops: Vec<Hop>,
        address: String,
        why: String,
    },
    #[error("login redirected more than {max} times{}", via(.hops))]
    TooManyRedirects { max: usize, hops: Vec<Hop> },
}

impl RedirectError {
    /// The session error underneath, when the failure was a login or session error.
    pub fn session_error(&self) -> Option<&SessionError> {
        match self {
            RedirectError::Login { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// Parses a `TargetAddress` value: `host[:port][,tpgt]`, host a name, an
/// IPv4 address or a bracketed IPv6 address; port 3260 when absent.
/// Returns the resolved address and the portal group tag.
pub fn parse_target_address(v: &str) -> Result<(SocketAddr, Option<u16>), String> {
    let (hostport, tpgt) = match v.rsplit_once(',') {
        Some((hp, t)) => (
            hp,
            Some(
                t.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("portal group tag {t:?} is not a number 0-65535"))?,
            ),
        ),
        None => (v, None),
    };
    let hostport = hostport.trim();
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or("IPv6 address without a closing ']'")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected {after:?} after the IPv6 address")),
        };
        (h, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err("IPv6 addresses need brackets".into()),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("port {p:?} is not a number 1-65535"))?,
        None => 3260,
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))?;
    Ok((addr, tpgt))
}

/// The address logins of one path go to, and the redirects they follow.
#[derive(Debug, Clone)]
pub struct LoginPortal {
    original: SocketAddr,
    home: SocketAddr,
    max_redirects: usize,
    last_hops: Vec<Hop>,
}

impl LoginPortal {
    pub fn new(addr: SocketAddr) -> LoginPortal {
        LoginPortal {
            original: addr,
            home: addr,
            max_redirects: MAX_REDIRECTS,
            last_hops: Vec::new(),
        }
    }

    /// Follow at most `n` redirects per login (0: none).
    pub fn max_redirects(mut self, n: usize) -> LoginPortal {
        self.max_redirects = n;
        self
    }

    /// The address configured.
    pub fn original(&self) -> SocketAddr {
        self.original
    }

    /// Where the next login starts: the original address, or the last
    /// permanent redirect's.
    pub fn home(&self) -> SocketAddr {
        self.home
    }

    /// The redirects the last login followed.
    pub fn last_hops(&self) -> &[Hop] {
        &self.last_hops
    }

    /// Connects with `connect` and logs in at [`home`](Self::home),
    /// following redirects; returns the session and the address it is
    /// logged in at. A permanent redirect moves `home` for later logins
    /// (also when a later hop of the same login fails).
    pub fn login<T: Transport>(
        &mut self,
        mut connect: impl FnMut(SocketAddr) -> Result<T, TransportError>,
        config: &SessionConfig,
    ) -> Result<(Session<T>, SocketAddr), RedirectError> {
        let mut addr = self.home;
        let mut hops = Vec::new();
        loop {
            let t = match connect(addr) {
                Ok(t) => t,
                Err(source) => {
                    self.last_hops = hops.clone();
                    return Err(RedirectError::Connect { addr, hops, source });
                }
            };
            let (detail, address) = match Session::login(t, config) {
                Ok(s) => {
                    if !hops.is_empty() {
                        log::info!(
                            "login to {:?} landed at {addr}{}",
                            config.login.target_name,
                            via(&hops)
                        );
                    }
                    self.last_hops = hops;
                    return Ok((s, addr));
                }
                Err(SessionError::Login(LoginError::Redirected { detail, address })) => {
                    (detail, address)
                }
                Err(source) => {
                    self.last_hops = hops.clone();
                    return Err(RedirectError::Login {
                        addr,
                        hops,
                        source: Box::new(source),
                    });
                }
            };
            let to = match parse_target_address(&address) {
                Ok((to, _tpgt)) => to,
                Err(why) => {
                    self.last_hops = hops.clone();
                    return Err(RedirectError::BadAddress {
                        addr,
                        hops,
                        address,
                        why,
                    });
                }
            };
            let permanent = detail == 0x02;
            let hop = Hop {
                from: addr,
                to,
                permanent,
            };
            log::info!("login to {:?}: {hop}", config.login.target_name);
            hops.push(hop);
            if permanent {
                self.home = to;
            }
            if hops.len() > self.max_redirects {
                self.last_hops = hops.clone();
                return Err(RedirectError::TooManyRedirects {
                    max: self.max_redirects,
                    hops,
                });
            }
            addr = to;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_addresses() {
        let a = |s: &str| parse_target_address(s);
        assert_eq!(
            a("127.0.0.1:3261,2").unwrap(),
            ("127.0.0.1:3261".parse().unwrap(), Some(2))
        );
        assert_eq!(
            a("127.0.0.1").unwrap(),
            ("127.0.0.1:3260".parse().unwrap(), None)
        );
        assert_eq!(
            a("[::1]:3262,1").unwrap(),
            ("[::1]:3262".parse().unwrap(), Some(1))
        );
        assert_eq!(a("[::1]").unwrap().0, "[::1]:3260".parse().unwrap());
        assert_eq!(a("localhost:3263").unwrap().0.port(), 3263);
        for (bad, why) in [
            ("", "no host"),
            (":3260", "no host"),
            ("127.0.0.1:0", "port"),
            ("127.0.0.1:http", "port"),
            ("127.0.0.1:3260,x", "portal group tag"),
            ("::1:3260", "brackets"),
            ("[::1", "closing"),
            ("no-such-host.invalid:3260", "resolve"),
        ] {
            let e = a(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn hops_read_well_in_errors() {
        let hops = [
            Hop {
                from: "127.0.0.1:1".parse().unwrap(),
                to: "127.0.0.1:2".parse().unwrap(),
                permanent: false,
            },
            Hop {
                from: "127.0.0.1:2".parse().unwrap(),
                to: "127.0.0.1:3".parse().unwrap(),
                permanent: true,
            },
        ];
        let e = RedirectError::TooManyRedirects {
            max: 1,
            hops: hops.to_vec(),
        };
        assert_eq!(
            e.to_string(),
            "login redirected more than 1 times (after 127.0.0.1:1 redirected temporarily \
             to 127.0.0.1:2, then 127.0.0.1:2 redirected permanently to 127.0.0.1:3)"
        );
    }
}
