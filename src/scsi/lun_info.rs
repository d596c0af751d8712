//! [`LunInfo`]: what the CLI prints and multipath groups by.

use crate::wire::scsi::{
    device_type_name, BlockLimits, Designator, DeviceIdentification, InquiryData,
    LogicalBlockProvisioning, ReadCapacity10Data, ReadCapacity16Data, Tpgs, UnitSerialNumber,
};
use serde::Serialize;

/// Capacity from READ CAPACITY(10) or (16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Capacity {
    pub block_count: u64,
    pub block_size: u32,
    pub physical_block_size: u32,
    /// Logical block provisioning management enabled (thin).
    pub lbpme: bool,
    /// Unmapped blocks read as zeroes.
    pub lbprz: bool,
}

impl Capacity {
    /// Size in bytes (saturating).
    pub fn bytes(&self) -> u64 {
        self.block_count.saturating_mul(u64::from(self.block_size))
    }
}

impl From<&ReadCapacity10Data> for Capacity {
    fn from(d: &ReadCapacity10Data) -> Capacity {
        Capacity {
            block_count: d.block_count(),
            block_size: d.block_len,
            physical_block_size: d.block_len,
            lbpme: false,
            lbprz: false,
        }
    }
}

impl From<&ReadCapacity16Data> for Capacity {
    fn from(d: &ReadCapacity16Data) -> Capacity {
        Capacity {
            block_count: d.block_count(),
            block_size: d.block_len,
            physical_block_size: d.physical_block_len(),
            lbpme: d.lbpme,
            lbprz: d.lbprz,
        }
    }
}

/// Summary of one logical unit, serialisable for `--json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LunInfo {
    /// LUN number as the target reported it (REPORT LUNS), if known.
    pub lun: Option<u64>,
    pub device_type: u8,
    pub device_type_name: &'static str,
    pub vendor: String,
    pub product: String,
    pub revision: String,
    pub serial: Option<String>,
    /// Multipath identity: the LU designator of VPD 83h (`naa.…`, `eui.…`,
    /// `iqn.…`, `t10.…`).
    pub lu_id: Option<String>,
    pub block_size: u32,
    pub physical_block_size: u32,
    pub block_count: u64,
    pub capacity_bytes: u64,
    pub thin_provisioned: bool,
    pub unmap_supported: bool,
    /// ALUA support from INQUIRY TPGS: "none", "implicit", "explicit", "both".
    pub alua: &'static str,
    pub target_port_group: Option<u16>,
    pub relative_target_port: Option<u16>,
    pub max_transfer_blocks: Option<u32>,
    pub optimal_transfer_blocks: Option<u32>,
    pub max_unmap_blocks: Option<u32>,
    /// The designator behind `lu_id`, for multipath grouping.
    #[serde(skip)]
    pub lu_designator: Option<Designator>,
}

fn nonzero(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

impl LunInfo {
    /// Start from standard INQUIRY data and the capacity; add the VPD pages
    /// that were read with the `with_*` methods.
    pub fn new(inquiry: &InquiryData, capacity: &Capacity) -> LunInfo {
        LunInfo {
            lun: None,
            device_type: inquiry.peripheral.device_type,
            device_type_name: device_type_name(inquiry.peripheral.device_type),
            vendor: inquiry.vendor_str(),
            product: inquiry.product_str(),
            revision: inquiry.revision_str(),
            serial: None,
            lu_id: None,
            block_size: capacity.block_size,
            physical_block_size: capacity.physical_block_size,
            block_count: capacity.block_count,
            capacity_bytes: capacity.bytes(),
            thin_provisioned: capacity.lbpme,
            unmap_supported: false,
            alua: match inquiry.tpgs {
                Tpgs::None => "none",
                Tpgs::Implicit => "implicit",
                Tpgs::Explicit => "explicit",
                Tpgs::Both => "both",
            },
            target_port_group: None,
            relative_target_port: None,
            max_transfer_blocks: None,
            optimal_transfer_blocks: None,
            max_unmap_blocks: None,
            lu_designator: None,
        }
    }
    pub fn with_lun(mut self, lun: u64) -> LunInfo {
        self.lun = Some(lun);
        self
    }
    pub fn with_serial(mut self, page: &UnitSerialNumber) -> LunInfo {
        let s = page.serial_str();
        self.serial = (!s.is_empty()).then_some(s);
        self
    }
    pub fn with_device_id(mut self, page: &DeviceIdentification) -> LunInfo {
        self.lu_designator = page.lu_designator().cloned();
        self.lu_id = self.lu_designator.as_ref().map(|d| d.to_string());
        self.target_port_group = page.target_port_group();
        self.relative_target_port = page.relative_target_port();
        self
    }
    pub fn with_block_limits(mut self, page: &BlockLimits) -> LunInfo {
        self.max_transfer_blocks = nonzero(page.max_transfer_len);
        self.optimal_transfer_blocks = nonzero(page.optimal_transfer_len);
        self.max_unmap_blocks = nonzero(page.max_unmap_lba_count);
        self
    }
    pub fn with_provisioning(mut self, page: &LogicalBlockProvisioning) -> LunInfo {
        self.unmap_supported = page.lbpu;
        self
    }
}
