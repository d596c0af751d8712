//! Host set-up that port binding over kernel TCP needs when the bound
//! interfaces share a subnet (docs/multipath.md, "Port binding"): each
//! interface answers ARP only for its own addresses (`arp_ignore=1`),
//! announces only its own address (`arp_announce=2`), and the reverse-path
//! filter does not drop replies that arrive on the "other" interface of the
//! subnet (`rp_filter` 0 or 2). `scripts/check-port-binding.sh` checks the
//! same and also the per-interface routing rules.

use iscsi_bypass::PortBinding;
use std::net::{IpAddr, Ipv4Addr};

/// One IPv4 address of an interface with its prefix.
struct V4 {
    iface: String,
    ip: Ipv4Addr,
    mask: Ipv4Addr,
}

fn v4_addresses() -> Vec<V4> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    all.filter_map(|a| {
        let ip = a.address.as_ref()?.as_sockaddr_in()?.ip();
        let mask = a.netmask.as_ref()?.as_sockaddr_in()?.ip();
        Some(V4 {
            iface: a.interface_name,
            ip,
            mask,
        })
    })
    .collect()
}

fn sysctl(iface: &str, key: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{iface}/{key}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What is missing on `ifaces` (interfaces that share a subnet), one line
/// per setting with the command that fixes it.
pub fn missing_settings(ifaces: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let all = |key| sysctl("all", key).unwrap_or(0);
    for iface in ifaces {
        // The kernel uses the larger of `all` and the interface's value
        // for these three (rp_filter: max as well).
        let ignore = all("arp_ignore").max(sysctl(iface, "arp_ignore").unwrap_or(0));
        if ignore < 1 {
            out.push(format!(
                "{iface}: arp_ignore={ignore}: it answers ARP for the other interfaces' addresses \
                 (sysctl -w net.ipv4.conf.{iface}.arp_ignore=1)"
            ));
        }
        let announce = all("arp_announce").max(sysctl(iface, "arp_announce").unwrap_or(0));
        if announce < 2 {
            out.push(format!(
                "{iface}: arp_announce={announce}: its ARP requests may carry another interface's \
                 address (sysctl -w net.ipv4.conf.{iface}.arp_announce=2)"
            ));
        }
        let rp = all("rp_filter").max(sysctl(iface, "rp_filter").unwrap_or(0));
        if rp == 1 {
            out.push(format!(
                "{iface}: rp_filter=1 (strict) drops replies that arrive on it while the route \
                 to the target points at another interface (sysctl -w net.ipv4.conf.all.rp_filter=2 \
                 and net.ipv4.conf.{iface}.rp_filter=2)"
            ));
        }
    }
    out
}

/// The interfaces of `bindings` that share an IPv4 subnet with another
/// bound interface (an interface named, or the owner of the source address).
pub fn shared_subnet_ifaces(bindings: &[PortBinding]) -> Vec<String> {
    let addrs = v4_addresses();
    let iface_of = |b: &PortBinding| -> Option<String> {
        b.iface.clone().or_else(|| {
            let IpAddr::V4(src) = b.source? else {
                return None;
            };
            addrs.iter().find(|a| a.ip == src).map(|a| a.iface.clone())
        })
    };
    let mut ifaces: Vec<String> = bindings.iter().filter_map(iface_of).collect();
    ifaces.sort();
    ifaces.dedup();
    let nets = |iface: &str| -> Vec<(u32, u32)> {
        addrs
            .iter()
            .filter(|a| a.iface == iface)
            .map(|a| (u32::from(a.ip) & u32::from(a.mask), u32::from(a.mask)))
            .collect()
    };
    ifaces
        .iter()
        .filter(|i| {
            let mine = nets(i);
            ifaces
                .iter()
                .any(|o| o != *i && nets(o).iter().any(|n| mine.contains(n)))
        })
        .cloned()
        .collect()
}

/// Warns on stderr when bound interfaces share a subnet and the host
/// settings that keep each path on its own interface are missing.
pub fn warn_host_setup(bindings: &[PortBinding]) {
    let shared = shared_subnet_ifaces(bindings);
    if shared.is_empty() {
        return;
    }
    let missing = missing_settings(&shared);
    if missing.is_empty() {
        return;
    }
    eprintln!(
        "warning: the bound interfaces {} share a subnet, and this host is not set up for port \
         binding (replies may come back through the wrong interface; see docs/multipath.md, \
         \"Port binding\", or run scripts/check-port-binding.sh {}):",
        shared.join(", "),
        shared.join(" ")
    );
    for m in missing {
        eprintln!("warning:   {m}");
    }
}
