//! PKCS#11 key store (cryptoki 0.12), e.g. SoftHSM or a network HSM.
//!
//! The token is found by label, never by slot number (slot ids change when tokens are
//! initialised). Agent keys are token objects with CKA_PRIVATE, CKA_SENSITIVE,
//! CKA_EXTRACTABLE=false, sign only; both halves carry `CKA_ID = <id>` and
//! `CKA_LABEL = "tessera:<id>"` so they are told apart from anything else on the token.
//!
//! Signing is O(1) in the number of keys: private-key handles are cached per key id (a
//! `C_FindObjects` is linear in the objects on the token), dropped on destroy, and re-found
//! once when the token says a handle is no longer valid. Several sessions sign in parallel
//! ([`KeyStore::worker`]), all sharing the one cache: object handles belong to the
//! application, not to a session.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::Mechanism,
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    slot::Slot,
    types::AuthPin,
};
use p256::ecdsa::{Signature, VerifyingKey};

use super::{
    ecdsa, validate_key_id, BackendKind, CreatedKey, KeyEvidence, KeyStore, KeyStoreError,
    RsaPublic, RSA_BITS, SHA256_DIGEST_INFO,
};

/// DER OID of prime256v1 (CKA_EC_PARAMS).
const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
pub const LABEL_PREFIX: &str = "tessera:";

pub struct Pkcs11KeyStore {
    // Field order matters: the session must close before the library is finalised.
    session: Session,
    ctx: Pkcs11,
    slot: Slot,
    /// Object handles per key id, shared by every session of this store.
    handles: Arc<Mutex<HandleCache>>,
}

/// What this store knows of the token's objects, so that no signature, enrolment or
/// revocation has to search the token (a search is linear in its objects).
#[derive(Default)]
struct HandleCache {
    keys: HashMap<String, KeyHandles>,
    /// Ids found with more than one object of a class (not made by us): always searched.
    ambiguous: HashSet<String>,
    /// Set once [`KeyStore::list`] enumerated the token; from then on every create and
    /// destroy goes through this cache, so an id absent here has no objects.
    complete: bool,
}

#[derive(Clone, Copy, Default)]
struct KeyHandles {
    private: Option<ObjectHandle>,
    public: Option<ObjectHandle>,
}

fn stale(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)
    )
}

fn ck_err(op: &'static str, e: CkError) -> KeyStoreError {
    match e {
        CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _) => KeyStoreError::WrongPin,
        CkError::Pkcs11(RvError::PinLocked, _) => {
            KeyStoreError::DeviceUnavailable("the token's user PIN is locked".into())
        }
        CkError::Pkcs11(
            rv @ (RvError::DeviceError
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed),
            f,
        ) => KeyStoreError::DeviceUnavailable(format!("{op}: {f}: {rv}")),
        CkError::Pkcs11(rv @ (RvError::DeviceMemory | RvError::HostMemory), f) => {
            KeyStoreError::Busy(format!("{op}: {f}: {rv}"))
        }
        CkError::LibraryLoading(e) => {
            KeyStoreError::DeviceUnavailable(format!("cannot load PKCS#11 module: {e}"))
        }
        other => KeyStoreError::Device {
            op,
            detail: other.to_string(),
        },
    }
}

fn load_module(module: &Path) -> Result<Pkcs11, KeyStoreError> {
    if !module.exists() {
        return Err(KeyStoreError::DeviceUnavailable(format!(
            "PKCS#11 module {} does not exist",
            module.display()
        )));
    }
    let ctx = Pkcs11::new(module).map_err(|e| ck_err("load module", e))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| ck_err("C_Initialize", e))?;
    Ok(ctx)
}

fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Option<Slot>, KeyStoreError> {
    for slot in ctx
        .get_slots_with_initialized_token()
        .map_err(|e| ck_err("C_GetSlotList", e))?
    {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| ck_err("C_GetTokenInfo", e))?;
        if info.label().trim_end() == label {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}

/// Create and initialise a token with `label` (used by `--dev`): SO PIN and user PIN as given.
pub fn provision_token(
    module: &Path,
    label: &str,
    so_pin: &str,
    user_pin: &str,
) -> Result<(), KeyStoreError> {
    let ctx = load_module(module)?;
    if find_slot(&ctx, label)?.is_some() {
        return Ok(());
    }
    let slot = ctx
        .get_slots_with_token()
        .map_err(|e| ck_err("C_GetSlotList", e))?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| !i.token_initialized())
                .unwrap_or(false)
        })
        .ok_or_else(|| {
            KeyStoreError::TokenNotFound(format!("{label} (no free slot to create it)"))
        })?;
    let so = AuthPin::new(so_pin.into());
    ctx.init_token(slot, &so, label)
        .map_err(|e| ck_err("C_InitToken", e))?;
    let slot = find_slot(&ctx, label)?.ok_or_else(|| KeyStoreError::TokenNotFound(label.into()))?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| ck_err("C_OpenSession", e))?;
    session
        .login(UserType::So, Some(&so))
        .map_err(|e| ck_err("C_Login(SO)", e))?;
    session
        .init_pin(&AuthPin::new(user_pin.into()))
        .map_err(|e| ck_err("C_InitPIN", e))?;
    Ok(())
}

impl Pkcs11KeyStore {
    pub fn open(module: &Path, token_label: &str, pin: &str) -> Result<Self, KeyStoreError> {
        let ctx = load_module(module)?;
        let slot = find_slot(&ctx, token_label)?
            .ok_or_else(|| KeyStoreError::TokenNotFound(token_label.to_string()))?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| ck_err("C_OpenSession", e))?;
        match session.login(UserType::User, Some(&AuthPin::new(pin.into()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(ck_err("C_Login", e)),
        }
        Ok(Pkcs11KeyStore {
            session,
            ctx,
            slot,
            handles: Arc::default(),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HandleCache> {
        // The map holds plain handles: a panic elsewhere cannot leave it half-updated.
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handles of `id` this store knows, if it can vouch for them.
    fn cached(&self, id: &str) -> Option<KeyHandles> {
        let c = self.cache();
        if c.ambiguous.contains(id) {
            return None;
        }
        c.keys.get(id).copied()
    }

    /// True when the token is known to hold no object of `id`.
    fn known_absent(&self, id: &str) -> bool {
        let c = self.cache();
        c.complete && !c.keys.contains_key(id) && !c.ambiguous.contains(id)
    }

    fn forget(&self, id: &str) {
        self.cache().keys.remove(id);
    }

    /// A handle of `id` turned out stale: what is on the token is unknown until searched, so
    /// `id` is searched from now on (never taken as absent).
    fn suspect(&self, id: &str) {
        let mut c = self.cache();
        c.keys.remove(id);
        c.ambiguous.insert(id.to_string());
    }

    /// The private key's handle: from the cache, else found on the token (and cached).
    fn cached_private_handle(&self, id: &str) -> Result<ObjectHandle, KeyStoreError> {
        if let Some(h) = self.cached(id).and_then(|k| k.private) {
            return Ok(h);
        }
        let h = self.private_handle(id)?;
        let public = self.find(id, ObjectClass::PUBLIC_KEY)?.into_iter().next();
        self.cache().keys.insert(
            id.to_string(),
            KeyHandles {
                private: Some(h),
                public,
            },
        );
        Ok(h)
    }

    /// `C_Sign` with key `id`'s private half. The object may have gone away behind our back
    /// (another application destroyed it): never sign with a stale handle; look the key up
    /// once more, and report it gone if it is.
    fn sign_with(&self, id: &str, mech: &Mechanism, data: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        let h = self.cached_private_handle(id)?;
        match self.session.sign(mech, h, data) {
            Ok(raw) => Ok(raw),
            Err(e) if stale(&e) => {
                self.suspect(id);
                let h = self.cached_private_handle(id)?;
                self.session
                    .sign(mech, h, data)
                    .map_err(|e| ck_err("C_Sign", e))
            }
            Err(e) => Err(ck_err("C_Sign", e)),
        }
    }

    fn find(&self, id: &str, class: ObjectClass) -> Result<Vec<ObjectHandle>, KeyStoreError> {
        self.session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Id(id.as_bytes().to_vec()),
                Attribute::Label(format!("{LABEL_PREFIX}{id}").into_bytes()),
            ])
            .map_err(|e| ck_err("C_FindObjects", e))
    }

    fn private_handle(&self, id: &str) -> Result<ObjectHandle, KeyStoreError> {
        self.find(id, ObjectClass::PRIVATE_KEY)?
            .into_iter()
            .next()
            .ok_or_else(|| KeyStoreError::KeyNotFound(id.to_string()))
    }

    /// `KeyExists` when objects with this id are on the token (or in the cache).
    fn ensure_absent(&self, id: &str) -> Result<(), KeyStoreError> {
        let exists = if self.cached(id).is_some() {
            true
        } else if self.known_absent(id) {
            false
        } else {
            !self.find(id, ObjectClass::PRIVATE_KEY)?.is_empty()
                || !self.find(id, ObjectClass::PUBLIC_KEY)?.is_empty()
        };
        if exists {
            return Err(KeyStoreError::KeyExists(id.to_string()));
        }
        Ok(())
    }

    fn read_rsa_public(&self, handle: ObjectHandle) -> Result<RsaPublic, KeyStoreError> {
        let attrs = self
            .session
            .get_attributes(
                handle,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )
            .map_err(|e| ck_err("C_GetAttributeValue(CKA_MODULUS)", e))?;
        let (mut n, mut e) = (None, None);
        for a in attrs {
            match a {
                Attribute::Modulus(v) => n = Some(v),
                Attribute::PublicExponent(v) => e = Some(v),
                _ => {}
            }
        }
        match (n, e) {
            (Some(n), Some(e)) if n.len() == RSA_BITS / 8 && !e.is_empty() => {
                // Minimal big-endian (JWK `e` has no leading zeros).
                let first = e.iter().position(|b| *b != 0).unwrap_or(e.len() - 1);
                Ok(RsaPublic {
                    n,
                    e: e[first..].to_vec(),
                })
            }
            _ => Err(KeyStoreError::Device {
                op: "read CKA_MODULUS",
                detail: "token returned no 2048-bit RSA public key".into(),
            }),
        }
    }

    fn read_public(&self, handle: ObjectHandle) -> Result<VerifyingKey, KeyStoreError> {
        let attrs = self
            .session
            .get_attributes(handle, &[AttributeType::EcPoint])
            .map_err(|e| ck_err("C_GetAttributeValue(CKA_EC_POINT)", e))?;
        for a in attrs {
            if let Attribute::EcPoint(der) = a {
                // DER OCTET STRING (04 41) around the SEC1 point (04 || X || Y).
                let point = match der.as_slice() {
                    [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
                    raw if raw.len() == 65 => raw,
                    _ => {
                        return Err(KeyStoreError::Device {
                            op: "read CKA_EC_POINT",
                            detail: format!("unexpected {}-byte encoding", der.len()),
                        })
                    }
                };
                return ecdsa::public_from_sec1(point);
            }
        }
        Err(KeyStoreError::Device {
            op: "read CKA_EC_POINT",
            detail: "token returned no EC point".into(),
        })
    }
}

impl KeyStore for Pkcs11KeyStore {
    fn backend(&self) -> BackendKind {
        BackendKind::Pkcs11
    }

    fn create(&mut self, id: &str) -> Result<CreatedKey, KeyStoreError> {
        validate_key_id(id)?;
        self.ensure_absent(id)?;
        let label = format!("{LABEL_PREFIX}{id}").into_bytes();
        let common = [
            Attribute::Token(true),
            Attribute::KeyType(KeyType::EC),
            Attribute::Id(id.as_bytes().to_vec()),
            Attribute::Label(label),
        ];
        let mut pub_t = common.to_vec();
        pub_t.extend([
            Attribute::Private(false),
            Attribute::EcParams(P256_OID_DER.to_vec()),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Derive(false),
        ]);
        let mut priv_t = common.to_vec();
        priv_t.extend([
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]);
        let (pubh, privh) = self
            .session
            .generate_key_pair(&Mechanism::EccKeyPairGen, &pub_t, &priv_t)
            .map_err(|e| ck_err("C_GenerateKeyPair", e))?;
        self.cache().keys.insert(
            id.to_string(),
            KeyHandles {
                private: Some(privh),
                public: Some(pubh),
            },
        );
        let public = self.read_public(pubh)?;
        Ok(CreatedKey {
            id: id.to_string(),
            public,
        })
    }

    fn create_rsa(&mut self, id: &str) -> Result<RsaPublic, KeyStoreError> {
        validate_key_id(id)?;
        self.ensure_absent(id)?;
        let label = format!("{LABEL_PREFIX}{id}").into_bytes();
        let common = [
            Attribute::Token(true),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Id(id.as_bytes().to_vec()),
            Attribute::Label(label),
        ];
        let mut pub_t = common.to_vec();
        pub_t.extend([
            Attribute::Private(false),
            Attribute::ModulusBits((RSA_BITS as std::os::raw::c_ulong).into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
        ]);
        let mut priv_t = common.to_vec();
        // Sign only: no decryption, no unwrapping (CKM_RSA_PKCS could otherwise decrypt).
        priv_t.extend([
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::SignRecover(false),
        ]);
        let (pubh, privh) = self
            .session
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &pub_t, &priv_t)
            .map_err(|e| ck_err("C_GenerateKeyPair", e))?;
        self.cache().keys.insert(
            id.to_string(),
            KeyHandles {
                private: Some(privh),
                public: Some(pubh),
            },
        );
        self.read_rsa_public(pubh)
    }

    fn sign_rsa(&mut self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>, KeyStoreError> {
        validate_key_id(id)?;
        // CKM_RSA_PKCS pads what it is given: the DigestInfo of the SHA-256 digest, built here.
        let mut info = SHA256_DIGEST_INFO.to_vec();
        info.extend_from_slice(digest);
        let raw = self.sign_with(id, &Mechanism::RsaPkcs, &info)?;
        if raw.len() != RSA_BITS / 8 {
            return Err(KeyStoreError::Device {
                op: "C_Sign",
                detail: format!(
                    "expected a {}-byte RSA signature, got {}",
                    RSA_BITS / 8,
                    raw.len()
                ),
            });
        }
        Ok(raw)
    }

    fn public_key(&mut self, id: &str) -> Result<VerifyingKey, KeyStoreError> {
        validate_key_id(id)?;
        if let Some(KeyHandles {
            private: Some(_),
            public: Some(pubh),
        }) = self.cached(id)
        {
            match self.session.get_attributes(pubh, &[AttributeType::EcPoint]) {
                Ok(_) => return self.read_public(pubh),
                Err(e) if stale(&e) => self.suspect(id),
                Err(e) => return Err(ck_err("C_GetAttributeValue(CKA_EC_POINT)", e)),
            }
        } else if self.known_absent(id) {
            return Err(KeyStoreError::KeyNotFound(id.to_string()));
        }
        self.private_handle(id)?;
        let pubh = self
            .find(id, ObjectClass::PUBLIC_KEY)?
            .into_iter()
            .next()
            .ok_or_else(|| KeyStoreError::KeyNotFound(id.to_string()))?;
        self.read_public(pubh)
    }

    fn sign(&mut self, id: &str, digest: &[u8; 32]) -> Result<Signature, KeyStoreError> {
        validate_key_id(id)?;
        let raw = self.sign_with(id, &Mechanism::Ecdsa, digest)?;
        if raw.len() != 64 {
            return Err(KeyStoreError::Device {
                op: "C_Sign",
                detail: format!("expected a 64-byte r||s signature, got {} bytes", raw.len()),
            });
        }
        ecdsa::signature_from_r_s(&raw[..32], &raw[32..])
    }

    fn destroy(&mut self, id: &str) -> Result<(), KeyStoreError> {
        validate_key_id(id)?;
        // The cache keeps the id until the objects are gone: a failed destroy is retried with
        // what is still there, never answered "not found" from memory.
        if let Some(k) = self.cached(id) {
            // Private half first: it is the part that can sign.
            let mut gone_already = false;
            for h in [k.private, k.public].into_iter().flatten() {
                match self.session.destroy_object(h) {
                    Ok(()) => {}
                    Err(e) if stale(&e) => gone_already = true,
                    Err(e) => return Err(ck_err("C_DestroyObject", e)),
                }
            }
            if !gone_already {
                self.forget(id);
                return Ok(());
            }
            // Something changed the token behind our back: search it to be sure.
            self.suspect(id);
        }
        let mut handles = self.find(id, ObjectClass::PRIVATE_KEY)?;
        handles.extend(self.find(id, ObjectClass::PUBLIC_KEY)?);
        if handles.is_empty() {
            let mut c = self.cache();
            c.keys.remove(id);
            c.ambiguous.remove(id);
            return Err(KeyStoreError::KeyNotFound(id.to_string()));
        }
        for h in handles {
            self.session
                .destroy_object(h)
                .map_err(|e| ck_err("C_DestroyObject", e))?;
        }
        let left = self.find(id, ObjectClass::PRIVATE_KEY)?.len()
            + self.find(id, ObjectClass::PUBLIC_KEY)?.len();
        if left != 0 {
            return Err(KeyStoreError::Device {
                op: "C_DestroyObject",
                detail: format!("{left} object(s) of key {id} still on the token after destroy"),
            });
        }
        let mut c = self.cache();
        c.keys.remove(id);
        c.ambiguous.remove(id);
        Ok(())
    }

    /// Enumerates the token once and fills the handle cache from what it finds.
    fn list(&mut self) -> Result<Vec<String>, KeyStoreError> {
        let mut keys: HashMap<String, KeyHandles> = HashMap::new();
        let mut ambiguous = HashSet::new();
        // P-256 keys and RSA agent keys (`key = "rsa2048"`): a kind left out here would look
        // missing to reconciliation and to the cache.
        let kinds = [
            (ObjectClass::PRIVATE_KEY, KeyType::EC),
            (ObjectClass::PUBLIC_KEY, KeyType::EC),
            (ObjectClass::PRIVATE_KEY, KeyType::RSA),
            (ObjectClass::PUBLIC_KEY, KeyType::RSA),
        ];
        for (class, kind) in kinds {
            let handles = self
                .session
                .find_objects(&[Attribute::Class(class), Attribute::KeyType(kind)])
                .map_err(|e| ck_err("C_FindObjects", e))?;
            for h in handles {
                let attrs = self
                    .session
                    .get_attributes(h, &[AttributeType::Label, AttributeType::Id])
                    .map_err(|e| ck_err("C_GetAttributeValue(CKA_LABEL)", e))?;
                let (mut label, mut ck_id) = (None, None);
                for a in attrs {
                    match a {
                        Attribute::Label(l) => label = Some(l),
                        Attribute::Id(i) => ck_id = Some(i),
                        _ => {}
                    }
                }
                let Some(label) = label else { continue };
                let label = String::from_utf8_lossy(&label);
                let Some(id) = label.strip_prefix(LABEL_PREFIX) else {
                    continue;
                };
                if validate_key_id(id).is_err() {
                    continue;
                }
                let entry = keys.entry(id.to_string()).or_default();
                let slot = if class == ObjectClass::PRIVATE_KEY {
                    &mut entry.private
                } else {
                    &mut entry.public
                };
                // Only an object with our CKA_ID too is ours to sign with unsearched.
                if slot.is_some() || ck_id.as_deref() != Some(id.as_bytes()) {
                    ambiguous.insert(id.to_string());
                }
                *slot = Some(h);
            }
        }
        let mut ids: Vec<String> = keys.keys().cloned().collect();
        ids.sort();
        let mut c = self.cache();
        c.keys = keys;
        c.ambiguous = ambiguous;
        c.complete = true;
        Ok(ids)
    }

    /// One more session on the same token, sharing this store's handle cache (the user is
    /// logged in for the whole application, so the new session can sign at once).
    fn worker(&mut self) -> Result<Option<Box<dyn KeyStore + Send>>, KeyStoreError> {
        let session = self
            .ctx
            .open_rw_session(self.slot)
            .map_err(|e| ck_err("C_OpenSession", e))?;
        Ok(Some(Box::new(Pkcs11KeyStore {
            session,
            ctx: self.ctx.clone(),
            slot: self.slot,
            handles: self.handles.clone(),
        })))
    }

    /// The token's own account of the private key: what it says, not hardware evidence.
    fn attest(&mut self, id: &str, _nonce: &[u8]) -> Result<KeyEvidence, KeyStoreError> {
        validate_key_id(id)?;
        let h = self.cached_private_handle(id)?;
        let wanted = [
            AttributeType::Token,
            AttributeType::Private,
            AttributeType::Sensitive,
            AttributeType::AlwaysSensitive,
            AttributeType::Extractable,
            AttributeType::NeverExtractable,
            AttributeType::Local,
            AttributeType::Sign,
            AttributeType::Decrypt,
            AttributeType::Unwrap,
            AttributeType::Derive,
        ];
        let attrs = match self.session.get_attributes(h, &wanted) {
            Ok(a) => a,
            // Evidence names the object the token holds now: a stale handle is searched again.
            Err(e) if stale(&e) => {
                self.suspect(id);
                let h = self.cached_private_handle(id)?;
                self.session
                    .get_attributes(h, &wanted)
                    .map_err(|e| ck_err("C_GetAttributeValue", e))?
            }
            Err(e) => return Err(ck_err("C_GetAttributeValue", e)),
        };
        // Named as the standard names them (cryptoki's Display: "CKA_SENSITIVE", ...).
        let out = attrs
            .iter()
            .filter_map(|a| match a {
                Attribute::Token(v)
                | Attribute::Private(v)
                | Attribute::Sensitive(v)
                | Attribute::AlwaysSensitive(v)
                | Attribute::Extractable(v)
                | Attribute::NeverExtractable(v)
                | Attribute::Local(v)
                | Attribute::Sign(v)
                | Attribute::Decrypt(v)
                | Attribute::Unwrap(v)
                | Attribute::Derive(v) => Some((a.attribute_type().to_string(), *v)),
                _ => None,
            })
            .collect();
        Ok(KeyEvidence::Pkcs11Attributes(out))
    }
}
