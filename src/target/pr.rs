//! Persistent reservations of one logical unit (SPC-4 §5.13), per I_T
//! nexus: registrations, the reservation, who may read or write, and the
//! PERSISTENT RESERVE IN/OUT service actions. Sans-IO: the connection
//! decodes the CDB and parameter list with `wire::scsi::pr`, calls in here
//! under the LU's lock, and carries out the answer (data, GOOD,
//! RESERVATION CONFLICT or CHECK CONDITION, and for PREEMPT AND ABORT the
//! aborting of the preempted nexuses' tasks).
//!
//! Not persisted (no APTPL), no SPEC_I_PT, ALL_TG_PT or REGISTER AND MOVE
//! (REPORT CAPABILITIES says so).

use super::scsi::Sense;
use crate::wire::scsi::pr::{
    PrCapabilities, PrHolder, PrKeys, PrOutAction, PrOutCdb, PrOutParams, PrReservation, PrType,
};

/// An I_T nexus as reservations know it: the initiator port (iSCSI name
/// plus ISID) and the target port (portal group tag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItNexus {
    /// The iSCSI initiator name.
    pub initiator: String,
    /// The session's ISID.
    pub isid: [u8; 6],
    /// The target portal group tag of the portal it logged in to.
    pub tpgt: u16,
}

/// PERSISTENT RESERVE IN operation code.
pub const PERSISTENT_RESERVE_IN: u8 = crate::wire::scsi::pr::PERSISTENT_RESERVE_IN;
/// PERSISTENT RESERVE OUT operation code.
pub const PERSISTENT_RESERVE_OUT: u8 = crate::wire::scsi::pr::PERSISTENT_RESERVE_OUT;

/// Why a command is not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrRefusal {
    /// RESERVATION CONFLICT status.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h).
pub const INVALID_RELEASE: Sense = Sense {
    key: crate::wire::scsi::SenseKey::IllegalRequest,
    asc: 0x26,
    ascq: 0x04,
    information: None,
    sense_key_specific: None,
};

/// How a command meets a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed under every reservation (INQUIRY, REPORT LUNS, TEST UNIT
    /// READY, READ CAPACITY, MODE SENSE, PR IN/OUT, ...).
    Always,
    /// Reads the medium (READ, VERIFY).
    Read,
    /// Changes the medium or the LU (WRITE, WRITE SAME, UNMAP, COMPARE
    /// AND WRITE, SYNCHRONIZE CACHE, ...).
    Write,
}

/// The access class of a CDB's operation code.
pub fn access_of(opcode: u8) -> Access {
    match opcode {
        // TEST UNIT READY, REQUEST SENSE, INQUIRY, MODE SENSE(6/10), READ
        // CAPACITY(10), SERVICE ACTION IN (READ CAPACITY(16)), REPORT
        // LUNS, MAINTENANCE IN (REPORT TARGET PORT GROUPS), PR IN, PR OUT.
        0x00 | 0x03 | 0x12 | 0x1a | 0x5a | 0x25 | 0x9e | 0xa0 | 0xa3 | 0x5e | 0x5f => {
            Access::Always
        }
        // READ(6/10/12/16), VERIFY(10/12/16).
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f => Access::Read,
        _ => Access::Write,
    }
}

/// One logical unit's persistent reservation state.
#[derive(Debug, Default)]
pub struct Reservations {
    generation: u32,
    /// Registered I_T nexuses and their keys, in registration order.
    registrations: Vec<(ItNexus, u64)>,
    /// The reservation: the nexus that took it, and its type. For the
    /// all-registrants types every registrant holds it.
    reservation: Option<(ItNexus, PrType)>,
    /// PREEMPT AND ABORTs so far.
    aborts: u64,
    /// Nexuses whose tasks a PREEMPT AND ABORT aborted: the count of
    /// aborts just after it.
    aborted: Vec<(ItNexus, u64)>,
}

impl Reservations {
    /// Whether anybody is registered or holds a reservation (when not, no
    /// command can conflict).
    pub fn is_active(&self) -> bool {
        !self.registrations.is_empty() || self.reservation.is_some()
    }

    /// PREEMPT AND ABORTs so far (a task started when this was `n` is
    /// aborted if [`aborted_since`](Self::aborted_since)`(nexus, n)`).
    pub fn aborts(&self) -> u64 {
        self.aborts
    }

    /// Whether a PREEMPT AND ABORT after the `seen`th aborted `nexus`'s tasks.
    pub fn aborted_since(&self, nexus: &ItNexus, seen: u64) -> bool {
        self.aborted.iter().any(|(n, at)| n == nexus && *at > seen)
    }

    /// The key `nexus` is registered with.
    pub fn key_of(&self, nexus: &ItNexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(n, _)| n == nexus)
            .map(|(_, k)| *k)
    }

    fn is_holder(&self, nexus: &ItNexus) -> bool {
        match &self.reservation {
            Some((_, t)) if t.all_registrants() => self.key_of(nexus).is_some(),
            Some((holder, _)) => holder == nexus,
            None => false,
        }
    }

    /// May `nexus` run a command of class `access`? (SPC-4 §5.13.1 and
    /// its tables of allowed commands.)
    pub fn allows(&self, nexus: &ItNexus, access: Access) -> bool {
        let Some((_, t)) = &self.reservation else {
            return true;
        };
        if access == Access::Always || self.is_holder(nexus) {
            return true;
        }
        if t.registrants_have_access() && self.key_of(nexus).is_some() {
            return true;
        }
        access == Access::Read && !t.is_exclusive_access()
    }

    /// READ KEYS.
    pub fn read_keys(&self) -> PrKeys {
        PrKeys {
            generation: self.generation,
            keys: self.registrations.iter().map(|(_, k)| *k).collect(),
        }
    }

    /// READ RESERVATION (the key is 0 for the all-registrants types).
    pub fn read_reservation(&self) -> PrReservation {
        PrReservation {
            generation: self.generation,
            reservation: self.reservation.as_ref().map(|(holder, t)| PrHolder {
                key: if t.all_registrants() {
                    0
                } else {
                    self.key_of(holder).unwrap_or(0)
                },
                scope: 0,
                type_code: t.code(),
            }),
        }
    }

    /// READ FULL STATUS (SPC-4 §6.15.5): one descriptor per registration,
    /// with the initiator port's iSCSI TransportID (format 01h: name,
    /// ",i,0x" and the ISID).
    pub fn read_full_status(&self) -> Vec<u8> {
        let mut out = vec![0u8; 8];
        out[..4].copy_from_slice(&self.generation.to_be_bytes());
        for (n, key) in &self.registrations {
            let mut tid = format!("{},i,0x", n.initiator).into_bytes();
            for b in n.isid {
                tid.extend_from_slice(format!("{b:02x}").as_bytes());
            }
            tid.push(0);
            tid.resize(tid.len().div_ceil(4) * 4, 0);
            let mut d = vec![0u8; 24];
            d[..8].copy_from_slice(&key.to_be_bytes());
            if let Some((_, t)) = &self.reservation {
                if self.is_holder(n) {
                    d[12] = 0x01;
                    d[13] = t.code();
                }
            }
            d[18..20].copy_from_slice(&n.tpgt.to_be_bytes());
            d[20..24].copy_from_slice(&(4 + tid.len() as u32).to_be_bytes());
            d.push(0x45); // FORMAT CODE 01b, PROTOCOL IDENTIFIER 5 (iSCSI)
            d.push(0);
            d.extend_from_slice(&(tid.len() as u16).to_be_bytes());
            d.extend_from_slice(&tid);
            out.extend_from_slice(&d);
        }
        let len = (out.len() - 8) as u32;
        out[4..8].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// REPORT CAPABILITIES: every type, nothing else.
    pub fn capabilities() -> PrCapabilities {
        PrCapabilities {
            type_mask_valid: true,
            types: PrType::ALL.to_vec(),
            ..PrCapabilities::default()
        }
    }

    /// Runs a PERSISTENT RESERVE OUT from `nexus`. `params` is the raw
    /// parameter list. Returns the nexuses whose tasks must be aborted
    /// (PREEMPT AND ABORT; never `nexus` itself).
    pub fn reserve_out(
        &mut self,
        nexus: &ItNexus,
        cdb: &PrOutCdb,
        params: &[u8],
    ) -> Result<Vec<ItNexus>, PrRefusal> {
        use crate::wire::scsi::DataRepr;
        let check = |s: Sense| Err(PrRefusal::Check(s));
        if cdb.param_len as usize != PrOutParams::LEN || params.len() != PrOutParams::LEN {
            return check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let Ok(p) = PrOutParams::parse(params) else {
            return check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        };
        if p.spec_i_pt || p.all_tg_pt || p.aptpl {
            return check(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        let mine = self.key_of(nexus);
        match cdb.action {
            PrOutAction::Register | PrOutAction::RegisterAndIgnoreExistingKey => {
                let ignore = cdb.action == PrOutAction::RegisterAndIgnoreExistingKey;
                if !ignore && p.key != mine.unwrap_or(0) {
                    return Err(PrRefusal::Conflict);
                }
                match (mine, p.sa_key) {
                    (None, 0) => {}
                    (None, k) => {
                        self.registrations.push((nexus.clone(), k));
                        self.generation = self.generation.wrapping_add(1);
                    }
                    (Some(_), 0) => {
                        self.unregister(nexus);
                        self.generation = self.generation.wrapping_add(1);
                    }
                    (Some(_), k) => {
                        for r in self.registrations.iter_mut().filter(|(n, _)| n == nexus) {
                            r.1 = k;
                        }
                        self.generation = self.generation.wrapping_add(1);
                    }
                }
                Ok(Vec::new())
            }
            PrOutAction::RegisterAndMove => check(Sense::INVALID_FIELD_IN_CDB),
            _ if mine != Some(p.key) => Err(PrRefusal::Conflict),
            PrOutAction::Reserve => {
                let t = Self::scope_and_type(cdb)?;
                match &self.reservation {
                    None => {
                        self.reservation = Some((nexus.clone(), t));
                        Ok(Vec::new())
                    }
                    Some((_, held)) if *held == t && self.is_holder(nexus) => Ok(Vec::new()),
                    Some(_) => Err(PrRefusal::Conflict),
                }
            }
            PrOutAction::Release => {
                if !self.is_holder(nexus) {
                    return Ok(Vec::new());
                }
                let t = Self::scope_and_type(cdb)?;
                if self.reservation.as_ref().map(|(_, h)| *h) != Some(t) {
                    return check(INVALID_RELEASE);
                }
                self.reservation = None;
                Ok(Vec::new())
            }
            PrOutAction::Clear => {
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(Vec::new())
            }
            PrOutAction::Preempt | PrOutAction::PreemptAndAbort => {
                let victims = self.preempt(nexus, cdb, p.sa_key)?;
                self.generation = self.generation.wrapping_add(1);
                if cdb.action == PrOutAction::Preempt {
                    return Ok(Vec::new());
                }
                self.aborts += 1;
                let at = self.aborts;
                self.aborted.retain(|(n, _)| !victims.contains(n));
                self.aborted.extend(victims.iter().map(|n| (n.clone(), at)));
                Ok(victims)
            }
        }
    }

    fn scope_and_type(cdb: &PrOutCdb) -> Result<PrType, PrRefusal> {
        match cdb.pr_type() {
            Some(t) if cdb.scope == 0 => Ok(t),
            _ => Err(PrRefusal::Check(Sense::INVALID_FIELD_IN_CDB)),
        }
    }

    /// Removes `nexus`'s registration; a holder's reservation goes with it
    /// (for the all-registrants types, with the last registrant).
    fn unregister(&mut self, nexus: &ItNexus) {
        self.registrations.retain(|(n, _)| n != nexus);
        let release = match &self.reservation {
            Some((_, t)) if t.all_registrants() => self.registrations.is_empty(),
            Some((holder, _)) => holder == nexus,
            None => false,
        };
        if release {
            self.reservation = None;
        }
    }

    /// PREEMPT (SPC-4 §5.13.11.2): the preempted nexuses.
    fn preempt(
        &mut self,
        nexus: &ItNexus,
        cdb: &PrOutCdb,
        sa_key: u64,
    ) -> Result<Vec<ItNexus>, PrRefusal> {
        let holder_key = match &self.reservation {
            None => None,
            Some((_, t)) if t.all_registrants() => Some(0),
            Some((h, _)) => self.key_of(h),
        };
        let take_over = match (&self.reservation, holder_key) {
            // All registrants hold it: a key of 0 preempts all of them.
            (Some((_, t)), _) if t.all_registrants() => sa_key == 0,
            (Some(_), Some(k)) => k == sa_key,
            _ => false,
        };
        if !take_over && sa_key == 0 {
            return Err(PrRefusal::Check(Sense::INVALID_FIELD_IN_PARAMETERS));
        }
        let t = if take_over {
            Some(Self::scope_and_type(cdb)?)
        } else {
            None
        };
        let all = take_over && sa_key == 0;
        let victims: Vec<ItNexus> = self
            .registrations
            .iter()
            .filter(|(n, k)| n != nexus && (all || *k == sa_key))
            .map(|(n, _)| n.clone())
            .collect();
        if victims.is_empty() && !take_over {
            return Err(PrRefusal::Conflict);
        }
        self.registrations.retain(|(n, _)| !victims.contains(n));
        if let Some(t) = t {
            self.reservation = Some((nexus.clone(), t));
        } else if let Some((h, ty)) = &self.reservation {
            // The holder lost its registration: its reservation goes too.
            let gone = if ty.all_registrants() {
                self.registrations.is_empty()
            } else {
                victims.contains(h)
            };
            if gone {
                self.reservation = None;
            }
        }
        Ok(victims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::scsi::DataRepr;

    fn nexus(name: &str, isid: u8) -> ItNexus {
        ItNexus {
            initiator: name.into(),
            isid: [0x80, 0, 0, 0, 0, isid],
            tpgt: 1,
        }
    }

    fn out(
        r: &mut Reservations,
        n: &ItNexus,
        action: PrOutAction,
        t: Option<PrType>,
        key: u64,
        sa_key: u64,
    ) -> Result<Vec<ItNexus>, PrRefusal> {
        let params = PrOutParams {
            key,
            sa_key,
            ..Default::default()
        }
        .to_vec();
        r.reserve_out(n, &PrOutCdb::new(action, t), &params)
    }

    use PrOutAction::*;

    #[test]
    fn register_reserve_release_and_access_per_type() {
        let (a, b, c) = (nexus("a", 1), nexus("b", 2), nexus("c", 3));
        for t in PrType::ALL {
            let mut r = Reservations::default();
            assert_eq!(out(&mut r, &a, Register, None, 0, 0xa), Ok(vec![]));
            assert_eq!(out(&mut r, &b, Register, None, 0, 0xb), Ok(vec![]));
            assert_eq!(r.read_keys().keys, vec![0xa, 0xb]);
            assert_eq!(r.read_keys().generation, 2);
            // A wrong key is a conflict, and so is reserving unregistered.
            assert_eq!(
                out(&mut r, &a, Reserve, Some(t), 0xb, 0),
                Err(PrRefusal::Conflict)
            );
            assert_eq!(
                out(&mut r, &c, Reserve, Some(t), 0, 0),
                Err(PrRefusal::Conflict)
            );
            assert_eq!(out(&mut r, &a, Reserve, Some(t), 0xa, 0), Ok(vec![]));
            // Reserving again with the same type is fine; another is not.
            assert_eq!(out(&mut r, &a, Reserve, Some(t), 0xa, 0), Ok(vec![]));
            let res = r.read_reservation().reservation.unwrap();
            assert_eq!(res.pr_type(), Some(t));
            assert_eq!(res.key, if t.all_registrants() { 0 } else { 0xa });
            assert!(r.allows(&a, Access::Write) && r.allows(&a, Access::Read));
            // b is registered, c is not.
            let b_writes = t.registrants_have_access();
            assert_eq!(r.allows(&b, Access::Write), b_writes, "{t}");
            assert_eq!(
                r.allows(&b, Access::Read),
                b_writes || !t.is_exclusive_access(),
                "{t}"
            );
            assert!(!r.allows(&c, Access::Write), "{t}");
            assert_eq!(r.allows(&c, Access::Read), !t.is_exclusive_access(), "{t}");
            assert!(r.allows(&c, Access::Always));
            // Releasing with another type is refused by the holder.
            let other = PrType::ALL.into_iter().find(|o| *o != t).unwrap();
            assert_eq!(
                out(&mut r, &a, Release, Some(other), 0xa, 0),
                Err(PrRefusal::Check(INVALID_RELEASE))
            );
            // A non-holder's release does nothing (for AR, b is a holder).
            assert_eq!(out(&mut r, &b, Release, Some(t), 0xb, 0), Ok(vec![]));
            assert_eq!(
                r.read_reservation().reservation.is_some(),
                !t.all_registrants()
            );
            if r.read_reservation().reservation.is_some() {
                assert_eq!(out(&mut r, &a, Release, Some(t), 0xa, 0), Ok(vec![]));
            }
            assert!(r.read_reservation().reservation.is_none());
            assert!(r.allows(&c, Access::Write));
        }
    }

    #[test]
    fn register_changes_and_removes_keys_and_takes_the_reservation_along() {
        let (a, b) = (nexus("a", 1), nexus("b", 2));
        let mut r = Reservations::default();
        // Unregistered with key 0 and SA key 0: nothing, no generation bump.
        assert_eq!(out(&mut r, &a, Register, None, 0, 0), Ok(vec![]));
        assert_eq!(r.read_keys().generation, 0);
        assert_eq!(
            out(&mut r, &a, Register, None, 5, 1),
            Err(PrRefusal::Conflict),
            "an unregistered nexus must give key 0"
        );
        out(&mut r, &a, Register, None, 0, 1).unwrap();
        assert_eq!(
            out(&mut r, &a, Register, None, 2, 3),
            Err(PrRefusal::Conflict)
        );
        out(&mut r, &a, RegisterAndIgnoreExistingKey, None, 99, 3).unwrap();
        assert_eq!(r.key_of(&a), Some(3));
        out(&mut r, &b, RegisterAndIgnoreExistingKey, None, 99, 4).unwrap();
        out(&mut r, &a, Reserve, Some(PrType::ExclusiveAccess), 3, 0).unwrap();
        assert!(!r.allows(&b, Access::Read));
        // The holder unregisters: the reservation goes.
        out(&mut r, &a, Register, None, 3, 0).unwrap();
        assert!(r.read_reservation().reservation.is_none());
        assert_eq!(r.read_keys().keys, vec![4]);
        // CLEAR takes everything; only a registrant may.
        assert_eq!(out(&mut r, &a, Clear, None, 0, 0), Err(PrRefusal::Conflict));
        out(&mut r, &b, Clear, None, 4, 0).unwrap();
        assert!(!r.is_active());
    }

    #[test]
    fn preempt_and_abort_removes_the_victim_and_marks_its_tasks() {
        let (a, b, c) = (nexus("a", 1), nexus("b", 2), nexus("c", 3));
        let mut r = Reservations::default();
        let t = PrType::WriteExclusiveRegistrantsOnly;
        out(&mut r, &a, Register, None, 0, 0xa).unwrap();
        out(&mut r, &b, Register, None, 0, 0xb).unwrap();
        out(&mut r, &c, Register, None, 0, 0xb).unwrap();
        out(&mut r, &b, Reserve, Some(t), 0xb, 0).unwrap();
        let seen = r.aborts();
        // a preempts the holder's key: both nexuses with key b go, a holds.
        let victims = out(&mut r, &a, PreemptAndAbort, Some(t), 0xa, 0xb).unwrap();
        assert_eq!(victims, vec![b.clone(), c.clone()]);
        assert!(r.aborted_since(&b, seen) && r.aborted_since(&c, seen));
        assert!(!r.aborted_since(&a, seen));
        assert!(!r.aborted_since(&b, r.aborts()));
        assert_eq!(r.read_keys().keys, vec![0xa]);
        let res = r.read_reservation().reservation.unwrap();
        assert_eq!((res.key, res.pr_type()), (0xa, Some(t)));
        assert!(!r.allows(&b, Access::Write) && r.allows(&b, Access::Read));
        // Preempting a key nobody has is a conflict; key 0 without an
        // all-registrants reservation is an invalid parameter.
        assert_eq!(
            out(&mut r, &a, Preempt, Some(t), 0xa, 0x77),
            Err(PrRefusal::Conflict)
        );
        assert_eq!(
            out(&mut r, &a, Preempt, Some(t), 0xa, 0),
            Err(PrRefusal::Check(Sense::INVALID_FIELD_IN_PARAMETERS))
        );
        // PREEMPT of a non-holder key removes it and leaves the reservation.
        out(&mut r, &b, Register, None, 0, 0xb).unwrap();
        assert_eq!(
            out(&mut r, &a, Preempt, Some(t), 0xa, 0xb),
            Ok(vec![]),
            "plain PREEMPT aborts nothing"
        );
        assert_eq!(r.key_of(&b), None);
        assert_eq!(r.read_reservation().reservation.unwrap().key, 0xa);
    }

    #[test]
    fn preempt_of_all_registrants_with_key_zero() {
        let (a, b) = (nexus("a", 1), nexus("b", 2));
        let mut r = Reservations::default();
        out(&mut r, &a, Register, None, 0, 1).unwrap();
        out(&mut r, &b, Register, None, 0, 2).unwrap();
        let ar = PrType::ExclusiveAccessAllRegistrants;
        out(&mut r, &b, Reserve, Some(ar), 2, 0).unwrap();
        let v = out(&mut r, &a, Preempt, Some(PrType::ExclusiveAccess), 1, 0).unwrap();
        assert!(v.is_empty());
        assert_eq!(r.read_keys().keys, vec![1]);
        let res = r.read_reservation().reservation.unwrap();
        assert_eq!(res.pr_type(), Some(PrType::ExclusiveAccess));
        assert!(!r.allows(&b, Access::Read));
    }

    #[test]
    fn bad_parameter_lists_and_fields() {
        let a = nexus("a", 1);
        let mut r = Reservations::default();
        let cdb = PrOutCdb::new(Register, None);
        assert_eq!(
            r.reserve_out(&a, &cdb, &[0; 20]),
            Err(PrRefusal::Check(Sense::PARAMETER_LIST_LENGTH_ERROR))
        );
        let aptpl = PrOutParams {
            sa_key: 1,
            aptpl: true,
            ..Default::default()
        };
        assert_eq!(
            r.reserve_out(&a, &cdb, &aptpl.to_vec()),
            Err(PrRefusal::Check(Sense::INVALID_FIELD_IN_PARAMETERS))
        );
        out(&mut r, &a, Register, None, 0, 1).unwrap();
        let mut bad_type = PrOutCdb::new(Reserve, None);
        bad_type.type_code = 2;
        let p = PrOutParams {
            key: 1,
            ..Default::default()
        };
        assert_eq!(
            r.reserve_out(&a, &bad_type, &p.to_vec()),
            Err(PrRefusal::Check(Sense::INVALID_FIELD_IN_CDB))
        );
        assert_eq!(
            out(&mut r, &a, RegisterAndMove, None, 1, 2),
            Err(PrRefusal::Check(Sense::INVALID_FIELD_IN_CDB))
        );
    }

    #[test]
    fn read_full_status_names_each_registrant_and_the_holder() {
        let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 2));
        let mut r = Reservations::default();
        out(&mut r, &a, Register, None, 0, 7).unwrap();
        out(&mut r, &b, Register, None, 0, 8).unwrap();
        out(&mut r, &b, Reserve, Some(PrType::ExclusiveAccess), 8, 0).unwrap();
        let d = r.read_full_status();
        assert_eq!(&d[..4], &2u32.to_be_bytes());
        let first_len = 24 + u32::from_be_bytes(d[28..32].try_into().unwrap()) as usize;
        let first = &d[8..8 + first_len];
        assert_eq!(&first[..8], &7u64.to_be_bytes());
        assert_eq!(first[12], 0, "a does not hold it");
        let tid = &first[24..];
        assert_eq!(tid[0], 0x45);
        assert!(tid[4..].starts_with(b"iqn.a,i,0x800000000001\0"));
        let second = &d[8 + first_len..];
        assert_eq!((second[12], second[13]), (1, 3), "b holds EA");
        assert_eq!(
            u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len() - 8
        );
    }

    #[test]
    fn access_classes() {
        assert_eq!(access_of(0x8a), Access::Write);
        assert_eq!(access_of(0x88), Access::Read);
        assert_eq!(access_of(0x12), Access::Always);
        assert_eq!(access_of(0x35), Access::Write);
    }
}
