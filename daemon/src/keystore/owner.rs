//! The one owner of the device. A TPM context is neither Send nor Sync and a PKCS#11 session
//! is not Sync, so the store lives on a dedicated thread and everything else talks to it
//! through two lanes. Signing (what any local caller can cause) goes through a bounded queue;
//! a full queue is reported as `Busy` (the API answers 503 + Retry-After) instead of
//! queueing without bound. Admin operations (create, destroy, list, public key, stop) have
//! their own lane, served first and never refused as busy: a flood of token requests cannot
//! make a revocation fail.
//!
//! A device that can sign in parallel (a PKCS#11 token, [`KeyStore::worker`]) gets more
//! owner threads, each with a session of its own, all taking from the one signing lane;
//! the admin lane stays with the first thread. A TPM keeps exactly one.

use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use p256::ecdsa::{Signature, VerifyingKey};
use tokio::sync::{mpsc, oneshot, watch};

use super::session::SessionKeys;
use super::{BackendKind, CreatedKey, KeyEvidence, KeyStore, KeyStoreError, RsaPublic};

/// Requests waiting for the device at most; beyond that callers get `Busy`.
pub const QUEUE_DEPTH: usize = 256;

type Reply<T> = oneshot::Sender<Result<T, KeyStoreError>>;

enum Request {
    Create(String, Reply<CreatedKey>),
    Public(String, Reply<VerifyingKey>),
    Sign(String, [u8; 32], Reply<Signature>),
    CreateRsa(String, Reply<RsaPublic>),
    SignRsa(String, [u8; 32], Reply<Vec<u8>>),
    Destroy(String, Reply<()>),
    List(Reply<Vec<String>>),
    Attest(String, Vec<u8>, Reply<KeyEvidence>),
    /// Close the device on the owner thread and end it (see [`KeyStoreHandle::shutdown`]).
    Stop,
}

/// Cheap to clone; every clone feeds the same device thread.
#[derive(Clone)]
pub struct KeyStoreHandle {
    /// Signing lane (bounded).
    tx: mpsc::Sender<Request>,
    /// Admin lane (unbounded: only admins and the daemon itself put requests here).
    admin: mpsc::UnboundedSender<Request>,
    backend: BackendKind,
    /// In-memory session proof keys (`proof_key = "session"`), beside the device keys so that
    /// whoever destroys an agent's device key drops these first.
    sessions: Arc<SessionKeys>,
    /// The owner thread, taken and joined once by [`KeyStoreHandle::shutdown`].
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl KeyStoreHandle {
    /// Start the owner thread; `open` runs on it (so a non-Send context never moves) and its
    /// error is returned here, so a bad setup fails at start with the device's own reason.
    /// Up to `signers - 1` more threads sign in parallel where the device allows it.
    pub fn spawn<F>(open: F, signers: usize) -> Result<Self, KeyStoreError>
    where
        F: FnOnce() -> Result<Box<dyn KeyStore>, KeyStoreError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Request>(QUEUE_DEPTH);
        let (admin, mut admin_rx) = mpsc::unbounded_channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = thread::Builder::new()
            .name("keystore".into())
            .spawn(move || {
                let mut store = match open() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // The signing lane is shared: whichever owner is free takes the next request.
                let lane = Arc::new(tokio::sync::Mutex::new(rx));
                let (stop_tx, stop_rx) = watch::channel(false);
                let mut workers = Vec::new();
                for n in 1..signers.max(1) {
                    let worker = match store.worker() {
                        Ok(Some(w)) => w,
                        Ok(None) => break,
                        Err(e) => {
                            // Fewer sessions than asked is a slower daemon, not a broken one.
                            tracing::warn!(error = %e, sessions = n, "key store: cannot open another signing session");
                            break;
                        }
                    };
                    match spawn_signer(n, worker, lane.clone(), stop_rx.clone()) {
                        Ok(h) => workers.push(h),
                        Err(e) => {
                            tracing::warn!(error = %e, "key store: cannot start a signing thread");
                            break;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(store.backend()));
                // A runtime of this thread alone, to wait on both lanes; the device calls block
                // it, which is the point: one device operation at a time per session.
                let lanes = match tokio::runtime::Builder::new_current_thread().build() {
                    Ok(rt) => rt,
                    Err(_) => return,
                };
                lanes.block_on(async {
                    loop {
                        let req = tokio::select! {
                            biased;
                            Some(r) = admin_rx.recv() => r,
                            Some(r) = next(&lane) => r,
                            else => break,
                        };
                        if let Request::Stop = req {
                            break;
                        }
                        serve(store.as_mut(), req);
                    }
                });
                // Every other session closes before this one, whose store finalises the module.
                let _ = stop_tx.send(true);
                for w in workers {
                    let _ = w.join();
                }
                // The device is closed here, on its own thread, before `shutdown` returns:
                // TPM objects flushed, PKCS#11 sessions closed, C_Finalize, module unloaded.
                drop(store);
                // Whatever was still queued behind Stop is answered `Stopped` when dropped.
                if let Ok(mut rx) = lane.try_lock() {
                    rx.close();
                }
                admin_rx.close();
            })
            .map_err(|e| KeyStoreError::Device {
                op: "spawn key store thread",
                detail: e.to_string(),
            })?;
        let backend = ready_rx.recv().map_err(|_| KeyStoreError::Stopped)??;
        Ok(KeyStoreHandle {
            tx,
            admin,
            backend,
            sessions: Arc::default(),
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Close the device and join its owner threads. Later calls fail with `Stopped`; signatures
    /// still queued are served by a signing session before it stops or fail with `Stopped`
    /// (the daemon calls this after its doors have drained). A device library must never be
    /// torn down while the process exits (SoftHSM's C++ destructors would run on two threads at once), so
    /// the daemon calls this before `main` returns. Idempotent.
    pub async fn shutdown(&self) {
        // Stop step 6: session keys zeroized before the device closes.
        self.sessions.clear();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(handle) = handle else { return };
        // On the admin lane: served before queued signatures, which then fail with `Stopped`
        // (the doors have stopped accepting by now, so those callers are gone or leaving).
        let _ = self.admin.send(Request::Stop);
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }

    pub fn sessions(&self) -> &SessionKeys {
        &self.sessions
    }

    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// On the admin lane: never `Busy`.
    async fn admin_call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> Result<T, KeyStoreError> {
        let (reply, rx) = oneshot::channel();
        self.admin
            .send(make(reply))
            .map_err(|_| KeyStoreError::Stopped)?;
        rx.await.map_err(|_| KeyStoreError::Stopped)?
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, KeyStoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                KeyStoreError::Busy("too many requests queued for the device".into())
            }
            mpsc::error::TrySendError::Closed(_) => KeyStoreError::Stopped,
        })?;
        rx.await.map_err(|_| KeyStoreError::Stopped)?
    }

    /// Signing requests waiting for a device session now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub async fn create(&self, id: &str) -> Result<CreatedKey, KeyStoreError> {
        let id = id.to_string();
        self.admin_call(|r| Request::Create(id, r)).await
    }
    pub async fn public_key(&self, id: &str) -> Result<VerifyingKey, KeyStoreError> {
        let id = id.to_string();
        self.admin_call(|r| Request::Public(id, r)).await
    }
    pub async fn sign(&self, id: &str, digest: [u8; 32]) -> Result<Signature, KeyStoreError> {
        let id = id.to_string();
        self.call(|r| Request::Sign(id, digest, r)).await
    }
    pub async fn create_rsa(&self, id: &str) -> Result<RsaPublic, KeyStoreError> {
        let id = id.to_string();
        self.admin_call(|r| Request::CreateRsa(id, r)).await
    }
    pub async fn sign_rsa(&self, id: &str, digest: [u8; 32]) -> Result<Vec<u8>, KeyStoreError> {
        let id = id.to_string();
        self.call(|r| Request::SignRsa(id, digest, r)).await
    }
    pub async fn destroy(&self, id: &str) -> Result<(), KeyStoreError> {
        let id = id.to_string();
        self.admin_call(|r| Request::Destroy(id, r)).await
    }
    pub async fn list(&self) -> Result<Vec<String>, KeyStoreError> {
        self.admin_call(Request::List).await
    }
    pub async fn attest(&self, id: &str, nonce: &[u8]) -> Result<KeyEvidence, KeyStoreError> {
        let (id, nonce) = (id.to_string(), nonce.to_vec());
        self.call(|r| Request::Attest(id, nonce, r)).await
    }
}

type Lane = Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>;

/// The next signing request, for whichever owner asks first (both awaits are cancel-safe).
async fn next(lane: &Lane) -> Option<Request> {
    lane.lock().await.recv().await
}

/// One more owner of the signing lane, with its own device session, until `stop` turns true.
fn spawn_signer(
    n: usize,
    mut store: Box<dyn KeyStore + Send>,
    lane: Lane,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("keystore-{n}"))
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
                return;
            };
            rt.block_on(async {
                loop {
                    let req = tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => break,
                        r = next(&lane) => match r {
                            Some(r) => r,
                            None => break,
                        },
                    };
                    serve(store.as_mut(), req);
                }
            });
            drop(store);
        })
}

fn serve(store: &mut dyn KeyStore, req: Request) {
    // A caller that went away (dropped receiver) is not an error for the device thread.
    let t = std::time::Instant::now();
    let op = match req {
        Request::Create(id, r) => {
            let _ = r.send(store.create(&id));
            "create"
        }
        Request::Public(id, r) => {
            let _ = r.send(store.public_key(&id));
            "public_key"
        }
        Request::Sign(id, d, r) => {
            let _ = r.send(store.sign(&id, &d));
            "sign"
        }
        Request::CreateRsa(id, r) => {
            let _ = r.send(store.create_rsa(&id));
            "create"
        }
        Request::SignRsa(id, d, r) => {
            let _ = r.send(store.sign_rsa(&id, &d));
            "sign"
        }
        Request::Destroy(id, r) => {
            let _ = r.send(store.destroy(&id));
            "destroy"
        }
        Request::List(r) => {
            let _ = r.send(store.list());
            "list"
        }
        Request::Attest(id, nonce, r) => {
            let _ = r.send(store.attest(&id, &nonce));
            "attest"
        }
        Request::Stop => return,
    };
    crate::metrics::device_op(op, t.elapsed());
}
