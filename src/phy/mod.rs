//! Packet devices: the DPDK port/queue wrapper (the only place outside dpdk-sys
//! with `unsafe`) and an in-memory simulated link for deterministic tests.
