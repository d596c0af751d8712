//! Block I/O requests and completions as the application sees them, how they
//! become SCSI commands, and what to do with a command's outcome (complete,
//! retry, fail).
#![warn(missing_docs)]

use crate::iscsi::connection::{Command, Completion, Direction, SubmitError};
use crate::scsi::{
    check_status, ErrorClass, Feature, ScsiCommand, ScsiError, SupportedCommands, TransferLimits,
    UnitAttention, UnmapDescriptor,
};
use crate::wire::scsi::{DataRepr, UnmapParameterList};
use std::time::Duration;
use thiserror::Error;

/// Block operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum IoOp {
    /// READ(16) of `blocks` blocks into `buffer` (resized to fit).
    Read,
    /// WRITE(16) of `buffer` (exactly `blocks` blocks).
    Write,
    /// WRITE(16) with FUA: on stable media when it completes, without a
    /// SYNCHRONIZE CACHE of the whole LU.
    WriteFua,
    /// SYNCHRONIZE CACHE(16) of the whole LU; `lba`/`blocks` ignored.
    Flush,
    /// UNMAP of one range; `buffer` is reused for the parameter list.
    Unmap,
    /// WRITE SAME(16): `buffer` holds one block written `blocks` times.
    WriteSame,
}

/// One I/O request. The buffer travels with it and comes back in the
/// completion, so an application can reuse buffers without allocating.
#[derive(Debug, Clone)]
pub struct Io {
    /// What to do.
    pub op: IoOp,
    /// First logical block.
    pub lba: u64,
    /// Number of blocks (ignored by `Flush`; never 0 for `WriteSame`, which
    /// SCSI would read as "to the end of the LU").
    pub blocks: u32,
    /// Data to write, room for data to read (resized, no allocation when
    /// its capacity suffices), or scratch for the UNMAP parameter list.
    pub buffer: Vec<u8>,
    /// Returned unchanged in the completion.
    pub user_tag: u64,
}

impl Io {
    /// READ(16) of `blocks` blocks at `lba` into `buffer`.
    pub fn read(lba: u64, blocks: u32, buffer: Vec<u8>, user_tag: u64) -> Io {
        Io {
            op: IoOp::Read,
            lba,
            blocks,
            buffer,
            user_tag,
        }
    }
    /// WRITE(16) of `buffer` (exactly `blocks` blocks) at `lba`.
    pub fn write(lba: u64, blocks: u32, buffer: Vec<u8>, user_tag: u64) -> Io {
        Io {
            op: IoOp::Write,
            lba,
            blocks,
            buffer,
            user_tag,
        }
    }
    /// WRITE(16) of `buffer` at `lba`; `durable` sets FUA, so the data is
    /// on stable media (not just in the target's cache) when it completes.
    pub fn write_durable(
        lba: u64,
        blocks: u32,
        buffer: Vec<u8>,
        durable: bool,
        user_tag: u64,
    ) -> Io {
        Io {
            op: if durable { IoOp::WriteFua } else { IoOp::Write },
            lba,
            blocks,
            buffer,
            user_tag,
        }
    }

    /// SYNCHRONIZE CACHE of the whole LU: everything acknowledged before
    /// it completes is durable once it completes.
    pub fn flush(user_tag: u64) -> Io {
        Io {
            op: IoOp::Flush,
            lba: 0,
            blocks: 0,
            buffer: Vec::new(),
            user_tag,
        }
    }

    /// UNMAP of `blocks` blocks at `lba`; `buffer` (any, e.g. empty) is
    /// reused for the 24-byte parameter list.
    pub fn unmap(lba: u64, blocks: u32, buffer: Vec<u8>, user_tag: u64) -> Io {
        Io {
            op: IoOp::Unmap,
            lba,
            blocks,
            buffer,
            user_tag,
        }
    }

    /// WRITE SAME(16): writes the one block in `block` to `blocks` blocks
    /// at `lba` (a zero block zeroes the range). `blocks` must not be 0.
    pub fn write_same(lba: u64, blocks: u32, block: Vec<u8>, user_tag: u64) -> Io {
        Io {
            op: IoOp::WriteSame,
            lba,
            blocks,
            buffer: block,
            user_tag,
        }
    }
}

/// Why an I/O failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IoError {
    /// The target completed the command with a non-GOOD status that is not
    /// worth retrying (e.g. CHECK CONDITION with MEDIUM ERROR or ILLEGAL
    /// REQUEST); the sense data is decoded ([`IoError::sense`]).
    #[error("SCSI error: {0}")]
    Scsi(ScsiError),
    /// A retryable status (UNIT ATTENTION, BUSY, TASK SET FULL, ...) came
    /// back `max_retries` times.
    #[error("gave up after {retries} retries; last error: {last}")]
    RetriesExhausted {
        /// Retries made.
        retries: u32,
        /// The last status.
        last: ScsiError,
    },
    /// Every path was down (or not usable) for `no_path_timeout`.
    #[error("no usable path for {waited:?} (no_path_timeout)")]
    NoPath {
        /// How long the I/O waited for a path.
        waited: Duration,
    },
    /// The request reaches past the end of the LU (nothing was sent).
    #[error("blocks {lba}..{end} are beyond the end of the device ({capacity} blocks)")]
    OutOfRange {
        /// First block asked for.
        lba: u64,
        /// One past the last block asked for.
        end: u64,
        /// The LU's size in blocks.
        capacity: u64,
    },
    /// The buffer does not fit the request (nothing was sent).
    #[error("buffer of {got} bytes for {op:?} needs {expected} bytes")]
    BadBuffer {
        /// The operation.
        op: IoOp,
        /// Bytes needed.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// The iSCSI layer reported a target failure (response code) on every try.
    #[error("the target reported an iSCSI target failure (response {0:#04x})")]
    TargetFailure(u8),
    /// The device was closed with the I/O still queued or in flight.
    #[error("the device is closed")]
    Closed,
    /// A path failed while handing the command to its session, and the
    /// command could not be recovered (rare; the data state is unknown).
    #[error("path {path} failed while taking the command, and it was lost: {reason}")]
    PathLost {
        /// The path that had the command.
        path: usize,
        /// Why its session refused the command.
        reason: SubmitError,
    },
    /// A write came back from a path whose session failed before the target
    /// answered, and that path could not be fenced (logged in again, which
    /// ends its old session) within `fence_timeout`. The write was not
    /// retried elsewhere; whether the target ran it, or still will, is
    /// unknown.
    #[error("write not retried: path {path} could not be fenced within {waited:?}, so the target may still run the copy it had")]
    NotFenced {
        /// The path the write was on.
        path: usize,
        /// How long it waited for the fence.
        waited: Duration,
    },
    /// The command was overdue on a live path and the target confirmed an
    /// ABORT TASK of it `aborts` times (the last on path `path`), each time
    /// after twice as long as before (`AbortPolicy::after_for`): the target
    /// stays too slow for it, so it is not retried again. It did not run
    /// in any of those attempts.
    #[error("{op:?} (user tag {user_tag:#x}, opcode {opcode:#04x}) aborted {aborts} times as overdue, the last on path {path}: not retried again")]
    Aborted {
        /// The operation.
        op: IoOp,
        /// The request's `user_tag`.
        user_tag: u64,
        /// The CDB's operation code.
        opcode: u8,
        /// The path of the last abort.
        path: usize,
        /// Confirmed ABORT TASKs.
        aborts: u32,
    },
    /// A request that needs at least one block got none.
    #[error("{op:?} of 0 blocks")]
    ZeroLength {
        /// The operation.
        op: IoOp,
    },
    /// The LU's REPORT SUPPORTED OPERATION CODES leaves out the command
    /// this request needs (nothing was sent).
    #[error("target does not support {0} (not in its REPORT SUPPORTED OPERATION CODES); not sent")]
    Unsupported(Feature),
    /// The request is longer than the LU's Block Limits allow in one
    /// command (nothing was sent). The blocking helpers
    /// ([`IoQueue::read_at`](crate::IoQueue::read_at) and the like) split
    /// instead; [`WorkerDevice::limits`](crate::WorkerDevice::limits)
    /// has the limits.
    #[error("{op:?} of {blocks} blocks is over the target's limit of {max} blocks per command (Block Limits VPD); split it")]
    TooLarge {
        /// The operation.
        op: IoOp,
        /// Blocks asked for.
        blocks: u32,
        /// The most one command may carry.
        max: u32,
    },
}

/// What the LU supports and the Block Limits it set, as learnt at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LuCaps {
    /// REPORT SUPPORTED OPERATION CODES (unknown: send everything).
    pub commands: SupportedCommands,
    /// Block Limits VPD page (none reported: no limits).
    pub limits: TransferLimits,
}

impl LuCaps {
    /// Checks `io` against the LU's commands and limits. `Ok(true)`: send a
    /// WRITE SAME as WRITE SAME(10) (the LU lacks WRITE SAME(16)).
    pub fn check(&self, io: &Io) -> Result<bool, IoError> {
        let too_large = |max: u32| {
            if io.blocks > max {
                Err(IoError::TooLarge {
                    op: io.op,
                    blocks: io.blocks,
                    max,
                })
            } else {
                Ok(())
            }
        };
        match io.op {
            IoOp::Read | IoOp::Write | IoOp::WriteFua => too_large(
                self.limits
                    .io_chunk_blocks()
                    .max(self.limits.max_transfer_blocks),
            )?,
            IoOp::Flush => {}
            IoOp::Unmap => {
                if !self.commands.supports(Feature::Unmap) {
                    return Err(IoError::Unsupported(Feature::Unmap));
                }
                too_large(self.limits.unmap_chunk_blocks())?;
            }
            IoOp::WriteSame => {
                let max = self.limits.write_same_chunk_blocks();
                if self.commands.supports(Feature::WriteSame16) {
                    too_large(max)?;
                } else if self.commands.supports(Feature::WriteSame10)
                    && io.lba.saturating_add(u64::from(io.blocks)) <= u64::from(u32::MAX)
                {
                    too_large(max.min(u32::from(u16::MAX)))?;
                    return Ok(true);
                } else {
                    return Err(IoError::Unsupported(Feature::WriteSame16));
                }
            }
        }
        Ok(false)
    }
}

impl IoError {
    /// The decoded sense data, when the target answered CHECK CONDITION
    /// (directly, or as the last error before retries ran out).
    pub fn sense(&self) -> Option<&crate::wire::scsi::SenseData> {
        match self {
            IoError::Scsi(ScsiError::CheckCondition { sense })
            | IoError::RetriesExhausted {
                last: ScsiError::CheckCondition { sense },
                ..
            } => Some(sense),
            _ => None,
        }
    }

    /// The SCSI error behind this failure, if the target returned one.
    pub fn scsi(&self) -> Option<&ScsiError> {
        match self {
            IoError::Scsi(e) | IoError::RetriesExhausted { last: e, .. } => Some(e),
            _ => None,
        }
    }

    /// Whether the target refused the I/O with RESERVATION CONFLICT
    /// (another initiator holds a persistent reservation this one may not
    /// write, or read, under).
    pub fn is_reservation_conflict(&self) -> bool {
        matches!(self.scsi(), Some(ScsiError::ReservationConflict))
    }

    /// Whether no path was usable for the whole `no_path_timeout`.
    pub fn is_no_path(&self) -> bool {
        matches!(self, IoError::NoPath { .. })
    }
}

/// Builds the SCSI command for `io`, moving its buffer into the command.
/// On error the buffer stays in `io`.
pub fn build_command(
    io: &mut Io,
    lun: u64,
    block_size: u32,
    capacity_blocks: u64,
) -> Result<Command, IoError> {
    build_command_for(io, lun, block_size, capacity_blocks, &LuCaps::default())
}

/// [`build_command`] for an LU with `caps`: refuses what the LU does not
/// support or what is over its Block Limits, and sends WRITE SAME(10)
/// where the LU has only that.
pub fn build_command_for(
    io: &mut Io,
    lun: u64,
    block_size: u32,
    capacity_blocks: u64,
    caps: &LuCaps,
) -> Result<Command, IoError> {
    let ws10 = caps.check(io)?;
    let bs = block_size as usize;
    let check_range = |io: &Io| {
        let end = io.lba.saturating_add(u64::from(io.blocks));
        if end > capacity_blocks {
            Err(IoError::OutOfRange {
                lba: io.lba,
                end,
                capacity: capacity_blocks,
            })
        } else {
            Ok(())
        }
    };
    let bad_buffer = |io: &Io, expected: usize| IoError::BadBuffer {
        op: io.op,
        expected,
        got: io.buffer.len(),
    };
    let (scsi, direction) = match io.op {
        IoOp::Read => {
            check_range(io)?;
            let c = ScsiCommand::read16(io.lba, io.blocks, block_size).map_err(IoError::Scsi)?;
            // No allocation when the caller's buffer already has the capacity.
            io.buffer.resize(c.transfer_len() as usize, 0);
            (c, Direction::Read)
        }
        IoOp::Write | IoOp::WriteFua => {
            check_range(io)?;
            let fua = io.op == IoOp::WriteFua;
            let c =
                ScsiCommand::write16(io.lba, io.blocks, block_size, fua).map_err(IoError::Scsi)?;
            if io.buffer.len() != c.transfer_len() as usize {
                return Err(bad_buffer(io, c.transfer_len() as usize));
            }
            (c, Direction::Write)
        }
        IoOp::Flush => {
            io.buffer.clear();
            (ScsiCommand::synchronize_cache(), Direction::None)
        }
        IoOp::WriteSame => {
            check_range(io)?;
            if io.blocks == 0 {
                // 0 means "to the end of the LU" in the CDB: never by accident.
                return Err(IoError::ZeroLength { op: io.op });
            }
            if io.buffer.len() != bs {
                return Err(bad_buffer(io, bs));
            }
            let c = if ws10 {
                ScsiCommand::write_same10(io.lba as u32, io.blocks as u16, block_size, false)
            } else {
                ScsiCommand::write_same16(io.lba, io.blocks, block_size, false)
            };
            (c, Direction::Write)
        }
        IoOp::Unmap => {
            check_range(io)?;
            let list = UnmapParameterList {
                descriptors: vec![UnmapDescriptor {
                    lba: io.lba,
                    blocks: io.blocks,
                }],
            }
            .to_vec();
            io.buffer.clear();
            io.buffer.extend_from_slice(&list);
            (
                ScsiCommand::new(
                    crate::wire::scsi::Cdb::unmap(list.len() as u16),
                    crate::scsi::DataDirection::Write(list.len() as u32),
                ),
                Direction::Write,
            )
        }
    };
    let mut cdb = [0u8; 16];
    let bytes = scsi.cdb_bytes();
    cdb[..bytes.len()].copy_from_slice(bytes);
    Ok(Command {
        lun,
        cdb,
        cdb_len: bytes.len() as u8,
        direction,
        buffer: std::mem::take(&mut io.buffer),
        user_tag: 0,
        immediate: false,
    })
}

/// Rebuilds the command from a completion, for a retry (the buffer comes
/// back with it; write data is unchanged).
pub fn command_from_completion(c: Completion) -> Command {
    Command {
        lun: c.command.lun,
        cdb: c.command.cdb,
        cdb_len: c.command.cdb_len,
        direction: c.command.direction,
        buffer: c.buffer,
        user_tag: c.user_tag,
        immediate: false,
    }
}

/// What to do with a finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done: GOOD (or recovered) status.
    Success,
    /// Retry after `delay`, on any usable path. `refresh_alua`: the path's
    /// ALUA state may have changed.
    Retry {
        /// The status that caused it.
        error: ScsiError,
        /// Wait this long first.
        delay: Duration,
        /// Re-read the path's ALUA state.
        refresh_alua: bool,
    },
    /// Report to the application.
    Fail(IoError),
}

/// Judges a command's outcome; `retries` is how often it was retried already.
pub fn judge(response: u8, status: u8, sense: &[u8], retries: u32, max_retries: u32) -> Verdict {
    if response != 0 {
        // iSCSI "target failure": the command may not have run; try again
        // (likely through another path) like a path error.
        return if retries < max_retries {
            Verdict::Retry {
                error: ScsiError::TaskAborted,
                delay: Duration::from_millis(1),
                refresh_alua: false,
            }
        } else {
            Verdict::Fail(IoError::TargetFailure(response))
        };
    }
    let err = match check_status(status, sense) {
        Ok(()) => return Verdict::Success,
        Err(e) => e,
    };
    let class = err.class();
    if class == ErrorClass::Fatal {
        return Verdict::Fail(IoError::Scsi(err));
    }
    if retries >= max_retries {
        return Verdict::Fail(IoError::RetriesExhausted { retries, last: err });
    }
    let refresh_alua = class == ErrorClass::PathLevel
        || err.unit_attention() == Some(UnitAttention::AluaStateChanged);
    // UNIT ATTENTION is reported once: retry at once. BUSY / TASK SET FULL /
    // not-ready-in-progress: give the target a moment, growing with retries.
    let delay = if err.unit_attention().is_some() {
        Duration::ZERO
    } else {
        Duration::from_millis(1u64 << retries.min(8))
    };
    Verdict::Retry {
        error: err,
        delay,
        refresh_alua,
    }
}

/// What the application gets back.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's `user_tag`.
    pub user_tag: u64,
    /// The request's operation.
    pub op: IoOp,
    /// Success, or why it failed (after retries and path failovers).
    pub result: Result<(), IoError>,
    /// From `submit` to completion, retries and path changes included.
    pub latency: Duration,
    /// The path that served the final attempt (None if it never got one).
    pub path: Option<usize>,
    /// Retries after SCSI errors plus resubmissions after path failures.
    pub retries: u32,
    /// The request's buffer (read data for reads).
    pub buffer: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const UA_ALUA: [u8; 18] = [
        0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2a, 0x06, 0, 0, 0, 0,
    ];
    const UA_RESET: [u8; 18] = [
        0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0x00, 0, 0, 0, 0,
    ];
    const MEDIUM: [u8; 18] = [
        0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0x00, 0, 0, 0, 0,
    ];

    #[test]
    fn good_is_success() {
        assert_eq!(judge(0, 0, &[], 0, 5), Verdict::Success);
    }

    #[test]
    fn unit_attention_busy_task_set_full_are_retried() {
        match judge(0, 0x02, &UA_RESET, 0, 5) {
            Verdict::Retry {
                delay,
                refresh_alua,
                ..
            } => {
                assert_eq!(delay, Duration::ZERO);
                assert!(!refresh_alua);
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            judge(0, 0x02, &UA_ALUA, 0, 5),
            Verdict::Retry {
                refresh_alua: true,
                ..
            }
        ));
        for status in [0x08u8, 0x28] {
            match judge(0, status, &[], 2, 5) {
                Verdict::Retry { delay, .. } => assert_eq!(delay, Duration::from_millis(4)),
                v => panic!("{v:?}"),
            }
        }
    }

    #[test]
    fn retries_run_out_and_fatal_errors_fail_at_once() {
        assert!(matches!(
            judge(0, 0x08, &[], 5, 5),
            Verdict::Fail(IoError::RetriesExhausted { retries: 5, .. })
        ));
        assert!(matches!(
            judge(0, 0x02, &MEDIUM, 0, 5),
            Verdict::Fail(IoError::Scsi(_))
        ));
        assert!(matches!(judge(1, 0, &[], 0, 5), Verdict::Retry { .. }));
        assert!(matches!(
            judge(1, 0, &[], 5, 5),
            Verdict::Fail(IoError::TargetFailure(1))
        ));
    }

    #[test]
    fn commands_are_built_and_checked() {
        let mut io = Io::read(10, 8, Vec::with_capacity(8192), 7);
        let ptr = io.buffer.as_ptr();
        let c = build_command(&mut io, 0, 512, 100).unwrap();
        assert_eq!(c.buffer.len(), 4096);
        assert_eq!(c.buffer.as_ptr(), ptr, "no reallocation");
        assert_eq!(c.cdb[0], 0x88);
        assert_eq!(c.direction, Direction::Read);

        let mut io = Io::write(95, 8, vec![0; 4096], 1);
        assert!(matches!(
            build_command(&mut io, 0, 512, 100),
            Err(IoError::OutOfRange { end: 103, .. })
        ));
        assert_eq!(io.buffer.len(), 4096, "buffer stays with the request");
        let mut io = Io::write(0, 8, vec![0; 100], 1);
        assert!(matches!(
            build_command(&mut io, 0, 512, 100),
            Err(IoError::BadBuffer { expected: 4096, .. })
        ));
        let mut io = Io::flush(3);
        let c = build_command(&mut io, 0, 512, 100).unwrap();
        assert_eq!((c.cdb[0], c.direction), (0x91, Direction::None));
        let mut io = Io {
            op: IoOp::Unmap,
            lba: 4,
            blocks: 2,
            buffer: Vec::new(),
            user_tag: 0,
        };
        let c = build_command(&mut io, 0, 512, 100).unwrap();
        assert_eq!((c.cdb[0], c.buffer.len()), (0x42, 24));
    }

    #[test]
    fn caps_refuse_unsupported_and_over_limit_and_fall_back_to_write_same_10() {
        use crate::wire::scsi::{OpcodeDescriptor, SupportedOpcodes};
        let desc = |opcode| OpcodeDescriptor {
            opcode,
            service_action: None,
            cdb_len: 10,
        };
        let caps = LuCaps {
            commands: SupportedCommands(Some(SupportedOpcodes {
                commands: vec![desc(0x88), desc(0x8a), desc(0x41)],
            })),
            limits: TransferLimits {
                max_transfer_blocks: 64,
                max_write_same_blocks: 1000,
                ..Default::default()
            },
        };
        let mut io = Io::read(0, 65, Vec::new(), 0);
        assert_eq!(
            build_command_for(&mut io, 0, 512, 1 << 20, &caps).err(),
            Some(IoError::TooLarge {
                op: IoOp::Read,
                blocks: 65,
                max: 64
            })
        );
        let mut io = Io::read(0, 64, Vec::new(), 0);
        assert!(build_command_for(&mut io, 0, 512, 1 << 20, &caps).is_ok());
        let mut io = Io::unmap(0, 8, Vec::new(), 0);
        assert_eq!(
            build_command_for(&mut io, 0, 512, 1 << 20, &caps).err(),
            Some(IoError::Unsupported(Feature::Unmap))
        );
        let mut io = Io::write_same(7, 1000, vec![0; 512], 0);
        let c = build_command_for(&mut io, 0, 512, 1 << 20, &caps).unwrap();
        assert_eq!(c.cdb[0], 0x41);
        assert_eq!(&c.cdb[2..9], &[0, 0, 0, 7, 0, 0x03, 0xe8]);
        let mut io = Io::write_same(7, 1001, vec![0; 512], 0);
        assert!(matches!(
            build_command_for(&mut io, 0, 512, 1 << 20, &caps),
            Err(IoError::TooLarge { max: 1000, .. })
        ));
        let none = LuCaps {
            commands: SupportedCommands(Some(SupportedOpcodes::default())),
            ..Default::default()
        };
        let mut io = Io::write_same(7, 10, vec![0; 512], 0);
        assert_eq!(
            build_command_for(&mut io, 0, 512, 1 << 20, &none).err(),
            Some(IoError::Unsupported(Feature::WriteSame16))
        );
    }
}
