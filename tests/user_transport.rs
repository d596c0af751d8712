//! `transport::user::UserTcp` against a userspace-stack echo server over the
//! simulated link on the real clock: ARP, handshake, data both ways, close.

use iscsi_bypass::net::{Instant, Interface, InterfaceConfig, TcpState};
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
