use super::*;
use crate::iscsi::chap::{ChapAlgorithm, Secret};
use crate::target::{TargetConfig, TargetLimits, TargetShared};
use crate::wire::iscsi::tmf;
use crate::wire::iscsi::{LoginRequest, ScsiCommand};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;

const IQN: &str = "iqn.2024-01.test:target";

fn shared(cfg: TargetConfig) -> SharedTarget {
    let addrs: Vec<SocketAddr> = vec![
        "10.0.0.1:3260".parse().unwrap(),
        "10.0.1.1:3260".parse().unwrap(),
    ];
    Arc::new(TargetShared::new(cfg, &addrs).unwrap())
}

/// A scripted initiator talking to one `TargetConn`.
struct Peer {
    conn: TargetConn,
    digests: Digests,
    now: Instant,
    cmd_sn: Sn,
    itt: u32,
    isid: [u8; 6],
    /// The TSIH and CID the logins carry (MC/S: a session's TSIH).
    tsih: u16,
    cid: u16,
}

type Pdu = (PduHeader, Vec<u8>);

impl Peer {
    fn new(shared: SharedTarget, portal: usize) -> Peer {
        let now = Instant::now();
        Peer {
            conn: TargetConn::new(shared, portal, now),
            digests: Digests::default(),
            now,
            cmd_sn: Sn(100),
            itt: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            cid: 1,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Vec<Pdu> {
        self.conn.receive(bytes, self.now);
        self.take_output()
    }

    /// Runs the connection's timers and returns what it sent.
    fn tick(&mut self) -> Vec<Pdu> {
        self.conn.handle_timeout(self.now);
        self.take_output()
    }

    /// The output's bytes, Data-In lent by reference included.
    fn take_raw(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.conn.output_len());
        for part in self.conn.output_parts() {
            out.extend_from_slice(part.bytes());
        }
        assert_eq!(out.len(), self.conn.output_len());
        self.conn.clear_output();
        out
    }

    fn take_output(&mut self) -> Vec<Pdu> {
        let out = self.take_raw();
        let framer = PduFramer {
            digests: self.digests,
            max_data_segment_len: 16 << 20,
        };
        let mut pdus = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let f = framer
                .frame(&out[at..])
                .expect("target output frames")
                .expect("whole PDU");
            pdus.push((f.header.clone(), out[at..][f.data.clone()].to_vec()));
            at += f.total_len;
        }
        pdus
    }

    #[track_caller]
    fn send(&mut self, h: PduHeader, data: &[u8]) -> Vec<Pdu> {
        let mut bytes = Vec::new();
        crate::wire::iscsi::encode_pdu(&mut bytes, &h, data, self.digests);
        self.send_raw(&bytes)
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    #[track_caller]
    fn login_step(
        &mut self,
        csg: Stage,
        nsg: Stage,
        transit: bool,
        keys: &[(&str, &str)],
    ) -> (LoginResponse, TextPairs) {
        let mut t = TextPairs::new();
        for (k, v) in keys {
            t.push(k, *v);
        }
        let h = PduHeader::LoginRequest(LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: self.isid,
            tsih: self.tsih,
            itt: 7,
            cid: self.cid,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: Sn(50),
        });
        let mut pdus = self.send(h, &t.to_bytes());
        assert_eq!(pdus.len(), 1, "one login response");
        let (h, data) = pdus.remove(0);
        let PduHeader::LoginResponse(r) = h else {
            panic!("not a login response: {h:?}")
        };
        (r, TextPairs::parse(&data).unwrap())
    }

    /// Normal session without authentication, straight to full feature.
    #[track_caller]
    fn login_normal(&mut self, ops: &[(&str, &str)]) -> TextPairs {
        let mut keys = vec![
            ("InitiatorName", "iqn.2024-01.test:ini"),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
        ];
        keys.extend_from_slice(ops);
        let (r, t) = self.login_step(Stage::Operational, Stage::FullFeature, true, &keys);
        assert_eq!((r.status_class, r.status_detail), (0, 0), "{t:?}");
        assert!(r.transit && r.nsg == Stage::FullFeature);
        assert!(self.conn.is_full_feature());
        self.digests = self.conn.params().digests();
        t
    }

    fn command(
        &mut self,
        cdb: &[u8],
        read: bool,
        write: bool,
        expected: u32,
        final_bit: bool,
    ) -> ScsiCommand {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let itt = self.next_itt();
        let cmd = ScsiCommand {
            immediate: false,
            final_bit,
            read,
            write,
            attr: 1,
            lun: 0,
            itt,
            expected_data_len: expected,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: Sn(0),
            cdb: c,
        };
        self.cmd_sn = self.cmd_sn.next();
        cmd
    }

    #[track_caller]
    fn read10(&mut self, lba: u32, blocks: u16) -> Vec<Pdu> {
        let mut cdb = vec![0x28, 0];
        cdb.extend_from_slice(&lba.to_be_bytes());
        cdb.extend_from_slice(&[0, (blocks >> 8) as u8, blocks as u8, 0]);
        let c = self.command(&cdb, true, false, u32::from(blocks) * 512, true);
        self.send(PduHeader::ScsiCommand(c), &[])
    }
}

fn read10_cdb(lba: u32, blocks: u16) -> Vec<u8> {
    let mut cdb = vec![0x28, 0];
    cdb.extend_from_slice(&lba.to_be_bytes());
    cdb.extend_from_slice(&[0, (blocks >> 8) as u8, blocks as u8, 0]);
    cdb
}

fn write10_cdb(lba: u32, blocks: u16) -> Vec<u8> {
    let mut cdb = vec![0x2a, 0];
    cdb.extend_from_slice(&lba.to_be_bytes());
    cdb.extend_from_slice(&[0, (blocks >> 8) as u8, blocks as u8, 0]);
    cdb
}

/// Joins Data-In payloads and returns (data, final status PDU).
#[track_caller]
fn collect_data_in(pdus: &[Pdu]) -> (Vec<u8>, DataIn) {
    let mut data = Vec::new();
    let mut last = None;
    for (i, (h, d)) in pdus.iter().enumerate() {
        let PduHeader::DataIn(di) = h else {
            panic!("expected Data-In, got {h:?}")
        };
        assert_eq!(di.data_sn, Sn(i as u32));
        assert_eq!(di.buffer_offset as usize, data.len());
        assert_eq!(di.status_present, i == pdus.len() - 1);
        data.extend_from_slice(d);
        last = Some(di.clone());
    }
    (data, last.expect("at least one Data-In"))
}

#[track_caller]
fn expect_sense(pdus: &[Pdu], key: u8, asc: u8, ascq: u8) {
    assert_eq!(pdus.len(), 1);
    let (PduHeader::ScsiResponse(r), data) = &pdus[0] else {
        panic!("{:?}", pdus[0])
    };
    assert_eq!(r.status, ScsiStatus::CheckCondition.as_u8());
    assert_eq!(&data[..2], &[0, 18]);
    assert_eq!(
        (data[2] & 0x7f, data[4] & 0x0f, data[14], data[15]),
        (0x70, key, asc, ascq)
    );
}

#[test]
fn login_negotiates_with_rfc_result_functions() {
    let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 1);
    let t = p.login_normal(&[
        ("HeaderDigest", "CRC32C,None"),
        ("DataDigest", "None"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "65536"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxOutstandingR2T", "16"),
        ("MaxRecvDataSegmentLength", "32768"),
        ("ErrorRecoveryLevel", "2"),
        ("X-com.example.Vendor", "1"),
    ]);
    assert_eq!(t.get("HeaderDigest"), Some("CRC32C"));
    assert_eq!(t.get("DataDigest"), Some("None"));
    assert_eq!(t.get("MaxBurstLength"), Some("1048576"));
    assert_eq!(t.get("FirstBurstLength"), Some("65536"));
    assert_eq!(t.get("InitialR2T"), Some("No"));
    assert_eq!(t.get("MaxOutstandingR2T"), Some("8"));
    assert_eq!(t.get("ErrorRecoveryLevel"), Some("2"));
    assert_eq!(t.get("X-com.example.Vendor"), Some("NotUnderstood"));
    assert_eq!(t.get("TargetPortalGroupTag"), Some("2"));
    assert_eq!(t.get("MaxRecvDataSegmentLength"), Some("262144"));
    assert_eq!(p.conn.params().max_xmit_data_segment_len, 32768);
    assert_ne!(p.conn.tsih(), 0);
    // Header digests are on from the first full-feature PDU: a NOP round trip proves it.
    let itt = p.next_itt();
    let pdus = p.send(
        PduHeader::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: p.cmd_sn,
            exp_stat_sn: Sn(0),
        }),
        b"ping",
    );
    let (PduHeader::NopIn(n), d) = &pdus[0] else {
        panic!()
    };
    assert_eq!((n.itt, d.as_slice()), (itt, &b"ping"[..]));
}

#[test]
fn login_refusals() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut p = Peer::new(s.clone(), 0);
    let (r, _) = p.login_step(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &[("InitiatorName", "iqn.x"), ("TargetName", "iqn.nope")],
    );
    assert_eq!((r.status_class, r.status_detail), (0x02, 0x03));
    assert!(p.conn.is_closed());
    let mut p = Peer::new(s.clone(), 0);
    let (r, _) = p.login_step(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &[("TargetName", IQN)],
    );
    assert_eq!((r.status_class, r.status_detail), (0x02, 0x07));
    s.faults.portal(0).refuse_logins(0x03, 0x01);
    let mut p = Peer::new(s.clone(), 0);
    let (r, _) = p.login_step(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &[("InitiatorName", "iqn.x"), ("TargetName", IQN)],
    );
    assert_eq!((r.status_class, r.status_detail), (0x03, 0x01));
    // Portal 1 is not refused.
    let mut p = Peer::new(s, 1);
    p.login_normal(&[]);
}

/// Runs the CHAP exchange; returns the final response and its keys.
fn chap_login(
    p: &mut Peer,
    user: &str,
    secret: &[u8],
    mutual: Option<(u8, &[u8])>,
) -> (LoginResponse, TextPairs) {
    let (r, t) = p.login_step(
        Stage::Security,
        Stage::Operational,
        true,
        &[
            ("InitiatorName", "iqn.2024-01.test:ini"),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ],
    );
    assert_eq!(r.status_class, 0);
    assert!(!r.transit, "no transit before CHAP completes");
    assert_eq!(t.get("AuthMethod"), Some("CHAP"));
    // The initiator's first choice wins; the target accepts all by default.
    let (r, t) = p.login_step(
        Stage::Security,
        Stage::Operational,
        false,
        &[("CHAP_A", "7,5")],
    );
    assert_eq!(r.status_class, 0);
    assert_eq!(t.get("CHAP_A"), Some("7"));
    let id = chap::parse_identifier(t.get("CHAP_I").unwrap()).unwrap();
    let challenge = chap::decode_binary(t.get("CHAP_C").unwrap()).unwrap();
    assert_eq!(challenge.len(), 32);
    let r_hex = chap::encode_hex(&chap::response(
        ChapAlgorithm::Sha256,
        id,
        &Secret::new(secret.to_vec()),
        &challenge,
    ));
    let mut keys = vec![("CHAP_N", user.to_string()), ("CHAP_R", r_hex)];
    if let Some((i, c)) = mutual {
        keys.push(("CHAP_I", i.to_string()));
        keys.push(("CHAP_C", chap::encode_hex(c)));
    }
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
    p.login_step(Stage::Security, Stage::Operational, true, &keys)
}

#[test]
fn chap_one_way() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20).chap("alice", "secretsecret12"));
    let mut p = Peer::new(s.clone(), 0);
    let (r, _) = chap_login(&mut p, "alice", b"secretsecret12", None);
    assert_eq!(
        (r.status_class, r.transit, r.nsg),
        (0, true, Stage::Operational)
    );
    let (r, _) = p.login_step(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &[("MaxRecvDataSegmentLength", "8192")],
    );
    assert_eq!((r.status_class, r.nsg), (0, Stage::FullFeature));
    assert!(p.conn.is_full_feature());

    let mut p = Peer::new(s.clone(), 0);
    let (r, _) = chap_login(&mut p, "alice", b"wrong-secret!!", None);
    assert_eq!((r.status_class, r.status_detail), (0x02, 0x01));
    assert!(p.conn.is_closed());

    // Skipping security when CHAP is required fails too.
    let mut p = Peer::new(s.clone(), 0);
    let (r, _) = p.login_step(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &[("InitiatorName", "iqn.x"), ("TargetName", IQN)],
    );
    assert_eq!((r.status_class, r.status_detail), (0x02, 0x01));

    // Mutual CHAP asked, but the target has no secret of its own.
    let mut p = Peer::new(s, 0);
    let (r, _) = chap_login(&mut p, "alice", b"secretsecret12", Some((9, &[0x55; 16])));
    assert_eq!((r.status_class, r.status_detail), (0x02, 0x01));
}

#[test]
fn chap_mutual() {
    let s = shared(
        TargetConfig::ram(IQN, 1 << 20)
            .chap("alice", "secretsecret12")
            .mutual_chap("target-bob", "targetsecret34"),
    );
    let mut p = Peer::new(s, 0);
    let challenge = [0x42u8; 16];
    let (r, t) = chap_login(&mut p, "alice", b"secretsecret12", Some((9, &challenge)));
    assert_eq!(r.status_class, 0);
    assert_eq!(t.get("CHAP_N"), Some("target-bob"));
    let their = chap::decode_binary(t.get("CHAP_R").unwrap()).unwrap();
    let sha256 = ChapAlgorithm::Sha256;
    let target_secret = Secret::new(b"targetsecret34".to_vec());
    chap::verify(sha256, 9, &target_secret, &challenge, &their).unwrap();
    let other = Secret::new(b"other".to_vec());
    assert!(chap::verify(sha256, 9, &other, &challenge, &their).is_err());
    // The mutual answer uses the chosen algorithm, not MD5.
    assert!(chap::verify(ChapAlgorithm::Md5, 9, &target_secret, &challenge, &their).is_err());
}

#[test]
fn chap_algorithms_the_target_accepts() {
    let s = shared(
        TargetConfig::ram(IQN, 1 << 20)
            .chap("alice", "secretsecret12")
            .chap_algorithms(&[ChapAlgorithm::Md5, ChapAlgorithm::Sha1]),
    );
    let first_steps = |p: &mut Peer, offer: &str| {
        p.login_step(
            Stage::Security,
            Stage::Operational,
            true,
            &[
                ("InitiatorName", "iqn.2024-01.test:ini"),
                ("TargetName", IQN),
                ("AuthMethod", "CHAP"),
            ],
        );
        p.login_step(
            Stage::Security,
            Stage::Operational,
            false,
            &[("CHAP_A", offer)],
        )
    };
    // First offered value it accepts.
    let mut p = Peer::new(s.clone(), 0);
    let (r, t) = first_steps(&mut p, "8,7,6,5");
    assert_eq!((r.status_class, t.get("CHAP_A")), (0, Some("6")));
    assert_eq!(
        chap::decode_binary(t.get("CHAP_C").unwrap()).unwrap().len(),
        20
    );
    // None of them: authentication failure, saying what it accepts.
    let mut p = Peer::new(s, 0);
    let (r, t) = first_steps(&mut p, "8,7");
    assert_eq!((r.status_class, r.status_detail), (0x02, 0x01));
    assert_eq!(
        t.get(crate::iscsi::login::ACCEPTED_CHAP_ALGORITHMS_KEY),
        Some("5,6")
    );
    assert!(p.conn.is_closed());
}

#[test]
fn discovery_send_targets_lists_every_portal() {
    let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
    let (r, t) = p.login_step(
        Stage::Operational,
        Stage::FullFeature,
        true,
        &[("InitiatorName", "iqn.x"), ("SessionType", "Discovery")],
    );
    assert_eq!(r.status_class, 0);
    assert_eq!(t.get("TargetPortalGroupTag"), None);
    let pdus = p.send(
        PduHeader::TextRequest(TextRequest {
            immediate: true,
            final_bit: true,
            cont: false,
            lun: 0,
            itt: 3,
            ttt: RESERVED_TAG,
            cmd_sn: p.cmd_sn,
            exp_stat_sn: Sn(0),
        }),
        b"SendTargets=All\0",
    );
    let (PduHeader::TextResponse(tr), data) = &pdus[0] else {
        panic!()
    };
    assert!(tr.final_bit && tr.ttt == RESERVED_TAG);
    let t = TextPairs::parse(data).unwrap();
    let v: Vec<(&str, &str)> = t.iter().collect();
    assert_eq!(
        v,
        [
            ("TargetName", IQN),
            ("TargetAddress", "10.0.0.1:3260,1"),
            ("TargetAddress", "10.0.1.1:3260,2"),
        ]
    );
    // SCSI commands are not for discovery sessions.
    let c = p.command(&[0x00], false, false, 0, true);
    let pdus = p.send(PduHeader::ScsiCommand(c), &[]);
    assert!(matches!(&pdus[0].0, PduHeader::Reject(r) if r.reason == reject::NOT_SUPPORTED));
    // Logout closes.
    let pdus = p.send(
        PduHeader::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: 0,
            itt: 9,
            cid: 1,
            cmd_sn: p.cmd_sn,
            exp_stat_sn: Sn(0),
        }),
        &[],
    );
    assert!(matches!(&pdus[0].0, PduHeader::LogoutResponse(l) if l.response == 0 && l.itt == 9));
    assert!(p.conn.is_closed());
}

#[test]
fn long_text_response_continues_with_ttt() {
    let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
    p.login_normal(&[("MaxRecvDataSegmentLength", "512")]);
    let mut req = Vec::new();
    for i in 0..40 {
        req.extend_from_slice(format!("X-unknown-key-{i:03}=value\0").as_bytes());
    }
    let mut text = Vec::new();
    let mut pdus = p.send(
        PduHeader::TextRequest(TextRequest {
            immediate: true,
            final_bit: true,
            cont: false,
            lun: 0,
            itt: 3,
            ttt: RESERVED_TAG,
            cmd_sn: p.cmd_sn,
            exp_stat_sn: Sn(0),
        }),
        &req,
    );
    loop {
        let (PduHeader::TextResponse(tr), data) = pdus.remove(0) else {
            panic!()
        };
        assert!(data.len() <= 512);
        text.extend_from_slice(&data);
        if tr.final_bit {
            break;
        }
        assert!(tr.cont && tr.ttt != RESERVED_TAG);
        pdus = p.send(
            PduHeader::TextRequest(TextRequest {
                immediate: true,
                final_bit: true,
                cont: false,
                lun: 0,
                itt: 3,
                ttt: tr.ttt,
                cmd_sn: p.cmd_sn,
                exp_stat_sn: Sn(0),
            }),
            &[],
        );
    }
    assert_eq!(TextPairs::parse(&text).unwrap().0.len(), 40);
}

#[test]
fn read_is_split_at_initiator_mrdsl_with_status_in_last_data_in() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    s.luns[0].write(512 * 10, &pattern);
    let mut p = Peer::new(s, 0);
    p.login_normal(&[
        ("MaxRecvDataSegmentLength", "1000"),
        ("MaxBurstLength", "4096"),
    ]);
    let pdus = p.read10(10, 16);
    assert_eq!(
        pdus.len(),
        10,
        "8192 bytes in 1000-byte PDUs cut at 4096-byte bursts"
    );
    let (data, last) = collect_data_in(&pdus);
    assert_eq!(data, pattern);
    assert_eq!(last.status, ScsiStatus::Good.as_u8());
    assert!(!last.underflow && !last.overflow);
    let finals: Vec<bool> = pdus
        .iter()
        .map(|(h, _)| matches!(h, PduHeader::DataIn(d) if d.final_bit))
        .collect();
    assert_eq!(finals.iter().filter(|&&f| f).count(), 2);
    assert!(finals[4] && finals[9]);
}

#[test]
fn read_with_digests_and_residuals() {
    let mut p = Peer::new(shared(TargetConfig::null(IQN, 1 << 20)), 0);
    p.login_normal(&[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]);
    assert!(p.digests.header && p.digests.data);
    // INQUIRY with a 255-byte allocation: 66 bytes come back, underflow 189.
    let c = p.command(&[0x12, 0, 0, 0, 255], true, false, 255, true);
    let pdus = p.send(PduHeader::ScsiCommand(c), &[]);
    let (data, last) = collect_data_in(&pdus);
    assert_eq!(data.len(), 66);
    assert_eq!(&data[8..15], b"IBYPASS");
    assert!(last.underflow && last.residual == 189);
    // READ asking for 2 blocks with room for 1: overflow 512.
    let c = p.command(&[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], true, false, 512, true);
    let pdus = p.send(PduHeader::ScsiCommand(c), &[]);
    let (data, last) = collect_data_in(&pdus);
    assert_eq!(data, vec![0u8; 512]);
    assert!(last.overflow && last.residual == 512);
}

/// Data-In by reference (the userspace listener's way) puts the same
/// bytes on the wire as the copy: header and data digests over the lent
/// bytes, PDUs cut at the initiator's MRDSL and at chunk boundaries of the
/// LU, unwritten space (zeros), ERL 1 retention, and a Data-In left out by
/// fault injection.
#[test]
fn data_in_by_reference_sends_what_the_copy_sends() {
    let run = |by_reference: bool| {
        let s = shared(TargetConfig::ram(IQN, 4 << 20));
        let pattern: Vec<u8> = (0..(3u32 << 20))
            .map(|i| (i * 31 + i / 4099) as u8)
            .collect();
        s.luns[0].write(0, &pattern);
        let mut p = Peer::new(s.clone(), 0);
        p.conn.set_data_in_by_reference(by_reference);
        p.login_normal(&[
            ("HeaderDigest", "CRC32C"),
            ("DataDigest", "CRC32C"),
            ("MaxRecvDataSegmentLength", "12288"),
            ("ErrorRecoveryLevel", "1"),
        ]);
        let mut wire = Vec::new();
        let mut reads = Vec::new();
        for (i, (lba, blocks)) in [(0, 1), (500, 40), (1000, 256), (6100, 300), (7, 3)]
            .into_iter()
            .enumerate()
        {
            if i == 2 {
                s.faults.drop_data_in(p.cid, 1);
            }
            let c = p.command(
                &read10_cdb(lba, blocks),
                true,
                false,
                u32::from(blocks) * 512,
                true,
            );
            let mut bytes = Vec::new();
            crate::wire::iscsi::encode_pdu(&mut bytes, &PduHeader::ScsiCommand(c), &[], p.digests);
            p.conn.receive(&bytes, p.now);
            let raw = p.take_raw();
            reads.push(raw.len());
            wire.extend_from_slice(&raw);
        }
        (wire, reads, pattern)
    };
    let (copied, sizes, pattern) = run(false);
    let (lent, lent_sizes, _) = run(true);
    assert_eq!(sizes, lent_sizes);
    assert!(copied == lent, "Data-In by reference differs from the copy");
    // And the bytes are the LU's: the 40 blocks at LBA 500 cross a chunk.
    let framer = PduFramer {
        digests: Digests {
            header: true,
            data: true,
        },
        max_data_segment_len: 1 << 20,
    };
    let mut data = Vec::new();
    let second = &lent[sizes[0]..sizes[0] + sizes[1]];
    let mut at = 0;
    while at < second.len() {
        let f = framer.frame(&second[at..]).unwrap().unwrap();
        data.extend_from_slice(&second[at..][f.data.clone()]);
        at += f.total_len;
    }
    assert_eq!(data, pattern[500 * 512..540 * 512]);
}

/// A READ's Data-In lent by reference keeps the bytes the READ saw when a
/// WRITE to the same blocks runs before the output went out (the LU copies
/// the lent chunk first), as a copy into the output would.
#[test]
fn a_write_after_a_lent_read_leaves_the_lent_bytes_alone() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    s.luns[0].write(0, &[0x11; 4096]);
    let mut p = Peer::new(s.clone(), 0);
    p.conn.set_data_in_by_reference(true);
    p.login_normal(&[("ImmediateData", "Yes"), ("InitialR2T", "No")]);
    let c = p.command(&read10_cdb(0, 8), true, false, 4096, true);
    let mut bytes = Vec::new();
    crate::wire::iscsi::encode_pdu(&mut bytes, &PduHeader::ScsiCommand(c), &[], p.digests);
    p.conn.receive(&bytes, p.now);
    let w = p.command(&write10_cdb(0, 8), false, true, 4096, true);
    let pdus = p.send(PduHeader::ScsiCommand(w), &[0x22; 4096]);
    let data_in: Vec<Pdu> = pdus
        .into_iter()
        .filter(|(h, _)| matches!(h, PduHeader::DataIn(_)))
        .collect();
    let (read, _) = collect_data_in(&data_in);
    assert_eq!(read, vec![0x11; 4096]);
    let mut now = vec![0u8; 4096];
    s.luns[0].read(0, &mut now);
    assert_eq!(now, vec![0x22; 4096]);
}

#[test]
fn write_with_immediate_data_only() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut p = Peer::new(s.clone(), 0);
    p.login_normal(&[("InitialR2T", "Yes"), ("ImmediateData", "Yes")]);
    let data = vec![0xabu8; 1024];
    let c = p.command(&write10_cdb(3, 2), false, true, 1024, true);
    let pdus = p.send(PduHeader::ScsiCommand(c.clone()), &data);
    let (PduHeader::ScsiResponse(r), _) = &pdus[0] else {
        panic!("{pdus:?}")
    };
    assert_eq!(
        (r.status, r.itt, r.exp_data_sn),
        (ScsiStatus::Good.as_u8(), c.itt, Sn(0))
    );
    let mut back = vec![0u8; 1024];
    s.luns[0].read(3 * 512, &mut back);
    assert_eq!(back, data);
    let (read, _) = collect_data_in(&p.read10(3, 2));
    assert_eq!(read, data);
}

/// Session reinstatement (RFC 7143 §6.3.5): a new login with the same
/// ISID on the same portal group ends the old session, and a write the
/// old connection only reads afterwards (a hung portal waking up) is
/// not executed. Another ISID, or another portal group, is left alone.
/// Portals of one portal group share I_T nexuses: a login with a known
/// ISID through the other portal ends the session (the fence through
/// another portal of `multipath::fence`), and the group is what the
/// login response names. Portals of their own groups do not.
#[test]
fn a_login_through_another_portal_of_the_group_reinstates() {
    let one = |grouped: bool| {
        let mut cfg = TargetConfig::ram(IQN, 1 << 20)
            .portal("10.0.0.1:3260".parse().unwrap())
            .portal("10.0.1.1:3260".parse().unwrap());
        if grouped {
            cfg = cfg.one_portal_group(7);
        }
        shared(cfg)
    };
    let s = one(true);
    assert_eq!((s.portals[0].tpgt, s.portals[1].tpgt), (7, 7));
    assert_eq!(
        (s.portals[0].relative_port, s.portals[1].relative_port),
        (1, 2),
        "relative port ids stay per portal"
    );
    let mut old = Peer::new(s.clone(), 0);
    old.login_normal(&[]);
    let mut fence = Peer::new(s.clone(), 1);
    let t = fence.login_normal(&[]);
    assert_eq!(t.get("TargetPortalGroupTag"), Some("7"));
    assert!(old.conn.is_reinstated(), "ended through the other portal");
    assert_eq!(s.session_count(), 1);
    let s = one(false);
    let mut old = Peer::new(s.clone(), 0);
    old.login_normal(&[]);
    let mut other = Peer::new(s.clone(), 1);
    let t = other.login_normal(&[]);
    assert_eq!(t.get("TargetPortalGroupTag"), Some("2"));
    assert!(!old.conn.is_reinstated(), "another group: another nexus");
    assert_eq!(s.session_count(), 2);
}

#[test]
fn reinstatement_ends_the_old_session_and_its_late_writes() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut old = Peer::new(s.clone(), 0);
    old.login_normal(&[("ImmediateData", "Yes"), ("InitialR2T", "Yes")]);
    let mut other_isid = Peer::new(s.clone(), 0);
    other_isid.isid = [0x80, 0, 0, 0, 0, 2];
    other_isid.login_normal(&[]);
    let mut other_portal = Peer::new(s.clone(), 1);
    other_portal.login_normal(&[]);
    assert_eq!(s.session_count(), 3);
    // The old connection's write was sent, but not read yet.
    let c = old.command(&write10_cdb(7, 1), false, true, 512, true);
    let mut late = Vec::new();
    crate::wire::iscsi::encode_pdu(
        &mut late,
        &PduHeader::ScsiCommand(c),
        &[0xee; 512],
        old.digests,
    );
    let mut new = Peer::new(s.clone(), 0);
    new.login_normal(&[]);
    assert_eq!(s.session_count(), 3, "the old session was replaced");
    assert!(old.conn.is_reinstated());
    assert!(!other_isid.conn.is_reinstated());
    assert!(!other_portal.conn.is_reinstated());
    let answer = old.send_raw(&late);
    assert!(answer.is_empty(), "{answer:?}");
    assert!(old.conn.is_closed());
    let mut back = vec![0u8; 512];
    s.luns[0].read(7 * 512, &mut back);
    assert_eq!(back, vec![0u8; 512], "the late write did not run");
    drop(old);
    assert_eq!(s.session_count(), 3, "the new session stays");
    drop(new);
    assert_eq!(s.session_count(), 2);
}

#[test]
fn write_with_unsolicited_data_and_r2ts() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut p = Peer::new(s.clone(), 0);
    p.login_normal(&[
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("FirstBurstLength", "1024"),
        ("MaxBurstLength", "2048"),
        ("MaxOutstandingR2T", "2"),
        ("MaxRecvDataSegmentLength", "65536"),
    ]);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let c = p.command(&write10_cdb(0, 16), false, true, 8192, false);
    // 512 immediate + 512 unsolicited Data-Out = FirstBurstLength.
    assert!(p
        .send(PduHeader::ScsiCommand(c.clone()), &data[..512])
        .is_empty());
    let dout = |offset: u32, ttt: u32, final_bit: bool, sn: u32| {
        PduHeader::DataOut(DataOut {
            final_bit,
            lun: 0,
            itt: c.itt,
            ttt,
            exp_stat_sn: Sn(0),
            data_sn: Sn(sn),
            buffer_offset: offset,
        })
    };
    let pdus = p.send(dout(512, RESERVED_TAG, true, 0), &data[512..1024]);
    // Two R2Ts (MaxOutstandingR2T), each at most MaxBurstLength.
    let r2ts: Vec<R2t> = pdus
        .iter()
        .map(|(h, _)| match h {
            PduHeader::R2t(r) => r.clone(),
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(r2ts.len(), 2);
    assert_eq!(
        (r2ts[0].buffer_offset, r2ts[0].desired_len, r2ts[0].r2t_sn),
        (1024, 2048, Sn(0))
    );
    assert_eq!(
        (r2ts[1].buffer_offset, r2ts[1].desired_len, r2ts[1].r2t_sn),
        (3072, 2048, Sn(1))
    );
    let mut all = Vec::new();
    let mut queue: std::collections::VecDeque<R2t> = r2ts.into();
    while let Some(r) = queue.pop_front() {
        // Answer each R2T in two Data-Outs.
        let half = r.desired_len / 2;
        let o = r.buffer_offset as usize;
        assert!(p
            .send(
                dout(r.buffer_offset, r.ttt, false, 0),
                &data[o..o + half as usize]
            )
            .is_empty());
        let out = p.send(
            dout(r.buffer_offset + half, r.ttt, true, 1),
            &data[o + half as usize..o + r.desired_len as usize],
        );
        for (h, _) in out {
            match h {
                PduHeader::R2t(r) => queue.push_back(r),
                other => all.push(other),
            }
        }
    }
    assert_eq!(all.len(), 1);
    let PduHeader::ScsiResponse(resp) = &all[0] else {
        panic!()
    };
    assert_eq!(
        (resp.status, resp.exp_data_sn),
        (ScsiStatus::Good.as_u8(), Sn(4))
    );
    let mut back = vec![0u8; 8192];
    s.luns[0].read(0, &mut back);
    assert_eq!(back, data);
}

#[test]
fn bad_lba_and_bad_opcode_give_sense() {
    let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
    p.login_normal(&[]);
    expect_sense(&p.read10(2048, 1), 0x05, 0x21, 0x00);
    let c = p.command(&[0xee], false, false, 0, true);
    expect_sense(&p.send(PduHeader::ScsiCommand(c), &[]), 0x05, 0x20, 0x00);
    // A failing write whose unsolicited data follows answers after the data.
    let c = p.command(&write10_cdb(4096, 1), false, true, 512, false);
    assert!(p.send(PduHeader::ScsiCommand(c.clone()), &[]).is_empty());
    let pdus = p.send(
        PduHeader::DataOut(DataOut {
            final_bit: true,
            lun: 0,
            itt: c.itt,
            ttt: RESERVED_TAG,
            exp_stat_sn: Sn(0),
            data_sn: Sn(0),
            buffer_offset: 0,
        }),
        &[0u8; 512],
    );
    expect_sense(&pdus, 0x05, 0x21, 0x00);
}

#[test]
fn data_sn_out_of_order_closes_the_connection() {
    let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
    p.login_normal(&[("InitialR2T", "No"), ("ImmediateData", "No")]);
    let c = p.command(&write10_cdb(0, 2), false, true, 1024, false);
    assert!(p.send(PduHeader::ScsiCommand(c.clone()), &[]).is_empty());
    let pdus = p.send(
        PduHeader::DataOut(DataOut {
            final_bit: false,
            lun: 0,
            itt: c.itt,
            ttt: RESERVED_TAG,
            exp_stat_sn: Sn(0),
            data_sn: Sn(1),
            buffer_offset: 0,
        }),
        &[0u8; 512],
    );
    assert!(pdus.is_empty());
    assert!(p.conn.is_closed());
    assert!(p.conn.close_reason().unwrap().contains("DataSN"));
}

#[test]
fn cmd_window_advances_and_drops_outside_commands() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20).queue_depth(4));
    let mut p = Peer::new(s, 0);
    p.login_normal(&[("InitialR2T", "Yes")]);
    let tur = |p: &mut Peer| {
        let c = p.command(&[0x00], false, false, 0, true);
        p.send(PduHeader::ScsiCommand(c), &[])
    };
    let pdus = tur(&mut p);
    let (PduHeader::ScsiResponse(r), _) = &pdus[0] else {
        panic!()
    };
    assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (Sn(101), Sn(104)));
    let stat = r.stat_sn;
    // A write waiting for R2T data holds a slot: MaxCmdSN does not move on.
    let c = p.command(&write10_cdb(0, 1), false, true, 512, true);
    let pdus = p.send(PduHeader::ScsiCommand(c.clone()), &[]);
    let (PduHeader::R2t(r2t), _) = &pdus[0] else {
        panic!()
    };
    assert_eq!((r2t.exp_cmd_sn, r2t.max_cmd_sn), (Sn(102), Sn(104)));
    assert_eq!(r2t.stat_sn, stat.next(), "R2T does not consume StatSN");
    // A duplicate CmdSN is dropped silently.
    let mut dup = p.command(&[0x00], false, false, 0, true);
    dup.cmd_sn = Sn(100);
    p.cmd_sn = Sn(102);
    assert!(p.send(PduHeader::ScsiCommand(dup), &[]).is_empty());
    // Beyond MaxCmdSN too.
    let mut far = p.command(&[0x00], false, false, 0, true);
    far.cmd_sn = Sn(200);
    p.cmd_sn = Sn(102);
    assert!(p.send(PduHeader::ScsiCommand(far), &[]).is_empty());
    let pdus = p.send(
        PduHeader::DataOut(DataOut {
            final_bit: true,
            lun: 0,
            itt: c.itt,
            ttt: r2t.ttt,
            exp_stat_sn: Sn(0),
            data_sn: Sn(0),
            buffer_offset: 0,
        }),
        &[1u8; 512],
    );
    let (PduHeader::ScsiResponse(r), _) = &pdus[0] else {
        panic!()
    };
    assert_eq!(
        (r.exp_cmd_sn, r.max_cmd_sn, r.stat_sn),
        (Sn(102), Sn(105), stat.next())
    );
    let pdus = tur(&mut p);
    let (PduHeader::ScsiResponse(r), _) = &pdus[0] else {
        panic!()
    };
    assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (Sn(103), Sn(106)));
}

#[test]
fn nop_pings_both_ways() {
    let cfg = TargetConfig::ram(IQN, 1 << 20).nop_in_interval(Some(Duration::from_secs(5)));
    let mut p = Peer::new(shared(cfg), 0);
    p.login_normal(&[]);
    let t0 = p.now;
    assert_eq!(p.conn.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    p.conn.handle_timeout(t0 + Duration::from_secs(5));
    let pdus = p.send_raw(&[]);
    let (PduHeader::NopIn(ping), _) = &pdus[0] else {
        panic!()
    };
    assert_eq!(ping.itt, RESERVED_TAG);
    // Answered: no close at the next deadline.
    p.send(
        PduHeader::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: RESERVED_TAG,
            ttt: ping.ttt,
            cmd_sn: p.cmd_sn,
            exp_stat_sn: Sn(0),
        }),
        &[],
    );
    assert!(!p.conn.is_closed());
    p.now = t0 + Duration::from_secs(6);
    p.send_raw(&[]);
    p.conn.handle_timeout(t0 + Duration::from_secs(11));
    assert_eq!(p.send_raw(&[]).len(), 1, "second ping");
    p.conn.handle_timeout(t0 + Duration::from_secs(17));
    assert!(p.conn.is_closed(), "unanswered ping closes");
}

#[test]
fn malformed_pdus_get_reject_or_close() {
    let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
    p.login_normal(&[]);
    let mut bad = [0u8; 48];
    bad[0] = 0x1c; // no such opcode
    let pdus = p.send_raw(&bad);
    assert!(
        matches!(&pdus[0], (PduHeader::Reject(r), d) if r.reason == reject::PROTOCOL_ERROR && d.len() == 48)
    );
    // A target-only opcode from the initiator.
    bad[0] = 0x21;
    let pdus = p.send_raw(&bad);
    assert!(matches!(&pdus[0].0, PduHeader::Reject(_)));
    assert!(!p.conn.is_closed());
    // SNACK is not supported at ERL 0.
    bad[0] = 0x10;
    assert!(matches!(&p.send_raw(&bad)[0].0, PduHeader::Reject(r) if r.reason == reject::SNACK));
    // A data segment beyond our MaxRecvDataSegmentLength ends the connection.
    bad[0] = 0x00;
    bad[5] = 0x7f;
    p.send_raw(&bad);
    assert!(p.conn.is_closed());
    // Garbage during login closes without a panic.
    let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
    p.send_raw(&[0x25; 100]);
    assert!(p.conn.is_closed());
}

/// A TMF request from `p` (immediate, at the next CmdSN).
fn tmf_req(p: &Peer, function: u8, referenced: u32, ref_cmd_sn: Sn) -> PduHeader {
    PduHeader::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function,
        lun: 0,
        itt: 0x700,
        referenced_task_tag: referenced,
        cmd_sn: p.cmd_sn,
        exp_stat_sn: Sn(0),
        ref_cmd_sn,
        exp_data_sn: Sn(0),
    })
}

fn data_out(itt: u32, ttt: u32) -> PduHeader {
    PduHeader::DataOut(DataOut {
        final_bit: true,
        lun: 0,
        itt,
        ttt,
        exp_stat_sn: Sn(0),
        data_sn: Sn(0),
        buffer_offset: 0,
    })
}

/// A write waiting for its data (R2T) on session `b`; returns (ITT, TTT).
fn write_waiting_for_data(b: &mut Peer, lba: u32) -> (u32, u32) {
    let c = b.command(&write10_cdb(lba, 1), false, true, 512, true);
    let itt = c.itt;
    let pdus = b.send(PduHeader::ScsiCommand(c), &[]);
    let [(PduHeader::R2t(r2t), _)] = &pdus[..] else {
        panic!("{pdus:?}")
    };
    (itt, r2t.ttt)
}

/// The fence steps that stop writes the target holds: LOGICAL UNIT
/// RESET through another session (another I_T nexus) and a target
/// reset end a write that waits for its Data-Out, which then never
/// lands and gets no status; ABORT TASK SET of the write's own session
/// does too; ABORT TASK SET of another session does not (it is per
/// I_T nexus).
#[test]
fn resets_and_abort_task_set_stop_writes_waiting_for_data() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut a = Peer::new(s.clone(), 0);
    a.login_normal(&[]);
    let mut b = Peer::new(s.clone(), 1);
    b.isid = [0x80, 0, 0, 0, 0, 2];
    b.login_normal(&[("ImmediateData", "No"), ("InitialR2T", "Yes")]);
    let landed = |lba: u64| {
        let mut back = vec![0u8; 512];
        s.luns[0].read(lba * 512, &mut back);
        back != vec![0u8; 512]
    };
    // ABORT TASK SET of another nexus leaves b's write alone.
    let (itt, ttt) = write_waiting_for_data(&mut b, 1);
    let h = tmf_req(&a, tmf::ABORT_TASK_SET, 0, a.cmd_sn);
    assert!(matches!(&a.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
    let pdus = b.send(data_out(itt, ttt), &[0xee; 512]);
    assert!(
        matches!(&pdus[..], [(PduHeader::ScsiResponse(r), _)] if r.status == 0),
        "{pdus:?}"
    );
    assert!(landed(1));
    // Its own ABORT TASK SET ends it.
    let (itt, ttt) = write_waiting_for_data(&mut b, 2);
    let h = tmf_req(&b, tmf::ABORT_TASK_SET, 0, b.cmd_sn);
    assert!(matches!(&b.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
    assert!(b.send(data_out(itt, ttt), &[0xee; 512]).is_empty());
    assert!(!landed(2), "aborted by its own session's ABORT TASK SET");
    // LUN RESET through a: b's write never lands and gets no status.
    let (itt, ttt) = write_waiting_for_data(&mut b, 3);
    let h = tmf_req(&a, tmf::LOGICAL_UNIT_RESET, 0, a.cmd_sn);
    assert!(matches!(&a.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
    assert!(b.send(data_out(itt, ttt), &[0xee; 512]).is_empty());
    assert!(!landed(3), "aborted by a LUN reset through another session");
    // Target warm reset through a, likewise.
    let (itt, ttt) = write_waiting_for_data(&mut b, 4);
    let h = tmf_req(&a, tmf::TARGET_WARM_RESET, 0, a.cmd_sn);
    assert!(matches!(&a.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
    assert!(b.send(data_out(itt, ttt), &[0xee; 512]).is_empty());
    assert!(!landed(4), "aborted by a target reset");
    // A write started after the reset runs.
    let (itt, ttt) = write_waiting_for_data(&mut b, 5);
    let pdus = b.send(data_out(itt, ttt), &[0xee; 512]);
    assert!(
        matches!(&pdus[..], [(PduHeader::ScsiResponse(_), _)]),
        "{pdus:?}"
    );
    assert!(landed(5));
}

/// ABORT TASK of a command the target has not received yet (its CmdSN
/// is inside the window, below the TMF's: it is still on its way, e.g.
/// on another connection) is answered "function complete", and the
/// command, when it arrives, is dropped: not executed, not answered
/// (RFC 7143 §11.5.1). The CmdSN still advances.
#[test]
fn a_command_aborted_before_it_arrived_is_never_executed() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut p = Peer::new(s.clone(), 0);
    p.login_normal(&[("ImmediateData", "Yes"), ("InitialR2T", "No")]);
    // The write takes CmdSN n; the TMF goes out at n + 1 before it.
    let c = p.command(&write10_cdb(7, 1), false, true, 512, true);
    let h = tmf_req(&p, tmf::ABORT_TASK, c.itt, c.cmd_sn);
    assert!(matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
    assert!(
        p.send(PduHeader::ScsiCommand(c), &[0xee; 512]).is_empty(),
        "dropped, unanswered"
    );
    let mut back = vec![0u8; 512];
    s.luns[0].read(7 * 512, &mut back);
    assert_eq!(back, vec![0u8; 512], "the aborted write did not land");
    // The next command runs normally (its CmdSN follows on).
    let c = p.command(&write10_cdb(8, 1), false, true, 512, true);
    let pdus = p.send(PduHeader::ScsiCommand(c), &[0xee; 512]);
    assert!(
        matches!(&pdus[..], [(PduHeader::ScsiResponse(r), _)] if r.status == 0),
        "{pdus:?}"
    );
    s.luns[0].read(8 * 512, &mut back);
    assert_eq!(back, vec![0xee; 512]);
}

#[test]
fn task_management_and_faults() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20).unit_attentions(true));
    let mut p = Peer::new(s.clone(), 0);
    p.login_normal(&[("InitialR2T", "Yes")]);
    // UNIT ATTENTION once, and INQUIRY does not consume it.
    let c = p.command(&[0x12, 0, 0, 0, 36], true, false, 36, true);
    assert!(matches!(
        &p.send(PduHeader::ScsiCommand(c), &[])[0].0,
        PduHeader::DataIn(_)
    ));
    let c = p.command(&[0x00], false, false, 0, true);
    expect_sense(&p.send(PduHeader::ScsiCommand(c), &[]), 0x06, 0x29, 0x00);
    let c = p.command(&[0x00], false, false, 0, true);
    assert!(
        matches!(&p.send(PduHeader::ScsiCommand(c), &[])[0].0, PduHeader::ScsiResponse(r) if r.status == 0)
    );
    // ABORT TASK of a write waiting for data.
    let c = p.command(&write10_cdb(0, 1), false, true, 512, true);
    assert!(matches!(
        &p.send(PduHeader::ScsiCommand(c.clone()), &[])[0].0,
        PduHeader::R2t(_)
    ));
    let tm = |p: &mut Peer, function, referenced| {
        PduHeader::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function,
            lun: 0,
            itt: 77,
            referenced_task_tag: referenced,
            cmd_sn: p.cmd_sn,
            exp_stat_sn: Sn(0),
            ref_cmd_sn: c.cmd_sn,
            exp_data_sn: Sn(0),
        })
    };
    let h = tm(&mut p, tmf::ABORT_TASK, c.itt);
    assert!(
        matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0 && r.itt == 77)
    );
    // The same task again: answered already, so "task does not exist".
    let h = tm(&mut p, tmf::ABORT_TASK, c.itt);
    assert!(matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 1));
    // LUN RESET: a UNIT ATTENTION 29/03 once on every session.
    let mut other = Peer::new(s.clone(), 1);
    other.login_normal(&[]);
    let c2 = other.command(&[0x00], false, false, 0, true);
    expect_sense(
        &other.send(PduHeader::ScsiCommand(c2), &[]),
        0x06,
        0x29,
        0x00,
    );
    let h = tm(&mut p, tmf::LOGICAL_UNIT_RESET, 0);
    assert!(matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
    let c2 = other.command(&[0x00], false, false, 0, true);
    expect_sense(
        &other.send(PduHeader::ScsiCommand(c2), &[]),
        0x06,
        0x29,
        0x03,
    );
    let c1 = p.command(&[0x00], false, false, 0, true);
    expect_sense(&p.send(PduHeader::ScsiCommand(c1), &[]), 0x06, 0x29, 0x03);
    let c1 = p.command(&[0x00], false, false, 0, true);
    assert!(
        matches!(&p.send(PduHeader::ScsiCommand(c1), &[])[0].0, PduHeader::ScsiResponse(r) if r.status == 0)
    );
    let h = tm(&mut p, 0x7f, 0);
    assert!(matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 5));
    // Injected Reject and CHECK CONDITION, then normal service again.
    s.faults.reject_next_commands(1, 0x09);
    s.faults.check_condition_next(1, 0x03, 0x11, 0x00);
    let c = p.command(&[0x00], false, false, 0, true);
    assert!(
        matches!(&p.send(PduHeader::ScsiCommand(c), &[])[0].0, PduHeader::Reject(r) if r.reason == 0x09)
    );
    let c = p.command(&[0x00], false, false, 0, true);
    expect_sense(&p.send(PduHeader::ScsiCommand(c), &[]), 0x03, 0x11, 0x00);
    s.faults.drop_after_commands(2);
    let c = p.command(&[0x00], false, false, 0, true);
    assert_eq!(p.send(PduHeader::ScsiCommand(c), &[]).len(), 1);
    let c = p.command(&[0x00], false, false, 0, true);
    assert_eq!(
        p.send(PduHeader::ScsiCommand(c), &[]).len(),
        1,
        "the Nth command is answered"
    );
    assert!(p.conn.is_closed());
}

/// Regression (found by tests/system_sim.rs): a write that fails
/// before its data arrives (here a UNIT ATTENTION) with immediate data
/// and unsolicited Data-Out following must drain the Data-Out that
/// continues after the immediate data, not close the connection.
#[test]
fn failed_write_with_immediate_data_drains_the_unsolicited_rest() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20).unit_attentions(true));
    let mut p = Peer::new(s, 0);
    p.login_normal(&[("InitialR2T", "No"), ("ImmediateData", "Yes")]);
    let data = vec![0x5au8; 2048];
    let c = p.command(&write10_cdb(8, 4), false, true, 2048, false);
    assert!(p
        .send(PduHeader::ScsiCommand(c.clone()), &data[..1024])
        .is_empty());
    let pdus = p.send(
        PduHeader::DataOut(DataOut {
            final_bit: true,
            lun: 0,
            itt: c.itt,
            ttt: RESERVED_TAG,
            exp_stat_sn: Sn(0),
            data_sn: Sn(0),
            buffer_offset: 1024,
        }),
        &data[1024..],
    );
    assert!(!p.conn.is_closed(), "{:?}", p.conn.close_reason());
    expect_sense(&pdus, 0x06, 0x29, 0x00);
    // Nothing was written, and the connection goes on.
    let (read, _) = collect_data_in(&p.read10(8, 4));
    assert_eq!(read, vec![0u8; 2048]);
}

/// SPC-4: an ALUA state change is reported to every session, once, by
/// UNIT ATTENTION 2A/06 (also with power-on/reset UAs off), so
/// initiators re-read REPORT TARGET PORT GROUPS.
/// Sends one PERSISTENT RESERVE OUT (parameter list as immediate data)
/// and returns the status byte.
fn pr_out(
    p: &mut Peer,
    action: crate::wire::scsi::pr::PrOutAction,
    t: Option<crate::wire::scsi::pr::PrType>,
    key: u64,
    sa_key: u64,
) -> u8 {
    use crate::wire::scsi::pr::{PrOutCdb, PrOutParams};
    use crate::wire::scsi::DataRepr;
    let cdb = PrOutCdb::new(action, t).emit();
    let params = PrOutParams {
        key,
        sa_key,
        ..Default::default()
    }
    .to_vec();
    let c = p.command(cdb.as_slice(), false, true, 24, true);
    let pdus = p.send(PduHeader::ScsiCommand(c), &params);
    match &pdus[..] {
        [(PduHeader::ScsiResponse(r), _)] => r.status,
        o => panic!("{o:?}"),
    }
}

fn pr_in(p: &mut Peer, action: crate::wire::scsi::pr::PrInAction) -> Vec<u8> {
    let cdb = crate::wire::scsi::pr::PrInCdb {
        action,
        alloc_len: 1024,
    }
    .emit();
    let c = p.command(cdb.as_slice(), true, false, 1024, true);
    collect_data_in(&p.send(PduHeader::ScsiCommand(c), &[])).0
}

/// Two I_T nexuses (ISIDs): registration, a WE-RO reservation, the
/// conflict it gives the unregistered one, and PREEMPT AND ABORT
/// stopping a write of the preempted nexus that waits for its data.
#[test]
fn persistent_reservations_per_nexus_and_preempt_and_abort() {
    use crate::wire::scsi::pr::{PrInAction, PrKeys, PrOutAction::*, PrReservation, PrType};
    use crate::wire::scsi::DataRepr;
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut a = Peer::new(s.clone(), 0);
    a.login_normal(&[]);
    let mut b = Peer::new(s.clone(), 1);
    b.isid = [0x80, 0, 0, 0, 0, 2];
    b.login_normal(&[("ImmediateData", "No"), ("InitialR2T", "Yes")]);
    let we_ro = Some(PrType::WriteExclusiveRegistrantsOnly);
    assert_eq!(
        pr_out(&mut a, Register, None, 0, 0xaa),
        ScsiStatus::Good.as_u8()
    );
    assert_eq!(
        pr_out(&mut b, Register, None, 0, 0xbb),
        ScsiStatus::Good.as_u8()
    );
    assert_eq!(
        pr_out(&mut a, Reserve, we_ro, 0xaa, 0),
        ScsiStatus::Good.as_u8()
    );
    let keys = PrKeys::parse(&pr_in(&mut b, PrInAction::ReadKeys)).unwrap();
    assert_eq!(keys.keys, vec![0xaa, 0xbb]);
    let r = PrReservation::parse(&pr_in(&mut b, PrInAction::ReadReservation)).unwrap();
    assert_eq!(
        r.reservation.map(|h| (h.key, h.pr_type())),
        Some((0xaa, we_ro))
    );
    // b (registered) starts a write that waits for its data (R2T).
    let c = b.command(&write10_cdb(3, 1), false, true, 512, true);
    let itt = c.itt;
    let pdus = b.send(PduHeader::ScsiCommand(c), &[]);
    let [(PduHeader::R2t(r2t), _)] = &pdus[..] else {
        panic!("{pdus:?}")
    };
    let ttt = r2t.ttt;
    // a preempts b's key and aborts b's tasks.
    assert_eq!(
        pr_out(&mut a, PreemptAndAbort, we_ro, 0xaa, 0xbb),
        ScsiStatus::Good.as_u8()
    );
    let late = PduHeader::DataOut(DataOut {
        final_bit: true,
        lun: 0,
        itt,
        ttt,
        exp_stat_sn: Sn(0),
        data_sn: Sn(0),
        buffer_offset: 0,
    });
    assert!(b.send(late, &[0xee; 512]).is_empty(), "aborted: no status");
    let mut back = vec![0u8; 512];
    s.luns[0].read(3 * 512, &mut back);
    assert_eq!(back, vec![0u8; 512], "the aborted write did not land");
    // b is no longer registered: its writes conflict, its reads do not.
    let c = b.command(&write10_cdb(3, 1), false, true, 512, true);
    let pdus = b.send(PduHeader::ScsiCommand(c), &[]);
    let [(PduHeader::ScsiResponse(r), _)] = &pdus[..] else {
        panic!("{pdus:?}")
    };
    assert_eq!(r.status, 0x18, "RESERVATION CONFLICT");
    assert_eq!(collect_data_in(&b.read10(3, 1)).0.len(), 512);
    assert_eq!(
        PrKeys::parse(&pr_in(&mut a, PrInAction::ReadKeys))
            .unwrap()
            .keys,
        vec![0xaa]
    );
    // a unregistered nexus may not CLEAR; a may, and then b writes.
    assert_eq!(pr_out(&mut b, Clear, None, 0xbb, 0), 0x18);
    assert_eq!(
        pr_out(&mut a, Release, we_ro, 0xaa, 0),
        ScsiStatus::Good.as_u8()
    );
    assert_eq!(
        pr_out(&mut a, Clear, None, 0xaa, 0),
        ScsiStatus::Good.as_u8()
    );
    let c = b.command(&write10_cdb(3, 1), false, true, 512, true);
    let pdus = b.send(PduHeader::ScsiCommand(c.clone()), &[]);
    assert!(matches!(&pdus[..], [(PduHeader::R2t(_), _)]), "{pdus:?}");
}

#[test]
fn alua_change_raises_one_unit_attention_per_session() {
    let cfg = TargetConfig::ram(IQN, 1 << 20)
        .portal_in_group("10.0.0.1:3260".parse().unwrap(), 1)
        .portal_in_group("10.0.1.1:3260".parse().unwrap(), 2);
    let s = shared(cfg);
    let mut a = Peer::new(s.clone(), 0);
    a.login_normal(&[]);
    let mut b = Peer::new(s.clone(), 1);
    b.login_normal(&[]);
    collect_data_in(&a.read10(0, 1));
    s.set_alua_state(1, crate::target::AluaState::ActiveNonOptimized)
        .unwrap();
    expect_sense(&a.read10(0, 1), 0x06, 0x2a, 0x06);
    collect_data_in(&a.read10(0, 1));
    expect_sense(&b.read10(0, 1), 0x06, 0x2a, 0x06);
    collect_data_in(&b.read10(0, 1));
    // The same state again is no change.
    s.set_alua_state(1, crate::target::AluaState::ActiveNonOptimized)
        .unwrap();
    collect_data_in(&a.read10(0, 1));
    // A session that logs in after a change has nothing to hear.
    let mut c = Peer::new(s.clone(), 1);
    c.login_normal(&[]);
    collect_data_in(&c.read10(0, 1));
}

#[test]
fn login_text_may_span_pdus() {
    let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
    let text = b"InitiatorName=iqn.x\0TargetName=iqn.2024-01.test:target\0";
    let req = |cont, transit| {
        PduHeader::LoginRequest(LoginRequest {
            transit,
            cont,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: Sn(1),
            exp_stat_sn: Sn(0),
        })
    };
    let pdus = p.send(req(true, false), &text[..10]);
    assert!(matches!(&pdus[0], (PduHeader::LoginResponse(r), d) if d.is_empty() && !r.transit));
    let pdus = p.send(req(false, true), &text[10..]);
    assert!(matches!(&pdus[0].0, PduHeader::LoginResponse(r) if r.status_class == 0 && r.transit));
    assert!(p.conn.is_full_feature());
}

#[test]
fn small_limits_still_work() {
    let limits = TargetLimits {
        max_recv_data_segment_len: 512,
        max_burst_len: 512,
        first_burst_len: 512,
        max_outstanding_r2t: 1,
        ..TargetLimits::default()
    };
    let s = shared(TargetConfig::ram(IQN, 1 << 20).limits(limits));
    let mut p = Peer::new(s, 0);
    let t = p.login_normal(&[("MaxBurstLength", "262144"), ("InitialR2T", "No")]);
    assert_eq!(t.get("MaxRecvDataSegmentLength"), Some("512"));
    assert_eq!(t.get("MaxBurstLength"), Some("512"));
}

proptest! {
    /// No byte sequence from the initiator panics the target, in login or later.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), after_login: bool) {
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
        if after_login {
            p.login_normal(&[]);
        }
        p.conn.receive(&bytes, p.now);
        p.conn.clear_output();
    }

    /// Valid-looking headers with random fields never panic either.
    #[test]
    fn arbitrary_headers_never_panic(mut hdr in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform16(any::<u8>()),
                                     op in proptest::sample::select(vec![0x00u8, 0x01, 0x02, 0x04, 0x05, 0x06, 0x10])) {
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
        p.login_normal(&[]);
        hdr[0] = op | (hdr[0] & 0x40);
        hdr[4] = 0;
        hdr[5] = 0;
        hdr[6] &= 0x03;
        let mut pdu = hdr.to_vec();
        pdu.extend_from_slice(&tail);
        let dsl = u32::from_be_bytes([0, hdr[5], hdr[6], hdr[7]]) as usize;
        pdu.resize(48 + dsl + pad_len(dsl), 0x5a);
        p.conn.receive(&pdu, p.now);
    }
}

/// MC/S and error recovery (src/target/conn/tests/mcs.rs).
mod mcs;

/// ERL 2, Time2Retain: the writes of a connection that fails wait in its
/// session for a TASK REASSIGN for DefaultTime2Wait + DefaultTime2Retain
/// as negotiated (2 + 5 s here), counted from the connection's end. One
/// reassigned a millisecond before that finishes on the surviving
/// connection; the other is then ended: its TASK REASSIGN is answered
/// "task does not exist" and its data, sent late, never lands. The
/// connections run on a clock of the test's; nothing sleeps.
#[test]
fn a_failed_connections_tasks_wait_time2wait_plus_time2retain_then_end() {
    let s = shared(TargetConfig::ram(IQN, 1 << 20));
    let mut a = Peer::new(s.clone(), 0);
    a.login_normal(&[
        ("MaxConnections", "2"),
        ("ErrorRecoveryLevel", "2"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "5"),
        ("InitialR2T", "Yes"),
    ]);
    let p = a.conn.params();
    assert_eq!((p.default_time2wait, p.default_time2retain), (2, 5));
    let mut b = Peer::new(s.clone(), 0);
    (b.tsih, b.cid, b.cmd_sn, b.now) = (a.conn.tsih(), 2, a.cmd_sn, a.now);
    b.login_normal(&[]);
    assert_eq!(a.conn.session_connections(), 2);
    // Two writes on B wait for their data when B's connection breaks.
    let (early, _) = write_waiting_for_data(&mut b, 3);
    let (late, late_ttt) = write_waiting_for_data(&mut b, 4);
    a.cmd_sn = b.cmd_sn;
    let failed = b.now + Duration::from_millis(10);
    b.now = failed;
    assert!(b.tick().is_empty());
    drop(b);
    assert_eq!(a.conn.session_connections(), 1);
    assert_eq!(a.conn.orphaned_tasks(), 2);
    let expiry = failed + Duration::from_secs(7);
    assert_eq!(
        a.conn.poll_timeout(),
        Some(expiry),
        "A's timer is the expiry"
    );

    // A millisecond before: still there, and one is reassigned to A.
    a.now = expiry - Duration::from_millis(1);
    assert!(a.tick().is_empty());
    assert_eq!(a.conn.orphaned_tasks(), 2);
    let pdus = a.send(tmf_req(&a, tmf::TASK_REASSIGN, early, Sn(0)), &[]);
    let [(PduHeader::TaskMgmtResponse(r), _), (PduHeader::R2t(r2t), _)] = &pdus[..] else {
        panic!("{pdus:?}")
    };
    assert_eq!((r.response, r2t.itt, r2t.desired_len), (0, early, 512));
    let pdus = a.send(data_out(early, r2t.ttt), &[0x11; 512]);
    let [(PduHeader::ScsiResponse(st), _)] = &pdus[..] else {
        panic!("{pdus:?}")
    };
    assert_eq!((st.itt, st.status), (early, 0));

    // At the expiry the other one is ended.
    a.now = expiry;
    assert!(a.tick().is_empty());
    assert_eq!(a.conn.orphaned_tasks(), 0);
    assert_eq!(a.conn.poll_timeout(), None);
    let pdus = a.send(tmf_req(&a, tmf::TASK_REASSIGN, late, Sn(0)), &[]);
    let [(PduHeader::TaskMgmtResponse(r), _)] = &pdus[..] else {
        panic!("{pdus:?}")
    };
    assert_eq!(r.response, 1, "task does not exist");
    let pdus = a.send(data_out(late, late_ttt), &[0x22; 512]);
    assert!(pdus.is_empty(), "{pdus:?}");
    let mut back = vec![0u8; 512];
    s.luns[0].read(3 * 512, &mut back);
    assert_eq!(back, vec![0x11; 512], "the reassigned write landed");
    s.luns[0].read(4 * 512, &mut back);
    assert_eq!(back, vec![0u8; 512], "the ended write never landed");
}
