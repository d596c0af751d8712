//! The kernel TCP transport: a non-blocking `TcpStream`, optionally bound to
//! a chosen local address first (ESXi-style port binding: the path leaves
//! through the interface that owns that address).

use super::{RxSink, Transport, TransportError, TxPart, Wake};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

/// Options of a kernel TCP connection.
#[derive(Debug, Clone, Default)]
pub struct KernelTcpOptions {
    /// Bind to this local address (port 0 = any) before connecting.
    pub bind: Option<SocketAddr>,
    /// Bind to this interface by name (SO_BINDTODEVICE; needs root).
    pub bind_device: Option<String>,
    pub connect_timeout: Option<Duration>,
    /// Socket buffer sizes (SO_SNDBUF/SO_RCVBUF) in bytes.
    pub buffer_size: Option<usize>,
}

#[derive(Debug)]
pub struct KernelTcp {
    stream: TcpStream,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
}

impl KernelTcp {
    /// Connects to `addr` (blocking up to the connect timeout), then switches
    /// the socket to non-blocking mode.
    pub fn connect(addr: SocketAddr, opts: &KernelTcpOptions) -> Result<KernelTcp, TransportError> {
        let connect_err = |source: io::Error| TransportError::Connect { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(connect_err)?;
        if let Some(dev) = &opts.bind_device {
            socket
                .bind_device(Some(dev.as_bytes()))
                .map_err(connect_err)?;
        }
        if let Some(local) = opts.bind {
            socket.bind(&SockAddr::from(local)).map_err(connect_err)?;
        }
        if let Some(size) = opts.buffer_size {
            let _ = socket.set_send_buffer_size(size);
            let _ = socket.set_recv_buffer_size(size);
        }
        socket.set_tcp_nodelay(true).map_err(connect_err)?;
        let timeout = opts.connect_timeout.unwrap_or(Duration::from_secs(5));
        match socket.connect_timeout(&SockAddr::from(addr), timeout) {
            Ok(()) => {}
            Err(e)
                if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock =>
            {
                return Err(TransportError::ConnectTimeout { addr, timeout })
            }
            Err(e) => return Err(connect_err(e)),
        }
        let stream: TcpStream = socket.into();
        stream.set_nonblocking(true)?;
        Ok(KernelTcp {
            local: stream.local_addr().ok(),
            peer: stream.peer_addr().ok(),
            stream,
        })
    }

    /// Wraps an accepted stream (used by tests and the embedded target).
    pub fn from_stream(stream: TcpStream) -> Result<KernelTcp, TransportError> {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(KernelTcp {
            local: stream.local_addr().ok(),
            peer: stream.peer_addr().ok(),
            stream,
        })
    }
}

fn classify(e: io::Error) -> TransportError {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TransportError::Reset(e.to_string()),
        _ => TransportError::Io(e),
    }
}

impl Transport for KernelTcp {
    fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self.stream.write(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(classify(e)),
        }
    }

    /// One `writev` of the parts (iSCSI headers and the caller's data
    /// buffers), so the kernel's copy into its socket buffer is the only
    /// one. At most 64 parts per call; the caller sends the rest next time.
    fn send_parts(&mut self, parts: &[TxPart<'_>]) -> Result<usize, TransportError> {
        let mut slices = [IoSlice::new(&[]); 64];
        let mut count = 0;
        for part in parts.iter().filter(|p| !p.is_empty()).take(slices.len()) {
            slices[count] = IoSlice::new(part.bytes());
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        match self.stream.write_vectored(&slices[..count]) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(classify(e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        match self.stream.read(buf) {
            Ok(0) if !buf.is_empty() => Err(TransportError::Closed),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(classify(e)),
        }
    }

    /// `readv` straight into the reader's buffers (for iSCSI: a Data-In's
    /// payload into the command's buffer, plus the next PDU's header), so
    /// the kernel's copy is the only one. A short read means the socket is
    /// drained, which saves the `EAGAIN` call.
    fn recv_into(&mut self, sink: &mut dyn RxSink) -> Result<usize, TransportError> {
        let mut total = 0;
        loop {
            let (first, second) = sink.rx_buffers();
            let offered = first.len() + second.len();
            if offered == 0 {
                break;
            }
            let mut bufs = [IoSliceMut::new(first), IoSliceMut::new(second)];
            let n = match self.stream.read_vectored(&mut bufs) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => n,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    break
                }
                Err(e) => return Err(classify(e)),
            };
            total += n;
            if !sink.rx_commit(n) || n < offered {
                break;
            }
        }
        Ok(total)
    }

    fn poll(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        if timeout.is_zero() {
            return Ok(());
        }
        // poll(2) for readability: one syscall, no mode switches.
        let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
        let ms = timeout.as_millis().clamp(1, u16::MAX as u128) as u16;
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(TransportError::Io(e.into())),
        }
    }

    /// One poll(2) on the socket and the wake-up eventfd.
    fn wait_or_wake(&mut self, wake: &Wake, timeout: Duration) -> Result<(), TransportError> {
        if timeout.is_zero() {
            return Ok(());
        }
        let mut fds = [
            PollFd::new(self.stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.fd(), PollFlags::POLLIN),
        ];
        let ms = timeout.as_millis().clamp(1, u16::MAX as u128) as u16;
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(TransportError::Io(e.into())),
        }
    }

    fn close(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn connect_send_recv_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let opts = KernelTcpOptions {
            bind: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let mut t = KernelTcp::connect(addr, &opts).unwrap();
        let (mut server, _) = l.accept().unwrap();
        assert_eq!(t.send(b"hello").unwrap(), 5);
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).unwrap();
        server.write_all(b"world").unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            t.wait(Duration::from_millis(100)).unwrap();
            let mut b = [0u8; 16];
            let n = t.recv(&mut b).unwrap();
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got, b"world");
        drop(server);
        let mut closed = false;
        for _ in 0..100 {
            t.wait(Duration::from_millis(10)).unwrap();
            match t.recv(&mut [0u8; 4]) {
                Err(TransportError::Closed) => {
                    closed = true;
                    break;
                }
                Ok(0) => continue,
                other => panic!("{other:?}"),
            }
        }
        assert!(closed);
    }

    #[test]
    fn refused_connection_names_the_address() {
        // Bind then drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let e = KernelTcp::connect(addr, &KernelTcpOptions::default()).unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
