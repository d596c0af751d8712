//! Persistent reservations (SPC-4 §5.13, §6.15 PERSISTENT RESERVE IN,
//! §6.16 PERSISTENT RESERVE OUT): the two CDBs, the basic PR OUT
//! parameter list, and the READ KEYS, READ RESERVATION and REPORT
//! CAPABILITIES parameter data. The initiator's library and the embedded
//! target both use these codecs.
#![warn(missing_docs)]

use super::{be16, be32, be64, need, put16, put32, put64, Cdb, DataRepr, ScsiWireError};
use std::fmt;

/// PERSISTENT RESERVE IN operation code.
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
/// PERSISTENT RESERVE OUT operation code.
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;

/// PERSISTENT RESERVE IN service actions (SPC-4 table 167).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrInAction {
    /// Every registered reservation key.
    ReadKeys,
    /// The reservation, if any: its holder's key, scope and type.
    ReadReservation,
    /// What the device server supports.
    ReportCapabilities,
    /// Registrations with their transport IDs (not built by this crate;
    /// decoded so a target can refuse it by name).
    ReadFullStatus,
}

impl PrInAction {
    /// The 5-bit service action code.
    pub fn code(self) -> u8 {
        match self {
            PrInAction::ReadKeys => 0,
            PrInAction::ReadReservation => 1,
            PrInAction::ReportCapabilities => 2,
            PrInAction::ReadFullStatus => 3,
        }
    }
    /// The action for a service action code.
    pub fn from_code(sa: u8) -> Result<PrInAction, ScsiWireError> {
        Ok(match sa & 0x1f {
            0 => PrInAction::ReadKeys,
            1 => PrInAction::ReadReservation,
            2 => PrInAction::ReportCapabilities,
            3 => PrInAction::ReadFullStatus,
            sa => {
                return Err(ScsiWireError::UnknownServiceAction {
                    opcode: PERSISTENT_RESERVE_IN,
                    sa,
                })
            }
        })
    }
}

/// PERSISTENT RESERVE OUT service actions (SPC-4 table 176).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrOutAction {
    /// Register a key (reservation key must match the current one, or be
    /// 0 when the I_T nexus is not registered); a service action key of 0
    /// unregisters.
    Register,
    /// Take the reservation of the given type.
    Reserve,
    /// Give the reservation up.
    Release,
    /// Remove every registration and the reservation.
    Clear,
    /// Remove the registrations with the service action key; take over the
    /// reservation if that key held it.
    Preempt,
    /// As `Preempt`, and abort every task of the preempted I_T nexuses.
    PreemptAndAbort,
    /// Register, whatever key the I_T nexus had.
    RegisterAndIgnoreExistingKey,
    /// Register another I_T nexus and move the reservation to it (decoded
    /// so a target can refuse it by name; not built by this crate).
    RegisterAndMove,
}

impl PrOutAction {
    /// The 5-bit service action code.
    pub fn code(self) -> u8 {
        match self {
            PrOutAction::Register => 0,
            PrOutAction::Reserve => 1,
            PrOutAction::Release => 2,
            PrOutAction::Clear => 3,
            PrOutAction::Preempt => 4,
            PrOutAction::PreemptAndAbort => 5,
            PrOutAction::RegisterAndIgnoreExistingKey => 6,
            PrOutAction::RegisterAndMove => 7,
        }
    }
    /// The action for a service action code.
    pub fn from_code(sa: u8) -> Result<PrOutAction, ScsiWireError> {
        Ok(match sa & 0x1f {
            0 => PrOutAction::Register,
            1 => PrOutAction::Reserve,
            2 => PrOutAction::Release,
            3 => PrOutAction::Clear,
            4 => PrOutAction::Preempt,
            5 => PrOutAction::PreemptAndAbort,
            6 => PrOutAction::RegisterAndIgnoreExistingKey,
            7 => PrOutAction::RegisterAndMove,
            sa => {
                return Err(ScsiWireError::UnknownServiceAction {
                    opcode: PERSISTENT_RESERVE_OUT,
                    sa,
                })
            }
        })
    }
    /// Whether the TYPE field of the CDB matters (RESERVE, RELEASE,
    /// PREEMPT, PREEMPT AND ABORT).
    pub fn uses_type(self) -> bool {
        matches!(
            self,
            PrOutAction::Reserve
                | PrOutAction::Release
                | PrOutAction::Preempt
                | PrOutAction::PreemptAndAbort
        )
    }
}

/// Persistent reservation types (SPC-4 table 169).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrType {
    /// WE: only the holder writes; everybody reads.
    WriteExclusive,
    /// EA: only the holder reads or writes.
    ExclusiveAccess,
    /// WE-RO: registrants write; everybody reads.
    WriteExclusiveRegistrantsOnly,
    /// EA-RO: only registrants read or write.
    ExclusiveAccessRegistrantsOnly,
    /// WE-AR: every registrant is a holder; everybody reads.
    WriteExclusiveAllRegistrants,
    /// EA-AR: every registrant is a holder; only they read or write.
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    /// Every type, in code order.
    pub const ALL: [PrType; 6] = [
        PrType::WriteExclusive,
        PrType::ExclusiveAccess,
        PrType::WriteExclusiveRegistrantsOnly,
        PrType::ExclusiveAccessRegistrantsOnly,
        PrType::WriteExclusiveAllRegistrants,
        PrType::ExclusiveAccessAllRegistrants,
    ];
    /// The 4-bit TYPE code.
    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 1,
            PrType::ExclusiveAccess => 3,
            PrType::WriteExclusiveRegistrantsOnly => 5,
            PrType::ExclusiveAccessRegistrantsOnly => 6,
            PrType::WriteExclusiveAllRegistrants => 7,
            PrType::ExclusiveAccessAllRegistrants => 8,
        }
    }
    /// The type for a TYPE code; `None` for obsolete or reserved codes.
    pub fn from_code(code: u8) -> Option<PrType> {
        PrType::ALL.into_iter().find(|t| t.code() == code & 0x0f)
    }
    /// Exclusive access: non-holders (or non-registrants) may not read.
    pub fn is_exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
    /// Every registrant may access the medium (RO and AR types).
    pub fn registrants_have_access(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }
    /// Every registrant holds the reservation (AR types).
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }
    /// The short name multipath-tools and sg_persist print (WE, EA-RO, ...).
    pub fn short_name(self) -> &'static str {
        match self {
            PrType::WriteExclusive => "WE",
            PrType::ExclusiveAccess => "EA",
            PrType::WriteExclusiveRegistrantsOnly => "WE-RO",
            PrType::ExclusiveAccessRegistrantsOnly => "EA-RO",
            PrType::WriteExclusiveAllRegistrants => "WE-AR",
            PrType::ExclusiveAccessAllRegistrants => "EA-AR",
        }
    }
    /// Bit of this type in REPORT CAPABILITIES' type mask (byte 4 high, 5 low).
    fn mask_bit(self) -> u16 {
        match self {
            PrType::WriteExclusiveAllRegistrants => 0x8000,
            PrType::ExclusiveAccessRegistrantsOnly => 0x4000,
            PrType::WriteExclusiveRegistrantsOnly => 0x2000,
            PrType::ExclusiveAccess => 0x0800,
            PrType::WriteExclusive => 0x0200,
            PrType::ExclusiveAccessAllRegistrants => 0x0001,
        }
    }
}

impl fmt::Display for PrType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

impl std::str::FromStr for PrType {
    type Err = String;
    fn from_str(s: &str) -> Result<PrType, String> {
        PrType::ALL
            .into_iter()
            .find(|t| t.short_name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown reservation type {s:?} (WE, EA, WE-RO, EA-RO, WE-AR, EA-AR)")
            })
    }
}

/// PERSISTENT RESERVE IN CDB (10 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrInCdb {
    /// Service action.
    pub action: PrInAction,
    /// Allocation length in bytes.
    pub alloc_len: u16,
}

impl PrInCdb {
    /// Decode (bytes may be padded to 16).
    pub fn parse(b: &[u8]) -> Result<PrInCdb, ScsiWireError> {
        need("PERSISTENT RESERVE IN CDB", b, 10)?;
        if b[0] != PERSISTENT_RESERVE_IN {
            return Err(ScsiWireError::UnknownOpcode(b[0]));
        }
        Ok(PrInCdb {
            action: PrInAction::from_code(b[1])?,
            alloc_len: be16(b, 7).unwrap_or(0),
        })
    }
    /// Build the CDB.
    pub fn emit(&self) -> Cdb {
        let mut b = [0u8; 16];
        b[0] = PERSISTENT_RESERVE_IN;
        b[1] = self.action.code();
        put16(&mut b, 7, self.alloc_len);
        Cdb { bytes: b, len: 10 }
    }
}

/// PERSISTENT RESERVE OUT CDB (10 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrOutCdb {
    /// Service action.
    pub action: PrOutAction,
    /// SCOPE (4 bits): 0 is the whole logical unit, the only scope SPC-4
    /// still defines.
    pub scope: u8,
    /// TYPE (4 bits), raw so a target can refuse a bad one; see
    /// [`PrOutCdb::pr_type`].
    pub type_code: u8,
    /// Parameter list length (24 for the basic list).
    pub param_len: u32,
}

impl PrOutCdb {
    /// A CDB for `action` with the basic 24-byte parameter list; `pr_type`
    /// is ignored by the actions that have no type.
    pub fn new(action: PrOutAction, pr_type: Option<PrType>) -> PrOutCdb {
        PrOutCdb {
            action,
            scope: 0,
            type_code: pr_type.map_or(0, PrType::code),
            param_len: PrOutParams::LEN as u32,
        }
    }
    /// The reservation type, when the TYPE code is a valid one.
    pub fn pr_type(&self) -> Option<PrType> {
        PrType::from_code(self.type_code)
    }
    /// Decode (bytes may be padded to 16).
    pub fn parse(b: &[u8]) -> Result<PrOutCdb, ScsiWireError> {
        need("PERSISTENT RESERVE OUT CDB", b, 10)?;
        if b[0] != PERSISTENT_RESERVE_OUT {
            return Err(ScsiWireError::UnknownOpcode(b[0]));
        }
        Ok(PrOutCdb {
            action: PrOutAction::from_code(b[1])?,
            scope: b[2] >> 4,
            type_code: b[2] & 0x0f,
            param_len: be32(b, 5).unwrap_or(0),
        })
    }
    /// Build the CDB.
    pub fn emit(&self) -> Cdb {
        let mut b = [0u8; 16];
        b[0] = PERSISTENT_RESERVE_OUT;
        b[1] = self.action.code();
        b[2] = (self.scope & 0x0f) << 4 | (self.type_code & 0x0f);
        put32(&mut b, 5, self.param_len);
        Cdb { bytes: b, len: 10 }
    }
}

/// The basic PERSISTENT RESERVE OUT parameter list (SPC-4 §6.16.3, 24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PrOutParams {
    /// RESERVATION KEY: the key this I_T nexus is registered with (0 if none).
    pub key: u64,
    /// SERVICE ACTION RESERVATION KEY: the new key (REGISTER) or the key to
    /// preempt (PREEMPT).
    pub sa_key: u64,
    /// SPEC_I_PT: register the initiator ports named in an additional list.
    pub spec_i_pt: bool,
    /// ALL_TG_PT: register on every target port.
    pub all_tg_pt: bool,
    /// APTPL: keep the registrations over a power loss.
    pub aptpl: bool,
}

impl PrOutParams {
    /// Length of the basic parameter list.
    pub const LEN: usize = 24;
}

impl DataRepr for PrOutParams {
    fn parse(b: &[u8]) -> Result<PrOutParams, ScsiWireError> {
        need("PERSISTENT RESERVE OUT parameter list", b, Self::LEN)?;
        Ok(PrOutParams {
            key: be64(b, 0).unwrap_or(0),
            sa_key: be64(b, 8).unwrap_or(0),
            spec_i_pt: b[20] & 0x08 != 0,
            all_tg_pt: b[20] & 0x04 != 0,
            aptpl: b[20] & 0x01 != 0,
        })
    }
    fn buffer_len(&self) -> usize {
        Self::LEN
    }
    fn emit_exact(&self, b: &mut [u8]) {
        put64(b, 0, self.key);
        put64(b, 8, self.sa_key);
        b[20] =
            u8::from(self.spec_i_pt) << 3 | u8::from(self.all_tg_pt) << 2 | u8::from(self.aptpl);
    }
}

/// READ KEYS parameter data: the generation and every registered key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PrKeys {
    /// PRgeneration: bumped by every registration change.
    pub generation: u32,
    /// One entry per registered I_T nexus (a key may appear more than once).
    pub keys: Vec<u64>,
}

impl DataRepr for PrKeys {
    /// A short allocation length cuts the list: the keys that fit are
    /// kept (the ADDITIONAL LENGTH tells how many there were).
    fn parse(b: &[u8]) -> Result<PrKeys, ScsiWireError> {
        need("READ KEYS data", b, 8)?;
        let len = be32(b, 4).unwrap_or(0) as usize;
        let list = &b[8..];
        let n = len.min(list.len()) / 8;
        Ok(PrKeys {
            generation: be32(b, 0).unwrap_or(0),
            keys: (0..n).filter_map(|i| be64(list, i * 8)).collect(),
        })
    }
    fn buffer_len(&self) -> usize {
        8 + 8 * self.keys.len()
    }
    fn emit_exact(&self, b: &mut [u8]) {
        put32(b, 0, self.generation);
        put32(b, 4, (8 * self.keys.len()).min(u32::MAX as usize) as u32);
        for (i, k) in self.keys.iter().enumerate() {
            put64(b, 8 + 8 * i, *k);
        }
    }
}

/// The reservation READ RESERVATION reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrHolder {
    /// The holder's key (0 for the all-registrants types).
    pub key: u64,
    /// SCOPE (0: logical unit).
    pub scope: u8,
    /// TYPE code, raw; [`PrHolder::pr_type`] decodes it.
    pub type_code: u8,
}

impl PrHolder {
    /// The reservation type, when the code is a valid one.
    pub fn pr_type(&self) -> Option<PrType> {
        PrType::from_code(self.type_code)
    }
}

/// READ RESERVATION parameter data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PrReservation {
    /// PRgeneration.
    pub generation: u32,
    /// The reservation, `None` when the LU is not reserved.
    pub reservation: Option<PrHolder>,
}

impl DataRepr for PrReservation {
    fn parse(b: &[u8]) -> Result<PrReservation, ScsiWireError> {
        need("READ RESERVATION data", b, 8)?;
        let len = be32(b, 4).unwrap_or(0);
        let reservation = if len == 0 {
            None
        } else {
            need("READ RESERVATION descriptor", b, 22)?;
            Some(PrHolder {
                key: be64(b, 8).unwrap_or(0),
                scope: b[21] >> 4,
                type_code: b[21] & 0x0f,
            })
        };
        Ok(PrReservation {
            generation: be32(b, 0).unwrap_or(0),
            reservation,
        })
    }
    fn buffer_len(&self) -> usize {
        if self.reservation.is_some() {
            24
        } else {
            8
        }
    }
    fn emit_exact(&self, b: &mut [u8]) {
        put32(b, 0, self.generation);
        if let Some(r) = self.reservation {
            put32(b, 4, 16);
            put64(b, 8, r.key);
            b[21] = (r.scope & 0x0f) << 4 | (r.type_code & 0x0f);
        }
    }
}

/// REPORT CAPABILITIES parameter data (SPC-4 §6.15.4).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PrCapabilities {
    /// RLR_C: replace lost reservation capable.
    pub replace_lost_reservation: bool,
    /// CRH: compatible reservation handling (RESERVE(6)/(10) with PR).
    pub compatible_reservation_handling: bool,
    /// SIP_C: SPEC_I_PT supported.
    pub specify_initiator_ports: bool,
    /// ATP_C: ALL_TG_PT supported.
    pub all_target_ports: bool,
    /// PTPL_C: persist through power loss supported.
    pub persist_through_power_loss: bool,
    /// TMV: the type mask is valid.
    pub type_mask_valid: bool,
    /// ALLOW COMMANDS (3 bits).
    pub allow_commands: u8,
    /// PTPL_A: persist through power loss is active.
    pub persist_active: bool,
    /// The types supported (when `type_mask_valid`).
    pub types: Vec<PrType>,
}

impl DataRepr for PrCapabilities {
    fn parse(b: &[u8]) -> Result<PrCapabilities, ScsiWireError> {
        need("REPORT CAPABILITIES data", b, 6)?;
        let mask = be16(b, 4).unwrap_or(0);
        Ok(PrCapabilities {
            replace_lost_reservation: b[2] & 0x80 != 0,
            compatible_reservation_handling: b[2] & 0x10 != 0,
            specify_initiator_ports: b[2] & 0x08 != 0,
            all_target_ports: b[2] & 0x04 != 0,
            persist_through_power_loss: b[2] & 0x01 != 0,
            type_mask_valid: b[3] & 0x80 != 0,
            allow_commands: (b[3] >> 4) & 7,
            persist_active: b[3] & 0x01 != 0,
            types: PrType::ALL
                .into_iter()
                .filter(|t| mask & t.mask_bit() != 0)
                .collect(),
        })
    }
    fn buffer_len(&self) -> usize {
        8
    }
    fn emit_exact(&self, b: &mut [u8]) {
        put16(b, 0, 8);
        b[2] = u8::from(self.replace_lost_reservation) << 7
            | u8::from(self.compatible_reservation_handling) << 4
            | u8::from(self.specify_initiator_ports) << 3
            | u8::from(self.all_target_ports) << 2
            | u8::from(self.persist_through_power_loss);
        b[3] = u8::from(self.type_mask_valid) << 7
            | (self.allow_commands & 7) << 4
            | u8::from(self.persist_active);
        let mask = self.types.iter().fold(0u16, |m, t| m | t.mask_bit());
        put16(b, 4, mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cdbs_round_trip_and_lay_out_as_spc4_says() {
        let c = PrInCdb {
            action: PrInAction::ReadReservation,
            alloc_len: 0x1234,
        };
        let b = c.emit();
        assert_eq!(b.as_slice(), &[0x5e, 1, 0, 0, 0, 0, 0, 0x12, 0x34, 0]);
        assert_eq!(PrInCdb::parse(b.as_slice()), Ok(c));
        let c = PrOutCdb::new(
            PrOutAction::PreemptAndAbort,
            Some(PrType::WriteExclusiveRegistrantsOnly),
        );
        let b = c.emit();
        assert_eq!(b.as_slice(), &[0x5f, 5, 0x05, 0, 0, 0, 0, 0, 24, 0]);
        assert_eq!(PrOutCdb::parse(b.as_slice()), Ok(c));
        assert_eq!(c.pr_type(), Some(PrType::WriteExclusiveRegistrantsOnly));
        assert!(matches!(
            PrInCdb::parse(&[0x5e, 9, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(ScsiWireError::UnknownServiceAction { sa: 9, .. })
        ));
        assert!(PrOutCdb::parse(&[0x5f, 0]).is_err());
    }

    #[test]
    fn types_have_their_codes_and_names() {
        let codes: Vec<u8> = PrType::ALL.iter().map(|t| t.code()).collect();
        assert_eq!(codes, [1, 3, 5, 6, 7, 8]);
        for t in PrType::ALL {
            assert_eq!(PrType::from_code(t.code()), Some(t));
            assert_eq!(t.short_name().parse::<PrType>(), Ok(t));
        }
        assert_eq!(PrType::from_code(0), None);
        assert_eq!(PrType::from_code(2), None);
        assert!("XX".parse::<PrType>().is_err());
    }

    #[test]
    fn parameter_data_layouts() {
        let p = PrOutParams {
            key: 0x1122_3344_5566_7788,
            sa_key: 0xabcd,
            all_tg_pt: true,
            ..Default::default()
        };
        let v = p.to_vec();
        assert_eq!(&v[..8], &0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(v[20], 0x04);
        assert_eq!(PrOutParams::parse(&v), Ok(p));
        assert!(PrOutParams::parse(&v[..23]).is_err());

        let k = PrKeys {
            generation: 7,
            keys: vec![1, 2, 3],
        };
        let v = k.to_vec();
        assert_eq!(&v[..8], &[0, 0, 0, 7, 0, 0, 0, 24]);
        assert_eq!(PrKeys::parse(&v), Ok(k));
        // Truncated by a short allocation length: the keys that fit.
        assert_eq!(PrKeys::parse(&v[..20]).unwrap().keys, vec![1]);

        let r = PrReservation {
            generation: 3,
            reservation: Some(PrHolder {
                key: 9,
                scope: 0,
                type_code: PrType::ExclusiveAccess.code(),
            }),
        };
        let v = r.to_vec();
        assert_eq!(v.len(), 24);
        assert_eq!(v[21], 0x03);
        assert_eq!(PrReservation::parse(&v), Ok(r));
        let none = PrReservation {
            generation: 3,
            reservation: None,
        };
        assert_eq!(PrReservation::parse(&none.to_vec()), Ok(none));

        let c = PrCapabilities {
            type_mask_valid: true,
            types: PrType::ALL.to_vec(),
            ..Default::default()
        };
        let v = c.to_vec();
        assert_eq!(v, [0, 8, 0, 0x80, 0xea, 0x01, 0, 0]);
        assert_eq!(PrCapabilities::parse(&v), Ok(c));
    }

    proptest! {
        #[test]
        fn parsers_never_panic_and_reparse_what_they_emit(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(x) = PrKeys::parse(&b) { prop_assert_eq!(PrKeys::parse(&x.to_vec()), Ok(x)); }
            if let Ok(x) = PrReservation::parse(&b) { prop_assert_eq!(PrReservation::parse(&x.to_vec()), Ok(x)); }
            if let Ok(x) = PrCapabilities::parse(&b) { prop_assert_eq!(PrCapabilities::parse(&x.to_vec()), Ok(x)); }
            if let Ok(x) = PrOutParams::parse(&b) { prop_assert_eq!(PrOutParams::parse(&x.to_vec()), Ok(x)); }
            if let Ok(x) = PrInCdb::parse(&b) { prop_assert_eq!(PrInCdb::parse(x.emit().as_slice()), Ok(x)); }
            if let Ok(x) = PrOutCdb::parse(&b) { prop_assert_eq!(PrOutCdb::parse(x.emit().as_slice()), Ok(x)); }
        }
    }
}
