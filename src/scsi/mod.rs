//! scsi layer.
#![deny(unsafe_code)]
