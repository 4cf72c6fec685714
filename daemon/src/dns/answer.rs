//! The stub's answer to one client message: drop it, answer it here
//! (REFUSED, FORMERR, NOTIMP, SERVFAIL), or forward it upstream when the
//! name is allowed, then hand the answer's addresses to the sink before the
//! reply goes back.
//!
//! It owns that decision. It never forwards a question for a name the name
//! policy does not allow, and never logs a name: only counts.

use std::sync::MutexGuard;
use std::time::Instant;

use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio::time::timeout;

use super::names::{digest, name_key, Names};
use super::upstream::upstream_query;
use super::{Counters, Inner, EDNS_PAYLOAD, HOOK_TIMEOUT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transport {
    Udp,
    Tcp,
}

impl Inner {
    /// Never held across an await.
    pub(super) fn names(&self) -> MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The reply to one client message, or None to drop it.
    pub(super) async fn answer(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        // Shorter than a header, or a response (QR set): never answered, so
        // nothing can bounce replies off the stub.
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            Counters::bump(&self.counters.malformed);
            return None;
        }
        let request = match Message::from_vec(packet) {
            Ok(request) => request,
            Err(_) => {
                Counters::bump(&self.counters.malformed);
                let id = u16::from_be_bytes([packet[0], packet[1]]);
                let op_code = OpCode::from_u8((packet[2] >> 3) & 0x0f);
                return Message::error_msg(id, op_code, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        if request.metadata.op_code != OpCode::Query {
            Counters::bump(&self.counters.malformed);
            return local_reply(&request, ResponseCode::NotImp);
        }
        let [question] = request.queries.as_slice() else {
            Counters::bump(&self.counters.malformed);
            return local_reply(&request, ResponseCode::FormErr);
        };
        if is_doh_canary(question) {
            Counters::bump(&self.counters.refused);
            return local_reply(&request, ResponseCode::NXDomain);
        }
        let origin = if question.query_class == DNSClass::IN
            && !matches!(question.query_type, RecordType::AXFR | RecordType::IXFR)
        {
            self.names().origin_of(&name_key(&question.name), Instant::now())
        } else {
            None
        };
        let Some(origin) = origin else {
            Counters::bump(&self.counters.refused);
            return local_reply(&request, ResponseCode::Refused);
        };

        let query = upstream_query(
            question,
            request.metadata.recursion_desired,
            request.metadata.checking_disabled,
            request
                .edns
                .as_ref()
                .map(|e| (e.max_payload(), e.flags().dnssec_ok)),
        );
        match self.exchange(&query, transport).await {
            Ok((mut raw, response)) => {
                self.take_in(&origin, &question.name, &response).await;
                Counters::bump(&self.counters.answered);
                // The server's own bytes, under the client's id.
                raw.get_mut(..2)?
                    .copy_from_slice(&request.metadata.id.to_be_bytes());
                Some(raw)
            }
            Err(_) => {
                Counters::bump(&self.counters.failed);
                local_reply(&request, ResponseCode::ServFail)
            }
        }
    }

    /// Remembers the answer's CNAME targets and hands its addresses to the
    /// sink, waiting (boundedly) until the sink has them.
    async fn take_in(&self, origin: &str, question: &Name, response: &Message) {
        let (targets, addrs) = digest(question, response);
        if !targets.is_empty() {
            let now = Instant::now();
            let mut names = self.names();
            for (target, ttl) in targets {
                names.learn(target, origin, ttl, now);
            }
        }
        if !addrs.is_empty()
            && timeout(HOOK_TIMEOUT, self.sink.on_answer(origin, addrs))
                .await
                .is_err()
        {
            tracing::warn!(
                "dns stub: the firewall took too long to take an answer's addresses; replying anyway"
            );
        }
    }
}
/// The name browsers ask before they switch to their own DNS-over-HTTPS
/// (Firefox's canary domain): NXDOMAIN means "this network filters DNS, do
/// not bypass it". A browser's own DoH would go to a host the profile does
/// not allow and be refused anyway, but the call page would then fail to
/// resolve anything instead of falling back to the system resolver.
const DOH_CANARY: &str = "use-application-dns.net";

/// Whether `question` asks for the DoH canary (any type, class IN); always
/// answered NXDOMAIN here, never forwarded, whatever the profile allows.
fn is_doh_canary(question: &hickory_proto::op::Query) -> bool {
    question.query_class == DNSClass::IN && name_key(&question.name) == DOH_CANARY
}

/// An answer made here (NXDOMAIN for the DoH canary, REFUSED, SERVFAIL,
/// FORMERR, NOTIMP).
fn local_reply(request: &Message, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.checking_disabled = request.metadata.checking_disabled;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = rcode;
    reply.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(e);
    }
    reply.to_vec().ok()
}
