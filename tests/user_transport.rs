//! `transport::user::UserTcp` against a userspace-stack echo server over the
//! simulated link on the real clock: ARP, handshake, data both ways, close.

use iscsi_bypass::net::{Instant, Interface, InterfaceConfig, TcpState};
use iscsi_bypass::phy::impair::{ImpairConfig, Impaired};
use iscsi_bypass::phy::sim::{self, SimConfig};
use iscsi_bypass::phy::Device;
use iscsi_bypass::transport::user::{UserTcp, UserTcpConfig};
use iscsi_bypass::transport::{Transport, TransportError};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 7, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 7, 2);

fn echo_server(mut dev: sim::SimDevice, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut config = InterfaceConfig::new(SERVER_IP, 24);
        config.seed = 99;
        let mut iface = Interface::new(config, dev.caps());
        let h = iface.add_socket(None);
        iface.listen(h, 3260).unwrap();
        let mut echoed = 0u64;
        let mut pending = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let now = dev.now();
            iface.poll(now, &mut dev);
            let s = iface.socket_mut(h);
            let mut buf = [0u8; 2048];
            if let Ok(n) = s.recv_slice(&mut buf) {
                pending.extend_from_slice(&buf[..n]);
            }
            if !pending.is_empty() && s.may_send() {
                let n = s.send_slice(&pending).unwrap();
                pending.drain(..n);
                echoed += n as u64;
            }
            if s.state() == TcpState::CloseWait && pending.is_empty() {
                s.close();
            }
            iface.poll(now, &mut dev);
            std::thread::yield_now();
        }
        echoed
    })
}

#[test]
fn user_tcp_echo_round_trip_and_close() {
    let link = SimConfig {
        loss: 0.02,
        delay: Duration::from_micros(200),
        ..SimConfig::default()
    };
    let (client_dev, server_dev) = sim::link_real_time(link, 7);
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(server_dev, stop.clone());

    let remote = SocketAddrV4::new(SERVER_IP, 3260);
    let config = UserTcpConfig {
        seed: 5,
        ..UserTcpConfig::default()
    };
    let mut conn =
        UserTcp::connect(client_dev, CLIENT_IP, None, None, remote, config).expect("connect");
    assert_eq!(conn.peer_addr(), Some(SocketAddr::V4(remote)));
    assert_eq!(conn.local_addr().map(|a| a.ip()), Some(CLIENT_IP.into()));

    let message: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut sent = 0;
    let mut echoed = Vec::new();
    let start = std::time::Instant::now();
    while echoed.len() < message.len() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "echo stalled at {} bytes",
            echoed.len()
        );
        if sent < message.len() {
            sent += conn.send(&message[sent..]).unwrap();
        }
        conn.poll().unwrap();
        let mut buf = [0u8; 4096];
        let n = conn.recv(&mut buf).unwrap();
        echoed.extend_from_slice(&buf[..n]);
        conn.wait(Duration::from_millis(1)).unwrap();
    }
    assert!(echoed == message, "echoed bytes differ");

    conn.close();
    assert!(conn.send(b"late").is_err(), "send after close must fail");
    let closed = loop {
        assert!(start.elapsed() < Duration::from_secs(30), "close stalled");
        conn.poll().unwrap();
        let mut buf = [0u8; 16];
        match conn.recv(&mut buf) {
            Err(TransportError::Closed) => break true,
            Ok(0) => std::thread::yield_now(),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(closed);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(server.join().unwrap(), message.len() as u64);
    let _ = Instant::ZERO;
}

#[test]
fn connect_to_closed_port_is_refused() {
    let (client_dev, server_dev) = sim::link_real_time(SimConfig::default(), 1);
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(server_dev, stop.clone());
    let remote = SocketAddrV4::new(SERVER_IP, 9999);
    let err = UserTcp::connect(
        client_dev,
        CLIENT_IP,
        None,
        None,
        remote,
        UserTcpConfig::default(),
    )
    .unwrap_err();
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    match err {
        TransportError::Connect { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused)
        }
        other => panic!("expected refusal, got {other:?}"),
    }
}

#[test]
fn connect_times_out_without_peer() {
    let (client_dev, _server_dev) = sim::link_real_time(SimConfig::default(), 1);
    let config = UserTcpConfig {
        connect_timeout: Duration::from_millis(300),
        ..UserTcpConfig::default()
    };
    let err = UserTcp::connect(
        client_dev,
        CLIENT_IP,
        None,
        None,
        SocketAddrV4::new(SERVER_IP, 3260),
        config,
    )
    .unwrap_err();
    // No peer answers ARP, so the connect fails at the ARP step with a
    // timeout that names the next hop.
    let text = err.to_string();
    assert!(
        matches!(&err, TransportError::ConnectTimeout { .. })
            || (text.contains("ARP") && text.contains(&SERVER_IP.to_string())),
        "{err:?}"
    );
}

/// The embedded target on the userspace stack (`Target::start_on_device`)
/// over the simulated link: two sessions at once (the listener re-arms after
/// each accept), writes read back byte for byte, a third login after both
/// logged out (closed sockets are reused), and a portal off the stack's
/// address refused.
#[test]
fn embedded_target_on_userspace_stack_serves_sessions() {
    use iscsi_bypass::iscsi::login::LoginConfig;
    use iscsi_bypass::iscsi::session::{Session, SessionConfig};
    use iscsi_bypass::scsi::lun::LunHandle;
    use iscsi_bypass::target::{LunConfig, Target, TargetConfig, UserListenConfig};

    const IQN: &str = "iqn.2026-11.org.iscsi-bypass:user-target";
    let link = SimConfig {
        delay: Duration::from_micros(50),
        ..SimConfig::default()
    };
    let (client_dev, server_dev) = sim::link_real_time(link, 11);
    let config = TargetConfig::new(IQN).lun(LunConfig::ram(0, 8 << 20));
    let mut iface = InterfaceConfig::new(SERVER_IP, 24);
    iface.seed = 3;
    let target = Target::start_on_device(config, server_dev, UserListenConfig::new(iface))
        .expect("target on the userspace stack");
    assert_eq!(
        target.portals(),
        vec![SocketAddr::from((SERVER_IP, 3260))],
        "default portal: the stack's address, port 3260"
    );

    // Sessions one after another, each on its own interface over the same
    // end of the link: the second needs the listener re-armed.
    let remote = SocketAddrV4::new(SERVER_IP, 3260);
    for round in 0..2u64 {
        let config = UserTcpConfig {
            seed: 40 + round,
            ..UserTcpConfig::default()
        };
        let t = UserTcp::connect(client_dev.clone(), CLIENT_IP, None, None, remote, config)
            .expect("connect to the userspace-stack target");
        let login = LoginConfig::new("iqn.2026-11.org.iscsi-bypass:user-test", Some(IQN));
        let session = Session::login(t, &SessionConfig::new(login)).expect("login");
        let mut lun = LunHandle::new(session, 0);
        let cap = lun.read_capacity().expect("READ CAPACITY");
        assert_eq!(cap.block_count * u64::from(cap.block_size), 8 << 20);
        for i in 0..16u64 {
            let lba = (i * 97 + round * 13) % (cap.block_count - 256);
            let data: Vec<u8> = (0..128 * 1024u32)
                .map(|b| (u64::from(b) ^ lba ^ round) as u8)
                .collect();
            lun.write(lba, data.clone()).expect("WRITE");
            assert!(
                lun.read(lba, 256).expect("READ") == data,
                "read back differs"
            );
        }
        lun.into_session()
            .logout(Duration::from_secs(5))
            .expect("logout");
    }
    target.stop();

    let (_, server_dev) = sim::link_real_time(SimConfig::default(), 12);
    let config = TargetConfig::new(IQN)
        .lun(LunConfig::ram(0, 1 << 20))
        .portal(SocketAddr::from(([10, 9, 9, 9], 3260)));
    let err = Target::start_on_device(
        config,
        server_dev,
        UserListenConfig::new(InterfaceConfig::new(SERVER_IP, 24)),
    )
    .expect_err("a portal off the stack's address is refused");
    assert!(err.to_string().contains("10.9.9.9"), "{err}");
}

/// The embedded target's sans-IO connection on a userspace-stack socket:
/// an iSCSI target with no kernel TCP in the loop.
fn iscsi_target(mut dev: sim::SimDevice, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    use iscsi_bypass::target::{TargetConfig, TargetConn, TargetShared};
    std::thread::spawn(move || {
        let portal: SocketAddr = SocketAddrV4::new(SERVER_IP, 3260).into();
        let shared =
            Arc::new(TargetShared::new(TargetConfig::ram(TARGET_IQN, 4 << 20), &[portal]).unwrap());
        let mut config = InterfaceConfig::new(SERVER_IP, 24);
        config.seed = 77;
        let mut iface = Interface::new(config, dev.caps());
        let h = iface.add_socket(None);
        iface.listen(h, 3260).unwrap();
        let mut conn: Option<TargetConn> = None;
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let now = dev.now();
            iface.poll(now, &mut dev);
            let s = iface.socket_mut(h);
            if conn.is_none() && s.state() == TcpState::Established {
                conn = Some(TargetConn::new(
                    shared.clone(),
                    0,
                    std::time::Instant::now(),
                ));
            }
            if let Some(c) = conn.as_mut() {
                loop {
                    match s.recv_slice(c.recv_buffer()) {
                        Ok(n) if n > 0 => c.received(n, std::time::Instant::now()),
                        _ => break,
                    }
                }
                out.extend_from_slice(c.output());
                c.clear_output();
                if !out.is_empty() {
                    let n = s.send_slice(&out).unwrap_or(0);
                    out.drain(..n);
                }
            }
            iface.poll(now, &mut dev);
            std::thread::yield_now();
        }
    })
}

const TARGET_IQN: &str = "iqn.2026-12.test.user-transport:ram";

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [opcode, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}

/// What [`write_read_back_impaired`] counted, from login on.
#[derive(Debug)]
struct Copies {
    /// Data-In bytes placed in the command's buffer / staged first.
    placed: u64,
    staged: u64,
    /// TCP payload handed to the reader straight from frames / in all.
    direct: u64,
    bytes_in: u64,
    /// Write payload the connection sent by reference / copied.
    conn_shared: u64,
    conn_copied: u64,
    /// Bytes TCP queued by reference / copied into its send ring.
    tcp_shared: u64,
    tcp_copied: u64,
    retransmitted: u64,
    /// Completed writes whose buffer had to be copied back.
    copied_back: u64,
}

/// Writes then reads back 256 KiB over the userspace stack; returns the
/// session's Data-In placement counters and, since login, the payload
/// bytes TCP handed over straight from frames and in all.
fn write_read_back(link: SimConfig) -> (u64, u64, u64, u64) {
    let c = write_read_back_impaired(link, ImpairConfig::default());
    (c.placed, c.staged, c.direct, c.bytes_in)
}

/// [`write_read_back`] with the initiator's device behind `impair` once
/// logged in.
fn write_read_back_impaired(link: SimConfig, impair: ImpairConfig) -> Copies {
    use iscsi_bypass::iscsi::connection::{Command, Direction};
    use iscsi_bypass::iscsi::login::LoginConfig;
    use iscsi_bypass::iscsi::session::{IdlePolicy, Session, SessionConfig};
    let (client_dev, server_dev) = sim::link_real_time(link, 11);
    let client_dev = Impaired::new(client_dev, ImpairConfig::default());
    let stop = Arc::new(AtomicBool::new(false));
    let target = iscsi_target(server_dev, stop.clone());
    let remote = SocketAddrV4::new(SERVER_IP, 3260);
    let config = UserTcpConfig {
        seed: 6,
        ..UserTcpConfig::default()
    };
    let tcp = UserTcp::connect(client_dev, CLIENT_IP, None, None, remote, config).expect("connect");
    let mut session_config = SessionConfig::new(LoginConfig::new(
        "iqn.2026-12.test.user-transport:ini",
        Some(TARGET_IQN),
    ));
    session_config.idle = IdlePolicy::Wait(Duration::from_millis(1));
    let mut session = Session::login(tcp, &session_config).expect("login");
    // Login reads through the ring (plain recv); count from here on.
    let at_login = *session.transport().socket().counters();
    session.transport_mut().device_mut().set_config(impair);
    let len = 256 * 1024;
    let pattern: Vec<u8> = (0..len as u32).map(|i| (i * 31 % 253) as u8).collect();
    let write = Command::new(
        0,
        &rw10(0x2a, 8, (len / 512) as u16),
        Direction::Write,
        pattern.clone(),
    )
    .unwrap();
    let done = session
        .execute(write, Duration::from_secs(20))
        .expect("write");
    assert_eq!(done.status, 0, "write status");
    let read = Command::new(
        0,
        &rw10(0x28, 8, (len / 512) as u16),
        Direction::Read,
        vec![0; len],
    )
    .unwrap();
    let done = session
        .execute(read, Duration::from_secs(20))
        .expect("read");
    assert_eq!(done.status, 0, "read status");
    assert!(
        done.buffer == pattern,
        "read back differs from what was written"
    );
    let stats = session.connection().stats.clone();
    let tcp_counters = *session.transport().socket().counters();
    stop.store(true, Ordering::Relaxed);
    target.join().unwrap();
    Copies {
        placed: stats.rx_bytes_placed,
        staged: stats.rx_bytes_staged,
        direct: tcp_counters.bytes_direct - at_login.bytes_direct,
        bytes_in: tcp_counters.bytes_in - at_login.bytes_in,
        conn_shared: stats.tx_bytes_shared,
        conn_copied: stats.tx_bytes_copied,
        tcp_shared: tcp_counters.tx_bytes_shared - at_login.tx_bytes_shared,
        tcp_copied: tcp_counters.tx_bytes_copied - at_login.tx_bytes_copied,
        retransmitted: tcp_counters.retransmitted_bytes - at_login.retransmitted_bytes,
        copied_back: stats.tx_buffers_copied_back,
    }
}

#[test]
fn iscsi_write_payload_goes_from_the_callers_buffer_into_the_frame() {
    // Every Data-Out/immediate payload byte is queued in TCP by reference
    // (never copied into conn.tx or the send ring): its one copy is into
    // the frame. Only headers (48 bytes per PDU) go through the ring.
    let c = write_read_back_impaired(SimConfig::default(), ImpairConfig::default());
    assert_eq!(c.conn_shared, 256 * 1024, "{c:?}");
    assert_eq!(c.conn_copied, 0, "{c:?}");
    assert_eq!(c.tcp_shared, 256 * 1024, "{c:?}");
    // A write of 256 KiB and a read: a few dozen PDU headers at most.
    assert!(c.tcp_copied < 64 * 48, "{c:?}");
    assert_eq!(c.copied_back, 0, "the buffer came back without a copy");
}

#[test]
fn iscsi_write_over_a_lossy_link_retransmits_from_the_callers_buffer() {
    // The initiator's frames are lost and reordered: retransmissions are
    // built from the write's buffer again, and the data read back (checked
    // in write_read_back_impaired) is what was written.
    let impair = ImpairConfig {
        tx_loss: 0.05,
        tx_reorder: 0.05,
        seed: 5,
        ..ImpairConfig::default()
    };
    let c = write_read_back_impaired(SimConfig::default(), impair);
    assert!(c.retransmitted > 0, "nothing was retransmitted: {c:?}");
    assert_eq!(c.tcp_shared, 256 * 1024, "{c:?}");
    assert_eq!(c.conn_copied, 0, "{c:?}");
}

#[test]
fn iscsi_read_payload_goes_from_the_frame_into_the_callers_buffer() {
    // A clean link: every in-order byte goes from the received frame
    // straight to the reader (never into the TCP ring), and the Data-In
    // payload straight into the command's buffer: one copy.
    let (placed, staged, direct, bytes_in) = write_read_back(SimConfig::default());
    assert_eq!(
        placed,
        256 * 1024,
        "Data-In bytes placed in the caller's buffer"
    );
    assert_eq!(staged, 0, "Data-In bytes copied a second time");
    assert_eq!(
        direct, bytes_in,
        "bytes that stopped in the TCP receive ring"
    );
}

#[test]
fn iscsi_read_over_a_lossy_link_takes_the_ring_for_out_of_order_data() {
    // Loss reorders the stream: what arrives after a hole waits in the TCP
    // ring and is lent to the reader from there once the hole is filled.
    let link = SimConfig {
        loss: 0.03,
        delay: Duration::from_micros(100),
        ..SimConfig::default()
    };
    let (placed, staged, direct, bytes_in) = write_read_back(link);
    assert_eq!(placed, 256 * 1024);
    assert_eq!(staged, 0);
    assert!(
        direct < bytes_in,
        "loss left nothing for the ring ({direct} of {bytes_in})"
    );
}

/// A second connection on a live connection's own stack
/// (`Transport::open_side`, what a DPDK path's fence login runs over): a
/// login on another thread over it while the owner keeps its own session
/// busy and pumps the side; again on the reused socket; and a side whose
/// owner goes fails with it. Over a lossy simulated link, so both
/// connections retransmit.
#[test]
fn a_side_connection_carries_a_second_login_beside_the_session() {
    use iscsi_bypass::iscsi::connection::{Command, Direction};
    use iscsi_bypass::iscsi::login::LoginConfig;
    use iscsi_bypass::iscsi::session::{Session, SessionConfig};
    use iscsi_bypass::target::{LunConfig, Target, TargetConfig, UserListenConfig};

    const IQN: &str = "iqn.2026-12.org.iscsi-bypass:side";
    let link = SimConfig {
        loss: 0.01,
        delay: Duration::from_micros(100),
        ..SimConfig::default()
    };
    let (client_dev, server_dev) = sim::link_real_time(link, 21);
    let config = TargetConfig::new(IQN).lun(LunConfig::ram(0, 1 << 20));
    let mut iface = InterfaceConfig::new(SERVER_IP, 24);
    iface.seed = 4;
    let target = Target::start_on_device(config, server_dev, UserListenConfig::new(iface))
        .expect("target on the userspace stack");
    let remote = SocketAddrV4::new(SERVER_IP, 3260);
    let t = UserTcp::connect(
        client_dev,
        CLIENT_IP,
        None,
        None,
        remote,
        UserTcpConfig {
            seed: 8,
            ..UserTcpConfig::default()
        },
    )
    .expect("connect");
    assert!(t.has_side_connections());
    let login = |isid: u8| {
        let mut l = LoginConfig::new("iqn.2026-12.org.iscsi-bypass:side-host", Some(IQN));
        l.isid = [0x80, 0, 0, 0, 0x51, isid];
        SessionConfig::new(l)
    };
    let mut session = Session::login(t, &login(1)).expect("login");
    let tur = || Command::new(0, &[0; 6], Direction::None, Vec::new()).unwrap();
    for round in 0..2u8 {
        let side = session
            .transport_mut()
            .open_side()
            .expect("offered")
            .expect("side opened");
        assert_eq!(side.peer_addr(), Some(SocketAddr::V4(remote)));
        assert_ne!(side.local_addr(), session.transport().local_addr());
        let cfg = login(2 + round);
        let other = std::thread::spawn(move || {
            side.wait_connected(Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let s = Session::login(side, &cfg).map_err(|e| e.to_string())?;
            s.logout(Duration::from_secs(5)).map_err(|e| e.to_string())
        });
        let t0 = std::time::Instant::now();
        let mut commands = 0;
        while !other.is_finished() {
            assert!(t0.elapsed() < Duration::from_secs(20), "side login stalled");
            session.transport_mut().pump_side();
            // The session's own I/O goes on beside it.
            let done = session.execute(tur(), Duration::from_secs(5)).expect("TUR");
            assert!(done.status == 0 || done.status == 2, "{done:?}");
            commands += 1;
        }
        other
            .join()
            .expect("login thread")
            .unwrap_or_else(|e| panic!("round {round}: side login: {e}"));
        assert!(commands > 0);
        // Dropped by the thread: the next pump closes its socket.
        session.transport_mut().pump_side();
    }
    // A side whose owner goes fails with it.
    let side = session
        .transport_mut()
        .open_side()
        .expect("offered")
        .expect("side opened");
    let _ = session.logout(Duration::from_secs(5));
    let err = side
        .wait_connected(Duration::from_secs(5))
        .expect_err("the owner is gone");
    assert!(err.to_string().contains("ended"), "{err}");
    target.stop();
}
