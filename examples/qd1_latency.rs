//! QD1 latency of the library path (`IoQueue::write_at` / `flush` /
//! `read_at` through the multipath device's worker threads) against the
//! same operations on one raw `iscsi::session::Session` (the caller's
//! thread drives the connection itself), both over kernel TCP to the
//! embedded RAM target on loopback. Driven by `bench/library-qd1.sh`.
//!
//! `qd1_latency [IOS] [busy|sleep]`: I/Os per measurement (default 20000)
//! and what idle pollers do (default busy: spin, the latency setting).

use hdrhistogram::Histogram;
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::session::{IdlePolicy, Session, SessionConfig};
use iscsi_bypass::scsi::lun::LunHandle;
use iscsi_bypass::target::{Target, TargetConfig};
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use iscsi_bypass::{Device, IdleMode, Options};
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:qd1";
const SIZE: u64 = 256 << 20;
const IO: usize = 4096;

struct Row {
    name: String,
    h: Histogram<u64>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn time<E: std::fmt::Debug>(h: &mut Histogram<u64>, f: impl FnOnce() -> Result<(), E>) {
    let t = Instant::now();
    f().expect("I/O failed");
    let ns = t.elapsed().as_nanos() as u64;
    let _ = h.record(ns.max(1));
}

fn main() {
    let mut args = std::env::args().skip(1);
    let ios: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let busy = args.next().as_deref() != Some("sleep");
    let warm = (ios / 10).max(100);
    let target = Target::start(TargetConfig::ram(IQN, SIZE).loopback_portals(2)).expect("target");
    let portals = target.portals();
    let blocks = SIZE / 512;
    let per = (IO / 512) as u64;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let lbas: Vec<u64> = (0..ios + warm)
        .map(|_| rng.gen_range(0..blocks / per) * per)
        .collect();
    let data = vec![0x5au8; IO];
    let mut rows = Vec::new();

    // ---- library path: WorkerDevice, one IoQueue, blocking helpers.
    for paths in [1usize, 2] {
        let urls: Vec<String> = portals[..paths]
            .iter()
            .map(|p| format!("iscsi://{p}/{IQN}/0"))
            .collect();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let opts = Options {
            idle: if busy {
                IdleMode::BusyPoll
            } else {
                IdleMode::Sleep(Duration::from_micros(50))
            },
            ..Options::default()
        };
        let dev = Device::open_urls(&urls, &opts).expect("open device");
        let mut q = dev.queue_pair();
        let mut buf = vec![0u8; IO];
        let (mut w, mut wf, mut r) = (hist(), hist(), hist());
        for (i, &lba) in lbas.iter().enumerate() {
            let measured = i >= warm;
            let mut scratch = hist();
            time(if measured { &mut w } else { &mut scratch }, || {
                q.write_at(lba, &data)
            });
        }
        for (i, &lba) in lbas.iter().enumerate() {
            let mut scratch = hist();
            let h = if i >= warm { &mut wf } else { &mut scratch };
            time(h, || q.write_at(lba, &data).and_then(|_| q.flush()));
        }
        for (i, &lba) in lbas.iter().enumerate() {
            let mut scratch = hist();
            time(if i >= warm { &mut r } else { &mut scratch }, || {
                q.read_at(lba, &mut buf)
            });
        }
        let tag = format!("library ({paths} path{})", if paths > 1 { "s" } else { "" });
        rows.push(Row {
            name: format!("{tag} write 4k"),
            h: w,
        });
        rows.push(Row {
            name: format!("{tag} write 4k + flush"),
            h: wf,
        });
        rows.push(Row {
            name: format!("{tag} read 4k"),
            h: r,
        });
        drop(q);
        dev.close();
    }

    // ---- raw session: the caller's thread drives one connection.
    let t = KernelTcp::connect(portals[0], &KernelTcpOptions::default()).expect("connect");
    let mut cfg = SessionConfig::new(LoginConfig::new(
        "iqn.2026-11.org.iscsi-bypass:qd1-raw",
        Some(IQN),
    ));
    cfg.idle = if busy {
        IdlePolicy::BusyPoll
    } else {
        IdlePolicy::Wait(Duration::from_millis(2))
    };
    let session = Session::login(t, &cfg).expect("login");
    let mut lun = LunHandle::new(session, 0);
    let (mut w, mut wf, mut r) = (hist(), hist(), hist());
    let mut wbuf = data.clone();
    for (i, &lba) in lbas.iter().enumerate() {
        let mut scratch = hist();
        let h = if i >= warm { &mut w } else { &mut scratch };
        time(h, || {
            wbuf = lun.write(lba, std::mem::take(&mut wbuf))?;
            Ok::<(), iscsi_bypass::scsi::lun::LunError>(())
        });
    }
    for (i, &lba) in lbas.iter().enumerate() {
        let mut scratch = hist();
        let h = if i >= warm { &mut wf } else { &mut scratch };
        time(h, || {
            wbuf = lun.write(lba, std::mem::take(&mut wbuf))?;
            lun.synchronize_cache()
        });
    }
    for (i, &lba) in lbas.iter().enumerate() {
        let mut scratch = hist();
        let h = if i >= warm { &mut r } else { &mut scratch };
        time(h, || lun.read(lba, per as u32).map(|_| ()));
    }
    rows.push(Row {
        name: "raw session write 4k".into(),
        h: w,
    });
    rows.push(Row {
        name: "raw session write 4k + flush".into(),
        h: wf,
    });
    rows.push(Row {
        name: "raw session read 4k".into(),
        h: r,
    });
    let _ = lun.into_session().logout(Duration::from_secs(1));

    println!(
        "QD1, 4 KiB, kernel TCP to the embedded RAM target on loopback, {ios} I/Os each ({} pollers)",
        if busy { "busy-polling" } else { "sleeping" }
    );
    println!(
        "{:<36} {:>9} {:>9} {:>9} {:>9}",
        "operation", "p50 us", "p99 us", "p99.9 us", "max us"
    );
    for row in &rows {
        let us = |q: f64| row.h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{:<36} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            row.name,
            us(0.5),
            us(0.99),
            us(0.999),
            row.h.max() as f64 / 1000.0
        );
    }
}
