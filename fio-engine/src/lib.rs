//! A fio external ioengine over the iscsi-bypass library.
//!
//! ```text
//! fio --ioengine=external:libfio_iscsi_bypass.so \
//!     --filename='iscsi\://127.0.0.1\:3260/iqn.2003-01.org.example\:disk/0' ...
//! ```
//!
//! Three parts:
//! - `src/shim.c`, compiled against the installed fio's own headers, fills
//!   fio's `struct ioengine_ops` and reads fio's structures (options,
//!   files, io_us), handing plain values across;
//! - [`ffi`], the `extern "C"` functions the shim calls (all of this
//!   crate's `unsafe` lives there);
//! - [`config`] (the engine options) and [`engine`] (one multipath device
//!   and one `IoQueue` per fio file, staged submissions, completions),
//!   safe Rust, unit-tested without fio.
//!
//! docs/fio.md has the options, the build and fio's client/server mode.
#![deny(unsafe_code)]

pub mod config;
pub mod engine;
pub mod ffi;
