//! multipath layer.
#![deny(unsafe_code)]
