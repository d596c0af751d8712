//! Error recovery at ERL 1 and 2: the PDUs kept for a task until the
//! initiator acknowledges its status, SNACK, and the hand-over of a
//! leaving connection's tasks to its session for TASK REASSIGN.

use super::*;
use std::time::Duration;

impl Core {
    /// The connection leaves its session: its tasks go to the session for
    /// TASK REASSIGN (ERL 2, unless it logged out cleanly) or are dropped;
    /// the last connection out ends the session. Runs once.
    pub(super) fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        // Not in a session (discovery, a login that did not finish).
        let (Some(session), Some(flag)) = (self.session.clone(), self.closing.clone()) else {
            return;
        };
        let recover = self.erl() >= 2 && (self.recover_tasks || self.close_unclean());
        let mut orphans = Vec::new();
        // The connection ended at its last step (a driver steps it at
        // least once a tick while it is open).
        let retain = session.params.default_time2wait + session.params.default_time2retain;
        let expires = self.last_step + Duration::from_secs(u64::from(retain));
        if recover {
            let mut sent: Vec<Retained> = std::mem::take(&mut self.retained);
            self.retained_bytes = 0;
            for w in std::mem::take(&mut self.tasks) {
                let i = sent.iter().position(|r| r.itt == w.itt);
                orphans.push(Orphan {
                    itt: w.itt,
                    sent: i.map(|i| sent.swap_remove(i)),
                    write: Some(w),
                    expires,
                });
            }
            for r in sent {
                orphans.push(Orphan {
                    itt: r.itt,
                    write: None,
                    sent: Some(r),
                    expires,
                });
            }
            if !orphans.is_empty() {
                log::info!(
                    "connection CID {} of TSIH {} gone: {} task(s) wait for TASK REASSIGN",
                    self.cid,
                    self.tsih,
                    orphans.len()
                );
            }
        }
        let left = session.release_conn(self.cid, &flag, orphans);
        if left == 0 {
            if let Some(ended) = &self.ended {
                self.shared.leave_session(ended);
            }
        }
    }

    /// Whether the connection ended without a logout (a broken TCP
    /// connection, a protocol error): at ERL 2 its tasks are kept.
    fn close_unclean(&self) -> bool {
        self.phase != Phase::Closed || self.close_reason.as_deref() != Some("logout")
    }

    /// ERL 2: the tasks of this session's failed connections that waited
    /// DefaultTime2Wait + DefaultTime2Retain without a TASK REASSIGN are
    /// ended (RFC 7143 §6.2.2): a reassignment of one is answered "task
    /// does not exist", and its data, if more comes, is dropped unwritten.
    pub(super) fn expire_orphans(&mut self, now: Instant) {
        let Some(session) = &self.session else {
            return;
        };
        for o in session.expire_orphans(now) {
            log::info!(
                "task {:#x} of a failed connection of TSIH {} ended: no TASK REASSIGN within \
                 DefaultTime2Wait + DefaultTime2Retain",
                o.itt,
                self.tsih
            );
        }
    }

    /// A write whose data is in: run at its LU and answered
    /// (`execute_write`), logged when the LU logs executions
    /// ([`super::super::Lun::write_executions`]). With the fault
    /// `lose_status_and_kill` aimed at this CID its status is then lost
    /// with the connection: kept (ERL 1 and up) for a TASK REASSIGN to
    /// send again, but not sent, and the connection closes as a broken one
    /// would (at ERL 2 its tasks wait in the session).
    pub(super) fn complete_write(&mut self, task: WriteTask) {
        let execution = self.execution_of(&task);
        let lose = execution.is_some() && self.shared.faults.take_status_loss(self.cid);
        let mark = self.out.len();
        let itt = task.itt;
        self.execute_write(task);
        if let Some((lun, e)) = execution {
            self.shared.luns[lun].record_write_execution(e);
        }
        if lose {
            self.out.truncate(mark);
            self.recover_tasks = self.erl() >= 2;
            self.close(format!(
                "fault injection: status of task {itt:#x} lost, connection CID {} killed",
                self.cid
            ));
            self.release();
        }
    }

    /// The log entry of a write about to run (None: it will not run, or
    /// its LU does not log).
    fn execution_of(&self, t: &WriteTask) -> Option<(usize, crate::target::WriteExecution)> {
        let lun = t.sink.lun()?;
        let l = &self.shared.luns[lun];
        if t.error.is_some() || self.task_aborted(t) || !l.logs_writes() {
            return None;
        }
        let received = t.received as usize;
        let (offset, len, data_crc) = match &t.sink {
            Sink::Lun { offset, len, .. } => {
                let mut data = vec![0u8; *len as usize];
                l.read(*offset, &mut data);
                (*offset, *len, crc32c::crc32c(&data))
            }
            Sink::Params { buf, .. } | Sink::PrOut { buf, .. } => {
                (0, 0, crc32c::crc32c(&buf[..received.min(buf.len())]))
            }
            Sink::Discard | Sink::Conflict => return None,
        };
        Some((
            lun,
            crate::target::WriteExecution {
                itt: t.itt,
                cmd_sn: t.cmd_sn.0,
                cid: self.cid,
                opcode: t.opcode,
                offset,
                len,
                data_crc,
            },
        ))
    }

    /// ERL 1 and up: keeps a copy of a PDU sent for task `itt`.
    pub(super) fn retain(&mut self, itt: u32, h: &PduHeader, data: &[u8]) {
        if self.erl() == 0 || self.session.is_none() {
            return;
        }
        let status = match h {
            PduHeader::ScsiResponse(r) => Some(r.stat_sn),
            PduHeader::DataIn(d) if d.status_present => Some(d.stat_sn),
            _ => None,
        };
        let i = match self.retained.iter().rposition(|r| r.itt == itt) {
            Some(i) if self.retained[i].status_sn.is_none() => i,
            _ => {
                if self.retained.len() >= MAX_RETAINED {
                    self.forget_oldest();
                }
                self.retained.push(Retained {
                    itt,
                    pdus: Vec::new(),
                    status_sn: None,
                });
                self.retained.len() - 1
            }
        };
        let r = &mut self.retained[i];
        r.pdus.push((h.clone(), data.to_vec()));
        if status.is_some() {
            r.status_sn = status;
        }
        self.retained_bytes += data.len();
        while self.retained_bytes > MAX_RETAINED_BYTES && self.retained.len() > 1 {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if self.retained.is_empty() {
            return;
        }
        let r = self.retained.remove(0);
        log::debug!(
            "ERL 1: responses of task {:#x} forgotten (too many kept)",
            r.itt
        );
        self.retained_bytes -= r.pdus.iter().map(|(_, d)| d.len()).sum::<usize>();
    }

    fn recount_retained(&mut self) {
        self.retained_bytes = self
            .retained
            .iter()
            .flat_map(|r| r.pdus.iter())
            .map(|(_, d)| d.len())
            .sum();
    }

    /// The Data-Out sequence answering R2T `ttt` of task `itt` has ended:
    /// that R2T is acknowledged, and a SNACK asking for it again is a
    /// protocol error (RFC 7143 §11.16).
    pub(super) fn r2t_answered(&mut self, itt: u32, ttt: u32) {
        if let Some(r) = self.retained.iter_mut().rev().find(|r| r.itt == itt) {
            r.pdus
                .retain(|(h, _)| !matches!(h, PduHeader::R2t(x) if x.ttt == ttt));
        }
    }

    /// The initiator has seen every status before `exp_stat_sn`: those
    /// tasks' responses need not be kept.
    pub(super) fn acknowledge(&mut self, exp_stat_sn: Sn) {
        if !self.retained.is_empty() {
            let before = self.retained.len();
            self.retained
                .retain(|r| r.status_sn.is_none_or(|s| s.ge(exp_stat_sn)));
            if self.retained.len() != before {
                self.recount_retained();
            }
        }
    }

    /// Sends a kept PDU again with the current window; `stat_sn` replaces
    /// its StatSN when given (the status of a reassigned task).
    pub(super) fn resend(&mut self, h: &PduHeader, data: &[u8], stat_sn: Option<Sn>) -> PduHeader {
        let (exp, max) = self.window();
        let mut h = h.clone();
        match &mut h {
            PduHeader::DataIn(d) => {
                d.exp_cmd_sn = exp;
                d.max_cmd_sn = max;
                if let (Some(sn), true) = (stat_sn, d.status_present) {
                    d.stat_sn = sn;
                }
            }
            PduHeader::ScsiResponse(r) => {
                r.exp_cmd_sn = exp;
                r.max_cmd_sn = max;
                if let Some(sn) = stat_sn {
                    r.stat_sn = sn;
                }
            }
            PduHeader::R2t(r) => {
                r.exp_cmd_sn = exp;
                r.max_cmd_sn = max;
                r.stat_sn = self.stat_sn;
            }
            _ => {}
        }
        self.emit(&h, data);
        h
    }

    /// SNACK (ERL 1): sends again the Data-In or R2Ts of a task (Data/R2T),
    /// the statuses in a StatSN range (Status), or takes a DataACK.
    pub(super) fn on_snack(&mut self, k: &Snack, bhs: &[u8]) {
        if self.erl() == 0 {
            return self.reject(reject::SNACK, bhs);
        }
        let in_run = |sn: Sn| {
            sn.ge(Sn(k.beg_run))
                && (k.run_length == 0 || sn.lt(Sn(k.beg_run.wrapping_add(k.run_length))))
        };
        let mut again: Vec<(PduHeader, Vec<u8>)> = Vec::new();
        // Whether what was asked for was sent and is not acknowledged yet
        // (kept for the task), or is unknown here.
        let mut task_known = false;
        match k.kind {
            // Data/R2T: by DataSN or R2TSN within the task; an R2T whose
            // data has come is no longer kept (`r2t_answered`).
            0 => {
                if let Some(r) = self.retained.iter().rev().find(|r| r.itt == k.itt) {
                    task_known = true;
                    for (h, d) in &r.pdus {
                        let hit = match h {
                            PduHeader::DataIn(x) => in_run(x.data_sn),
                            PduHeader::R2t(x) => in_run(x.r2t_sn),
                            _ => false,
                        };
                        if hit {
                            again.push((h.clone(), d.clone()));
                        }
                    }
                }
            }
            // Status: by StatSN.
            1 => {
                for r in &self.retained {
                    for (h, d) in &r.pdus {
                        let sn = match h {
                            PduHeader::ScsiResponse(x) => Some(x.stat_sn),
                            PduHeader::DataIn(x) if x.status_present => Some(x.stat_sn),
                            _ => None,
                        };
                        if sn.is_some_and(in_run) {
                            again.push((h.clone(), d.clone()));
                        }
                    }
                }
            }
            // DataACK: the Data-In before BegRun arrived; nothing to send.
            2 => {
                if let Some(r) = self.retained.iter_mut().find(|r| r.itt == k.itt) {
                    r.pdus.retain(|(h, _)| match h {
                        PduHeader::DataIn(x) => x.status_present || x.data_sn.ge(Sn(k.beg_run)),
                        _ => true,
                    });
                }
                self.recount_retained();
                return;
            }
            _ => return self.reject(reject::SNACK, bhs),
        }
        if again.is_empty() {
            log::debug!(
                "SNACK type {} for ITT {:#x} BegRun {} RunLength {}: nothing kept to send",
                k.kind,
                k.itt,
                k.beg_run,
                k.run_length
            );
            // RFC 7143 §11.16: asking for a PDU of a known task that was
            // not sent or is acknowledged (an R2T whose data came) is a
            // protocol error; a task whose PDUs are no longer kept gets
            // SNACK Reject.
            let reason = if task_known {
                reject::PROTOCOL_ERROR
            } else {
                reject::SNACK
            };
            return self.reject(reason, bhs);
        }
        for (h, d) in again {
            self.resend(&h, &d, None);
        }
    }
}
