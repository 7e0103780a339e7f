//! Keyless TLS (`POST /v1/tls/sign`): the one signature a TLS 1.3 handshake needs from the
//! agent's key, its CertificateVerify (RFC 8446 §4.4.3). The daemon signs exactly that content —
//! 64 spaces, the context string of the caller's role, 0x00, a SHA-256 or SHA-384 transcript
//! hash — and nothing else: no TLS 1.2 (its signed data names no protocol), no JWT signing input,
//! no DER. It hashes the content itself and signs with the agent's device key (or the session
//! key a `?key=session` certificate names), for the kernel-identified caller only, audited
//! (`tls.signed`) before the signature leaves. Server-role signatures have their own rate budget.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::audit::Event;
use crate::caller::Caller;
use crate::credentials::problem::{Kind, Problem};
use crate::credentials::Credentials;

/// The only signature scheme (RFC 8446 §4.2.3): agent keys are P-256.
pub const SCHEME: &str = "ecdsa_secp256r1_sha256";
const CLIENT_CONTEXT: &[u8] = b"TLS 1.3, client CertificateVerify";
const SERVER_CONTEXT: &[u8] = b"TLS 1.3, server CertificateVerify";

/// `POST /v1/tls/sign` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSignRequest {
    pub scheme: String,
    /// `"client"` or `"server"`.
    pub role: String,
    /// The CertificateVerify content, standard base64.
    pub content: String,
    #[serde(default)]
    pub agent: Option<String>,
    /// The certificate presented (base64url SHA-256 of its DER): it must be an unexpired one
    /// the daemon issued to this agent; its key signs (the session key for a `?key=session`
    /// certificate, else the identity key).
    #[serde(default, rename = "x5t#S256")]
    pub x5t_s256: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsSignResponse {
    /// DER ECDSA signature, standard base64 (what TLS puts in CertificateVerify).
    pub signature: String,
}

/// Check that `content` is a TLS 1.3 CertificateVerify content for `role`; returns the
/// transcript hash's length.
pub fn check_content(role: &str, content: &[u8]) -> Result<usize, String> {
    let context = match role {
        "client" => CLIENT_CONTEXT,
        "server" => SERVER_CONTEXT,
        _ => return Err("role is \"client\" or \"server\"".into()),
    };
    let head = 64 + context.len() + 1;
    let hash_len = content.len().saturating_sub(head);
    if content.len() < head || !matches!(hash_len, 32 | 48) {
        return Err(format!(
            "content is {} bytes; a TLS 1.3 {role} CertificateVerify content is {} or {} bytes",
            content.len(),
            head + 32,
            head + 48
        ));
    }
    if content[..64].iter().any(|b| *b != 0x20)
        || &content[64..64 + context.len()] != context
        || content[head - 1] != 0
    {
        return Err(format!(
            "content is not 64 spaces, {:?}, 0x00 and a transcript hash (only TLS 1.3 CertificateVerify is signed)",
            String::from_utf8_lossy(context)
        ));
    }
    Ok(hash_len)
}

impl Credentials {
    /// `POST /v1/tls/sign`.
    pub async fn sign_tls(
        &self,
        caller: &Caller,
        req: TlsSignRequest,
    ) -> Result<TlsSignResponse, Problem> {
        let summary = json!({"credential": "tls-signature", "scheme": req.scheme,
                             "role": req.role, "agent": req.agent, "x5t#S256": req.x5t_s256});
        let agent = match self.match_agent(caller, req.agent.as_deref()) {
            Ok(a) => a,
            Err(p) => return Err(self.deny(caller, None, p, summary).await),
        };
        if let Err(p) = crate::credentials::p256_only(&agent, "TLS signatures") {
            return Err(self.deny(caller, Some(&agent), p, summary).await);
        }
        let checked = (|| {
            if req.scheme != SCHEME {
                return Err(Problem::new(
                    Kind::MalformedRequest,
                    format!("scheme must be {SCHEME} (agent keys are P-256; TLS 1.3 only)"),
                ));
            }
            let content = STANDARD
                .decode(&req.content)
                .map_err(|_| Problem::new(Kind::MalformedRequest, "content is not base64"))?;
            let hash_len = check_content(&req.role, &content)
                .map_err(|m| Problem::new(Kind::MalformedRequest, m))?;
            if req.role == "server" && !agent.policy.tls_server {
                return Err(Problem::new(
                    Kind::TlsRoleNotAllowed,
                    format!(
                        "agent {} may sign only as a TLS client (policy tls_server = false)",
                        agent.name
                    ),
                ));
            }
            // The certificate named picks the key: a session key's certificate signs with
            // that session key, any other with the identity key.
            let session = match req.x5t_s256.as_deref() {
                Some(x5t) => match self.session_certificate(&agent, x5t) {
                    Some((_, key)) => Some(key),
                    None => {
                        self.bound_certificate(&agent, Some(x5t))?;
                        None
                    }
                },
                None => None,
            };
            crate::credentials::check_not_suspended(&agent)?;
            let cfg = self.settings();
            if req.role == "server" {
                self.check_server_rate(&agent, &cfg)?;
            } else {
                self.check_rate(&agent, &cfg)?;
            }
            Ok((content, hash_len, session))
        })();
        let (content, hash_len, session) = match checked {
            Ok(c) => c,
            Err(p) => return Err(self.deny(caller, Some(&agent), p, summary).await),
        };
        let digest: [u8; 32] = Sha256::digest(&content).into();
        let signed = match &session {
            Some(key) => key.sign(&content).map(|s| s.to_der().as_bytes().to_vec()),
            None => self.issuer.tls_certificate_verify(&agent, digest).await,
        };
        let sig = match signed {
            Ok(s) => s,
            Err(e) => return Err(self.signing_problem(&agent, e)),
        };
        let at = crate::agents::now_unix();
        let ev = Event::new("tls.signed")
            .agent(&agent.name, &agent.id)
            .caller(caller.record())
            .details(json!({
                "role": req.role, "scheme": SCHEME,
                "kid": session.as_ref().map_or(agent.kid.as_deref(), |k| Some(k.kid.as_str())),
                "transcript_hash_len": hash_len,
                "content_sha256": hex::encode(digest),
                "x5t#S256": req.x5t_s256,
                "key": if session.is_some() { "session" } else { "identity" },
            }));
        self.release(caller, &agent, ev, "TLS signature").await?;
        self.count_issued(&agent, "tls-signature", at);
        Ok(TlsSignResponse {
            signature: STANDARD.encode(sig),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(role: &[u8], hash: usize) -> Vec<u8> {
        let mut c = vec![0x20; 64];
        c.extend_from_slice(role);
        c.push(0);
        c.extend(std::iter::repeat_n(7u8, hash));
        c
    }

    #[test]
    fn only_tls13_certificate_verify_contents() {
        assert_eq!(
            check_content("client", &content(CLIENT_CONTEXT, 32)),
            Ok(32)
        );
        assert_eq!(
            check_content("server", &content(SERVER_CONTEXT, 48)),
            Ok(48)
        );
        // The other role's context, wrong lengths, not spaces, no separator.
        assert!(check_content("client", &content(SERVER_CONTEXT, 32)).is_err());
        assert!(check_content("server", &content(CLIENT_CONTEXT, 32)).is_err());
        assert!(check_content("client", &content(CLIENT_CONTEXT, 20)).is_err());
        assert!(check_content("client", &content(CLIENT_CONTEXT, 64)).is_err());
        assert!(check_content("client", &[]).is_err());
        let mut c = content(CLIENT_CONTEXT, 32);
        c[3] = b'!';
        assert!(check_content("client", &c).is_err());
        let mut c = content(CLIENT_CONTEXT, 32);
        c[64 + CLIENT_CONTEXT.len()] = 1;
        assert!(check_content("client", &c).is_err());
        // TLS 1.2 signs client_random || server_random || params: no such prefix.
        assert!(check_content("client", &[0x20; 64 + 34 + 32]).is_err());
        assert!(check_content("admin", &content(CLIENT_CONTEXT, 32)).is_err());
        // A JWT signing input of the right length is still refused.
        let jwt = vec![b'e'; 64 + CLIENT_CONTEXT.len() + 1 + 32];
        assert!(check_content("client", &jwt).is_err());
    }
}
