//! What a logical unit says it supports (REPORT SUPPORTED OPERATION CODES)
//! and the limits it sets (Block Limits VPD page), and how requests are cut
//! to fit them.

use crate::wire::scsi::{opcode, BlockLimits, SupportedOpcodes};
use serde::Serialize;

/// Commands the initiator checks before sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Feature {
    Unmap,
    WriteSame16,
    WriteSame10,
    CompareAndWrite,
    GetLbaStatus,
    SetTargetPortGroups,
}

impl Feature {
    /// Operation code and service action.
    pub fn opcode(self) -> (u8, Option<u16>) {
        match self {
            Feature::Unmap => (opcode::UNMAP, None),
            Feature::WriteSame16 => (opcode::WRITE_SAME_16, None),
            Feature::WriteSame10 => (opcode::WRITE_SAME_10, None),
            Feature::CompareAndWrite => (opcode::COMPARE_AND_WRITE, None),
            Feature::GetLbaStatus => (
                opcode::SERVICE_ACTION_IN_16,
                Some(opcode::SA_GET_LBA_STATUS.into()),
            ),
            Feature::SetTargetPortGroups => (
                opcode::MAINTENANCE_OUT,
                Some(opcode::SA_SET_TARGET_PORT_GROUPS.into()),
            ),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Feature::Unmap => "UNMAP",
            Feature::WriteSame16 => "WRITE SAME(16)",
            Feature::WriteSame10 => "WRITE SAME(10)",
            Feature::CompareAndWrite => "COMPARE AND WRITE",
            Feature::GetLbaStatus => "GET LBA STATUS",
            Feature::SetTargetPortGroups => "SET TARGET PORT GROUPS",
        }
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The commands an LU reported. `None` inside: the target does not answer
/// REPORT SUPPORTED OPERATION CODES, so every command is tried.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SupportedCommands(pub Option<SupportedOpcodes>);

impl SupportedCommands {
    /// Whether `f` may be sent: reported, or nothing reported at all.
    pub fn supports(&self, f: Feature) -> bool {
        let (op, sa) = f.opcode();
        self.0.as_ref().is_none_or(|o| o.supports(op, sa))
    }
    /// Whether the target answered REPORT SUPPORTED OPERATION CODES.
    pub fn known(&self) -> bool {
        self.0.is_some()
    }
}

/// Block Limits (VPD B0h) as the initiator honours them, in blocks; 0 is
/// "no limit reported".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct TransferLimits {
    /// MAXIMUM TRANSFER LENGTH: READ/WRITE longer than this are split.
    pub max_transfer_blocks: u32,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY: split pieces are multiples of it.
    pub optimal_granularity: u32,
    /// MAXIMUM UNMAP LBA COUNT, per UNMAP command.
    pub max_unmap_blocks: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptors: u32,
    /// OPTIMAL UNMAP GRANULARITY.
    pub unmap_granularity: u32,
    /// UNMAP GRANULARITY ALIGNMENT (when UGAVALID).
    pub unmap_alignment: u32,
    /// MAXIMUM WRITE SAME LENGTH.
    pub max_write_same_blocks: u64,
}

impl From<&BlockLimits> for TransferLimits {
    fn from(b: &BlockLimits) -> TransferLimits {
        TransferLimits {
            max_transfer_blocks: b.max_transfer_len,
            optimal_granularity: u32::from(b.optimal_transfer_len_granularity),
            max_unmap_blocks: b.max_unmap_lba_count,
            max_unmap_descriptors: b.max_unmap_descriptor_count,
            unmap_granularity: b.optimal_unmap_granularity,
            unmap_alignment: b.unmap_granularity_alignment.unwrap_or(0),
            max_write_same_blocks: b.max_write_same_len,
        }
    }
}

fn or_max(v: u32) -> u32 {
    if v == 0 {
        u32::MAX
    } else {
        v
    }
}

impl TransferLimits {
    /// Most blocks one READ/WRITE carries: MAXIMUM TRANSFER LENGTH, rounded
    /// down to the OPTIMAL TRANSFER LENGTH GRANULARITY when that fits.
    pub fn io_chunk_blocks(&self) -> u32 {
        let max = or_max(self.max_transfer_blocks);
        let g = self.optimal_granularity;
        if g > 1 && max != u32::MAX && g <= max {
            max / g * g
        } else {
            max
        }
    }
    /// Most blocks one UNMAP command unmaps.
    pub fn unmap_chunk_blocks(&self) -> u32 {
        or_max(self.max_unmap_blocks)
    }
    /// Most blocks one WRITE SAME writes (never above the CDB's 32 bits).
    pub fn write_same_chunk_blocks(&self) -> u32 {
        match self.max_write_same_blocks {
            0 => u32::MAX,
            n => n.min(u64::from(u32::MAX)) as u32,
        }
    }
    /// The part of `[lba, lba + blocks)` made of whole unmap granules
    /// (granularity and alignment): what an advisory discard should ask
    /// for. `None` when no whole granule is inside.
    pub fn unmap_aligned(&self, lba: u64, blocks: u64) -> Option<(u64, u64)> {
        let end = lba.checked_add(blocks)?;
        let g = u64::from(self.unmap_granularity.max(1));
        let a = u64::from(self.unmap_alignment) % g;
        // Granule boundaries are a + k*g.
        let up = |x: u64| {
            if x < a {
                a
            } else {
                a + (x - a).div_ceil(g) * g
            }
        };
        let down = |x: u64| if x < a { 0 } else { a + (x - a) / g * g };
        let (s, e) = if g == 1 {
            (lba, end)
        } else {
            (up(lba), down(end))
        };
        (e > s).then_some((s, e - s))
    }
}

/// Cuts `[lba, lba + blocks)` into pieces of at most `max` blocks.
pub fn split(lba: u64, blocks: u64, max: u32) -> impl Iterator<Item = (u64, u32)> {
    let max = u64::from(max.max(1));
    let end = lba.saturating_add(blocks);
    let mut at = lba;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let n = (end - at).min(max);
        let piece = (at, n as u32);
        at += n;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::scsi::OpcodeDescriptor;

    #[test]
    fn chunks_follow_the_limits() {
        let l = TransferLimits {
            max_transfer_blocks: 100,
            optimal_granularity: 8,
            max_unmap_blocks: 0,
            max_write_same_blocks: 1 << 40,
            ..Default::default()
        };
        assert_eq!(l.io_chunk_blocks(), 96);
        assert_eq!(l.unmap_chunk_blocks(), u32::MAX);
        assert_eq!(l.write_same_chunk_blocks(), u32::MAX);
        assert_eq!(TransferLimits::default().io_chunk_blocks(), u32::MAX);
        let p: Vec<_> = split(10, 250, 96).collect();
        assert_eq!(p, vec![(10, 96), (106, 96), (202, 58)]);
        assert_eq!(split(0, 0, 5).count(), 0);
    }

    #[test]
    fn unmap_rounds_inward_to_granules() {
        let l = TransferLimits {
            unmap_granularity: 8,
            unmap_alignment: 2,
            ..Default::default()
        };
        // Granules start at 2, 10, 18, ...
        assert_eq!(l.unmap_aligned(0, 30), Some((2, 24)));
        assert_eq!(l.unmap_aligned(3, 8), None);
        assert_eq!(l.unmap_aligned(10, 8), Some((10, 8)));
        assert_eq!(TransferLimits::default().unmap_aligned(5, 3), Some((5, 3)));
    }

    #[test]
    fn unknown_command_lists_allow_everything() {
        assert!(SupportedCommands(None).supports(Feature::Unmap));
        let s = SupportedCommands(Some(SupportedOpcodes {
            commands: vec![OpcodeDescriptor {
                opcode: 0x9e,
                service_action: Some(0x10),
                cdb_len: 16,
            }],
        }));
        assert!(!s.supports(Feature::Unmap));
        assert!(!s.supports(Feature::GetLbaStatus));
        assert!(s.known());
    }
}
