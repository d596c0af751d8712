//! transport layer.
#![deny(unsafe_code)]
