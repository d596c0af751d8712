//! Byte views of every wire format the initiator touches. Pure parse/emit:
//! no I/O, and no panic on any input once a view has been checked.

pub mod arp;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod iscsi;
pub mod packet;
pub mod scsi;
pub mod tcp;
pub mod text;
