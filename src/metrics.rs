//! Prometheus metrics for long runs (export-nbd, bench, the library): a
//! text endpoint in the OpenMetrics format, built on `prometheus-client`.
//!
//! Every scrape reads the paths' live counters ([`PathShared`]), so nothing
//! on the I/O path changes: the exporter costs only when it is scraped. One
//! small thread accepts scrapes; [`MetricsServer::stop`] (or drop) ends it.

use crate::multipath::path::PathShared;
use crate::multipath::PathState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Upper bounds of the latency histogram's buckets, in seconds (10 µs ..
/// 10 s).
const LATENCY_BOUNDS_SECS: [f64; 13] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 100e-3, 1.0, 10.0,
];

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Binding the listen address failed.
    #[error("metrics endpoint: cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
}

/// Reads the paths on every scrape.
#[derive(Debug)]
struct PathCollector {
    paths: Vec<Arc<PathShared>>,
}

type PathLabels = Vec<(String, String)>;

impl PathCollector {
    fn labels(path: &PathShared) -> PathLabels {
        vec![
            ("path".to_string(), path.index.to_string()),
            ("name".to_string(), path.name.clone()),
        ]
    }

    fn counter(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&PathShared) -> u64,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for p in &self.paths {
            let labels = Self::labels(p);
            ConstCounter::new(value(p)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauge(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&PathShared) -> i64,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for p in &self.paths {
            let labels = Self::labels(p);
            ConstGauge::new(value(p)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Collector for PathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.counter(
            &mut encoder,
            "iscsi_path_commands",
            "SCSI commands completed on the path (any status)",
            |p| p.stats().commands,
        )?;
        self.counter(
            &mut encoder,
            "iscsi_path_bytes",
            "Data bytes moved by completed commands",
            |p| p.stats().bytes,
        )?;
        self.counter(
            &mut encoder,
            "iscsi_path_errors",
            "Completions with a non-GOOD status",
            |p| p.stats().errors,
        )?;
        self.counter(
            &mut encoder,
            "iscsi_path_failed_over",
            "Commands handed to other paths after this path failed",
            |p| p.stats().resubmitted,
        )?;
        self.counter(
            &mut encoder,
            "iscsi_path_logins",
            "Successful logins (1 + reconnects)",
            |p| p.stats().logins,
        )?;
        self.gauge(
            &mut encoder,
            "iscsi_path_outstanding",
            "Commands handed to the path and not yet completed",
            |p| p.load().outstanding as i64,
        )?;
        self.gauge(
            &mut encoder,
            "iscsi_path_up",
            "1 while the path is logged in and carrying I/O",
            |p| i64::from(p.state() == PathState::Up),
        )?;
        let mut family = encoder.encode_descriptor(
            "iscsi_path_latency_seconds",
            "Command latency from dispatch to the path until completion",
            None,
            MetricType::Histogram,
        )?;
        for p in &self.paths {
            let labels = Self::labels(p);
            let (sum, count, buckets) = p.latency_buckets(&LATENCY_BOUNDS_SECS);
            family
                .encode_family(&labels)?
                .encode_histogram::<PathLabels>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// The paths' metrics in the OpenMetrics text format (what a scrape gets).
pub fn render(paths: Vec<Arc<PathShared>>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PathCollector { paths }));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// A running metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `GET /metrics` on `addr` (port 0 picks one) for these paths.
    /// Give a loopback address unless the metrics are meant for other hosts.
    pub fn start(
        addr: SocketAddr,
        paths: Vec<Arc<PathShared>>,
    ) -> Result<MetricsServer, MetricsError> {
        let listen_error = |source| MetricsError::Listen { addr, source };
        let listener = TcpListener::bind(addr).map_err(listen_error)?;
        let bound = listener.local_addr().map_err(listen_error)?;
        // Non-blocking accept, polled, so stop() needs no wake-up connection.
        listener.set_nonblocking(true).map_err(listen_error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Err(e) = answer(stream, &paths) {
                                log::debug!("metrics scrape: {e}");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            log::warn!("metrics endpoint: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(listen_error)?;
        log::info!("metrics on http://{bound}/metrics");
        Ok(MetricsServer {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and joins the thread.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Largest request head we read; a scrape's is a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8192;

/// Answers one HTTP/1.x request and closes the connection.
fn answer(mut stream: TcpStream, paths: &[Arc<PathShared>]) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let request_line = String::from_utf8_lossy(&head);
    let mut words = request_line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, target) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(paths.to_vec()),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn paths() -> Vec<Arc<PathShared>> {
        let opened = Instant::now();
        let a = Arc::new(PathShared::new(0, "10.0.1.1->10.0.1.2:3260", opened));
        let b = Arc::new(PathShared::new(1, "10.0.2.2:3260", opened));
        a.set_state(PathState::Up, "logged in");
        for us in [20, 80, 300, 3000] {
            a.record_completion(Duration::from_micros(us), 4096, false);
        }
        let mut h = crate::multipath::path::new_histogram();
        for us in [20u64, 80, 300, 3000] {
            h.record(us).unwrap();
        }
        a.merge_histogram(&mut h);
        a.add_outstanding(4096);
        b.set_state(PathState::Down, "link down");
        vec![a, b]
    }

    #[test]
    fn renders_counters_gauges_and_a_cumulative_histogram_per_path() {
        let text = render(paths());
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(
            has(r#"iscsi_path_commands_total{path="0",name="10.0.1.1->10.0.1.2:3260"} 4"#),
            "{text}"
        );
        assert!(has(
            r#"iscsi_path_bytes_total{path="0",name="10.0.1.1->10.0.1.2:3260"} 16384"#
        ));
        assert!(has(
            r#"iscsi_path_up{path="0",name="10.0.1.1->10.0.1.2:3260"} 1"#
        ));
        assert!(has(r#"iscsi_path_up{path="1",name="10.0.2.2:3260"} 0"#));
        assert!(has(
            r#"iscsi_path_outstanding{path="0",name="10.0.1.1->10.0.1.2:3260"} 1"#
        ));
        // Cumulative: 20 µs, 80 µs, 300 µs and 3 ms samples.
        let bucket = |le: &str| {
            format!(
                r#"iscsi_path_latency_seconds_bucket{{le="{le}",path="0",name="10.0.1.1->10.0.1.2:3260"}}"#
            )
        };
        let value = |le: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&bucket(le)))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no bucket le={le} in\n{text}"))
        };
        assert_eq!(value("0.00001"), "0");
        assert_eq!(value("0.000025"), "1");
        assert_eq!(value("0.0001"), "2");
        assert_eq!(value("0.0005"), "3");
        assert_eq!(value("0.0025"), "3");
        assert_eq!(value("0.005"), "4");
        assert_eq!(value("10.0"), "4");
        assert_eq!(value("+Inf"), "4");
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn serves_metrics_over_loopback_and_refuses_other_requests() {
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), paths()).unwrap();
        let get = |request: &str| {
            let mut s = TcpStream::connect(server.local_addr()).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        };
        let reply = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("iscsi_path_commands_total{"));
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let addr = server.local_addr();
        server.stop();
        assert!(TcpStream::connect(addr).is_err(), "closed after stop");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = MetricsServer::start(taken.local_addr().unwrap(), Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("cannot listen on 127.0.0.1:"),
            "{err}"
        );
    }
}
