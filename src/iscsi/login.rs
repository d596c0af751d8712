//! The initiator's login state machine (RFC 7143 §6.3, §11.12-13), sans-IO.
//!
//! Security stage (AuthMethod None or CHAP, one-way or mutual), then the
//! operational stage, then full feature phase. Multi-PDU text in both
//! directions (C bit). Every login status class is turned into a clear error.

use super::chap::{self, ChapAlgorithm, ChapError, Credentials, Secret};
use super::params::{self, NegotiationError, Offer, Params};
use crate::wire::iscsi::{encode_pdu, Digests, LoginRequest, LoginResponse, PduHeader, Sn, Stage};
use crate::wire::text::{TextError, TextPairs};
use rand::RngCore;
use thiserror::Error;

/// Login PDUs are limited to 8192 bytes of data until MaxRecvDataSegmentLength
/// has been negotiated (RFC 7143 §13.12).
pub const LOGIN_MAX_DATA: usize = 8192;
/// A bound on the text a target may send in one login exchange (all C-bit
/// continuations together), so a broken target cannot make us allocate without end.
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SessionType {
    Normal,
    Discovery,
}

#[derive(Debug, Error)]
pub enum LoginError {
    #[error("login failed: authentication failed (status 0x0201): wrong CHAP user or secret, or the target requires CHAP")]
    AuthenticationFailed,
    #[error("login failed: initiator not authorized for this target (status 0x0202)")]
    NotAuthorized,
    #[error("login failed: target not found (status 0x0203): check the target IQN")]
    TargetNotFound,
    #[error("login failed: target removed (status 0x0204)")]
    TargetRemoved,
    #[error("login failed: unsupported iSCSI version (status 0x0205)")]
    UnsupportedVersion,
    #[error("login failed: too many connections (status 0x0206)")]
    TooManyConnections,
    #[error("login failed: missing parameter (status 0x0207)")]
    MissingParameter,
    #[error("login failed: cannot include this connection in the session (status 0x0208)")]
    CantIncludeInSession,
    #[error("login failed: session type not supported (status 0x0209)")]
    SessionTypeNotSupported,
    #[error("login failed: session does not exist (status 0x020a)")]
    SessionDoesNotExist,
    #[error("login failed: invalid request during login (status 0x020b)")]
    InvalidDuringLogin,
    #[error("login failed: initiator error (status 0x02{0:02x})")]
    InitiatorError(u8),
    #[error("login failed: target error (status 0x03{:02x}){}", .0, target_error_text(*.0))]
    TargetError(u8),
    #[error("login redirected (status 0x01{detail:02x}) to {address}")]
    Redirected { detail: u8, address: String },
    #[error("login failed: unknown status class 0x{class:02x} detail 0x{detail:02x}")]
    UnknownStatus { class: u8, detail: u8 },
    #[error("login protocol error: {0}")]
    Protocol(String),
    #[error("login negotiation failed: {0}")]
    Negotiation(#[from] NegotiationError),
    #[error("login text from the target is malformed: {0}")]
    Text(#[from] TextError),
    #[error("CHAP: {0}")]
    Chap(#[from] ChapError),
    #[error("login failed: the target refused our CHAP response, computed with {algorithm}: {status}{}", chap_refusal_hint(*.algorithm))]
    ChapResponseRefused {
        algorithm: ChapAlgorithm,
        status: Box<LoginError>,
    },
    #[error("target did not authenticate: mutual CHAP was configured but the target skipped CHAP")]
    MutualChapSkipped,
    #[error("target requires CHAP (AuthMethod={0}) but no CHAP credentials were given")]
    ChapRequired(String),
}

fn chap_refusal_hint(algorithm: ChapAlgorithm) -> &'static str {
    if algorithm == ChapAlgorithm::Sha256 {
        " (tgt's tgtd takes CHAP_A=7 to mean SHA-1, against the IANA registry; \
         leave sha256 out of --chap-algorithms / LoginConfig::chap_algorithms for it)"
    } else {
        ""
    }
}

fn target_error_text(detail: u8) -> &'static str {
    match detail {
        0 => ": target error",
        1 => ": service unavailable",
        2 => ": out of resources",
        _ => "",
    }
}

/// Everything needed to log in one connection.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// Required for a normal session; absent for discovery.
    pub target_name: Option<String>,
    pub session_type: SessionType,
    pub isid: [u8; 6],
    /// 0 for a new session; the session's TSIH to add a connection (MC/S).
    pub tsih: u16,
    pub cid: u16,
    /// Our CHAP identity towards the target.
    pub chap: Option<Credentials>,
    /// The target's expected identity for mutual CHAP.
    pub mutual_chap: Option<Credentials>,
    /// CHAP_A values we offer, in order of preference (default: SHA3-256,
    /// SHA-256, SHA-1, MD5). Mutual CHAP uses the algorithm the target chose.
    pub chap_algorithms: Vec<ChapAlgorithm>,
    pub offer: Offer,
}

/// A vendor key (RFC 7143 §13.22 X- keys) with which the embedded target
/// says, in the login reject, which CHAP algorithms it accepts when the
/// initiator offered none of them.
pub const ACCEPTED_CHAP_ALGORITHMS_KEY: &str = "X-org.iscsi-bypass.CHAP_A-accepted";

impl LoginConfig {
    pub fn new(initiator_name: &str, target_name: Option<&str>) -> LoginConfig {
        LoginConfig {
            initiator_name: initiator_name.to_string(),
            initiator_alias: None,
            target_name: target_name.map(str::to_string),
            session_type: if target_name.is_some() {
                SessionType::Normal
            } else {
                SessionType::Discovery
            },
            isid: random_isid(),
            tsih: 0,
            cid: 0,
            chap: None,
            mutual_chap: None,
            chap_algorithms: ChapAlgorithm::PREFERRED.to_vec(),
            offer: Offer::default(),
        }
    }
}

/// A random-type ISID (RFC 7143 §11.12.5: T=10b, random B and C).
pub fn random_isid() -> [u8; 6] {
    let mut r = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut r);
    [0x80, 0x00, r[0], r[1], r[2], r[3]]
}

/// What a successful login produced.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    pub params: Params,
    pub tsih: u16,
    pub isid: [u8; 6],
    pub cid: u16,
    /// Next CmdSN to use.
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthStep {
    /// Sent AuthMethod offer.
    Offered,
    /// Sent CHAP_A.
    SentAlgorithm,
    /// Sent CHAP_N/CHAP_R (and our challenge when mutual).
    SentResponse,
}

/// Progress of a login after a response.
#[derive(Debug)]
pub enum LoginProgress {
    /// A new request was appended to the output; wait for the next response.
    Continue,
    Done(LoginOutcome),
}

pub struct Login {
    config: LoginConfig,
    itt: u32,
    cmd_sn: Sn,
    exp_stat_sn: Sn,
    first_response_seen: bool,
    stage: Stage,
    auth: AuthStep,
    /// Our pending operational offers: key → value offered.
    offers: Vec<(String, String)>,
    params: Params,
    tsih: u16,
    /// Text accumulated from responses with the C bit.
    partial_in: Vec<u8>,
    /// Our text not sent yet because it did not fit one PDU.
    partial_out: Vec<u8>,
    /// T bit and NSG we want for the request whose text is in flight.
    want_transit: bool,
    want_nsg: Stage,
    mutual_challenge: Option<(u8, Vec<u8>)>,
    our_challenge_sent: Option<Vec<u8>>,
    /// The CHAP algorithm the target chose.
    chap_algorithm: Option<ChapAlgorithm>,
    /// A login that adds a connection to a running session (MC/S): it
    /// offers only the keys that are negotiated per connection.
    non_leading: bool,
}

/// Keys negotiated per connection (RFC 7143 §13: "Use: IO" or "ALL" with
/// connection scope); the others are leading-only and may not be offered
/// in the login of a further connection (§6.3, §13).
const CONNECTION_KEYS: [&str; 3] = ["HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength"];

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("stage", &self.stage)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Login {
    pub fn new(config: LoginConfig, itt: u32, cmd_sn: Sn) -> Login {
        let params = Params {
            max_recv_data_segment_len: config.offer.max_recv_data_segment_len,
            ..Params::default()
        };
        let tsih = config.tsih;
        Login {
            config,
            itt,
            cmd_sn,
            exp_stat_sn: Sn(0),
            first_response_seen: false,
            stage: Stage::Security,
            auth: AuthStep::Offered,
            offers: Vec::new(),
            params,
            tsih,
            partial_in: Vec::new(),
            partial_out: Vec::new(),
            want_transit: false,
            want_nsg: Stage::Security,
            mutual_challenge: None,
            our_challenge_sent: None,
            chap_algorithm: None,
            non_leading: false,
        }
    }

    /// The login of one more connection of a running session (MC/S, RFC
    /// 7143 §6.3): `config` carries the session's ISID and TSIH and the new
    /// CID, `cmd_sn` is the session's next CmdSN, and `session` the
    /// leading login's parameters, which the new connection shares. Only
    /// the per-connection keys are offered; the target must answer with the
    /// same TSIH.
    pub fn non_leading(config: LoginConfig, itt: u32, cmd_sn: Sn, session: &Params) -> Login {
        let offered_mrdsl = config.offer.max_recv_data_segment_len;
        let mut login = Login::new(config, itt, cmd_sn);
        let fresh = Params::default();
        login.params = Params {
            header_digest: fresh.header_digest,
            data_digest: fresh.data_digest,
            max_recv_data_segment_len: offered_mrdsl,
            max_xmit_data_segment_len: fresh.max_xmit_data_segment_len,
            ..session.clone()
        };
        login.non_leading = true;
        login
    }

    /// Appends the first Login Request to `out`.
    pub fn start(&mut self, out: &mut Vec<u8>) {
        let mut t = TextPairs::new();
        t.push("InitiatorName", self.config.initiator_name.clone());
        if let Some(alias) = &self.config.initiator_alias {
            t.push("InitiatorAlias", alias.clone());
        }
        match self.config.session_type {
            SessionType::Normal => {
                t.push("SessionType", "Normal");
                if let Some(target) = &self.config.target_name {
                    t.push("TargetName", target.clone());
                }
            }
            SessionType::Discovery => t.push("SessionType", "Discovery"),
        }
        if self.config.chap.is_some() {
            // With mutual CHAP configured, never let the target skip authentication.
            let methods = if self.config.mutual_chap.is_some() {
                "CHAP"
            } else {
                "CHAP,None"
            };
            t.push("AuthMethod", methods);
            self.send_text(out, t.to_bytes(), false, Stage::Security);
        } else {
            t.push("AuthMethod", "None");
            self.send_text(out, t.to_bytes(), true, Stage::Operational);
        }
    }

    fn send_text(&mut self, out: &mut Vec<u8>, text: Vec<u8>, transit: bool, nsg: Stage) {
        self.partial_out = text;
        self.want_transit = transit;
        self.want_nsg = nsg;
        self.send_next_chunk(out);
    }

    fn send_next_chunk(&mut self, out: &mut Vec<u8>) {
        let n = self.partial_out.len().min(LOGIN_MAX_DATA);
        let chunk: Vec<u8> = self.partial_out.drain(..n).collect();
        let more = !self.partial_out.is_empty();
        let hdr = PduHeader::LoginRequest(LoginRequest {
            // The T bit may not be set together with C (RFC 7143 §11.12.2).
            transit: self.want_transit && !more,
            cont: more,
            csg: self.stage,
            nsg: if self.want_transit && !more {
                self.want_nsg
            } else {
                self.stage
            },
            version_max: 0,
            version_min: 0,
            isid: self.config.isid,
            tsih: self.tsih,
            itt: self.itt,
            cid: self.config.cid,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        encode_pdu(out, &hdr, &chunk, Digests::default());
    }

    /// Handles one Login Response. Appends the next request (if any) to `out`.
    pub fn on_response(
        &mut self,
        rsp: &LoginResponse,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<LoginProgress, LoginError> {
        self.check_header(rsp)?;
        if rsp.status_class != 0 {
            if (rsp.status_class, rsp.status_detail) == (2, 1)
                && self.stage == Stage::Security
                && self.auth == AuthStep::SentAlgorithm
            {
                // Refused right after our CHAP_A: no algorithm in common.
                return Err(self.algorithms_refused(data).into());
            }
            let status = status_error(rsp.status_class, rsp.status_detail, data);
            if rsp.status_class == 2
                && self.stage == Stage::Security
                && self.auth == AuthStep::SentResponse
            {
                if let Some(algorithm) = self.chap_algorithm {
                    return Err(LoginError::ChapResponseRefused {
                        algorithm,
                        status: Box::new(status),
                    });
                }
            }
            return Err(status);
        }
        if self.partial_in.len() + data.len() > MAX_LOGIN_TEXT {
            return Err(LoginError::Protocol(format!(
                "target sent more than {MAX_LOGIN_TEXT} bytes of login text"
            )));
        }
        self.partial_in.extend_from_slice(data);
        if rsp.cont {
            if rsp.transit {
                return Err(LoginError::Protocol(
                    "login response has both the T and the C bit".into(),
                ));
            }
            // Ask for the rest of the target's text with an empty request,
            // keeping the stage transition we asked for.
            self.send_text(out, Vec::new(), self.want_transit, self.want_nsg);
            return Ok(LoginProgress::Continue);
        }
        if !self.partial_out.is_empty() {
            // The target acknowledged one chunk of our multi-PDU text.
            if !data.is_empty() {
                return Err(LoginError::Protocol(
                    "target answered before our multi-PDU text was complete".into(),
                ));
            }
            self.send_next_chunk(out);
            return Ok(LoginProgress::Continue);
        }
        let text = std::mem::take(&mut self.partial_in);
        let pairs = TextPairs::parse_unique(&text)?;
        if self.non_leading && rsp.tsih != 0 && rsp.tsih != self.tsih {
            return Err(LoginError::Protocol(format!(
                "target answered the login of a new connection (CID {}) of session TSIH {:#06x} with TSIH {:#06x}",
                self.config.cid, self.tsih, rsp.tsih
            )));
        }
        if rsp.tsih != 0 {
            self.tsih = rsp.tsih;
        }
        match self.stage {
            Stage::Security => self.security_step(rsp, &pairs, out),
            Stage::Operational => self.operational_step(rsp, &pairs, out),
            Stage::FullFeature => Err(LoginError::Protocol(
                "login response after full feature phase".into(),
            )),
        }
    }

    fn check_header(&mut self, rsp: &LoginResponse) -> Result<(), LoginError> {
        if rsp.itt != self.itt {
            return Err(LoginError::Protocol(format!(
                "login response for task tag {:#x}, expected {:#x}",
                rsp.itt, self.itt
            )));
        }
        if rsp.version_active != 0 {
            return Err(LoginError::UnsupportedVersion);
        }
        if rsp.status_class == 0 {
            if rsp.csg != self.stage {
                return Err(LoginError::Protocol(format!(
                    "target answered in stage {:?} while we are in {:?}",
                    rsp.csg, self.stage
                )));
            }
            if rsp.transit && (!self.want_transit || stage_after(rsp.nsg, self.want_nsg)) {
                return Err(LoginError::Protocol(format!(
                    "target switched to stage {:?} that we did not ask for",
                    rsp.nsg
                )));
            }
            if rsp.transit && rsp.nsg == Stage::Security {
                return Err(LoginError::Protocol(
                    "target asked to transit back to the security stage".into(),
                ));
            }
        }
        if self.first_response_seen && rsp.stat_sn != self.exp_stat_sn && rsp.status_class == 0 {
            return Err(LoginError::Protocol(format!(
                "login StatSN {} out of order (expected {})",
                rsp.stat_sn, self.exp_stat_sn
            )));
        }
        self.first_response_seen = true;
        self.exp_stat_sn = rsp.stat_sn.next();
        Ok(())
    }

    fn security_step(
        &mut self,
        rsp: &LoginResponse,
        pairs: &TextPairs,
        out: &mut Vec<u8>,
    ) -> Result<LoginProgress, LoginError> {
        if let Some(pgt) = pairs.get("TargetPortalGroupTag") {
            self.params.apply("TargetPortalGroupTag", pgt)?;
        }
        match self.auth {
            AuthStep::Offered => {
                let method = pairs.get("AuthMethod").unwrap_or("None");
                match (method, &self.config.chap) {
                    ("CHAP", Some(_)) => {
                        if rsp.transit {
                            return Err(LoginError::Protocol(
                                "target chose CHAP but left the security stage".into(),
                            ));
                        }
                        if self.config.chap_algorithms.is_empty() {
                            return Err(ChapError::AlgorithmList(
                                "the list of CHAP algorithms to offer is empty".into(),
                            )
                            .into());
                        }
                        let mut t = TextPairs::new();
                        t.push("CHAP_A", ChapAlgorithm::offer(&self.config.chap_algorithms));
                        self.auth = AuthStep::SentAlgorithm;
                        self.send_text(out, t.to_bytes(), false, Stage::Security);
                        Ok(LoginProgress::Continue)
                    }
                    ("CHAP", None) => Err(LoginError::ChapRequired(method.to_string())),
                    ("None", _) | ("Reject", None) => {
                        if self.config.mutual_chap.is_some() {
                            return Err(LoginError::MutualChapSkipped);
                        }
                        self.leave_security(rsp, out)
                    }
                    (other, _) => Err(LoginError::Protocol(format!(
                        "target answered AuthMethod={other}, which we did not offer"
                    ))),
                }
            }
            AuthStep::SentAlgorithm => {
                let alg = pairs
                    .get("CHAP_A")
                    .ok_or_else(|| LoginError::Protocol("target sent no CHAP_A".into()))?;
                let algorithm = chap::check_algorithm(alg, &self.config.chap_algorithms)?;
                self.chap_algorithm = Some(algorithm);
                log::debug!("CHAP: the target chose {algorithm}");
                let id = chap::parse_identifier(
                    pairs
                        .get("CHAP_I")
                        .ok_or_else(|| LoginError::Protocol("target sent no CHAP_I".into()))?,
                )?;
                let challenge = chap::decode_binary(
                    pairs
                        .get("CHAP_C")
                        .ok_or_else(|| LoginError::Protocol("target sent no CHAP_C".into()))?,
                )?;
                if challenge.len() < chap::MIN_CHALLENGE_LEN {
                    return Err(ChapError::ShortChallenge(challenge.len()).into());
                }
                let creds = self
                    .config
                    .chap
                    .clone()
                    .ok_or_else(|| LoginError::ChapRequired("CHAP".into()))?;
                let mut t = TextPairs::new();
                t.push("CHAP_N", creds.user.clone());
                t.push(
                    "CHAP_R",
                    chap::encode_hex(&chap::response(algorithm, id, &creds.secret, &challenge)),
                );
                if self.config.mutual_chap.is_some() {
                    let mut ours = vec![0u8; algorithm.challenge_len()];
                    rand::thread_rng().fill_bytes(&mut ours);
                    let our_id = (rand::thread_rng().next_u32() & 0xff) as u8;
                    t.push("CHAP_I", our_id.to_string());
                    t.push("CHAP_C", chap::encode_hex(&ours));
                    self.mutual_challenge = Some((our_id, ours.clone()));
                    self.our_challenge_sent = Some(ours);
                }
                if self.our_challenge_sent.as_deref() == Some(&challenge[..]) {
                    return Err(ChapError::Reflected.into());
                }
                self.auth = AuthStep::SentResponse;
                self.send_text(out, t.to_bytes(), true, Stage::Operational);
                Ok(LoginProgress::Continue)
            }
            AuthStep::SentResponse => {
                if let Some((id, challenge)) = self.mutual_challenge.clone() {
                    let expected = self
                        .config
                        .mutual_chap
                        .clone()
                        .ok_or(LoginError::MutualChapSkipped)?;
                    let name = pairs.get("CHAP_N").ok_or(LoginError::MutualChapSkipped)?;
                    let r = chap::decode_binary(
                        pairs.get("CHAP_R").ok_or(LoginError::MutualChapSkipped)?,
                    )?;
                    if name != expected.user {
                        return Err(ChapError::TargetNotAuthenticated.into());
                    }
                    let algorithm = self.chap_algorithm.unwrap_or(ChapAlgorithm::Md5);
                    chap::verify(algorithm, id, &expected.secret, &challenge, &r)?;
                }
                if !rsp.transit {
                    // The target may need one more (empty) exchange before transit.
                    self.send_text(out, Vec::new(), true, Stage::Operational);
                    return Ok(LoginProgress::Continue);
                }
                self.leave_security(rsp, out)
            }
        }
    }

    fn leave_security(
        &mut self,
        rsp: &LoginResponse,
        out: &mut Vec<u8>,
    ) -> Result<LoginProgress, LoginError> {
        if !rsp.transit {
            // Target wants to stay; ask again to move on.
            self.send_text(out, Vec::new(), true, Stage::Operational);
            return Ok(LoginProgress::Continue);
        }
        self.stage = rsp.nsg;
        if self.stage == Stage::FullFeature {
            return Ok(LoginProgress::Done(self.outcome(rsp)));
        }
        self.send_operational_offer(out);
        Ok(LoginProgress::Continue)
    }

    fn send_operational_offer(&mut self, out: &mut Vec<u8>) {
        let mut t = TextPairs::new();
        let keys = match self.config.session_type {
            SessionType::Normal if self.non_leading => self
                .config
                .offer
                .operational_keys()
                .into_iter()
                .filter(|(k, _)| CONNECTION_KEYS.contains(k))
                .collect(),
            SessionType::Normal => self.config.offer.operational_keys(),
            // Discovery sessions only need data digests and segment sizes.
            SessionType::Discovery => self
                .config
                .offer
                .operational_keys()
                .into_iter()
                .filter(|(k, _)| {
                    matches!(
                        *k,
                        "HeaderDigest" | "DataDigest" | "MaxRecvDataSegmentLength"
                    )
                })
                .collect(),
        };
        for (k, v) in keys {
            if params::rule_for(k) != Some(params::Rule::Declarative) {
                self.offers.push((k.to_string(), v.clone()));
            }
            t.push(k, v);
        }
        self.send_text(out, t.to_bytes(), true, Stage::FullFeature);
    }

    fn operational_step(
        &mut self,
        rsp: &LoginResponse,
        pairs: &TextPairs,
        out: &mut Vec<u8>,
    ) -> Result<LoginProgress, LoginError> {
        let mut answers = TextPairs::new();
        for (key, value) in pairs.iter() {
            if key == "MaxRecvDataSegmentLength" {
                self.params.apply_target_mrdsl(value)?;
                continue;
            }
            if let Some(i) = self.offers.iter().position(|(k, _)| k == key) {
                let (_, offer) = self.offers.remove(i);
                if value == "NotUnderstood" {
                    // The key keeps its RFC default.
                    continue;
                }
                let result = params::check_answer(key, &offer, value)?;
                self.params.apply(key, &result)?;
            } else if params::rule_for(key) == Some(params::Rule::Declarative) {
                self.params.apply(key, value)?;
            } else if params::rule_for(key).is_some() {
                // The target offers a key we did not: answer as responder with
                // our own preference (the RFC default where we have none).
                let ours = self.our_value_for(key);
                let answer = params::respond(key, value, &ours)?;
                if answer != "Reject" {
                    self.params.apply(key, &answer)?;
                }
                answers.push(key, answer);
            } else {
                answers.push(key, "NotUnderstood");
            }
        }
        if rsp.transit && rsp.nsg == Stage::FullFeature && answers.is_empty() {
            self.stage = Stage::FullFeature;
            return Ok(LoginProgress::Done(self.outcome(rsp)));
        }
        self.send_text(out, answers.to_bytes(), true, Stage::FullFeature);
        Ok(LoginProgress::Continue)
    }

    fn our_value_for(&self, key: &str) -> String {
        self.config
            .offer
            .operational_keys()
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .unwrap_or_else(|| match key {
                "IFMarker" | "OFMarker" => "No".into(),
                "iSCSIProtocolLevel" => "1".into(),
                "TaskReporting" => "RFC3720".into(),
                _ => "None".into(),
            })
    }

    fn outcome(&self, rsp: &LoginResponse) -> LoginOutcome {
        let mut params = self.params.clone();
        // With FirstBurstLength irrelevant, keep it within MaxBurstLength anyway.
        params.first_burst_len = params.first_burst_len.min(params.max_burst_len);
        LoginOutcome {
            params,
            tsih: self.tsih,
            isid: self.config.isid,
            cid: self.config.cid,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            exp_cmd_sn: rsp.exp_cmd_sn,
            max_cmd_sn: rsp.max_cmd_sn,
        }
    }

    /// The error for a login refused right after our CHAP_A offer.
    fn algorithms_refused(&self, data: &[u8]) -> ChapError {
        let offered = &self.config.chap_algorithms;
        let theirs = TextPairs::parse(data)
            .ok()
            .and_then(|t| t.get(ACCEPTED_CHAP_ALGORITHMS_KEY).map(str::to_string));
        ChapError::NoCommonAlgorithm {
            ours: format!(
                "CHAP_A={}: {}",
                ChapAlgorithm::offer(offered),
                ChapAlgorithm::describe(offered)
            ),
            theirs: match theirs {
                Some(v) => format!(
                    "accepts only CHAP_A={v}: {} (it refused the login, status 0x0201)",
                    ChapAlgorithm::describe_wire(&v)
                ),
                None => "refused the login (status 0x0201) without choosing one of them".into(),
            },
        }
    }

    /// The CHAP algorithm the target chose, once it has.
    pub fn chap_algorithm(&self) -> Option<ChapAlgorithm> {
        self.chap_algorithm
    }

    pub fn secret_for_tests(&self) -> Option<&Secret> {
        self.config.chap.as_ref().map(|c| &c.secret)
    }
}

/// True when stage `a` comes after stage `b` in login order.
fn stage_after(a: Stage, b: Stage) -> bool {
    (a as u8) > (b as u8)
}

fn status_error(class: u8, detail: u8, data: &[u8]) -> LoginError {
    match (class, detail) {
        (1, _) => {
            let address = TextPairs::parse(data)
                .ok()
                .and_then(|t| t.get("TargetAddress").map(str::to_string))
                .unwrap_or_else(|| "an unknown address".into());
            LoginError::Redirected { detail, address }
        }
        (2, 0x01) => LoginError::AuthenticationFailed,
        (2, 0x02) => LoginError::NotAuthorized,
        (2, 0x03) => LoginError::TargetNotFound,
        (2, 0x04) => LoginError::TargetRemoved,
        (2, 0x05) => LoginError::UnsupportedVersion,
        (2, 0x06) => LoginError::TooManyConnections,
        (2, 0x07) => LoginError::MissingParameter,
        (2, 0x08) => LoginError::CantIncludeInSession,
        (2, 0x09) => LoginError::SessionTypeNotSupported,
        (2, 0x0a) => LoginError::SessionDoesNotExist,
        (2, 0x0b) => LoginError::InvalidDuringLogin,
        (2, d) => LoginError::InitiatorError(d),
        (3, d) => LoginError::TargetError(d),
        (c, d) => LoginError::UnknownStatus {
            class: c,
            detail: d,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::iscsi::{Bhs, PduFramer};

    #[track_caller]
    fn last_request(out: &[u8]) -> (LoginRequest, TextPairs) {
        let f = PduFramer {
            digests: Digests::default(),
            max_data_segment_len: 1 << 20,
        };
        let mut at = 0;
        let mut last = None;
        while at < out.len() {
            let p = f.frame(&out[at..]).unwrap().unwrap();
            let PduHeader::LoginRequest(r) = p.header else {
                panic!("not a login request")
            };
            let text = TextPairs::parse(&out[at..][p.data.clone()]).unwrap();
            at += p.total_len;
            last = Some((r, text));
        }
        last.expect("no request")
    }

    fn response(
        csg: Stage,
        nsg: Stage,
        transit: bool,
        stat_sn: u32,
        text: &[(&str, &str)],
    ) -> (LoginResponse, Vec<u8>) {
        let mut t = TextPairs::new();
        for (k, v) in text {
            t.push(k, v.to_string());
        }
        (
            LoginResponse {
                transit,
                cont: false,
                csg,
                nsg,
                version_max: 0,
                version_active: 0,
                isid: [0x80, 0, 0, 0, 0, 1],
                tsih: 7,
                itt: 1,
                stat_sn: Sn(stat_sn),
                exp_cmd_sn: Sn(1),
                max_cmd_sn: Sn(32),
                status_class: 0,
                status_detail: 0,
            },
            t.to_bytes(),
        )
    }

    fn config(chap: bool, mutual: bool) -> LoginConfig {
        let mut c = LoginConfig::new("iqn.2026-11.test:init", Some("iqn.2026-11.test:tgt"));
        if chap {
            c.chap = Some(Credentials {
                user: "user".into(),
                secret: Secret::new(b"initiatorsecret".to_vec()),
            });
        }
        if mutual {
            c.mutual_chap = Some(Credentials {
                user: "tgtuser".into(),
                secret: Secret::new(b"targetsecret12".to_vec()),
            });
        }
        c
    }

    #[test]
    fn login_without_auth_then_operational() {
        let mut l = Login::new(config(false, false), 1, Sn(1));
        let mut out = Vec::new();
        l.start(&mut out);
        let (req, text) = last_request(&out);
        assert!(req.transit);
        assert_eq!(req.csg, Stage::Security);
        assert_eq!(req.nsg, Stage::Operational);
        assert_eq!(text.get("AuthMethod"), Some("None"));
        assert_eq!(text.get("TargetName"), Some("iqn.2026-11.test:tgt"));

        out.clear();
        let (r, d) = response(
            Stage::Security,
            Stage::Operational,
            true,
            5,
            &[("AuthMethod", "None")],
        );
        assert!(matches!(
            l.on_response(&r, &d, &mut out).unwrap(),
            LoginProgress::Continue
        ));
        let (req, text) = last_request(&out);
        assert_eq!(req.csg, Stage::Operational);
        assert_eq!(req.nsg, Stage::FullFeature);
        assert_eq!(req.exp_stat_sn, Sn(6));
        assert_eq!(text.get("ImmediateData"), Some("Yes"));

        out.clear();
        let (r, d) = response(
            Stage::Operational,
            Stage::FullFeature,
            true,
            6,
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "Yes"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "65536"),
            ],
        );
        let LoginProgress::Done(o) = l.on_response(&r, &d, &mut out).unwrap() else {
            panic!("login should be done")
        };
        assert_eq!(o.tsih, 7);
        assert!(o.params.initial_r2t);
        assert_eq!(o.params.max_xmit_data_segment_len, 65536);
        assert_eq!(o.params.max_burst_len, 262144);
        assert_eq!(o.exp_stat_sn, Sn(7));
    }

    #[test]
    fn mutual_chap_verifies_the_target_with_every_algorithm() {
        for algorithm in ChapAlgorithm::PREFERRED {
            for target_secret_ok in [true, false] {
                let mut l = Login::new(config(true, true), 1, Sn(1));
                let mut out = Vec::new();
                l.start(&mut out);
                assert_eq!(last_request(&out).1.get("AuthMethod"), Some("CHAP"));
                out.clear();
                let (r, d) = response(
                    Stage::Security,
                    Stage::Security,
                    false,
                    0,
                    &[("AuthMethod", "CHAP")],
                );
                l.on_response(&r, &d, &mut out).unwrap();
                assert_eq!(last_request(&out).1.get("CHAP_A"), Some("8,7,6,5"));
                out.clear();
                let challenge = [9u8; 16];
                let code = algorithm.code().to_string();
                let (r, d) = response(
                    Stage::Security,
                    Stage::Security,
                    false,
                    1,
                    &[
                        ("CHAP_A", &code),
                        ("CHAP_I", "3"),
                        ("CHAP_C", &chap::encode_hex(&challenge)),
                    ],
                );
                l.on_response(&r, &d, &mut out).unwrap();
                assert_eq!(l.chap_algorithm(), Some(algorithm));
                let (req, text) = last_request(&out);
                assert!(req.transit);
                let expected = chap::response(
                    algorithm,
                    3,
                    &Secret::new(b"initiatorsecret".to_vec()),
                    &challenge,
                );
                assert_eq!(
                    text.get("CHAP_R"),
                    Some(chap::encode_hex(&expected).as_str())
                );
                let their_id = chap::parse_identifier(text.get("CHAP_I").unwrap()).unwrap();
                let their_challenge = chap::decode_binary(text.get("CHAP_C").unwrap()).unwrap();
                assert_eq!(their_challenge.len(), algorithm.challenge_len());
                let secret = if target_secret_ok {
                    Secret::new(b"targetsecret12".to_vec())
                } else {
                    Secret::new(b"wrongsecret123".to_vec())
                };
                let tr = chap::encode_hex(&chap::response(
                    algorithm,
                    their_id,
                    &secret,
                    &their_challenge,
                ));
                out.clear();
                let (r, d) = response(
                    Stage::Security,
                    Stage::Operational,
                    true,
                    2,
                    &[("CHAP_N", "tgtuser"), ("CHAP_R", &tr)],
                );
                let res = l.on_response(&r, &d, &mut out);
                if target_secret_ok {
                    assert!(matches!(res, Ok(LoginProgress::Continue)), "{algorithm}");
                } else {
                    assert!(
                        matches!(
                            res,
                            Err(LoginError::Chap(ChapError::TargetNotAuthenticated))
                        ),
                        "{algorithm}"
                    );
                }
            }
        }
    }

    #[test]
    fn chap_offer_follows_the_configured_order_and_names_both_sides_on_refusal() {
        let start = |algs: Vec<ChapAlgorithm>| {
            let mut c = config(true, false);
            c.chap_algorithms = algs;
            let mut l = Login::new(c, 1, Sn(1));
            let mut out = Vec::new();
            l.start(&mut out);
            let (r, d) = response(
                Stage::Security,
                Stage::Security,
                false,
                0,
                &[("AuthMethod", "CHAP")],
            );
            out.clear();
            l.on_response(&r, &d, &mut out).unwrap();
            (l, last_request(&out).1)
        };
        let (mut l, t) = start(vec![ChapAlgorithm::Md5, ChapAlgorithm::Sha256]);
        assert_eq!(t.get("CHAP_A"), Some("5,7"));
        // The target refuses the login after our CHAP_A, saying what it takes.
        let (mut r, d) = response(
            Stage::Security,
            Stage::Security,
            false,
            1,
            &[(ACCEPTED_CHAP_ALGORITHMS_KEY, "8")],
        );
        r.status_class = 2;
        r.status_detail = 1;
        let e = l.on_response(&r, &d, &mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CHAP: no CHAP algorithm in common: we offered CHAP_A=5,7: MD5 (5), SHA-256 (7); \
             the target accepts only CHAP_A=8: SHA3-256 (8) (it refused the login, status 0x0201)"
        );
        // Without the vendor key the refusal still names our offer.
        let (mut l, _) = start(vec![ChapAlgorithm::Sha3_256]);
        let (mut r, _) = response(Stage::Security, Stage::Security, false, 1, &[]);
        r.status_class = 2;
        r.status_detail = 1;
        let e = l.on_response(&r, &[], &mut Vec::new()).unwrap_err();
        assert!(
            e.to_string()
                .contains("we offered CHAP_A=8: SHA3-256 (8); the target refused"),
            "{e}"
        );
        // An empty list is a configuration error, said before anything is sent.
        let mut c = config(true, false);
        c.chap_algorithms.clear();
        let mut l = Login::new(c, 1, Sn(1));
        let mut out = Vec::new();
        l.start(&mut out);
        let (r, d) = response(
            Stage::Security,
            Stage::Security,
            false,
            0,
            &[("AuthMethod", "CHAP")],
        );
        let e = l.on_response(&r, &d, &mut out).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn refused_algorithms_and_statuses_give_clear_errors() {
        let mut c = config(true, false);
        c.chap_algorithms = vec![ChapAlgorithm::Md5];
        let mut l = Login::new(c, 1, Sn(1));
        let mut out = Vec::new();
        l.start(&mut out);
        let (r, d) = response(
            Stage::Security,
            Stage::Security,
            false,
            0,
            &[("AuthMethod", "CHAP")],
        );
        l.on_response(&r, &d, &mut out).unwrap();
        let (r, d) = response(
            Stage::Security,
            Stage::Security,
            false,
            1,
            &[
                ("CHAP_A", "7"),
                ("CHAP_I", "1"),
                ("CHAP_C", "0x00112233445566778899aabbccddeeff"),
            ],
        );
        assert!(matches!(
            l.on_response(&r, &d, &mut out),
            Err(LoginError::Chap(ChapError::UnofferedAlgorithm { .. }))
        ));

        let mut l = Login::new(config(false, false), 1, Sn(1));
        l.start(&mut out);
        let (mut r, d) = response(Stage::Security, Stage::Operational, true, 0, &[]);
        r.status_class = 2;
        r.status_detail = 1;
        let e = l.on_response(&r, &d, &mut out).unwrap_err();
        assert!(e.to_string().contains("authentication failed"), "{e}");
        r.status_detail = 3;
        let mut l = Login::new(config(false, false), 1, Sn(1));
        l.start(&mut out);
        assert!(matches!(
            l.on_response(&r, &d, &mut out),
            Err(LoginError::TargetNotFound)
        ));
    }

    #[test]
    fn illegal_stage_switch_is_refused() {
        let mut l = Login::new(config(true, false), 1, Sn(1));
        let mut out = Vec::new();
        l.start(&mut out);
        // We did not ask to transit; the target jumps to full feature.
        let (r, d) = response(
            Stage::Security,
            Stage::FullFeature,
            true,
            0,
            &[("AuthMethod", "CHAP")],
        );
        assert!(matches!(
            l.on_response(&r, &d, &mut out),
            Err(LoginError::Protocol(_))
        ));
    }

    #[test]
    fn continued_response_text_is_joined() {
        let mut l = Login::new(config(false, false), 1, Sn(1));
        let mut out = Vec::new();
        l.start(&mut out);
        let (r, _) = response(Stage::Security, Stage::Operational, true, 0, &[]);
        l.on_response(&r, b"AuthMethod=None\0", &mut out).unwrap();
        out.clear();
        let (mut r, _) = response(Stage::Operational, Stage::Operational, false, 1, &[]);
        r.cont = true;
        let text = b"HeaderDigest=None\0MaxBurstLen";
        l.on_response(&r, text, &mut out).unwrap();
        let (req, t) = last_request(&out);
        assert!(t.is_empty() && !req.cont);
        let (r, _) = response(Stage::Operational, Stage::FullFeature, true, 2, &[]);
        let LoginProgress::Done(o) = l.on_response(&r, b"gth=4096\0", &mut out).unwrap() else {
            panic!()
        };
        assert_eq!(o.params.max_burst_len, 4096);
        let _ = Bhs::new_checked(&[0u8; 48]).unwrap();
    }
}

#[cfg(test)]
mod non_leading_tests {
    use super::*;
    use crate::wire::iscsi::PduFramer;

    fn requests(out: &[u8]) -> Vec<(LoginRequest, TextPairs)> {
        let f = PduFramer {
            digests: Digests::default(),
            max_data_segment_len: 1 << 20,
        };
        let mut at = 0;
        let mut v = Vec::new();
        while at < out.len() {
            let p = f.frame(&out[at..]).unwrap().unwrap();
            let PduHeader::LoginRequest(r) = p.header else {
                panic!("not a login request")
            };
            v.push((r, TextPairs::parse(&out[at..][p.data.clone()]).unwrap()));
            at += p.total_len;
        }
        v
    }

    fn rsp(csg: Stage, nsg: Stage, tsih: u16, stat_sn: u32) -> LoginResponse {
        LoginResponse {
            transit: true,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_active: 0,
            isid: [0x80, 0, 0, 0, 0, 9],
            tsih,
            itt: 0,
            stat_sn: Sn(stat_sn),
            exp_cmd_sn: Sn(40),
            max_cmd_sn: Sn(70),
            status_class: 0,
            status_detail: 0,
        }
    }

    fn config() -> LoginConfig {
        let mut c = LoginConfig::new("iqn.2026-11.test:init", Some("iqn.2026-11.test:tgt"));
        c.isid = [0x80, 0, 0, 0, 0, 9];
        c.tsih = 0x1234;
        c.cid = 3;
        c.offer.max_connections = 4;
        c.offer.error_recovery_level = 2;
        c
    }

    /// The login of a further connection carries the session's ISID and
    /// TSIH, its own CID and the session's CmdSN, offers only the
    /// per-connection keys, and keeps the session's parameters.
    #[test]
    fn offers_only_connection_keys_with_the_sessions_tsih() {
        let session = Params {
            max_connections: 4,
            error_recovery_level: 2,
            max_burst_len: 1 << 20,
            initial_r2t: false,
            ..Params::default()
        };
        let mut l = Login::non_leading(config(), 0, Sn(40), &session);
        let mut out = Vec::new();
        l.start(&mut out);
        let (req, _) = requests(&out).pop().unwrap();
        assert_eq!(
            (req.isid, req.tsih, req.cid),
            ([0x80, 0, 0, 0, 0, 9], 0x1234, 3)
        );
        assert_eq!(req.cmd_sn, Sn(40));
        out.clear();
        let mut auth = TextPairs::new();
        auth.push("AuthMethod", "None");
        let r = rsp(Stage::Security, Stage::Operational, 0x1234, 7);
        l.on_response(&r, &auth.to_bytes(), &mut out).unwrap();
        let (_, text) = requests(&out).pop().unwrap();
        let keys: Vec<&str> = text.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength"]
        );
        out.clear();
        let mut ans = TextPairs::new();
        ans.push("HeaderDigest", "None");
        ans.push("DataDigest", "None");
        ans.push("MaxRecvDataSegmentLength", "65536");
        let r = rsp(Stage::Operational, Stage::FullFeature, 0x1234, 8);
        let LoginProgress::Done(o) = l.on_response(&r, &ans.to_bytes(), &mut out).unwrap() else {
            panic!("login not done")
        };
        assert_eq!((o.tsih, o.cid), (0x1234, 3));
        assert_eq!(o.params.max_connections, 4);
        assert_eq!(o.params.error_recovery_level, 2);
        assert_eq!(o.params.max_burst_len, 1 << 20);
        assert!(!o.params.initial_r2t);
        assert_eq!(o.params.max_xmit_data_segment_len, 65536);
    }

    /// A target that answers a further connection's login with another
    /// TSIH would put it in another session: refused, naming both.
    #[test]
    fn a_changed_tsih_is_refused() {
        let mut l = Login::non_leading(config(), 0, Sn(40), &Params::default());
        let mut out = Vec::new();
        l.start(&mut out);
        let mut auth = TextPairs::new();
        auth.push("AuthMethod", "None");
        let r = rsp(Stage::Security, Stage::Operational, 0x9999, 7);
        let e = l
            .on_response(&r, &auth.to_bytes(), &mut out)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CID 3") && e.contains("TSIH 0x1234") && e.contains("TSIH 0x9999"),
            "{e}"
        );
    }
}
