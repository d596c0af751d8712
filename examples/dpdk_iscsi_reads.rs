//! Cost per I/O of the initiator over a real DPDK PMD: a `Session` over
//! `UserTcp<DpdkQueue>` on one port of a net_ring pair (two rte_rings
//! crossed, `Eal::ring_pair`), against the embedded target's sans-IO
//! connection on a userspace stack over the other port, both driven from
//! this one thread so the rounds (and the instructions counted) do not
//! depend on scheduling. Unlike `user_iscsi_reads` (the simulated link)
//! this runs the PMD's rx/tx bursts, mbuf alloc/free, the C shim and
//! `phy::dpdk`'s glue.
//!
//! For instruction counts run it under callgrind and collect only the
//! initiator's functions (`initiator_submit`, `initiator_round`,
//! `initiator_complete`); `BED=dpdk-ring bench/callgrind-io.sh` does
//! that at two I/O counts and prints the marginal instructions per I/O.
//!
//! ```text
//! cargo build --release --example dpdk_iscsi_reads
//! valgrind --tool=callgrind --toggle-collect='*initiator_round*' ... \
//!     target/release/examples/dpdk_iscsi_reads --ios 2000 --qd 32
//! ```
//!
//! On net_ring the initiator's tx mbufs are freed by the target's rx (and
//! the target's by the initiator's), as a NIC frees them on tx
//! completion: the counts include one mbuf free per frame received and
//! one alloc per frame sent. Checksums are software (net_ring offloads
//! none). Needs root (EAL) and the net_ring plugin. EAL runs with
//! `--no-huge` (valgrind cannot map hugepages) and a file prefix of its
//! own, `--prefix NAME` (default `ib-dpdk-reads-<pid>`).
//!
//! `--write` issues WRITE(10)s; `--bs`, `--qd`, `--ios` as in
//! `user_iscsi_reads`. `--checksum sw|trusted` sets both ports' checksum
//! mode (`trusted`: no software checksums on either side, which net_ring
//! allows). The target runs its own output pump
//! (`target::user::send_output`, Data-In payload by reference from the
//! LU); `--copy-data-in` copies it into the output first, as before.
//! `target_round` is the target's cost (`SIDE=target`). Prints one
//! `RESULT` line and the counters.

use iscsi_bypass::iscsi::connection::{Command, Direction, Event};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::session::{IdlePolicy, Session, SessionConfig};
use iscsi_bypass::net::{Instant as NetInstant, Interface, SocketHandle, TcpState};
use iscsi_bypass::phy::dpdk::{DpdkQueue, PMD_DIR};
use iscsi_bypass::phy::ChecksumMode;
use iscsi_bypass::phy::Device;
use iscsi_bypass::target::user::send_output;
use iscsi_bypass::target::{TargetConfig, TargetConn, TargetShared};
use iscsi_bypass::transport::dpdk::{self, DpdkOptions, DpdkStack};
use iscsi_bypass::transport::user::UserTcp;
use iscsi_bypass::wire::ethernet::EthernetAddress;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

const INI_IP: Ipv4Addr = Ipv4Addr::new(10, 217, 0, 2);
const TGT_IP: Ipv4Addr = Ipv4Addr::new(10, 217, 0, 1);
const IQN: &str = "iqn.2026-12.example:dpdk-null";
const LUN_BYTES: usize = 1 << 30;

type Ini = Session<UserTcp<DpdkQueue>>;

struct Target {
    dev: DpdkQueue,
    iface: Interface,
    handle: SocketHandle,
    shared: Arc<TargetShared>,
    conn: Option<TargetConn>,
    /// Bytes of the connection's output already on the socket.
    sent: usize,
    /// Data-In payload copied into the output (as before it went by
    /// reference), for comparison.
    copy_data_in: bool,
    epoch: Instant,
}

impl Target {
    fn new(stack: &DpdkStack, copy_data_in: bool) -> Target {
        let dev = stack.queue(0).expect("target's queue");
        let portal: SocketAddr = SocketAddrV4::new(TGT_IP, 3260).into();
        let shared = Arc::new(
            TargetShared::new(TargetConfig::null(IQN, LUN_BYTES as u64), &[portal]).unwrap(),
        );
        let options = stack.options();
        let mut config = options
            .user
            .interface_config(options.local_ip, options.gateway);
        config.mac = Some(EthernetAddress(stack.mac()));
        let mut iface = Interface::new(config, dev.caps());
        let handle = iface.add_socket(None);
        iface.listen(handle, 3260).unwrap();
        Target {
            dev,
            iface,
            handle,
            shared,
            conn: None,
            sent: 0,
            copy_data_in,
            epoch: Instant::now(),
        }
    }
}

/// One round of the target: its stack, then its connection (collected
/// alone for `SIDE=target bench/callgrind-io.sh`).
#[inline(never)]
fn target_round(t: &mut Target) {
    let now = NetInstant::from_micros(t.epoch.elapsed().as_micros() as u64);
    t.iface.poll(now, &mut t.dev);
    let s = t.iface.socket_mut(t.handle);
    if t.conn.is_none() && s.state() == TcpState::Established {
        let mut conn = TargetConn::new(t.shared.clone(), 0, Instant::now());
        conn.set_data_in_by_reference(!t.copy_data_in);
        t.conn = Some(conn);
    }
    if let Some(c) = t.conn.as_mut() {
        while let Ok(n) = s.recv_slice(c.recv_buffer()) {
            if n == 0 {
                break;
            }
            c.received(n, Instant::now());
        }
        // The target's own output pump (`iscsi-bypass target --transport
        // dpdk` runs it): Data-In payload by reference unless --copy-data-in.
        let _ = send_output(s, c, &mut t.sent);
    }
    t.iface.poll(now, &mut t.dev);
}

#[inline(never)]
fn initiator_round(s: &mut Ini) {
    s.poll_io().expect("initiator I/O");
}

#[inline(never)]
fn initiator_submit(s: &mut Ini, cmd: Command) {
    s.submit(cmd).expect("submit");
}

/// Takes the completions; returns how many came.
#[inline(never)]
fn initiator_complete(s: &mut Ini, buffers: &mut Vec<Vec<u8>>) -> usize {
    let mut n = 0;
    while let Some(ev) = s.connection_mut().poll_event() {
        if let Event::Completed(c) = ev {
            assert_eq!(c.status, 0, "I/O failed");
            buffers.push(c.buffer);
            n += 1;
        }
    }
    n
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [opcode, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ios = arg(&args, "--ios", 20_000);
    let qd = arg(&args, "--qd", 1);
    let bs = arg(&args, "--bs", 4096);
    let write = args.iter().any(|a| a == "--write");
    let copy_data_in = args.iter().any(|a| a == "--copy-data-in");
    let checksum: ChecksumMode = args
        .iter()
        .position(|a| a == "--checksum")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(ChecksumMode::Sw), |v| v.parse())
        .unwrap_or_else(|e| panic!("--checksum: {e}"));
    let prefix = args
        .iter()
        .position(|a| a == "--prefix")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| format!("ib-dpdk-reads-{}", std::process::id()));
    let eal_args: Vec<String> = [
        "-l",
        "0",
        "--no-pci",
        "--no-huge",
        "-m",
        "256",
        "--no-telemetry",
        "-d",
        PMD_DIR,
        "--log-level",
        "lib.eal:notice",
        "--file-prefix",
        &prefix,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let eal = dpdk::eal(&eal_args).expect("EAL");
    let (tgt_name, ini_name) = ("ibcgt", "ibcgi");
    eal.ring_pair(tgt_name, ini_name).expect("ring pair");
    let port = |name: &str, ip| {
        let mut o = DpdkOptions::new(eal_args.clone(), &format!("net_ring_{name}"), ip, 24);
        o.mbufs = 4096;
        o.port_config.checksum = checksum;
        DpdkStack::open(o).expect("DPDK stack")
    };
    let tgt_stack = port(tgt_name, TGT_IP);
    let ini_stack = port(ini_name, INI_IP);
    let mut target = Target::new(&tgt_stack, copy_data_in);

    // Connect and log in, pumping the target from a helper thread (the
    // blocking calls wait on it), then hand the target back to this thread.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let helper = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            target_round(&mut target);
            std::thread::yield_now();
        }
        target
    });
    let tcp = ini_stack
        .connect(0, SocketAddrV4::new(TGT_IP, 3260))
        .expect("connect over the ring pair");
    let mut config = SessionConfig::new(LoginConfig::new("iqn.2026-12.example:ini", Some(IQN)));
    config.idle = IdlePolicy::BusyPoll;
    let mut session = Session::login(tcp, &config).expect("login");
    let tur = Command::new(0, &[0; 6], Direction::None, Vec::new()).unwrap();
    session
        .execute(tur, Duration::from_secs(30))
        .expect("TEST UNIT READY");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut target = helper.join().unwrap();

    let blocks = (bs / 512) as u16;
    // I/O slots of `bs` within the LUN: a 128 KiB read at slot 200 000
    // would start past its end (CHECK CONDITION).
    let slots = (LUN_BYTES / bs).clamp(1, 200_000);
    let mut buffers: Vec<Vec<u8>> = (0..qd).map(|_| vec![0u8; bs]).collect();
    let (mut submitted, mut done, mut rounds) = (0usize, 0usize, 0usize);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    while done < ios {
        while submitted < ios && submitted - done < qd {
            let buffer = buffers.pop().expect("a free buffer");
            // Spread over the LUN (1 GiB), whatever the block size.
            let lba = (submitted * 7919 % slots) as u32 * u32::from(blocks);
            let (opcode, direction) = if write {
                (0x2a, Direction::Write)
            } else {
                (0x28, Direction::Read)
            };
            let mut cmd = Command::new(0, &rw10(opcode, lba, blocks), direction, buffer).unwrap();
            cmd.user_tag = submitted as u64;
            initiator_submit(&mut session, cmd);
            submitted += 1;
        }
        initiator_round(&mut session);
        target_round(&mut target);
        done += initiator_complete(&mut session, &mut buffers);
        rounds += 1;
        assert!(Instant::now() < deadline, "stalled at {done} of {ios}");
    }
    let elapsed = start.elapsed();
    println!(
        "RESULT bed=ring rw={} ios={ios} qd={qd} bs={bs} csum={checksum} rounds={rounds} \
         wall_ns_per_io={} (both sides, one thread)",
        if write { "write" } else { "read" },
        elapsed.as_nanos() / ios as u128
    );
    println!("conn {:?}", session.connection().stats);
    println!("tcp {:?}", session.transport().socket().counters());
    // Leave the file prefix's runtime directory behind for no one.
    drop(session);
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
}
