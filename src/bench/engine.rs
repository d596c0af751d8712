//! Engines: a single iSCSI session driven inline by the job thread (what
//! libiscsi's iscsi-perf does, so the comparison is like for like).

use super::{BenchDone, BenchIo, Engine, EngineFactory};
use crate::iscsi::connection::{Command, Direction, Event};
use crate::iscsi::session::Session;
use crate::scsi::{check_status, ScsiCommand};
use crate::transport::Transport;
use crate::wire::scsi::Lun;
use crate::worker::poll_meter;
use std::time::Instant;

/// One session per job thread; the job thread polls it.
pub struct SessionEngine<T: Transport> {
    session: Session<T>,
    lun: u64,
    block_size: u32,
    /// Commands submitted but not acknowledged by a completion.
    in_flight: usize,
    max_in_flight: usize,
    /// Consecutive retries of retryable statuses (reset by any success).
    retries: u32,
}

/// A target that keeps answering BUSY/UNIT ATTENTION is broken; give up then.
const MAX_RETRIES_IN_A_ROW: u32 = 64;

impl<T: Transport> SessionEngine<T> {
    pub fn new(
        session: Session<T>,
        lun: u16,
        block_size: u32,
        max_in_flight: usize,
    ) -> SessionEngine<T> {
        SessionEngine {
            session,
            lun: Lun::from_number(lun).to_u64(),
            block_size,
            in_flight: 0,
            max_in_flight,
            retries: 0,
        }
    }
}

impl<T: Transport> Engine for SessionEngine<T> {
    fn submit(&mut self, io: BenchIo, issued: Instant) -> Result<(), BenchIo> {
        if self.in_flight >= self.max_in_flight {
            return Err(io);
        }
        let cmd = if io.write {
            ScsiCommand::write16(io.lba, io.blocks, self.block_size, false)
        } else {
            ScsiCommand::read16(io.lba, io.blocks, self.block_size)
        };
        let Ok(cmd) = cmd else { return Err(io) };
        let dir = if io.write {
            Direction::Write
        } else {
            Direction::Read
        };
        let Ok(mut c) = Command::new(self.lun, cmd.cdb_bytes(), dir, io.buffer) else {
            return Err(BenchIo {
                tag: io.tag,
                write: io.write,
                lba: io.lba,
                blocks: io.blocks,
                buffer: Vec::new(),
            });
        };
        c.user_tag = io.tag;
        match self.session.submit_at(c, issued) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err(_) => Err(BenchIo {
                tag: io.tag,
                write: io.write,
                lba: io.lba,
                blocks: io.blocks,
                buffer: vec![0; (io.blocks * self.block_size) as usize],
            }),
        }
    }

    fn poll(&mut self, out: &mut Vec<BenchDone>) -> Result<Option<Instant>, String> {
        // With I/O in flight, wait for the target inside the receive (one
        // blocking recvmsg on kernel TCP; busy-poll mode spins instead).
        let wait = if self.in_flight > 0 {
            std::time::Duration::from_millis(1)
        } else {
            std::time::Duration::ZERO
        };
        let progressed = self.session.poll_io_wait(wait).map_err(|e| e.to_string())?;
        let polled_at = poll_meter::tick_after_wait(self.session.waited(), progressed);
        while let Some(ev) = self.session.connection_mut().poll_event() {
            if let Event::Completed(c) = ev {
                self.in_flight = self.in_flight.saturating_sub(1);
                let result = if c.response != 0 {
                    Err(format!("iSCSI target failure (response {})", c.response))
                } else {
                    match check_status(c.status, &c.sense) {
                        Ok(()) => Ok(()),
                        // UNIT ATTENTION, BUSY, TASK SET FULL: the command
                        // did not run; send it again (bounded per I/O).
                        Err(e) if e.is_retryable() && self.retries < MAX_RETRIES_IN_A_ROW => {
                            self.retries += 1;
                            let mut again = Command::new(
                                c.command.lun,
                                &c.command.cdb[..c.command.cdb_len as usize],
                                c.command.direction,
                                c.buffer,
                            )
                            .map_err(|e| e.to_string())?;
                            again.user_tag = c.user_tag;
                            self.session.submit(again).map_err(|e| e.to_string())?;
                            self.in_flight += 1;
                            continue;
                        }
                        Err(e) => Err(e.to_string()),
                    }
                };
                if result.is_ok() {
                    self.retries = 0;
                }
                out.push(BenchDone {
                    tag: c.user_tag,
                    result,
                    buffer: c.buffer,
                    path: Some(0),
                });
            }
        }
        Ok(Some(polled_at))
    }

    fn finish(&mut self) {
        // Logging out needs ownership; a best-effort close is enough here.
    }
}

/// Opens one session per job thread with `connect`.
pub struct SessionFactory<F> {
    pub connect: F,
    pub lun: u16,
    pub block_size: u32,
    pub capacity_blocks: u64,
    pub max_in_flight: usize,
    pub path_name: String,
}

impl<T, F> EngineFactory for SessionFactory<F>
where
    T: Transport + 'static,
    F: Fn(u32) -> Result<Session<T>, String> + Sync,
{
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn capacity_blocks(&self) -> u64 {
        self.capacity_blocks
    }
    fn open(&self, job_index: u32) -> Result<Box<dyn Engine>, String> {
        let s = (self.connect)(job_index)?;
        Ok(Box::new(SessionEngine::new(
            s,
            self.lun,
            self.block_size,
            self.max_in_flight,
        )))
    }
    fn path_names(&self) -> Vec<String> {
        vec![self.path_name.clone()]
    }
}

/// The multipath device: one `IoQueue` per job thread; the device's path
/// workers do the I/O, so the job thread only submits and polls.
pub struct MultipathEngine {
    queue: crate::worker::IoQueue,
    completions: Vec<crate::worker::IoCompletion>,
    /// Sleep this long after a run of empty polls (None: pure busy-poll).
    idle_sleep: Option<std::time::Duration>,
    empty_polls: u32,
}

impl Engine for MultipathEngine {
    fn submit(&mut self, io: BenchIo, _issued: Instant) -> Result<(), BenchIo> {
        use crate::worker::Io;
        let req = if io.write {
            Io::write(io.lba, io.blocks, io.buffer, io.tag)
        } else {
            Io::read(io.lba, io.blocks, io.buffer, io.tag)
        };
        self.queue.submit(req).map_err(|e| {
            let back = e.into_io();
            BenchIo {
                tag: back.user_tag,
                write: io.write,
                lba: back.lba,
                blocks: back.blocks,
                buffer: back.buffer,
            }
        })
    }

    fn poll(&mut self, out: &mut Vec<BenchDone>) -> Result<Option<Instant>, String> {
        let mut polled_at;
        if self.queue.poll_completions(&mut self.completions) == 0 {
            polled_at = poll_meter::tick(false);
            self.empty_polls += 1;
            if let Some(d) = self.idle_sleep {
                if self.empty_polls > 64 {
                    std::thread::sleep(d);
                    polled_at = poll_meter::tick(false);
                }
            }
        } else {
            polled_at = poll_meter::tick(true);
            self.empty_polls = 0;
        }
        for c in self.completions.drain(..) {
            out.push(BenchDone {
                tag: c.user_tag,
                result: c.result.map_err(|e| e.to_string()),
                buffer: c.buffer,
                path: c.path,
            });
        }
        Ok(Some(polled_at))
    }
}

/// Opens one `IoQueue` per job on a shared multipath device.
pub struct MultipathFactory<'a> {
    pub device: &'a crate::worker::WorkerDevice,
    pub path_names: Vec<String>,
    /// Back-off of the job threads when idle (None: busy-poll).
    pub idle_sleep: Option<std::time::Duration>,
}

impl EngineFactory for MultipathFactory<'_> {
    fn block_size(&self) -> u32 {
        self.device.block_size()
    }
    fn capacity_blocks(&self) -> u64 {
        self.device.capacity()
    }
    fn open(&self, _job_index: u32) -> Result<Box<dyn Engine>, String> {
        Ok(Box::new(MultipathEngine {
            queue: self.device.queue_pair(),
            completions: Vec::with_capacity(256),
            idle_sleep: self.idle_sleep,
            empty_polls: 0,
        }))
    }
    fn path_names(&self) -> Vec<String> {
        self.path_names.clone()
    }
}
