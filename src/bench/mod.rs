//! bench layer.
#![deny(unsafe_code)]
