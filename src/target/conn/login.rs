//! Login: the security and operational negotiation stages, CHAP, the
//! leading login that makes a session and the ones that join it (MC/S), and
//! the move to the full feature phase.

use super::*;

impl Core {
    fn login_fail(&mut self, r: &LoginRequest, class: u8, detail: u8, why: &str) {
        self.login_fail_with_text(r, class, detail, why, &[])
    }

    /// A login reject whose data segment carries `text` (declarations that
    /// explain the refusal).
    fn login_fail_with_text(
        &mut self,
        r: &LoginRequest,
        class: u8,
        detail: u8,
        why: &str,
        text: &[u8],
    ) {
        log::info!(
            "login from {:?} refused ({class:#04x}/{detail:#04x}): {why}",
            self.initiator_name
        );
        let (exp, max) = self.window();
        let h = PduHeader::LoginResponse(LoginResponse {
            transit: false,
            cont: false,
            csg: r.csg,
            nsg: r.csg,
            version_max: 0,
            version_active: 0,
            isid: r.isid,
            tsih: 0,
            itt: r.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            status_class: class,
            status_detail: detail,
        });
        self.emit(&h, text);
        self.close(format!("login failed: {why}"));
    }

    fn login_respond(
        &mut self,
        r: &LoginRequest,
        transit: bool,
        nsg: Stage,
        tsih: u16,
        text: &[u8],
    ) {
        let (exp, max) = self.window();
        let h = PduHeader::LoginResponse(LoginResponse {
            transit,
            cont: false,
            csg: r.csg,
            nsg: if transit { nsg } else { r.csg },
            version_max: 0,
            version_active: 0,
            isid: r.isid,
            tsih,
            itt: r.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            status_class: 0,
            status_detail: 0,
        });
        self.emit(&h, text);
    }

    fn chap_required(&self) -> bool {
        self.shared
            .config
            .chap
            .as_ref()
            .is_some_and(|c| self.session_type == SessionType::Normal || c.on_discovery)
    }

    pub(super) fn on_login(&mut self, r: &LoginRequest, data: &[u8]) {
        if !self.login.started {
            self.login.started = true;
            self.isid = r.isid;
            self.cid = r.cid;
            self.stat_sn = r.exp_stat_sn;
            self.exp_cmd_sn = r.cmd_sn;
            self.max_cmd_sn = r.cmd_sn.plus(self.shared.config.queue_depth.max(1) - 1);
            if r.version_min > 0 {
                return self.login_fail(r, 0x02, 0x05, "unsupported iSCSI version");
            }
            if let Some((class, detail)) = self.shared.faults.login_refusal(self.portal) {
                return self.login_fail(r, class, detail, "refused by fault injection");
            }
            if let Some((to, permanent)) = self.shared.faults.login_redirect(self.portal) {
                let mut t = TextPairs::new();
                t.push("TargetAddress", to.clone());
                let detail = if permanent { 0x02 } else { 0x01 };
                let why = format!("redirected to {to}");
                return self.login_fail_with_text(r, 0x01, detail, &why, &t.to_bytes());
            }
        }
        if r.tsih != 0 && !self.joining && !self.login.names_checked {
            // A connection for an existing session (MC/S): checked once the
            // InitiatorName of this first request is known.
            let pairs = TextPairs::parse(data).ok();
            if let Some(name) = pairs.as_ref().and_then(|p| p.get("InitiatorName")) {
                self.initiator_name = name.to_string();
            }
            let tpgt = self.shared.portals.get(self.portal).map_or(1, |p| p.tpgt);
            match self
                .shared
                .find_session(&self.initiator_name, r.isid, tpgt, r.tsih, r.cid)
            {
                Ok((session, ended)) => {
                    let mut params = session.params.clone();
                    // Per connection: digests and MaxRecvDataSegmentLength.
                    params.header_digest = self.params.header_digest;
                    params.data_digest = self.params.data_digest;
                    params.max_recv_data_segment_len = self.params.max_recv_data_segment_len;
                    params.max_xmit_data_segment_len = self.params.max_xmit_data_segment_len;
                    self.params = params;
                    let (exp, max) = session.cmd_window();
                    self.exp_cmd_sn = exp;
                    self.max_cmd_sn = max;
                    self.tsih = r.tsih;
                    self.session = Some(session);
                    self.ended = Some(ended);
                    self.joining = true;
                }
                Err(super::JoinRefusal::NoSession) => {
                    return self.login_fail(r, 0x02, 0x0a, "session does not exist (TSIH given)")
                }
                Err(super::JoinRefusal::TooManyConnections) => {
                    return self.login_fail(
                        r,
                        0x02,
                        0x09,
                        "the session has MaxConnections connections already",
                    )
                }
            }
        }
        if self.login.partial.len() + data.len() > MAX_LOGIN_TEXT {
            return self.login_fail(r, 0x02, 0x00, "login text too long");
        }
        if r.cont {
            // More text follows: acknowledge with an empty response.
            self.login.partial.extend_from_slice(data);
            return self.login_respond(r, false, r.csg, 0, &[]);
        }
        let text;
        let text_ref = if self.login.partial.is_empty() {
            data
        } else {
            self.login.partial.extend_from_slice(data);
            text = std::mem::take(&mut self.login.partial);
            &text[..]
        };
        let pairs = match TextPairs::parse(text_ref) {
            Ok(p) => p,
            Err(e) => return self.login_fail(r, 0x02, 0x00, &format!("bad login text: {e}")),
        };
        let mut reply = TextPairs::new();
        if let Err((class, detail, why)) = self.login_keys(r, &pairs, &mut reply) {
            return self.login_fail(r, class, detail, &why);
        }
        let chap_required = self.chap_required();
        let transit_allowed = match r.csg {
            Stage::Security => match self.security_step(&pairs, &mut reply) {
                Err(why) => {
                    let key = crate::iscsi::login::ACCEPTED_CHAP_ALGORITHMS_KEY;
                    let mut explain = TextPairs::new();
                    if let Some(v) = reply.get(key) {
                        explain.push(key, v.to_string());
                    }
                    return self.login_fail_with_text(r, 0x02, 0x01, &why, &explain.to_bytes());
                }
                Ok(()) => match self.login.auth {
                    Auth::Done => true,
                    Auth::NotStarted if !chap_required => true,
                    Auth::NotStarted if r.transit => {
                        return self.login_fail(r, 0x02, 0x01, "authentication required")
                    }
                    _ => false,
                },
            },
            Stage::Operational => {
                if chap_required && self.login.auth != Auth::Done {
                    return self.login_fail(r, 0x02, 0x01, "authentication required");
                }
                true
            }
            Stage::FullFeature => {
                return self.login_fail(r, 0x02, 0x0b, "login request in full feature stage")
            }
        };
        let transit = r.transit && transit_allowed;
        // Declarations the initiator needs from us.
        if !self.login.tpgt_sent && self.session_type == SessionType::Normal {
            self.login.tpgt_sent = true;
            let tpgt = self.shared.portals.get(self.portal).map_or(1, |p| p.tpgt);
            reply.push("TargetPortalGroupTag", tpgt.to_string());
            if let Some(alias) = &self.shared.config.alias {
                reply.push("TargetAlias", alias.clone());
            }
        }
        if !self.login.mrdsl_declared
            && (r.csg == Stage::Operational || pairs.get("MaxRecvDataSegmentLength").is_some())
        {
            self.login.mrdsl_declared = true;
            reply.push(
                "MaxRecvDataSegmentLength",
                self.params.max_recv_data_segment_len.to_string(),
            );
        }
        let text = reply.to_bytes();
        if transit && r.nsg == Stage::FullFeature && self.joining {
            if self.session_type != SessionType::Normal {
                return self.login_fail(r, 0x02, 0x00, "a discovery session has one connection");
            }
            let Some(session) = self.session.clone() else {
                return self.login_fail(r, 0x02, 0x0a, "session does not exist (TSIH given)");
            };
            match session.add_conn(self.cid) {
                Ok((flag, reinstated)) => {
                    if reinstated {
                        log::info!(
                            "connection CID {} of TSIH {} reinstated",
                            self.cid,
                            self.tsih
                        );
                    }
                    self.closing = Some(flag);
                }
                Err(()) => {
                    return self.login_fail(
                        r,
                        0x02,
                        0x09,
                        "the session has MaxConnections connections already",
                    )
                }
            }
            let tsih = self.tsih;
            self.login_respond(r, true, r.nsg, tsih, &text);
            self.enter_full_feature();
        } else if transit && r.nsg == Stage::FullFeature {
            let tsih = self.shared.allocate_tsih();
            self.tsih = tsih;
            self.login_respond(r, true, r.nsg, tsih, &text);
            self.enter_full_feature();
        } else {
            self.login_respond(r, transit, r.nsg, 0, &text);
        }
    }

    /// Declarative and operational keys; `Err` fails the login.
    fn login_keys(
        &mut self,
        r: &LoginRequest,
        pairs: &TextPairs,
        reply: &mut TextPairs,
    ) -> Result<(), (u8, u8, String)> {
        let mut target_named = false;
        for (k, v) in pairs.iter() {
            match k {
                "InitiatorName" => self.initiator_name = v.to_string(),
                "InitiatorAlias" => {}
                "SessionType" => {
                    self.session_type = match v {
                        "Normal" => SessionType::Normal,
                        "Discovery" => SessionType::Discovery,
                        _ => return Err((0x02, 0x00, format!("SessionType={v}"))),
                    }
                }
                "TargetName" => {
                    if v != self.shared.config.iqn {
                        return Err((0x02, 0x03, format!("no target named {v}")));
                    }
                    target_named = true;
                }
                "AuthMethod" => {}
                _ if k.starts_with("CHAP_") => {}
                "MaxRecvDataSegmentLength" => match v.parse::<u32>() {
                    Ok(n) if (512..=16_777_215).contains(&n) => {
                        self.params.max_xmit_data_segment_len = n
                    }
                    _ => reply.push(k, "Reject"),
                },
                // Declarations only a target makes; the initiator gets no answer.
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" | "SendTargets" => {
                    reply.push(k, "Irrelevant")
                }
                _ => self.negotiate(k, v, reply),
            }
        }
        if !self.login.names_checked && !r.cont {
            self.login.names_checked = true;
            if self.initiator_name.is_empty() {
                return Err((0x02, 0x07, "InitiatorName missing".into()));
            }
            if self.session_type == SessionType::Normal && !target_named {
                return Err((0x02, 0x07, "TargetName missing".into()));
            }
        }
        Ok(())
    }

    /// Answers one operational key with the RFC 7143 result function.
    fn negotiate(&mut self, key: &str, offer: &str, reply: &mut TextPairs) {
        let l = self.shared.config.limits;
        if self.joining && LEADING_ONLY.contains(&key) {
            // Session-wide ("LO", RFC 7143 §13): settled on the leading
            // connection; this one has the session's values.
            return reply.push(key, "Irrelevant");
        }
        let ours: String = match key {
            "HeaderDigest" | "DataDigest" => {
                if l.allow_digests {
                    "None,CRC32C".into()
                } else {
                    "None".into()
                }
            }
            "MaxConnections" => self.shared.config.max_connections.max(1).to_string(),
            "InitialR2T" => yes_no(l.initial_r2t).into(),
            "ImmediateData" => yes_no(l.immediate_data).into(),
            "MaxBurstLength" => l.max_burst_len.to_string(),
            "FirstBurstLength" => l.first_burst_len.to_string(),
            "DefaultTime2Wait" => "0".into(),
            // Time2Retain matters for connection recovery only: the
            // target keeps a failed connection's tasks for TASK REASSIGN
            // for DefaultTime2Wait + DefaultTime2Retain (recovery.rs).
            "DefaultTime2Retain" => if self.shared.config.max_error_recovery_level >= 2 {
                "20"
            } else {
                "0"
            }
            .into(),
            "MaxOutstandingR2T" => l.max_outstanding_r2t.to_string(),
            "DataPDUInOrder" | "DataSequenceInOrder" => "Yes".into(),
            "ErrorRecoveryLevel" => self
                .shared
                .config
                .max_error_recovery_level
                .min(2)
                .to_string(),
            "IFMarker" | "OFMarker" => "No".into(),
            "iSCSIProtocolLevel" => "1".into(),
            "TaskReporting" => "RFC3720".into(),
            _ => String::new(),
        };
        let answer = respond(key, offer, &ours).unwrap_or_else(|_| "Reject".into());
        if answer != "Reject" && answer != "NotUnderstood" {
            // Values came out of `respond`, so they parse.
            let _ = self.params.apply(key, &answer);
        }
        reply.push(key, answer);
    }

    /// AuthMethod and the CHAP exchange. `Err` is an authentication failure.
    fn security_step(&mut self, pairs: &TextPairs, reply: &mut TextPairs) -> Result<(), String> {
        let chap_cfg = self.shared.config.chap.clone();
        if let Some(offer) = pairs.get("AuthMethod") {
            let ours = match (&chap_cfg, self.chap_required()) {
                (Some(_), true) => "CHAP",
                (Some(_), false) => "CHAP,None",
                (None, _) => "None",
            };
            let chosen = respond("AuthMethod", offer, ours).unwrap_or_else(|_| "Reject".into());
            reply.push("AuthMethod", chosen.clone());
            self.login.auth = match chosen.as_str() {
                "CHAP" => Auth::ChapAlgorithm,
                "None" => Auth::Done,
                _ => return Err(format!("no acceptable AuthMethod in {offer}")),
            };
        }
        match self.login.auth {
            Auth::ChapAlgorithm => {
                let Some(algs) = pairs.get("CHAP_A") else {
                    return Ok(());
                };
                let accepted = chap_cfg
                    .as_ref()
                    .map_or(&[][..], |c| c.algorithms.as_slice());
                let Some(algorithm) = chap::choose_algorithm(algs, accepted) else {
                    // Say what we take, for the initiator's error message.
                    reply.push(
                        crate::iscsi::login::ACCEPTED_CHAP_ALGORITHMS_KEY,
                        chap::ChapAlgorithm::offer(accepted),
                    );
                    return Err(format!(
                        "initiator offered CHAP_A={algs} ({}); this target accepts {}",
                        chap::ChapAlgorithm::describe_wire(algs),
                        chap::ChapAlgorithm::describe(accepted)
                    ));
                };
                let id: u8 = rand::random();
                let challenge: [u8; 32] = rand::random();
                let challenge_len = algorithm.challenge_len().min(32);
                reply.push("CHAP_A", algorithm.code().to_string());
                reply.push("CHAP_I", id.to_string());
                reply.push("CHAP_C", chap::encode_hex(&challenge[..challenge_len]));
                self.login.auth = Auth::ChapResponse {
                    id,
                    challenge,
                    challenge_len: challenge_len as u8,
                    algorithm,
                };
            }
            Auth::ChapResponse {
                id,
                challenge,
                challenge_len,
                algorithm,
            } => {
                let challenge = &challenge[..usize::from(challenge_len)];
                let cfg = chap_cfg.ok_or("CHAP is not configured")?;
                let (Some(name), Some(resp)) = (pairs.get("CHAP_N"), pairs.get("CHAP_R")) else {
                    return Err("CHAP_N/CHAP_R missing".into());
                };
                let resp = chap::decode_binary(resp).map_err(|e| e.to_string())?;
                if name != cfg.initiator.user
                    || chap::verify(algorithm, id, &cfg.initiator.secret, challenge, &resp).is_err()
                {
                    return Err(format!("CHAP response of user {name:?} does not verify"));
                }
                match (pairs.get("CHAP_I"), pairs.get("CHAP_C")) {
                    (Some(i), Some(c)) => {
                        let target = cfg
                            .target
                            .ok_or("mutual CHAP asked, but no target secret")?;
                        let i = chap::parse_identifier(i).map_err(|e| e.to_string())?;
                        let c = chap::decode_binary(c).map_err(|e| e.to_string())?;
                        if c == challenge {
                            return Err("initiator reflected our CHAP challenge".into());
                        }
                        reply.push("CHAP_N", target.user.clone());
                        reply.push(
                            "CHAP_R",
                            chap::encode_hex(&chap::response(algorithm, i, &target.secret, &c)),
                        );
                    }
                    (None, None) => {}
                    _ => return Err("CHAP_I without CHAP_C or the reverse".into()),
                }
                self.login.auth = Auth::Done;
            }
            Auth::NotStarted | Auth::Done => {}
        }
        Ok(())
    }

    fn enter_full_feature(&mut self) {
        self.phase = Phase::FullFeature;
        if self.session_type == SessionType::Normal {
            let tpgt = self.shared.portals.get(self.portal).map_or(1, |p| p.tpgt);
            if !self.joining {
                let session = Arc::new(Session::new(
                    self.tsih,
                    self.params.clone(),
                    self.exp_cmd_sn,
                    self.max_cmd_sn,
                ));
                // A new session has room for its first connection.
                if let Ok((flag, _)) = session.add_conn(self.cid) {
                    self.closing = Some(flag);
                }
                let (ended, _) = self.shared.enter_session(
                    &self.initiator_name,
                    self.isid,
                    tpgt,
                    session.clone(),
                );
                self.session = Some(session);
                self.ended = Some(ended);
            }
            self.nexus = Some(super::pr::ItNexus {
                initiator: self.initiator_name.clone(),
                isid: self.isid,
                tpgt,
            });
        }
        self.digests = self.params.digests();
        self.framer = PduFramer {
            digests: self.digests,
            // Strict mode frames longer segments too, to name the rule.
            max_data_segment_len: if self.strict {
                16 << 20
            } else {
                self.params.max_recv_data_segment_len
            },
        };
        self.exp_stat_sn_seen = self.stat_sn;
        self.async_seen = self.shared.faults.async_generation();
        let ua = self
            .shared
            .config
            .unit_attentions
            .then_some(Sense::POWER_ON_RESET);
        self.unit_attention = vec![ua; self.shared.luns.len()];
        self.seen_resets = self
            .shared
            .luns
            .iter()
            .map(|l| l.reset_generation())
            .collect();
        self.seen_alua = vec![self.shared.alua_generation(); self.shared.luns.len()];
        log::debug!(
            "login of {} complete: {:?} session, TSIH {}, {}",
            self.initiator_name,
            self.session_type,
            self.tsih,
            self.params
        );
    }
}
