//! Strict mode: the embedded target as an initiator checker, in the
//! manner of libiscsi's `iscsi-test-cu`. With
//! [`TargetConfig::strict`](super::TargetConfig::strict) on, every PDU an
//! initiator sends in the full feature phase is checked against the rules
//! an initiator must keep (RFC 7143); the first broken one ends the
//! connection and is recorded as a [`Violation`] naming the rule and its
//! section. Off, none of this runs (one `bool` test per PDU).

use std::fmt;

use crate::wire::iscsi::{Opcode, PduHeader, Sn};

/// A rule an initiator must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A non-immediate PDU's CmdSN is the next one (ExpCmdSN) and within
    /// the window the target opened ([ExpCmdSN, MaxCmdSN]).
    CmdSnWindow,
    /// An immediate PDU carries the CmdSN of the next non-immediate one
    /// (ExpCmdSN) and does not advance it.
    ImmediateCmdSn,
    /// ExpStatSN acknowledges only StatSNs the target sent, and never goes
    /// back.
    ExpStatSn,
    /// DataSN of Data-Out counts 0, 1, 2... within each sequence (one per
    /// R2T, one for the unsolicited data), and the buffer offsets follow on.
    DataSnOrder,
    /// No data segment is longer than the target's
    /// MaxRecvDataSegmentLength (the renegotiated one once the initiator
    /// has seen the Text Response that declared it).
    MaxRecvDataSegmentLength,
    /// Unsolicited data (immediate plus Data-Out without an R2T) stays
    /// within FirstBurstLength.
    FirstBurstLength,
    /// A solicited Data-Out sequence carries no more than its R2T asked
    /// for (Desired Data Transfer Length, itself at most MaxBurstLength).
    MaxBurstLength,
    /// Unsolicited data only as negotiated: immediate data only with
    /// ImmediateData=Yes, Data-Out without R2T only with InitialR2T=No.
    UnsolicitedData,
    /// The F bit: on the last Data-Out of each sequence and only there; on
    /// a SCSI Command unless unsolicited Data-Out follows.
    FinalBit,
    /// Reserved fields are zero.
    ReservedZero,
}

impl Rule {
    /// Every rule, in the order of this enum.
    pub const ALL: [Rule; 10] = [
        Rule::CmdSnWindow,
        Rule::ImmediateCmdSn,
        Rule::ExpStatSn,
        Rule::DataSnOrder,
        Rule::MaxRecvDataSegmentLength,
        Rule::FirstBurstLength,
        Rule::MaxBurstLength,
        Rule::UnsolicitedData,
        Rule::FinalBit,
        Rule::ReservedZero,
    ];

    /// The RFC 7143 section that states the rule.
    pub fn section(self) -> &'static str {
        match self {
            Rule::CmdSnWindow | Rule::ImmediateCmdSn => "4.2.2.1",
            Rule::ExpStatSn => "4.2.2.2",
            Rule::DataSnOrder => "11.7.5",
            Rule::MaxRecvDataSegmentLength => "13.12",
            Rule::FirstBurstLength => "13.14",
            Rule::MaxBurstLength => "13.13",
            Rule::UnsolicitedData => "13.10, 13.11",
            Rule::FinalBit => "11.7.1",
            Rule::ReservedZero => "11",
        }
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Rule::CmdSnWindow => "CmdSN window",
            Rule::ImmediateCmdSn => "immediate CmdSN",
            Rule::ExpStatSn => "ExpStatSN",
            Rule::DataSnOrder => "DataSN order",
            Rule::MaxRecvDataSegmentLength => "MaxRecvDataSegmentLength",
            Rule::FirstBurstLength => "FirstBurstLength",
            Rule::MaxBurstLength => "MaxBurstLength",
            Rule::UnsolicitedData => "InitialR2T/ImmediateData",
            Rule::FinalBit => "F bit",
            Rule::ReservedZero => "reserved fields",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RFC 7143 §{} ({})", self.section(), self.name())
    }
}

/// One broken rule, as strict mode recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    /// The initiator's name (InitiatorName at login).
    pub initiator: String,
    /// What was wrong, with the values seen.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "initiator {:?} broke {}: {}",
            self.initiator, self.rule, self.detail
        )
    }
}

/// Reserved bits and bytes of an initiator PDU's BHS that are set:
/// `(what, value)` of the first, or None.
pub(crate) fn reserved_set(h: &PduHeader, bhs: &[u8]) -> Option<(String, u32)> {
    if bhs.len() < 48 {
        return None;
    }
    // Byte 0: bit 7 is reserved in every PDU (bit 6 is I).
    if bhs[0] & 0x80 != 0 {
        return Some(("byte 0 bit 7".into(), u32::from(bhs[0])));
    }
    // Bits of byte 1 that this opcode leaves reserved, and reserved ranges.
    let (byte1_mask, ranges): (u8, &[(usize, usize)]) = match h {
        // F R W, 2 reserved bits, ATTR (3 bits).
        PduHeader::ScsiCommand(_) => (0x18, &[(2, 4)]),
        // F only.
        PduHeader::DataOut(_) => (0x7f, &[(2, 4), (24, 28), (32, 36), (44, 48)]),
        // Bit 7 is always 1 and the rest reserved.
        PduHeader::NopOut(_) => (0x7f, &[(2, 4), (32, 48)]),
        PduHeader::TextRequest(_) => (0x3f, &[(2, 4), (32, 48)]),
        // Bit 7 always 1, then the function.
        PduHeader::TaskMgmtRequest(_) => (0x00, &[(2, 4), (40, 48)]),
        // Bit 7 always 1, then the reason code (7 bits).
        PduHeader::LogoutRequest(_) => (0x00, &[(2, 4), (8, 16), (22, 24), (32, 48)]),
        _ => (0, &[]),
    };
    if bhs[1] & byte1_mask != 0 {
        return Some((
            format!("byte 1 bits {byte1_mask:#04x}"),
            u32::from(bhs[1] & byte1_mask),
        ));
    }
    for &(a, b) in ranges {
        if let Some(i) = (a..b).find(|&i| bhs[i] != 0) {
            return Some((
                format!("byte {i} (reserved bytes {a}..{b})"),
                u32::from(bhs[i]),
            ));
        }
    }
    None
}

/// The CmdSN and I bit of a PDU that carries one.
pub(crate) fn cmd_sn_of(h: &PduHeader) -> Option<(bool, Sn)> {
    Some(match h {
        PduHeader::ScsiCommand(c) => (c.immediate, c.cmd_sn),
        PduHeader::NopOut(n) => (n.immediate, n.cmd_sn),
        PduHeader::TextRequest(t) => (t.immediate, t.cmd_sn),
        PduHeader::TaskMgmtRequest(t) => (t.immediate, t.cmd_sn),
        PduHeader::LogoutRequest(l) => (l.immediate, l.cmd_sn),
        _ => return None,
    })
}

/// The ExpStatSN of an initiator PDU.
pub(crate) fn exp_stat_sn_of(h: &PduHeader) -> Option<Sn> {
    Some(match h {
        PduHeader::ScsiCommand(c) => c.exp_stat_sn,
        PduHeader::DataOut(d) => d.exp_stat_sn,
        PduHeader::NopOut(n) => n.exp_stat_sn,
        PduHeader::TextRequest(t) => t.exp_stat_sn,
        PduHeader::TaskMgmtRequest(t) => t.exp_stat_sn,
        PduHeader::LogoutRequest(l) => l.exp_stat_sn,
        _ => return None,
    })
}

/// Whether `h` is a NOP-Out answering a target's NOP-In (ITT 0xffffffff).
pub(crate) fn is_ping_answer(h: &PduHeader) -> bool {
    matches!(h, PduHeader::NopOut(n) if n.itt == crate::wire::iscsi::RESERVED_TAG)
}

/// The opcode's name, for details.
pub(crate) fn what(h: &PduHeader) -> &'static str {
    let op: Opcode = h.opcode();
    match op {
        Opcode::ScsiCommand => "SCSI Command",
        Opcode::DataOut => "Data-Out",
        Opcode::NopOut => "NOP-Out",
        Opcode::TextRequest => "Text Request",
        Opcode::TaskMgmtRequest => "Task Management Request",
        Opcode::LogoutRequest => "Logout Request",
        _ => "PDU",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_names_a_section() {
        for r in Rule::ALL {
            let s = r.to_string();
            assert!(s.starts_with("RFC 7143 §"), "{s}");
            assert!(!r.section().is_empty());
        }
    }
}
