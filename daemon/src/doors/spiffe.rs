//! The SPIFFE Workload API: gRPC (HTTP/2) over its own Unix socket. A thin adapter like the
//! agent socket: the peer is taken from the kernel at accept, every byte must come from it
//! ([`SenderChecked`]), every call re-identifies the caller, and everything else is the
//! [`Credentials`] pipeline's. Calls without the `workload.spiffe.io: true` metadata are
//! refused (`InvalidArgument`), as the specification requires.
//!
//! Profiles: JWT-SVID complete (`FetchJWTSVID`, `FetchJWTBundles`, `ValidateJWTSVID`), X.509
//! bundles with the CRL (`FetchX509Bundles`). `FetchX509SVID` would hand the workload its
//! private key, which a hardware key never allows: it is refused (`PermissionDenied`) with a
//! message naming keyless mTLS, unless the agent opted in to `x509_svid = "software"` (a
//! daemon-made software key per rotation, certified by the host CA, rotated at half-life,
//! the stream ended at revocation). Bundles and validation are public, like `/v1/jwks` and
//! `/v1/bundle`; SVIDs are only for the agent the kernel says the caller is.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::caller::{Caller, Peer};
use crate::credentials::problem::{Kind, Problem};
use crate::credentials::Credentials;
use crate::doors::limits::{PerUid, UidSlot};
use crate::doors::uds_authority::{AuthorityFix, MAX_FRAME, MAX_HEADER_LIST};
use crate::doors::SharedSettings;

#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("_");
}

use crate::credentials::svid::SoftwareSvid;
use proto::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use proto::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};

/// The metadata every Workload API call must carry (SPIFFE Workload Endpoint §4).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The gRPC status of a refusal (DESIGN "Workload API": status codes).
pub fn status_of(p: &Problem) -> Status {
    crate::metrics::refused(p.kind.slug(), "spiffe");
    let code = match p.kind {
        Kind::MalformedRequest | Kind::BodyTooLarge | Kind::TokenNotAccepted => {
            Code::InvalidArgument
        }
        Kind::RateLimited
        | Kind::BackendUnavailable
        | Kind::AuditUnavailable
        | Kind::RequestTimeout
        | Kind::CallerGone => Code::Unavailable,
        Kind::Internal => Code::Internal,
        Kind::NotFound | Kind::MethodNotAllowed => Code::Unimplemented,
        _ => Code::PermissionDenied,
    };
    Status::new(code, format!("{}: {}", p.kind.slug(), p.detail))
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER) {
        Some(v) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: workload.spiffe.io: true",
        )),
    }
}

/// One connection's service: the peer the kernel named when it connected.
#[derive(Clone)]
struct WorkloadApi {
    svc: Arc<Credentials>,
    settings: SharedSettings,
    peer: Arc<Peer>,
    streams: PerUid,
    /// Turns true when the daemon stops: open streams end (a bundle stream never would).
    stop: tokio::sync::watch::Receiver<bool>,
}

type MessageStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

impl WorkloadApi {
    fn deadline(&self) -> Duration {
        crate::doors::with(&self.settings, |s| s.request_deadline)
    }

    /// A unary call within the request deadline.
    async fn within<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let d = self.deadline();
        match tokio::time::timeout(d, work).await {
            Ok(r) => r,
            Err(_) => Err(Status::unavailable(format!(
                "request-timeout: the call did not complete within {d:?}"
            ))),
        }
    }

    async fn identify(&self) -> Result<Caller, Status> {
        self.svc
            .identify(self.peer.clone())
            .await
            .map_err(|p| status_of(&p))
    }

    /// A stream slot for this peer's uid (`[limits] per_uid_streams`).
    fn stream_slot(&self) -> Result<UidSlot, Status> {
        let cap = crate::doors::with(&self.settings, |s| s.per_uid_streams);
        self.streams.take(self.peer.uid, cap).ok_or_else(|| {
            Status::unavailable(format!(
                "uid {} already holds {cap} Workload API streams",
                self.peer.uid
            ))
        })
    }

    /// A stream of `make()`'s answers: the first within the request deadline, then one more
    /// whenever a bundle change makes the answer differ from the last one sent. Ends when the
    /// client goes away or the daemon stops.
    async fn follow<T, F, Fut>(&self, make: F) -> Result<MessageStream<T>, Status>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(Arc<Credentials>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, Status>> + Send,
    {
        let slot = self.stream_slot()?;
        let mut changes = self.svc.bundle_changes();
        changes.mark_unchanged();
        let first = self.within(make(self.svc.clone())).await?;
        let (tx, rx) = mpsc::channel::<Result<T, Status>>(1);
        let svc = self.svc.clone();
        let mut stopping = self.stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = first;
            // Every send gives way to the daemon's stop (a full channel is an idle client).
            if !send(&tx, Ok(last.clone()), &mut stopping).await {
                return;
            }
            loop {
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = stopping.changed() => {
                        let _ = tx.try_send(Err(Status::unavailable("the daemon is stopping")));
                        return;
                    }
                }
                let next = tokio::select! {
                    m = make(svc.clone()) => m,
                    _ = stopping.changed() => {
                        let _ = tx.try_send(Err(Status::unavailable("the daemon is stopping")));
                        return;
                    }
                };
                match next {
                    Ok(m) if m == last => continue,
                    Ok(m) => {
                        last = m;
                        if !send(&tx, Ok(last.clone()), &mut stopping).await {
                            return;
                        }
                    }
                    Err(s) => {
                        let _ = send(&tx, Err(s), &mut stopping).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// Send one stream message unless the daemon stops first (then the client is told so).
async fn send<T>(
    tx: &mpsc::Sender<Result<T, Status>>,
    item: Result<T, Status>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    if *stopping.borrow() {
        let _ = tx.try_send(Err(Status::unavailable("the daemon is stopping")));
        return false;
    }
    tokio::select! {
        r = tx.send(item) => r.is_ok(),
        _ = stopping.changed() => {
            let _ = tx.try_send(Err(Status::unavailable("the daemon is stopping")));
            false
        }
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = MessageStream<X509svidResponse>;
    type FetchX509BundlesStream = MessageStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = MessageStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let caller = self.within(self.identify()).await?;
        let agents = self.svc.software_svid_agents(&caller);
        if agents.is_empty() {
            let p = self.svc.refuse_x509_svid(&caller).await;
            return Err(status_of(&p));
        }
        let slot = self.stream_slot()?;
        let mut changes = self.svc.bundle_changes();
        changes.mark_unchanged();
        let svc = self.svc.clone();
        let mut svids = self.within(issue_all(&svc, &caller, &agents)).await?;
        let first = self.within(x509_svid_message(&svc, &svids)).await?;
        let (tx, rx) = mpsc::channel::<Result<X509svidResponse, Status>>(1);
        let mut stopping = self.stop.clone();
        let peer = self.peer.clone();
        let mut agents = agents;
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = first;
            if !send(&tx, Ok(last.clone()), &mut stopping).await {
                return;
            }
            let version = |a: &[crate::agents::Agent]| -> Vec<(i64, String, i64)> {
                a.iter()
                    .map(|a| (a.row, a.key_id.clone(), a.updated_at))
                    .collect()
            };
            loop {
                // Rotate at half-life: the earliest of the SVIDs' midpoints.
                let now = crate::agents::now_unix();
                let due = svids
                    .iter()
                    .map(|s| s.not_before + (s.not_after - s.not_before) / 2)
                    .min()
                    .unwrap_or(now);
                let wait = Duration::from_secs(due.saturating_sub(now).max(1) as u64);
                let mut rotate = tokio::select! {
                    _ = tokio::time::sleep(wait) => true,
                    r = changes.changed() => { if r.is_err() { return } false }
                    _ = tx.closed() => return,
                    _ = stopping.changed() => {
                        let _ = tx.try_send(Err(Status::unavailable("the daemon is stopping")));
                        return;
                    }
                };
                // Who the caller is and which agents it is, asked again: revoked, suspended,
                // re-scoped (selectors, policy) or opted-out agents get nothing more, and a
                // caller that exec'd or changed uid is refused.
                let caller = match svc.identify(peer.clone()).await {
                    Ok(c) => c,
                    Err(p) => {
                        let _ = send(&tx, Err(status_of(&p)), &mut stopping).await;
                        return;
                    }
                };
                let current = svc.software_svid_agents(&caller);
                if current.is_empty() {
                    let _ = send(
                        &tx,
                        Err(Status::permission_denied(
                            "no agent of this process has software X.509-SVIDs any more (revoked, suspended, changed or opted out)",
                        )),
                        &mut stopping,
                    )
                    .await;
                    return;
                }
                if version(&current) != version(&agents) {
                    agents = current;
                    rotate = true;
                }
                if rotate {
                    match issue_all(&svc, &caller, &agents).await {
                        Ok(s) => svids = s,
                        Err(e) => {
                            let _ = send(&tx, Err(e), &mut stopping).await;
                            return;
                        }
                    }
                }
                match x509_svid_message(&svc, &svids).await {
                    Ok(m) if m == last => continue,
                    Ok(m) => {
                        last = m;
                        if !send(&tx, Ok(last.clone()), &mut stopping).await {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = send(&tx, Err(e), &mut stopping).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let stream = self
            .follow(|svc: Arc<Credentials>| async move {
                let b = svc.x509_bundle().await.map_err(|p| status_of(&p))?;
                Ok(X509BundlesResponse {
                    crl: vec![b.crl],
                    bundles: [(b.trust_domain, b.certificates)].into_iter().collect(),
                })
            })
            .await?;
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let req = request.into_inner();
        self.within(async {
            let caller = self.identify().await?;
            let wanted = (!req.spiffe_id.is_empty()).then_some(req.spiffe_id.as_str());
            let svids = self
                .svc
                .issue_jwt_svids(&caller, &req.audience, wanted)
                .await
                .map_err(|p| status_of(&p))?;
            Ok(Response::new(JwtsvidResponse {
                svids: svids
                    .into_iter()
                    .map(|s| Jwtsvid {
                        spiffe_id: s.spiffe_id,
                        svid: s.svid,
                        hint: String::new(),
                    })
                    .collect(),
            }))
        })
        .await
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let stream = self
            .follow(|svc: Arc<Credentials>| async move {
                Ok(JwtBundlesResponse {
                    bundles: [(svc.trust_domain_id(), svc.jwt_bundle())]
                        .into_iter()
                        .collect(),
                })
            })
            .await?;
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let req = request.into_inner();
        let v = self
            .svc
            .validate_jwt_svid(&req.audience, &req.svid)
            .map_err(|p| status_of(&p))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id,
            claims: Some(to_struct(v.claims)),
        }))
    }
}

/// A software X.509-SVID for each agent.
async fn issue_all(
    svc: &Credentials,
    caller: &Caller,
    agents: &[crate::agents::Agent],
) -> Result<Vec<SoftwareSvid>, Status> {
    let mut out = Vec::with_capacity(agents.len());
    for a in agents {
        out.push(
            svc.issue_software_svid(caller, a)
                .await
                .map_err(|p| status_of(&p))?,
        );
    }
    Ok(out)
}

/// The SVIDs with the current bundle and CRL.
async fn x509_svid_message(
    svc: &Credentials,
    svids: &[SoftwareSvid],
) -> Result<X509svidResponse, Status> {
    let b = svc.x509_bundle().await.map_err(|p| status_of(&p))?;
    Ok(X509svidResponse {
        svids: svids
            .iter()
            .map(|s| X509svid {
                spiffe_id: s.spiffe_id.clone(),
                x509_svid: s.chain.clone(),
                x509_svid_key: s.key_pkcs8.to_vec(),
                bundle: b.certificates.clone(),
                // Says plainly what this is.
                hint: "software-key".into(),
            })
            .collect(),
        crl: vec![b.crl],
        federated_bundles: Default::default(),
    })
}

/// JSON claims as a protobuf `Struct`.
fn to_struct(m: serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind as K;
    let kind = match v {
        Value::Null => K::NullValue(0),
        Value::Bool(b) => K::BoolValue(b),
        Value::Number(n) => K::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => K::StringValue(s),
        Value::Array(a) => K::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Value::Object(o) => K::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Serve the Workload API until `shutdown` resolves, then drain (bounded by `drain`).
pub async fn serve(
    svc: Arc<Credentials>,
    settings: SharedSettings,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let max_connections = crate::doors::with(&settings, |s| s.max_connections);
    let slots = Arc::new(Semaphore::new(max_connections));
    let per_uid = PerUid::default();
    let streams = PerUid::default();
    if let Err(e) = crate::caller::pass_credentials(&listener) {
        tracing::error!(error = %e, "cannot enable sender credentials on the Workload API socket; refusing to serve it");
        return;
    }
    let graceful = GracefulShutdown::new();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let peer = match Peer::from_socket(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "dropping connection without peer credentials");
                continue;
            }
        };
        if let Err(e) = crate::caller::pass_credentials(&stream) {
            tracing::warn!(error = %e, "dropping a connection that cannot pass credentials");
            continue;
        }
        let cap = crate::doors::with(&settings, |s| s.per_uid_connections);
        let Some(uid_slot) = per_uid.take(peer.uid, cap) else {
            tracing::debug!(
                uid = peer.uid,
                cap,
                "closing a connection over the per-uid cap"
            );
            continue;
        };
        let svc = svc.clone();
        let settings = settings.clone();
        let streams = streams.clone();
        let stop = stop.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let peer = match tokio::task::spawn_blocking(move || peer.snapshot_exe()).await {
                Ok(p) => Arc::new(p),
                Err(_) => return,
            };
            let header_timeout = crate::doors::with(&settings, |s| s.header_read_timeout);
            let api = WorkloadApi {
                svc,
                settings,
                peer: peer.clone(),
                streams,
                stop,
            };
            let service = TowerToHyperService::new(SpiffeWorkloadApiServer::new(api));
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                // A peer that stops answering is dropped (one that never speaks is dropped by
                // the handshake timeout above).
                .keep_alive_interval(Some(header_timeout.max(Duration::from_secs(10))))
                .keep_alive_timeout(header_timeout.max(Duration::from_secs(10)))
                // Unary calls identify the caller off the reactor: a few at a time per connection.
                .max_concurrent_streams(16)
                .max_frame_size(MAX_FRAME as u32)
                .max_header_list_size(MAX_HEADER_LIST as u32);
            let conn = builder.serve_connection(
                TokioIo::new(AuthorityFix::with_handshake_timeout(
                    crate::caller::SenderChecked::new(stream, &peer),
                    header_timeout,
                )),
                service,
            );
            let _ = watcher.watch(conn).await;
            drop(uid_slot);
            drop(permit);
        });
    }
    let _ = stop_tx.send(true);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => tracing::warn!("Workload API connections still open after drain timeout"),
    }
}
