//! CHAP authentication (RFC 1994, as used by RFC 7143 §12.1.3) with the
//! hash algorithms of the IANA PPP registry that iSCSI uses: CHAP_A 5 (MD5),
//! 6 (SHA-1), 7 (SHA-256) and 8 (SHA3-256), as RFC 7143's successors and
//! Linux open-iscsi offer them. The response is
//! HASH(identifier || secret || challenge).
//! Secrets live in [`Secret`], whose `Debug`/`Display` never show them.

use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Shortest challenge we send; targets must not send shorter ones either.
pub const MIN_CHALLENGE_LEN: usize = 16;

/// One CHAP hash algorithm (the CHAP_A value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ChapAlgorithm {
    /// CHAP_A=5.
    Md5,
    /// CHAP_A=6.
    Sha1,
    /// CHAP_A=7.
    Sha256,
    /// CHAP_A=8.
    Sha3_256,
}

impl ChapAlgorithm {
    /// Every algorithm, strongest first: the default offer (and what the
    /// embedded target accepts by default).
    pub const PREFERRED: [ChapAlgorithm; 4] = [
        ChapAlgorithm::Sha3_256,
        ChapAlgorithm::Sha256,
        ChapAlgorithm::Sha1,
        ChapAlgorithm::Md5,
    ];

    /// The CHAP_A value.
    pub fn code(self) -> u8 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha1 => 6,
            ChapAlgorithm::Sha256 => 7,
            ChapAlgorithm::Sha3_256 => 8,
        }
    }

    /// The algorithm of CHAP_A value `v` (`None` for one we do not know).
    pub fn from_code(v: &str) -> Option<ChapAlgorithm> {
        ChapAlgorithm::PREFERRED
            .into_iter()
            .find(|a| v.trim() == a.code().to_string())
    }

    /// The name used on the command line: md5, sha1, sha256, sha3-256.
    pub fn name(self) -> &'static str {
        match self {
            ChapAlgorithm::Md5 => "md5",
            ChapAlgorithm::Sha1 => "sha1",
            ChapAlgorithm::Sha256 => "sha256",
            ChapAlgorithm::Sha3_256 => "sha3-256",
        }
    }

    /// Bytes in a response (the digest size).
    pub fn digest_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha1 => 20,
            ChapAlgorithm::Sha256 | ChapAlgorithm::Sha3_256 => 32,
        }
    }

    /// Length of the challenges we send with this algorithm: the digest
    /// size, at least [`MIN_CHALLENGE_LEN`].
    pub fn challenge_len(self) -> usize {
        self.digest_len().max(MIN_CHALLENGE_LEN)
    }

    /// Parses a comma-separated list of names (`sha3-256,sha256,sha1,md5`),
    /// keeping its order. Empty lists and repeats are refused.
    pub fn parse_list(s: &str) -> Result<Vec<ChapAlgorithm>, ChapError> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim) {
            let a: ChapAlgorithm = name.parse()?;
            if out.contains(&a) {
                return Err(ChapError::AlgorithmList(format!(
                    "{s:?} names {name} twice"
                )));
            }
            out.push(a);
        }
        Ok(out)
    }

    /// The CHAP_A value offering `list` in its order, e.g. `8,7,6,5`.
    pub fn offer(list: &[ChapAlgorithm]) -> String {
        list.iter()
            .map(|a| a.code().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `list` for people: `SHA3-256 (8), MD5 (5)`.
    pub fn describe(list: &[ChapAlgorithm]) -> String {
        if list.is_empty() {
            return "none".into();
        }
        list.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A CHAP_A list from the wire for people: known values by name, others as sent.
    pub fn describe_wire(v: &str) -> String {
        v.split(',')
            .map(|c| match ChapAlgorithm::from_code(c) {
                Some(a) => a.to_string(),
                None => format!("unknown ({})", c.chars().take(12).collect::<String>()),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn hash(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: sha1::Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            ChapAlgorithm::Md5 => {
                let mut ctx = md5::Context::new();
                for p in parts {
                    ctx.consume(p);
                }
                ctx.finalize().0.to_vec()
            }
            ChapAlgorithm::Sha1 => run::<sha1::Sha1>(parts),
            ChapAlgorithm::Sha256 => run::<sha2::Sha256>(parts),
            ChapAlgorithm::Sha3_256 => run::<sha3::Sha3_256>(parts),
        }
    }
}

impl fmt::Display for ChapAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ChapAlgorithm::Md5 => "MD5",
            ChapAlgorithm::Sha1 => "SHA-1",
            ChapAlgorithm::Sha256 => "SHA-256",
            ChapAlgorithm::Sha3_256 => "SHA3-256",
        };
        write!(f, "{name} ({})", self.code())
    }
}

impl FromStr for ChapAlgorithm {
    type Err = ChapError;
    fn from_str(s: &str) -> Result<ChapAlgorithm, ChapError> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        let found = match norm.as_str() {
            "md5" | "5" => ChapAlgorithm::Md5,
            "sha1" | "sha-1" | "6" => ChapAlgorithm::Sha1,
            "sha256" | "sha-256" | "7" => ChapAlgorithm::Sha256,
            "sha3-256" | "sha3256" | "8" => ChapAlgorithm::Sha3_256,
            _ => {
                return Err(ChapError::AlgorithmList(format!(
                    "unknown CHAP algorithm {:?} (known: sha3-256, sha256, sha1, md5)",
                    s.chars().take(20).collect::<String>()
                )))
            }
        };
        Ok(found)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChapError {
    #[error("CHAP binary value {0:?} is not 0x-hex or 0b-base64")]
    BadEncoding(String),
    #[error("target chose CHAP_A={chosen}, which is not one we offered (we offered {offered})")]
    UnofferedAlgorithm { chosen: String, offered: String },
    #[error("no CHAP algorithm in common: we offered {ours}; the target {theirs}")]
    NoCommonAlgorithm { ours: String, theirs: String },
    #[error("CHAP algorithms: {0}")]
    AlgorithmList(String),
    #[error("CHAP response is {got} bytes; {algorithm} responses are {expected}")]
    ResponseLength {
        algorithm: ChapAlgorithm,
        got: usize,
        expected: usize,
    },
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

/// CHAP_R with `algorithm` for identifier `id`, `secret`, `challenge`.
pub fn response(algorithm: ChapAlgorithm, id: u8, secret: &Secret, challenge: &[u8]) -> Vec<u8> {
    algorithm.hash(&[&[id], secret.expose(), challenge])
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

/// Checks the target's CHAP_A answer: one of the algorithms in `offered`.
pub fn check_algorithm(v: &str, offered: &[ChapAlgorithm]) -> Result<ChapAlgorithm, ChapError> {
    let ours = || {
        format!(
            "CHAP_A={}: {}",
            ChapAlgorithm::offer(offered),
            ChapAlgorithm::describe(offered)
        )
    };
    if v.trim() == "Reject" {
        return Err(ChapError::NoCommonAlgorithm {
            ours: ours(),
            theirs: "accepts none of them (CHAP_A=Reject)".into(),
        });
    }
    match ChapAlgorithm::from_code(v) {
        Some(a) if offered.contains(&a) => Ok(a),
        _ => Err(ChapError::UnofferedAlgorithm {
            chosen: v.chars().take(20).collect(),
            offered: ours(),
        }),
    }
}

/// The responder's choice for an offered CHAP_A list: the first offered
/// algorithm that `accepted` holds (RFC 7143 §6.2: the offer's order is
/// the offerer's preference). `None` when there is none.
pub fn choose_algorithm(offer: &str, accepted: &[ChapAlgorithm]) -> Option<ChapAlgorithm> {
    offer
        .split(',')
        .filter_map(ChapAlgorithm::from_code)
        .find(|a| accepted.contains(a))
}

/// Verifies the target's answer to our mutual-CHAP challenge.
pub fn verify(
    algorithm: ChapAlgorithm,
    id: u8,
    secret: &Secret,
    challenge: &[u8],
    their_response: &[u8],
) -> Result<(), ChapError> {
    let expected = response(algorithm, id, secret, challenge);
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

    /// Responses of every algorithm against values computed with Python's
    /// hashlib for id 7, secret "secretsecret", challenge 0x01..0x10.
    #[test]
    fn responses_match_independent_digests() {
        let secret = Secret::new(b"secretsecret".to_vec());
        let challenge = decode_binary("0x0102030405060708090a0b0c0d0e0f10").unwrap();
        let expected = [
            (ChapAlgorithm::Md5, "0xfd1043ba0b3ceab4dd514b0ebcc793fb"),
            (
                ChapAlgorithm::Sha1,
                "0x3ef15fc74acf3ced6988cb56a1684a376128dbfa",
            ),
            (
                ChapAlgorithm::Sha256,
                "0x8553021b97266d305e570a913f8aa73b55e5cca0a29ccd2b706be51736076540",
            ),
            (
                ChapAlgorithm::Sha3_256,
                "0x973e8a49ad06e51937d074970786850b5c2cd75986c388d5cffe86fbec1d72c5",
            ),
        ];
        for (alg, hex) in expected {
            let r = response(alg, 7, &secret, &challenge);
            assert_eq!(encode_hex(&r), hex, "{alg}");
            assert_eq!(r.len(), alg.digest_len());
            assert!(verify(alg, 7, &secret, &challenge, &r).is_ok());
            assert_eq!(
                verify(alg, 8, &secret, &challenge, &r),
                Err(ChapError::TargetNotAuthenticated)
            );
            assert_eq!(
                verify(alg, 7, &secret, &challenge, &r[..r.len() - 1]),
                Err(ChapError::TargetNotAuthenticated)
            );
        }
        // The same bytes under another algorithm do not verify.
        let md5 = response(ChapAlgorithm::Md5, 7, &secret, &challenge);
        assert!(verify(ChapAlgorithm::Sha256, 7, &secret, &challenge, &md5).is_err());
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
    fn algorithm_names_lists_and_choice() {
        use ChapAlgorithm::*;
        assert_eq!(
            ChapAlgorithm::parse_list("sha3-256,sha256,sha1,md5").unwrap(),
            ChapAlgorithm::PREFERRED
        );
        assert_eq!(ChapAlgorithm::offer(&ChapAlgorithm::PREFERRED), "8,7,6,5");
        assert_eq!(
            ChapAlgorithm::parse_list(" MD5 , SHA-256").unwrap(),
            [Md5, Sha256]
        );
        let e = ChapAlgorithm::parse_list("md5,sha512").unwrap_err();
        assert!(e.to_string().contains("\"sha512\""), "{e}");
        assert!(ChapAlgorithm::parse_list("md5,md5").is_err());
        assert!(ChapAlgorithm::parse_list("").is_err());
        // The responder takes the first offered value it accepts.
        assert_eq!(choose_algorithm("8,7,6,5", &[Md5, Sha256]), Some(Sha256));
        assert_eq!(
            choose_algorithm("5,8", &ChapAlgorithm::PREFERRED),
            Some(Md5)
        );
        assert_eq!(choose_algorithm("99,8", &[Sha3_256]), Some(Sha3_256));
        assert_eq!(choose_algorithm("8,7", &[Md5]), None);
        // The initiator takes only an answer it offered.
        assert_eq!(check_algorithm("7", &[Sha256, Md5]), Ok(Sha256));
        let e = check_algorithm("6", &[Sha256, Md5]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "target chose CHAP_A=6, which is not one we offered \
             (we offered CHAP_A=7,5: SHA-256 (7), MD5 (5))"
        );
        let e = check_algorithm("Reject", &[Sha3_256]).unwrap_err();
        assert!(matches!(e, ChapError::NoCommonAlgorithm { .. }), "{e}");
        assert!(e.to_string().contains("SHA3-256 (8)"), "{e}");
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
