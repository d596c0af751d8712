//! iSCSI over the userspace TCP/IP stack on DPDK against tgtd.
//!
//! tgtd runs in a network namespace the test creates, listening on
//! 10.232.y.1; the initiator's stack (10.232.y.2) drives the root end of a
//! veth pair through DPDK's net_af_packet (no kernel IP on that end). The
//! test logs in, reads the capacity, writes 1 MiB at random offsets and
//! reads it back byte for byte, and checks the LUN file agrees.
//!
//! Not root / no tgtd / no af_packet plugin: SKIPPED, unless CI=true.
#![cfg(feature = "dpdk")]

mod common;
mod dpdk_common;

use common::{Tgtd, TgtdOptions};
use dpdk_common::netns::{self, VethNetns};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::session::{Session, SessionConfig};
use iscsi_bypass::scsi::lun::LunHandle;
use iscsi_bypass::transport::dpdk::{DpdkOptions, DpdkStack};
use iscsi_bypass::transport::Transport;
use rand::{Rng, SeedableRng};
use std::net::SocketAddrV4;
use std::time::Instant;

const INITIATOR: &str = "iqn.2026-11.org.iscsi-bypass:dpdk-test";

fn skip(why: &str) {
    assert!(
        !common::required(),
        "CI=true requires dpdk_iscsi to run, but: {why}"
    );
    println!("SKIPPED dpdk_iscsi: {why}");
}

#[test]
fn iscsi_over_dpdk_userspace_stack_against_tgtd() {
    if let Some(why) = dpdk_common::skip_reason("net_af_packet") {
        return skip(&why);
    }
    if let Some(why) = netns::missing_tools() {
        return skip(&why);
    }
    if common::which("tgtd").is_none() || common::which("tgtadm").is_none() {
        return skip("tgtd/tgtadm not installed (run scripts/setup.sh)");
    }
    let started = Instant::now();
    let bed = VethNetns::create("is", 232).expect("veth + netns test bed");
    let target = Tgtd::start(TgtdOptions {
        lun_sizes: vec![64 << 20],
        portals: vec![bed.kernel_ip.to_string()],
        netns: Some(bed.netns.clone()),
        ..TgtdOptions::default()
    });
    let vdev = format!("net_af_packet0,iface={}", bed.dpdk_if);
    let args = dpdk_common::eal_args(&vdev);
    println!("EAL args: {}", args.join(" "));
    let stack = DpdkStack::open(DpdkOptions::new(args, "net_af_packet0", bed.stack_ip, 24))
        .expect("DPDK stack on net_af_packet0");

    let remote = SocketAddrV4::new(bed.kernel_ip, target.port);
    let transport = stack.connect(0, remote).expect("TCP over DPDK to tgtd");
    println!(
        "connected {:?} -> {remote} after {:?}",
        transport.local_addr(),
        started.elapsed()
    );
    let login = LoginConfig::new(INITIATOR, Some(&target.iqn));
    let session = Session::login(transport, &SessionConfig::new(login)).expect("login");
    let mut lun = LunHandle::new(session, 1);
    let cap = lun.read_capacity().expect("READ CAPACITY");
    assert_eq!(cap.block_size, 512);
    assert_eq!(cap.block_count * 512, 64 << 20);

    let mut rng = rand::rngs::StdRng::seed_from_u64(0xd9d4);
    let size = 1 << 20;
    let blocks = (size / 512) as u64;
    let io_start = Instant::now();
    let mut written = Vec::new();
    for _ in 0..4 {
        let lba = rng.gen_range(0..cap.block_count - blocks);
        let data: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
        lun.write(lba, data.clone()).expect("WRITE 1 MiB");
        let back = lun.read(lba, blocks as u32).expect("READ 1 MiB");
        assert!(back == data, "read-back mismatch at LBA {lba}");
        written.push((lba, data));
    }
    // Small random I/O as well: 4 KiB at 64 random places.
    for _ in 0..64 {
        let lba = rng.gen_range(0..cap.block_count - 8);
        let data: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
        lun.write(lba, data.clone()).expect("WRITE 4 KiB");
        assert!(lun.read(lba, 8).expect("READ 4 KiB") == data);
    }
    println!(
        "4 x 1 MiB + 64 x 4 KiB written and read back over DPDK in {:?}",
        io_start.elapsed()
    );
    lun.synchronize_cache().expect("SYNCHRONIZE CACHE");
    let session = lun.into_session();
    drop(session);
    // The last 1 MiB write that no later 4 KiB write overlapped is on disk.
    let image = std::fs::read(&target.lun_files[0]).expect("LUN file");
    let (lba, data) = written.last().expect("a write");
    let at = *lba as usize * 512;
    let same = image[at..at + size]
        .iter()
        .zip(data)
        .filter(|(a, b)| a == b)
        .count();
    // Later 4 KiB writes may overlap; most of the 1 MiB must match.
    assert!(
        same > size * 9 / 10,
        "LUN file holds the data ({same}/{size})"
    );
    drop(target);
    drop(bed);
    println!("total {:?}", started.elapsed());
}
