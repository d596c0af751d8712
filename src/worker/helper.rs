//! A path worker's helper thread: runs the worker's blocking logins (the
//! reconnects of its path, the fence logins it makes for other paths) one
//! at a time, and lives as long as the worker, instead of a new thread per
//! login.
//!
//! A session's buffers are allocated by the thread that logs it in, and
//! glibc serves a thread from an arena it keeps for it: a new thread per
//! reconnect took whichever arena was free at the time, so every flap left
//! the old session's freed buffers (grown with the I/O it carried) in one
//! arena and built the new session in another, and each arena kept the
//! free memory below its trim threshold. One thread per path logs every
//! session of that path in, so the next session reuses what the last one
//! freed.

use crossbeam::channel::{bounded, unbounded, Receiver, Sender, TryRecvError};
use std::cell::OnceCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

type Task = Box<dyn FnOnce() + Send>;

/// The helper thread of one worker (started on the first job).
pub(crate) struct Helper {
    name: String,
    tx: Option<Sender<Task>>,
}

/// A job given to a [`Helper`]: poll [`is_finished`](Job::is_finished),
/// then [`join`](Job::join), as with a thread's `JoinHandle`.
pub(crate) struct Job<T> {
    rx: Receiver<std::thread::Result<T>>,
    /// The result, once `is_finished` has taken it (boxed: a job's handle
    /// stays small beside the worker's other states).
    got: OnceCell<Box<std::thread::Result<T>>>,
}

impl<T> Job<T> {
    /// The job has ended (returned, panicked, or its thread is gone).
    pub(crate) fn is_finished(&self) -> bool {
        if self.got.get().is_some() {
            return true;
        }
        match self.rx.try_recv() {
            Ok(r) => {
                let _ = self.got.set(Box::new(r));
                true
            }
            Err(TryRecvError::Empty) => false,
            Err(TryRecvError::Disconnected) => true,
        }
    }

    /// Waits for the job's end; `Err` when it panicked.
    pub(crate) fn join(mut self) -> std::thread::Result<T> {
        match self.got.take() {
            Some(r) => *r,
            None => self
                .rx
                .recv()
                .unwrap_or_else(|_| Err(Box::new("the helper thread is gone"))),
        }
    }
}

impl Helper {
    /// A helper whose thread will be named `name`.
    pub(crate) fn new(name: String) -> Helper {
        Helper { name, tx: None }
    }

    /// Runs `f` on the helper thread (after the jobs given before it).
    pub(crate) fn run<T: Send + 'static>(
        &mut self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<Job<T>> {
        let (done_tx, rx) = bounded(1);
        let task: Task = Box::new(move || {
            let _ = done_tx.send(catch_unwind(AssertUnwindSafe(f)));
        });
        let task = match &self.tx {
            Some(tx) => match tx.send(task) {
                Ok(()) => {
                    return Ok(Job {
                        rx,
                        got: OnceCell::new(),
                    })
                }
                // Its thread ended: start another.
                Err(e) => e.into_inner(),
            },
            None => task,
        };
        let (tx, tasks) = unbounded::<Task>();
        std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                while let Ok(task) = tasks.recv() {
                    task();
                }
            })?;
        let _ = tx.send(task);
        self.tx = Some(tx);
        Ok(Job {
            rx,
            got: OnceCell::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn wait<T>(j: &Job<T>) {
        for _ in 0..5000 {
            if j.is_finished() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("job did not finish");
    }

    #[test]
    fn every_job_runs_on_the_same_thread() {
        let mut h = Helper::new("mp-login-test".into());
        let mut ids = Vec::new();
        for i in 0..20u32 {
            let j = h.run(move || (std::thread::current().id(), i * 2)).unwrap();
            wait(&j);
            let (id, v) = j.join().unwrap();
            assert_eq!(v, i * 2);
            ids.push(id);
        }
        assert!(ids.iter().all(|id| *id == ids[0]), "one thread for all");
        assert_ne!(ids[0], std::thread::current().id());
    }

    #[test]
    fn a_job_that_panics_is_reported_and_the_next_one_runs() {
        let mut h = Helper::new("mp-login-test".into());
        let j = h
            .run(|| -> u8 { panic!("login thread panics on purpose") })
            .unwrap();
        wait(&j);
        assert!(j.join().is_err());
        let j = h.run(|| 7u8).unwrap();
        wait(&j);
        assert_eq!(j.join().unwrap(), 7);
    }

    #[test]
    fn a_job_not_finished_says_so() {
        let mut h = Helper::new("mp-login-test".into());
        let (go, wait_go) = bounded::<()>(1);
        let j = h.run(move || wait_go.recv().is_ok()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!j.is_finished());
        go.send(()).unwrap();
        wait(&j);
        assert!(j.join().unwrap());
    }
}
