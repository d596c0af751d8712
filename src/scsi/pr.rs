//! PERSISTENT RESERVE IN / OUT commands (SPC-4 §6.15, §6.16), built on the
//! codecs in [`crate::wire::scsi::pr`].

use super::command::{DataDirection, ScsiCommand};
use crate::wire::scsi::pr::{PrInAction, PrInCdb, PrOutAction, PrOutCdb, PrOutParams, PrType};
use crate::wire::scsi::DataRepr;

/// Allocation length the PR IN builders ask for by default (room for 1000
/// registered keys).
pub const PR_IN_ALLOC_LEN: u16 = 8 + 8 * 1000;

impl ScsiCommand {
    /// PERSISTENT RESERVE IN with `action`, allowing `alloc_len` bytes back.
    pub fn persistent_reserve_in(action: PrInAction, alloc_len: u16) -> ScsiCommand {
        ScsiCommand::new(
            PrInCdb { action, alloc_len }.emit(),
            DataDirection::Read(alloc_len.into()),
        )
    }

    /// PERSISTENT RESERVE OUT with `action` (scope: the logical unit) and
    /// its 24-byte parameter list, the data-out to send. `pr_type` matters
    /// to RESERVE, RELEASE, PREEMPT and PREEMPT AND ABORT only.
    pub fn persistent_reserve_out(
        action: PrOutAction,
        pr_type: Option<PrType>,
        params: &PrOutParams,
    ) -> (ScsiCommand, Vec<u8>) {
        let cdb = PrOutCdb::new(action, pr_type.filter(|_| action.uses_type()));
        (
            ScsiCommand::new(cdb.emit(), DataDirection::Write(PrOutParams::LEN as u32)),
            params.to_vec(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_carry_the_direction_and_the_parameter_list() {
        let c = ScsiCommand::persistent_reserve_in(PrInAction::ReadKeys, 512);
        assert_eq!(c.direction, DataDirection::Read(512));
        assert_eq!(c.cdb_bytes()[..2], [0x5e, 0]);
        let params = PrOutParams {
            key: 1,
            sa_key: 2,
            ..Default::default()
        };
        let (c, data) = ScsiCommand::persistent_reserve_out(
            PrOutAction::Register,
            Some(PrType::ExclusiveAccess),
            &params,
        );
        assert_eq!(c.direction, DataDirection::Write(24));
        // REGISTER has no type: the field stays 0.
        assert_eq!(c.cdb_bytes()[..3], [0x5f, 0, 0]);
        assert_eq!(PrOutParams::parse(&data), Ok(params));
        let (c, _) = ScsiCommand::persistent_reserve_out(
            PrOutAction::Reserve,
            Some(PrType::ExclusiveAccess),
            &params,
        );
        assert_eq!(c.cdb_bytes()[..3], [0x5f, 1, 3]);
    }
}
