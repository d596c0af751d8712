//! The SCSI block device the target emulates. [`plan`] decodes one CDB and
//! says what moves: data to the initiator from the LUN or from a small
//! response buffer, data from the initiator to the LUN or to a parameter
//! list, or just a status. The connection moves the bytes; nothing here
//! allocates on the READ/WRITE path.
//!
//! The response data (INQUIRY and its VPD pages, READ CAPACITY, REPORT
//! LUNS, REPORT TARGET PORT GROUPS, GET LBA STATUS, sense) and LUN fields
//! are emitted by `wire::scsi`, the codecs the initiator parses them with;
//! the layouts follow SPC-4/SBC-3.

use super::{AluaState, TargetShared};
use crate::wire::scsi::{
    opcode, vpd, Association, BlockDeviceCharacteristics, BlockLimits, CdbRepr, CodeSet, DataRepr,
    Designator, DesignatorType, DeviceIdentification, InquiryData, LbaStatusData,
    LbaStatusDescriptor, LogicalBlockProvisioning, Lun as LunField, OpcodeRequest, Peripheral,
    ProvisioningStatus, ReadCapacity10Data, ReadCapacity16Data, ReportLunsData, ScsiWireError,
    SenseData, SenseKey, SupportedVpdPages, TargetPortGroup, TargetPortGroupsData, Tpgs,
    UnitSerialNumber, PROTOCOL_ID_ISCSI,
};

/// Fixed-format sense (key, additional sense code and qualifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (VALID set), e.g. a miscompare's byte offset.
    pub information: Option<u32>,
    /// Sense-key specific bytes (SKSV set), the SKSV bit cleared: for
    /// ILLEGAL REQUEST the field pointer ([`Sense::in_cdb_field`]).
    pub sense_key_specific: Option<[u8; 3]>,
}

impl Sense {
    pub const INVALID_OPCODE: Sense = Sense::illegal(0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::illegal(0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::illegal(0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::illegal(0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::illegal(0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::illegal(0x1a, 0x00);
    pub const LUN_RESET_OCCURRED: Sense = Sense {
        key: SenseKey::UnitAttention,
        asc: 0x29,
        ascq: 0x03,
        information: None,
        sense_key_specific: None,
    };
    pub const ASYMMETRIC_ACCESS_STATE_CHANGED: Sense = Sense {
        key: SenseKey::UnitAttention,
        asc: 0x2a,
        ascq: 0x06,
        information: None,
        sense_key_specific: None,
    };
    pub const MISCOMPARE_DURING_VERIFY: Sense = Sense {
        key: SenseKey::Miscompare,
        asc: 0x1d,
        ascq: 0x00,
        information: None,
        sense_key_specific: None,
    };
    pub const POWER_ON_RESET: Sense = Sense {
        key: SenseKey::UnitAttention,
        asc: 0x29,
        ascq: 0x00,
        information: None,
        sense_key_specific: None,
    };

    const fn illegal(asc: u8, ascq: u8) -> Sense {
        Sense {
            key: SenseKey::IllegalRequest,
            asc,
            ascq,
            information: None,
            sense_key_specific: None,
        }
    }

    /// NOT READY for media access in ALUA states that forbid it.
    fn alua(state: AluaState) -> Option<Sense> {
        let ascq = match state {
            AluaState::ActiveOptimized | AluaState::ActiveNonOptimized => return None,
            AluaState::Transitioning => 0x0a,
            AluaState::Standby => 0x0b,
            // LBA-dependent and reserved states are never set (`served`).
            AluaState::Unavailable
            | AluaState::Offline
            | AluaState::LbaDependent
            | AluaState::Reserved(_) => 0x0c,
        };
        Some(Sense {
            key: SenseKey::NotReady,
            asc: 0x04,
            ascq,
            information: None,
            sense_key_specific: None,
        })
    }

    /// Length of [`emit_fixed`](Self::emit_fixed)'s output.
    pub const FIXED_LEN: usize = 18;

    /// This sense with the INFORMATION field set.
    pub const fn with_information(self, information: u32) -> Sense {
        Sense {
            information: Some(information),
            ..self
        }
    }

    /// This sense with the ILLEGAL REQUEST field pointer set: the error is
    /// in CDB byte `byte`, in the field whose most significant bit is `bit`
    /// (SKSV, C/D and BPV set).
    pub const fn in_cdb_field(self, byte: u16, bit: u8) -> Sense {
        let b = byte.to_be_bytes();
        Sense {
            sense_key_specific: Some([0x40 | 0x08 | (bit & 7), b[0], b[1]]),
            ..self
        }
    }

    /// Fixed-format sense data (SPC-4 §4.5.3), current error, emitted by
    /// the initiator's own codec (`wire::scsi::SenseData`).
    pub fn emit_fixed(&self) -> [u8; Sense::FIXED_LEN] {
        let mut d = SenseData::new(self.key, self.asc, self.ascq);
        d.information = self.information.map(u64::from);
        d.sense_key_specific = self.sense_key_specific;
        let mut s = [0u8; Sense::FIXED_LEN];
        // FIXED_LEN is SenseData's fixed length: this cannot fail.
        let _ = d.emit(&mut s);
        s
    }
}

/// Commands whose parameter data comes from the initiator before they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamCommand {
    Unmap,
    WriteSame {
        lba: u64,
        blocks: u64,
        unmap: bool,
    },
    /// COMPARE AND WRITE: the first half of the data is compared with the
    /// medium, the second half written when it matches.
    CompareAndWrite {
        lba: u64,
        blocks: u64,
    },
    /// VERIFY with BYTCHK: compare the data (or one block, `same`) with the medium.
    Verify {
        lba: u64,
        blocks: u64,
        same: bool,
    },
    /// SET TARGET PORT GROUPS (explicit ALUA).
    SetTargetPortGroups,
}

/// MAXIMUM COMPARE AND WRITE LENGTH in the Block Limits VPD page.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u64 = 16;

/// What the connection must do for one CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Send `len` bytes read from LUN index `lun` at byte `offset`; GOOD.
    ReadLun { lun: usize, offset: u64, len: u64 },
    /// Send the response buffer (already cut to the allocation length); GOOD.
    DataIn,
    /// Receive `len` bytes and store them in LUN `lun` at byte `offset`.
    WriteLun { lun: usize, offset: u64, len: u64 },
    /// Receive a `len`-byte parameter list, then [`finish_params`].
    ParamsOut {
        lun: usize,
        command: ParamCommand,
        len: u32,
    },
    /// No data; GOOD.
    Good,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// Which portal a command arrived on, for the port-specific answers.
#[derive(Debug, Clone, Copy)]
pub struct Port<'a> {
    pub shared: &'a TargetShared,
    pub portal: usize,
}

/// The LUN number of a single-level LUN field (peripheral or flat addressing).
pub fn decode_lun(field: u64) -> Option<u16> {
    LunField::from_u64(field).number()
}

/// The LUN field for LUN `n` (peripheral addressing below 256, else flat).
pub fn encode_lun(n: u16) -> u64 {
    LunField::from_number(n).to_u64()
}

/// `data` emitted by its `wire::scsi` codec into `buf`, cut to the
/// allocation length `alloc`.
fn data_in(data: &impl DataRepr, alloc: usize, buf: &mut Vec<u8>) -> Plan {
    buf.resize(data.buffer_len(), 0);
    // `buf` holds exactly `buffer_len()` bytes: this cannot fail.
    let _ = data.emit(buf);
    buf.truncate(alloc);
    Plan::DataIn
}

/// Commands that neither report nor clear a pending UNIT ATTENTION (SAM-5).
pub fn ignores_unit_attention(cdb: &[u8; 16]) -> bool {
    matches!(
        cdb[0],
        opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE
    )
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// REPORT SUPPORTED OPERATION CODES' refusals point at REPORTING OPTIONS
/// (byte 2, bits 2..0): initiators (libiscsi's test suite among them) read
/// INVALID FIELD IN CDB without a field pointer, or pointing at the
/// service action (byte 1), as "REPORT SUPPORTED OPERATION CODES not
/// supported".
const BAD_REPORTING_OPTIONS: Sense = Sense::INVALID_FIELD_IN_CDB.in_cdb_field(2, 2);

/// The answer to a CDB `wire::scsi` does not decode.
fn refusal(error: ScsiWireError) -> Sense {
    match error {
        ScsiWireError::UnknownOpcode(_) => Sense::INVALID_OPCODE,
        ScsiWireError::BadField("REPORTING OPTIONS", _) => BAD_REPORTING_OPTIONS,
        // An unknown service action of a known operation code.
        _ => Sense::INVALID_FIELD_IN_CDB,
    }
}

/// Decodes `cdb` for the LUN in `lun_field` and plans its execution.
/// Response data for non-media commands is written into `buf`.
pub fn plan(port: Port<'_>, lun_field: u64, cdb: &[u8; 16], buf: &mut Vec<u8>) -> Plan {
    buf.clear();
    let shared = port.shared;
    let lun = decode_lun(lun_field).and_then(|n| shared.lun_index(n));
    let parsed = CdbRepr::parse(cdb);
    // Commands that work without a valid LUN.
    match parsed {
        Ok(CdbRepr::Inquiry {
            evpd,
            page_code,
            alloc_len,
        }) => return inquiry(port, lun, evpd, page_code, alloc_len.into(), buf),
        Ok(CdbRepr::ReportLuns { alloc_len, .. }) => return report_luns(shared, alloc_len, buf),
        Ok(CdbRepr::RequestSense { alloc_len, .. }) => {
            buf.extend_from_slice(
                &Sense {
                    key: SenseKey::NoSense,
                    asc: 0,
                    ascq: 0,
                    information: None,
                    sense_key_specific: None,
                }
                .emit_fixed(),
            );
            buf.truncate(usize::from(alloc_len));
            return Plan::DataIn;
        }
        _ => {}
    }
    let Some(li) = lun else {
        return Plan::Check(Sense::LUN_NOT_SUPPORTED);
    };
    if shared.config.disabled_opcodes.contains(&cdb[0]) {
        return Plan::Check(Sense::INVALID_OPCODE);
    }
    let repr = match parsed {
        Ok(repr) => repr,
        Err(e) => return Plan::Check(refusal(e)),
    };
    let l = &shared.luns[li];
    let bs = u64::from(l.block_size());
    let limits = &shared.config.block_limits;
    let alua_block = shared
        .portals
        .get(port.portal)
        .and_then(|p| shared.alua_state(p.alua_group))
        .and_then(Sense::alua);
    // `(lba, blocks)` of the block commands, 6-byte lengths of 0 as 256.
    let range = || {
        let (lba, blocks) = repr.lba_range().unwrap_or((0, 0));
        (lba, u64::from(blocks))
    };
    match repr {
        CdbRepr::TestUnitReady
        | CdbRepr::StartStopUnit { .. }
        | CdbRepr::PreventAllowMediumRemoval { .. } => Plan::Good,
        CdbRepr::Read6 { .. }
        | CdbRepr::Read10 { .. }
        | CdbRepr::Read12 { .. }
        | CdbRepr::Read16 { .. }
        | CdbRepr::Write6 { .. }
        | CdbRepr::Write10 { .. }
        | CdbRepr::Write12 { .. }
        | CdbRepr::Write16 { .. } => {
            if let Some(s) = alua_block {
                return Plan::Check(s);
            }
            // No protection information: RDPROTECT/WRPROTECT must be 0.
            let (protect, fua) = match repr {
                CdbRepr::Read10 { protect, fua, .. }
                | CdbRepr::Read12 { protect, fua, .. }
                | CdbRepr::Read16 { protect, fua, .. }
                | CdbRepr::Write10 { protect, fua, .. }
                | CdbRepr::Write12 { protect, fua, .. }
                | CdbRepr::Write16 { protect, fua, .. } => (protect, fua),
                _ => (0, false),
            };
            if protect != 0 {
                return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            let (lba, blocks) = range();
            if !l.in_range(lba, blocks) {
                return Plan::Check(Sense::LBA_OUT_OF_RANGE);
            }
            // SBC-3 §6.5.3: beyond MAXIMUM TRANSFER LENGTH is an invalid CDB.
            if blocks > max_transfer_blocks(limits, bs) {
                return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            let (offset, len) = (lba * bs, blocks * bs);
            if matches!(
                repr,
                CdbRepr::Read6 { .. }
                    | CdbRepr::Read10 { .. }
                    | CdbRepr::Read12 { .. }
                    | CdbRepr::Read16 { .. }
            ) {
                Plan::ReadLun {
                    lun: li,
                    offset,
                    len,
                }
            } else {
                // WRITE 10/12/16 with FUA: RAM is the stable medium, so the
                // data is durable once stored; counted for tests.
                if fua {
                    l.count_fua_write();
                }
                Plan::WriteLun {
                    lun: li,
                    offset,
                    len,
                }
            }
        }
        CdbRepr::Verify10 {
            protect, bytchk, ..
        }
        | CdbRepr::Verify12 {
            protect, bytchk, ..
        }
        | CdbRepr::Verify16 {
            protect, bytchk, ..
        } => {
            let (lba, blocks) = range();
            if protect != 0 {
                return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            if !l.in_range(lba, blocks) {
                return Plan::Check(Sense::LBA_OUT_OF_RANGE);
            }
            let same = match bytchk {
                0 => return Plan::Good,
                1 => false,
                3 => true,
                _ => return Plan::Check(Sense::INVALID_FIELD_IN_CDB),
            };
            let len = if same { bs } else { blocks * bs };
            if blocks == 0 {
                return Plan::Good;
            }
            // The compare buffer is allocated; keep it bounded.
            if len > 16 << 20 {
                return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            Plan::ParamsOut {
                lun: li,
                command: ParamCommand::Verify { lba, blocks, same },
                len: len as u32,
            }
        }
        CdbRepr::CompareAndWrite {
            lba,
            blocks,
            protect,
            fua,
            ..
        } => {
            if let Some(s) = alua_block {
                return Plan::Check(s);
            }
            // No protection information (WRPROTECT 0); at most the Block
            // Limits MAXIMUM COMPARE AND WRITE LENGTH.
            if protect != 0 || u64::from(blocks) > MAX_COMPARE_AND_WRITE_BLOCKS {
                return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            let blocks = u64::from(blocks);
            if !l.in_range(lba, blocks) {
                return Plan::Check(Sense::LBA_OUT_OF_RANGE);
            }
            if blocks == 0 {
                return Plan::Good;
            }
            if fua {
                l.count_fua_write();
            }
            Plan::ParamsOut {
                lun: li,
                command: ParamCommand::CompareAndWrite { lba, blocks },
                len: (2 * blocks * bs) as u32,
            }
        }
        CdbRepr::SynchronizeCache10 { .. } | CdbRepr::SynchronizeCache16 { .. } => {
            let (lba, blocks) = range();
            if blocks != 0 && !l.in_range(lba, blocks) {
                return Plan::Check(Sense::LBA_OUT_OF_RANGE);
            }
            l.count_cache_sync();
            Plan::Good
        }
        CdbRepr::ReadCapacity10 => {
            let data = ReadCapacity10Data {
                last_lba: (l.blocks() - 1).min(0xffff_ffff) as u32,
                block_len: l.block_size(),
            };
            // No allocation length: all of it.
            data_in(&data, data.buffer_len(), buf)
        }
        CdbRepr::ReadCapacity16 { alloc_len } => {
            let data = ReadCapacity16Data {
                last_lba: l.blocks() - 1,
                block_len: l.block_size(),
                // LBPME: UNMAP works.
                lbpme: true,
                ..ReadCapacity16Data::default()
            };
            data_in(&data, alloc_len as usize, buf)
        }
        CdbRepr::ReportTargetPortGroups {
            extended,
            alloc_len,
        } => report_target_port_groups(port, extended, alloc_len as usize, buf),
        CdbRepr::ReportSupportedOpcodes {
            request,
            rctd,
            alloc_len,
        } => report_supported_opcodes(shared, request, rctd, alloc_len as usize, buf),
        // SET TARGET PORT GROUPS: only with explicit ALUA.
        CdbRepr::SetTargetPortGroups { param_len } if shared.config.alua_explicit => {
            if param_len == 0 {
                return Plan::Good;
            }
            if !(4..=4 + 4 * 256).contains(&param_len) {
                return Plan::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            Plan::ParamsOut {
                lun: li,
                command: ParamCommand::SetTargetPortGroups,
                len: param_len,
            }
        }
        CdbRepr::SetTargetPortGroups { .. } => Plan::Check(Sense::INVALID_FIELD_IN_CDB),
        CdbRepr::GetLbaStatus { lba, alloc_len } => {
            let alloc = alloc_len as usize;
            if lba >= l.blocks() {
                return Plan::Check(Sense::LBA_OUT_OF_RANGE);
            }
            let max_runs = (alloc.saturating_sub(8) / 16).clamp(1, 1024);
            let descriptors = l
                .mapping_runs(lba, max_runs)
                .into_iter()
                .map(|(lba, blocks, mapped)| LbaStatusDescriptor {
                    lba,
                    blocks,
                    status: if mapped {
                        ProvisioningStatus::Mapped
                    } else {
                        ProvisioningStatus::Deallocated
                    },
                })
                .collect();
            data_in(&LbaStatusData { descriptors }, alloc, buf)
        }
        CdbRepr::ModeSense6 {
            dbd,
            page_code,
            subpage_code,
            alloc_len,
            ..
        } => mode_sense(
            l,
            ModeHeader::Six,
            dbd,
            (page_code, subpage_code),
            alloc_len.into(),
            buf,
        ),
        CdbRepr::ModeSense10 {
            dbd,
            page_code,
            subpage_code,
            alloc_len,
            ..
        } => mode_sense(
            l,
            ModeHeader::Ten,
            dbd,
            (page_code, subpage_code),
            alloc_len.into(),
            buf,
        ),
        CdbRepr::Unmap { param_len, .. } => {
            if let Some(s) = alua_block {
                return Plan::Check(s);
            }
            if param_len == 0 {
                return Plan::Good;
            }
            Plan::ParamsOut {
                lun: li,
                command: ParamCommand::Unmap,
                len: u32::from(param_len),
            }
        }
        CdbRepr::WriteSame10 { protect, unmap, .. }
        | CdbRepr::WriteSame16 { protect, unmap, .. } => {
            if let Some(s) = alua_block {
                return Plan::Check(s);
            }
            if protect != 0 {
                return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            let (lba, mut blocks) = range();
            if blocks == 0 {
                blocks = l.blocks().saturating_sub(lba);
            }
            if !l.in_range(lba, blocks) {
                return Plan::Check(Sense::LBA_OUT_OF_RANGE);
            }
            // Beyond MAXIMUM WRITE SAME LENGTH (when reported).
            if limits.max_write_same_blocks != 0 && blocks > limits.max_write_same_blocks {
                return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            Plan::ParamsOut {
                lun: li,
                command: ParamCommand::WriteSame { lba, blocks, unmap },
                len: l.block_size(),
            }
        }
        // Answered above, before the LUN is checked.
        CdbRepr::Inquiry { .. } | CdbRepr::ReportLuns { .. } | CdbRepr::RequestSense { .. } => {
            Plan::Check(Sense::INVALID_OPCODE)
        }
    }
}

/// Runs a [`Plan::ParamsOut`] command once its parameter list has arrived.
pub fn finish_params(
    shared: &TargetShared,
    lun: usize,
    command: ParamCommand,
    data: &[u8],
) -> Result<(), Sense> {
    let l = &shared.luns[lun];
    let bs = u64::from(l.block_size());
    match command {
        ParamCommand::Unmap => {
            if data.len() < 8 {
                return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            let desc_len = usize::from(be16(&data[2..]));
            let descs = data
                .get(8..8 + desc_len)
                .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
            // SBC-3 §5.28: more descriptors or blocks than Block Limits
            // allow is an invalid parameter list.
            let limits = &shared.config.block_limits;
            let count = descs.chunks_exact(16).count() as u64;
            let total: u64 = descs
                .chunks_exact(16)
                .map(|d| u64::from(be32(&d[8..])))
                .sum();
            if count > u64::from(limits.max_unmap_descriptors)
                || total > u64::from(limits.max_unmap_blocks)
            {
                return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
            }
            // Check every range before touching any.
            for d in descs.chunks_exact(16) {
                if !l.in_range(be64(d), u64::from(be32(&d[8..]))) {
                    return Err(Sense::LBA_OUT_OF_RANGE);
                }
            }
            for d in descs.chunks_exact(16) {
                l.deallocate(be64(d) * bs, u64::from(be32(&d[8..])) * bs);
            }
            Ok(())
        }
        ParamCommand::SetTargetPortGroups => {
            use crate::wire::scsi::{DataRepr, SetTargetPortGroupsList};
            let list = SetTargetPortGroupsList::parse(data)
                .map_err(|_| Sense::PARAMETER_LIST_LENGTH_ERROR)?;
            // Check every descriptor before changing any state.
            let mut changes = Vec::new();
            for (group, state) in list.groups {
                // SET TARGET PORT GROUPS may ask for these four only
                // (SPC-4 §6.41).
                if !matches!(
                    state,
                    AluaState::ActiveOptimized
                        | AluaState::ActiveNonOptimized
                        | AluaState::Standby
                        | AluaState::Unavailable
                ) {
                    return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
                }
                if shared.alua_state(group).is_none() {
                    return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
                }
                changes.push((group, state));
            }
            for (group, state) in changes {
                log::info!("SET TARGET PORT GROUPS: group {group} -> {state:?}");
                shared
                    .set_alua_state(group, state)
                    .map_err(|_| Sense::INVALID_FIELD_IN_PARAMETERS)?;
            }
            Ok(())
        }
        ParamCommand::CompareAndWrite { lba, blocks } => {
            let n = (blocks * bs) as usize;
            if data.len() != 2 * n {
                return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            let (expected, new) = data.split_at(n);
            l.atomically(|| {
                let mut current = vec![0u8; n];
                l.read(lba * bs, &mut current);
                if let Some(at) = current.iter().zip(expected).position(|(a, b)| a != b) {
                    // SBC-3 §5.2: INFORMATION is the offset of the first
                    // byte that differs.
                    return Err(Sense::MISCOMPARE_DURING_VERIFY.with_information(at as u32));
                }
                l.write(lba * bs, new);
                Ok(())
            })
        }
        ParamCommand::Verify { lba, blocks, same } => {
            let want = if same { bs } else { blocks * bs };
            if data.len() as u64 != want {
                return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            let mut block = vec![0u8; bs as usize];
            for b in 0..blocks {
                l.read((lba + b) * bs, &mut block);
                let at = if same { 0 } else { (b * bs) as usize };
                if block[..] != data[at..at + bs as usize] {
                    return Err(Sense::MISCOMPARE_DURING_VERIFY);
                }
            }
            Ok(())
        }
        ParamCommand::WriteSame { lba, blocks, unmap } => {
            if data.len() as u64 != bs {
                return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            if unmap {
                l.deallocate(lba * bs, blocks * bs);
            } else if data.iter().all(|&b| b == 0) {
                l.zero(lba * bs, blocks * bs);
            } else {
                for b in 0..blocks {
                    l.write((lba + b) * bs, data);
                }
            }
            Ok(())
        }
    }
}

fn inquiry(
    port: Port<'_>,
    lun: Option<usize>,
    evpd: bool,
    page: u8,
    alloc: usize,
    buf: &mut Vec<u8>,
) -> Plan {
    let shared = port.shared;
    if !evpd {
        if page != 0 {
            return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        // Peripheral qualifier 3 / type 0x1f: no LU here.
        let peripheral = match lun {
            Some(_) => Peripheral::DISK,
            None => Peripheral::NO_LUN,
        };
        let product = match lun.map(|i| shared.luns[i].is_null()) {
            Some(true) => "NULL LUN",
            _ => "RAM LUN",
        };
        // SPC-4, HiSup, response format 2; TPGS=01 (implicit ALUA) or 10
        // (explicit only); MultiP; CmdQue.
        let mut data = InquiryData::new(peripheral, "IBYPASS", product, "0001");
        data.tpgs = if shared.config.alua_explicit {
            Tpgs::Explicit
        } else {
            Tpgs::Implicit
        };
        data.multip = true;
        buf.resize(InquiryData::LEN, 0);
        // `buf` holds exactly `InquiryData::LEN` bytes: this cannot fail.
        let _ = data.emit(buf);
        buf.resize(58, 0);
        // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
        for v in [0x00a0u16, 0x0460, 0x04c0, 0x0960] {
            buf.extend_from_slice(&v.to_be_bytes());
        }
        buf[4] = (buf.len() - 5) as u8;
        buf.truncate(alloc);
        return Plan::DataIn;
    }
    let Some(li) = lun else {
        return Plan::Check(Sense::LUN_NOT_SUPPORTED);
    };
    let l = &shared.luns[li];
    let portal = shared.portals.get(port.portal);
    let peripheral = Peripheral::DISK;
    match page {
        vpd::SUPPORTED_PAGES => {
            let pages = vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];
            data_in(&SupportedVpdPages { peripheral, pages }, alloc, buf)
        }
        vpd::UNIT_SERIAL_NUMBER => {
            let serial = l.serial().as_bytes().to_vec();
            data_in(&UnitSerialNumber { peripheral, serial }, alloc, buf)
        }
        vpd::DEVICE_IDENTIFICATION => {
            // Target port (iSCSI, PIV): relative port and port group differ per portal.
            let rel = portal.map_or(0, |p| p.relative_port);
            let group = portal.map_or(0, |p| p.alua_group);
            let iscsi = |designator: Designator| Designator {
                protocol_id: PROTOCOL_ID_ISCSI,
                piv: true,
                ..designator
            };
            let port_name = format!("{},t,0x{:04x}", shared.config.iqn, rel);
            let designators = vec![
                // LU: NAA (binary), identical on every portal: the multipath identity.
                Designator::naa(l.naa().to_vec()),
                iscsi(Designator::relative_target_port_id(rel)),
                iscsi(Designator::target_port_group_id(group)),
                // SCSI name strings: the target port and the target device.
                iscsi(scsi_name(Association::TargetPort, &port_name)),
                iscsi(scsi_name(Association::TargetDevice, &shared.config.iqn)),
            ];
            let page = DeviceIdentification {
                peripheral,
                designators,
            };
            data_in(&page, alloc, buf)
        }
        vpd::BLOCK_LIMITS => {
            let bl = &shared.config.block_limits;
            let page = BlockLimits {
                peripheral,
                max_compare_and_write_len: MAX_COMPARE_AND_WRITE_BLOCKS as u8,
                optimal_transfer_len_granularity: bl.optimal_granularity,
                max_transfer_len: max_transfer_blocks(bl, u64::from(l.block_size())) as u32,
                max_unmap_lba_count: bl.max_unmap_blocks,
                max_unmap_descriptor_count: bl.max_unmap_descriptors,
                optimal_unmap_granularity: bl.unmap_granularity,
                unmap_granularity_alignment: bl.unmap_alignment,
                max_write_same_len: bl.max_write_same_blocks,
                ..BlockLimits::default()
            };
            data_in(&page, alloc, buf)
        }
        vpd::BLOCK_DEVICE_CHARACTERISTICS => {
            let page = BlockDeviceCharacteristics {
                peripheral,
                medium_rotation_rate: BlockDeviceCharacteristics::NON_ROTATING,
            };
            data_in(&page, alloc, buf)
        }
        vpd::LOGICAL_BLOCK_PROVISIONING => {
            let page = LogicalBlockProvisioning {
                peripheral,
                lbpu: true,
                lbpws: true,
                lbpws10: true,
                ..LogicalBlockProvisioning::default()
            };
            data_in(&page, alloc, buf)
        }
        _ => Plan::Check(Sense::INVALID_FIELD_IN_CDB),
    }
}

/// A SCSI name string designator (UTF-8, NUL-terminated, padded to 4).
fn scsi_name(association: Association, name: &str) -> Designator {
    let len = (name.len() + 1).next_multiple_of(4).min(252);
    let mut value = name.as_bytes()[..name.len().min(len - 1)].to_vec();
    value.resize(len, 0);
    Designator {
        protocol_id: 0,
        code_set: CodeSet::Utf8,
        piv: false,
        association,
        designator_type: DesignatorType::ScsiNameString,
        value,
    }
}

fn report_luns(shared: &TargetShared, alloc_len: u32, buf: &mut Vec<u8>) -> Plan {
    let alloc = alloc_len as usize;
    if alloc < 16 && alloc != 0 {
        return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
    }
    let luns = shared
        .luns
        .iter()
        .map(|l| LunField::from_number(l.number()))
        .collect();
    data_in(&ReportLunsData { luns }, alloc, buf)
}

/// REPORT TARGET PORT GROUPS; `extended` asks for parameter data format 001b.
fn report_target_port_groups(
    port: Port<'_>,
    extended: bool,
    alloc: usize,
    buf: &mut Vec<u8>,
) -> Plan {
    let shared = port.shared;
    let groups = shared
        .alua_groups()
        .map(|group| TargetPortGroup {
            pref: false,
            state: shared.alua_state(group).unwrap_or(AluaState::Offline),
            // T_SUP, O_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP.
            supported: 0xcf,
            id: group,
            status_code: 0,
            vendor_specific: 0,
            ports: shared
                .portals
                .iter()
                .filter(|p| p.alua_group == group)
                .map(|p| p.relative_port)
                .collect(),
        })
        .collect();
    let data = TargetPortGroupsData {
        // Format 1, implicit transition time 0.
        implicit_transition_time: extended.then_some(0),
        groups,
    };
    data_in(&data, alloc, buf)
}

/// MAXIMUM TRANSFER LENGTH in blocks of `bs` bytes.
fn max_transfer_blocks(limits: &super::BlockLimitsConfig, bs: u64) -> u64 {
    u64::from(limits.max_transfer_bytes) / bs.max(1)
}

/// `(opcode, service action, CDB length)` of every command [`plan`]
/// carries out (the SET TARGET PORT GROUPS entry only with explicit ALUA).
const COMMANDS: &[(u8, Option<u16>, u16)] = &[
    (0x00, None, 6),
    (0x03, None, 6),
    (0x08, None, 6),
    (0x0a, None, 6),
    (0x12, None, 6),
    (0x1a, None, 6),
    (0x1b, None, 6),
    (0x1e, None, 6),
    (0x25, None, 10),
    (0x28, None, 10),
    (0x2a, None, 10),
    (0x2f, None, 10),
    (0x35, None, 10),
    (0x41, None, 10),
    (0x42, None, 10),
    (0x5a, None, 10),
    (0x88, None, 16),
    (0x89, None, 16),
    (0x8a, None, 16),
    (0x8f, None, 16),
    (0x91, None, 16),
    (0x93, None, 16),
    (0x9e, Some(0x10), 16),
    (0x9e, Some(0x12), 16),
    (0xa0, None, 12),
    (0xa3, Some(0x0a), 12),
    (0xa3, Some(0x0c), 12),
    (0xa4, Some(0x0a), 12),
    (0xa8, None, 12),
    (0xaa, None, 12),
    (0xaf, None, 12),
];

/// REPORT SUPPORTED OPERATION CODES, answered from [`COMMANDS`] less the
/// configuration's disabled operation codes (and STPG without explicit ALUA).
/// `rctd` (RCTD) adds a command timeouts descriptor to each command
/// (timeouts 0: not specified).
fn report_supported_opcodes(
    shared: &TargetShared,
    request: OpcodeRequest,
    rctd: bool,
    alloc: usize,
    buf: &mut Vec<u8>,
) -> Plan {
    use crate::wire::scsi::{OneOpcode, OpcodeDescriptor, SupportedOpcodes};
    const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let offered = |&&(op, sa, _): &&(u8, Option<u16>, u16)| {
        !shared.config.disabled_opcodes.contains(&op)
            && (shared.config.alua_explicit || (op, sa) != (0xa4, Some(0x0a)))
    };
    let data = match request {
        OpcodeRequest::All => SupportedOpcodes {
            commands: COMMANDS
                .iter()
                .filter(offered)
                .map(|&(opcode, service_action, cdb_len)| OpcodeDescriptor {
                    opcode,
                    service_action,
                    cdb_len,
                })
                .collect(),
        }
        .to_vec(),
        OpcodeRequest::Opcode(op) | OpcodeRequest::ServiceAction(op, _) => {
            let sa = match request {
                OpcodeRequest::ServiceAction(_, sa) => Some(sa),
                _ => None,
            };
            let has_sa = COMMANDS.iter().any(|c| c.0 == op && c.1.is_some());
            // SPC-4 §6.35.1: asking without a service action for a command
            // that has them (or with one for a command that has none) is an
            // invalid CDB.
            if has_sa != sa.is_some() && COMMANDS.iter().any(|c| c.0 == op) {
                return Plan::Check(BAD_REPORTING_OPTIONS);
            }
            let found = COMMANDS
                .iter()
                .filter(offered)
                .find(|c| c.0 == op && c.1 == sa);
            match found {
                Some(&(op, _, len)) => {
                    let mut usage = vec![0xffu8; usize::from(len)];
                    usage[0] = op;
                    if let (Some(sa), Some(b)) = (sa, usage.get_mut(1)) {
                        *b = sa as u8 & 0x1f;
                    }
                    if let Some(c) = usage.last_mut() {
                        *c = 0; // CONTROL: no NACA, no vendor bits
                    }
                    OneOpcode {
                        support: 3,
                        cdb_usage: usage,
                    }
                    .to_vec()
                }
                None => OneOpcode {
                    support: 1,
                    cdb_usage: Vec::new(),
                }
                .to_vec(),
            }
        }
    };
    let mut data = data;
    if rctd {
        match request {
            OpcodeRequest::All => {
                // Each 8-byte descriptor gets CTDP and its 12 bytes.
                let mut with = vec![0u8; 4];
                for d in data[4..].chunks_exact(8) {
                    with.extend_from_slice(d);
                    let at = with.len() - 8 + 5;
                    with[at] |= 0x02;
                    with.extend_from_slice(&TIMEOUTS);
                }
                let n = (with.len() - 4) as u32;
                with[..4].copy_from_slice(&n.to_be_bytes());
                data = with;
            }
            _ if data[1] & 7 == 3 => {
                data[1] |= 0x80;
                data.extend_from_slice(&TIMEOUTS);
            }
            _ => {}
        }
    }
    buf.extend_from_slice(&data);
    buf.truncate(alloc);
    Plan::DataIn
}

/// Which MODE SENSE answers: the 6-byte CDB's 4-byte header or the
/// 10-byte CDB's 8-byte one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ModeHeader {
    Six,
    Ten,
}

/// MODE SENSE(6)/(10) of `(page, subpage)`; `dbd` leaves out the block
/// descriptor. The page control (PC) is ignored: every request gets the
/// current values.
fn mode_sense(
    l: &super::Lun,
    header: ModeHeader,
    dbd: bool,
    (page, subpage): (u8, u8),
    alloc: usize,
    buf: &mut Vec<u8>,
) -> Plan {
    let ten = header == ModeHeader::Ten;
    if subpage != 0 && !(page == 0x3f && subpage == 0xff) {
        return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
    }
    let header_len = if ten { 8 } else { 4 };
    buf.resize(header_len, 0);
    buf[if ten { 3 } else { 2 }] = 0x10; // DPOFUA
    if !dbd {
        let blocks = l.blocks().min(0x00ff_ffff) as u32;
        buf.extend_from_slice(&[0, (blocks >> 16) as u8, (blocks >> 8) as u8, blocks as u8]);
        buf.extend_from_slice(&l.block_size().to_be_bytes());
        buf[header_len - 1] = 8;
    }
    let caching = [
        0x08, 0x12, 0, 0, 0xff, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    // Control page: QAM unrestricted.
    let control = [0x0a, 0x0a, 0, 0x10, 0, 0, 0, 0, 0xff, 0xff, 0, 0];
    match page {
        0x08 => buf.extend_from_slice(&caching),
        0x0a => buf.extend_from_slice(&control),
        0x3f => {
            buf.extend_from_slice(&caching);
            buf.extend_from_slice(&control);
        }
        _ => {
            buf.clear();
            return Plan::Check(Sense::INVALID_FIELD_IN_CDB);
        }
    }
    if ten {
        let n = (buf.len() - 2) as u16;
        buf[..2].copy_from_slice(&n.to_be_bytes());
    } else {
        buf[0] = (buf.len() - 1).min(255) as u8;
    }
    buf.truncate(alloc);
    Plan::DataIn
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{LunConfig, TargetConfig};
    use std::net::SocketAddr;

    fn shared() -> TargetShared {
        let cfg = TargetConfig::ram("iqn.2024-01.test:t", 1 << 20)
            .lun(LunConfig::null(3, 1 << 20).block_size(4096));
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:3260".parse().unwrap(),
            "127.0.0.1:3261".parse().unwrap(),
        ];
        TargetShared::new(cfg, &addrs).unwrap()
    }

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    /// REPORT SUPPORTED OPERATION CODES refuses a reporting option that
    /// does not fit the command (one command, or one service action, of a
    /// command without / with service actions) pointing at REPORTING
    /// OPTIONS, so it does not read as "RSOC not supported".
    #[test]
    fn rsoc_refusals_point_at_the_reporting_options() {
        use crate::wire::scsi::{DataRepr, SenseData};
        let s = shared();
        let p = Port {
            shared: &s,
            portal: 0,
        };
        let mut buf = Vec::new();
        for c in [
            // 002b for TEST UNIT READY (no service actions).
            cdb(&[0xa3, 0x0c, 2, 0x00, 0, 0, 0, 0, 1, 0]),
            // 001b for GET LBA STATUS (a SERVICE ACTION IN (16) command).
            cdb(&[0xa3, 0x0c, 1, 0x9e, 0, 0, 0, 0, 1, 0]),
            // Reporting options 7: reserved.
            cdb(&[0xa3, 0x0c, 7, 0x00, 0, 0, 0, 0, 1, 0]),
        ] {
            let Plan::Check(sense) = plan(p, 0, &c, &mut buf) else {
                panic!("{c:02x?} accepted");
            };
            let d = SenseData::parse(&sense.emit_fixed()).unwrap();
            assert_eq!((d.asc, d.ascq), (0x24, 0x00), "{c:02x?}");
            assert_eq!(d.field_pointer(), Some((true, 2, Some(2))), "{c:02x?}");
        }
        // The fitting requests are answered.
        for c in [
            cdb(&[0xa3, 0x0c, 1, 0x00, 0, 0, 0, 0, 1, 0]),
            cdb(&[0xa3, 0x0c, 2, 0x9e, 0, 0x12, 0, 0, 1, 0]),
        ] {
            assert_eq!(plan(p, 0, &c, &mut buf), Plan::DataIn, "{c:02x?}");
        }
        // An unknown MAINTENANCE IN service action still has no pointer.
        let Plan::Check(sense) = plan(p, 0, &cdb(&[0xa3, 0x1f, 0, 0, 0, 0, 0, 0, 1, 0]), &mut buf)
        else {
            panic!("unknown service action accepted");
        };
        assert_eq!(sense.sense_key_specific, None);
    }

    #[test]
    fn lun_addressing() {
        assert_eq!(decode_lun(encode_lun(3)), Some(3));
        assert_eq!(decode_lun(encode_lun(300)), Some(300));
        assert_eq!(decode_lun(1), None);
        assert_eq!(decode_lun(0xc000 << 48), None);
    }

    #[test]
    fn vpd83_identity_is_per_lu_and_ports_per_portal() {
        let s = shared();
        let mut a = Vec::new();
        let mut b = Vec::new();
        let c = cdb(&[0x12, 1, 0x83, 1, 0]);
        assert_eq!(
            plan(
                Port {
                    shared: &s,
                    portal: 0
                },
                0,
                &c,
                &mut a
            ),
            Plan::DataIn
        );
        assert_eq!(
            plan(
                Port {
                    shared: &s,
                    portal: 1
                },
                0,
                &c,
                &mut b
            ),
            Plan::DataIn
        );
        assert_eq!(
            a[8..24],
            b[8..24],
            "NAA designator must match across portals"
        );
        assert_eq!(a[4..8], [0x01, 0x03, 0, 16]);
        assert_eq!(a[24..32], [0x51, 0x94, 0, 4, 0, 0, 0, 1]);
        assert_eq!(b[24..32], [0x51, 0x94, 0, 4, 0, 0, 0, 2]);
        assert_eq!(b[32..40], [0x51, 0x95, 0, 4, 0, 0, 0, 2]);
        assert_eq!(usize::from(be16(&a[2..])), a.len() - 4);
    }

    #[test]
    fn read_write_ranges_and_sense() {
        let s = shared();
        let p = Port {
            shared: &s,
            portal: 0,
        };
        let mut buf = Vec::new();
        // READ(16) of the last block works, one past it does not.
        let mut c = cdb(&[0x88]);
        c[2..10].copy_from_slice(&2047u64.to_be_bytes());
        c[10..14].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            plan(p, 0, &c, &mut buf),
            Plan::ReadLun {
                lun: 0,
                offset: 2047 * 512,
                len: 512
            }
        );
        c[10..14].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            plan(p, 0, &c, &mut buf),
            Plan::Check(Sense::LBA_OUT_OF_RANGE)
        );
        assert_eq!(
            plan(p, 0, &cdb(&[0xee]), &mut buf),
            Plan::Check(Sense::INVALID_OPCODE)
        );
        assert_eq!(
            plan(p, encode_lun(9), &cdb(&[0x00]), &mut buf),
            Plan::Check(Sense::LUN_NOT_SUPPORTED)
        );
        // WRITE(10) on the 4K null LUN.
        assert_eq!(
            plan(
                p,
                encode_lun(3),
                &cdb(&[0x2a, 0, 0, 0, 0, 1, 0, 0, 2]),
                &mut buf
            ),
            Plan::WriteLun {
                lun: 1,
                offset: 4096,
                len: 8192
            }
        );
        let f = Sense::LBA_OUT_OF_RANGE.emit_fixed();
        assert_eq!((f[0], f[2], f[12], f[13]), (0x70, 5, 0x21, 0));
    }

    /// The answers that come from the decoded CDB's fields: 6-byte
    /// lengths, protection bits, BYTCHK, unknown service actions and
    /// operation codes.
    #[test]
    fn decoded_fields_pick_the_answer() {
        let s = shared();
        let p = Port {
            shared: &s,
            portal: 0,
        };
        let mut buf = Vec::new();
        // READ(6) with TRANSFER LENGTH 0: 256 blocks.
        assert_eq!(
            plan(p, 0, &cdb(&[0x08, 0, 0, 1, 0, 0]), &mut buf),
            Plan::ReadLun {
                lun: 0,
                offset: 512,
                len: 256 * 512
            }
        );
        // RDPROTECT/WRPROTECT: no protection information here.
        for c in [
            cdb(&[0xa8, 0x20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            cdb(&[0x8a, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            cdb(&[0x41, 0x40, 0, 0, 0, 0, 0, 0, 1, 0]),
            // VERIFY(10) BYTCHK 10b: reserved.
            cdb(&[0x2f, 0x04, 0, 0, 0, 0, 0, 0, 1, 0]),
            // SERVICE ACTION IN(16) service action 1Fh: unknown.
            cdb(&[0x9e, 0x1f]),
            // SET TARGET PORT GROUPS without explicit ALUA.
            cdb(&[0xa4, 0x0a, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]),
        ] {
            assert_eq!(
                plan(p, 0, &c, &mut buf),
                Plan::Check(Sense::INVALID_FIELD_IN_CDB),
                "{c:02x?}"
            );
        }
        // WRITE(12) with FUA is counted.
        let before = s.luns[0].fua_writes();
        assert_eq!(
            plan(
                p,
                0,
                &cdb(&[0xaa, 0x08, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0]),
                &mut buf
            ),
            Plan::WriteLun {
                lun: 0,
                offset: 1024,
                len: 512
            }
        );
        assert_eq!(s.luns[0].fua_writes(), before + 1);
        // VERIFY(16) with BYTCHK 11b compares one block.
        let mut v = cdb(&[0x8f, 0x06]);
        v[13] = 4;
        assert_eq!(
            plan(p, 0, &v, &mut buf),
            Plan::ParamsOut {
                lun: 0,
                command: ParamCommand::Verify {
                    lba: 0,
                    blocks: 4,
                    same: true
                },
                len: 512
            }
        );
        // MODE SENSE(6) of the caching page: 4-byte header, block
        // descriptor, 20-byte page.
        assert_eq!(
            plan(p, 0, &cdb(&[0x1a, 0, 0x08, 0, 0xff, 0]), &mut buf),
            Plan::DataIn
        );
        assert_eq!((buf.len(), buf[0], buf[3], buf[12]), (32, 31, 8, 0x08));
        // Operation codes nothing decodes (FORMAT UNIT, group 6).
        for op in [0x04, 0xc0] {
            assert_eq!(
                plan(p, 0, &cdb(&[op]), &mut buf),
                Plan::Check(Sense::INVALID_OPCODE)
            );
        }
    }

    #[test]
    fn capacity_luns_and_alua() {
        let s = shared();
        let p = Port {
            shared: &s,
            portal: 1,
        };
        let mut buf = Vec::new();
        assert_eq!(plan(p, 0, &cdb(&[0x25]), &mut buf), Plan::DataIn);
        assert_eq!(buf, [0, 0, 7, 0xff, 0, 0, 2, 0]);
        let mut c = cdb(&[0x9e, 0x10]);
        c[13] = 32;
        plan(p, encode_lun(3), &c, &mut buf);
        assert_eq!(buf.len(), 32);
        assert_eq!(be64(&buf), 255);
        assert_eq!(be32(&buf[8..]), 4096);
        plan(p, 0, &cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), &mut buf);
        assert_eq!(buf.len(), 24);
        assert_eq!(buf[17], 3);
        s.set_alua_state(2, AluaState::Standby).unwrap();
        plan(p, 0, &cdb(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0]), &mut buf);
        // Two groups of one port each: 4 + 2 * 12 bytes.
        assert_eq!(buf.len(), 28);
        assert_eq!(buf[4] & 0x0f, 0);
        assert_eq!(buf[16] & 0x0f, 2);
        assert_eq!(be16(&buf[18..]), 2);
        let read = cdb(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            plan(p, 0, &read, &mut buf),
            Plan::Check(Sense {
                key: SenseKey::NotReady,
                asc: 4,
                ascq: 0x0b,
                information: None,
                sense_key_specific: None,
            })
        );
        assert!(matches!(
            plan(
                Port {
                    shared: &s,
                    portal: 0
                },
                0,
                &read,
                &mut buf
            ),
            Plan::ReadLun { .. }
        ));
    }

    #[test]
    fn unmap_and_write_same() {
        let s = shared();
        s.luns[0].write(512, &[7u8; 1024]);
        let mut params = vec![0, 22, 0, 16, 0, 0, 0, 0];
        params.extend_from_slice(&1u64.to_be_bytes());
        params.extend_from_slice(&1u32.to_be_bytes());
        params.extend_from_slice(&[0; 4]);
        finish_params(&s, 0, ParamCommand::Unmap, &params).unwrap();
        let mut b = [0u8; 1024];
        s.luns[0].read(512, &mut b);
        assert!(b[..512].iter().all(|&x| x == 0) && b[512..].iter().all(|&x| x == 7));
        finish_params(
            &s,
            0,
            ParamCommand::WriteSame {
                lba: 4,
                blocks: 2,
                unmap: false,
            },
            &[5u8; 512],
        )
        .unwrap();
        s.luns[0].read(4 * 512, &mut b);
        assert!(b.iter().all(|&x| x == 5));
        params[8..16].copy_from_slice(&5000u64.to_be_bytes());
        assert_eq!(
            finish_params(&s, 0, ParamCommand::Unmap, &params),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
        assert!(finish_params(&s, 0, ParamCommand::Unmap, &params[..4]).is_err());
    }
}
