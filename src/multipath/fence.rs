//! Fencing a failed path's session through another portal of the same
//! target portal group (RFC 7143 §6.3.5, session reinstatement).
//!
//! A path's session is its I_T nexus: (InitiatorName + ISID, TargetName +
//! TargetPortalGroupTag). A login with the same InitiatorName and ISID and
//! TSIH 0 *at any portal of the same portal group* makes the target end the
//! old session and all its tasks. So when path B fails with writes in its
//! session, another path A that is up and reaches a portal with B's
//! TargetPortalGroupTag logs in once with B's ISID (the *fence login*) and
//! logs that session out again. As soon as the fence login succeeds, B's
//! old session can no longer run anything, and the writes it held may go
//! out on the live paths, without waiting for B's own portal to return.
//!
//! The [`FenceBoard`] is the device-wide list of fences wanted: the failed
//! path's worker posts one ([`FenceBoard::post`]), a live worker of the
//! same portal group claims it ([`FenceBoard::claim`]), runs the login off
//! its poll loop with its own connector, and reports back
//! ([`FenceBoard::finish`]). The board is plain logic: no threads, no I/O.
//!
//! # Epochs
//! Each path counts its sessions ([`PathShared::begin_session`]) and keeps
//! the newest epoch known ended ([`PathShared::fenced_through`]). A
//! successful login of the path with its ISID ends every session of the
//! path established before the login started; a fence login is started
//! only after the failure it fences was seen, so it ends the failed epoch
//! (and no later one is counted as ended: if the fence login also ends a
//! newer session the path logged in meanwhile, that session fails, and its
//! writes wait for a fence of their own). A write sent in epoch `e` may be
//! retried elsewhere once `fenced_through >= e`.
//!
//! [`PathShared::begin_session`]: super::PathShared::begin_session
//! [`PathShared::fenced_through`]: super::PathShared::fenced_through

use crate::iscsi::login::LoginConfig;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;

/// After a fence login failed, the same need is tried again (by any live
/// path of the group) no sooner than this, doubled after each further
/// failure up to [`FENCE_RETRY_MAX`].
pub const FENCE_RETRY: Duration = Duration::from_millis(100);
/// The longest pause between fence attempts for one need.
pub const FENCE_RETRY_MAX: Duration = Duration::from_millis(3200);

/// A fence wanted: path `path`'s session `epoch` (and those before it) must
/// end.
#[derive(Debug, Clone)]
pub struct FenceNeed {
    /// The failed path's index.
    pub path: usize,
    /// The failed session's epoch.
    pub epoch: u64,
    /// The TargetPortalGroupTag the failed session had (from its login
    /// response): only a portal of this group can end it.
    pub tpgt: u16,
    /// The failed path's login (its InitiatorName, ISID, TargetName, CHAP).
    pub login: LoginConfig,
    /// The failed path's reservation key, when the device fences by
    /// reservation ([`ReservationFence`]): a live path of another portal
    /// group may then preempt it (PREEMPT AND ABORT) when no live path of
    /// the failed session's group is left to log in with its ISID.
    pub pr_key: Option<u64>,
}

/// The reservation fence step (opt-in, `DeviceConfig::reservation_fence`).
/// Every path registers its own key (`base_key + index`) at each login,
/// under a Write Exclusive – Registrants Only reservation the device takes
/// if the LU has none. A path that failed with writes, whose portal group
/// has no live path left (so no session reinstatement can end its session),
/// is fenced by a live path of another group with PERSISTENT RESERVE OUT,
/// PREEMPT AND ABORT of its key: the target aborts the failed nexus's
/// tasks, and, its key gone, refuses any write of it that arrives later
/// (RESERVATION CONFLICT). The failed path registers again at its next
/// login. Other initiators sharing the LU must register too, or they can
/// no longer write (that is what Registrants Only means), so this is off
/// by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationFence {
    /// Path `i` registers key `base_key + i` (wrapping; a key of 0 is
    /// skipped to 1, as 0 means "no key").
    pub base_key: u64,
}

impl ReservationFence {
    /// The key of path `index`.
    pub fn key_of(&self, index: usize) -> u64 {
        match self.base_key.wrapping_add(index as u64) {
            0 => 1,
            k => k,
        }
    }
}

/// A claimed fence, to run and hand back with [`FenceBoard::finish`].
#[derive(Debug, Clone)]
pub struct FenceJob {
    /// What to fence.
    pub need: FenceNeed,
    /// The path that runs the fence login.
    pub fencer: usize,
}

#[derive(Debug)]
struct Entry {
    need: FenceNeed,
    claimed_by: Option<usize>,
    not_before: Option<Instant>,
    attempts: u32,
    /// When a claim first looked at this need (about when it was posted:
    /// every live path looks each round while a need is on the board).
    seen: Option<Instant>,
    /// Claimed by [`FenceBoard::claim_preempt`]: a PREEMPT AND ABORT of
    /// the path's key is in flight.
    preempting: bool,
}

/// The device-wide list of fences wanted (see the module docs).
#[derive(Debug, Default)]
pub struct FenceBoard {
    entries: Mutex<Vec<Entry>>,
    /// Entries on the board (read on every worker round without the lock).
    pending: AtomicUsize,
    /// Paths that logged in again and register their reservation key now
    /// ([`FenceBoard::hold_preempts`]): no PREEMPT AND ABORT of their keys
    /// is claimed. Locked after `entries`, never before.
    registering: Mutex<Vec<usize>>,
    /// PREEMPT AND ABORTs whose answer was lost with their fencer's
    /// session ([`FenceBoard::preempt_in_doubt`]): they may still run.
    in_doubt: Mutex<Vec<InDoubtPreempt>>,
}

/// A PREEMPT AND ABORT of path `victim`'s key that this device sent and
/// whose answer never came (its fencer's session failed first). The
/// fencer's bytes may still reach the target (a hung portal that resumes)
/// and run it later, after the victim logged in again and registered its
/// key once more: that registration is then removed (a *stray preempt*),
/// and the victim's new session gets RESERVATION CONFLICT.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InDoubtPreempt {
    victim: usize,
    /// The session of the victim the preempt was to fence.
    victim_epoch: u64,
    key: u64,
    fencer: usize,
    /// The fencer's session that carried the preempt.
    fencer_epoch: u64,
}

/// Why a fence login did not end the failed session.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FenceError {
    /// The fencer's connector could not open a stream to its portal.
    #[error("connect: {0}")]
    Connect(String),
    /// The login with the failed path's ISID failed.
    #[error("login: {0}")]
    Login(String),
    /// The LOGICAL UNIT RESET of the last-resort step got a TMF response
    /// other than "function complete".
    #[error("LOGICAL UNIT RESET: task management response {0}")]
    LunReset(u8),
    /// The LOGICAL UNIT RESET was not answered in time.
    #[error("LOGICAL UNIT RESET unanswered within {0:?}")]
    LunResetUnanswered(Duration),
    /// PREEMPT AND ABORT of the failed path's key did not complete with
    /// GOOD status.
    #[error("PREEMPT AND ABORT: {0}")]
    Preempt(crate::scsi::ScsiError),
    /// PREEMPT AND ABORT got an iSCSI response other than "command
    /// completed at target".
    #[error("PREEMPT AND ABORT: iSCSI response {0:#04x}")]
    PreemptResponse(u8),
    /// MC/S: the Logout (reason 1, close the connection) of the failed
    /// connection, sent on a live connection of its session, got a response
    /// other than 0 (closed) or 1 (no such connection: already gone).
    #[error("logout of the failed connection: response {0}")]
    ConnectionLogout(u8),
    /// MC/S: that Logout was not answered in time.
    #[error("logout of the failed connection unanswered within {0:?}")]
    ConnectionLogoutUnanswered(Duration),
    /// The fencer's session ended before its PREEMPT AND ABORT or LOGICAL
    /// UNIT RESET was answered (or could not take it).
    #[error("the fencing path failed before the answer")]
    FencerFailed,
    /// The fencer's portal answered with another portal group than the
    /// failed session's: that login did not end the failed session.
    #[error("portal group {got:?} answered, the failed session was in {want}")]
    OtherPortalGroup {
        /// The failed session's TargetPortalGroupTag.
        want: u16,
        /// What the fence login's response said (None: nothing).
        got: Option<u16>,
    },
}

/// Claims for `fencer` the first entry that `due` accepts, counting the
/// attempt: the one way every fence step takes a need off the board.
fn claim_first(
    entries: &mut [Entry],
    fencer: usize,
    due: impl Fn(&Entry) -> bool,
) -> Option<FenceJob> {
    let x = entries.iter_mut().find(|x| due(x))?;
    x.claimed_by = Some(fencer);
    x.attempts += 1;
    Some(FenceJob {
        need: x.need.clone(),
        fencer,
    })
}

impl FenceBoard {
    /// An empty board.
    pub fn new() -> FenceBoard {
        FenceBoard::default()
    }

    /// Whether any fence is wanted (cheap: an atomic load).
    pub fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// Fences wanted now.
    pub fn len(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Whether no fence is wanted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Path `need.path` failed with writes in session `need.epoch`. A need
    /// of the same path for an older epoch is replaced (fencing the newer
    /// session ends the older ones too).
    pub fn post(&self, need: FenceNeed) {
        let Ok(mut e) = self.entries.lock() else {
            return;
        };
        if let Some(old) = e.iter_mut().find(|x| x.need.path == need.path) {
            if old.need.epoch < need.epoch {
                old.need = need;
                old.attempts = 0;
                old.not_before = None;
            }
        } else {
            e.push(Entry {
                need,
                claimed_by: None,
                not_before: None,
                attempts: 0,
                seen: None,
                preempting: false,
            });
        }
        self.pending.store(e.len(), Ordering::Release);
    }

    /// A live path `fencer`, whose current session is in portal group
    /// `fencer_tpgt`, asks for work: the oldest unclaimed need of another
    /// path in the same group that is due and not already fenced
    /// (`fenced_through(path) >= epoch`: those are dropped).
    pub fn claim(
        &self,
        fencer: usize,
        fencer_tpgt: u16,
        now: Instant,
        fenced_through: impl Fn(usize) -> u64,
    ) -> Option<FenceJob> {
        let mut e = self.entries.lock().ok()?;
        e.retain(|x| x.claimed_by.is_some() || fenced_through(x.need.path) < x.need.epoch);
        let job = claim_first(&mut e, fencer, |x| {
            x.claimed_by.is_none()
                && x.need.path != fencer
                && x.need.tpgt == fencer_tpgt
                && x.not_before.is_none_or(|t| now >= t)
        });
        self.pending.store(e.len(), Ordering::Release);
        job
    }

    /// MC/S: a live connection `fencer` of session `tsih` asks for a need
    /// of another connection of that session (`need.login.tsih == tsih`,
    /// `need.login.cid` its CID), due and not fenced yet. The fencer then
    /// sends a Logout with reason 1 (close the connection) for that CID on
    /// its own connection: the target ends the connection and its tasks
    /// (RFC 7143 §11.14) before it answers. Reports with
    /// [`finish`](Self::finish).
    pub fn claim_connection(
        &self,
        fencer: usize,
        tsih: u16,
        now: Instant,
        fenced_through: impl Fn(usize) -> u64,
    ) -> Option<FenceJob> {
        if tsih == 0 {
            return None;
        }
        let mut e = self.entries.lock().ok()?;
        e.retain(|x| x.claimed_by.is_some() || fenced_through(x.need.path) < x.need.epoch);
        let job = claim_first(&mut e, fencer, |x| {
            x.claimed_by.is_none()
                && x.need.path != fencer
                && x.need.login.tsih == tsih
                && x.not_before.is_none_or(|t| now >= t)
        });
        self.pending.store(e.len(), Ordering::Release);
        job
    }

    /// The reservation fence step: a live path `fencer` asks for a need of
    /// another path that has a reservation key, is due, not fenced yet,
    /// and whose portal group has no live path left
    /// (`group_has_live_path(tpgt, failed path)` is false), so that no
    /// login with its ISID can end its session. The fencer then sends
    /// PREEMPT AND ABORT of the need's key on its own session and reports
    /// with [`finish`](Self::finish).
    pub fn claim_preempt(
        &self,
        fencer: usize,
        now: Instant,
        fenced_through: impl Fn(usize) -> u64,
        group_has_live_path: impl Fn(u16, usize) -> bool,
    ) -> Option<FenceJob> {
        let mut e = self.entries.lock().ok()?;
        let registering = self.registering.lock().ok()?;
        e.retain(|x| x.claimed_by.is_some() || fenced_through(x.need.path) < x.need.epoch);
        let job = claim_first(&mut e, fencer, |x| {
            x.claimed_by.is_none()
                && x.need.path != fencer
                && x.need.pr_key.is_some()
                && x.not_before.is_none_or(|t| now >= t)
                && !registering.contains(&x.need.path)
                && !group_has_live_path(x.need.tpgt, x.need.path)
        });
        if let Some(j) = &job {
            if let Some(x) = e.iter_mut().find(|x| x.need.path == j.need.path) {
                x.preempting = true;
            }
        }
        self.pending.store(e.len(), Ordering::Release);
        job
    }

    /// The last-resort step (opt-in, `DeviceConfig::lun_reset_fence`): a
    /// live path `fencer` asks for a need that no other step has fenced
    /// within `after` of being seen on the board; it then sends LOGICAL
    /// UNIT RESET and reports with [`finish`](Self::finish).
    pub fn claim_lun_reset(
        &self,
        fencer: usize,
        now: Instant,
        after: Duration,
        fenced_through: impl Fn(usize) -> u64,
    ) -> Option<FenceJob> {
        let mut e = self.entries.lock().ok()?;
        e.retain(|x| x.claimed_by.is_some() || fenced_through(x.need.path) < x.need.epoch);
        for x in e.iter_mut() {
            x.seen.get_or_insert(now);
        }
        let job = claim_first(&mut e, fencer, |x| {
            let seen = x.seen.unwrap_or(now);
            x.claimed_by.is_none()
                && x.need.path != fencer
                && now.saturating_duration_since(seen) >= after
                && x.not_before.is_none_or(|t| now >= t)
        });
        self.pending.store(e.len(), Ordering::Release);
        job
    }

    /// The fence login of `job` ended (`Ok`: the failed session is gone,
    /// and the caller has moved the path's `fenced_through`). A failed one
    /// goes back on the board, due again after [`FENCE_RETRY`] (doubling
    /// with each failed attempt). Returns how many attempts the need has had.
    pub fn finish(&self, job: &FenceJob, result: &Result<(), FenceError>, now: Instant) -> u32 {
        let Ok(mut e) = self.entries.lock() else {
            return 0;
        };
        let mut attempts = 0;
        if let Some(i) = e
            .iter()
            .position(|x| x.need.path == job.need.path && x.claimed_by == Some(job.fencer))
        {
            attempts = e[i].attempts;
            e[i].preempting = false;
            let newer = e[i].need.epoch > job.need.epoch;
            if result.is_ok() && !newer {
                e.remove(i);
            } else {
                e[i].claimed_by = None;
                let pause = FENCE_RETRY
                    .saturating_mul(1 << attempts.saturating_sub(1).min(5))
                    .min(FENCE_RETRY_MAX);
                e[i].not_before = result.is_err().then(|| now + pause);
            }
        }
        self.pending.store(e.len(), Ordering::Release);
        attempts
    }

    /// Path `path` logged in again and is about to register its reservation
    /// key (the reservation fence step) on the new session. Its new login
    /// ended its failed session, so from now until
    /// [`release_preempts`](Self::release_preempts) no PREEMPT AND ABORT of
    /// its key is claimed. Returns true while one claimed before is still
    /// in flight: the path must not register yet (the target would remove
    /// the new registration when it runs the preempt, and the path would
    /// get RESERVATION CONFLICT until its next login) and asks again.
    pub fn hold_preempts(&self, path: usize) -> bool {
        let Ok(e) = self.entries.lock() else {
            return false;
        };
        if let Ok(mut r) = self.registering.lock() {
            if !r.contains(&path) {
                r.push(path);
            }
        }
        e.iter().any(|x| x.need.path == path && x.preempting)
    }

    /// Whether a login of path `path` holds off preempts of its key
    /// ([`hold_preempts`](Self::hold_preempts)) now.
    pub fn holds_preempts(&self, path: usize) -> bool {
        self.registering
            .lock()
            .map(|r| r.contains(&path))
            .unwrap_or(false)
    }

    /// The login of path `path` that called
    /// [`hold_preempts`](Self::hold_preempts) ended (installed, or failed):
    /// its needs may be preempted again.
    pub fn release_preempts(&self, path: usize) {
        let Ok(_e) = self.entries.lock() else {
            return;
        };
        if let Ok(mut r) = self.registering.lock() {
            r.retain(|&p| p != path);
        }
    }

    /// The PREEMPT AND ABORT of `job` (the victim's key `key`) went out on
    /// session `fencer_epoch` of the fencer, which failed before the answer
    /// came: the preempt may still run at the target, later. Recorded, so
    /// that a RESERVATION CONFLICT it causes on the victim's newer session
    /// is known for a stray preempt of our own
    /// ([`take_stray_preempt`](Self::take_stray_preempt)).
    pub fn preempt_in_doubt(&self, job: &FenceJob, key: u64, fencer_epoch: u64) {
        let Ok(mut d) = self.in_doubt.lock() else {
            return;
        };
        let x = InDoubtPreempt {
            victim: job.need.path,
            victim_epoch: job.need.epoch,
            key,
            fencer: job.fencer,
            fencer_epoch,
        };
        if !d.contains(&x) {
            d.push(x);
        }
    }

    /// Path `path`, in its live session `epoch` with key `key` registered,
    /// got RESERVATION CONFLICT. True when a preempt of our own in doubt
    /// explains it: one of that key that fenced an *older* session of the
    /// path (so `epoch`'s own login has ended that session already, and
    /// registering again cannot let it write) — the record is taken, and
    /// the path may register again and resend. False: someone else (another
    /// host) removed the registration, and the conflict is real.
    pub fn take_stray_preempt(&self, path: usize, epoch: u64, key: u64) -> bool {
        let Ok(mut d) = self.in_doubt.lock() else {
            return false;
        };
        let Some(i) = d
            .iter()
            .position(|x| x.victim == path && x.key == key && x.victim_epoch < epoch)
        else {
            return false;
        };
        d.remove(i);
        true
    }

    /// Path `path` is about to register its key: preempts in doubt whose
    /// fencer's session is already known ended (`fenced_through(fencer) >=
    /// its epoch`) can no longer run, so they cannot remove this
    /// registration or a later one: dropped.
    pub fn settle_stray_preempts(&self, path: usize, fenced_through: impl Fn(usize) -> u64) {
        if let Ok(mut d) = self.in_doubt.lock() {
            d.retain(|x| x.victim != path || fenced_through(x.fencer) < x.fencer_epoch);
        }
    }

    /// Preempts of path `path`'s key in doubt (see
    /// [`preempt_in_doubt`](Self::preempt_in_doubt)).
    pub fn preempts_in_doubt(&self, path: usize) -> usize {
        self.in_doubt
            .lock()
            .map(|d| d.iter().filter(|x| x.victim == path).count())
            .unwrap_or(0)
    }

    /// Path `path` logged in again by itself (its own login ended the failed
    /// session): nothing left to fence for it up to `epoch`.
    pub fn fenced(&self, path: usize, epoch: u64) {
        let Ok(mut e) = self.entries.lock() else {
            return;
        };
        e.retain(|x| !(x.need.path == path && x.need.epoch <= epoch && x.claimed_by.is_none()));
        self.pending.store(e.len(), Ordering::Release);
    }
}

/// ABORT TASK of commands overdue on a path that still answers (the first
/// fence step: the target confirms that the command will not run, so it may
/// go to another path at once, without failing the path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortPolicy {
    /// A command unanswered this long on a live path gets ABORT TASK. Keep
    /// it below the session's `command_timeout`, which fails the path. (A
    /// path that went silent is failed by the pings; an ABORT TASK sent to
    /// it goes unanswered and fails it after `answer_within`.)
    pub after: Duration,
    /// The ABORT TASK must be answered within this; otherwise (or when the
    /// target refuses it) the path fails, and the write waits for the next
    /// fence steps.
    pub answer_within: Duration,
}

impl AbortPolicy {
    /// How long a command that was aborted `aborts` times already may stay
    /// unanswered before it is aborted again: `after`, doubled for each
    /// (a target that stays slow would otherwise get the command aborted
    /// and retried for ever; the dispatcher fails it after
    /// `dispatch::MAX_ABORTS`).
    pub fn after_for(&self, aborts: u32) -> Duration {
        self.after.saturating_mul(1 << aborts.min(16))
    }
}

impl Default for AbortPolicy {
    /// 10 s, answered within 3 s (the device's default command timeout is
    /// 20 s).
    fn default() -> AbortPolicy {
        AbortPolicy {
            after: Duration::from_secs(10),
            answer_within: Duration::from_secs(3),
        }
    }
}

/// TMF response "function complete" (RFC 7143 §11.6.1).
pub const TMF_FUNCTION_COMPLETE: u8 = 0;
/// TMF response "task does not exist": already answered (so not running).
pub const TMF_TASK_DOES_NOT_EXIST: u8 = 1;

/// Why an ABORT TASK did not confirm that its command is gone (the path is
/// then failed and fenced by the next steps).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AbortError {
    /// The target answered with another TMF response than "function
    /// complete" or "task does not exist".
    #[error("the target refused ABORT TASK (task management response {response})")]
    Refused {
        /// The TMF response code.
        response: u8,
    },
    /// No answer within [`AbortPolicy::answer_within`].
    #[error("ABORT TASK unanswered within {0:?}")]
    Unanswered(Duration),
}

/// The ABORT TASKs of one session (sans-IO): which overdue commands to
/// abort, which aborts are out, and what their answers mean.
#[derive(Debug)]
pub struct TaskAborts {
    policy: AbortPolicy,
    /// Tags of our TMFs are `tag_base | n`.
    tag_base: u64,
    next: u64,
    /// (TMF tag, command tag, sent at).
    out: Vec<(u64, u64, Instant)>,
    next_check: Instant,
    /// ABORT TASKs the target confirmed.
    pub confirmed: u64,
}

impl TaskAborts {
    /// For a session that began at `now`; TMF tags are `tag_base | n`
    /// (`tag_base` must leave the low 32 bits free).
    pub fn new(policy: AbortPolicy, tag_base: u64, now: Instant) -> TaskAborts {
        TaskAborts {
            policy,
            tag_base,
            next: 0,
            out: Vec::new(),
            next_check: now,
            confirmed: 0,
        }
    }

    /// The policy.
    pub fn policy(&self) -> AbortPolicy {
        self.policy
    }

    /// Whether `tag` is one of ours.
    pub fn is_ours(&self, tag: u64) -> bool {
        tag & !0xffff_ffff == self.tag_base
    }

    /// One poll round: Err when an ABORT TASK went unanswered too long.
    pub fn on_round(&self, now: Instant) -> Result<(), AbortError> {
        let within = self.policy.answer_within;
        if self
            .out
            .iter()
            .any(|(_, _, at)| now.saturating_duration_since(*at) >= within)
        {
            return Err(AbortError::Unanswered(within));
        }
        Ok(())
    }

    /// Whether to look for overdue commands now: a quarter of `after` since
    /// the last look.
    pub fn check_due(&mut self, now: Instant) -> bool {
        if now < self.next_check {
            return false;
        }
        self.next_check = now + (self.policy.after / 4).max(Duration::from_millis(1));
        true
    }

    /// The commands due for ABORT TASK: unanswered for `after_for(n)`, where
    /// `n` is how often the command was aborted before (`aborts_of(tag)`;
    /// None: not a command to abort, such as the path's own). `overdue_for`
    /// lists the tags of the commands unanswered for at least an age
    /// (`Connection::overdue_commands`); it is asked once per abort count
    /// present.
    pub fn overdue(
        &self,
        overdue_for: impl Fn(Duration) -> Vec<u64>,
        aborts_of: impl Fn(u64) -> Option<u32>,
    ) -> Vec<u64> {
        let mut due = overdue_for(self.policy.after);
        let mut levels: Vec<(u32, Vec<u64>)> = Vec::new();
        due.retain(|&tag| match aborts_of(tag) {
            None => false,
            Some(0) => true,
            Some(n) => {
                let i = match levels.iter().position(|(k, _)| *k == n) {
                    Some(i) => i,
                    None => {
                        levels.push((n, overdue_for(self.policy.after_for(n))));
                        levels.len() - 1
                    }
                };
                levels[i].1.contains(&tag)
            }
        });
        due
    }

    /// Of the `overdue` commands (by tag), those not being aborted yet get
    /// a TMF tag each: send ABORT TASK for every (TMF tag, command tag)
    /// returned ([`forget`](Self::forget) one that could not be sent).
    pub fn start(&mut self, now: Instant, overdue: &[u64]) -> Vec<(u64, u64)> {
        let mut new = Vec::new();
        for &cmd in overdue {
            if self.out.iter().any(|(_, c, _)| *c == cmd) {
                continue;
            }
            self.next = (self.next + 1) & 0xffff_ffff;
            let tmf = self.tag_base | self.next;
            self.out.push((tmf, cmd, now));
            new.push((tmf, cmd));
        }
        new
    }

    /// An ABORT TASK that could not be sent.
    pub fn forget(&mut self, tmf: u64) {
        self.out.retain(|(t, _, _)| *t != tmf);
    }

    /// The answer to TMF `tmf`: None if it is not one of ours; Ok(command
    /// tag) when the target confirmed that the command is gone (take it
    /// back from the connection, if still there, and send it anywhere);
    /// Err when it refused (fail the path).
    pub fn on_response(&mut self, tmf: u64, response: u8) -> Option<Result<u64, AbortError>> {
        let i = self.out.iter().position(|(t, _, _)| *t == tmf)?;
        let (_, cmd, _) = self.out.swap_remove(i);
        Some(match response {
            TMF_FUNCTION_COMPLETE | TMF_TASK_DOES_NOT_EXIST => {
                self.confirmed += 1;
                Ok(cmd)
            }
            response => Err(AbortError::Refused { response }),
        })
    }

    /// ABORT TASKs sent and not answered yet.
    pub fn outstanding(&self) -> usize {
        self.out.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(path: usize, epoch: u64, tpgt: u16) -> FenceNeed {
        FenceNeed {
            path,
            epoch,
            tpgt,
            login: LoginConfig::new("iqn.i", Some("iqn.t")),
            pr_key: None,
        }
    }

    /// The abort back-off: a command aborted n times before is due again
    /// only once unanswered for `after_for(n)` = `after` × 2^n; the path's
    /// own commands (None) never.
    #[test]
    fn overdue_waits_twice_as_long_for_each_abort_before() {
        let policy = AbortPolicy {
            after: Duration::from_secs(2),
            answer_within: Duration::from_secs(1),
        };
        assert_eq!(policy.after_for(0), Duration::from_secs(2));
        assert_eq!(policy.after_for(3), Duration::from_secs(16));
        assert_eq!(policy.after_for(u32::MAX), Duration::from_secs(2 << 16));
        let a = TaskAborts::new(policy, 1 << 40, Instant::now());
        // Tag t has been unanswered for t seconds; tag 100 is internal.
        let tags = [3u64, 5, 9, 17, 100];
        let overdue_for = |age: Duration| -> Vec<u64> {
            tags.iter()
                .copied()
                .filter(|&t| Duration::from_secs(t) >= age)
                .collect()
        };
        // 3 and 5 never aborted, 9 twice (due at 8 s), 17 three times
        // (due at 16 s).
        let aborts = |t: u64| match t {
            100 => None,
            9 => Some(2),
            17 => Some(3),
            _ => Some(0),
        };
        assert_eq!(a.overdue(overdue_for, aborts), vec![3, 5, 9, 17]);
        // Once more each: 9 needs 16 s, 17 needs 32 s.
        let more = |t: u64| aborts(t).map(|n| if n > 0 { n + 1 } else { 0 });
        assert_eq!(a.overdue(overdue_for, more), vec![3, 5]);
    }

    /// A stray preempt: a PREEMPT AND ABORT whose fencer failed before the
    /// answer is in doubt; a conflict on a newer session of its victim is
    /// explained by it once (the record is taken), never on the fenced
    /// session itself or on another path, and a record whose fencer's
    /// session is known ended is settled before the victim registers.
    #[test]
    fn a_preempt_in_doubt_explains_one_conflict_of_a_newer_session_of_its_victim() {
        let b = FenceBoard::new();
        let now = Instant::now();
        let mut n = need(0, 1, 1);
        n.pr_key = Some(0x50);
        b.post(n);
        let job = b
            .claim_preempt(1, now, |_| 0, |_, _| false)
            .expect("claimed");
        b.preempt_in_doubt(&job, 0x50, 4);
        b.finish(&job, &Err(FenceError::FencerFailed), now);
        assert_eq!(b.preempts_in_doubt(0), 1);
        assert!(
            !b.take_stray_preempt(0, 1, 0x50),
            "the fenced session itself"
        );
        assert!(!b.take_stray_preempt(1, 2, 0x50), "another path");
        assert!(!b.take_stray_preempt(0, 2, 0x51), "another key");
        assert!(b.take_stray_preempt(0, 2, 0x50), "path 0's newer session");
        assert!(!b.take_stray_preempt(0, 2, 0x50), "explains one conflict");
        // Settled: the fencer's session 4 is known ended.
        b.preempt_in_doubt(&job, 0x50, 4);
        b.settle_stray_preempts(0, |p| if p == 1 { 3 } else { 0 });
        assert_eq!(
            b.preempts_in_doubt(0),
            1,
            "fencer's session 4 may still run"
        );
        b.settle_stray_preempts(0, |p| if p == 1 { 4 } else { 0 });
        assert_eq!(b.preempts_in_doubt(0), 0);
        assert!(!b.take_stray_preempt(0, 3, 0x50));
    }

    /// MC/S: a connection's need is claimed only by another connection of
    /// its session (same TSIH), never by an MPIO claim or the failed path.
    #[test]
    fn a_connection_need_is_claimed_by_a_live_connection_of_its_session() {
        let b = FenceBoard::new();
        let now = Instant::now();
        let mut n = need(1, 2, 1);
        (n.login.tsih, n.login.cid) = (0x30, 1);
        b.post(n);
        assert!(b.claim_connection(1, 0x30, now, |_| 0).is_none(), "itself");
        assert!(
            b.claim_connection(0, 0x31, now, |_| 0).is_none(),
            "other session"
        );
        assert!(b.claim_connection(0, 0, now, |_| 0).is_none(), "no session");
        let job = b.claim_connection(0, 0x30, now, |_| 0).expect("claimed");
        assert_eq!((job.need.path, job.need.login.cid, job.fencer), (1, 1, 0));
        b.finish(&job, &Ok(()), now);
        assert!(b.is_empty());
        // An MPIO need (TSIH 0 in its login) is never a connection's.
        b.post(need(2, 1, 1));
        assert!(b.claim_connection(0, 0x30, now, |_| 0).is_none());
    }

    /// The LUN reset is claimed for any need, by any live path but the
    /// failed one, only once the need has been on the board for `after`.
    #[test]
    fn a_lun_reset_is_claimed_only_after_the_other_steps_had_their_time() {
        let b = FenceBoard::new();
        let t0 = Instant::now();
        let after = Duration::from_secs(2);
        b.post(need(1, 4, 7));
        assert!(b.claim_lun_reset(0, t0, after, |_| 0).is_none());
        let t1 = t0 + Duration::from_millis(1999);
        assert!(b.claim_lun_reset(0, t1, after, |_| 0).is_none());
        let t2 = t0 + after;
        assert!(
            b.claim_lun_reset(1, t2, after, |_| 0).is_none(),
            "not itself"
        );
        let job = b.claim_lun_reset(0, t2, after, |_| 0).expect("due");
        assert_eq!((job.need.path, job.need.epoch), (1, 4));
        b.finish(&job, &Ok(()), t2);
        assert!(b.is_empty());
    }

    /// A login of a path whose key is being preempted waits for the
    /// preempt's answer before it registers, and from its first look on no
    /// further preempt of that path is claimed until its login ends.
    #[test]
    fn a_relogin_holds_off_preempts_of_its_key_and_waits_for_one_in_flight() {
        let b = FenceBoard::new();
        let t0 = Instant::now();
        let mut keyed = need(2, 3, 7);
        keyed.pr_key = Some(0x52);
        b.post(keyed.clone());
        assert!(!b.hold_preempts(5), "nothing in flight for another path");
        b.release_preempts(5);
        let job = b
            .claim_preempt(0, t0, |_| 0, |_, _| false)
            .expect("claimed");
        assert!(b.hold_preempts(2), "in flight: do not register yet");
        assert!(b.holds_preempts(2));
        // It fails (the fencer's path died): not claimed again meanwhile.
        b.finish(&job, &Err(FenceError::FencerFailed), t0);
        assert!(!b.hold_preempts(2), "answered: register now");
        let later = t0 + Duration::from_secs(10);
        assert!(
            b.claim_preempt(0, later, |_| 0, |_, _| false).is_none(),
            "held by the login"
        );
        b.release_preempts(2);
        assert!(!b.holds_preempts(2));
        let again = b.claim_preempt(0, later, |_| 0, |_, _| false);
        assert!(again.is_some(), "released: claimable again");
    }

    /// The reservation step is claimed only for a need with a key whose
    /// portal group has no live path (else the login fence of that group
    /// is the way), by a live path of any group, and retried like a login.
    #[test]
    fn a_preempt_is_claimed_only_when_no_live_path_of_the_group_is_left() {
        let b = FenceBoard::new();
        let t0 = Instant::now();
        b.post(need(1, 2, 7));
        assert!(
            b.claim_preempt(0, t0, |_| 0, |_, _| false).is_none(),
            "no key: no preempt"
        );
        let mut keyed = need(2, 3, 7);
        keyed.pr_key = Some(0x52);
        b.post(keyed);
        assert!(b.claim_preempt(0, t0, |_| 0, |_, _| true).is_none());
        assert!(b.claim_preempt(2, t0, |_| 0, |_, _| false).is_none());
        let job = b
            .claim_preempt(0, t0, |_| 0, |g, p| !(g == 7 && p == 2))
            .expect("group 7 has no live path but the failed one");
        assert_eq!(
            (job.need.path, job.need.pr_key, job.fencer),
            (2, Some(0x52), 0)
        );
        b.finish(&job, &Err(FenceError::FencerFailed), t0);
        assert!(
            b.claim_preempt(3, t0, |_| 0, |_, _| false).is_none(),
            "paused"
        );
        let again = b
            .claim_preempt(3, t0 + FENCE_RETRY, |_| 0, |_, _| false)
            .expect("due again");
        b.finish(&again, &Ok(()), t0);
        assert_eq!(b.len(), 1, "path 1's need (no key) stays");
        let r = ReservationFence { base_key: u64::MAX };
        assert_eq!((r.key_of(0), r.key_of(1), r.key_of(2)), (u64::MAX, 1, 1));
    }

    #[test]
    fn overdue_commands_of_an_answering_path_are_aborted_once() {
        let p = AbortPolicy {
            after: Duration::from_secs(4),
            answer_within: Duration::from_secs(1),
        };
        let t0 = Instant::now();
        let mut a = TaskAborts::new(p, 7 << 40, t0);
        let t1 = t0 + Duration::from_secs(3);
        a.on_round(t1).unwrap();
        assert!(a.check_due(t1));
        let sent = a.start(t1, &[10, 11]);
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|(t, _)| a.is_ours(*t)));
        assert!(!a.is_ours(10));
        // Not again for the same command, and not before a quarter of `after`.
        assert!(!a.check_due(t1 + Duration::from_millis(500)));
        assert!(a.start(t1, &[10, 11]).is_empty());
        // Confirmed: the command may go elsewhere; refused: fail the path.
        assert_eq!(
            a.on_response(sent[0].0, TMF_FUNCTION_COMPLETE),
            Some(Ok(10))
        );
        assert_eq!(
            a.on_response(sent[1].0, 5),
            Some(Err(AbortError::Refused { response: 5 }))
        );
        assert_eq!(a.on_response(sent[1].0, 0), None, "answered already");
        assert_eq!(a.on_response(12345, 0), None, "not ours");
        assert_eq!(a.confirmed, 1);
        let sent = a.start(t1, &[11]);
        assert_eq!(
            a.on_response(sent[0].0, TMF_TASK_DOES_NOT_EXIST),
            Some(Ok(11))
        );
    }

    #[test]
    fn an_unanswered_abort_fails_the_path() {
        let p = AbortPolicy {
            after: Duration::from_secs(4),
            answer_within: Duration::from_secs(1),
        };
        let t0 = Instant::now();
        let mut a = TaskAborts::new(p, 1 << 40, t0);
        let sent = a.start(t0, &[3]);
        assert_eq!(a.outstanding(), 1);
        a.on_round(t0 + Duration::from_millis(999)).unwrap();
        assert_eq!(
            a.on_round(t0 + Duration::from_secs(1)),
            Err(AbortError::Unanswered(Duration::from_secs(1)))
        );
        a.forget(sent[0].0);
        assert_eq!(a.outstanding(), 0);
        a.on_round(t0 + Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn claimed_by_a_live_path_of_the_same_group_only() {
        let b = FenceBoard::new();
        let t0 = Instant::now();
        assert!(!b.has_pending());
        b.post(need(1, 3, 7));
        assert!(b.has_pending());
        // Not by the failed path itself, not by another portal group.
        assert!(b.claim(1, 7, t0, |_| 0).is_none());
        assert!(b.claim(0, 8, t0, |_| 0).is_none());
        let job = b.claim(0, 7, t0, |_| 0).expect("same group");
        assert_eq!((job.need.path, job.need.epoch, job.fencer), (1, 3, 0));
        // Claimed: nobody else gets it.
        assert!(b.claim(2, 7, t0, |_| 0).is_none());
        assert_eq!(b.finish(&job, &Ok(()), t0), 1);
        assert!(!b.has_pending());
    }

    #[test]
    fn a_failed_fence_is_retried_after_a_pause_by_anyone() {
        let b = FenceBoard::new();
        let t0 = Instant::now();
        b.post(need(1, 3, 7));
        let job = b.claim(0, 7, t0, |_| 0).expect("claim");
        b.finish(&job, &Err(FenceError::Connect("refused".into())), t0);
        assert!(b.claim(2, 7, t0, |_| 0).is_none(), "not at once");
        let again = b.claim(2, 7, t0 + FENCE_RETRY, |_| 0).expect("due again");
        assert_eq!(again.fencer, 2);
        b.finish(&again, &Err(FenceError::Login("x".into())), t0);
        assert!(b.claim(0, 7, t0 + FENCE_RETRY, |_| 0).is_none(), "doubled");
        let third = b
            .claim(0, 7, t0 + 2 * FENCE_RETRY, |_| 0)
            .expect("due after twice the pause");
        assert_eq!(b.finish(&third, &Ok(()), t0), 3);
        assert!(b.is_empty());
    }

    #[test]
    fn needs_already_fenced_are_dropped_and_newer_epochs_replace_older() {
        let b = FenceBoard::new();
        let t0 = Instant::now();
        b.post(need(1, 3, 7));
        b.post(need(1, 5, 7));
        b.post(need(1, 4, 7));
        assert_eq!(b.len(), 1);
        let job = b.claim(0, 7, t0, |_| 0).expect("claim");
        assert_eq!(job.need.epoch, 5);
        b.finish(&job, &Ok(()), t0);
        // The path logged in again by itself: its need goes.
        b.post(need(2, 2, 7));
        assert!(b.claim(0, 7, t0, |p| if p == 2 { 2 } else { 0 }).is_none());
        assert!(b.is_empty());
        b.post(need(3, 2, 7));
        b.fenced(3, 2);
        assert!(b.is_empty());
    }

    #[test]
    fn a_newer_failure_posted_while_fencing_stays_on_the_board() {
        let b = FenceBoard::new();
        let t0 = Instant::now();
        b.post(need(1, 3, 7));
        let job = b.claim(0, 7, t0, |_| 0).expect("claim");
        b.post(need(1, 4, 7));
        b.finish(&job, &Ok(()), t0);
        let next = b
            .claim(0, 7, t0, |p| if p == 1 { 3 } else { 0 })
            .expect("epoch 4");
        assert_eq!(next.need.epoch, 4);
    }
}
