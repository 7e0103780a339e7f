//! TPM 2.0 key store (tss-esapi 7.7).
//!
//! Keys are children of an ECC P-256 storage primary made from a fixed template in the owner
//! hierarchy, so the same primary comes back after every start without persisting it. Each
//! agent key is kept as two files under `<state>/tpm/keys/`: `<id>.pub` (TPM2B_PUBLIC) and
//! `<id>.priv` (TPM2B_PRIVATE, wrapped by the primary: useless outside this TPM). Both are the
//! formats `tpm2_load`/`tpm2_print` read.
//!
//! The TPM has few transient slots (3 on swtpm, no resource manager), so agent keys are loaded
//! on demand and flushed by an LRU that never holds more than `max_loaded` at once (the primary
//! takes one more slot).
//!
//! Crash safety: a key's files are written to a temp name, fsynced and renamed, so a key either
//! exists whole or not at all; destroy removes `.priv` first (the part that makes it usable).
//!
//! This file: the context, the primary and the key operations; `templates`: the object
//! templates; `blobs`: key files on disk; `attest`: the AK, EK certificates and TPM2_Certify.

mod attest;
mod blobs;
mod templates;

use attest::read_ek_certificates;
use blobs::{read_blob, write_blob};
pub use templates::{
    agent_key_template, attestation_key_template, primary_template, rsa_agent_key_template,
};

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use p256::ecdsa::{Signature, VerifyingKey};
use tss_esapi::{
    attributes::ObjectAttributesBuilder,
    constants::response_code::Tss2ResponseCodeKind,
    constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK},
    handles::KeyHandle,
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        ecc::EccCurve,
        key_bits::RsaKeyBits,
        resource_handles::Hierarchy,
        session_handles::AuthSession,
    },
    structures::{
        Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, KeyDerivationFunctionScheme,
        Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa,
        PublicRsaParametersBuilder, RsaExponent, RsaScheme, Signature as TpmSignature,
        SignatureScheme, SymmetricDefinitionObject,
    },
    traits::{Marshall, UnMarshall},
    tss2_esys::TPMT_TK_HASHCHECK,
    Context, TctiNameConf,
};

use super::{
    ecdsa, validate_key_id, BackendKind, CreatedKey, KeyEvidence, KeyStore, KeyStoreError,
    RsaPublic, TpmCertify, MAX_NONCE,
};

/// Loaded agent keys kept at most; with the primary this fills swtpm's 3 slots.
pub const DEFAULT_MAX_LOADED: usize = 2;

/// Saved key contexts kept in memory at most (a few hundred bytes each).
pub const MAX_SAVED_CONTEXTS: usize = 16_384;

pub struct TpmKeyStore {
    /// `None` only between dropping a failed connection and making the next one.
    ctx: Option<Context>,
    primary: KeyHandle,
    /// Where the TPM is, to connect again after the transport failed (a TPM or swtpm that
    /// restarted): the next operation reconnects instead of failing until the daemon restarts.
    tcti: String,
    /// The transport failed: `ctx` and every handle in it are dead.
    broken: bool,
    /// The storage primary's public area as first created: a TPM that answers at `tcti`
    /// after a reconnect must derive the same one, or it is another TPM.
    primary_public: Vec<u8>,
    keys_dir: PathBuf,
    max_loaded: usize,
    /// Most recently used last.
    loaded: Vec<(String, KeyHandle)>,
    /// Contexts of keys loaded before (TPM2_ContextSave, once per key): TPM2_ContextLoad of
    /// one beats TPM2_Load of the blobs (0.76 against 1.29 ms with the sign and flush on
    /// swtpm, see BENCHMARKS.md). Wrapped by the TPM like the blobs; dropped on destroy;
    /// useless after a TPM reset, when the blobs are loaded instead.
    saved: std::collections::HashMap<String, tss_esapi::utils::TpmsContext>,
    /// Keys loaded from their blobs at least once: a context is saved at a key's second
    /// eviction, not its first (a key used once would pay for a save it never uses).
    seen: std::collections::HashSet<String>,
    /// Attestation key blobs (`ak.pub`/`ak.priv`), beside `keys/` so they are never listed
    /// as agent keys.
    ak_dir: PathBuf,
    /// The AK's blobs once read or made, so evidence requests do not re-read them.
    ak: Option<(Public, Private)>,
    /// EK certificates read from NV at open (DER).
    ek_certificates: Vec<Vec<u8>>,
}

fn tpm_err(op: &'static str, e: tss_esapi::Error) -> KeyStoreError {
    if let tss_esapi::Error::Tss2Error(rc) = e {
        match rc.kind() {
            Some(
                Tss2ResponseCodeKind::Retry
                | Tss2ResponseCodeKind::Yielded
                | Tss2ResponseCodeKind::Testing
                | Tss2ResponseCodeKind::ObjectMemory,
            ) => return KeyStoreError::Busy(format!("{op}: {e}")),
            None => {
                // Not a TPM response code: the TCTI (transport) or a library layer failed.
                return KeyStoreError::DeviceUnavailable(format!("{op}: {e}"));
            }
            _ => {}
        }
    }
    KeyStoreError::Device {
        op,
        detail: e.to_string(),
    }
}

fn state_err(path: &Path, source: std::io::Error) -> KeyStoreError {
    KeyStoreError::State {
        path: path.display().to_string(),
        source,
    }
}

fn verifying_key_of(public: &Public) -> Result<VerifyingKey, KeyStoreError> {
    match public {
        Public::Ecc { unique, .. } => {
            ecdsa::public_from_x_y(unique.x().value(), unique.y().value())
        }
        _ => Err(KeyStoreError::Device {
            op: "public key",
            detail: "TPM object is not an ECC key".into(),
        }),
    }
}

fn rsa_public_of(public: &Public) -> Result<RsaPublic, KeyStoreError> {
    match public {
        Public::Rsa {
            unique, parameters, ..
        } => {
            // 0 is the TPM's shorthand for 65537.
            let e = match parameters.exponent().value() {
                0 => 65537u32,
                v => v,
            };
            let e = e.to_be_bytes();
            let first = e.iter().position(|b| *b != 0).unwrap_or(e.len() - 1);
            Ok(RsaPublic {
                n: unique.value().to_vec(),
                e: e[first..].to_vec(),
            })
        }
        _ => Err(KeyStoreError::Device {
            op: "public key",
            detail: "TPM object is not an RSA key".into(),
        }),
    }
}

/// The ECDSA signature a TPM command returned, as a low-S P-256 signature.
fn ecdsa_of(op: &'static str, sig: TpmSignature) -> Result<Signature, KeyStoreError> {
    match sig {
        TpmSignature::EcDsa(s) => {
            ecdsa::signature_from_r_s(s.signature_r().value(), s.signature_s().value())
        }
        _ => Err(KeyStoreError::Device {
            op,
            detail: "TPM returned a non-ECDSA signature".into(),
        }),
    }
}

/// Without a resource manager (swtpm, `/dev/tpm0`) a daemon that was killed leaves its
/// transient objects loaded and the few slots full. We are the TPM's only user there, so
/// whatever is loaded is ours from a previous run: flush it. Behind `/dev/tpmrm0` each
/// connection sees only its own objects, so this finds nothing. Runs before sessions are set
/// (these commands take no authorisation).
fn flush_stale_transients(ctx: &mut Context) -> Result<usize, KeyStoreError> {
    use tss_esapi::constants::{tss::TPM2_TRANSIENT_FIRST, CapabilityType};
    use tss_esapi::structures::CapabilityData;
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)
        .map_err(|e| {
            KeyStoreError::DeviceUnavailable(format!("TPM GetCapability(handles): {e}"))
        })?;
    let CapabilityData::Handles(list) = data else {
        return Ok(0);
    };
    let mut n = 0;
    for h in list.into_inner() {
        let obj = ctx
            .tr_from_tpm_public(h)
            .map_err(|e| tpm_err("read stale object", e))?;
        ctx.flush_context(obj)
            .map_err(|e| tpm_err("flush stale object", e))?;
        n += 1;
    }
    Ok(n)
}

/// Connect through `tcti`, flush what a previous run left, recreate the storage primary.
fn connect(tcti: &str) -> Result<(Context, KeyHandle, Vec<u8>), KeyStoreError> {
    let conf = TctiNameConf::from_str(tcti)
        .map_err(|e| KeyStoreError::DeviceUnavailable(format!("invalid TCTI {tcti:?}: {e}")))?;
    let mut ctx = Context::new(conf).map_err(|e| {
        KeyStoreError::DeviceUnavailable(format!("cannot open TPM at {tcti:?}: {e}"))
    })?;
    let stale = flush_stale_transients(&mut ctx)?;
    if stale > 0 {
        tracing::warn!(
            objects = stale,
            "flushed transient objects left in the TPM by a previous run"
        );
    }
    ctx.set_sessions((Some(AuthSession::Password), None, None));
    let template = primary_template().map_err(|e| tpm_err("primary template", e))?;
    let created = ctx
        .create_primary(Hierarchy::Owner, template, None, None, None, None)
        .map_err(|e| match tpm_err("create storage primary", e) {
            // A TPM that does not answer at all shows up here first.
            KeyStoreError::Device { detail, .. } => {
                KeyStoreError::DeviceUnavailable(format!("TPM at {tcti:?}: {detail}"))
            }
            other => other,
        })?;
    let public = created
        .out_public
        .marshall()
        .map_err(|e| tpm_err("marshal primary public", e))?;
    Ok((ctx, created.key_handle, public))
}

impl TpmKeyStore {
    /// Open the TPM through `tcti` and recreate the storage primary. `state_dir` holds the key blobs.
    pub fn open(tcti: &str, state_dir: &Path, max_loaded: usize) -> Result<Self, KeyStoreError> {
        let keys_dir = state_dir.join("tpm").join("keys");
        fs::create_dir_all(&keys_dir).map_err(|e| state_err(&keys_dir, e))?;
        let (mut ctx, primary, primary_public) = connect(tcti)?;
        let ek_certificates = read_ek_certificates(&mut ctx);
        Ok(TpmKeyStore {
            ctx: Some(ctx),
            primary,
            tcti: tcti.to_string(),
            broken: false,
            primary_public,
            keys_dir,
            max_loaded: max_loaded.max(1),
            loaded: Vec::new(),
            saved: Default::default(),
            seen: Default::default(),
            ak_dir: state_dir.join("tpm"),
            ak: None,
            ek_certificates,
        })
    }

    /// The live connection (`DeviceUnavailable` while there is none).
    fn ctx(&mut self) -> Result<&mut Context, KeyStoreError> {
        self.ctx.as_mut().ok_or_else(|| {
            KeyStoreError::DeviceUnavailable(format!("no connection to the TPM at {:?}", self.tcti))
        })
    }

    /// Run `op` on the TPM, connecting again first if the transport failed before. A
    /// transport failure marks the connection dead, so the call after it reconnects.
    fn on_device<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, KeyStoreError>,
    ) -> Result<T, KeyStoreError> {
        if self.broken {
            self.reconnect()?;
        }
        let res = op(self);
        if matches!(res, Err(KeyStoreError::DeviceUnavailable(_))) {
            tracing::warn!(tcti = %self.tcti, "TPM transport failed; the next operation reconnects");
            self.broken = true;
        }
        res
    }

    fn reconnect(&mut self) -> Result<(), KeyStoreError> {
        // The old connection goes first: a device node admits one opener, swtpm serves one
        // client at a time, and its handles must be flushed before new objects can take
        // the same handle numbers. Keys load from their blobs again.
        self.loaded.clear();
        self.saved.clear();
        self.seen.clear();
        self.ctx = None;
        let (mut ctx, primary, public) = connect(&self.tcti)?;
        if public != self.primary_public {
            // Flush what we made on it; keep refusing until our TPM is back.
            let _ = ctx.flush_context(primary.into());
            return Err(KeyStoreError::DeviceUnavailable(format!(
                "the TPM at {:?} is not the one this daemon opened (another storage primary); refusing it",
                self.tcti
            )));
        }
        self.ctx = Some(ctx);
        self.primary = primary;
        self.broken = false;
        tracing::info!(tcti = %self.tcti, "reconnected to the TPM");
        Ok(())
    }

    /// TPM2_Create under the primary, both halves saved as blobs (.pub first: a lone .pub is
    /// harmless and listed, so reconciliation can clear it). Needs a free object slot.
    fn create_saved(
        &mut self,
        template: Public,
        pub_path: &Path,
        priv_path: &Path,
    ) -> Result<(Public, Private), KeyStoreError> {
        let primary = self.primary;
        let created = self
            .ctx()?
            .create(primary, template, None, None, None, None)
            .map_err(|e| tpm_err("create key", e))?;
        let pub_bytes = created
            .out_public
            .marshall()
            .map_err(|e| tpm_err("marshal public", e))?;
        write_blob(pub_path, &pub_bytes)?;
        write_blob(priv_path, created.out_private.value())?;
        Ok((created.out_public, created.out_private))
    }

    /// Handle of a loaded key, loading it (and evicting the least recently used) if needed.
    fn handle(&mut self, id: &str) -> Result<KeyHandle, KeyStoreError> {
        if let Some(pos) = self.loaded.iter().position(|(k, _)| k == id) {
            let entry = self.loaded.remove(pos);
            let h = entry.1;
            self.loaded.push(entry);
            return Ok(h);
        }
        self.evict_to(self.max_loaded - 1)?;
        if let Some(saved) = self.saved.get(id).cloned() {
            match self.ctx()?.context_load(saved) {
                Ok(obj) => {
                    let h = KeyHandle::from(obj);
                    self.loaded.push((id.to_string(), h));
                    return Ok(h);
                }
                Err(e) => {
                    // A TPM reset invalidates saved contexts: the blobs still load.
                    tracing::debug!(key = id, error = %e, "saved key context not loadable; loading the blobs");
                    self.saved.remove(id);
                }
            }
        }
        let public = self.read_public(id)?;
        let private = self.read_private(id)?;
        let primary = self.primary;
        let h = self
            .ctx()?
            .load(primary, private, public)
            .map_err(|e| tpm_err("load key", e))?;
        self.loaded.push((id.to_string(), h));
        Ok(h)
    }

    /// Flush least recently used keys until at most `keep` are loaded.
    fn evict_to(&mut self, keep: usize) -> Result<(), KeyStoreError> {
        while self.loaded.len() > keep {
            let (id, old) = self.loaded.remove(0);
            if self.seen.len() >= 4 * MAX_SAVED_CONTEXTS {
                self.seen.clear();
            }
            let again = !self.seen.insert(id.clone());
            if again && !self.saved.contains_key(&id) {
                if self.saved.len() >= MAX_SAVED_CONTEXTS {
                    // Full: forget one; it loads from its blobs next time.
                    if let Some(k) = self.saved.keys().next().cloned() {
                        self.saved.remove(&k);
                    }
                }
                match self.ctx()?.context_save(old.into()) {
                    Ok(c) => {
                        self.saved.insert(id, c);
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot save a key context"),
                }
            }
            self.ctx()?
                .flush_context(old.into())
                .map_err(|e| tpm_err("flush key", e))?;
        }
        Ok(())
    }

    fn unload(&mut self, id: &str) -> Result<(), KeyStoreError> {
        self.saved.remove(id);
        self.seen.remove(id);
        if let Some(pos) = self.loaded.iter().position(|(k, _)| k == id) {
            let (_, h) = self.loaded.remove(pos);
            self.ctx()?
                .flush_context(h.into())
                .map_err(|e| tpm_err("flush key", e))?;
        }
        Ok(())
    }

    /// Directory holding the key blobs (tests read them with tpm2-tools).
    pub fn keys_dir(&self) -> &Path {
        &self.keys_dir
    }
}

impl Drop for TpmKeyStore {
    fn drop(&mut self) {
        // Without a resource manager transient objects outlive us: give the slots back.
        let Some(ctx) = self.ctx.as_mut() else {
            return;
        };
        for (_, h) in std::mem::take(&mut self.loaded) {
            let _ = ctx.flush_context(h.into());
        }
        let _ = ctx.flush_context(self.primary.into());
    }
}

impl KeyStore for TpmKeyStore {
    fn backend(&self) -> BackendKind {
        BackendKind::Tpm
    }

    fn create(&mut self, id: &str) -> Result<CreatedKey, KeyStoreError> {
        validate_key_id(id)?;
        self.on_device(|s| s.create_key(id))
    }

    fn public_key(&mut self, id: &str) -> Result<VerifyingKey, KeyStoreError> {
        validate_key_id(id)?;
        if !self.priv_path(id).exists() {
            return Err(KeyStoreError::KeyNotFound(id.to_string()));
        }
        verifying_key_of(&self.read_public(id)?)
    }

    fn sign(&mut self, id: &str, digest: &[u8; 32]) -> Result<Signature, KeyStoreError> {
        validate_key_id(id)?;
        self.on_device(|s| s.sign_digest(id, digest))
    }

    fn destroy(&mut self, id: &str) -> Result<(), KeyStoreError> {
        validate_key_id(id)?;
        self.on_device(|s| s.destroy_key(id))
    }
    fn list(&mut self) -> Result<Vec<String>, KeyStoreError> {
        // A set: each key has two files, and a scan of the list per file was quadratic (half
        // of a start with 10,000 agents went here).
        let mut ids = std::collections::BTreeSet::new();
        let rd = fs::read_dir(&self.keys_dir).map_err(|e| state_err(&self.keys_dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| state_err(&self.keys_dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(".pub")
                .or_else(|| name.strip_suffix(".priv"))
            {
                if validate_key_id(id).is_ok() {
                    ids.insert(id.to_string());
                }
            }
        }
        Ok(ids.into_iter().collect())
    }

    fn attest(&mut self, id: &str, nonce: &[u8]) -> Result<KeyEvidence, KeyStoreError> {
        self.on_device(|s| s.certify(id, nonce))
    }

    fn create_rsa(&mut self, id: &str) -> Result<RsaPublic, KeyStoreError> {
        validate_key_id(id)?;
        self.on_device(|s| s.create_rsa_key(id))
    }

    fn sign_rsa(&mut self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>, KeyStoreError> {
        validate_key_id(id)?;
        self.on_device(|s| s.sign_rsa_digest(id, digest))
    }
}

/// The device operations [`KeyStore`] runs through [`TpmKeyStore::on_device`].
impl TpmKeyStore {
    fn create_key(&mut self, id: &str) -> Result<CreatedKey, KeyStoreError> {
        if self.pub_path(id).exists() || self.priv_path(id).exists() {
            return Err(KeyStoreError::KeyExists(id.to_string()));
        }
        // TPM2_Create needs a free object slot of its own while it works.
        self.evict_to(self.max_loaded.saturating_sub(1))?;
        let template = agent_key_template().map_err(|e| tpm_err("key template", e))?;
        let (out_public, _) =
            self.create_saved(template, &self.pub_path(id), &self.priv_path(id))?;
        let public = verifying_key_of(&out_public)?;
        Ok(CreatedKey {
            id: id.to_string(),
            public,
        })
    }

    fn create_rsa_key(&mut self, id: &str) -> Result<RsaPublic, KeyStoreError> {
        if self.pub_path(id).exists() || self.priv_path(id).exists() {
            return Err(KeyStoreError::KeyExists(id.to_string()));
        }
        self.evict_to(self.max_loaded.saturating_sub(1))?;
        let template = rsa_agent_key_template().map_err(|e| tpm_err("key template", e))?;
        let (out_public, _) =
            self.create_saved(template, &self.pub_path(id), &self.priv_path(id))?;
        rsa_public_of(&out_public)
    }

    fn sign_rsa_digest(&mut self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>, KeyStoreError> {
        let scheme = SignatureScheme::RsaSsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        match self.sign_with_scheme(id, digest, scheme)? {
            TpmSignature::RsaSsa(s) => Ok(s.signature().value().to_vec()),
            _ => Err(KeyStoreError::Device {
                op: "sign",
                detail: "TPM returned a non-RSASSA signature".into(),
            }),
        }
    }

    fn sign_digest(&mut self, id: &str, digest: &[u8; 32]) -> Result<Signature, KeyStoreError> {
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        ecdsa_of("sign", self.sign_with_scheme(id, digest, scheme)?)
    }

    /// TPM2_Sign of an outside digest (a null hashcheck ticket: the key is unrestricted).
    fn sign_with_scheme(
        &mut self,
        id: &str,
        digest: &[u8; 32],
        scheme: SignatureScheme,
    ) -> Result<TpmSignature, KeyStoreError> {
        let h = self.handle(id)?;
        let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(|e| tpm_err("hashcheck ticket", e))?;
        let digest = Digest::try_from(digest.to_vec()).map_err(|e| tpm_err("digest", e))?;
        self.ctx()?
            .sign(h, digest, scheme, ticket)
            .map_err(|e| tpm_err("sign", e))
    }

    fn destroy_key(&mut self, id: &str) -> Result<(), KeyStoreError> {
        let priv_path = self.priv_path(id);
        let pub_path = self.pub_path(id);
        // Whatever of it is in the TPM or in memory goes first, even if the blobs are gone.
        self.unload(id)?;
        if !priv_path.exists() && !pub_path.exists() {
            return Err(KeyStoreError::KeyNotFound(id.to_string()));
        }
        for path in [&priv_path, &pub_path] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(state_err(path, e)),
            }
        }
        fs::File::open(&self.keys_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| state_err(&self.keys_dir, e))?;
        Ok(())
    }
}
