//! SCSI command layer (SPC-4 / SBC-3) above any transport.
//!
//! Pure: a [`ScsiCommand`] (CDB bytes and data direction/length) goes in;
//! status, sense bytes and data-in come out, and [`check_status`] turns the
//! status and sense into a [`ScsiError`] with a retry classification. This
//! module knows nothing about iSCSI; the iSCSI layer carries these values.
//! [`LunInfo`] summarises a logical unit from its INQUIRY, VPD and
//! capacity data.

pub mod caps;
mod command;
mod error;
pub mod lun;
mod lun_info;
mod pr;

pub use crate::wire::scsi::pr::{
    PrCapabilities, PrHolder, PrInAction, PrKeys, PrOutAction, PrOutParams, PrReservation, PrType,
};
pub use caps::{Feature, SupportedCommands, TransferLimits};
pub use command::{DataDirection, ScsiCommand};
pub use error::{check_status, classify_sense, ErrorClass, ScsiError, UnitAttention};
pub use lun_info::{Capacity, LunInfo};
pub use pr::PR_IN_ALLOC_LEN;

pub use crate::wire::scsi::{
    AluaState, BlockLimits, Cdb, CdbRepr, DataRepr, DesignatorType, DeviceIdentification,
    InquiryData, LbaStatusData, LbaStatusDescriptor, Lun, OneOpcode, OpcodeRequest,
    ProvisioningStatus, ReadCapacity10Data, ReadCapacity16Data, ReportLunsData, ScsiStatus,
    SenseData, SenseKey, SupportedOpcodes, TargetPortGroupsData, UnmapDescriptor,
    UnmapParameterList,
};

#[cfg(test)]
mod tests;
