//! A blocking handle on one logical unit over one iSCSI session: the SCSI
//! commands a user or tool needs, with UNIT ATTENTION / BUSY retries and
//! responses decoded. Used by the CLI and as the simplest library entry.

use super::caps::{split, Feature, SupportedCommands, TransferLimits};
use super::{check_status, Capacity, DataRepr, LunInfo, ScsiCommand, ScsiError};
use crate::iscsi::connection::{Command, Direction};
use crate::iscsi::session::{Session, SessionError};
use crate::transport::Transport;
use crate::wire::scsi::{
    vpd, AluaState, BlockLimits, DeviceIdentification, InquiryData, LbaStatusData,
    LogicalBlockProvisioning, Lun, OneOpcode, OpcodeRequest, ReadCapacity10Data,
    ReadCapacity16Data, ReportLunsData, SupportedOpcodes, SupportedVpdPages, TargetPortGroupsData,
    UnitSerialNumber, UnmapDescriptor, UnmapParameterList,
};
use std::time::Duration;
use thiserror::Error;

/// How many times a retryable status (UNIT ATTENTION, BUSY, ...) is retried.
pub const DEFAULT_RETRIES: u32 = 8;

#[derive(Debug, Error)]
pub enum LunError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("SCSI error: {0}")]
    Scsi(#[from] ScsiError),
    #[error("iSCSI target failure (response {0:#04x}) for {1}")]
    TargetFailure(u8, String),
    #[error("{what}: target returned {got} bytes, at least {need} needed")]
    ShortData {
        what: &'static str,
        got: usize,
        need: usize,
    },
    #[error("block range {lba}+{blocks} is past the end of the LUN ({capacity} blocks)")]
    OutOfRange {
        lba: u64,
        blocks: u64,
        capacity: u64,
    },
    #[error("buffer of {len} bytes is not a multiple of the block size {block_size}")]
    Unaligned { len: usize, block_size: u32 },
    /// COMPARE AND WRITE found other data on the medium; nothing was written.
    #[error(
        "COMPARE AND WRITE miscompare at byte {offset} of the compared blocks; nothing written"
    )]
    Miscompare { offset: u64 },
    #[error("COMPARE AND WRITE: {0}")]
    CompareAndWrite(String),
    /// The LU's REPORT SUPPORTED OPERATION CODES leaves the command out,
    /// so it was not sent.
    #[error("target does not support {0} (not in its REPORT SUPPORTED OPERATION CODES); not sent")]
    Unsupported(Feature),
    #[error("WRITE SAME needs exactly one block of data ({block_size} bytes), got {len}")]
    WriteSameBlock { len: usize, block_size: u32 },
}

pub struct LunHandle<T: Transport> {
    session: Session<T>,
    lun: u64,
    pub timeout: Duration,
    pub retries: u32,
    /// Filled by [`read_capacity`](Self::read_capacity).
    capacity: Option<Capacity>,
    /// Filled by [`capabilities`](Self::capabilities).
    caps: Option<(SupportedCommands, TransferLimits)>,
}

impl<T: Transport> LunHandle<T> {
    pub fn new(session: Session<T>, lun_number: u16) -> LunHandle<T> {
        LunHandle {
            session,
            lun: Lun::from_number(lun_number).to_u64(),
            timeout: Duration::from_secs(30),
            retries: DEFAULT_RETRIES,
            capacity: None,
            caps: None,
        }
    }

    pub fn session(&mut self) -> &mut Session<T> {
        &mut self.session
    }

    pub fn into_session(self) -> Session<T> {
        self.session
    }

    /// Runs `cmd` with `buffer` (data-out for writes; sized for data-in
    /// otherwise), retrying retryable statuses. Returns the buffer and the
    /// bytes the target transferred.
    pub fn run(
        &mut self,
        cmd: &ScsiCommand,
        buffer: Vec<u8>,
    ) -> Result<(Vec<u8>, usize), LunError> {
        let direction = match cmd.direction {
            super::DataDirection::None => Direction::None,
            super::DataDirection::Read(_) => Direction::Read,
            super::DataDirection::Write(_) => Direction::Write,
        };
        let mut buffer = buffer;
        let mut attempt = 0;
        loop {
            let c = Command::new(self.lun, cmd.cdb_bytes(), direction, buffer)
                .map_err(|e| LunError::Session(e.into()))?;
            let done = self.session.execute(c, self.timeout)?;
            if done.response != 0 {
                return Err(LunError::TargetFailure(done.response, describe(cmd)));
            }
            match check_status(done.status, &done.sense) {
                Ok(()) => return Ok((done.buffer, done.transferred)),
                Err(e) if e.is_retryable() && attempt < self.retries => {
                    attempt += 1;
                    buffer = done.buffer;
                    // BUSY / TASK SET FULL: give the target a moment.
                    if e.unit_attention().is_none() {
                        std::thread::sleep(Duration::from_millis(10 << attempt.min(6)));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn data_in<R: DataRepr>(
        &mut self,
        cmd: ScsiCommand,
        what: &'static str,
    ) -> Result<R, LunError> {
        let len = cmd.transfer_len() as usize;
        let (buf, n) = self.run(&cmd, vec![0; len])?;
        R::parse(&buf[..n.min(buf.len())]).map_err(|e| {
            let _ = what;
            LunError::Scsi(ScsiError::BadData(e))
        })
    }

    pub fn test_unit_ready(&mut self) -> Result<(), LunError> {
        self.run(&ScsiCommand::test_unit_ready(), Vec::new())?;
        Ok(())
    }

    pub fn inquiry(&mut self) -> Result<InquiryData, LunError> {
        self.data_in(ScsiCommand::inquiry(), "INQUIRY")
    }

    pub fn supported_vpd_pages(&mut self) -> Result<SupportedVpdPages, LunError> {
        self.data_in(ScsiCommand::supported_vpd_pages(), "VPD 0x00")
    }

    pub fn unit_serial_number(&mut self) -> Result<UnitSerialNumber, LunError> {
        self.data_in(ScsiCommand::unit_serial_number(), "VPD 0x80")
    }

    pub fn device_identification(&mut self) -> Result<DeviceIdentification, LunError> {
        self.data_in(ScsiCommand::device_identification(), "VPD 0x83")
    }

    pub fn report_target_port_groups(&mut self) -> Result<TargetPortGroupsData, LunError> {
        self.data_in(
            ScsiCommand::report_target_port_groups(4096),
            "REPORT TARGET PORT GROUPS",
        )
    }

    /// READ CAPACITY(16), falling back to (10) for old targets.
    pub fn read_capacity(&mut self) -> Result<Capacity, LunError> {
        let cap = match self
            .data_in::<ReadCapacity16Data>(ScsiCommand::read_capacity16(), "READ CAPACITY(16)")
        {
            Ok(d) => Capacity::from(&d),
            Err(LunError::Scsi(e)) if !e.is_retryable() => {
                let d: ReadCapacity10Data =
                    self.data_in(ScsiCommand::read_capacity10(), "READ CAPACITY(10)")?;
                Capacity::from(&d)
            }
            Err(e) => return Err(e),
        };
        self.capacity = Some(cap);
        Ok(cap)
    }

    /// REPORT LUNS, growing the buffer when the list is longer.
    pub fn report_luns(&mut self) -> Result<ReportLunsData, LunError> {
        let mut alloc = 4096u32;
        loop {
            let (buf, n) = self.run(&ScsiCommand::report_luns(alloc), vec![0; alloc as usize])?;
            let data = &buf[..n.min(buf.len())];
            match ReportLunsData::required_len(data) {
                Some(need) if need > alloc as u64 && need <= 1 << 20 => alloc = need as u32,
                _ => return Ok(ReportLunsData::parse(data).map_err(ScsiError::BadData)?),
            }
        }
    }

    /// Everything a user wants to know about the LU, VPD pages where supported.
    pub fn lun_info(&mut self) -> Result<LunInfo, LunError> {
        let inquiry = self.inquiry()?;
        let cap = self.read_capacity()?;
        let mut info = LunInfo::new(&inquiry, &cap).with_lun(self.lun);
        if let Ok(pages) = self.supported_vpd_pages() {
            if pages.supports(vpd::UNIT_SERIAL_NUMBER) {
                if let Ok(p) = self.unit_serial_number() {
                    info = info.with_serial(&p);
                }
            }
            if pages.supports(vpd::DEVICE_IDENTIFICATION) {
                if let Ok(p) = self.device_identification() {
                    info = info.with_device_id(&p);
                }
            }
            if pages.supports(vpd::BLOCK_LIMITS) {
                if let Ok(p) = self.data_in::<BlockLimits>(ScsiCommand::block_limits(), "VPD 0xB0")
                {
                    info = info.with_block_limits(&p);
                }
            }
            if pages.supports(vpd::LOGICAL_BLOCK_PROVISIONING) {
                if let Ok(p) = self.data_in::<LogicalBlockProvisioning>(
                    ScsiCommand::logical_block_provisioning(),
                    "VPD 0xB2",
                ) {
                    info = info.with_provisioning(&p);
                }
            }
        }
        Ok(info)
    }

    fn capacity(&mut self) -> Result<Capacity, LunError> {
        match self.capacity {
            Some(c) => Ok(c),
            None => self.read_capacity(),
        }
    }

    fn check_range(&mut self, lba: u64, blocks: u64) -> Result<u32, LunError> {
        let cap = self.capacity()?;
        if lba
            .checked_add(blocks)
            .is_none_or(|end| end > cap.block_count)
        {
            return Err(LunError::OutOfRange {
                lba,
                blocks,
                capacity: cap.block_count,
            });
        }
        Ok(cap.block_size)
    }

    /// REPORT SUPPORTED OPERATION CODES, all commands.
    pub fn report_supported_opcodes(&mut self) -> Result<SupportedOpcodes, LunError> {
        let mut alloc = 4096u32;
        loop {
            let cmd = ScsiCommand::report_supported_opcodes(OpcodeRequest::All, alloc);
            let (buf, n) = self.run(&cmd, vec![0; alloc as usize])?;
            let data = &buf[..n.min(buf.len())];
            let need = data
                .get(..4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .saturating_add(4);
            if need > alloc && need <= 1 << 20 {
                alloc = need;
                continue;
            }
            return Ok(SupportedOpcodes::parse(data).map_err(ScsiError::BadData)?);
        }
    }

    /// REPORT SUPPORTED OPERATION CODES for one command (`service_action`
    /// for commands that have them).
    pub fn report_supported_opcode(
        &mut self,
        opcode: u8,
        service_action: Option<u16>,
    ) -> Result<OneOpcode, LunError> {
        let request = match service_action {
            Some(sa) => OpcodeRequest::ServiceAction(opcode, sa),
            None => OpcodeRequest::Opcode(opcode),
        };
        self.data_in(
            ScsiCommand::report_supported_opcodes(request, 64),
            "REPORT SUPPORTED OPERATION CODES",
        )
    }

    /// What the LU supports and its Block Limits, asked once (REPORT
    /// SUPPORTED OPERATION CODES and VPD B0h; a target that answers
    /// neither gets every command, unsplit).
    pub fn capabilities(&mut self) -> Result<(SupportedCommands, TransferLimits), LunError> {
        if let Some(c) = &self.caps {
            return Ok(c.clone());
        }
        let ops = match self.report_supported_opcodes() {
            Ok(o) => SupportedCommands(Some(o)),
            Err(LunError::Scsi(e)) if !e.is_retryable() => SupportedCommands(None),
            Err(e) => return Err(e),
        };
        let limits = match self.data_in::<BlockLimits>(ScsiCommand::block_limits(), "VPD 0xB0") {
            Ok(b) => TransferLimits::from(&b),
            Err(LunError::Scsi(e)) if !e.is_retryable() => TransferLimits::default(),
            Err(e) => return Err(e),
        };
        self.caps = Some((ops, limits));
        Ok(self.caps.clone().unwrap_or_default())
    }

    fn require(&mut self, f: Feature) -> Result<TransferLimits, LunError> {
        let (ops, limits) = self.capabilities()?;
        if ops.supports(f) {
            Ok(limits)
        } else {
            Err(LunError::Unsupported(f))
        }
    }

    /// GET LBA STATUS from `lba`: the provisioning status (mapped,
    /// deallocated, anchored) of the blocks from there, as far as the
    /// target reports in one answer (up to 255 descriptors).
    pub fn get_lba_status(&mut self, lba: u64) -> Result<LbaStatusData, LunError> {
        self.require(Feature::GetLbaStatus)?;
        self.check_range(lba, 1)?;
        let alloc = 8 + 16 * 255;
        self.data_in(ScsiCommand::get_lba_status(lba, alloc), "GET LBA STATUS")
    }

    /// SET TARGET PORT GROUPS: asks the target to move each listed target
    /// port group to its access state (explicit ALUA).
    pub fn set_target_port_groups(&mut self, groups: &[(u16, AluaState)]) -> Result<(), LunError> {
        self.require(Feature::SetTargetPortGroups)?;
        let (cmd, list) = ScsiCommand::set_target_port_groups(groups);
        self.run(&cmd, list)?;
        Ok(())
    }

    /// UNMAP of `blocks` blocks at `lba`, in as many UNMAP commands as the
    /// Block Limits (MAXIMUM UNMAP LBA COUNT and BLOCK DESCRIPTOR COUNT) need.
    pub fn unmap(&mut self, lba: u64, blocks: u64) -> Result<(), LunError> {
        let limits = self.require(Feature::Unmap)?;
        self.check_range(lba, blocks)?;
        let per_cmd = u64::from(limits.unmap_chunk_blocks());
        let max_desc =
            (limits.max_unmap_descriptors as usize).clamp(1, UnmapParameterList::MAX_DESCRIPTORS);
        for (at, n) in split(lba, blocks, per_cmd.min(u64::from(u32::MAX)) as u32) {
            // One command: up to max_desc descriptors of at most u32::MAX blocks.
            let ranges: Vec<UnmapDescriptor> = split(at, u64::from(n), u32::MAX)
                .map(|(lba, blocks)| UnmapDescriptor { lba, blocks })
                .collect();
            for group in ranges.chunks(max_desc) {
                let (cmd, list) = ScsiCommand::unmap(group)?;
                self.run(&cmd, list)?;
            }
        }
        Ok(())
    }

    /// WRITE SAME of the one block in `block` to `blocks` blocks at `lba`
    /// (`unmap`: the target may deallocate them, `block` must be zeroes).
    /// Split at MAXIMUM WRITE SAME LENGTH; WRITE SAME(10) where the target
    /// lacks WRITE SAME(16) and the range fits.
    pub fn write_same(
        &mut self,
        lba: u64,
        blocks: u64,
        block: &[u8],
        unmap: bool,
    ) -> Result<(), LunError> {
        let bs = self.check_range(lba, blocks)?;
        if block.len() != bs as usize {
            return Err(LunError::WriteSameBlock {
                len: block.len(),
                block_size: bs,
            });
        }
        let (ops, limits) = self.capabilities()?;
        let ws16 = ops.supports(Feature::WriteSame16);
        let ws10 = ops.supports(Feature::WriteSame10);
        let fits10 = lba.saturating_add(blocks) <= u64::from(u32::MAX);
        if !(ws16 || ws10 && fits10) {
            return Err(LunError::Unsupported(Feature::WriteSame16));
        }
        let mut max = limits.write_same_chunk_blocks();
        if !ws16 {
            max = max.min(u32::from(u16::MAX));
        }
        for (at, n) in split(lba, blocks, max) {
            let cmd = if ws16 {
                ScsiCommand::write_same16(at, n, bs, unmap)
            } else {
                ScsiCommand::write_same10(at as u32, n as u16, bs, unmap)
            };
            self.run(&cmd, block.to_vec())?;
        }
        Ok(())
    }

    /// Reads `blocks` blocks at `lba` (READ(16)), in pieces of at most the
    /// Block Limits MAXIMUM TRANSFER LENGTH.
    pub fn read(&mut self, lba: u64, blocks: u32) -> Result<Vec<u8>, LunError> {
        let bs = self.check_range(lba, blocks as u64)?;
        let chunk = self.capabilities()?.1.io_chunk_blocks();
        let mut out = Vec::with_capacity(blocks as usize * bs as usize);
        for (at, n) in split(lba, blocks.into(), chunk) {
            let cmd = ScsiCommand::read16(at, n, bs)?;
            let (buf, got) = self.run(&cmd, vec![0; cmd.transfer_len() as usize])?;
            if got < buf.len() {
                return Err(LunError::ShortData {
                    what: "READ(16)",
                    got,
                    need: buf.len(),
                });
            }
            if out.is_empty() && n == blocks {
                return Ok(buf);
            }
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    /// Writes `data` (a whole number of blocks) at `lba` (WRITE(16)).
    /// Returns the buffer for reuse.
    pub fn write(&mut self, lba: u64, data: Vec<u8>) -> Result<Vec<u8>, LunError> {
        let cap = self.capacity()?;
        let bs = cap.block_size;
        if bs == 0 || !data.len().is_multiple_of(bs as usize) {
            return Err(LunError::Unaligned {
                len: data.len(),
                block_size: bs,
            });
        }
        let blocks = (data.len() / bs as usize) as u32;
        self.check_range(lba, blocks as u64)?;
        let chunk = self.capabilities()?.1.io_chunk_blocks();
        if blocks <= chunk {
            let cmd = ScsiCommand::write16(lba, blocks, bs, false)?;
            return Ok(self.run(&cmd, data)?.0);
        }
        // Beyond MAXIMUM TRANSFER LENGTH: one WRITE per piece.
        for (at, n) in split(lba, blocks.into(), chunk) {
            let from = ((at - lba) * u64::from(bs)) as usize;
            let piece = data[from..from + n as usize * bs as usize].to_vec();
            let cmd = ScsiCommand::write16(at, n, bs, false)?;
            self.run(&cmd, piece)?;
        }
        Ok(data)
    }

    /// COMPARE AND WRITE at `lba`: writes `new` only when the medium holds
    /// `expected` (same length, whole blocks, at most 255 blocks), atomically.
    /// A mismatch is [`LunError::Miscompare`] with the first differing
    /// byte's offset (the sense INFORMATION field).
    pub fn compare_and_write(
        &mut self,
        lba: u64,
        expected: &[u8],
        new: &[u8],
    ) -> Result<(), LunError> {
        self.require(Feature::CompareAndWrite)?;
        let bs = self.capacity()?.block_size;
        if expected.len() != new.len() {
            return Err(LunError::CompareAndWrite(format!(
                "{} bytes to compare but {} to write",
                expected.len(),
                new.len()
            )));
        }
        if bs == 0 || expected.is_empty() || !expected.len().is_multiple_of(bs as usize) {
            return Err(LunError::Unaligned {
                len: expected.len(),
                block_size: bs,
            });
        }
        let blocks = u8::try_from(expected.len() / bs as usize).map_err(|_| {
            LunError::CompareAndWrite(format!(
                "{} blocks; at most 255 fit the CDB",
                expected.len() / bs as usize
            ))
        })?;
        self.check_range(lba, blocks.into())?;
        let cmd = ScsiCommand::compare_and_write(lba, blocks, bs, false)?;
        let mut data = Vec::with_capacity(2 * expected.len());
        data.extend_from_slice(expected);
        data.extend_from_slice(new);
        match self.run(&cmd, data) {
            Ok(_) => Ok(()),
            Err(LunError::Scsi(e)) => match e.sense() {
                Some(s) if s.key == crate::wire::scsi::SenseKey::Miscompare && s.asc == 0x1d => {
                    Err(LunError::Miscompare {
                        offset: s.information.unwrap_or(0),
                    })
                }
                _ => Err(LunError::Scsi(e)),
            },
            Err(e) => Err(e),
        }
    }

    pub fn synchronize_cache(&mut self) -> Result<(), LunError> {
        self.run(&ScsiCommand::synchronize_cache(), Vec::new())?;
        Ok(())
    }
}

fn describe(cmd: &ScsiCommand) -> String {
    match cmd.repr() {
        Some(r) => r.to_string(),
        None => format!(
            "opcode {:#04x}",
            cmd.cdb_bytes().first().copied().unwrap_or(0)
        ),
    }
}
