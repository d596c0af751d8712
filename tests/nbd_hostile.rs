//! Hostile NBD clients over loopback: many connections at once, a slow
//! handshake, a silent client, oversized requests, garbage after the
//! handshake, a client that never reads its replies. Each time a good
//! client keeps working beside it, and the memory the server holds stays
//! bounded.

use iscsi_bypass::nbd::wire::{self, cmd, errno, opt, rep, InfoRequest};
#[path = "common/export.rs"]
mod export;

use export::Backend;
use iscsi_bypass::nbd::{ExportConfig, NbdServerHandle};
use iscsi_bypass::target::TargetConfig;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:nbd-hostile";
const INITIATOR: &str = "iqn.2026-11.org.iscsi-bypass:nbd-hostile-ini";
const SIZE: u64 = 32 << 20;

struct Bed {
    _be: Backend,
    server: NbdServerHandle,
    addr: SocketAddr,
}

fn bed(config: ExportConfig) -> Bed {
    let be = Backend::start(TargetConfig::ram(IQN, SIZE).loopback_portals(1), INITIATOR);
    let (server, addr) = be.serve_tcp(config);
    Bed {
        _be: be,
        server,
        addr,
    }
}

struct Client {
    s: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { s }
    }

    /// Greeting, client flags and `NBD_OPT_GO`: ready for requests.
    fn go(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr);
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).unwrap();
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut d = Vec::new();
        InfoRequest {
            name: b"",
            requests: vec![],
        }
        .emit(&mut d);
        let mut v = Vec::new();
        wire::emit_option(opt::GO, &d, &mut v);
        c.s.write_all(&v).unwrap();
        loop {
            let mut h = [0u8; 20];
            c.s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            let mut d = vec![0u8; len];
            c.s.read_exact(&mut d).unwrap();
            if kind == rep::ACK {
                return c;
            }
            assert_eq!(kind & rep::ERR, 0, "GO refused");
        }
    }

    fn request(&mut self, kind: u16, handle: u64, offset: u64, length: u32, data: &[u8]) {
        let mut v = Vec::new();
        wire::Request {
            flags: 0,
            kind,
            handle,
            offset,
            length,
        }
        .emit(&mut v);
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }

    fn reply(&mut self, data_len: usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        let (err, handle) = wire::parse_simple_reply(&h).expect("reply magic");
        let mut d = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d).unwrap();
        (handle, err, d)
    }

    /// Write then read back 64 KiB: the export still serves this client.
    fn works(&mut self, seed: u8) {
        let data: Vec<u8> = (0..65536u32).map(|i| (i as u8) ^ seed).collect();
        let off = u64::from(seed) * 65536;
        self.request(cmd::WRITE, 1, off, data.len() as u32, &data);
        assert_eq!(self.reply(0).1, 0, "write");
        self.request(cmd::READ, 2, off, data.len() as u32, &[]);
        let (h, e, d) = self.reply(data.len());
        assert_eq!((h, e), (2, 0));
        assert!(d == data, "read back");
    }

    /// True once the server has closed the connection.
    fn closed_within(&mut self, t: Duration) -> bool {
        self.s.set_read_timeout(Some(t)).unwrap();
        let mut b = [0u8; 4096];
        let end = Instant::now() + t;
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
            if Instant::now() > end {
                return false;
            }
        }
    }
}

fn wait_for(what: &str, t: Duration, f: impl Fn() -> bool) {
    let end = Instant::now() + t;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn max_clients_refuses_extra_connections_and_silent_clients_time_out() {
    let b = bed(ExportConfig {
        max_clients: 4,
        handshake_timeout: Duration::from_millis(1500),
        ..ExportConfig::default()
    });
    let st = b.server.stats();
    let mut good = Client::go(b.addr);
    // Three silent clients fill the other slots.
    let mut silent: Vec<Client> = (0..3).map(|_| Client::connect(b.addr)).collect();
    wait_for("4 clients", Duration::from_secs(5), || {
        st.active.load(Ordering::Relaxed) == 4
    });
    // Many more at once: every one closed on accept.
    let mut extra: Vec<Client> = (0..40).map(|_| Client::connect(b.addr)).collect();
    for c in &mut extra {
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "refused client closed"
        );
    }
    assert_eq!(st.refused.load(Ordering::Relaxed), 40);
    good.works(1);
    // The silent ones are dropped at the handshake deadline.
    for c in &mut silent {
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "silent client dropped"
        );
    }
    wait_for("silent clients gone", Duration::from_secs(5), || {
        st.active.load(Ordering::Relaxed) == 1
    });
    assert_eq!(st.handshake_failures.load(Ordering::Relaxed), 3);
    good.works(2);
    // Slots are free again.
    Client::go(b.addr).works(3);
}

#[test]
fn a_slow_handshake_is_dropped_at_the_deadline_while_others_work() {
    let b = bed(ExportConfig {
        handshake_timeout: Duration::from_secs(1),
        ..ExportConfig::default()
    });
    let mut slow = Client::connect(b.addr);
    let mut g = [0u8; 18];
    slow.s.read_exact(&mut g).unwrap();
    let mut bytes = 3u32.to_be_bytes().to_vec();
    wire::emit_option(opt::LIST, &[], &mut bytes);
    let start = Instant::now();
    let mut good = Client::go(b.addr);
    // One byte every 100 ms: always progressing, never finishing.
    let mut closed = false;
    for (sent, &byte) in bytes.iter().cycle().take(60).enumerate() {
        good.works((sent % 200) as u8);
        if slow.s.write_all(&[byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_millis(2500) {
            break;
        }
    }
    assert!(closed || slow.closed_within(Duration::from_secs(3)));
    assert!(start.elapsed() < Duration::from_secs(6));
    assert_eq!(
        b.server.stats().handshake_failures.load(Ordering::Relaxed),
        1
    );
    good.works(7);
}

#[test]
fn oversized_requests_and_garbage_close_only_their_connection() {
    let b = bed(ExportConfig {
        max_payload: 1 << 20,
        ..ExportConfig::default()
    });
    let mut good = Client::go(b.addr);
    // An oversized READ is answered EINVAL; the connection stays.
    let mut c = Client::go(b.addr);
    c.request(cmd::READ, 9, 0, 4 << 20, &[]);
    assert_eq!(c.reply(0), (9, errno::EINVAL, vec![]));
    c.works(4);
    // An oversized WRITE cannot be framed: closed without reading 1 GiB.
    c.request(cmd::WRITE, 10, 0, 1 << 30, &[0u8; 4096]);
    assert!(c.closed_within(Duration::from_secs(5)));
    good.works(5);
    // Garbage after the handshake: closed.
    let mut g = Client::go(b.addr);
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 131 + 7) as u8).collect();
    g.s.write_all(&junk).unwrap();
    assert!(g.closed_within(Duration::from_secs(5)));
    // A request beyond the end, a bad command: errors, not closes.
    let mut e = Client::go(b.addr);
    e.request(cmd::READ, 11, SIZE, 4096, &[]);
    assert_eq!(e.reply(0).1, errno::EINVAL);
    e.request(77, 12, 0, 0, &[]);
    assert_eq!(e.reply(0).1, errno::EINVAL);
    e.works(6);
    good.works(8);
    wait_for("two clients left", Duration::from_secs(5), || {
        b.server.stats().active.load(Ordering::Relaxed) == 2
    });
}

#[test]
fn a_client_that_never_reads_replies_is_held_to_its_buffer_cap() {
    const CAP: usize = 4 << 20;
    let b = bed(ExportConfig {
        max_buffered_bytes: CAP,
        max_payload: 1 << 20,
        ..ExportConfig::default()
    });
    let mut good = Client::go(b.addr);
    good.works(1);
    let rss0 = rss_bytes();
    // 2000 reads of 1 MiB (2 GiB of replies) sent, none read.
    let mut hog = Client::go(b.addr);
    let mut reqs = Vec::new();
    for i in 0..2000u64 {
        wire::Request {
            flags: 0,
            kind: cmd::READ,
            handle: i,
            offset: (i % 32) << 20,
            length: 1 << 20,
        }
        .emit(&mut reqs);
    }
    hog.s
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = hog.s.write_all(&reqs); // may stall: the server stopped reading
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..5 {
        good.works(10 + i);
    }
    let peak = b.server.stats().peak_buffered.load(Ordering::Relaxed) as usize;
    assert!(
        peak > 0 && peak <= CAP + (1 << 20) + 64,
        "held {peak} bytes"
    );
    let grown = rss_bytes().saturating_sub(rss0);
    assert!(grown < 256 << 20, "RSS grew by {} MiB", grown >> 20);
    // It may read now: everything it sent before the stall is answered.
    let mut answered = 0;
    hog.s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut h = [0u8; 16];
    let mut d = vec![0u8; 1 << 20];
    while answered < 50 {
        hog.s.read_exact(&mut h).unwrap();
        assert_eq!(wire::parse_simple_reply(&h).unwrap().0, 0);
        hog.s.read_exact(&mut d).unwrap();
        answered += 1;
    }
    good.works(20);
}

#[test]
fn clients_that_come_and_go_reuse_a_bounded_set_of_threads() {
    let b = bed(ExportConfig::default());
    let st = b.server.stats();
    let gone = || {
        wait_for("clients gone", Duration::from_secs(5), || {
            st.active.load(Ordering::Relaxed) == 0
        })
    };
    // One client after another: one thread serves them all.
    for i in 0..20u8 {
        Client::go(b.addr).works(i);
        gone();
    }
    assert_eq!(st.connections.load(Ordering::Relaxed), 20);
    assert_eq!(st.threads.load(Ordering::Relaxed), 1, "threads started");
    // Four at once: four threads; then one after another again: no more.
    let mut four: Vec<Client> = (0..4).map(|_| Client::go(b.addr)).collect();
    for (i, c) in four.iter_mut().enumerate() {
        c.works(100 + i as u8);
    }
    drop(four);
    gone();
    for i in 0..10u8 {
        Client::go(b.addr).works(200 + i);
        gone();
    }
    assert_eq!(st.connections.load(Ordering::Relaxed), 34);
    assert_eq!(st.threads.load(Ordering::Relaxed), 4, "threads started");
    assert_eq!(st.refused.load(Ordering::Relaxed), 0);
}
