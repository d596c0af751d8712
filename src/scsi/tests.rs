use super::*;
use crate::wire::scsi::{
    asc, vpd, BlockLimits, LogicalBlockProvisioning, Peripheral, SenseFormat, Tpgs,
    UnitSerialNumber,
};
use proptest::prelude::*;

#[track_caller]
fn check_condition(key: SenseKey, code: (u8, u8)) -> ScsiError {
    let sense = SenseData::with_code(key, code).to_vec();
    check_status(ScsiStatus::CheckCondition.as_u8(), &sense).unwrap_err()
}

#[test]
fn commands_carry_direction_and_length() {
    let c = ScsiCommand::read16(1 << 33, 8, 4096).unwrap();
    assert_eq!(c.direction, DataDirection::Read(32768));
    assert_eq!(c.cdb_bytes().len(), 16);
    assert_eq!(
        c.repr(),
        Some(CdbRepr::Read16 {
            lba: 1 << 33,
            blocks: 8,
            protect: 0,
            dpo: false,
            fua: false
        })
    );
    let w = ScsiCommand::write16(0, 1, 512, true).unwrap();
    assert_eq!(w.direction, DataDirection::Write(512));
    assert!(matches!(w.repr(), Some(CdbRepr::Write16 { fua: true, .. })));
    assert_eq!(
        ScsiCommand::read16(0, u32::MAX, 512),
        Err(ScsiError::TransferTooLarge {
            blocks: u32::MAX,
            block_size: 512
        })
    );
    assert_eq!(
        ScsiCommand::read10(0, 2, 512).unwrap().direction,
        DataDirection::Read(1024)
    );
    assert_eq!(
        ScsiCommand::write10(0, 2, 512, false)
            .unwrap()
            .transfer_len(),
        1024
    );
    assert_eq!(
        ScsiCommand::test_unit_ready().direction,
        DataDirection::None
    );
    assert_eq!(
        ScsiCommand::synchronize_cache().direction,
        DataDirection::None
    );
    assert_eq!(ScsiCommand::inquiry().direction, DataDirection::Read(255));
    assert_eq!(
        ScsiCommand::device_identification().repr(),
        Some(CdbRepr::Inquiry {
            evpd: true,
            page_code: vpd::DEVICE_IDENTIFICATION,
            alloc_len: 1024
        })
    );
    assert_eq!(
        ScsiCommand::read_capacity16().direction,
        DataDirection::Read(32)
    );
    assert_eq!(
        ScsiCommand::read_capacity10().direction,
        DataDirection::Read(8)
    );
    assert_eq!(
        ScsiCommand::report_luns(4096).direction,
        DataDirection::Read(4096)
    );
    assert!(matches!(
        ScsiCommand::report_target_port_groups(1024).repr(),
        Some(CdbRepr::ReportTargetPortGroups {
            extended: true,
            alloc_len: 1024
        })
    ));
    let (u, list) = ScsiCommand::unmap(&[
        UnmapDescriptor { lba: 0, blocks: 8 },
        UnmapDescriptor { lba: 64, blocks: 8 },
    ])
    .unwrap();
    assert_eq!(list.len(), 40);
    assert_eq!(u.direction, DataDirection::Write(40));
    assert_eq!(
        UnmapParameterList::parse(&list).unwrap().descriptors.len(),
        2
    );
    let ws = ScsiCommand::write_same16(10, 100, 512, true);
    assert_eq!(ws.direction, DataDirection::Write(512));
}

#[test]
fn from_repr_matches_helpers() {
    for (repr, bs, cmd) in [
        (
            CdbRepr::Read16 {
                lba: 5,
                blocks: 3,
                protect: 0,
                dpo: false,
                fua: false,
            },
            512,
            ScsiCommand::read16(5, 3, 512).unwrap(),
        ),
        (
            CdbRepr::Inquiry {
                evpd: false,
                page_code: 0,
                alloc_len: 255,
            },
            0,
            ScsiCommand::inquiry(),
        ),
        (CdbRepr::TestUnitReady, 0, ScsiCommand::test_unit_ready()),
        (
            CdbRepr::ReadCapacity16 { alloc_len: 32 },
            0,
            ScsiCommand::read_capacity16(),
        ),
    ] {
        assert_eq!(ScsiCommand::from_repr(&repr, bs).unwrap(), cmd);
    }
}

#[test]
fn status_decoding() {
    assert_eq!(check_status(0x00, &[]), Ok(()));
    assert_eq!(check_status(0x04, &[]), Ok(()));
    assert_eq!(check_status(0x08, &[]), Err(ScsiError::Busy));
    assert_eq!(check_status(0x18, &[]), Err(ScsiError::ReservationConflict));
    assert_eq!(check_status(0x28, &[]), Err(ScsiError::TaskSetFull));
    assert_eq!(check_status(0x30, &[]), Err(ScsiError::AcaActive));
    assert_eq!(check_status(0x40, &[]), Err(ScsiError::TaskAborted));
    assert_eq!(check_status(0x22, &[]), Err(ScsiError::UnknownStatus(0x22)));
    assert!(matches!(
        check_status(0x02, &[]),
        Err(ScsiError::CheckConditionNoSense(_))
    ));
    // RECOVERED ERROR is a success.
    let rec = SenseData::new(SenseKey::RecoveredError, 0x18, 0).to_vec();
    assert_eq!(check_status(0x02, &rec), Ok(()));
    let e = check_condition(SenseKey::MediumError, asc::UNRECOVERED_READ_ERROR);
    assert_eq!(
        e.to_string(),
        "CHECK CONDITION: MEDIUM ERROR: unrecovered read error (asc 11h ascq 00h)"
    );
    assert_eq!(e.status(), Some(ScsiStatus::CheckCondition));
    assert_eq!(e.sense().unwrap().key, SenseKey::MediumError);
    // Descriptor format sense decodes the same way.
    let d = SenseData {
        format: SenseFormat::Descriptor,
        ..SenseData::with_code(SenseKey::NotReady, asc::ALUA_TRANSITION)
    };
    assert!(check_status(0x02, &d.to_vec()).unwrap_err().is_retryable());
}

#[test]
fn classification() {
    use ErrorClass::*;
    for (key, code, class) in [
        (SenseKey::UnitAttention, asc::POWER_ON_RESET, Retryable),
        (
            SenseKey::UnitAttention,
            asc::CAPACITY_DATA_CHANGED,
            Retryable,
        ),
        (
            SenseKey::UnitAttention,
            asc::REPORTED_LUNS_DATA_CHANGED,
            Retryable,
        ),
        (
            SenseKey::UnitAttention,
            asc::ASYMMETRIC_ACCESS_STATE_CHANGED,
            PathLevel,
        ),
        (SenseKey::NotReady, asc::LUN_BECOMING_READY, Retryable),
        (SenseKey::NotReady, asc::ALUA_TRANSITION, Retryable),
        (SenseKey::NotReady, asc::ALUA_STANDBY, PathLevel),
        (SenseKey::NotReady, asc::ALUA_UNAVAILABLE, PathLevel),
        (
            SenseKey::NotReady,
            asc::LUN_NOT_READY_MANUAL_INTERVENTION,
            Fatal,
        ),
        (SenseKey::NotReady, asc::MEDIUM_NOT_PRESENT, Fatal),
        (SenseKey::AbortedCommand, (0x47, 0x00), Retryable),
        (SenseKey::MediumError, asc::UNRECOVERED_READ_ERROR, Fatal),
        (SenseKey::HardwareError, asc::INTERNAL_TARGET_FAILURE, Fatal),
        (SenseKey::IllegalRequest, asc::INVALID_OPCODE, Fatal),
        (SenseKey::IllegalRequest, asc::LBA_OUT_OF_RANGE, Fatal),
        (SenseKey::IllegalRequest, asc::INVALID_FIELD_IN_CDB, Fatal),
        (SenseKey::DataProtect, asc::WRITE_PROTECTED, Fatal),
    ] {
        assert_eq!(check_condition(key, code).class(), class, "{key} {code:?}");
    }
    assert!(ScsiError::Busy.is_retryable());
    assert!(ScsiError::TaskSetFull.is_retryable());
    assert!(ScsiError::ReservationConflict.is_fatal());
    assert!(check_condition(SenseKey::NotReady, asc::ALUA_STANDBY).is_path_error());
    assert_eq!(
        check_condition(SenseKey::UnitAttention, asc::REPORTED_LUNS_DATA_CHANGED).unit_attention(),
        Some(UnitAttention::ReportedLunsChanged)
    );
    assert_eq!(
        check_condition(SenseKey::UnitAttention, asc::CAPACITY_DATA_CHANGED).unit_attention(),
        Some(UnitAttention::CapacityChanged)
    );
    assert_eq!(
        check_condition(
            SenseKey::UnitAttention,
            asc::ASYMMETRIC_ACCESS_STATE_CHANGED
        )
        .unit_attention(),
        Some(UnitAttention::AluaStateChanged)
    );
    assert_eq!(ScsiError::Busy.unit_attention(), None);
}

#[test]
fn lun_info_from_pages() {
    let inq = InquiryData {
        tpgs: Tpgs::Implicit,
        ..InquiryData::new(Peripheral::DISK, "LIO-ORG", "ramdisk", "4.0")
    };
    let rc16 = ReadCapacity16Data {
        last_lba: 2_097_151,
        block_len: 512,
        lbpme: true,
        ..Default::default()
    };
    let naa = crate::wire::scsi::Designator::naa(vec![
        0x60, 0x01, 0x40, 0x5a, 0xbc, 0xde, 0xf0, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0,
        0x12,
    ]);
    let devid = DeviceIdentification {
        peripheral: Peripheral::DISK,
        designators: vec![
            crate::wire::scsi::Designator::relative_target_port_id(2),
            crate::wire::scsi::Designator::target_port_group_id(1),
            naa.clone(),
        ],
    };
    let serial = UnitSerialNumber {
        peripheral: Peripheral::DISK,
        serial: b"5abcdef0-1234 ".to_vec(),
    };
    let limits = BlockLimits {
        max_transfer_len: 2048,
        ..Default::default()
    };
    let lbp = LogicalBlockProvisioning {
        lbpu: true,
        ..Default::default()
    };
    let info = LunInfo::new(&inq, &Capacity::from(&rc16))
        .with_lun(0)
        .with_serial(&serial)
        .with_device_id(&devid)
        .with_block_limits(&limits)
        .with_provisioning(&lbp);
    assert_eq!(info.vendor, "LIO-ORG");
    assert_eq!(info.product, "ramdisk");
    assert_eq!(info.block_count, 2_097_152);
    assert_eq!(info.capacity_bytes, 1 << 30);
    assert_eq!(info.serial.as_deref(), Some("5abcdef0-1234"));
    assert_eq!(
        info.lu_id.as_deref(),
        Some("naa.6001405abcdef0123456789abcdef012")
    );
    assert_eq!(info.lu_designator, Some(naa));
    assert_eq!(info.target_port_group, Some(1));
    assert_eq!(info.relative_target_port, Some(2));
    assert_eq!(info.alua, "implicit");
    assert!(info.thin_provisioned && info.unmap_supported);
    assert_eq!(info.max_transfer_blocks, Some(2048));
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["block_size"], 512);
    assert_eq!(json["lu_id"], "naa.6001405abcdef0123456789abcdef012");
    assert_eq!(json["device_type_name"], "disk");
    assert!(json.get("lu_designator").is_none());

    let rc10 = ReadCapacity10Data {
        last_lba: 99,
        block_len: 4096,
    };
    let c = Capacity::from(&rc10);
    assert_eq!((c.block_count, c.bytes()), (100, 409_600));
}

proptest! {
    #[test]
    fn prop_check_status_never_panics(status in any::<u8>(), sense in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Err(e) = check_status(status, &sense) {
            let _ = (e.class(), e.to_string(), e.unit_attention(), e.status());
        }
    }

    #[test]
    fn prop_from_repr_never_panics(cdb in proptest::collection::vec(any::<u8>(), 0..16), bs in any::<u32>()) {
        if let Ok(r) = Cdb::parse(&cdb) {
            if let Ok(c) = ScsiCommand::from_repr(&r, bs) {
                prop_assert_eq!(c.repr(), Some(r));
            }
        }
    }
}
