//! One handler per kind of PDU the target sends (the ones that arrive
//! whole in staging; a Data-In with data is placed straight into its
//! command's buffer by `Connection::process_staged`). Each merges the
//! PDU's ExpCmdSN/MaxCmdSN into the window, checks its StatSN where it
//! carries one, and acts on it.

use super::{sense_from_segment, signed_residual, ConnError, Connection, Event, Task, TaskKind};
use crate::wire::iscsi::{
    encode_pdu, reject_reason_text, AsyncMessage, Bhs, LogoutResponse, NopIn, NopOut, PduHeader,
    R2t, Reject, ScsiResponse, TaskMgmtResponse, TextResponse, RESERVED_TAG,
};
use crate::wire::text::TextPairs;
use std::ops::Range;
use std::time::Instant;

impl Connection {
    /// SCSI Response: the status of a command.
    pub(super) fn on_scsi_response(
        &mut self,
        r: &ScsiResponse,
        data: Range<usize>,
    ) -> Result<(), ConnError> {
        self.update_window(r.exp_cmd_sn, r.max_cmd_sn);
        if !self.check_stat_sn(r.stat_sn)? && self.task_by_itt(r.itt).is_none() {
            // ERL 1: sent again after a Status SNACK, for a command done.
            self.stats.statuses_again += 1;
            return Ok(());
        }
        let payload = &self.rx[data];
        let sense = sense_from_segment(payload);
        let residual = signed_residual(r.underflow, r.overflow, r.residual);
        self.complete_scsi(r.itt, r.response, r.status, sense, Some(residual))
    }

    /// R2T: the target asks for a write's data.
    pub(super) fn on_r2t_pdu(&mut self, r: &R2t) -> Result<(), ConnError> {
        self.update_window(r.exp_cmd_sn, r.max_cmd_sn);
        // R2T carries StatSN but does not advance it: the next one the
        // target will send (at ERL 1 the ones before it are due).
        self.snack_statuses_before(r.stat_sn);
        self.on_r2t(r.itt, r.ttt, r.buffer_offset, r.desired_len, r.r2t_sn)
    }

    /// NOP-In: the answer to our ping, or the target's ping (answered with
    /// its TTT and data).
    pub(super) fn on_nop_in(
        &mut self,
        n: &NopIn,
        data: Range<usize>,
        now: Instant,
    ) -> Result<(), ConnError> {
        self.update_window(n.exp_cmd_sn, n.max_cmd_sn);
        if n.itt != RESERVED_TAG {
            self.check_stat_sn(n.stat_sn)?;
            let Some((slot, task)) = self.task_by_itt(n.itt) else {
                return Err(ConnError::Protocol(format!(
                    "NOP-In for unknown task tag {:#x}",
                    n.itt
                )));
            };
            let TaskKind::Ping { sent_at } = task.kind else {
                return Err(ConnError::Protocol(format!(
                    "NOP-In answers task {:#x}, which is not a ping",
                    n.itt
                )));
            };
            self.free_slot(slot);
            self.ping_outstanding = false;
            self.events.push_back(Event::PingAnswered {
                rtt: now.saturating_duration_since(sent_at),
            });
        } else if n.ttt != RESERVED_TAG {
            // Its StatSN is the next one (at ERL 1 the ones before it are due).
            self.snack_statuses_before(n.stat_sn);
            // The target pings us: answer with its TTT, echoing its data.
            let echo = self.rx[data].to_vec();
            let hdr = PduHeader::NopOut(NopOut {
                immediate: true,
                lun: n.lun,
                itt: RESERVED_TAG,
                ttt: n.ttt,
                cmd_sn: self.window.next_cmd_sn(),
                exp_stat_sn: self.exp_stat_sn,
            });
            encode_pdu(&mut self.tx, &hdr, &echo, self.digests);
            self.stats.pdus_out += 1;
        }
        Ok(())
    }

    /// Task Management Function Response: to a TMF of ours, or to a TASK
    /// REASSIGN.
    pub(super) fn on_tmf_response(&mut self, t: &TaskMgmtResponse) -> Result<(), ConnError> {
        self.update_window(t.exp_cmd_sn, t.max_cmd_sn);
        self.check_stat_sn(t.stat_sn)?;
        let Some((slot, task)) = self.task_by_itt(t.itt) else {
            return Err(ConnError::Protocol(format!(
                "task management response for unknown tag {:#x}",
                t.itt
            )));
        };
        let user_tag = match task.kind {
            TaskKind::Tmf { user_tag } => user_tag,
            TaskKind::Reassign { slot: adopted } => {
                self.free_slot(slot);
                return self.on_reassign_answer(adopted, t.response);
            }
            _ => {
                return Err(ConnError::Protocol(
                    "task management response for a non-TMF task".into(),
                ))
            }
        };
        self.free_slot(slot);
        self.events.push_back(Event::TaskManagement {
            user_tag,
            response: t.response,
        });
        Ok(())
    }

    /// Text Response: collected across continuations; the whole answer is
    /// reported (or applied, for our renegotiation).
    pub(super) fn on_text_response(
        &mut self,
        t: &TextResponse,
        data: Range<usize>,
    ) -> Result<(), ConnError> {
        self.update_window(t.exp_cmd_sn, t.max_cmd_sn);
        self.check_stat_sn(t.stat_sn)?;
        let payload = self.rx[data].to_vec();
        let Some((slot, task)) = self.task_by_itt(t.itt) else {
            return Err(ConnError::Protocol(format!(
                "text response for unknown tag {:#x}",
                t.itt
            )));
        };
        if task.cmd_sn.is_none() {
            return Err(ConnError::Protocol(format!(
                "text response for task {:#x}, which was not sent yet",
                t.itt
            )));
        }
        let TaskKind::Text {
            user_tag,
            collected,
            continuation,
            ..
        } = &mut task.kind
        else {
            return Err(ConnError::Protocol(
                "text response for a non-text task".into(),
            ));
        };
        if collected.len() + payload.len() > 1 << 20 {
            return Err(ConnError::Protocol(
                "text response larger than 1 MiB".into(),
            ));
        }
        collected.extend_from_slice(&payload);
        let user_tag = *user_tag;
        if t.cont || !t.final_bit {
            // Ask for the rest with an empty request carrying the TTT.
            if t.ttt == RESERVED_TAG {
                return Err(ConnError::Protocol(
                    "text response continues but has no target transfer tag".into(),
                ));
            }
            // Queued like any non-immediate PDU: it goes out when
            // the CmdSN window has room.
            *continuation = Some(t.ttt);
            self.waiting.push_back(slot);
            return Ok(());
        }
        let Some(task) = self.free_slot(slot) else {
            return Ok(());
        };
        let TaskKind::Text {
            collected,
            renegotiation,
            ..
        } = task.kind
        else {
            return Ok(());
        };
        let pairs = TextPairs::parse(&collected)
            .map_err(|e| ConnError::Protocol(format!("text response: {e}")))?;
        if renegotiation {
            return self.apply_renegotiation(&pairs);
        }
        self.events.push_back(Event::Text { user_tag, pairs });
        Ok(())
    }

    /// Logout Response: this connection (or the session) is logged out, or
    /// the answer to a logout of another connection.
    pub(super) fn on_logout_response(&mut self, l: &LogoutResponse) -> Result<(), ConnError> {
        self.update_window(l.exp_cmd_sn, l.max_cmd_sn);
        self.check_stat_sn(l.stat_sn)?;
        // Only our Logout Request may be answered: freeing whatever
        // task the tag names would drop a SCSI command silently.
        let (cid, closes_this) = match self.task_by_itt(l.itt) {
            Some((
                slot,
                Task {
                    kind: TaskKind::Logout { cid, closes_this },
                    ..
                },
            )) => {
                let r = (*cid, *closes_this);
                self.free_slot(slot);
                r
            }
            Some(_) => {
                return Err(ConnError::Protocol(format!(
                    "logout response for task {:#x}, which is not a logout",
                    l.itt
                )))
            }
            None => {
                return Err(ConnError::Protocol(format!(
                    "logout response for unknown task tag {:#x}",
                    l.itt
                )))
            }
        };
        if !closes_this {
            self.events.push_back(Event::ConnectionLoggedOut {
                cid,
                response: l.response,
                time2wait: l.time2wait,
                time2retain: l.time2retain,
            });
            return Ok(());
        }
        self.logged_out = true;
        self.events.push_back(Event::LoggedOut {
            time2wait: l.time2wait,
            time2retain: l.time2retain,
        });
        if l.response != 0 {
            return Err(ConnError::Protocol(format!(
                "logout refused by target (response {})",
                l.response
            )));
        }
        Ok(())
    }

    /// Async Message (RFC 7143 §11.9.1).
    pub(super) fn on_async_message(
        &mut self,
        a: &AsyncMessage,
        data: Range<usize>,
        now: Instant,
    ) -> Result<(), ConnError> {
        self.update_window(a.exp_cmd_sn, a.max_cmd_sn);
        self.check_stat_sn(a.stat_sn)?;
        match a.event {
            0 => {
                let payload = &self.rx[data];
                let sense = sense_from_segment(payload);
                self.events
                    .push_back(Event::AsyncScsiEvent { lun: a.lun, sense });
                Ok(())
            }
            1 => {
                self.events
                    .push_back(Event::LogoutRequested { within: a.param3 });
                Ok(())
            }
            // RFC 7143 §11.9.1: the connection (2) or every
            // connection of the session (3) is about to go.
            // Parameter2 is Time2Wait, Parameter3 Time2Retain.
            2 | 3 => Err(ConnError::TargetDropped {
                event: a.event,
                time2wait: a.param2,
                time2retain: a.param3,
            }),
            4 => {
                self.start_renegotiation(now);
                Ok(())
            }
            // 255 = vendor specific: nothing we must do.
            _ => Ok(()),
        }
    }

    /// Reject: fails the connection, naming the reason and the rejected
    /// PDU's task tag.
    pub(super) fn on_reject(&mut self, r: &Reject, data: Range<usize>) -> Result<(), ConnError> {
        self.update_window(r.exp_cmd_sn, r.max_cmd_sn);
        self.check_stat_sn(r.stat_sn)?;
        let what = reject_reason_text(r.reason);
        let rejected = self.rx[data].to_vec();
        let itt = Bhs::new_checked(&rejected).map(|b| b.itt()).ok();
        Err(ConnError::Rejected(match itt {
            Some(itt) => format!("{what} (reason {:#04x}, task tag {itt:#x})", r.reason),
            None => format!("{what} (reason {:#04x})", r.reason),
        }))
    }
}
