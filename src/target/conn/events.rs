//! Async messages the fault injector asks for, and the logout deadline
//! that AsyncEvent 1 starts.

use super::*;

impl Core {
    /// Sends an async message the fault injector has for this connection.
    pub(super) fn poll_async(&mut self, now: Instant) {
        if self.phase != Phase::FullFeature || self.session_type != SessionType::Normal {
            return;
        }
        let faults = self.shared.faults.clone();
        let Some(event) = faults.take_async_event(self.portal, &mut self.async_seen) else {
            return;
        };
        faults.count_async_sent();
        let (mut lun, mut params, mut data) = (0u64, (0u16, 0u16, 0u16), Vec::new());
        match event {
            AsyncEvent::Scsi { lun: n, sense } => {
                lun = scsi::encode_lun(n);
                let s = Sense {
                    key: SenseKey::from_bits(sense.key),
                    asc: sense.asc,
                    ascq: sense.ascq,
                    information: None,
                    sense_key_specific: None,
                };
                data = vec![0u8; 2 + Sense::FIXED_LEN];
                data[1] = Sense::FIXED_LEN as u8;
                data[2..].copy_from_slice(&s.emit_fixed());
            }
            AsyncEvent::RequestLogout { within } => {
                params.2 = within;
                self.logout_due = Some(now + std::time::Duration::from_secs(u64::from(within)));
            }
            AsyncEvent::DropConnection {
                time2wait,
                time2retain,
            }
            | AsyncEvent::DropSession {
                time2wait,
                time2retain,
            } => {
                params = (self.cid, time2wait, time2retain);
                if matches!(event, AsyncEvent::DropSession { .. }) {
                    params.0 = 0;
                }
            }
            AsyncEvent::Renegotiate {
                max_recv_data_segment_len,
            } => self.renegotiate = Some(max_recv_data_segment_len),
        }
        let (exp, max) = self.window();
        let h = PduHeader::AsyncMessage(AsyncMessage {
            lun,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            event: event.code(),
            vcode: 0,
            param1: params.0,
            param2: params.1,
            param3: params.2,
        });
        self.emit(&h, &data);
        log::info!(
            "sent AsyncEvent {} to {} ({event:?})",
            event.code(),
            self.initiator_name
        );
        if event.code() == 2 || event.code() == 3 {
            self.close(format!(
                "dropped after announcing it (AsyncEvent {})",
                event.code()
            ));
        }
    }

    /// After an AsyncEvent 1: closes the connection once Parameter3 has
    /// passed without a logout. True when it did.
    pub(super) fn logout_overdue(&mut self, now: Instant) -> bool {
        if self.phase != Phase::FullFeature || self.logout_due.is_none_or(|due| now < due) {
            return false;
        }
        self.logout_due = None;
        self.shared.faults.count_logout(false);
        self.close("the initiator did not log out within Parameter3 of AsyncEvent 1");
        true
    }
}
