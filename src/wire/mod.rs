//! Byte views of every wire format the initiator touches. Pure parse/emit:
//! no I/O, and no panic on any input once a view has been checked.
#![deny(unsafe_code)]

pub mod iscsi;
pub mod scsi;
pub mod text;
