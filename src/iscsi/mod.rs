//! iscsi layer.
#![deny(unsafe_code)]
