//! Target URLs in libiscsi's format, which users already know:
//! `iscsi://[user[%password]@]host[:port]/target-iqn/lun`, with
//! `?target_user=U&target_password=P` for mutual CHAP. `host` may be an IPv4
//! address, a name, or `[IPv6]`. Without target and LUN the URL names a
//! portal (for discovery).

use std::fmt;
use thiserror::Error;

pub const DEFAULT_PORT: u16 = 3260;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UrlError {
    #[error("URL {0:?} does not start with iscsi://")]
    Scheme(String),
    #[error("URL has no host: {0:?}")]
    NoHost(String),
    #[error("URL port {0:?} is not a number 1-65535")]
    BadPort(String),
    #[error("URL has an unterminated IPv6 address: {0:?}")]
    BadIpv6(String),
    #[error(
        "URL host {0:?} looks like an IPv6 address; write it in brackets: iscsi://[addr]:port/..."
    )]
    UnbracketedIpv6(String),
    #[error("URL names a target but no LUN (expected .../target-iqn/lun): {0:?}")]
    NoLun(String),
    #[error("URL LUN {0:?} is not a number 0-16383")]
    BadLun(String),
    #[error("URL query parameter {0:?} is not known (allowed: target_user, target_password)")]
    BadQuery(String),
    #[error("a target URL is needed here (iscsi://host[:port]/target-iqn/lun), not a portal")]
    NotATarget,
}

/// A parsed iSCSI URL. Its `Display` never prints passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    pub host: String,
    pub port: u16,
    pub target: Option<String>,
    pub lun: Option<u16>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub target_user: Option<String>,
    pub target_password: Option<String>,
}

impl IscsiUrl {
    pub fn parse(s: &str) -> Result<IscsiUrl, UrlError> {
        let rest = s
            .strip_prefix("iscsi://")
            .ok_or_else(|| UrlError::Scheme(redact(s)))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (user, password) = match auth {
            Some(a) => match a.split_once('%') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(a.to_string()), None),
            },
            None => (None, None),
        };
        let (hostport, path) = match rest.split_once('/') {
            Some((h, p)) => (h, p),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| UrlError::BadIpv6(hostport.to_string()))?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None if after.is_empty() => DEFAULT_PORT,
                None => return Err(UrlError::BadIpv6(hostport.to_string())),
            };
            // "[[]" would give host "[", which prints as an unterminated "[".
            if h.contains('[') {
                return Err(UrlError::BadIpv6(hostport.to_string()));
            }
            (h.to_string(), port)
        } else {
            let (h, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (h, parse_port(p)?),
                None => (hostport, DEFAULT_PORT),
            };
            // Without brackets, "2001:db8::1" would silently become host
            // "2001:db8:" and port 1.
            if h.contains([':', '[', ']']) {
                return Err(UrlError::UnbracketedIpv6(hostport.to_string()));
            }
            (h.to_string(), port)
        };
        if host.is_empty() {
            return Err(UrlError::NoHost(redact(s)));
        }
        let path = path.trim_end_matches('/');
        let (target, lun) = if path.is_empty() {
            (None, None)
        } else {
            let (t, l) = path
                .rsplit_once('/')
                .ok_or_else(|| UrlError::NoLun(redact(s)))?;
            if t.is_empty() {
                return Err(UrlError::NoLun(redact(s)));
            }
            let lun = l
                .parse::<u16>()
                .ok()
                .filter(|&n| n < 16384)
                .ok_or_else(|| UrlError::BadLun(l.to_string()))?;
            (Some(t.to_string()), Some(lun))
        };
        let mut url = IscsiUrl {
            host,
            port,
            target,
            lun,
            user,
            password,
            target_user: None,
            target_password: None,
        };
        for kv in query.unwrap_or("").split('&').filter(|k| !k.is_empty()) {
            match kv.split_once('=') {
                Some(("target_user", v)) => url.target_user = Some(v.to_string()),
                Some(("target_password", v)) => url.target_password = Some(v.to_string()),
                _ => {
                    return Err(UrlError::BadQuery(
                        kv.split('=').next().unwrap_or("").to_string(),
                    ))
                }
            }
        }
        Ok(url)
    }

    /// `host:port` for connecting (IPv6 in brackets).
    pub fn portal(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the portal to a socket address.
    pub fn socket_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        use std::net::ToSocketAddrs;
        self.portal().to_socket_addrs()?.next().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} did not resolve", self.host),
            )
        })
    }

    pub fn require_target(&self) -> Result<(&str, u16), UrlError> {
        match (&self.target, self.lun) {
            (Some(t), Some(l)) => Ok((t, l)),
            _ => Err(UrlError::NotATarget),
        }
    }
}

impl fmt::Display for IscsiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iscsi://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        write!(f, "{}", self.portal())?;
        if let (Some(t), Some(l)) = (&self.target, self.lun) {
            write!(f, "/{t}/{l}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for IscsiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IscsiUrl({self})")
    }
}

fn parse_port(p: &str) -> Result<u16, UrlError> {
    p.parse::<u16>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| UrlError::BadPort(p.to_string()))
}

/// The URL text with any password removed, for error messages.
fn redact(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(i), Some(at)) if at > i => {
            let auth = &s[i + 3..at];
            let user = auth.split('%').next().unwrap_or("");
            format!("{}{}{}", &s[..i + 3], user, &s[at..])
        }
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url() {
        let u = IscsiUrl::parse("iscsi://bob%s3cret@10.0.0.1:3261/iqn.2026-11.com.example:disk/2?target_user=t&target_password=tp").unwrap();
        assert_eq!(u.host, "10.0.0.1");
        assert_eq!(u.port, 3261);
        assert_eq!(u.target.as_deref(), Some("iqn.2026-11.com.example:disk"));
        assert_eq!(u.lun, Some(2));
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(u.target_user.as_deref(), Some("t"));
        assert!(!format!("{u} {u:?}").contains("s3cret"));
    }

    #[test]
    fn portal_only_and_ipv6() {
        let u = IscsiUrl::parse("iscsi://[::1]/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.clone()),
            ("::1", 3260, None)
        );
        assert_eq!(u.portal(), "[::1]:3260");
        let u = IscsiUrl::parse("iscsi://[fe80::1]:3262/iqn.x:y/0").unwrap();
        assert_eq!(u.port, 3262);
        assert!(IscsiUrl::parse("iscsi://host")
            .unwrap()
            .require_target()
            .is_err());
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let cases = [
            ("http://x/iqn/0", "iscsi://"),
            ("iscsi:///iqn/0", "no host"),
            ("iscsi://h:99999/iqn/0", "port"),
            ("iscsi://h/iqn.x:y", "no LUN"),
            ("iscsi://h/iqn.x:y/abc", "LUN"),
            ("iscsi://[::1/iqn/0", "IPv6"),
            // Regression (fuzz_url): used to parse as host "2001:db8:", port 1.
            ("iscsi://2001:db8::1/iqn/0", "brackets"),
            ("iscsi://h]:3260/iqn/0", "brackets"),
            ("iscsi://[[]/iqn/0", "IPv6"),
            ("iscsi://h/iqn/0?foo=1", "query"),
        ];
        for (url, needle) in cases {
            let e = IscsiUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
        let e = IscsiUrl::parse("ftp://u%pw@h/i/0").unwrap_err().to_string();
        assert!(!e.contains("pw"), "{e}");
    }

    proptest::proptest! {
        /// A URL built from parts parses to those parts, and its `Display`
        /// (which drops secrets) parses back to it without them.
        #[test]
        fn parse_display_round_trip(
            host in proptest::prop_oneof![
                "[a-z][a-z0-9.-]{0,20}",
                "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
                "[0-9a-f]{1,4}(:[0-9a-f]{0,4}){2,6}",
            ],
            port in 1u16..,
            target in proptest::option::of("iqn\\.[0-9]{4}-[0-9]{2}\\.[a-z.]{1,12}:[a-z0-9:._-]{1,16}"),
            lun in 0u16..16384,
            user in proptest::option::of("[a-z0-9_.-]{1,10}"),
            password in proptest::option::of("[a-zA-Z0-9!$^*()_+-]{1,12}"),
        ) {
            let mut s = String::from("iscsi://");
            if let Some(u) = &user {
                s.push_str(u);
                if let Some(p) = &password {
                    s.push('%');
                    s.push_str(p);
                }
                s.push('@');
            }
            if host.contains(':') {
                s.push_str(&format!("[{host}]:{port}"));
            } else {
                s.push_str(&format!("{host}:{port}"));
            }
            if let Some(t) = &target {
                s.push_str(&format!("/{t}/{lun}"));
            }
            let u = IscsiUrl::parse(&s).unwrap();
            proptest::prop_assert_eq!(&u.host, &host);
            proptest::prop_assert_eq!(u.port, port);
            proptest::prop_assert_eq!(&u.target, &target);
            proptest::prop_assert_eq!(u.lun, target.as_ref().map(|_| lun));
            proptest::prop_assert_eq!(&u.user, &user);
            proptest::prop_assert_eq!(&u.password, &user.as_ref().and(password.clone()));
            let back = IscsiUrl::parse(&u.to_string()).unwrap();
            proptest::prop_assert_eq!(back, IscsiUrl { password: None, ..u });
        }

        #[test]
        fn parse_never_panics(s in "iscsi://\\PC{0,60}") {
            if let Ok(u) = IscsiUrl::parse(&s) {
                let again = IscsiUrl::parse(&u.to_string()).unwrap();
                proptest::prop_assert_eq!(again.host, u.host);
            }
        }
    }
}
