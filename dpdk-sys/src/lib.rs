//! Raw DPDK bindings (filled in by the dpdk-sys work).
