//! worker layer.
#![deny(unsafe_code)]
