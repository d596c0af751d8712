//! SCSI commands and their data: a command is planned by [`super::scsi`],
//! its Data-In and status go out, a write waits for Data-Out and asks for it
//! by R2T, reservations and resets gate it.

use super::*;

impl Core {
    fn send_status(
        &mut self,
        itt: u32,
        status: ScsiStatus,
        resid: Residual,
        exp_data_sn: Sn,
        sense: Option<Sense>,
    ) {
        let (exp, max) = self.window();
        let h = PduHeader::ScsiResponse(ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: false,
            overflow: resid.overflow,
            underflow: resid.underflow,
            response: 0,
            status: status.as_u8(),
            itt,
            snack_tag: 0,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            exp_data_sn,
            bidi_residual: 0,
            residual: if resid.overflow || resid.underflow {
                resid.count
            } else {
                0
            },
        });
        match sense {
            None => {
                self.emit(&h, &[]);
                self.retain(itt, &h, &[]);
            }
            Some(s) => {
                let mut data = [0u8; 2 + Sense::FIXED_LEN];
                data[1] = Sense::FIXED_LEN as u8;
                data[2..].copy_from_slice(&s.emit_fixed());
                self.emit(&h, &data);
                self.retain(itt, &h, &data);
            }
        }
    }

    fn send_check(&mut self, itt: u32, sense: Sense, exp_data_sn: Sn) {
        let none = residual(0, 0);
        self.send_status(
            itt,
            ScsiStatus::CheckCondition,
            none,
            exp_data_sn,
            Some(sense),
        );
    }

    /// Data-In PDUs cut at the initiator's MaxRecvDataSegmentLength, the F
    /// bit at each MaxBurstLength, and GOOD status in the last one.
    fn send_data_in(
        &mut self,
        itt: u32,
        lun: u64,
        source: DataSource,
        transfer: u64,
        expected: u32,
    ) {
        let resid = residual(transfer, expected);
        let total = transfer.min(u64::from(expected)) as u32;
        if total == 0 {
            return self.send_status(itt, ScsiStatus::Good, resid, Sn(0), None);
        }
        let max_seg = self.params.max_xmit_data_segment_len.max(512);
        let burst = self.params.max_burst_len.max(512);
        let (exp, max) = self.window();
        let stat_sn = self.next_stat_sn();
        let keep = self.erl() > 0 && self.session.is_some();
        let mut kept: Vec<(PduHeader, Vec<u8>)> = Vec::new();
        let cid = self.cid;
        let Core {
            out,
            out_refs,
            out_ref_bytes,
            data_in_by_reference,
            scratch,
            shared,
            digests,
            ..
        } = self;
        let hdr_len = BHS_LEN + if digests.header { 4 } else { 0 };
        let (mut offset, mut in_burst, mut data_sn) = (0u32, 0u32, Sn(0));
        while offset < total {
            let len = (total - offset).min(max_seg).min(burst - in_burst);
            let last = offset + len == total;
            in_burst += len;
            let burst_end = last || in_burst == burst;
            if burst_end {
                in_burst = 0;
            }
            let h = PduHeader::DataIn(DataIn {
                final_bit: burst_end,
                ack: false,
                overflow: last && resid.overflow,
                underflow: last && resid.underflow,
                status_present: last,
                status: ScsiStatus::Good.as_u8(),
                lun,
                itt,
                ttt: RESERVED_TAG,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                data_sn,
                buffer_offset: offset,
                residual: if last && (resid.overflow || resid.underflow) {
                    resid.count
                } else {
                    0
                },
            });
            let (start, refs_before) = (out.len(), out_refs.len());
            match source {
                DataSource::Lun { lun, offset: base } if *data_in_by_reference => {
                    let lent = push_pdu_by_reference(
                        out,
                        out_refs,
                        &h,
                        &shared.luns[lun],
                        base + u64::from(offset),
                        len as usize,
                        *digests,
                    );
                    *out_ref_bytes += lent;
                    if keep {
                        let mut data = Vec::with_capacity(len as usize);
                        for r in &out_refs[refs_before..] {
                            data.extend_from_slice(&r.buf[r.start..r.start + r.len]);
                        }
                        kept.push((h, data));
                    }
                }
                _ => {
                    push_pdu_with(out, &h, len as usize, *digests, |buf| match source {
                        DataSource::Lun { lun, offset: base } => {
                            shared.luns[lun].read(base + u64::from(offset), buf)
                        }
                        DataSource::Scratch => buf.copy_from_slice(
                            &scratch[offset as usize..offset as usize + buf.len()],
                        ),
                    });
                    if keep {
                        let at = start + hdr_len;
                        kept.push((h, out[at..at + len as usize].to_vec()));
                    }
                }
            }
            if shared.faults.take_data_in_drop(cid) {
                // As if a digest error had dropped it on the way.
                log::debug!("fault injection: Data-In DataSN {data_sn} of ITT {itt:#x} left out");
                out.truncate(start);
                for r in out_refs.drain(refs_before..) {
                    *out_ref_bytes -= r.len;
                }
            }
            offset += len;
            data_sn = data_sn.next();
        }
        for (h, d) in kept {
            self.retain(itt, &h, &d);
        }
    }

    pub(super) fn on_scsi_command(&mut self, c: &ScsiCommand, bhs: &[u8], data: &[u8]) {
        if !self.accept_cmd_sn(c.immediate, c.cmd_sn) {
            return;
        }
        if self.aborted_before_arrival(c.itt, c.cmd_sn) {
            return;
        }
        if self.session_type == SessionType::Discovery {
            return self.reject(reject::NOT_SUPPORTED, bhs);
        }
        let faults = self.shared.faults.clone();
        if let Some(reason) = faults.take_reject(self.portal) {
            return self.reject(reason, bhs);
        }
        let drop_after = faults.count_command_for_drop(self.portal);
        let lun_index = scsi::decode_lun(c.lun).and_then(|n| self.shared.lun_index(n));
        let plan = if let Some(s) = faults.take_check_condition(self.portal) {
            Plan::Check(Sense {
                key: SenseKey::from_bits(s.key),
                asc: s.asc,
                ascq: s.ascq,
                information: None,
                sense_key_specific: None,
            })
        } else if let Some(ua) = lun_index
            .filter(|_| !scsi::ignores_unit_attention(&c.cdb))
            .and_then(|i| self.take_unit_attention(i))
        {
            Plan::Check(ua)
        } else if self.reservation_gate(c, data, lun_index) {
            if drop_after {
                self.close("fault injection: drop after N commands");
            }
            return;
        } else {
            let port = Port {
                shared: &self.shared,
                portal: self.portal,
            };
            scsi::plan(port, c.lun, &c.cdb, &mut self.scratch)
        };
        let expected = c.expected_data_len;
        match plan {
            Plan::ReadLun { lun, offset, len } => {
                self.send_data_in(c.itt, c.lun, DataSource::Lun { lun, offset }, len, expected)
            }
            Plan::DataIn => {
                let len = self.scratch.len() as u64;
                self.send_data_in(c.itt, c.lun, DataSource::Scratch, len, expected)
            }
            Plan::Good => {
                self.send_status(c.itt, ScsiStatus::Good, residual(0, expected), Sn(0), None)
            }
            Plan::Check(sense) => {
                if c.write && !c.final_bit {
                    // Unsolicited Data-Out follows; drain it, then report.
                    // Immediate data counts: the Data-Out continues after it.
                    self.start_write(c, data, Sink::Discard, 0, Some(sense));
                } else {
                    self.send_check(c.itt, sense, Sn(0));
                }
            }
            Plan::WriteLun { lun, offset, len } => {
                self.start_write(c, data, Sink::Lun { lun, offset, len }, len, None)
            }
            Plan::ParamsOut { lun, command, len } => {
                let sink = Sink::Params {
                    lun,
                    command,
                    buf: vec![0u8; len as usize],
                };
                self.start_write(c, data, sink, u64::from(len), None)
            }
        }
        if drop_after {
            self.close("fault injection: drop after N commands");
        }
    }

    /// Persistent reservations: runs PERSISTENT RESERVE IN, starts
    /// PERSISTENT RESERVE OUT, and answers RESERVATION CONFLICT to a
    /// command the reservation forbids. True when the command was taken
    /// care of here.
    fn reservation_gate(&mut self, c: &ScsiCommand, data: &[u8], lun: Option<usize>) -> bool {
        use crate::wire::scsi::pr::{PrInAction, PrInCdb, PrOutCdb};
        use crate::wire::scsi::DataRepr;
        let (Some(li), Some(nexus)) = (lun, self.nexus.as_ref()) else {
            return false;
        };
        let l = &self.shared.luns[li];
        match c.cdb[0] {
            super::pr::PERSISTENT_RESERVE_IN => {
                let bytes = match PrInCdb::parse(&c.cdb) {
                    Ok(cdb) => {
                        let mut bytes = match cdb.action {
                            PrInAction::ReadKeys => l.with_reservations(|r| r.read_keys().to_vec()),
                            PrInAction::ReadReservation => {
                                l.with_reservations(|r| r.read_reservation().to_vec())
                            }
                            PrInAction::ReportCapabilities => {
                                super::pr::Reservations::capabilities().to_vec()
                            }
                            PrInAction::ReadFullStatus => {
                                l.with_reservations(|r| r.read_full_status())
                            }
                        };
                        bytes.truncate(usize::from(cdb.alloc_len));
                        Some(bytes)
                    }
                    Err(_) => None,
                };
                match bytes {
                    Some(b) => {
                        self.scratch.clear();
                        self.scratch.extend_from_slice(&b);
                        let len = b.len() as u64;
                        let expected = c.expected_data_len;
                        self.send_data_in(c.itt, c.lun, DataSource::Scratch, len, expected);
                    }
                    None => self.send_check(c.itt, Sense::INVALID_FIELD_IN_CDB, Sn(0)),
                }
                true
            }
            super::pr::PERSISTENT_RESERVE_OUT => {
                match PrOutCdb::parse(&c.cdb) {
                    Ok(cdb) => {
                        let len = cdb.param_len.min(4096);
                        let sink = Sink::PrOut {
                            lun: li,
                            cdb,
                            buf: vec![0; len as usize],
                        };
                        self.start_write(c, data, sink, u64::from(cdb.param_len), None);
                    }
                    Err(_) if c.write && !c.final_bit => {
                        let sense = Some(Sense::INVALID_FIELD_IN_CDB);
                        self.start_write(c, data, Sink::Discard, 0, sense);
                    }
                    Err(_) => self.send_check(c.itt, Sense::INVALID_FIELD_IN_CDB, Sn(0)),
                }
                true
            }
            op if !l.reservation_allows(nexus, op) => {
                if c.write && !c.final_bit {
                    self.start_write(c, data, Sink::Conflict, 0, None);
                } else {
                    let none = residual(0, 0);
                    let conflict = ScsiStatus::ReservationConflict;
                    self.send_status(c.itt, conflict, none, Sn(0), None);
                }
                true
            }
            _ => false,
        }
    }

    /// Whether a PREEMPT AND ABORT of this session's I_T nexus, or a
    /// LOGICAL UNIT RESET of its LU (through any session), ended `t` after
    /// it started.
    pub(super) fn task_aborted(&self, t: &WriteTask) -> bool {
        let Some(lun) = t.sink.lun() else {
            return false;
        };
        if self.shared.luns[lun].reset_generation() != t.reset_seen {
            return true;
        }
        match &self.nexus {
            Some(nexus) => self.shared.luns[lun].task_aborted(nexus, t.pr_seen),
            None => false,
        }
    }

    /// Whether the command (ITT, CmdSN) arriving now was aborted before it
    /// arrived (ABORT TASK answered "function complete" for it, RFC 7143
    /// §11.5.1): then it is dropped, unexecuted and unanswered.
    fn aborted_before_arrival(&mut self, itt: u32, cmd_sn: Sn) -> bool {
        let Some(i) = self
            .aborted_early
            .iter()
            .position(|&(t, sn)| t == itt && sn == cmd_sn)
        else {
            return false;
        };
        self.aborted_early.swap_remove(i);
        log::debug!("command {itt:#x} (CmdSN {cmd_sn}) aborted before it arrived: dropped");
        true
    }

    /// A pending UNIT ATTENTION for LUN index `i`: an ALUA state change
    /// (always reported), else reset and power-on ones if unit attentions
    /// are on.
    fn take_unit_attention(&mut self, i: usize) -> Option<Sense> {
        let alua = self.shared.alua_generation();
        if let Some(seen) = self.seen_alua.get_mut(i) {
            if *seen != alua {
                *seen = alua;
                return Some(Sense::ASYMMETRIC_ACCESS_STATE_CHANGED);
            }
        }
        if !self.shared.config.unit_attentions {
            return None;
        }
        let generation = self.shared.luns.get(i)?.reset_generation();
        if let Some(seen) = self.seen_resets.get_mut(i) {
            if *seen != generation {
                *seen = generation;
                self.unit_attention[i] = Some(Sense::LUN_RESET_OCCURRED);
            }
        }
        self.unit_attention.get_mut(i)?.take()
    }

    fn start_write(
        &mut self,
        c: &ScsiCommand,
        data: &[u8],
        sink: Sink,
        transfer: u64,
        error: Option<Sense>,
    ) {
        if self.tasks.len() >= MAX_PENDING_WRITES {
            return self.close("too many write commands waiting for data");
        }
        let expected = if c.write { c.expected_data_len } else { 0 };
        let pr_seen = sink.lun().map_or(0, |l| self.shared.luns[l].pr_aborts());
        let reset_seen = sink
            .lun()
            .map_or(0, |l| self.shared.luns[l].reset_generation());
        let mut task = WriteTask {
            pr_seen,
            reset_seen,
            itt: c.itt,
            cmd_sn: c.cmd_sn,
            opcode: c.cdb[0],
            lun_field: c.lun,
            sink,
            expected,
            transfer,
            received: 0,
            unsolicited_done: c.final_bit,
            next_r2t_offset: 0,
            outstanding_r2t: 0,
            r2t_sn: Sn(0),
            sequence_ttt: None,
            next_data_sn: Sn(0),
            error,
            unsolicited: 0,
            r2ts: Vec::new(),
        };
        if !data.is_empty() && expected > 0 {
            let n = data.len().min(expected as usize);
            store(&self.shared, &mut task.sink, 0, &data[..n]);
            task.received = n as u32;
            task.unsolicited = n as u32;
        }
        task.next_r2t_offset = task.received;
        self.tasks.push(task);
        let i = self.tasks.len() - 1;
        self.advance_write(i);
    }

    /// After data arrived (or the command itself): complete the task, or
    /// send the R2Ts its window allows.
    pub(super) fn advance_write(&mut self, i: usize) {
        let t = &self.tasks[i];
        let failed = t.error.is_some() || matches!(t.sink, Sink::Conflict);
        if t.received >= t.expected || (t.unsolicited_done && failed) {
            let task = self.tasks.swap_remove(i);
            return self.complete_write(task);
        }
        if !self.tasks[i].unsolicited_done {
            return;
        }
        let max_r2t = self.params.max_outstanding_r2t.max(1);
        let burst = self.params.max_burst_len.max(512);
        while self.tasks[i].outstanding_r2t < max_r2t
            && self.tasks[i].next_r2t_offset < self.tasks[i].expected
        {
            let ttt = self.alloc_ttt();
            let (exp, max) = self.window();
            let t = &mut self.tasks[i];
            let len = (t.expected - t.next_r2t_offset).min(burst);
            let h = PduHeader::R2t(R2t {
                lun: t.lun_field,
                itt: t.itt,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                r2t_sn: t.r2t_sn,
                buffer_offset: t.next_r2t_offset,
                desired_len: len,
            });
            if self.strict {
                t.r2ts.push((ttt, t.next_r2t_offset, len));
            }
            let r2t_sn = t.r2t_sn;
            t.r2t_sn = r2t_sn.next();
            t.next_r2t_offset += len;
            t.outstanding_r2t += 1;
            let itt = t.itt;
            if self.shared.faults.take_r2t_drop(self.cid) {
                // As if a digest error had dropped it on the way: kept (ERL
                // 1) for a SNACK, not sent.
                log::debug!("fault injection: R2T R2TSN {r2t_sn} of ITT {itt:#x} left out");
            } else {
                crate::wire::iscsi::encode_pdu(&mut self.out, &h, &[], self.digests);
            }
            self.retain(itt, &h, &[]);
        }
    }

    /// Runs a write whose data is in and sends its status (the fault and
    /// the execution log wrap it: `complete_write`, recovery.rs).
    pub(super) fn execute_write(&mut self, task: WriteTask) {
        let r2ts = task.r2t_sn;
        if self.task_aborted(&task) {
            // Aborted by a PREEMPT AND ABORT of this nexus or a LUN reset:
            // no status.
            log::debug!(
                "task {:#x} aborted by PREEMPT AND ABORT or LUN reset",
                task.itt
            );
            return;
        }
        if let Some(sense) = task.error {
            return self.send_check(task.itt, sense, r2ts);
        }
        let alua_before = self.shared.alua_generation();
        let mut stpg = false;
        let result = match task.sink {
            Sink::PrOut { lun, cdb, buf } => {
                let Some(nexus) = self.nexus.clone() else {
                    return self.send_check(task.itt, Sense::INVALID_OPCODE, r2ts);
                };
                let params = &buf[..(task.received as usize).min(buf.len())];
                let r = self.shared.luns[lun]
                    .with_reservations(|r| r.reserve_out(&nexus, &cdb, params));
                return match r {
                    Ok(victims) => {
                        if !victims.is_empty() {
                            log::info!(
                                "PREEMPT AND ABORT by {}: tasks of {} I_T nexus(es) aborted",
                                nexus.initiator,
                                victims.len()
                            );
                        }
                        let resid = residual(task.transfer, task.expected);
                        self.send_status(task.itt, ScsiStatus::Good, resid, r2ts, None)
                    }
                    Err(super::pr::PrRefusal::Conflict) => {
                        let none = residual(0, 0);
                        let conflict = ScsiStatus::ReservationConflict;
                        self.send_status(task.itt, conflict, none, r2ts, None)
                    }
                    Err(super::pr::PrRefusal::Check(sense)) => {
                        self.send_check(task.itt, sense, r2ts)
                    }
                };
            }
            Sink::Conflict => {
                let none = residual(0, 0);
                let conflict = ScsiStatus::ReservationConflict;
                return self.send_status(task.itt, conflict, none, r2ts, None);
            }
            Sink::Params { lun, command, buf } => {
                stpg = command == scsi::ParamCommand::SetTargetPortGroups;
                scsi::finish_params(
                    &self.shared,
                    lun,
                    command,
                    &buf[..(task.received as usize).min(buf.len())],
                )
            }
            Sink::Lun { .. } | Sink::Discard => Ok(()),
        };
        if stpg && result.is_ok() {
            // SPC-4 §5.15.2.4: the I_T nexus that asked for the change
            // gets no UNIT ATTENTION for it; every other one does.
            let now = self.shared.alua_generation();
            for seen in &mut self.seen_alua {
                if *seen == alua_before {
                    *seen = now;
                }
            }
        }
        match result {
            Ok(()) => {
                let resid = residual(task.transfer, task.expected);
                self.send_status(task.itt, ScsiStatus::Good, resid, r2ts, None)
            }
            Err(sense) => self.send_check(task.itt, sense, r2ts),
        }
    }

    pub(super) fn on_data_out(&mut self, d: &DataOut, bhs: &[u8], data: &[u8]) {
        let Some(i) = self.tasks.iter().position(|t| t.itt == d.itt) else {
            // The command may have failed early; its data is stale.
            log::debug!("Data-Out for unknown ITT {:#x} dropped", d.itt);
            return;
        };
        if self.task_aborted(&self.tasks[i]) {
            // PREEMPT AND ABORT or a LUN reset ended it: its data must
            // not land.
            log::debug!("Data-Out for aborted task {:#x} dropped", d.itt);
            self.tasks.swap_remove(i);
            return;
        }
        if self.strict && !self.check_strict_data_out(i, d, data.len() as u32) {
            return;
        }
        let end = u64::from(d.buffer_offset) + data.len() as u64;
        if end > u64::from(self.tasks[i].expected) {
            return self.reject(reject::INVALID_FIELD, bhs);
        }
        // DataPDUInOrder and DataSequenceInOrder are Yes: offsets follow on,
        // DataSN counts from 0 in each sequence. ERL 0 cannot recover a gap.
        let t = &mut self.tasks[i];
        let expected_sn = t.expected_data_sn(d.ttt);
        if d.data_sn != expected_sn || d.buffer_offset != t.received {
            let why = format!(
                "Data-Out for ITT {:#x} has DataSN {} offset {}, expected DataSN {} offset {}",
                d.itt, d.data_sn, d.buffer_offset, expected_sn, t.received
            );
            return self.close(why);
        }
        t.sequence_ttt = (!d.final_bit).then_some(d.ttt);
        t.next_data_sn = expected_sn.next();
        store(&self.shared, &mut self.tasks[i].sink, d.buffer_offset, data);
        let t = &mut self.tasks[i];
        t.received = t.received.saturating_add(data.len() as u32);
        if d.ttt == RESERVED_TAG {
            if d.final_bit && !t.unsolicited_done {
                t.unsolicited_done = true;
                t.next_r2t_offset = t.next_r2t_offset.max(t.received);
            }
        } else if d.final_bit {
            t.outstanding_r2t = t.outstanding_r2t.saturating_sub(1);
            self.r2t_answered(d.itt, d.ttt);
        }
        self.advance_write(i);
    }
}
