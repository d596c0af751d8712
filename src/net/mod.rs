//! net layer.
#![deny(unsafe_code)]
