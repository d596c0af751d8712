//! Text requests: SendTargets (discovery), renegotiation in the full
//! feature phase, and responses spanning several PDUs.

use super::*;

impl Core {
    pub(super) fn on_text(&mut self, t: &TextRequest, bhs: &[u8], data: &[u8]) {
        if !self.accept_cmd_sn(t.immediate, t.cmd_sn) {
            return;
        }
        if t.ttt != RESERVED_TAG {
            if t.ttt != self.text.ttt {
                return self.reject(reject::INVALID_FIELD, bhs);
            }
            if self.text.sent < self.text.outgoing.len() {
                return self.send_text_chunk(t);
            }
        } else {
            // A new exchange resets any earlier one.
            self.text.incoming.clear();
            self.text.outgoing.clear();
            self.text.sent = 0;
        }
        if self.text.incoming.len() + data.len() > MAX_LOGIN_TEXT {
            return self.reject(reject::INVALID_FIELD, bhs);
        }
        self.text.incoming.extend_from_slice(data);
        if t.cont {
            // More request text follows: empty answer with a TTT to echo.
            self.text.ttt = self.alloc_ttt();
            let (exp, max) = self.window();
            let h = PduHeader::TextResponse(TextResponse {
                final_bit: false,
                cont: false,
                lun: t.lun,
                itt: t.itt,
                ttt: self.text.ttt,
                stat_sn: self.next_stat_sn(),
                exp_cmd_sn: exp,
                max_cmd_sn: max,
            });
            return self.emit(&h, &[]);
        }
        let request = std::mem::take(&mut self.text.incoming);
        let pairs = match TextPairs::parse(&request) {
            Ok(p) => p,
            Err(_) => return self.reject(reject::INVALID_FIELD, bhs),
        };
        let mut reply = TextPairs::new();
        let mut declared = None;
        for (k, v) in pairs.iter() {
            if k == "SendTargets" {
                self.send_targets(v, &mut reply);
            } else if k == "MaxRecvDataSegmentLength" {
                // Declarative, "Use: ALL" (RFC 7143 §13.12): renegotiable in
                // the full feature phase. Theirs bounds what we send.
                match v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (512..=16_777_215).contains(n))
                {
                    Some(n) => {
                        self.params.max_xmit_data_segment_len = n;
                        let old = self.params.max_recv_data_segment_len;
                        let new = self.renegotiate.take().flatten().unwrap_or(old);
                        reply.push(k, new.to_string());
                        declared = Some((new, old));
                    }
                    None => reply.push(k, "Reject"),
                }
            } else {
                reply.push(k, "NotUnderstood");
            }
        }
        if let Some((new, old)) = declared {
            // The response goes out with the next StatSN.
            self.mrdsl_change = Some((self.stat_sn, new, old));
            self.params.max_recv_data_segment_len = new;
            if new > self.framer.max_data_segment_len {
                self.framer.max_data_segment_len = new;
            }
            self.shared.faults.count_renegotiation();
        }
        self.text.outgoing = reply.to_bytes();
        self.text.sent = 0;
        self.text.ttt = self.alloc_ttt();
        self.send_text_chunk(t);
    }

    fn send_targets(&self, which: &str, reply: &mut TextPairs) {
        let iqn = &self.shared.config.iqn;
        let ours = match which {
            "All" => true,
            // Empty: the target of this (normal) session.
            "" => self.session_type == SessionType::Normal,
            name => name == iqn,
        };
        if !ours {
            return;
        }
        reply.push("TargetName", iqn.clone());
        for p in &self.shared.portals {
            let mut addr = p.addr;
            if addr.ip().is_unspecified() {
                if let Some(local) = self.local_addr {
                    addr.set_ip(local.ip());
                }
            }
            reply.push("TargetAddress", format!("{addr},{}", p.tpgt));
        }
    }

    fn send_text_chunk(&mut self, t: &TextRequest) {
        let max = self.params.max_xmit_data_segment_len.max(512) as usize;
        let start = self.text.sent;
        let end = (start + max).min(self.text.outgoing.len());
        let last = end == self.text.outgoing.len();
        let (exp, max_cmd) = self.window();
        let h = PduHeader::TextResponse(TextResponse {
            final_bit: last,
            cont: !last,
            lun: t.lun,
            itt: t.itt,
            ttt: if last { RESERVED_TAG } else { self.text.ttt },
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max_cmd,
        });
        let chunk = std::mem::take(&mut self.text.outgoing);
        self.emit(&h, &chunk[start..end]);
        self.text.outgoing = chunk;
        self.text.sent = end;
        if last {
            self.text.outgoing.clear();
            self.text.sent = 0;
        }
    }
}
