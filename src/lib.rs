//! iscsi-bypass: a kernel-bypass, multipath iSCSI initiator.
//!
//! Layer order (a layer never reaches up):
//! `wire` ← `net` ← `phy`/`transport` ← `iscsi` ← `scsi` ← `multipath` ← `worker` ← `bench`/CLI.
//! See `shared/DESIGN.md` in the steering repository for the architecture.

pub mod bench;
pub mod iscsi;
pub mod multipath;
pub mod nbd;
pub mod net;
pub mod phy;
pub mod scsi;
pub mod target;
pub mod transport;
pub mod wire;
pub mod worker;
