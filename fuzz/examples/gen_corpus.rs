//! Writes the seed corpora under fuzz/corpus/<target>/ from the crate's own
//! emitters and a scripted, well-behaved target:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus
//!
//! Seeds are small real PDUs/pages; the login and connection seeds are whole
//! conversations that a correct target would have. Rerunning overwrites the
//! seeds with the same names (login seeds for mutual CHAP differ per run:
//! the initiator's challenge is random).

use iscsi_bypass::iscsi::chap;
use iscsi_bypass::iscsi::connection::{Direction, Event};
use iscsi_bypass::iscsi::login::{Login, LoginProgress};
use iscsi_bypass::iscsi::params::{rule_for, Rule};
use iscsi_bypass::wire::iscsi::*;
use iscsi_bypass::wire::scsi::*;
use iscsi_bypass::wire::text::TextPairs;
use iscsi_fuzz::{conn_setup, conn_start, login_config, Input, CONN_COMMANDS};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn dir(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(dir(target).join(name), bytes).unwrap();
}

fn pdu(h: PduHeader, data: &[u8], d: Digests) -> Vec<u8> {
    let mut v = Vec::new();
    encode_pdu(&mut v, &h, data, d);
    v
}

fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut t = TextPairs::new();
    for (k, v) in pairs {
        t.push(k, *v);
    }
    t.to_bytes()
}

fn sense_fixed() -> SenseData {
    SenseData::new(SenseKey::UnitAttention, 0x29, 0x00)
}

fn sense_descriptor() -> SenseData {
    SenseData {
        format: SenseFormat::Descriptor,
        information: Some(0x1234),
        sense_key_specific: Some([0x80, 0, 4]),
        ..SenseData::new(SenseKey::IllegalRequest, 0x24, 0x00)
    }
}

fn sample_pdus(d: Digests) -> Vec<(&'static str, Vec<u8>)> {
    let lt = text(&[("TargetPortalGroupTag", "1"), ("AuthMethod", "None")]);
    let mut sense = vec![0, 18];
    sense.extend(sense_fixed().to_vec());
    let data_in = PduHeader::DataIn(DataIn {
        final_bit: true,
        ack: false,
        overflow: false,
        underflow: true,
        status_present: true,
        status: 0,
        lun: 0,
        itt: 0x2_0000,
        ttt: RESERVED_TAG,
        stat_sn: Sn(100),
        exp_cmd_sn: Sn(11),
        max_cmd_sn: Sn(42),
        data_sn: Sn(0),
        buffer_offset: 0,
        residual: 3,
    });
    vec![
        (
            "login_response",
            pdu(
                PduHeader::LoginResponse(LoginResponse {
                    transit: true,
                    cont: false,
                    csg: Stage::Security,
                    nsg: Stage::Operational,
                    version_max: 0,
                    version_active: 0,
                    isid: [0x80, 0, 0, 0, 0, 1],
                    tsih: 0,
                    itt: 0,
                    stat_sn: Sn(7),
                    exp_cmd_sn: Sn(1),
                    max_cmd_sn: Sn(1),
                    status_class: 0,
                    status_detail: 0,
                }),
                &lt,
                d,
            ),
        ),
        ("data_in", pdu(data_in, b"INQUIRY data...", d)),
        (
            "scsi_response_sense",
            pdu(
                PduHeader::ScsiResponse(ScsiResponse {
                    bidi_overflow: false,
                    bidi_underflow: false,
                    overflow: false,
                    underflow: false,
                    response: 0,
                    status: 2,
                    itt: 0x3_0001,
                    snack_tag: 0,
                    stat_sn: Sn(101),
                    exp_cmd_sn: Sn(12),
                    max_cmd_sn: Sn(43),
                    exp_data_sn: Sn(0),
                    bidi_residual: 0,
                    residual: 0,
                }),
                &sense,
                d,
            ),
        ),
        (
            "r2t",
            pdu(
                PduHeader::R2t(R2t {
                    lun: 0,
                    itt: 0x3_0001,
                    ttt: 0x77,
                    stat_sn: Sn(101),
                    exp_cmd_sn: Sn(12),
                    max_cmd_sn: Sn(43),
                    r2t_sn: Sn(0),
                    buffer_offset: 4096,
                    desired_len: 4096,
                }),
                &[],
                d,
            ),
        ),
        (
            "nop_in_ping",
            pdu(
                PduHeader::NopIn(NopIn {
                    lun: 0,
                    itt: RESERVED_TAG,
                    ttt: 0x1234,
                    stat_sn: Sn(102),
                    exp_cmd_sn: Sn(12),
                    max_cmd_sn: Sn(43),
                }),
                b"ping",
                d,
            ),
        ),
        (
            "async_ua",
            pdu(
                PduHeader::AsyncMessage(AsyncMessage {
                    lun: 0,
                    stat_sn: Sn(102),
                    exp_cmd_sn: Sn(12),
                    max_cmd_sn: Sn(43),
                    event: 0,
                    vcode: 0,
                    param1: 0,
                    param2: 0,
                    param3: 0,
                }),
                &sense,
                d,
            ),
        ),
        (
            "reject",
            pdu(
                PduHeader::Reject(Reject {
                    reason: 9,
                    stat_sn: Sn(102),
                    exp_cmd_sn: Sn(12),
                    max_cmd_sn: Sn(43),
                    data_sn: Sn(0),
                }),
                &PduHeader::NopIn(NopIn {
                    lun: 0,
                    itt: 5,
                    ttt: RESERVED_TAG,
                    stat_sn: Sn(0),
                    exp_cmd_sn: Sn(0),
                    max_cmd_sn: Sn(0),
                })
                .emit(0, 0),
                d,
            ),
        ),
        (
            "text_response",
            pdu(
                PduHeader::TextResponse(TextResponse {
                    final_bit: true,
                    cont: false,
                    lun: 0,
                    itt: 0x4_0002,
                    ttt: RESERVED_TAG,
                    stat_sn: Sn(103),
                    exp_cmd_sn: Sn(12),
                    max_cmd_sn: Sn(43),
                }),
                &send_targets_text(),
                d,
            ),
        ),
        (
            "logout_response",
            pdu(
                PduHeader::LogoutResponse(LogoutResponse {
                    response: 0,
                    itt: 9,
                    stat_sn: Sn(104),
                    exp_cmd_sn: Sn(12),
                    max_cmd_sn: Sn(43),
                    time2wait: 2,
                    time2retain: 20,
                }),
                &[],
                d,
            ),
        ),
    ]
}

fn send_targets_text() -> Vec<u8> {
    text(&[
        ("TargetName", "iqn.2024-01.org.example:disk1"),
        ("TargetAddress", "192.0.2.10:3260,1"),
        ("TargetAddress", "[2001:db8::10]:3260,2"),
        ("TargetName", "iqn.2024-01.org.example:disk2"),
        ("TargetName", "iqn.2024-01.org.example:disk3"),
        ("TargetAddress", "storage.example.net,3"),
    ])
}

fn gen_pdus() {
    for (cfg, d) in [
        (0x08u8, Digests::default()),
        (
            0x0b,
            Digests {
                header: true,
                data: true,
            },
        ),
    ] {
        let mut all = vec![cfg];
        for (name, bytes) in sample_pdus(d) {
            let mut v = vec![cfg];
            v.extend_from_slice(&bytes);
            write("fuzz_iscsi_pdu", &format!("{name}_{cfg:02x}"), &v);
            all.extend_from_slice(&bytes);
        }
        write("fuzz_iscsi_pdu", &format!("stream_{cfg:02x}"), &all);
    }
}

fn gen_text() {
    let samples: Vec<(&str, Vec<u8>)> = vec![
        (
            "login_security",
            text(&[
                ("InitiatorName", "iqn.2024-01.org.example:init"),
                ("SessionType", "Normal"),
                ("TargetName", "iqn.2024-01.org.example:disk1"),
                ("AuthMethod", "CHAP,None"),
            ]),
        ),
        (
            "chap_challenge",
            text(&[
                ("CHAP_A", "5"),
                ("CHAP_I", "17"),
                ("CHAP_C", "0x0123456789abcdef0123456789abcdef"),
            ]),
        ),
        (
            "operational",
            text(&[
                ("HeaderDigest", "None"),
                ("DataDigest", "CRC32C"),
                ("MaxRecvDataSegmentLength", "262144"),
                ("MaxBurstLength", "1048576"),
                ("FirstBurstLength", "65536"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "0"),
            ]),
        ),
        ("send_targets", send_targets_text()),
        ("repeated", b"MaxBurstLength=1\0MaxBurstLength=2\0".to_vec()),
    ];
    for (name, bytes) in samples {
        write("fuzz_text", name, &bytes);
    }
    write("fuzz_send_targets", "three_targets", &send_targets_text());
    write(
        "fuzz_send_targets",
        "no_address",
        &text(&[("TargetName", "iqn.2024-01.org.example:only")]),
    );
}

fn peripheral() -> Peripheral {
    Peripheral::DISK
}

fn gen_scsi() {
    let mut inquiry = InquiryData::new(peripheral(), "LIO-ORG", "ramdisk", "4.0");
    inquiry.tpgs = Tpgs::from_bits(1);
    inquiry.cmdque = true;
    let devid = DeviceIdentification {
        peripheral: peripheral(),
        designators: vec![
            Designator::naa(vec![
                0x60, 0x01, 0x40, 0x5a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            ]),
            Designator::relative_target_port_id(1),
            Designator::target_port_group_id(0),
        ],
    };
    let block_limits = BlockLimits {
        peripheral: peripheral(),
        wsnz: false,
        max_compare_and_write_len: 1,
        optimal_transfer_len_granularity: 8,
        max_transfer_len: 8192,
        optimal_transfer_len: 8192,
        max_prefetch_len: 0,
        max_unmap_lba_count: 8192,
        max_unmap_descriptor_count: 1,
        optimal_unmap_granularity: 8,
        unmap_granularity_alignment: Some(0),
        max_write_same_len: 4096,
    };
    let lbp = LogicalBlockProvisioning {
        peripheral: peripheral(),
        threshold_exponent: 0,
        lbpu: true,
        lbpws: true,
        lbpws10: false,
        lbprz: 1,
        anc_sup: false,
        dp: false,
        provisioning_type: ProvisioningType::Thin,
    };
    let rtpg = TargetPortGroupsData {
        implicit_transition_time: Some(10),
        groups: vec![
            TargetPortGroup {
                pref: true,
                state: AluaState::ActiveOptimized,
                supported: 0x8f,
                id: 1,
                status_code: 0,
                vendor_specific: 0,
                ports: vec![1, 2],
            },
            TargetPortGroup {
                pref: false,
                state: AluaState::Standby,
                supported: 0x8f,
                id: 2,
                status_code: 2,
                vendor_specific: 0,
                ports: vec![3],
            },
        ],
    };
    let mode = ModeSense10Data {
        medium_type: 0,
        write_protect: false,
        dpofua: true,
        longlba: false,
        block_descriptors: vec![0, 0, 0, 0, 0, 0, 2, 0],
        pages: vec![ModePage {
            ps: false,
            page_code: 8,
            subpage_code: None,
            data: vec![
                0x04, 0, 0xff, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x80, 0x14, 0, 0, 0, 0, 0, 0,
            ],
        }],
    };
    let samples: Vec<(u8, &str, Vec<u8>)> = vec![
        (0, "inquiry", inquiry.to_vec()),
        (
            1,
            "vpd00",
            SupportedVpdPages {
                peripheral: peripheral(),
                pages: vec![0x00, 0x80, 0x83, 0xb0, 0xb2],
            }
            .to_vec(),
        ),
        (
            2,
            "vpd80",
            UnitSerialNumber {
                peripheral: peripheral(),
                serial: b"0123456789abcdef".to_vec(),
            }
            .to_vec(),
        ),
        (3, "vpd83", devid.to_vec()),
        (4, "vpdb0", block_limits.to_vec()),
        (5, "vpdb2", lbp.to_vec()),
        (
            6,
            "rc10",
            ReadCapacity10Data {
                last_lba: 0x1f_ffff,
                block_len: 512,
            }
            .to_vec(),
        ),
        (
            7,
            "rc16",
            ReadCapacity16Data {
                last_lba: 0x3_ffff_ffff,
                block_len: 4096,
                p_type: 0,
                prot_en: false,
                p_i_exponent: 0,
                lb_per_pb_exponent: 3,
                lbpme: true,
                lbprz: true,
                lowest_aligned_lba: 0,
            }
            .to_vec(),
        ),
        (
            8,
            "report_luns",
            ReportLunsData {
                luns: vec![
                    Lun::from_number(0),
                    Lun::from_number(1),
                    Lun::from_number(300),
                ],
            }
            .to_vec(),
        ),
        (9, "rtpg", rtpg.to_vec()),
        (10, "mode_sense10", mode.to_vec()),
        (
            11,
            "unmap_list",
            UnmapParameterList {
                descriptors: vec![
                    UnmapDescriptor { lba: 0, blocks: 8 },
                    UnmapDescriptor {
                        lba: 1 << 33,
                        blocks: 1024,
                    },
                ],
            }
            .to_vec(),
        ),
        (12, "sense_fixed", sense_fixed().to_vec()),
        (12, "sense_descriptor", sense_descriptor().to_vec()),
    ];
    for (sel, name, bytes) in samples {
        let mut v = vec![sel];
        v.extend_from_slice(&bytes);
        write("fuzz_scsi_data", name, &v);
    }
    write("fuzz_sense", "fixed_ua", &sense_fixed().to_vec());
    write("fuzz_sense", "descriptor_ir", &sense_descriptor().to_vec());
    let mut cc = vec![2u8];
    cc.extend(sense_fixed().to_vec());
    write("fuzz_sense", "check_condition", &cc);

    let cdbs: Vec<(&str, Cdb)> = vec![
        ("tur", Cdb::test_unit_ready()),
        ("inquiry", Cdb::inquiry(96)),
        ("inquiry_vpd83", Cdb::inquiry_vpd(0x83, 255)),
        ("mode_sense10", Cdb::mode_sense10(true, 0x3f, 0, 512)),
        ("rc10", Cdb::read_capacity10()),
        ("rc16", Cdb::read_capacity16(32)),
        ("read10", Cdb::read10(100, 8)),
        ("read16", Cdb::read16(1 << 40, 256)),
        ("write16", Cdb::write16(7, 1, true)),
        ("sync16", Cdb::synchronize_cache16(0, 0, false)),
        ("unmap", Cdb::unmap(24)),
        ("write_same16", Cdb::write_same16(0, 8, true)),
        ("report_luns", Cdb::report_luns(0, 4096)),
        ("rtpg", Cdb::report_target_port_groups(true, 1024)),
        ("request_sense", Cdb::request_sense(true, 252)),
    ];
    for (name, c) in cdbs {
        write("fuzz_cdb", name, c.as_slice());
    }
}

fn gen_url_chap() {
    for (name, s) in [
        (
            "full",
            "iscsi://user%secret@192.0.2.1:3261/iqn.2024-01.org.example:disk1/0",
        ),
        ("portal", "iscsi://storage.example.net"),
        (
            "ipv6",
            "iscsi://[2001:db8::1]:3260/iqn.2024-01.org.example:disk1/7",
        ),
        (
            "mutual",
            "iscsi://u%p@host/iqn.2024-01.org.example:t/1?target_user=t&target_password=tp",
        ),
    ] {
        write("fuzz_url", name, s.as_bytes());
    }
    for (name, s) in [
        ("hex", "0x0123456789abcdef0123456789abcdef"),
        ("hex_odd", "0xabc"),
        ("base64", "0bASNFZ4mrze8BI0VniavN7w"),
        ("algorithm_list", "5,7"),
        ("identifier", "17"),
    ] {
        write("fuzz_chap", name, s.as_bytes());
    }
}

// ---------------------------------------------------------------------------
// Login conversations

/// Plays a well-behaved target against the login state machine.
fn login_seed(cfg: u8, multi_pdu: bool) -> Vec<u8> {
    let mut login = Login::new(login_config(cfg), 0, Sn(1));
    let mut out = Vec::new();
    login.start(&mut out);
    let framer = PduFramer {
        digests: Digests::default(),
        max_data_segment_len: MAX_DATA_SEGMENT_LEN,
    };
    let mut stream = vec![cfg];
    let mut stat_sn = Sn(0x1000);
    for _ in 0..12 {
        let f = framer.frame(&out).unwrap().unwrap();
        let PduHeader::LoginRequest(req) = f.header else {
            panic!()
        };
        let got = TextPairs::parse(&out[f.data.clone()]).unwrap();
        let mut ans: Vec<(String, String)> = Vec::new();
        let mut transit = req.transit;
        if req.csg == Stage::Security {
            if let Some(m) = got.get("AuthMethod") {
                ans.push(("TargetPortalGroupTag".into(), "1".into()));
                if m.starts_with("CHAP") {
                    ans.push(("AuthMethod".into(), "CHAP".into()));
                    transit = false;
                } else {
                    ans.push(("AuthMethod".into(), "None".into()));
                }
            } else if got.get("CHAP_A").is_some() {
                // MD5: the mutual answer below is computed with it.
                ans.push(("CHAP_A".into(), "5".into()));
                ans.push(("CHAP_I".into(), "17".into()));
                ans.push(("CHAP_C".into(), "0x00112233445566778899aabbccddeeff".into()));
                transit = false;
            } else if let (Some(i), Some(c)) = (got.get("CHAP_I"), got.get("CHAP_C")) {
                let id: u8 = i.parse().unwrap();
                let challenge = chap::decode_binary(c).unwrap();
                let secret = chap::Secret::new(b"targetsecret".to_vec());
                ans.push(("CHAP_N".into(), "target".into()));
                ans.push((
                    "CHAP_R".into(),
                    chap::encode_hex(&chap::response(
                        chap::ChapAlgorithm::Md5,
                        id,
                        &secret,
                        &challenge,
                    )),
                ));
            }
        } else {
            for (k, v) in got.iter() {
                let a = match rule_for(k) {
                    Some(Rule::Declarative) if k == "MaxRecvDataSegmentLength" => {
                        "65536".to_string()
                    }
                    Some(Rule::Declarative) => continue,
                    Some(Rule::List) => v.split(',').next().unwrap().to_string(),
                    Some(_) => v.to_string(),
                    None => "NotUnderstood".to_string(),
                };
                ans.push((k.to_string(), a));
            }
            ans.push(("TargetAlias".into(), "fuzz-target".into()));
        }
        let mut t = TextPairs::new();
        for (k, v) in &ans {
            t.push(k, v.clone());
        }
        let data = t.to_bytes();
        let rsp = LoginResponse {
            transit,
            cont: false,
            csg: req.csg,
            nsg: if transit { req.nsg } else { req.csg },
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: if transit && req.nsg == Stage::FullFeature {
                0x22
            } else {
                0
            },
            itt: req.itt,
            stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn.plus(16),
            status_class: 0,
            status_detail: 0,
        };
        // Optionally split the text over two PDUs with the C bit.
        let parts: Vec<&[u8]> = if multi_pdu && data.len() > 8 {
            vec![&data[..data.len() / 2], &data[data.len() / 2..]]
        } else {
            vec![&data[..]]
        };
        let last = parts.len() - 1;
        let mut progress = None;
        for (i, part) in parts.into_iter().enumerate() {
            let mut r = rsp.clone();
            if i < last {
                r.cont = true;
                r.transit = false;
                r.nsg = r.csg;
            }
            r.stat_sn = stat_sn;
            stat_sn = stat_sn.next();
            let bytes = pdu(
                PduHeader::LoginResponse(r.clone()),
                part,
                Digests::default(),
            );
            stream.extend_from_slice(&bytes);
            out.clear();
            progress = Some(login.on_response(&r, part, &mut out).expect("seed login"));
        }
        if let Some(LoginProgress::Done(_)) = progress {
            return stream;
        }
    }
    panic!("login seed {cfg:#x} did not finish");
}

fn login_error(class: u8, detail: u8, data: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend(pdu(
        PduHeader::LoginResponse(LoginResponse {
            transit: false,
            cont: false,
            csg: Stage::Security,
            nsg: Stage::Security,
            version_max: 0,
            version_active: 0,
            isid: iscsi_fuzz::FUZZ_ISID,
            tsih: 0,
            itt: 0,
            stat_sn: Sn(0),
            exp_cmd_sn: Sn(1),
            max_cmd_sn: Sn(1),
            status_class: class,
            status_detail: detail,
        }),
        data,
        Digests::default(),
    ));
    v
}

fn gen_login() {
    for (cfg, name) in [
        (0u8, "none"),
        (1, "chap"),
        (2, "mutual_chap"),
        (4, "discovery"),
        (8, "digests"),
        (9, "chap_digests"),
    ] {
        let s = login_seed(cfg, false);
        iscsi_fuzz::login(&s);
        write("fuzz_login", name, &s);
        let s = login_seed(cfg, true);
        iscsi_fuzz::login(&s);
        write("fuzz_login", &format!("{name}_continued"), &s);
    }
    write(
        "fuzz_login",
        "redirect",
        &login_error(1, 1, &text(&[("TargetAddress", "192.0.2.7:3260,1")])),
    );
    write("fuzz_login", "auth_failed", &login_error(2, 1, &[]));
    write("fuzz_login", "target_error", &login_error(3, 1, &[]));
}

// ---------------------------------------------------------------------------
// Connection conversations

/// A well-behaved target for the full feature phase.
struct Target {
    digests: Digests,
    mrdsl: usize,
    max_burst: u32,
    stat_sn: Sn,
    exp_cmd_sn: Sn,
    /// Write tasks: itt → (length, bytes received, next R2TSN).
    writes: HashMap<u32, (u32, u32, u32)>,
}

impl Target {
    fn sns(&self) -> (Sn, Sn) {
        (self.exp_cmd_sn, self.exp_cmd_sn.plus(7))
    }
    fn status(&mut self, itt: u32) -> Vec<u8> {
        let (e, m) = self.sns();
        let s = self.stat_sn;
        self.stat_sn = s.next();
        pdu(
            PduHeader::ScsiResponse(ScsiResponse {
                bidi_overflow: false,
                bidi_underflow: false,
                overflow: false,
                underflow: false,
                response: 0,
                status: 0,
                itt,
                snack_tag: 0,
                stat_sn: s,
                exp_cmd_sn: e,
                max_cmd_sn: m,
                exp_data_sn: Sn(0),
                bidi_residual: 0,
                residual: 0,
            }),
            &[],
            self.digests,
        )
    }
    fn r2t_or_status(&mut self, itt: u32) -> Vec<u8> {
        let (len, got, r2t_sn) = self.writes[&itt];
        if got >= len {
            self.writes.remove(&itt);
            return self.status(itt);
        }
        let (e, m) = self.sns();
        let want = (len - got).min(self.max_burst);
        self.writes.insert(itt, (len, got, r2t_sn + 1));
        pdu(
            PduHeader::R2t(R2t {
                lun: 0,
                itt,
                ttt: 0x1000 + r2t_sn,
                stat_sn: self.stat_sn,
                exp_cmd_sn: e,
                max_cmd_sn: m,
                r2t_sn: Sn(r2t_sn),
                buffer_offset: got,
                desired_len: want,
            }),
            &[],
            self.digests,
        )
    }
    fn answer(&mut self, h: &PduHeader, data: &[u8]) -> Vec<u8> {
        match h {
            PduHeader::ScsiCommand(c) => {
                self.exp_cmd_sn = self.exp_cmd_sn.max_sn(c.cmd_sn.next());
                if c.read {
                    let len = c.expected_data_len as usize;
                    let mut v = Vec::new();
                    let mut off = 0;
                    let mut data_sn = Sn(0);
                    while off < len {
                        let n = (len - off).min(self.mrdsl);
                        let last = off + n == len;
                        let (e, m) = self.sns();
                        let s = self.stat_sn;
                        if last {
                            self.stat_sn = s.next();
                        }
                        let payload: Vec<u8> = (off..off + n).map(|i| i as u8).collect();
                        v.extend(pdu(
                            PduHeader::DataIn(DataIn {
                                final_bit: last,
                                ack: false,
                                overflow: false,
                                underflow: false,
                                status_present: last,
                                status: 0,
                                lun: 0,
                                itt: c.itt,
                                ttt: RESERVED_TAG,
                                stat_sn: s,
                                exp_cmd_sn: e,
                                max_cmd_sn: m,
                                data_sn,
                                buffer_offset: off as u32,
                                residual: 0,
                            }),
                            &payload,
                            self.digests,
                        ));
                        data_sn = data_sn.next();
                        off += n;
                    }
                    v
                } else if c.write {
                    self.writes
                        .insert(c.itt, (c.expected_data_len, data.len() as u32, 0));
                    if c.final_bit {
                        self.r2t_or_status(c.itt)
                    } else {
                        Vec::new()
                    }
                } else {
                    self.status(c.itt)
                }
            }
            PduHeader::DataOut(d) => {
                if let Some(w) = self.writes.get_mut(&d.itt) {
                    w.1 += data.len() as u32;
                }
                if d.final_bit {
                    self.r2t_or_status(d.itt)
                } else {
                    Vec::new()
                }
            }
            PduHeader::NopOut(n) if n.itt != RESERVED_TAG => {
                let (e, m) = self.sns();
                let s = self.stat_sn;
                self.stat_sn = s.next();
                pdu(
                    PduHeader::NopIn(NopIn {
                        lun: 0,
                        itt: n.itt,
                        ttt: RESERVED_TAG,
                        stat_sn: s,
                        exp_cmd_sn: e,
                        max_cmd_sn: m,
                    }),
                    data,
                    self.digests,
                )
            }
            PduHeader::TextRequest(t) => {
                self.exp_cmd_sn = self.exp_cmd_sn.max_sn(t.cmd_sn.next());
                let (e, m) = self.sns();
                let s = self.stat_sn;
                self.stat_sn = s.next();
                pdu(
                    PduHeader::TextResponse(TextResponse {
                        final_bit: true,
                        cont: false,
                        lun: 0,
                        itt: t.itt,
                        ttt: RESERVED_TAG,
                        stat_sn: s,
                        exp_cmd_sn: e,
                        max_cmd_sn: m,
                    }),
                    &send_targets_text(),
                    self.digests,
                )
            }
            _ => Vec::new(),
        }
    }
}

trait MaxSn {
    fn max_sn(self, o: Sn) -> Sn;
}
impl MaxSn for Sn {
    fn max_sn(self, o: Sn) -> Sn {
        if o.gt(self) {
            o
        } else {
            self
        }
    }
}

/// A whole good conversation for the setup bytes `setup`, then `tail`.
fn conn_seed(setup: [u8; 5], tail: &[u8]) -> Vec<u8> {
    let mut input = Input(&setup);
    let s = conn_setup(&mut input);
    let p = &s.outcome.params;
    let digests = p.digests();
    let now = Instant::now();
    let mut c = conn_start(&s, now);
    let mut t = Target {
        digests,
        mrdsl: p.max_recv_data_segment_len as usize,
        max_burst: p.max_burst_len,
        stat_sn: s.outcome.exp_stat_sn,
        exp_cmd_sn: s.outcome.exp_cmd_sn,
        writes: HashMap::new(),
    };
    let framer = PduFramer {
        digests,
        max_data_segment_len: MAX_DATA_SEGMENT_LEN,
    };
    let mut stream = setup.to_vec();
    let mut done = 0;
    for _ in 0..100 {
        let tx = c.pending_tx().to_vec();
        c.consume_tx(tx.len());
        let mut at = 0;
        let mut reply = Vec::new();
        while at < tx.len() {
            let f = framer.frame(&tx[at..]).unwrap().unwrap();
            reply.extend(t.answer(&f.header, &tx[at..][f.data.clone()]));
            at += f.total_len;
        }
        if reply.is_empty() {
            break;
        }
        stream.extend_from_slice(&reply);
        c.receive(&reply, now).expect("good target");
        while let Some(e) = c.poll_event() {
            if let Event::Completed(d) = e {
                assert_eq!(d.status, 0);
                done += 1;
            }
        }
    }
    assert_eq!(
        done,
        CONN_COMMANDS.len(),
        "seed {setup:02x?} did not finish"
    );
    stream.extend_from_slice(tail);
    stream
}

fn gen_connection() {
    let reject = sample_pdus(Digests::default())
        .into_iter()
        .find(|(n, _)| *n == "reject")
        .unwrap()
        .1;
    let seeds: Vec<(&str, [u8; 5], Vec<u8>)> = vec![
        // a: digests | immediate | initial_r2t | mrdsl | max_xmit
        // b: max_burst | first_burst | max_r2t; w: window; chunk; timers
        (
            "plain_open_window",
            [0x04 | 0x10, 0x1a, 7, 0, 0],
            Vec::new(),
        ),
        ("r2t_small_bursts", [0x08 | 0x40, 0x30, 7, 2, 0], Vec::new()),
        (
            "unsolicited_data_out",
            [0x04 | 0xc0, 0x0a, 7, 3, 0],
            Vec::new(),
        ),
        (
            "digests_bytewise",
            [0x03 | 0x04 | 0x20, 0x3b, 7, 1, 0],
            Vec::new(),
        ),
        ("window_of_two", [0x0c | 0x30, 0x12, 2, 2, 0], Vec::new()),
        ("closed_window", [0x04 | 0x10, 0x1a, 0, 0, 4], Vec::new()),
        ("reject_after", [0x04 | 0x10, 0x1a, 7, 0, 0], reject),
        ("timers", [0x04 | 0x10, 0x1a, 7, 6, 3], Vec::new()),
        ("late_submit", [0x04 | 0x10, 0x1a, 2, 8 | 2, 0], Vec::new()),
    ];
    for (name, setup, tail) in seeds {
        let s = conn_seed(setup, &tail);
        iscsi_fuzz::connection(&s);
        write("fuzz_connection", name, &s);
    }
    let _ = Direction::Read;
}

// ---------------------------------------------------------------------------
// Network frames

mod net_seeds {
    use iscsi_bypass::net::{Instant as NetInstant, Interface, InterfaceConfig};
    use iscsi_bypass::phy::{Device, DeviceCaps, PhyError, RxMeta, TxOffload};
    use iscsi_bypass::wire::ethernet::{EtherType, EthernetAddress, EthernetRepr};
    use iscsi_bypass::wire::packet::Checksum;
    use iscsi_bypass::wire::tcp::{SeqNumber, TcpFlags, TcpOptions, TcpRepr, TcpTimestamp};
    use iscsi_bypass::wire::{arp, icmp, ipv4, tcp};
    use iscsi_fuzz::{NET_IP, NET_MAC, NET_PEER, NET_PORT};
    use std::time::Duration;

    const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

    fn eth(ty: EtherType, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + payload.len()];
        EthernetRepr {
            src_addr: EthernetAddress(PEER_MAC),
            dst_addr: EthernetAddress(NET_MAC),
            ethertype: ty,
        }
        .emit(&mut f)
        .unwrap();
        f[14..].copy_from_slice(payload);
        f
    }

    fn ip(protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + payload.len()];
        ipv4::Ipv4Repr {
            src_addr: NET_PEER,
            dst_addr: NET_IP,
            protocol,
            payload_len: payload.len(),
            ttl: 64,
            ident: 1,
            dont_frag: true,
        }
        .emit(&mut p, Checksum::Both)
        .unwrap();
        p[20..].copy_from_slice(payload);
        p
    }

    pub fn arp_request() -> Vec<u8> {
        let r = arp::ArpRepr {
            operation: arp::ArpOperation::Request,
            source_hardware_addr: EthernetAddress(PEER_MAC),
            source_protocol_addr: NET_PEER,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: NET_IP,
        };
        let mut b = vec![0u8; r.buffer_len()];
        r.emit(&mut b).unwrap();
        eth(EtherType::Arp, &b)
    }

    pub fn ping() -> Vec<u8> {
        let r = icmp::Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no: 1,
            data: b"abcdefgh",
        };
        let mut b = vec![0u8; r.buffer_len()];
        r.emit(&mut b).unwrap();
        eth(EtherType::Ipv4, &ip(ipv4::protocol::ICMP, &b))
    }

    pub fn tcp_segment(r: &TcpRepr<'_>) -> Vec<u8> {
        let mut b = vec![0u8; r.buffer_len()];
        r.emit(&mut b, NET_PEER, NET_IP, Checksum::Both).unwrap();
        eth(EtherType::Ipv4, &ip(ipv4::protocol::TCP, &b))
    }

    pub fn syn_options() -> TcpOptions {
        TcpOptions {
            mss: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            timestamp: Some(TcpTimestamp { tsval: 1, tsecr: 0 }),
            ..Default::default()
        }
    }

    pub fn syn() -> TcpRepr<'static> {
        TcpRepr {
            src_port: 40000,
            dst_port: NET_PORT,
            flags: TcpFlags {
                syn: true,
                ..Default::default()
            },
            seq_number: SeqNumber(1000),
            ack_number: None,
            window_len: 65535,
            options: syn_options(),
            payload: &[],
        }
    }

    /// Records the frames the stack sends.
    struct Capture {
        rx: Vec<Vec<u8>>,
        tx: Vec<Vec<u8>>,
    }
    impl Device for Capture {
        fn caps(&self) -> DeviceCaps {
            caps()
        }
        fn rx_burst(&mut self, _max: usize, on_frame: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
            let n = self.rx.len();
            for f in self.rx.drain(..) {
                on_frame(&f, RxMeta::default());
            }
            n
        }
        fn tx_frame(
            &mut self,
            len: usize,
            _o: TxOffload,
            fill: &mut dyn FnMut(&mut [u8]),
        ) -> Result<(), PhyError> {
            let mut b = vec![0u8; len];
            fill(&mut b);
            self.tx.push(b);
            Ok(())
        }
        fn tx_flush(&mut self) -> usize {
            0
        }
    }

    fn caps() -> DeviceCaps {
        DeviceCaps {
            mac: NET_MAC,
            mtu: 1500,
            rx_checksum: false,
            tx_checksum: false,
            tso: false,
            max_tx_frame: 1514,
        }
    }

    /// A TCP handshake, data and FIN against the stack as net_iface sets it
    /// up for config byte `cfg` (same seed, so the same ISN).
    pub fn conversation(cfg: u8) -> Vec<Vec<u8>> {
        let mut config = InterfaceConfig::new(NET_IP, 24);
        config.seed = u64::from(cfg);
        let mut iface = Interface::new(config, caps());
        let l = iface.add_socket(None);
        iface.listen(l, NET_PORT).unwrap();
        let syn_frame = tcp_segment(&syn());
        let mut dev = Capture {
            rx: vec![arp_request(), syn_frame.clone()],
            tx: Vec::new(),
        };
        let now = NetInstant::from_millis(1000);
        iface.poll(now, &mut dev);
        iface.poll(now + Duration::from_millis(1), &mut dev);
        let synack = dev
            .tx
            .iter()
            .filter_map(|f| {
                let p = tcp::Packet::new_checked(f.get(34..)?).ok()?;
                let r = TcpRepr::parse(&p, NET_IP, NET_PEER, Checksum::None).ok()?;
                r.flags.syn.then_some((r.seq_number, r.options.timestamp))
            })
            .next()
            .expect("SYN-ACK");
        let their = synack.0 + 1;
        let ts = synack.1.map(|t| TcpTimestamp {
            tsval: 2,
            tsecr: t.tsval,
        });
        let opts = TcpOptions {
            timestamp: ts,
            ..Default::default()
        };
        let seg = |seq: u32, flags: TcpFlags, payload: &'static [u8]| TcpRepr {
            src_port: 40000,
            dst_port: NET_PORT,
            flags,
            seq_number: SeqNumber(seq),
            ack_number: Some(their),
            window_len: 512,
            options: opts,
            payload,
        };
        vec![
            arp_request(),
            ping(),
            syn_frame,
            tcp_segment(&seg(1001, TcpFlags::default(), &[])),
            tcp_segment(&seg(
                1001,
                TcpFlags {
                    psh: true,
                    ..Default::default()
                },
                b"login request bytes",
            )),
            tcp_segment(&seg(
                1020,
                TcpFlags {
                    fin: true,
                    ..Default::default()
                },
                &[],
            )),
        ]
    }
}

fn gen_net() {
    use net_seeds::*;
    let with_sel = |sel: u8, b: &[u8]| {
        let mut v = vec![sel];
        v.extend_from_slice(b);
        v
    };
    let arp = arp_request();
    let png = ping();
    let syn = tcp_segment(&syn());
    write("fuzz_net_packet", "ethernet", &with_sel(0, &arp));
    write("fuzz_net_packet", "arp", &with_sel(1, &arp[14..]));
    write("fuzz_net_packet", "ipv4_icmp", &with_sel(2, &png[14..]));
    write("fuzz_net_packet", "icmp_echo", &with_sel(3, &png[34..]));
    write("fuzz_net_packet", "tcp_syn", &with_sel(4, &syn[34..]));
    write(
        "fuzz_net_packet",
        "tcp_syn_nocsum",
        &with_sel(0x84, &syn[34..]),
    );
    let opts = syn_options();
    let mut ob = vec![0u8; opts.buffer_len()];
    opts.emit(&mut ob).unwrap();
    write("fuzz_net_packet", "tcp_options", &with_sel(5, &ob));
    for cfg in [0u8, 0x85] {
        let mut v = vec![cfg];
        for f in conversation(cfg) {
            v.extend_from_slice(&(f.len() as u16).to_be_bytes());
            v.extend_from_slice(&f);
        }
        iscsi_fuzz::net_iface(&v);
        write("fuzz_net_iface", &format!("handshake_{cfg:02x}"), &v);
    }
}

// ---------------------------------------------------------------------------
// The embedded target, driven by our own initiator

fn target_seed(digests: bool, chunk: u8) -> Vec<u8> {
    use iscsi_bypass::iscsi::connection::{Command, ConnTimers, Connection};
    use iscsi_bypass::iscsi::login::LoginConfig;
    use iscsi_bypass::iscsi::params::DigestKind;
    use iscsi_bypass::target::TargetConn;
    let now = Instant::now();
    let mut t = TargetConn::new(iscsi_fuzz::target_shared(), 0, now);
    let mut cfg = LoginConfig::new(
        "iqn.2024-01.org.example:initiator",
        Some(iscsi_fuzz::TARGET_IQN),
    );
    cfg.isid = iscsi_fuzz::FUZZ_ISID;
    cfg.offer.max_recv_data_segment_len = 8192;
    if digests {
        cfg.offer.header_digest = vec![DigestKind::Crc32c];
        cfg.offer.data_digest = vec![DigestKind::Crc32c];
    }
    let mut login = Login::new(cfg, 0, Sn(1));
    let mut out = Vec::new();
    login.start(&mut out);
    let mut sent = vec![chunk];
    let framer = PduFramer {
        digests: Digests::default(),
        max_data_segment_len: MAX_DATA_SEGMENT_LEN,
    };
    let outcome = loop {
        sent.extend_from_slice(&out);
        t.receive(&out, now);
        let back = t.output().to_vec();
        t.clear_output();
        let f = framer.frame(&back).unwrap().expect("login response");
        let PduHeader::LoginResponse(r) = &f.header else {
            panic!("{:?}", f.header)
        };
        out.clear();
        match login
            .on_response(r, &back[f.data.clone()], &mut out)
            .expect("login to the embedded target")
        {
            LoginProgress::Continue => {}
            LoginProgress::Done(o) => break o,
        }
    };
    let mut c = Connection::new(&outcome, ConnTimers::default(), now);
    let cmds: Vec<(Vec<u8>, Direction, usize)> = vec![
        (Cdb::inquiry(96).as_slice().to_vec(), Direction::Read, 96),
        (
            Cdb::read_capacity16(32).as_slice().to_vec(),
            Direction::Read,
            32,
        ),
        (
            Cdb::write16(8, 16, false).as_slice().to_vec(),
            Direction::Write,
            8192,
        ),
        (
            Cdb::read16(8, 16).as_slice().to_vec(),
            Direction::Read,
            8192,
        ),
        (
            Cdb::test_unit_ready().as_slice().to_vec(),
            Direction::None,
            0,
        ),
        (
            Cdb::report_luns(0, 256).as_slice().to_vec(),
            Direction::Read,
            256,
        ),
    ];
    let n = cmds.len();
    for (i, (cdb, dir, len)) in cmds.into_iter().enumerate() {
        let mut cmd = Command::new(0, &cdb, dir, vec![i as u8; len]).unwrap();
        cmd.user_tag = i as u64;
        c.submit(cmd, now).unwrap();
    }
    let mut done = 0;
    for _ in 0..100 {
        let tx = c.pending_tx().to_vec();
        c.consume_tx(tx.len());
        if tx.is_empty() && done == n {
            break;
        }
        sent.extend_from_slice(&tx);
        t.receive(&tx, now);
        let back = t.output().to_vec();
        t.clear_output();
        c.receive(&back, now).expect("embedded target answers well");
        while let Some(e) = c.poll_event() {
            if let Event::Completed(d) = e {
                assert_eq!(d.status, 0, "{:?}", d.command);
                done += 1;
            }
        }
    }
    assert_eq!(done, n);
    c.logout(now).unwrap();
    sent.extend_from_slice(c.pending_tx());
    sent
}

fn gen_target() {
    for (name, digests, chunk) in [
        ("session", false, 0u8),
        ("session_digests", true, 3),
        ("session_bytewise", false, 1),
    ] {
        let s = target_seed(digests, chunk);
        iscsi_fuzz::target_conn(&s);
        write("fuzz_target_conn", name, &s);
    }
}

/// NBD client conversations: `[cfg, chunk]` (see `iscsi_fuzz::nbd`), the
/// client flags, options, then transmission requests.
fn gen_nbd() {
    use iscsi_bypass::nbd::wire::{self, cmd, info, opt, InfoRequest, Request};
    let option = |v: &mut Vec<u8>, o: u32, data: &[u8]| wire::emit_option(o, data, v);
    let info_req = |name: &[u8], reqs: Vec<u16>| {
        let mut d = Vec::new();
        InfoRequest {
            name,
            requests: reqs,
        }
        .emit(&mut d);
        d
    };
    let request = |v: &mut Vec<u8>, kind: u16, handle: u64, offset: u64, length: u32| {
        Request {
            flags: if kind == cmd::WRITE { 1 } else { 0 },
            kind,
            handle,
            offset,
            length,
        }
        .emit(v);
        if kind == cmd::WRITE {
            v.extend((0..length).map(|i| i as u8));
        }
    };
    let requests = |v: &mut Vec<u8>| {
        request(v, cmd::WRITE, 1, 4096, 1024);
        request(v, cmd::READ, 2, 4096, 1024);
        request(v, cmd::FLUSH, 3, 0, 0);
        request(v, cmd::TRIM, 4, 0, 8192);
        request(v, cmd::WRITE_ZEROES, 5, 512, 4096);
        request(v, cmd::READ, 6, 100, 7);
        request(v, cmd::DISC, 7, 0, 0);
    };
    // Max payload 64 KiB: bits 3-4 = 2.
    let mp = 2 << 3;
    let all = vec![info::EXPORT, info::NAME, info::DESCRIPTION, info::BLOCK_SIZE];

    let mut v = vec![mp, 0, 0, 0, 0, 3];
    option(&mut v, opt::LIST, &[]);
    option(&mut v, opt::INFO, &info_req(b"", all.clone()));
    option(&mut v, opt::STRUCTURED_REPLY, &[]);
    option(&mut v, opt::GO, &info_req(b"lun0", vec![info::BLOCK_SIZE]));
    requests(&mut v);
    write("fuzz_nbd", "go", &v);

    let mut v = vec![mp, 1, 0, 0, 0, 1];
    option(&mut v, opt::INFO, &info_req(b"nope", vec![]));
    option(&mut v, opt::EXPORT_NAME, b"lun0");
    requests(&mut v);
    write("fuzz_nbd", "export_name_bytewise", &v);

    // TLS required; the TLS handshake succeeds.
    let mut v = vec![2 | 4 | mp, 7, 0, 0, 0, 3];
    option(&mut v, opt::GO, &info_req(b"", all.clone()));
    option(&mut v, opt::LIST, &[]);
    option(&mut v, opt::STARTTLS, &[]);
    option(&mut v, opt::STARTTLS, &[]);
    option(&mut v, opt::GO, &info_req(b"", all.clone()));
    requests(&mut v);
    write("fuzz_nbd", "tls_required", &v);

    // TLS required, the client asks for the export without it.
    let mut v = vec![2 | mp, 3, 0, 0, 0, 3];
    option(&mut v, opt::INFO, &info_req(b"", all.clone()));
    option(&mut v, opt::EXPORT_NAME, b"");
    write("fuzz_nbd", "tls_required_refused", &v);

    // TLS allowed, 32 MiB payloads, a bad INFO, abort.
    let mut v = vec![1 | 4 | (3 << 3), 0, 0, 0, 0, 3];
    option(&mut v, opt::STARTTLS, b"x");
    option(&mut v, opt::INFO, &[0, 0, 0, 9, 1]);
    option(&mut v, opt::ABORT, &[]);
    write("fuzz_nbd", "tls_allowed_abort", &v);

    for name in ["go", "export_name_bytewise", "tls_required", "tls_required_refused", "tls_allowed_abort"] {
        iscsi_fuzz::nbd(&std::fs::read(dir("fuzz_nbd").join(name)).unwrap());
    }
}

fn main() {
    gen_nbd();
    gen_net();
    gen_target();
    gen_pdus();
    gen_text();
    gen_scsi();
    gen_url_chap();
    gen_login();
    gen_connection();
    println!("seed corpora written under {}", dir("").display());
}
