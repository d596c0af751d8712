//! TLS for the NBD export (`NBD_OPT_STARTTLS`), with X.509 certificates
//! through rustls (ring provider).
//!
//! - [`TlsConfig::from_pem_files`] loads the server's certificate chain and
//!   key, and optionally a CA: with one, clients must present a certificate
//!   that CA signed.
//! - [`TlsStream`] runs a rustls server connection over a non-blocking
//!   socket: reads decrypt what has arrived (driving the TLS handshake on
//!   the way), writes encrypt into a bounded buffer that
//!   [`TlsStream::flush_tls`] drains as the socket allows.

use super::handshake::TlsPolicy;
use super::NbdError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// Most encrypted bytes a connection buffers before writes push back.
const SEND_BUFFER: usize = 512 * 1024;

/// The export's TLS settings.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// `Allow` serves plaintext clients too; `Require` refuses them.
    pub policy: TlsPolicy,
    server: Arc<ServerConfig>,
    client_certs: bool,
}

impl PartialEq for TlsConfig {
    fn eq(&self, o: &TlsConfig) -> bool {
        self.policy == o.policy && Arc::ptr_eq(&self.server, &o.server)
    }
}

impl Eq for TlsConfig {}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(what: &str, path: &Path, e: impl std::fmt::Display) -> NbdError {
    NbdError::Config(format!("TLS {what} {}: {e}", path.display()))
}

impl TlsConfig {
    /// Loads a PEM certificate chain and private key (PKCS#8, PKCS#1 or
    /// SEC1), and optionally a PEM CA bundle that client certificates must
    /// chain to. `policy` must be `Allow` or `Require`.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        policy: TlsPolicy,
    ) -> Result<TlsConfig, NbdError> {
        if policy == TlsPolicy::Off {
            return Err(NbdError::Config(
                "a TLS configuration needs the policy allow or require".into(),
            ));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| config_error("certificate", cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| config_error("certificate", cert, e))?;
        if chain.is_empty() {
            return Err(config_error("certificate", cert, "no CERTIFICATE in it"));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| config_error("key", key, e))?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| NbdError::Config(format!("TLS: {e}")))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                let certs =
                    CertificateDer::pem_file_iter(ca).map_err(|e| config_error("CA", ca, e))?;
                for c in certs {
                    let c = c.map_err(|e| config_error("CA", ca, e))?;
                    roots.add(c).map_err(|e| config_error("CA", ca, e))?;
                }
                if roots.is_empty() {
                    return Err(config_error("CA", ca, "no CERTIFICATE in it"));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| config_error("CA", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let server = builder
            .with_single_cert(chain, key_der)
            .map_err(|e| config_error("certificate and key", cert, e))?;
        Ok(TlsConfig {
            policy,
            server: Arc::new(server),
            client_certs: client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_certs
    }

    /// A server-side TLS session for one client.
    pub fn session(&self) -> Result<ServerConnection, NbdError> {
        let mut c =
            ServerConnection::new(self.server.clone()).map_err(|e| NbdError::Tls(e.to_string()))?;
        c.set_buffer_limit(Some(SEND_BUFFER));
        Ok(c)
    }
}

/// A rustls server session over a (non-blocking) byte stream, which the
/// caller owns and lends to each call.
pub struct TlsSession {
    tls: ServerConnection,
}

impl TlsSession {
    /// Starts TLS. `early` holds bytes already read from the socket that
    /// belong to the TLS stream (the start of the ClientHello).
    pub fn new(mut tls: ServerConnection, early: &[u8]) -> Result<TlsSession, NbdError> {
        let mut rest = early;
        while !rest.is_empty() {
            tls.read_tls(&mut rest).map_err(NbdError::Io)?;
            process(&mut tls)?;
        }
        Ok(TlsSession { tls })
    }

    /// Whether the TLS handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    /// Whether encrypted bytes wait for the socket.
    pub fn wants_write(&self) -> bool {
        self.tls.wants_write()
    }

    /// Sends buffered encrypted bytes as far as the socket takes them;
    /// `Ok(true)` when some went out.
    pub fn flush_tls(&mut self, sock: &mut impl Write) -> std::io::Result<bool> {
        let mut any = false;
        while self.tls.wants_write() {
            match self.tls.write_tls(sock) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => any = true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    break
                }
                Err(e) => return Err(e),
            }
        }
        Ok(any)
    }

    /// Queues a close_notify alert and sends what it can.
    pub fn close(&mut self, sock: &mut impl Write) {
        self.tls.send_close_notify();
        let _ = self.flush_tls(sock);
    }

    /// Decrypted bytes; `WouldBlock` when none have arrived, `Ok(0)` once
    /// the peer has closed (with or without close_notify). A TLS failure
    /// (bad certificate, garbage) is `InvalidData`, after the alert that
    /// tells the client why has been sent.
    pub fn read<S: Read + Write>(
        &mut self,
        sock: &mut S,
        buf: &mut [u8],
    ) -> std::io::Result<usize> {
        loop {
            match self.tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let got = self.tls.read_tls(sock)?;
            if let Err(e) = process(&mut self.tls) {
                let _ = self.flush_tls(sock);
                return Err(std::io::Error::new(ErrorKind::InvalidData, e));
            }
            // Handshake messages, key updates.
            self.flush_tls(sock)?;
            if got == 0 {
                return match self.tls.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::UnexpectedEof) =>
                    {
                        Ok(0)
                    }
                    Err(e) => Err(e),
                };
            }
        }
    }

    /// Encrypts as much of `bufs` as the send buffer takes (`WouldBlock`
    /// when it takes nothing) and sends what the socket takes.
    pub fn write_vectored(
        &mut self,
        sock: &mut impl Write,
        bufs: &[IoSlice<'_>],
    ) -> std::io::Result<usize> {
        self.flush_tls(sock)?;
        let n = self.tls.writer().write_vectored(bufs)?;
        self.flush_tls(sock)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }
}

fn process(tls: &mut ServerConnection) -> Result<(), NbdError> {
    tls.process_new_packets()
        .map(|_| ())
        .map_err(|e| NbdError::Tls(e.to_string()))
}
