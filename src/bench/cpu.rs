//! CPU time of the initiator's own threads, from the kernel's per-thread
//! scheduler statistics (nanoseconds on CPU, no sampling). Threads of the
//! embedded target are named `iscsi-tgt-*` and left out, so a run against the
//! in-process target still reports the initiator's cost alone.

use std::fs;

/// Prefix of thread names that are not the initiator's.
pub const EXCLUDED_THREAD_PREFIX: &str = "iscsi-tgt-";

/// Total on-CPU nanoseconds of this process's threads, except the target's.
pub fn initiator_cpu_ns() -> u64 {
    initiator_threads().map(|(_, ns)| ns).sum::<u64>() + exited_threads_ns()
}

/// The live threads counted as the initiator's: (thread id, on-CPU ns).
fn initiator_threads() -> impl Iterator<Item = (u32, u64)> {
    fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let tid = entry.file_name().to_str()?.parse().ok()?;
            let comm = fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim_end().starts_with(EXCLUDED_THREAD_PREFIX) {
                return None;
            }
            Some((tid, thread_cpu_ns(&path.join("schedstat"))))
        })
}

fn thread_cpu_ns(path: &std::path::Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU of threads that already exited is not in /proc/self/task; job threads
/// add their own total here before they end.
static EXITED_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn exited_threads_ns() -> u64 {
    EXITED_NS.load(std::sync::atomic::Ordering::Relaxed)
}

/// On-CPU nanoseconds of the calling thread.
pub fn current_thread_cpu_ns() -> u64 {
    thread_cpu_ns(std::path::Path::new("/proc/thread-self/schedstat"))
}

/// Called by a short-lived initiator thread just before it returns.
pub fn account_exiting_thread() {
    EXITED_NS.fetch_add(
        current_thread_cpu_ns(),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// User and system CPU time and context switches of the calling thread
/// (`getrusage(RUSAGE_THREAD)`, what fio reads for `usr_cpu`, `sys_cpu`
/// and `ctx`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadUsage {
    pub usr_ns: u64,
    pub sys_ns: u64,
    /// Voluntary plus involuntary context switches.
    pub ctx: u64,
}

impl ThreadUsage {
    /// The calling thread's usage so far (zeros if the kernel says no).
    pub fn now() -> ThreadUsage {
        use nix::sys::resource::{getrusage, UsageWho};
        let Ok(u) = getrusage(UsageWho::RUSAGE_THREAD) else {
            return ThreadUsage::default();
        };
        let ns = |t: nix::sys::time::TimeVal| {
            (t.tv_sec().max(0) as u64) * 1_000_000_000 + (t.tv_usec().max(0) as u64) * 1000
        };
        ThreadUsage {
            usr_ns: ns(u.user_time()),
            sys_ns: ns(u.system_time()),
            ctx: (u.voluntary_context_switches().max(0) + u.involuntary_context_switches().max(0))
                as u64,
        }
    }

    /// What was used between `earlier` and `self`.
    pub fn since(self, earlier: ThreadUsage) -> ThreadUsage {
        ThreadUsage {
            usr_ns: self.usr_ns.saturating_sub(earlier.usr_ns),
            sys_ns: self.sys_ns.saturating_sub(earlier.sys_ns),
            ctx: self.ctx.saturating_sub(earlier.ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_thread_cpu_is_counted() {
        let before = initiator_cpu_ns();
        // Spin until this thread itself has used 100 ms of CPU (not wall
        // time, so a loaded machine cannot make the test fail).
        let mine = current_thread_cpu_ns();
        let mut x = 0u64;
        while current_thread_cpu_ns() < mine + 100_000_000 {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let used = initiator_cpu_ns() - before;
        // At least this thread's 100 ms. (No upper bound: other tests run
        // on other threads of this process at the same time.)
        assert!(used >= 100_000_000, "{used}");
    }

    #[test]
    fn thread_usage_counts_this_threads_user_time() {
        let before = ThreadUsage::now();
        let mine = current_thread_cpu_ns();
        let mut x = 0u64;
        while current_thread_cpu_ns() < mine + 50_000_000 {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let used = ThreadUsage::now().since(before);
        // getrusage has tick granularity on some kernels: half of it at
        // least, and all of it as user plus system time.
        assert!(used.usr_ns + used.sys_ns >= 25_000_000, "{used:?}");
        assert!(used.usr_ns > 0, "{used:?}");
    }

    /// The calling thread's id, as /proc/thread-self names it.
    fn current_tid() -> u32 {
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        link.file_name().unwrap().to_str().unwrap().parse().unwrap()
    }

    #[test]
    fn target_threads_are_left_out() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::Builder::new()
            .name("iscsi-tgt-spin".into())
            .spawn(move || {
                let start = current_thread_cpu_ns();
                while current_thread_cpu_ns() < start + 50_000_000 {
                    std::hint::black_box(0u64);
                }
                tx.send((current_thread_cpu_ns(), current_tid())).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        let (spun, spinner_tid) = rx.recv().unwrap();
        assert!(spun >= 50_000_000);
        // The spinning thread is alive and named iscsi-tgt-*: the initiator's
        // threads leave it out and keep this one. (Comparing CPU sums raced
        // with the other tests' threads starting and ending in between.)
        assert!(
            std::path::Path::new(&format!("/proc/self/task/{spinner_tid}")).exists(),
            "the spinning thread {spinner_tid} is not listed"
        );
        let counted: Vec<(u32, u64)> = initiator_threads().collect();
        let me = current_tid();
        assert!(
            counted.iter().all(|&(tid, _)| tid != spinner_tid),
            "the iscsi-tgt-spin thread {spinner_tid} is counted: {counted:?}"
        );
        assert!(
            counted.iter().any(|&(tid, ns)| tid == me && ns > 0),
            "the test's own thread {me} is not counted: {counted:?}"
        );
        stop_tx.send(()).unwrap();
        h.join().unwrap();
    }
}
