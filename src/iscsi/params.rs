//! Login/text negotiation of operational keys (RFC 7143 §6 and §13).
//!
//! Every key has a negotiation rule: the result function (min, max, OR, AND,
//! list) or declarative. [`respond`] computes a responder's answer to an
//! offer; [`check_answer`] checks an answer to our own offer and gives the
//! negotiated value, refusing answers the rules forbid. [`Params`] holds the
//! outcome for one connection and its session. The target side (src/target)
//! uses the same functions, so both roles follow one reading of the RFC.

use std::fmt;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NegotiationError {
    #[error("target answered {key}={value}, which is not a valid value ({why})")]
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("target answered {key}={answer}, not allowed for our offer {offer} ({rule})")]
    RuleViolated {
        key: String,
        offer: String,
        answer: String,
        rule: &'static str,
    },
    #[error("target rejected key {key} (we offered {offer})")]
    Rejected { key: String, offer: String },
    #[error("key {0} was answered but never offered")]
    Unsolicited(String),
    #[error("no value in common for {key}: we allow {ours}, offered {theirs}")]
    NoCommonValue {
        key: String,
        ours: String,
        theirs: String,
    },
}

/// The result function of a key (RFC 7143 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Each side states its own value; no answer is expected.
    Declarative,
    /// Numeric, result is the smaller value; range inclusive.
    Min(u32, u32),
    /// Numeric, result is the larger value; range inclusive.
    Max(u32, u32),
    /// Boolean, result is OR.
    Or,
    /// Boolean, result is AND.
    And,
    /// Ordered list of choices; the responder picks the first it supports.
    List,
}

/// Which keys exist and how each is negotiated.
pub fn rule_for(key: &str) -> Option<Rule> {
    Some(match key {
        "HeaderDigest" | "DataDigest" | "AuthMethod" => Rule::List,
        "MaxConnections" => Rule::Min(1, 65535),
        "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => Rule::Or,
        "ImmediateData" => Rule::And,
        "MaxRecvDataSegmentLength" => Rule::Declarative,
        "MaxBurstLength" | "FirstBurstLength" => Rule::Min(512, 16_777_215),
        "DefaultTime2Wait" => Rule::Max(0, 3600),
        "DefaultTime2Retain" => Rule::Min(0, 3600),
        "MaxOutstandingR2T" => Rule::Min(1, 65535),
        "ErrorRecoveryLevel" => Rule::Min(0, 2),
        "IFMarker" | "OFMarker" => Rule::And,
        "iSCSIProtocolLevel" => Rule::Min(0, 31),
        "TaskReporting" => Rule::List,
        "SessionType"
        | "TargetName"
        | "InitiatorName"
        | "TargetAlias"
        | "InitiatorAlias"
        | "TargetAddress"
        | "TargetPortalGroupTag"
        | "SendTargets" => Rule::Declarative,
        _ => return None,
    })
}

fn parse_num(key: &str, v: &str, lo: u32, hi: u32) -> Result<u32, NegotiationError> {
    let n = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16)
    } else {
        v.parse::<u32>()
    }
    .map_err(|_| NegotiationError::BadValue {
        key: key.into(),
        value: v.into(),
        why: "not a number",
    })?;
    if n < lo || n > hi {
        return Err(NegotiationError::BadValue {
            key: key.into(),
            value: v.into(),
            why: "out of range",
        });
    }
    Ok(n)
}

fn parse_bool(key: &str, v: &str) -> Result<bool, NegotiationError> {
    match v {
        "Yes" => Ok(true),
        "No" => Ok(false),
        _ => Err(NegotiationError::BadValue {
            key: key.into(),
            value: v.into(),
            why: "expected Yes or No",
        }),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// Responder side: given the other side's `offer` and what we allow
/// (`ours`: our value, or for lists a comma-separated list of acceptable
/// choices in our order of preference), the value to answer with.
/// Unknown keys get `NotUnderstood`; the caller decides for declaratives.
pub fn respond(key: &str, offer: &str, ours: &str) -> Result<String, NegotiationError> {
    let Some(rule) = rule_for(key) else {
        return Ok("NotUnderstood".into());
    };
    Ok(match rule {
        Rule::Declarative => ours.to_string(),
        Rule::Min(lo, hi) => {
            let theirs = parse_num(key, offer, lo, hi)?;
            let mine = parse_num(key, ours, lo, hi)?;
            theirs.min(mine).to_string()
        }
        Rule::Max(lo, hi) => {
            let theirs = parse_num(key, offer, lo, hi)?;
            let mine = parse_num(key, ours, lo, hi)?;
            theirs.max(mine).to_string()
        }
        Rule::Or => yes_no(parse_bool(key, offer)? || parse_bool(key, ours)?).into(),
        Rule::And => yes_no(parse_bool(key, offer)? && parse_bool(key, ours)?).into(),
        Rule::List => {
            let allowed: Vec<&str> = ours.split(',').collect();
            match offer.split(',').find(|c| allowed.contains(c)) {
                Some(choice) => choice.to_string(),
                None => "Reject".into(),
            }
        }
    })
}

/// Originator side: checks the `answer` to our `offer` and returns the
/// negotiated value.
pub fn check_answer(key: &str, offer: &str, answer: &str) -> Result<String, NegotiationError> {
    let violated = |rule| NegotiationError::RuleViolated {
        key: key.into(),
        offer: offer.into(),
        answer: answer.into(),
        rule,
    };
    if answer == "Reject" {
        return Err(NegotiationError::Rejected {
            key: key.into(),
            offer: offer.into(),
        });
    }
    let Some(rule) = rule_for(key) else {
        return Err(NegotiationError::Unsolicited(key.into()));
    };
    // "Irrelevant" is legal when the key does not apply (e.g. FirstBurstLength
    // with InitialR2T=Yes and ImmediateData=No); our offer then stands.
    if answer == "Irrelevant" {
        return Ok(offer.to_string());
    }
    match rule {
        Rule::Declarative => Ok(answer.to_string()),
        Rule::Min(lo, hi) => {
            let a = parse_num(key, answer, lo, hi)?;
            let o = parse_num(key, offer, lo, hi)?;
            if a > o {
                return Err(violated("the answer must not exceed the offer"));
            }
            Ok(a.to_string())
        }
        Rule::Max(lo, hi) => {
            let a = parse_num(key, answer, lo, hi)?;
            let o = parse_num(key, offer, lo, hi)?;
            if a < o {
                return Err(violated("the answer must not be below the offer"));
            }
            Ok(a.to_string())
        }
        Rule::Or => {
            let a = parse_bool(key, answer)?;
            if parse_bool(key, offer)? && !a {
                return Err(violated("OR of Yes must be Yes"));
            }
            Ok(yes_no(a).into())
        }
        Rule::And => {
            let a = parse_bool(key, answer)?;
            if !parse_bool(key, offer)? && a {
                return Err(violated("AND of No must be No"));
            }
            Ok(yes_no(a).into())
        }
        Rule::List => {
            if offer.split(',').any(|c| c == answer) {
                Ok(answer.to_string())
            } else {
                Err(violated("the answer must be one of the offered choices"))
            }
        }
    }
}

/// Digest choice for one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum DigestKind {
    #[default]
    None,
    Crc32c,
}

impl DigestKind {
    pub fn key_value(self) -> &'static str {
        match self {
            DigestKind::None => "None",
            DigestKind::Crc32c => "CRC32C",
        }
    }
    fn from_value(v: &str) -> DigestKind {
        if v == "CRC32C" {
            DigestKind::Crc32c
        } else {
            DigestKind::None
        }
    }
}

/// What the initiator offers; defaults are tuned for throughput, not the RFC's
/// conservative defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub header_digest: Vec<DigestKind>,
    pub data_digest: Vec<DigestKind>,
    pub max_connections: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// Largest data segment we are willing to receive.
    pub max_recv_data_segment_len: u32,
    pub max_burst_len: u32,
    pub first_burst_len: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_outstanding_r2t: u32,
    pub error_recovery_level: u32,
}

impl Default for Offer {
    fn default() -> Offer {
        Offer {
            header_digest: vec![DigestKind::None],
            data_digest: vec![DigestKind::None],
            max_connections: 1,
            initial_r2t: false,
            immediate_data: true,
            max_recv_data_segment_len: 262_144,
            max_burst_len: 1_048_576,
            first_burst_len: 262_144,
            default_time2wait: 2,
            default_time2retain: 0,
            max_outstanding_r2t: 1,
            error_recovery_level: 0,
        }
    }
}

impl Offer {
    /// Key/value pairs for the operational stage of a normal session.
    pub fn operational_keys(&self) -> Vec<(&'static str, String)> {
        let list = |v: &[DigestKind]| {
            v.iter()
                .map(|d| d.key_value())
                .collect::<Vec<_>>()
                .join(",")
        };
        vec![
            ("HeaderDigest", list(&self.header_digest)),
            ("DataDigest", list(&self.data_digest)),
            ("MaxConnections", self.max_connections.to_string()),
            ("InitialR2T", yes_no(self.initial_r2t).into()),
            ("ImmediateData", yes_no(self.immediate_data).into()),
            (
                "MaxRecvDataSegmentLength",
                self.max_recv_data_segment_len.to_string(),
            ),
            ("MaxBurstLength", self.max_burst_len.to_string()),
            ("FirstBurstLength", self.first_burst_len.to_string()),
            ("DefaultTime2Wait", self.default_time2wait.to_string()),
            ("DefaultTime2Retain", self.default_time2retain.to_string()),
            ("MaxOutstandingR2T", self.max_outstanding_r2t.to_string()),
            ("DataPDUInOrder", "Yes".into()),
            ("DataSequenceInOrder", "Yes".into()),
            ("ErrorRecoveryLevel", self.error_recovery_level.to_string()),
        ]
    }
}

/// The negotiated outcome for one connection (and its session). Values start
/// at the RFC 7143 defaults, which hold for any key not negotiated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Params {
    pub header_digest: DigestKind,
    pub data_digest: DigestKind,
    pub max_connections: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// The most we may receive in one data segment (our declaration).
    pub max_recv_data_segment_len: u32,
    /// The most we may send in one data segment (the target's declaration).
    pub max_xmit_data_segment_len: u32,
    pub max_burst_len: u32,
    pub first_burst_len: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
    pub target_alias: Option<String>,
    pub target_portal_group_tag: Option<u16>,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            header_digest: DigestKind::None,
            data_digest: DigestKind::None,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_recv_data_segment_len: 8192,
            max_xmit_data_segment_len: 8192,
            max_burst_len: 262_144,
            first_burst_len: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            target_alias: None,
            target_portal_group_tag: None,
        }
    }
}

impl Params {
    /// Records a negotiated (or declared) value. Keys the initiator does not
    /// track are ignored. Values were checked by [`check_answer`]/[`respond`].
    pub fn apply(&mut self, key: &str, value: &str) -> Result<(), NegotiationError> {
        let num = |lo, hi| parse_num(key, value, lo, hi);
        let boolean = || parse_bool(key, value);
        match key {
            "HeaderDigest" => self.header_digest = DigestKind::from_value(value),
            "DataDigest" => self.data_digest = DigestKind::from_value(value),
            "MaxConnections" => self.max_connections = num(1, 65535)?,
            "InitialR2T" => self.initial_r2t = boolean()?,
            "ImmediateData" => self.immediate_data = boolean()?,
            "MaxBurstLength" => self.max_burst_len = num(512, 16_777_215)?,
            "FirstBurstLength" => self.first_burst_len = num(512, 16_777_215)?,
            "DefaultTime2Wait" => self.default_time2wait = num(0, 3600)?,
            "DefaultTime2Retain" => self.default_time2retain = num(0, 3600)?,
            "MaxOutstandingR2T" => self.max_outstanding_r2t = num(1, 65535)?,
            "DataPDUInOrder" => self.data_pdu_in_order = boolean()?,
            "DataSequenceInOrder" => self.data_sequence_in_order = boolean()?,
            "ErrorRecoveryLevel" => self.error_recovery_level = num(0, 2)?,
            "TargetAlias" => self.target_alias = Some(value.to_string()),
            "TargetPortalGroupTag" => self.target_portal_group_tag = Some(num(0, 65535)? as u16),
            _ => {}
        }
        // FirstBurstLength never exceeds MaxBurstLength (RFC 7143 §13.14).
        self.first_burst_len = self.first_burst_len.min(self.max_burst_len);
        Ok(())
    }

    /// The target's MaxRecvDataSegmentLength bounds what we send.
    pub fn apply_target_mrdsl(&mut self, value: &str) -> Result<(), NegotiationError> {
        self.max_xmit_data_segment_len =
            parse_num("MaxRecvDataSegmentLength", value, 512, 16_777_215)?;
        Ok(())
    }

    pub fn digests(&self) -> crate::wire::iscsi::Digests {
        crate::wire::iscsi::Digests {
            header: self.header_digest == DigestKind::Crc32c,
            data: self.data_digest == DigestKind::Crc32c,
        }
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HeaderDigest={} DataDigest={} InitialR2T={} ImmediateData={} MaxRecvDSL={} MaxXmitDSL={} MaxBurst={} FirstBurst={} MaxOutstandingR2T={}",
            self.header_digest.key_value(),
            self.data_digest.key_value(),
            yes_no(self.initial_r2t),
            yes_no(self.immediate_data),
            self.max_recv_data_segment_len,
            self.max_xmit_data_segment_len,
            self.max_burst_len,
            self.first_burst_len,
            self.max_outstanding_r2t
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responder_rules() {
        assert_eq!(
            respond("MaxBurstLength", "1048576", "262144").unwrap(),
            "262144"
        );
        assert_eq!(respond("DefaultTime2Wait", "2", "5").unwrap(), "5");
        assert_eq!(respond("InitialR2T", "No", "Yes").unwrap(), "Yes");
        assert_eq!(respond("ImmediateData", "Yes", "No").unwrap(), "No");
        assert_eq!(
            respond("HeaderDigest", "CRC32C,None", "None,CRC32C").unwrap(),
            "CRC32C"
        );
        assert_eq!(respond("HeaderDigest", "CRC32C", "None").unwrap(), "Reject");
        assert_eq!(
            respond("X-com.example.Foo", "1", "").unwrap(),
            "NotUnderstood"
        );
        assert!(respond("MaxBurstLength", "12", "262144").is_err());
    }

    #[test]
    fn originator_checks_answers() {
        assert_eq!(
            check_answer("MaxBurstLength", "1048576", "262144").unwrap(),
            "262144"
        );
        assert!(matches!(
            check_answer("MaxBurstLength", "262144", "1048576"),
            Err(NegotiationError::RuleViolated { .. })
        ));
        assert!(matches!(
            check_answer("InitialR2T", "Yes", "No"),
            Err(NegotiationError::RuleViolated { .. })
        ));
        assert_eq!(check_answer("InitialR2T", "No", "Yes").unwrap(), "Yes");
        assert!(matches!(
            check_answer("ImmediateData", "No", "Yes"),
            Err(NegotiationError::RuleViolated { .. })
        ));
        assert!(matches!(
            check_answer("HeaderDigest", "None", "CRC32C"),
            Err(NegotiationError::RuleViolated { .. })
        ));
        assert!(matches!(
            check_answer("DataDigest", "CRC32C", "Reject"),
            Err(NegotiationError::Rejected { .. })
        ));
        assert_eq!(
            check_answer("FirstBurstLength", "65536", "Irrelevant").unwrap(),
            "65536"
        );
        assert!(matches!(
            check_answer("ErrorRecoveryLevel", "0", "7"),
            Err(NegotiationError::BadValue { .. })
        ));
    }

    #[test]
    fn params_apply_and_clamp_first_burst() {
        let mut p = Params::default();
        p.apply("MaxBurstLength", "4096").unwrap();
        p.apply("FirstBurstLength", "65536").unwrap();
        assert_eq!(p.first_burst_len, 4096);
        p.apply("HeaderDigest", "CRC32C").unwrap();
        assert!(p.digests().header);
        assert!(p.apply("InitialR2T", "maybe").is_err());
    }
}
