//! iSCSI text key=value pairs (RFC 7143 §6): `key=value` strings, each
//! terminated by a NUL, in the data segment of Login and Text PDUs.

use thiserror::Error;

/// Longest key name allowed (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept; the RFC's limit for most values is 255, but
/// CHAP challenges and SendTargets addresses may be longer, so allow 8 KiB.
pub const MAX_VALUE_LEN: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextError {
    #[error("text pair without '=': {0:?}")]
    MissingEquals(String),
    #[error("text key is empty")]
    EmptyKey,
    #[error("text key {0:?} is longer than 63 bytes")]
    KeyTooLong(String),
    #[error("value of {key} is longer than {MAX_VALUE_LEN} bytes")]
    ValueTooLong { key: String },
    #[error("text key or value is not valid UTF-8")]
    NotUtf8,
    #[error("key {0} appears twice")]
    Repeated(String),
}

/// An ordered list of key/value pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextPairs(pub Vec<(String, String)>);

impl TextPairs {
    pub fn new() -> TextPairs {
        TextPairs(Vec::new())
    }

    /// Parses a complete text (all continuation PDUs joined). A trailing
    /// pair without its NUL is accepted; empty strings between NULs are skipped.
    pub fn parse(data: &[u8]) -> Result<TextPairs, TextError> {
        let mut pairs = Vec::new();
        for raw in data.split(|&b| b == 0) {
            if raw.is_empty() {
                continue;
            }
            let s = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| TextError::MissingEquals(truncate(s)))?;
            if k.is_empty() {
                return Err(TextError::EmptyKey);
            }
            if k.len() > MAX_KEY_LEN {
                return Err(TextError::KeyTooLong(truncate(k)));
            }
            if v.len() > MAX_VALUE_LEN {
                return Err(TextError::ValueTooLong { key: k.to_string() });
            }
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(TextPairs(pairs))
    }

    /// Like [`parse`](Self::parse), but a key given twice is an error
    /// (negotiation keys may appear once per exchange; RFC 7143 §6.2).
    pub fn parse_unique(data: &[u8]) -> Result<TextPairs, TextError> {
        let pairs = Self::parse(data)?;
        for (i, (k, _)) in pairs.0.iter().enumerate() {
            // SendTargets replies legitimately repeat TargetName/TargetAddress.
            if k == "TargetAddress" || k == "TargetName" {
                continue;
            }
            if pairs.0[..i].iter().any(|(k2, _)| k2 == k) {
                return Err(TextError::Repeated(k.clone()));
            }
        }
        Ok(pairs)
    }

    pub fn push(&mut self, key: &str, value: impl Into<String>) {
        self.0.push((key.to_string(), value.into()));
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends the NUL-terminated encoding to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        for (k, v) in &self.0 {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.emit(&mut out);
        out
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_pairs_and_values_with_equals() {
        let t = TextPairs::parse(b"HeaderDigest=None\0CHAP_C=0xab=cd\0\0").unwrap();
        assert_eq!(t.get("HeaderDigest"), Some("None"));
        assert_eq!(t.get("CHAP_C"), Some("0xab=cd"));
        assert_eq!(t.0.len(), 2);
    }

    #[test]
    fn rejects_bad_pairs() {
        assert_eq!(
            TextPairs::parse(b"novalue\0"),
            Err(TextError::MissingEquals("novalue".into()))
        );
        assert_eq!(TextPairs::parse(b"=x\0"), Err(TextError::EmptyKey));
        assert!(matches!(
            TextPairs::parse(&[0xff, b'=', b'1', 0]),
            Err(TextError::NotUtf8)
        ));
        let long = format!("{}=1\0", "k".repeat(64));
        assert!(matches!(
            TextPairs::parse(long.as_bytes()),
            Err(TextError::KeyTooLong(_))
        ));
        assert_eq!(
            TextPairs::parse_unique(b"MaxBurstLength=1\0MaxBurstLength=2\0"),
            Err(TextError::Repeated("MaxBurstLength".into()))
        );
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = TextPairs::parse(&bytes);
        }

        #[test]
        fn round_trip(pairs in proptest::collection::vec(("[A-Za-z][A-Za-z0-9_.]{0,20}", "[ -~&&[^=]]{0,40}"), 0..8)) {
            let mut t = TextPairs::new();
            for (k, v) in &pairs { t.push(k, v.clone()); }
            let back = TextPairs::parse(&t.to_bytes()).unwrap();
            prop_assert_eq!(back, t);
        }
    }

    proptest! {
        /// Whatever parses (any bytes) re-emits to text that parses the same.
        #[test]
        fn parse_emit_round_trip_on_any_bytes(bytes in proptest::collection::vec(
            prop::sample::select(vec![0u8, b'=', b'a', b'K', b'1', b',', 0xc3, 0xa9, 0xff]), 0..200)) {
            if let Ok(t) = TextPairs::parse(&bytes) {
                prop_assert_eq!(TextPairs::parse(&t.to_bytes()), Ok(t));
            }
        }
    }
}
