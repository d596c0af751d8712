//! MC/S at the target end, over real TCP: the embedded target's kernel-TCP
//! runtime (a thread per connection) with two connections of one session
//! driven by a raw-PDU client, and what tgtd answers to the same logins.

mod common;

use common::{tgtd_unavailable, Tgtd, TgtdOptions};
use iscsi_bypass::scsi::Lun;
use iscsi_bypass::target::{Target, TargetConfig};
use iscsi_bypass::wire::iscsi::{
    encode_pdu, tmf, DataOut, Digests, LoginRequest, LogoutRequest, NopOut, PduFramer, PduHeader,
    ScsiCommand, Sn, Stage, TaskMgmtRequest, RESERVED_TAG,
};
use iscsi_bypass::wire::text::TextPairs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const INITIATOR: &str = "iqn.2026-12.org.iscsi-bypass:mcs-test";
const ISID: [u8; 6] = [0x80, 0, 0x02, 0x3d, 0, 7];

/// One TCP connection speaking raw PDUs.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s, buf: Vec::new() }
    }

    fn send(&mut self, h: PduHeader, data: &[u8]) {
        let mut out = Vec::new();
        encode_pdu(&mut out, &h, data, Digests::default());
        self.s.write_all(&out).expect("send");
    }

    /// The next PDU; panics after 10 s of silence.
    fn recv(&mut self) -> (PduHeader, Vec<u8>) {
        let framer = PduFramer {
            digests: Digests::default(),
            max_data_segment_len: 16 << 20,
        };
        loop {
            if let Some(f) = framer.frame(&self.buf).expect("target PDU frames") {
                let data = self.buf[f.data.clone()].to_vec();
                self.buf.drain(..f.total_len);
                return (f.header, data);
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("read from the target");
            assert!(n > 0, "the target closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Logs in straight to the full feature phase (security stage without
    /// authentication, then the operational keys); returns the TSIH and
    /// the keys the target answered in the operational stage.
    fn login(&mut self, iqn: &str, tsih: u16, cid: u16, ops: &[(&str, &str)]) -> (u16, TextPairs) {
        let mut stat_sn = Sn(0);
        let mut answered = TextPairs::new();
        for (csg, nsg) in [
            (Stage::Security, Stage::Operational),
            (Stage::Operational, Stage::FullFeature),
        ] {
            let mut t = TextPairs::new();
            if csg == Stage::Security {
                t.push("InitiatorName", INITIATOR);
                t.push("TargetName", iqn);
                t.push("SessionType", "Normal");
                t.push("AuthMethod", "None");
            } else {
                for (k, v) in ops {
                    t.push(k, *v);
                }
            }
            let h = PduHeader::LoginRequest(LoginRequest {
                transit: true,
                cont: false,
                csg,
                nsg,
                version_max: 0,
                version_min: 0,
                isid: ISID,
                tsih,
                itt: u32::from(cid),
                cid,
                cmd_sn: Sn(1),
                exp_stat_sn: stat_sn,
            });
            self.send(h, &t.to_bytes());
            let (h, data) = self.recv();
            let PduHeader::LoginResponse(r) = h else {
                panic!("not a login response: {h:?}")
            };
            assert_eq!(
                (r.status_class, r.status_detail),
                (0, 0),
                "login of CID {cid} refused: {:?}",
                TextPairs::parse(&data)
            );
            stat_sn = r.stat_sn.next();
            answered = TextPairs::parse(&data).unwrap();
            if nsg == Stage::FullFeature {
                return (r.tsih, answered);
            }
        }
        (0, answered)
    }
}

fn write10(itt: u32, cmd_sn: u32, lba: u32, blocks: u16, final_bit: bool) -> ScsiCommand {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    ScsiCommand {
        immediate: false,
        final_bit,
        read: false,
        write: true,
        attr: 1,
        lun: 0,
        itt,
        expected_data_len: u32::from(blocks) * 512,
        cmd_sn: Sn(cmd_sn),
        exp_stat_sn: Sn(0),
        cdb,
    }
}

#[track_caller]
fn status_of(pdu: (PduHeader, Vec<u8>), itt: u32) -> u8 {
    match pdu.0 {
        PduHeader::ScsiResponse(r) if r.itt == itt => r.status,
        other => panic!("expected the status of ITT {itt:#x}, got {other:?}"),
    }
}

/// Two connections of one session, each on its own target thread: a
/// command that arrives first on B with the higher CmdSN runs after A's;
/// then B is removed with Logout reason 2 on A while a write on it waits
/// for data, and TASK REASSIGN finishes that write on A.
#[test]
fn two_connections_of_one_session_over_tcp() {
    let target = Target::start(TargetConfig::ram(
        "iqn.2026-12.org.iscsi-bypass:mcs",
        1 << 20,
    ))
    .expect("target");
    let addr = target.portals()[0];
    let iqn = target.iqn().to_string();
    let ops = [
        ("MaxConnections", "4"),
        ("ErrorRecoveryLevel", "2"),
        ("DefaultTime2Retain", "20"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("FirstBurstLength", "65536"),
    ];
    let mut a = Raw::connect(addr);
    let (tsih, keys) = a.login(&iqn, 0, 1, &ops);
    assert_eq!(keys.get("MaxConnections"), Some("4"));
    assert_eq!(keys.get("ErrorRecoveryLevel"), Some("2"));
    let mut b = Raw::connect(addr);
    let (tsih_b, _) = b.login(&iqn, tsih, 2, &[]);
    assert_eq!(tsih_b, tsih);
    let mut cids = target.session_cids(tsih).unwrap();
    cids.sort();
    assert_eq!(cids, [1, 2]);
    assert_eq!(target.session_count(), 1);

    // CmdSN 2 on B first, then CmdSN 1 on A, both writing block 0.
    b.send(
        PduHeader::ScsiCommand(write10(0x20, 2, 0, 1, true)),
        &[0xbb; 512],
    );
    std::thread::sleep(Duration::from_millis(50));
    a.send(
        PduHeader::ScsiCommand(write10(0x10, 1, 0, 1, true)),
        &[0xaa; 512],
    );
    assert_eq!(status_of(a.recv(), 0x10), 0);
    assert_eq!(status_of(b.recv(), 0x20), 0);
    let mut block = vec![0u8; 512];
    target.lun(0).unwrap().read(0, &mut block);
    assert_eq!(block, vec![0xbb; 512], "CmdSN 2 ran after CmdSN 1");

    // A write on B that has half its data when B is removed.
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 241) as u8).collect();
    b.send(
        PduHeader::ScsiCommand(write10(0x21, 3, 16, 8, false)),
        &data[..2048],
    );
    let logout = PduHeader::LogoutRequest(LogoutRequest {
        immediate: true,
        reason: 2,
        itt: 0x11,
        cid: 2,
        cmd_sn: Sn(4),
        exp_stat_sn: Sn(0),
    });
    // A ping on B: once it is answered, B has taken the write.
    let ping = PduHeader::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: 0x22,
        ttt: RESERVED_TAG,
        cmd_sn: Sn(4),
        exp_stat_sn: Sn(0),
    });
    b.send(ping, &[]);
    assert!(matches!(b.recv().0, PduHeader::NopIn(n) if n.itt == 0x22));
    a.send(logout, &[]);
    match a.recv().0 {
        PduHeader::LogoutResponse(r) => assert_eq!((r.response, r.time2retain), (0, 20)),
        other => panic!("{other:?}"),
    }
    let reassign = PduHeader::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function: tmf::TASK_REASSIGN,
        lun: 0,
        itt: 0x12,
        referenced_task_tag: 0x21,
        cmd_sn: Sn(4),
        exp_stat_sn: Sn(0),
        ref_cmd_sn: Sn(3),
        exp_data_sn: Sn(0),
    });
    a.send(reassign, &[]);
    match a.recv().0 {
        PduHeader::TaskMgmtResponse(r) => assert_eq!((r.itt, r.response), (0x12, 0)),
        other => panic!("{other:?}"),
    }
    let PduHeader::R2t(r2t) = a.recv().0 else {
        panic!("no R2T for the rest of the reassigned write")
    };
    assert_eq!(
        (r2t.itt, r2t.buffer_offset, r2t.desired_len),
        (0x21, 2048, 2048)
    );
    let dout = PduHeader::DataOut(DataOut {
        final_bit: true,
        lun: 0,
        itt: 0x21,
        ttt: r2t.ttt,
        exp_stat_sn: Sn(0),
        data_sn: Sn(0),
        buffer_offset: 2048,
    });
    a.send(dout, &data[2048..]);
    assert_eq!(status_of(a.recv(), 0x21), 0);
    let mut back = vec![0u8; 4096];
    target.lun(0).unwrap().read(16 * 512, &mut back);
    assert_eq!(back, data);
    assert_eq!(target.session_cids(tsih).unwrap(), [1]);
    // The target closed B: it reads end of stream.
    let mut rest = Vec::new();
    b.s.read_to_end(&mut rest).expect("B closed by the target");
}

/// What tgtd (Debian `tgt`) answers: MaxConnections=1 and
/// ErrorRecoveryLevel=0 unless its target is configured otherwise, and a
/// second connection with the session's TSIH is taken either way.
#[test]
fn tgtd_grants_mcs_only_when_configured() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let offered = [
        ("MaxConnections", "4"),
        ("ErrorRecoveryLevel", "2"),
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
    ];
    for (params, conns, erl) in [
        (vec![], "1", "0"),
        (
            vec![
                ("MaxConnections".to_string(), "4".to_string()),
                ("ErrorRecoveryLevel".to_string(), "2".to_string()),
            ],
            "4",
            "2",
        ),
    ] {
        let t = Tgtd::start(TgtdOptions {
            params,
            ..Default::default()
        });
        let addr: SocketAddr = t.portal().parse().unwrap();
        let mut a = Raw::connect(addr);
        let (tsih, keys) = a.login(&t.iqn, 0, 1, &offered);
        assert_eq!(keys.get("MaxConnections"), Some(conns));
        assert_eq!(keys.get("ErrorRecoveryLevel"), Some(erl));
        let mut b = Raw::connect(addr);
        let (tsih_b, _) = b.login(&t.iqn, tsih, 2, &[("HeaderDigest", "None")]);
        assert_eq!(tsih_b, tsih, "tgtd added the second connection");
    }
}

/// What tgtd (Debian tgt 1.0.85) does with ERL 2 once it has granted it.
/// It negotiates ErrorRecoveryLevel as the minimum of the offer and its
/// target's setting (upstream usr/iscsi/param.c; default 0): set to 2, it
/// grants 1 to an offer of 1 and 2 to an offer of 2. But it has no
/// connection recovery behind it: TASK REASSIGN is answered 5, function
/// not supported (usr/iscsi/iscsid.c `iscsi_tm_execute` answers by the
/// function alone; the task it names here is a write waiting for its data
/// on A), and a Logout with reason 2 for CID 2 sent on A (remove B for
/// recovery, B's socket gone) is taken as a logout of A itself: tgtd
/// answers it 0 and closes A, the connection it came on. (The raw second
/// connection here is closed by tgtd at its first PDU, so no task of B's
/// is named; tests/mcs.rs drives `McsSession::recover` against tgtd with
/// the library's second connection.)
#[test]
fn tgtd_grants_erl2_but_refuses_task_reassign_and_closes_the_logout_connection() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions {
        params: vec![
            ("MaxConnections".to_string(), "4".to_string()),
            ("ErrorRecoveryLevel".to_string(), "2".to_string()),
        ],
        ..Default::default()
    });
    let addr: SocketAddr = t.portal().parse().unwrap();
    let ops = |erl| {
        [
            ("MaxConnections", "4"),
            ("ErrorRecoveryLevel", erl),
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "No"),
        ]
    };
    // An offer of 1 gets 1 (the minimum of offer and setting).
    let mut one = Raw::connect(addr);
    let (_, keys) = one.login(&t.iqn, 0, 1, &ops("1"));
    assert_eq!(keys.get("ErrorRecoveryLevel"), Some("1"), "{keys:?}");
    drop(one);

    let mut a = Raw::connect(addr);
    let (tsih, keys) = a.login(&t.iqn, 0, 1, &ops("2"));
    assert_eq!(keys.get("ErrorRecoveryLevel"), Some("2"), "{keys:?}");
    assert_eq!(keys.get("MaxConnections"), Some("4"), "{keys:?}");
    let mut b = Raw::connect(addr);
    let (tsih_b, _) = b.login(&t.iqn, tsih, 2, &[("HeaderDigest", "None")]);
    assert_eq!(tsih_b, tsih, "tgtd added the second connection");
    // B's link is cut.
    b.s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(b);

    let lun = Lun::from_number(1).to_u64();
    // The power-on UNIT ATTENTION goes to the first command: a TEST UNIT
    // READY takes it (any status).
    let tur = ScsiCommand {
        immediate: false,
        final_bit: true,
        read: false,
        write: false,
        attr: 1,
        lun,
        itt: 0x10,
        expected_data_len: 0,
        cmd_sn: Sn(1),
        exp_stat_sn: Sn(0),
        cdb: [0; 16],
    };
    a.send(PduHeader::ScsiCommand(tur), &[]);
    let tur_status = status_of(a.recv(), 0x10);
    println!("tgtd: TEST UNIT READY status {tur_status}");
    // A write that waits for its data: tgtd asks for it with an R2T.
    let mut w = write10(0x21, 2, 16, 8, true);
    w.lun = lun;
    a.send(PduHeader::ScsiCommand(w), &[]);
    match a.recv().0 {
        PduHeader::R2t(r) => assert_eq!((r.itt, r.buffer_offset), (0x21, 0)),
        other => panic!("expected an R2T for the write, got {other:?}"),
    }

    let reassign = PduHeader::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function: tmf::TASK_REASSIGN,
        lun,
        itt: 0x12,
        referenced_task_tag: 0x21,
        cmd_sn: Sn(3),
        exp_stat_sn: Sn(0),
        ref_cmd_sn: Sn(2),
        exp_data_sn: Sn(0),
    });
    a.send(reassign, &[]);
    match a.recv().0 {
        PduHeader::TaskMgmtResponse(r) => {
            println!("tgtd: TASK REASSIGN answered {}", r.response);
            assert_eq!(
                (r.itt, r.response),
                (0x12, 5),
                "TASK REASSIGN: function not supported"
            );
        }
        other => panic!("expected the TASK REASSIGN answer, got {other:?}"),
    }
    // A still works.
    let ping = PduHeader::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: 0x13,
        ttt: RESERVED_TAG,
        cmd_sn: Sn(3),
        exp_stat_sn: Sn(0),
    });
    a.send(ping, &[]);
    assert!(matches!(a.recv().0, PduHeader::NopIn(n) if n.itt == 0x13));

    let logout = PduHeader::LogoutRequest(LogoutRequest {
        immediate: true,
        reason: 2,
        itt: 0x14,
        cid: 2,
        cmd_sn: Sn(3),
        exp_stat_sn: Sn(0),
    });
    a.send(logout, &[]);
    match a.recv().0 {
        PduHeader::LogoutResponse(r) => {
            println!("tgtd: Logout reason 2 for CID 2 answered {}", r.response);
            assert_eq!((r.itt, r.response), (0x14, 0), "{r:?}");
        }
        other => panic!("expected the Logout answer, got {other:?}"),
    }
    // And then A, the connection that carried it, is closed.
    let mut rest = Vec::new();
    a.s.read_to_end(&mut rest)
        .expect("tgtd closes the connection the Logout came on");
    println!(
        "tgtd: closed CID 1 after the Logout for CID 2 ({} bytes after)",
        rest.len()
    );
}
