//! Worker layer: per-path poll-mode workers, the lock-free rings between
//! them and the application, and the application-facing multipath device.
#![deny(unsafe_code)]

pub mod ring;
mod sync;
