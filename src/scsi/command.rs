//! Command descriptions: a CDB plus the direction and length of its data.

use super::error::ScsiError;
use crate::wire::scsi::{
    vpd, AluaState, Cdb, CdbRepr, DataRepr, OpcodeRequest, ReadCapacity16Data,
    SetTargetPortGroupsList, UnmapDescriptor, UnmapParameterList,
};

/// Direction and expected length (bytes) of a command's data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataDirection {
    None,
    /// Data-in from the target, at most this many bytes.
    Read(u32),
    /// Data-out to the target, exactly this many bytes.
    Write(u32),
}

impl DataDirection {
    /// Expected data transfer length (iSCSI EDTL).
    pub fn len(self) -> u32 {
        match self {
            DataDirection::None => 0,
            DataDirection::Read(n) | DataDirection::Write(n) => n,
        }
    }
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
    pub fn is_read(self) -> bool {
        matches!(self, DataDirection::Read(_))
    }
    pub fn is_write(self) -> bool {
        matches!(self, DataDirection::Write(_))
    }
}

/// A SCSI command ready for a transport: CDB and data direction/length.
/// `Copy` and allocation-free, for the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScsiCommand {
    pub cdb: Cdb,
    pub direction: DataDirection,
}

/// Default allocation length for INQUIRY/VPD requests.
pub const DEFAULT_ALLOC_LEN: u16 = 255;

fn transfer_len(blocks: u32, block_size: u32) -> Result<u32, ScsiError> {
    blocks
        .checked_mul(block_size)
        .ok_or(ScsiError::TransferTooLarge { blocks, block_size })
}

impl ScsiCommand {
    pub fn new(cdb: Cdb, direction: DataDirection) -> ScsiCommand {
        ScsiCommand { cdb, direction }
    }
    /// Build from a typed CDB; the direction follows from the command and,
    /// for block I/O, `block_size`.
    pub fn from_repr(repr: &CdbRepr, block_size: u32) -> Result<ScsiCommand, ScsiError> {
        let direction = match *repr {
            CdbRepr::TestUnitReady
            | CdbRepr::StartStopUnit { .. }
            | CdbRepr::PreventAllowMediumRemoval { .. }
            | CdbRepr::SynchronizeCache10 { .. }
            | CdbRepr::SynchronizeCache16 { .. } => DataDirection::None,
            CdbRepr::Read6 { .. } | CdbRepr::Read12 { .. } => {
                let blocks = repr.lba_range().map_or(0, |r| r.1);
                DataDirection::Read(transfer_len(blocks, block_size)?)
            }
            CdbRepr::Write6 { .. } | CdbRepr::Write12 { .. } => {
                let blocks = repr.lba_range().map_or(0, |r| r.1);
                DataDirection::Write(transfer_len(blocks, block_size)?)
            }
            // BYTCHK 0: the medium is checked, no data; 3: one block is
            // compared with every block; otherwise the whole range.
            CdbRepr::Verify10 { bytchk: 0, .. }
            | CdbRepr::Verify12 { bytchk: 0, .. }
            | CdbRepr::Verify16 { bytchk: 0, .. } => DataDirection::None,
            CdbRepr::Verify10 { bytchk: 3, .. }
            | CdbRepr::Verify12 { bytchk: 3, .. }
            | CdbRepr::Verify16 { bytchk: 3, .. } => DataDirection::Write(block_size),
            CdbRepr::Verify10 { .. } | CdbRepr::Verify12 { .. } | CdbRepr::Verify16 { .. } => {
                let blocks = repr.lba_range().map_or(0, |r| r.1);
                DataDirection::Write(transfer_len(blocks, block_size)?)
            }
            CdbRepr::Read10 { blocks, .. } => {
                DataDirection::Read(transfer_len(blocks.into(), block_size)?)
            }
            CdbRepr::Read16 { blocks, .. } => {
                DataDirection::Read(transfer_len(blocks, block_size)?)
            }
            CdbRepr::Write10 { blocks, .. } => {
                DataDirection::Write(transfer_len(blocks.into(), block_size)?)
            }
            CdbRepr::Write16 { blocks, .. } => {
                DataDirection::Write(transfer_len(blocks, block_size)?)
            }
            CdbRepr::CompareAndWrite { blocks, .. } => {
                DataDirection::Write(transfer_len(2 * u32::from(blocks), block_size)?)
            }
            CdbRepr::WriteSame16 { ndob: true, .. } => DataDirection::None,
            CdbRepr::WriteSame16 { .. } | CdbRepr::WriteSame10 { .. } => {
                DataDirection::Write(block_size)
            }
            CdbRepr::SetTargetPortGroups { param_len } => DataDirection::Write(param_len),
            CdbRepr::Unmap { param_len, .. } => DataDirection::Write(param_len.into()),
            other => DataDirection::Read(other.allocation_len().unwrap_or(0)),
        };
        Ok(ScsiCommand::new(repr.emit(), direction))
    }
    /// CDB bytes (`cdb.len()` long).
    pub fn cdb_bytes(&self) -> &[u8] {
        self.cdb.as_slice()
    }
    /// Expected data transfer length in bytes.
    pub fn transfer_len(&self) -> u32 {
        self.direction.len()
    }
    /// Typed view of the CDB.
    pub fn repr(&self) -> Option<CdbRepr> {
        self.cdb.repr().ok()
    }

    pub fn test_unit_ready() -> ScsiCommand {
        ScsiCommand::new(Cdb::test_unit_ready(), DataDirection::None)
    }
    /// REQUEST SENSE for fixed-format sense data (252 bytes allowed).
    pub fn request_sense() -> ScsiCommand {
        ScsiCommand::new(Cdb::request_sense(false, 252), DataDirection::Read(252))
    }
    /// Standard INQUIRY, 255 bytes allocation.
    pub fn inquiry() -> ScsiCommand {
        ScsiCommand::inquiry_len(DEFAULT_ALLOC_LEN)
    }
    pub fn inquiry_len(alloc_len: u16) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::inquiry(alloc_len),
            DataDirection::Read(alloc_len.into()),
        )
    }
    pub fn inquiry_vpd(page: u8, alloc_len: u16) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::inquiry_vpd(page, alloc_len),
            DataDirection::Read(alloc_len.into()),
        )
    }
    pub fn supported_vpd_pages() -> ScsiCommand {
        ScsiCommand::inquiry_vpd(vpd::SUPPORTED_PAGES, DEFAULT_ALLOC_LEN)
    }
    pub fn unit_serial_number() -> ScsiCommand {
        ScsiCommand::inquiry_vpd(vpd::UNIT_SERIAL_NUMBER, DEFAULT_ALLOC_LEN)
    }
    /// VPD 83h with a 1 KiB allocation (arrays list many designators).
    pub fn device_identification() -> ScsiCommand {
        ScsiCommand::inquiry_vpd(vpd::DEVICE_IDENTIFICATION, 1024)
    }
    pub fn block_limits() -> ScsiCommand {
        ScsiCommand::inquiry_vpd(vpd::BLOCK_LIMITS, 64)
    }
    pub fn logical_block_provisioning() -> ScsiCommand {
        ScsiCommand::inquiry_vpd(vpd::LOGICAL_BLOCK_PROVISIONING, 64)
    }
    pub fn mode_sense10(page: u8, subpage: u8, alloc_len: u16) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::mode_sense10(true, page, subpage, alloc_len),
            DataDirection::Read(alloc_len.into()),
        )
    }
    pub fn read_capacity10() -> ScsiCommand {
        ScsiCommand::new(Cdb::read_capacity10(), DataDirection::Read(8))
    }
    pub fn read_capacity16() -> ScsiCommand {
        let n = ReadCapacity16Data::LEN as u32;
        ScsiCommand::new(Cdb::read_capacity16(n), DataDirection::Read(n))
    }
    pub fn report_luns(alloc_len: u32) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::report_luns(0, alloc_len),
            DataDirection::Read(alloc_len),
        )
    }
    /// REPORT TARGET PORT GROUPS with the extended header.
    pub fn report_target_port_groups(alloc_len: u32) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::report_target_port_groups(true, alloc_len),
            DataDirection::Read(alloc_len),
        )
    }
    pub fn read10(lba: u32, blocks: u16, block_size: u32) -> Result<ScsiCommand, ScsiError> {
        Ok(ScsiCommand::new(
            Cdb::read10(lba, blocks),
            DataDirection::Read(transfer_len(blocks.into(), block_size)?),
        ))
    }
    pub fn read16(lba: u64, blocks: u32, block_size: u32) -> Result<ScsiCommand, ScsiError> {
        Ok(ScsiCommand::new(
            Cdb::read16(lba, blocks),
            DataDirection::Read(transfer_len(blocks, block_size)?),
        ))
    }
    pub fn write10(
        lba: u32,
        blocks: u16,
        block_size: u32,
        fua: bool,
    ) -> Result<ScsiCommand, ScsiError> {
        Ok(ScsiCommand::new(
            Cdb::write10(lba, blocks, fua),
            DataDirection::Write(transfer_len(blocks.into(), block_size)?),
        ))
    }
    pub fn write16(
        lba: u64,
        blocks: u32,
        block_size: u32,
        fua: bool,
    ) -> Result<ScsiCommand, ScsiError> {
        Ok(ScsiCommand::new(
            Cdb::write16(lba, blocks, fua),
            DataDirection::Write(transfer_len(blocks, block_size)?),
        ))
    }
    /// SYNCHRONIZE CACHE(16) of the whole LU.
    pub fn synchronize_cache() -> ScsiCommand {
        ScsiCommand::synchronize_cache16(0, 0, false)
    }
    pub fn synchronize_cache10(lba: u32, blocks: u16, immed: bool) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::synchronize_cache10(lba, blocks, immed),
            DataDirection::None,
        )
    }
    pub fn synchronize_cache16(lba: u64, blocks: u32, immed: bool) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::synchronize_cache16(lba, blocks, immed),
            DataDirection::None,
        )
    }
    /// UNMAP with its parameter list (the data-out to send).
    pub fn unmap(ranges: &[UnmapDescriptor]) -> Result<(ScsiCommand, Vec<u8>), ScsiError> {
        if ranges.len() > UnmapParameterList::MAX_DESCRIPTORS {
            return Err(ScsiError::TooManyDescriptors(ranges.len()));
        }
        let list = UnmapParameterList {
            descriptors: ranges.to_vec(),
        }
        .to_vec();
        let len = list.len() as u16;
        Ok((
            ScsiCommand::new(Cdb::unmap(len), DataDirection::Write(len.into())),
            list,
        ))
    }
    /// COMPARE AND WRITE of `blocks` blocks at `lba` (VMware's ATS): the
    /// data-out is the expected blocks followed by the new blocks; the
    /// target writes only when the medium matches the expected blocks.
    pub fn compare_and_write(
        lba: u64,
        blocks: u8,
        block_size: u32,
        fua: bool,
    ) -> Result<ScsiCommand, ScsiError> {
        Ok(ScsiCommand::new(
            Cdb::compare_and_write(lba, blocks, fua),
            DataDirection::Write(transfer_len(2 * u32::from(blocks), block_size)?),
        ))
    }
    /// WRITE SAME(16); the data-out is one block (zeroes, for `unmap`).
    pub fn write_same16(lba: u64, blocks: u32, block_size: u32, unmap: bool) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::write_same16(lba, blocks, unmap),
            DataDirection::Write(block_size),
        )
    }
    /// WRITE SAME(10); the data-out is one block.
    pub fn write_same10(lba: u32, blocks: u16, block_size: u32, unmap: bool) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::write_same10(lba, blocks, unmap),
            DataDirection::Write(block_size),
        )
    }
    /// GET LBA STATUS from `lba`, `alloc_len` bytes of descriptors at most.
    pub fn get_lba_status(lba: u64, alloc_len: u32) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::get_lba_status(lba, alloc_len),
            DataDirection::Read(alloc_len),
        )
    }
    /// REPORT SUPPORTED OPERATION CODES.
    pub fn report_supported_opcodes(request: OpcodeRequest, alloc_len: u32) -> ScsiCommand {
        ScsiCommand::new(
            Cdb::report_supported_opcodes(request, alloc_len),
            DataDirection::Read(alloc_len),
        )
    }
    /// SET TARGET PORT GROUPS with its parameter list (the data-out to send).
    pub fn set_target_port_groups(groups: &[(u16, AluaState)]) -> (ScsiCommand, Vec<u8>) {
        let list = SetTargetPortGroupsList {
            groups: groups.to_vec(),
        }
        .to_vec();
        let len = list.len() as u32;
        (
            ScsiCommand::new(Cdb::set_target_port_groups(len), DataDirection::Write(len)),
            list,
        )
    }
}
