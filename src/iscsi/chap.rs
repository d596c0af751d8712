//! CHAP authentication (RFC 1994, as used by RFC 7143 §12.1.3), MD5 only
//! (CHAP_A=5). The response is MD5(identifier || secret || challenge).
//! Secrets live in [`Secret`], whose `Debug`/`Display` never show them.

use std::fmt;
use thiserror::Error;

/// The only CHAP algorithm we allow: 5 = MD5.
pub const CHAP_MD5: &str = "5";
/// Shortest challenge we send; targets must not send shorter ones either.
pub const MIN_CHALLENGE_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChapError {
    #[error("CHAP binary value {0:?} is not 0x-hex or 0b-base64")]
    BadEncoding(String),
    #[error("target offered CHAP algorithm {0}, but only MD5 (5) is allowed")]
    Algorithm(String),
    #[error("target CHAP challenge is {0} bytes; at least {MIN_CHALLENGE_LEN} are required")]
    ShortChallenge(usize),
    #[error("target CHAP identifier {0:?} is not a number 0-255")]
    BadIdentifier(String),
    #[error("target failed mutual CHAP: its response does not match the target secret")]
    TargetNotAuthenticated,
    #[error("target sent the same challenge we sent it (reflection attack)")]
    Reflected,
}

/// A CHAP secret. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// User name + secret for one direction of CHAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub secret: Secret,
}

/// CHAP_R for identifier `id`, `secret`, `challenge`.
pub fn response(id: u8, secret: &Secret, challenge: &[u8]) -> [u8; 16] {
    let mut ctx = md5::Context::new();
    ctx.consume([id]);
    ctx.consume(secret.expose());
    ctx.consume(challenge);
    ctx.finalize().0
}

/// Decodes a CHAP binary value: `0x`/`0X` hex or `0b`/`0B` base64.
pub fn decode_binary(v: &str) -> Result<Vec<u8>, ChapError> {
    let bad = || ChapError::BadEncoding(v.chars().take(40).collect());
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        // An odd digit count means a leading zero was dropped.
        let padded;
        let hex = if hex.len() % 2 == 1 {
            padded = format!("0{hex}");
            padded.as_str()
        } else {
            hex
        };
        if hex.is_empty() {
            return Err(bad());
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(bad)
            })
            .collect()
    } else if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        decode_base64(b64).ok_or_else(bad)
    } else {
        Err(bad())
    }
}

pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in s {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if out.is_empty() {
        return None;
    }
    Some(out)
}

/// Parses CHAP_I.
pub fn parse_identifier(v: &str) -> Result<u8, ChapError> {
    v.parse::<u8>()
        .map_err(|_| ChapError::BadIdentifier(v.chars().take(20).collect()))
}

/// Checks CHAP_A from the target: a list is allowed, but MD5 must be chosen.
pub fn check_algorithm(v: &str) -> Result<(), ChapError> {
    if v == CHAP_MD5 {
        Ok(())
    } else {
        Err(ChapError::Algorithm(v.chars().take(20).collect()))
    }
}

/// Verifies the target's answer to our mutual-CHAP challenge.
pub fn verify(
    id: u8,
    secret: &Secret,
    challenge: &[u8],
    their_response: &[u8],
) -> Result<(), ChapError> {
    let expected = response(id, secret, challenge);
    // Constant-time compare: no early exit on the first differing byte.
    let diff = expected
        .iter()
        .zip(their_response.iter().chain(std::iter::repeat(&0)))
        .fold(their_response.len() ^ expected.len(), |acc, (a, b)| {
            acc | (a ^ b) as usize
        });
    if diff == 0 {
        Ok(())
    } else {
        Err(ChapError::TargetNotAuthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_rfc1994_construction() {
        let secret = Secret::new(b"secretsecret".to_vec());
        let challenge = decode_binary("0x0102030405060708090a0b0c0d0e0f10").unwrap();
        let r = response(7, &secret, &challenge);
        let mut manual = vec![7u8];
        manual.extend_from_slice(b"secretsecret");
        manual.extend_from_slice(&challenge);
        assert_eq!(r, md5::compute(&manual).0);
        assert!(verify(7, &secret, &challenge, &r).is_ok());
        assert_eq!(
            verify(8, &secret, &challenge, &r),
            Err(ChapError::TargetNotAuthenticated)
        );
        assert_eq!(
            verify(7, &secret, &challenge, &r[..15]),
            Err(ChapError::TargetNotAuthenticated)
        );
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(decode_binary("0xABcd").unwrap(), vec![0xab, 0xcd]);
        assert_eq!(decode_binary("0xabc").unwrap(), vec![0x0a, 0xbc]);
        assert_eq!(decode_binary("0bAQID").unwrap(), vec![1, 2, 3]);
        assert!(decode_binary("abcd").is_err());
        assert!(decode_binary("0x").is_err());
        assert!(decode_binary("0xzz").is_err());
        assert_eq!(encode_hex(&[0, 255]), "0x00ff");
    }

    #[test]
    fn secrets_are_never_printed() {
        let c = Credentials {
            user: "u".into(),
            secret: Secret::new(b"hunter2".to_vec()),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn only_md5_is_allowed() {
        assert!(check_algorithm("5").is_ok());
        assert!(check_algorithm("7").is_err());
        assert!(parse_identifier("256").is_err());
    }

    proptest::proptest! {
        /// CHAP binary values: hex and base64 encodings decode to the bytes.
        #[test]
        fn binary_round_trip(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..100)) {
            proptest::prop_assert_eq!(decode_binary(&encode_hex(&bytes)), Ok(bytes.clone()));
            proptest::prop_assert_eq!(decode_binary(&encode_hex(&bytes).to_uppercase().replacen("0X", "0x", 1)), Ok(bytes.clone()));
            // Base64, as RFC 7143 §6.1 allows.
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut b64 = String::from("0b");
            for c in bytes.chunks(3) {
                let n = c.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
                for i in 0..=c.len() {
                    b64.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
                for _ in c.len()..3 {
                    b64.push('=');
                }
            }
            proptest::prop_assert_eq!(decode_binary(&b64), Ok(bytes));
        }

        #[test]
        fn decode_never_panics(s in "\\PC{0,40}") {
            let _ = decode_binary(&s);
            let _ = decode_binary(&format!("0x{s}"));
            let _ = decode_binary(&format!("0b{s}"));
        }
    }
}
