//! iSCSI (RFC 7143): login with negotiation and CHAP, the full-feature
//! connection state machine, sessions, discovery. Sans-IO: the state machines
//! take bytes and `now`, and give bytes, events and deadlines back; drivers in
//! [`session`] move the bytes over a [`crate::transport::Transport`].

pub mod chap;
pub mod connection;
pub mod discovery;
pub mod login;
pub mod mcs;
pub mod params;
pub mod redirect;
pub mod session;
pub mod url;
pub mod window;
