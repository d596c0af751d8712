//! The threads that serve NBD connections: started as clients need them, at
//! most `max` (the export's `max_clients`), and kept, idle, for the next
//! connection until the server stops.
//!
//! A thread per connection, started on accept and ended on close, made the
//! allocator grow: glibc gives each new thread an arena (reusing the one of
//! a thread that has ended, or making a new one when none is free), each
//! arena keeps the free memory below its trim threshold, and with clients
//! connecting several times a second beside the path workers' login threads
//! the arenas passed from thread to thread, each one ending up holding the
//! high-water of whatever ran in it (the soak's export grew by ~58 MB in 30
//! minutes in ~8 MB steps). A fixed set of long-lived threads keeps one
//! arena each, whose free memory the same thread's next connection reuses.

use crossbeam::channel::{unbounded, Receiver, Sender};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Why [`ConnThreads::run`] did not take a job; the job comes back.
#[derive(Debug)]
pub(crate) enum NotRun<J> {
    /// All `max` threads are serving a job.
    Busy(J),
    /// No thread was idle and a new one could not be started.
    Spawn(J, std::io::Error),
}

/// A bounded, growing set of threads running one handler on the jobs given
/// to them, each thread one job at a time (see the module docs).
pub(crate) struct ConnThreads<J: Send + 'static> {
    name: String,
    max: usize,
    handler: Arc<dyn Fn(J) + Send + Sync>,
    tx: Option<Sender<J>>,
    rx: Receiver<J>,
    /// Threads waiting for a job and not yet promised one.
    idle: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl<J: Send + 'static> ConnThreads<J> {
    /// No threads yet; at most `max` (at least 1) will be started, named
    /// `name-1`, `name-2`, …
    pub(crate) fn new(
        name: &str,
        max: usize,
        handler: impl Fn(J) + Send + Sync + 'static,
    ) -> ConnThreads<J> {
        let (tx, rx) = unbounded();
        ConnThreads {
            name: name.to_string(),
            max: max.max(1),
            handler: Arc::new(handler),
            tx: Some(tx),
            rx,
            idle: Arc::new(AtomicUsize::new(0)),
            threads: Vec::new(),
        }
    }

    /// Gives `job` to an idle thread, or to a new one while fewer than
    /// `max` exist.
    pub(crate) fn run(&mut self, job: J) -> Result<(), NotRun<J>> {
        let Some(tx) = self.tx.as_ref() else {
            return Err(NotRun::Busy(job));
        };
        // Promise the job to one idle thread: only this method takes from
        // `idle` and each thread adds to it just before it waits for the
        // next job, so a promised job never waits behind a busy thread.
        let promised = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !promised {
            if self.threads.len() >= self.max {
                return Err(NotRun::Busy(job));
            }
            let (rx, idle, handler) = (self.rx.clone(), self.idle.clone(), self.handler.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{}", self.name, self.threads.len() + 1))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        if catch_unwind(AssertUnwindSafe(|| handler(job))).is_err() {
                            log::error!("a connection thread's job panicked; the thread goes on");
                        }
                        idle.fetch_add(1, Ordering::AcqRel);
                    }
                });
            match spawned {
                Ok(t) => self.threads.push(t),
                Err(e) => return Err(NotRun::Spawn(job, e)),
            }
        }
        // The receiver lives in `self`: sending cannot fail.
        let _ = tx.send(job);
        Ok(())
    }

    /// Threads started so far (they end only in [`join`](Self::join)).
    pub(crate) fn started(&self) -> usize {
        self.threads.len()
    }

    /// Threads serving a job now (or about to take one).
    #[cfg(test)]
    pub(crate) fn busy(&self) -> usize {
        self.threads
            .len()
            .saturating_sub(self.idle.load(Ordering::Acquire))
    }

    /// Lets every thread finish the jobs given to it, then ends them all.
    pub(crate) fn join(mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl<J: Send + 'static> Drop for ConnThreads<J> {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::mpsc;
    use std::sync::Mutex;

    /// A pool whose jobs report the name of the thread that ran them and
    /// then wait until the test lets them go.
    #[allow(clippy::type_complexity)]
    fn pool(
        max: usize,
    ) -> (
        ConnThreads<mpsc::Receiver<()>>,
        mpsc::Receiver<String>,
        Arc<Mutex<HashSet<String>>>,
    ) {
        let (seen_tx, seen_rx) = mpsc::channel();
        let seen_tx = Mutex::new(seen_tx);
        let names = Arc::new(Mutex::new(HashSet::new()));
        let n = names.clone();
        let p = ConnThreads::new("t", max, move |release: mpsc::Receiver<()>| {
            let me = std::thread::current().name().unwrap_or("?").to_string();
            n.lock().unwrap().insert(me.clone());
            seen_tx.lock().unwrap().send(me).unwrap();
            let _ = release.recv();
        });
        (p, seen_rx, names)
    }

    /// Waits until a thread has taken the job and the next one is idle.
    fn settle(p: &ConnThreads<mpsc::Receiver<()>>, busy: usize) {
        for _ in 0..10_000 {
            if p.busy() == busy {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("busy stayed at {} (wanted {busy})", p.busy());
    }

    #[test]
    fn sequential_jobs_are_served_by_one_thread() {
        let (mut p, seen, names) = pool(8);
        for _ in 0..50 {
            let (go, release) = mpsc::channel();
            p.run(release).map_err(|_| "not run").unwrap();
            seen.recv().unwrap();
            go.send(()).unwrap();
            settle(&p, 0);
        }
        assert_eq!(p.started(), 1, "one thread served 50 sequential jobs");
        assert_eq!(names.lock().unwrap().len(), 1);
        p.join();
    }

    #[test]
    fn threads_grow_to_the_peak_of_concurrent_jobs_and_never_past_max() {
        let (mut p, seen, names) = pool(3);
        // Two at once: two threads.
        let mut held = Vec::new();
        for _ in 0..2 {
            let (go, release) = mpsc::channel();
            p.run(release).map_err(|_| "not run").unwrap();
            seen.recv().unwrap();
            held.push(go);
        }
        assert_eq!((p.started(), p.busy()), (2, 2));
        for go in held.drain(..) {
            go.send(()).unwrap();
        }
        settle(&p, 0);
        // Rounds of three at once reuse the same three threads; a fourth
        // job while three run is refused and comes back.
        for _ in 0..20 {
            for _ in 0..3 {
                let (go, release) = mpsc::channel();
                p.run(release).map_err(|_| "not run").unwrap();
                seen.recv().unwrap();
                held.push(go);
            }
            let (_go, release) = mpsc::channel();
            match p.run(release) {
                Err(NotRun::Busy(_)) => {}
                _ => panic!("a fourth job ran beside three with max 3"),
            }
            for go in held.drain(..) {
                go.send(()).unwrap();
            }
            settle(&p, 0);
        }
        assert_eq!(p.started(), 3);
        assert_eq!(names.lock().unwrap().len(), 3);
        p.join();
    }

    #[test]
    fn a_panicking_job_does_not_take_its_thread_away() {
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let mut p = ConnThreads::new("p", 1, move |boom: bool| {
            r.fetch_add(1, Ordering::SeqCst);
            assert!(!boom, "job panics on purpose");
        });
        for i in 0..5 {
            let mut job = i % 2 == 0;
            // The thread may still be finishing the last job: retry.
            loop {
                match p.run(job) {
                    Ok(()) => break,
                    Err(NotRun::Busy(j)) => {
                        job = j;
                        std::thread::yield_now();
                    }
                    Err(NotRun::Spawn(_, e)) => panic!("spawn: {e}"),
                }
            }
        }
        p.join();
        assert_eq!(ran.load(Ordering::SeqCst), 5);
    }
}
