//! Task management: ABORT TASK and the resets, and TASK REASSIGN (ERL 2),
//! which takes over a task of a failed connection of the session.

use super::*;
use crate::wire::iscsi::tmf;

impl Core {
    /// TASK REASSIGN (ERL 2): takes over a task of a failed or removed
    /// connection of this session; what is left of it (R2Ts for the data
    /// not yet received, Data-In from ExpDataSN, status) goes out here.
    pub(super) fn on_task_reassign(&mut self, t: &TaskMgmtRequest) {
        let session = self.session.clone();
        if session.as_ref().is_some_and(|s| s.release_pending()) {
            // The connection it belonged to has been told to go but has not
            // handed its tasks over yet.
            self.blocked = true;
            return;
        }
        if !self.accept_cmd_sn(t.immediate, t.cmd_sn) {
            return;
        }
        let mut orphan = None;
        let response = if self.shared.faults.take_reassign_refusal() {
            255
        } else if self.erl() < 2 {
            // Task allegiance reassignment not supported.
            4
        } else if self.tasks.iter().any(|w| w.itt == t.referenced_task_tag) {
            // Task still allegiant (to this very connection).
            3
        } else {
            orphan = session.and_then(|s| s.take_orphan(t.referenced_task_tag));
            if orphan.is_some() {
                0
            } else {
                1
            }
        };
        self.send_tmf_response(t.itt, response);
        if let Some(o) = orphan {
            log::info!(
                "task {:#x} reassigned to connection CID {}",
                o.itt,
                self.cid
            );
            self.adopt(o, t.exp_data_sn);
        }
    }

    fn adopt(&mut self, o: Orphan, exp_data_sn: Sn) {
        if let Some(sent) = o.sent {
            let stat_sn = sent.status_sn.map(|_| self.next_stat_sn());
            for (h, d) in &sent.pdus {
                let again = match h {
                    PduHeader::DataIn(x) => x.data_sn.ge(exp_data_sn) || x.status_present,
                    PduHeader::ScsiResponse(_) => true,
                    // A write that is still running gets new R2Ts below.
                    _ => false,
                };
                if again {
                    let h = self.resend(h, d, stat_sn);
                    self.retain(o.itt, &h, d);
                }
            }
        }
        if let Some(mut w) = o.write {
            // Unsolicited data that had not arrived is now asked for by
            // R2T; what arrived stays, so no byte is written twice.
            w.unsolicited_done = true;
            w.outstanding_r2t = 0;
            w.sequence_ttt = None;
            w.next_data_sn = Sn(0);
            w.next_r2t_offset = w.received;
            w.r2ts.clear();
            self.tasks.push(w);
            let i = self.tasks.len() - 1;
            self.advance_write(i);
        }
    }

    pub(super) fn on_task_mgmt(&mut self, t: &TaskMgmtRequest) {
        if !self.accept_cmd_sn(t.immediate, t.cmd_sn) {
            return;
        }
        let response = match t.function {
            tmf::ABORT_TASK => {
                if let Some(i) = self
                    .tasks
                    .iter()
                    .position(|w| w.itt == t.referenced_task_tag)
                {
                    self.tasks.swap_remove(i);
                    0
                } else if t.ref_cmd_sn.ge(self.exp_cmd_sn) && t.ref_cmd_sn.lt(t.cmd_sn) {
                    // Never received, still in the window: "function
                    // complete" (RFC 7143 §11.5.1), and the command is
                    // dropped if it arrives later. One already answered
                    // falls through to "task does not exist".
                    if self.aborted_early.len() >= MAX_PENDING_WRITES {
                        self.aborted_early.remove(0);
                    }
                    self.aborted_early
                        .push((t.referenced_task_tag, t.ref_cmd_sn));
                    0
                } else {
                    1
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LOGICAL_UNIT_RESET => {
                let known = scsi::decode_lun(t.lun).and_then(|n| self.shared.lun_index(n));
                match known {
                    None => 2,
                    Some(i) => {
                        self.tasks.retain(|w| w.lun_field != t.lun);
                        if t.function == tmf::LOGICAL_UNIT_RESET {
                            // Every session, this one included, then reports
                            // 29/03 once (as LIO does per initiator), and
                            // every session's tasks on the LU end: a write
                            // waiting for its data never lands
                            // (`task_aborted`).
                            self.shared.luns[i].reset();
                        }
                        0
                    }
                }
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                // Every LU is reset: the other sessions' tasks end too.
                self.tasks.clear();
                for lun in &self.shared.luns {
                    lun.reset();
                }
                0
            }
            tmf::CLEAR_ACA => 0,
            // TASK REASSIGN is answered by its own handler (MC/S, ERL 2).
            _ => 5,
        };
        self.send_tmf_response(t.itt, response);
    }
}
