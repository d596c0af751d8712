//! Cost per I/O of the initiator on the userspace stack, no kernel in the
//! loop: a `Session` over `UserTcp` on the in-memory link, against the
//! embedded target's sans-IO connection on a userspace-stack socket, both
//! driven from this one thread. For instruction counts run it under
//! callgrind and read the inclusive cost of `initiator_round` (the
//! initiator: iSCSI, TCP/IP, the device's rx/tx) per I/O:
//!
//! ```text
//! cargo build --release --example user_iscsi_reads
//! valgrind --tool=callgrind --callgrind-out-file=cg.out \
//!     target/release/examples/user_iscsi_reads --ios 20000 --qd 1 --bs 4096
//! callgrind_annotate --inclusive=yes cg.out | grep -E 'initiator_round|target_round'
//! ```
//!
//! The initiator's part is `initiator_submit` + `initiator_round` +
//! `initiator_complete`; `bench/callgrind-io.sh` collects only those
//! (`--toggle-collect`) and prints the marginal instructions per I/O.
//!
//! `--mtu N` sets the link's MTU (1500); `--write` issues WRITE(10)s
//! instead of reads; `--copy-tx` makes the connection copy write payload
//! into its send bytes (and TCP into its send ring) as it did before
//! payload left by reference, for an A/B of the send-side copies in one
//! build.
//!
//! Prints one `RESULT` line: I/Os, wall time per I/O, and the connection's
//! and socket's counters.

use iscsi_bypass::iscsi::connection::{Command, Direction, Event};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::session::{IdlePolicy, Session, SessionConfig};
use iscsi_bypass::net::{Interface, InterfaceConfig, SocketHandle, TcpState};
use iscsi_bypass::phy::sim::{self, SimConfig, SimDevice};
use iscsi_bypass::phy::Device;
use iscsi_bypass::target::{TargetConfig, TargetConn, TargetShared};
use iscsi_bypass::transport::user::{UserTcp, UserTcpConfig};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

const INI_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 9, 1);
const TGT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 9, 2);
const IQN: &str = "iqn.2026-12.example:null";
const LUN_BYTES: usize = 1 << 30;

struct Target {
    dev: SimDevice,
    iface: Interface,
    handle: SocketHandle,
    shared: Arc<TargetShared>,
    conn: Option<TargetConn>,
    out: Vec<u8>,
}

impl Target {
    fn new(dev: SimDevice) -> Target {
        let portal: SocketAddr = SocketAddrV4::new(TGT_IP, 3260).into();
        let shared = Arc::new(
            TargetShared::new(TargetConfig::null(IQN, LUN_BYTES as u64), &[portal]).unwrap(),
        );
        let mut iface = Interface::new(InterfaceConfig::new(TGT_IP, 24), dev.caps());
        let handle = iface.add_socket(None);
        iface.listen(handle, 3260).unwrap();
        Target {
            dev,
            iface,
            handle,
            shared,
            conn: None,
            out: Vec::new(),
        }
    }
}

#[inline(never)]
fn target_round(t: &mut Target) {
    let now = t.dev.now();
    t.iface.poll(now, &mut t.dev);
    let s = t.iface.socket_mut(t.handle);
    if t.conn.is_none() && s.state() == TcpState::Established {
        t.conn = Some(TargetConn::new(t.shared.clone(), 0, Instant::now()));
    }
    if let Some(c) = t.conn.as_mut() {
        while let Ok(n) = s.recv_slice(c.recv_buffer()) {
            if n == 0 {
                break;
            }
            c.received(n, Instant::now());
        }
        t.out.extend_from_slice(c.output());
        c.clear_output();
        if !t.out.is_empty() {
            let n = s.send_slice(&t.out).unwrap_or(0);
            t.out.drain(..n);
        }
    }
    t.iface.poll(now, &mut t.dev);
}

#[inline(never)]
fn initiator_round(s: &mut Session<UserTcp<SimDevice>>) {
    s.poll_io().expect("initiator I/O");
}

#[inline(never)]
fn initiator_submit(s: &mut Session<UserTcp<SimDevice>>, cmd: Command) {
    s.submit(cmd).expect("submit");
}

/// Takes the completions; returns how many came.
#[inline(never)]
fn initiator_complete(s: &mut Session<UserTcp<SimDevice>>, buffers: &mut Vec<Vec<u8>>) -> usize {
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
    let copy_tx = args.iter().any(|a| a == "--copy-tx");
    // No link delay: every frame is there at the next round, so the rounds
    // per I/O (and the instructions counted) do not depend on the speed of
    // the machine or of the tool the program runs under.
    let link = SimConfig {
        delay: Duration::ZERO,
        mtu: arg(&args, "--mtu", 1500),
        ..SimConfig::default()
    };
    let (ini_dev, tgt_dev) = sim::link_real_time(link, 3);
    let mut target = Target::new(tgt_dev);
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
    let tcp = UserTcp::connect(
        ini_dev,
        INI_IP,
        None,
        None,
        SocketAddrV4::new(TGT_IP, 3260),
        UserTcpConfig::default(),
    )
    .expect("connect");
    let mut config = SessionConfig::new(LoginConfig::new("iqn.2026-12.example:ini", Some(IQN)));
    config.idle = IdlePolicy::BusyPoll;
    let mut session = Session::login(tcp, &config).expect("login");
    if copy_tx {
        session.connection_mut().set_tx_by_reference(false);
    }
    // Takes the power-on UNIT ATTENTION before the measured reads.
    let tur = Command::new(0, &[0; 6], Direction::None, Vec::new()).unwrap();
    session
        .execute(tur, Duration::from_secs(5))
        .expect("TEST UNIT READY");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut target = helper.join().unwrap();

    let blocks = (bs / 512) as u16;
    // I/O slots of `bs` within the LUN: a 128 KiB read at slot 200 000
    // would start past its end (CHECK CONDITION).
    let slots = (LUN_BYTES / bs).clamp(1, 200_000);
    let mut buffers: Vec<Vec<u8>> = (0..qd).map(|_| vec![0u8; bs]).collect();
    let (mut submitted, mut done) = (0usize, 0usize);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
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
        assert!(Instant::now() < deadline, "stalled at {done} of {ios}");
    }
    let elapsed = start.elapsed();
    println!(
        "RESULT rw={} ios={ios} qd={qd} bs={bs} wall_ns_per_io={} (both sides, one thread)",
        if write { "write" } else { "read" },
        elapsed.as_nanos() / ios as u128
    );
    println!("conn {:?}", session.connection().stats);
    println!("tcp {:?}", session.transport().socket().counters());
}
