//! The NBD export against real NBD clients (qemu-img, qemu-io, nbdinfo,
//! nbdcopy) and a raw protocol client, with the embedded iSCSI target (two
//! loopback portals) and the export running in-process. What the clients
//! write is read back through iSCSI directly (an `IoQueue`) and compared
//! byte for byte.
//!
//! A missing tool fails the test when `CI=true`, else prints SKIPPED.

mod common;
#[path = "common/export.rs"]
mod export;

use export::Backend;
use iscsi_bypass::nbd::wire::{self, cflags, cmd, errno, opt, rep, InfoRequest};
use iscsi_bypass::nbd::{ExportConfig, Listener, NbdServerHandle};
use iscsi_bypass::target::{Target, TargetConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:nbd-test";
const INITIATOR: &str = "iqn.2026-11.org.iscsi-bypass:nbd-test-ini";
const SIZE: u64 = 64 << 20;

struct Bed {
    be: Backend,
    server: Option<NbdServerHandle>,
    dir: PathBuf,
    socket: PathBuf,
}

impl Bed {
    fn new(name: &str) -> Bed {
        Bed::with_target(name, TargetConfig::ram(IQN, SIZE).loopback_portals(2))
    }

    /// `config`'s target, a device over all its portals and an export of
    /// it on a Unix socket.
    fn with_target(name: &str, config: TargetConfig) -> Bed {
        let be = Backend::start_with(config, INITIATOR, |c| {
            c.no_path_timeout = Duration::from_secs(20)
        });
        let dir = std::env::temp_dir().join(format!("nbd-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("nbd.sock");
        let server = be.serve(
            ExportConfig {
                name: "lun0".into(),
                ..ExportConfig::default()
            },
            Listener::unix(&socket).unwrap(),
        );
        Bed {
            be,
            server: Some(server),
            dir,
            socket,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Reads bytes through iSCSI directly (its own queue on the device).
    fn read_direct(&self, offset: u64, len: usize) -> Vec<u8> {
        let bs = u64::from(self.be.device.block_size());
        assert_eq!(offset % bs, 0);
        let mut q = self.be.device.queue_pair();
        let mut out = vec![0u8; len];
        for (i, c) in out.chunks_mut(1 << 20).enumerate() {
            q.read_at(offset / bs + (i as u64 * (1 << 20)) / bs, c)
                .unwrap();
        }
        out
    }

    fn write_direct(&self, offset: u64, data: &[u8]) {
        let bs = u64::from(self.be.device.block_size());
        let mut q = self.be.device.queue_pair();
        q.write_at(offset / bs, data).unwrap();
    }

    fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deterministic bytes, different per seed, with some zero blocks.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    // A zero region, so write-zeroes/sparse paths get exercised.
    let z = len / 4;
    v[z..z + len / 8].fill(0);
    v
}

fn have(tool: &str) -> bool {
    if common::which(tool).is_some() {
        return true;
    }
    assert!(!common::required(), "CI requires {tool}");
    eprintln!("SKIPPED: {tool} not installed");
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn qemu_img_info_and_convert_write_through_nbd() {
    if !have("qemu-img") {
        return;
    }
    let bed = Bed::new("qemu-img");
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &bed.uri()]));
    assert!(
        info.contains(&format!("\"virtual-size\": {SIZE}")),
        "qemu-img info: {info}"
    );
    // Stale data where the image has zeros: convert must zero it.
    bed.write_direct(2 << 20, &vec![0x77; 1 << 20]);
    let data = pattern(8 << 20, 1);
    let src = bed.file("src.img", &data);
    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &bed.uri(),
    ]));
    let back = bed.read_direct(0, data.len());
    assert_eq!(first_mismatch(&back, &data), None, "qemu-img convert data");
    // And back out through NBD into a file.
    let dst = bed.dir.join("dst.img");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &bed.uri(),
        dst.to_str().unwrap(),
    ]));
    let out = std::fs::read(&dst).unwrap();
    assert_eq!(out.len() as u64, SIZE);
    assert_eq!(first_mismatch(&out[..data.len()], &data), None);
}

#[test]
fn qemu_io_patterns_partial_blocks_zeroes_and_discard() {
    if !have("qemu-io") {
        return;
    }
    let bed = Bed::new("qemu-io");
    let text = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "write -P 0xcd 1000 3000",
        "-c",
        "write -f -P 0xee 2M 64k",
        "-c",
        "write -z 2M 4k",
        "-c",
        "write -P 0x11 3M 1M",
        "-c",
        "discard 3M 512k",
        "-c",
        "flush",
        "-c",
        "aio_write -P 0x22 8M 64k",
        "-c",
        "aio_write -P 0x33 9M 64k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x22 8M 64k",
        &bed.uri(),
    ]));
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io: {text}"
    );
    let a = bed.read_direct(0, 1 << 20);
    assert!(a[..1000].iter().all(|&b| b == 0xab));
    assert!(a[1000..4000].iter().all(|&b| b == 0xcd));
    assert!(a[4000..].iter().all(|&b| b == 0xab));
    let b = bed.read_direct(2 << 20, 64 << 10);
    assert!(b[..4096].iter().all(|&x| x == 0), "write -z");
    assert!(b[4096..].iter().all(|&x| x == 0xee));
    let c = bed.read_direct(3 << 20, 1 << 20);
    assert!(
        c[512 << 10..].iter().all(|&x| x == 0x11),
        "past the discard"
    );
    assert!(bed
        .read_direct(8 << 20, 64 << 10)
        .iter()
        .all(|&x| x == 0x22));
    assert!(bed
        .read_direct(9 << 20, 64 << 10)
        .iter()
        .all(|&x| x == 0x33));
}

#[test]
fn nbdinfo_lists_and_describes_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let bed = Bed::new("nbdinfo");
    let j = run(Command::new("nbdinfo").args(["--json", &bed.uri()]));
    assert!(j.contains(&format!("\"export-size\": {SIZE}")), "{j}");
    assert!(j.contains("\"can_flush\": true"), "{j}");
    assert!(j.contains("\"can_trim\": true"), "{j}");
    assert!(j.contains("\"can_zero\": true"), "{j}");
    assert!(j.contains("\"block_size_minimum\": 512"), "{j}");
    let l = run(Command::new("nbdinfo").args(["--list", &bed.uri()]));
    assert!(l.contains("lun0"), "{l}");
    let named = format!("nbd+unix:///lun0?socket={}", bed.socket.display());
    run(Command::new("nbdinfo").args(["--size", &named]));
    let bad = format!("nbd+unix:///nope?socket={}", bed.socket.display());
    let out = Command::new("nbdinfo").args([&bad]).output().unwrap();
    assert!(!out.status.success(), "unknown export must fail");
}

#[test]
fn nbdcopy_round_trip() {
    if !have("nbdcopy") {
        return;
    }
    let bed = Bed::new("nbdcopy");
    let data = pattern(16 << 20, 2);
    let src = bed.file("src.img", &data);
    // nbdcopy needs the destination at least as large: write the first
    // 16 MiB of the 64 MiB export.
    run(Command::new("nbdcopy").args([
        "--destination-is-zero",
        "-C",
        "4",
        "-R",
        "16",
        src.to_str().unwrap(),
        &bed.uri(),
    ]));
    assert_eq!(first_mismatch(&bed.read_direct(0, data.len()), &data), None);
    let dst = bed.dir.join("dst.img");
    run(Command::new("nbdcopy").args([&bed.uri(), dst.to_str().unwrap()]));
    let out = std::fs::read(&dst).unwrap();
    assert_eq!(first_mismatch(&out[..data.len()], &data), None);
}

#[test]
fn a_path_failure_during_nbdcopy_loses_nothing() {
    // Portal 0's connections are killed twice while nbdcopy writes; the
    // other path carries on and path 0 logs back in.
    nbdcopy_with_path_failures("failover", &[0, 0]);
}

/// Both paths die, one after the other, so for a while no path is up and
/// I/O waits in the queues (no_path_timeout) until they log back in.
/// Regression: completions read together with a connection's close were
/// lost, and the copy hung with commands "outstanding" on a path that had
/// logged back in (see `completion_read_together_with_the_close_is_delivered`
/// in src/worker/path_worker.rs).
#[test]
fn all_paths_down_during_nbdcopy_loses_nothing() {
    nbdcopy_with_path_failures("all-down", &[0, 1, 0, 1, 0, 1]);
}

fn nbdcopy_with_path_failures(name: &str, portals: &[usize]) {
    if !have("nbdcopy") {
        return;
    }
    let bed = Bed::new(name);
    let data = pattern(32 << 20, 3);
    let src = bed.file("src.img", &data);
    // Slow responses down so the copy is still running when the paths die.
    bed.be
        .target
        .faults()
        .delay_responses(Duration::from_millis(2));
    let mut child = Command::new("nbdcopy")
        .args([
            "-C",
            "4",
            "-R",
            "8",
            "--request-size=65536",
            src.to_str().unwrap(),
            &bed.uri(),
        ])
        .spawn()
        .unwrap();
    let started = Instant::now();
    let faults = bed.be.target.faults();
    let mut drops = 0;
    let gap = if portals.len() > 2 { 100 } else { 250 };
    for &p in portals {
        std::thread::sleep(Duration::from_millis(gap));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        faults.portal(p).drop_connections_now();
        drops += 1;
    }
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    faults.delay_responses(Duration::ZERO);
    let paths = bed.be.device.paths();
    let Some(status) = status else {
        let stuck: Vec<_> = paths
            .iter()
            .map(|p| (p.name.clone(), p.state, p.outstanding, p.logins))
            .collect();
        panic!(
            "nbdcopy hung after {drops} path drops; (path, state, outstanding, logins): {stuck:?}"
        );
    };
    assert!(status.success(), "nbdcopy failed during path failures");
    assert!(drops >= 1, "the copy ended before any path failed");
    let back = bed.read_direct(0, data.len());
    assert_eq!(first_mismatch(&back, &data), None, "after {drops} drops");
    let logins: u64 = paths.iter().map(|p| p.logins).sum();
    let resubmitted: u64 = paths.iter().map(|p| p.resubmitted).sum();
    eprintln!("{drops} path drops; {logins} logins; {resubmitted} commands resubmitted");
}

// ---- a raw protocol client: pipelining, error replies, garbage ----

struct Client {
    s: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Client { s }
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        wire::emit_option(option, data, &mut v);
        self.s.write_all(&v).unwrap();
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            let mut d = vec![0u8; len];
            self.s.read_exact(&mut d).unwrap();
            let mut all = h.to_vec();
            all.extend_from_slice(&d);
            let (r, _) = wire::parse_option_reply(&all).unwrap();
            replies.push((r.reply_type, r.data.to_vec()));
            if r.reply_type == rep::ACK || r.reply_type & rep::ERR != 0 {
                return replies;
            }
        }
    }

    fn go(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr);
        let mut d = Vec::new();
        InfoRequest {
            name: b"",
            requests: vec![],
        }
        .emit(&mut d);
        let r = c.option(opt::GO, &d);
        assert_eq!(r.last().unwrap().0, rep::ACK);
        c
    }

    fn send(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, length: u32, data: &[u8]) {
        let mut v = Vec::new();
        wire::Request {
            flags,
            kind,
            handle,
            offset,
            length,
        }
        .emit(&mut v);
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }

    /// Reads one reply; `read_len` bytes of data follow a successful read.
    fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        let (err, handle) = wire::parse_simple_reply(&h).expect("simple reply magic");
        let mut d = vec![0u8; if err == 0 { read_len(handle) } else { 0 }];
        self.s.read_exact(&mut d).unwrap();
        (handle, err, d)
    }
}

fn tcp_bed() -> (Bed, NbdServerHandle, SocketAddr) {
    let bed = Bed::new("raw");
    let (h, addr) = bed.be.serve_tcp(ExportConfig::default());
    (bed, h, addr)
}

#[test]
fn raw_client_pipelines_and_gets_clear_errors() {
    let (bed, server, addr) = tcp_bed();
    let mut c = Client::go(addr);
    // 64 pipelined writes of 64 KiB with distinct data, then reads.
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| pattern(64 << 10, 100 + i)).collect();
    for (i, b) in blocks.iter().enumerate() {
        let flags = if i % 8 == 0 { cflags::FUA } else { 0 };
        c.send(
            cmd::WRITE,
            flags,
            i as u64,
            (i as u64) << 16,
            b.len() as u32,
            b,
        );
    }
    c.send(cmd::FLUSH, 0, 1000, 0, 0, &[]);
    // NBD does not order requests in flight: collect the writes' replies
    // before reading the data back (pipelined again).
    let mut seen = std::collections::HashSet::new();
    for _ in 0..65 {
        let (h, err, _) = c.reply(|_| 0);
        assert_eq!(err, 0, "request {h}");
        assert!(seen.insert(h));
    }
    for i in 0..64u64 {
        c.send(cmd::READ, 0, 2000 + i, i << 16, 64 << 10, &[]);
    }
    for _ in 0..64 {
        let (h, err, d) = c.reply(|_| 64 << 10);
        assert_eq!(err, 0, "request {h}");
        assert!(d == blocks[(h - 2000) as usize], "read {h} differs");
        assert!(seen.insert(h));
    }
    // An unaligned read, a write beyond the end, an unknown command, a read
    // that is too large: error replies, the connection stays usable.
    c.send(cmd::READ, 0, 1, 100, 1000, &[]);
    assert!(c.reply(|_| 1000).2 == blocks[0][100..1100]);
    c.send(cmd::WRITE, 0, 2, SIZE - 512, 1024, &[0u8; 1024]);
    assert_eq!(c.reply(|_| 0).1, errno::ENOSPC);
    c.send(cmd::READ, 0, 3, u64::MAX - 10, 512, &[]);
    assert_eq!(c.reply(|_| 0).1, errno::EINVAL);
    c.send(77, 0, 4, 0, 0, &[]);
    assert_eq!(c.reply(|_| 0).1, errno::EINVAL);
    c.send(cmd::READ, 0, 5, 0, 64 << 20, &[]);
    assert_eq!(c.reply(|_| 0).1, errno::EINVAL);
    // Trim and write-zeroes, aligned and not.
    c.send(cmd::WRITE_ZEROES, cflags::FUA, 6, 100, 70_000, &[]);
    assert_eq!(c.reply(|_| 0).1, 0);
    c.send(cmd::TRIM, 0, 7, 1 << 20, 1 << 20, &[]);
    assert_eq!(c.reply(|_| 0).1, 0);
    let d = bed.read_direct(0, 1 << 17);
    assert!(d[..100] == blocks[0][..100]);
    assert!(d[100..70_100].iter().all(|&b| b == 0));
    assert!(d[70_100..] == blocks[1][70_100 - (1 << 16)..]);
    // Disconnect: the server closes the socket.
    c.send(cmd::DISC, 0, 8, 0, 0, &[]);
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).unwrap_or(0), 0);
    // Garbage after the handshake: the connection is closed, the server lives.
    let mut g = Client::go(addr);
    g.s.write_all(&[0xde; 64]).unwrap();
    assert_eq!(g.s.read(&mut b).unwrap_or(0), 0);
    // A write with an absurd payload: closed too.
    let mut g = Client::go(addr);
    g.send(cmd::WRITE, 0, 1, 0, u32::MAX, &[]);
    assert_eq!(g.s.read(&mut b).unwrap_or(0), 0);
    // Garbage during the handshake.
    let mut g = TcpStream::connect(addr).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    g.read_exact(&mut greet).unwrap();
    g.write_all(&[0xff; 40]).unwrap();
    assert_eq!(g.read(&mut b).unwrap_or(0), 0);
    // Still serving.
    let mut c = Client::go(addr);
    c.send(cmd::READ, 0, 9, 0, 512, &[]);
    assert!(c.reply(|_| 512).2 == d[..512], "after write-zeroes");
    assert!(
        server
            .stats()
            .errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
    server.stop().unwrap();
}

#[test]
fn fua_writes_carry_the_fua_bit_instead_of_a_flush() {
    let (bed, server, addr) = tcp_bed();
    let lun = bed.be.target.lun(0).unwrap();
    let (fua0, sync0) = (lun.fua_writes(), lun.cache_syncs());
    let mut c = Client::go(addr);
    let data = pattern(64 << 10, 7);
    // Aligned FUA write: one WRITE(16) with FUA, no SYNCHRONIZE CACHE.
    c.send(cmd::WRITE, cflags::FUA, 1, 0, data.len() as u32, &data);
    assert_eq!(c.reply(|_| 0).1, 0);
    // A plain write: no FUA.
    c.send(cmd::WRITE, 0, 2, 1 << 16, data.len() as u32, &data);
    assert_eq!(c.reply(|_| 0).1, 0);
    // A partial-block FUA write (read-modify-write): its WRITE carries FUA.
    c.send(
        cmd::WRITE,
        cflags::FUA,
        3,
        (1 << 17) + 100,
        300,
        &data[..300],
    );
    assert_eq!(c.reply(|_| 0).1, 0);
    assert_eq!(lun.fua_writes() - fua0, 2);
    assert_eq!(lun.cache_syncs() - sync0, 0, "FUA writes need no flush");
    // WRITE SAME has no FUA bit: FUA write-zeroes still flush after.
    c.send(cmd::WRITE_ZEROES, cflags::FUA, 4, 1 << 18, 4096, &[]);
    assert_eq!(c.reply(|_| 0).1, 0);
    assert_eq!(lun.cache_syncs() - sync0, 1);
    assert_eq!(bed.read_direct(0, 64 << 10), data);
    let d = bed.read_direct(1 << 17, 512);
    assert_eq!(&d[100..400], &data[..300]);
    server.stop().unwrap();
}

#[test]
fn several_clients_at_once() {
    let (_bed, server, addr) = tcp_bed();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::go(addr);
                let base = (8 + t * 4) << 20;
                for round in 0..20u64 {
                    let data = pattern(128 << 10, t * 1000 + round);
                    c.send(
                        cmd::WRITE,
                        0,
                        round,
                        base + (round << 17),
                        data.len() as u32,
                        &data,
                    );
                    assert_eq!(c.reply(|_| 0).1, 0);
                    c.send(
                        cmd::READ,
                        0,
                        round,
                        base + (round << 17),
                        data.len() as u32,
                        &[],
                    );
                    assert!(c.reply(|_| 128 << 10).2 == data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    server.stop().unwrap();
}

/// The `export-nbd` subcommand end to end: the binary in a child process,
/// the embedded target in this one (reachable over loopback TCP).
#[test]
fn cli_export_nbd_serves_the_embedded_target() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let target = Target::start(TargetConfig::ram(IQN, SIZE).loopback_portals(2)).unwrap();
    let dir = std::env::temp_dir().join(format!("nbd-test-{}-cli", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("cli.sock");
    let mut args: Vec<String> = vec!["export-nbd".into()];
    args.extend(
        target
            .portals()
            .iter()
            .map(|p| format!("iscsi://{p}/{IQN}/0")),
    );
    args.extend(["--socket".into(), socket.display().to_string()]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
        .args(&args)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !socket.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let size = Command::new("nbdinfo").args(["--size", &uri]).output();
    let io = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5c 4k 8k",
            "-c",
            "read -P 0x5c 4k 8k",
            &uri,
        ])
        .output();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let size = size.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        SIZE.to_string()
    );
    let io = io.unwrap();
    let text = String::from_utf8_lossy(&io.stdout);
    assert!(io.status.success() && !text.contains("fail"), "{text}");
    let lun = target.lun(0).unwrap();
    let mut b = vec![0u8; 8192];
    lun.read(4096, &mut b);
    assert!(b.iter().all(|&x| x == 0x5c), "data reached the target");
}

/// The LU's Block Limits (issue #16): a target with 32 KiB transfers,
/// 64-block UNMAPs with an 8-block granularity, 128-block WRITE SAMEs, and
/// that refuses anything larger. qemu-io's 1 MiB writes, reads, zeroes and
/// discards through the export must be cut to fit.
#[test]
fn nbd_requests_are_cut_to_the_block_limits() {
    use iscsi_bypass::target::BlockLimitsConfig;
    if !have("qemu-io") {
        return;
    }
    let limits = BlockLimitsConfig {
        max_transfer_bytes: 32 << 10,
        optimal_granularity: 8,
        max_unmap_blocks: 64,
        max_unmap_descriptors: 1,
        unmap_granularity: 8,
        unmap_alignment: Some(0),
        max_write_same_blocks: 128,
    };
    let bed = Bed::with_target(
        "limits",
        TargetConfig::ram(IQN, SIZE)
            .loopback_portals(2)
            .block_limits(limits),
    );
    assert_eq!(bed.be.device.limits().max_transfer_blocks, 64);
    let text = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "write -P 0x11 1M 1M",
        "-c",
        "write -z 1M 512k",
        "-c",
        "write -P 0x22 4M 1M",
        "-c",
        "discard 4M 1M",
        "-c",
        "write -P 0x33 6M 8k",
        "-c",
        "discard 6M 7680",
        &bed.uri(),
    ]));
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io: {text}"
    );
    assert!(bed.read_direct(0, 1 << 20).iter().all(|&b| b == 0xab));
    let z = bed.read_direct(1 << 20, 1 << 20);
    assert!(z[..512 << 10].iter().all(|&b| b == 0), "write -z");
    assert!(z[512 << 10..].iter().all(|&b| b == 0x11));
    // The discards reached the LU: 4M..5M deallocated (5M..6M was never
    // written), and of 6M + 15 blocks only the whole 8-block granule; the
    // last 7 blocks (a partial granule) and the 16th stay mapped.
    let lun = bed.be.target.lun(0).unwrap();
    assert_eq!(
        lun.mapping_runs(8192, 2),
        vec![(8192, 4096 + 8, false), (12296, 8, true)]
    );
    assert!(bed.read_direct(4 << 20, 1 << 20).iter().all(|&b| b == 0));
}
