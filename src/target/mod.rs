//! target layer.
#![deny(unsafe_code)]
