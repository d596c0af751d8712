//! Strict mode: the checks of the rules an initiator must keep (reserved
//! fields, sequence numbers, segment lengths, Data-Out order), each broken
//! rule recorded as a [`Violation`] and the connection ended.

use super::*;

impl Core {
    /// Strict mode: records that the initiator broke `rule` and ends the
    /// connection. Returns false, for `return` in the checks.
    pub(super) fn violation(&mut self, rule: Rule, detail: String) -> bool {
        let v = Violation {
            rule,
            initiator: self.initiator_name.clone(),
            detail,
        };
        let reason = format!("strict mode: {v}");
        self.shared.record_violation(v);
        self.close(reason);
        false
    }

    /// The MaxRecvDataSegmentLength a PDU acknowledging up to `exp_stat_sn`
    /// must keep: after a renegotiation, the new value once the initiator
    /// has seen the Text Response that declared it, the larger one before.
    pub(super) fn recv_limit(&self, exp_stat_sn: Option<Sn>) -> u32 {
        let ours = self.params.max_recv_data_segment_len;
        match (self.mrdsl_change, exp_stat_sn) {
            (Some((answer, new, _)), Some(e)) if e.gt(answer) => new,
            (Some((_, new, old)), _) => new.max(old),
            (None, _) => ours,
        }
    }

    /// The checks of strict mode that need no task: reserved fields,
    /// CmdSN, ExpStatSN, segment length, the SCSI Command's F bit and
    /// immediate data. False: a rule was broken (the connection is closed).
    pub(super) fn check_strict(&mut self, h: &PduHeader, bhs: &[u8], data: &[u8]) -> bool {
        let what = strict::what(h);
        if let Some((field, value)) = strict::reserved_set(h, bhs) {
            return self.violation(
                Rule::ReservedZero,
                format!("{what}: {field} is {value:#x}, not 0"),
            );
        }
        let exp_stat_sn = strict::exp_stat_sn_of(h);
        let mcs = self
            .session
            .as_ref()
            .is_some_and(|s| s.max_connections() > 1);
        if let Some(e) = exp_stat_sn {
            // Acknowledges at most what we sent (StatSN up to stat_sn - 1),
            // and never less than before (except a PDU that waited for its
            // CmdSN turn, MC/S).
            if e.gt(self.stat_sn) || (!mcs && e.lt(self.exp_stat_sn_seen)) {
                return self.violation(
                    Rule::ExpStatSn,
                    format!(
                        "{what} has ExpStatSN {e}; the target has sent StatSN up to {} and was acknowledged up to {}",
                        Sn(self.stat_sn.0.wrapping_sub(1)),
                        Sn(self.exp_stat_sn_seen.0.wrapping_sub(1))
                    ),
                );
            }
            if e.gt(self.exp_stat_sn_seen) {
                self.exp_stat_sn_seen = e;
            }
        }
        let several = self
            .session
            .as_ref()
            .map_or((false, (self.exp_cmd_sn, self.max_cmd_sn)), |s| {
                (s.max_connections() > 1, s.cmd_window())
            });
        if let (Some((_, cmd_sn)), (true, (exp, max))) = (strict::cmd_sn_of(h), several) {
            // MC/S: a CmdSN may run ahead of ExpCmdSN (lower ones come on
            // other connections), but never out of the window.
            if !strict::is_ping_answer(h) && (cmd_sn.lt(exp) || cmd_sn.gt(max)) {
                return self.violation(
                    Rule::CmdSnWindow,
                    format!("{what} has CmdSN {cmd_sn}; the session's window is [{exp}, {max}]"),
                );
            }
        } else if let Some((immediate, cmd_sn)) = strict::cmd_sn_of(h) {
            if immediate || strict::is_ping_answer(h) {
                if cmd_sn != self.exp_cmd_sn {
                    return self.violation(
                        Rule::ImmediateCmdSn,
                        format!(
                            "immediate {what} has CmdSN {cmd_sn}, not the next CmdSN {} (ExpCmdSN)",
                            self.exp_cmd_sn
                        ),
                    );
                }
            } else if cmd_sn != self.exp_cmd_sn || cmd_sn.gt(self.max_cmd_sn) {
                return self.violation(
                    Rule::CmdSnWindow,
                    format!(
                        "{what} has CmdSN {cmd_sn}; ExpCmdSN is {}, MaxCmdSN {}",
                        self.exp_cmd_sn, self.max_cmd_sn
                    ),
                );
            }
        }
        let limit = self.recv_limit(exp_stat_sn);
        if data.len() > limit as usize {
            return self.violation(
                Rule::MaxRecvDataSegmentLength,
                format!(
                    "{what} carries a {}-byte data segment; the target's MaxRecvDataSegmentLength is {limit}",
                    data.len()
                ),
            );
        }
        if let PduHeader::ScsiCommand(c) = h {
            let expected = if c.write { c.expected_data_len } else { 0 };
            let first_burst = self.params.first_burst_len.min(expected);
            if !data.is_empty() && !self.params.immediate_data {
                return self.violation(
                    Rule::UnsolicitedData,
                    format!(
                        "SCSI Command carries {} bytes of immediate data with ImmediateData=No",
                        data.len()
                    ),
                );
            }
            if data.len() as u64 > u64::from(self.params.first_burst_len) {
                return self.violation(
                    Rule::FirstBurstLength,
                    format!(
                        "{} bytes of immediate data; FirstBurstLength is {}",
                        data.len(),
                        self.params.first_burst_len
                    ),
                );
            }
            if !c.final_bit {
                if !c.write || self.params.initial_r2t {
                    return self.violation(
                        Rule::FinalBit,
                        format!(
                            "SCSI Command without the F bit, but no unsolicited Data-Out may follow ({}, InitialR2T={})",
                            if c.write { "a write" } else { "not a write" },
                            if self.params.initial_r2t { "Yes" } else { "No" }
                        ),
                    );
                }
                if data.len() as u32 >= first_burst {
                    return self.violation(
                        Rule::FinalBit,
                        format!(
                            "SCSI Command without the F bit after {} bytes of immediate data: the unsolicited burst ({first_burst} bytes) is complete",
                            data.len()
                        ),
                    );
                }
            }
        }
        true
    }

    /// Strict checks of a Data-Out against its task `i`. False: broken.
    pub(super) fn check_strict_data_out(&mut self, i: usize, d: &DataOut, len: u32) -> bool {
        let first_burst = self.params.first_burst_len;
        let initial_r2t = self.params.initial_r2t;
        let t = &self.tasks[i];
        let expected_sn = t.expected_data_sn(d.ttt);
        if d.data_sn != expected_sn || d.buffer_offset != t.received {
            let detail = format!(
                "Data-Out for ITT {:#x} has DataSN {} at offset {}, expected DataSN {} at offset {}",
                d.itt, d.data_sn, d.buffer_offset, expected_sn, t.received
            );
            return self.violation(Rule::DataSnOrder, detail);
        }
        if d.ttt == RESERVED_TAG {
            if initial_r2t {
                let detail = format!(
                    "unsolicited Data-Out for ITT {:#x} with InitialR2T=Yes",
                    d.itt
                );
                return self.violation(Rule::UnsolicitedData, detail);
            }
            if t.unsolicited_done {
                let detail = format!(
                    "unsolicited Data-Out for ITT {:#x} after the F bit ended the unsolicited burst",
                    d.itt
                );
                return self.violation(Rule::FinalBit, detail);
            }
            let total = t.unsolicited.saturating_add(len);
            let burst = first_burst.min(t.expected);
            if total > first_burst {
                let detail = format!(
                    "{total} bytes of unsolicited data for ITT {:#x}; FirstBurstLength is {first_burst}",
                    d.itt
                );
                return self.violation(Rule::FirstBurstLength, detail);
            }
            if total == burst && !d.final_bit {
                let detail = format!(
                    "the Data-Out that completes ITT {:#x}'s unsolicited burst ({burst} bytes) lacks the F bit",
                    d.itt
                );
                return self.violation(Rule::FinalBit, detail);
            }
            self.tasks[i].unsolicited = total;
            return true;
        }
        let Some(k) = t.r2ts.iter().position(|r| r.0 == d.ttt) else {
            let detail = format!(
                "Data-Out for ITT {:#x} with TTT {:#x}, which no outstanding R2T gave: data beyond what the R2Ts asked for",
                d.itt, d.ttt
            );
            return self.violation(Rule::MaxBurstLength, detail);
        };
        let (_, off, want) = t.r2ts[k];
        let end = u64::from(d.buffer_offset) + u64::from(len);
        let r2t_end = u64::from(off) + u64::from(want);
        if end > r2t_end {
            let detail = format!(
                "Data-Out for ITT {:#x} (TTT {:#x}) reaches byte {end}; its R2T asked for {want} bytes from {off} (MaxBurstLength {})",
                d.itt, d.ttt, self.params.max_burst_len
            );
            return self.violation(Rule::MaxBurstLength, detail);
        }
        if (end == r2t_end) != d.final_bit {
            let detail = format!(
                "Data-Out for ITT {:#x} (TTT {:#x}) ending at byte {end} of the R2T's {off}..{r2t_end} {} the F bit",
                d.itt,
                d.ttt,
                if d.final_bit { "has" } else { "lacks" }
            );
            return self.violation(Rule::FinalBit, detail);
        }
        if d.final_bit {
            self.tasks[i].r2ts.swap_remove(k);
        }
        true
    }
}
