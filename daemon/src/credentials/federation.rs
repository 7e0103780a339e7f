//! Federation: what cloud token services need to trust this host's agent tokens (RFC 7523 /
//! RFC 8693 relying parties). `[federation] issuer` becomes the tokens' `iss`; `publish_dir`
//! gets an OIDC discovery document and `jwks.json`, rewritten whole whenever the key set
//! changes, for a static web server or an object-store sync to serve. The daemon itself makes
//! no outbound call.
//!
//! Whoever can write `publish_dir` can make every federated relying party trust a key of
//! their choosing, so the directory is checked at start (ours, not group/world-writable,
//! local) and written only relative to its descriptor, never through a symlink.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use serde::Deserialize;
use serde_json::{json, Value};

/// `[federation]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// `https://idp.example.com/tessera/{host}`: `iss` of agent tokens when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Where the discovery document and `jwks.json` are kept current.
    #[serde(default)]
    pub publish_dir: Option<PathBuf>,
}

impl FederationConfig {
    /// The issuer with `{host}` filled in, checked against the contract: `https`, a host, no
    /// port, userinfo, query, fragment or trailing `/`.
    pub fn issuer_for(&self, host_name: &str) -> Result<Option<String>, String> {
        let Some(template) = &self.issuer else {
            if self.publish_dir.is_some() {
                return Err("federation.publish_dir needs federation.issuer".into());
            }
            return Ok(None);
        };
        let dns_label = !host_name.is_empty()
            && host_name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if template.contains("{host}") && !dns_label {
            return Err(format!(
                "federation.issuer uses {{host}}, but the host name {host_name:?} is not lower-case DNS label characters (set `host`)"
            ));
        }
        let issuer = template.replace("{host}", host_name);
        let bad = |why: &str| Err(format!("federation.issuer {issuer:?}: {why}"));
        let url = match url::Url::parse(&issuer) {
            Ok(u) => u,
            Err(e) => return bad(&format!("not a URL ({e})")),
        };
        if url.scheme() != "https" {
            return bad("must be https");
        }
        if url.host_str().is_none_or(str::is_empty) {
            return bad("has no host");
        }
        if url.port().is_some() || issuer.split('/').nth(2).is_some_and(|a| a.contains(':')) {
            return bad("must not name a port");
        }
        if !url.username().is_empty() || url.password().is_some() {
            return bad("must not carry user info");
        }
        if url.query().is_some() || issuer.contains('?') {
            return bad("must not have a query");
        }
        if url.fragment().is_some() || issuer.contains('#') {
            return bad("must not have a fragment");
        }
        if issuer.ends_with('/') {
            return bad("must not end with /");
        }
        // What the relying party compares with `iss` is the string as written: it must be the
        // URL's own serialisation (no case or escaping the parser would change).
        if url.as_str().trim_end_matches('/') != issuer {
            return bad("is not in normal form (lower-case host, no escapes)");
        }
        Ok(Some(issuer))
    }
}

/// The OIDC discovery document relying parties fetch from `issuer/.well-known/openid-configuration`.
pub fn discovery_document(issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/jwks.json"),
        "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        "subject_types_supported": ["public"],
        "response_types_supported": ["id_token"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "jti", "scope"],
    })
}

/// The members Google's uploaded JWKS and the Claude API's inline JWKS accept: the key
/// itself, `kid`, `alg` and `use` (nothing else tessera puts there).
pub fn inline_jwks(jwks: &Value) -> Value {
    const KEEP: [&str; 9] = ["kty", "crv", "x", "y", "n", "e", "kid", "alg", "use"];
    let keys: Vec<Value> = jwks["keys"]
        .as_array()
        .map(|ks| {
            ks.iter()
                .map(|k| {
                    let m: serde_json::Map<String, Value> = k
                        .as_object()
                        .map(|o| {
                            o.iter()
                                .filter(|(n, _)| KEEP.contains(&n.as_str()))
                                .map(|(n, v)| (n.clone(), v.clone()))
                                .collect()
                        })
                        .unwrap_or_default();
                    Value::Object(m)
                })
                .collect()
        })
        .unwrap_or_default();
    json!({ "keys": keys })
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("federation.publish_dir {path}: {why}")]
    Unfit { path: String, why: String },
    #[error("federation.publish_dir {path}: cannot write {file}: {source}")]
    Write {
        path: String,
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Network file systems: a directory there is not "local" (another host's admin can write it).
const REMOTE_FS: &[(i64, &str)] = &[
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x5346_414F, "AFS"),
    (0x00C3_6400, "Ceph"),
    (0x0102_1997, "9p"),
    (0x564C, "NCP"),
    (0x7375_7245, "Coda"),
    (0x6573_5546, "FUSE"),
    (0x0BD0_0BD0, "Lustre"),
    (0x4750_4653, "GPFS"),
];

/// The open `publish_dir`, and what was last written there.
pub struct Publisher {
    path: PathBuf,
    dir: OwnedFd,
    written: std::sync::Mutex<Option<(String, Vec<u8>)>>,
}

impl Publisher {
    /// Open and check `path`: it must exist, be a directory (not a symlink to one), be owned
    /// by the daemon's user, not be group/world-writable, and be on a local file system.
    pub fn open(path: &Path) -> Result<Publisher, PublishError> {
        let unfit = |why: String| PublishError::Unfit {
            path: path.display().to_string(),
            why,
        };
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            unfit(format!(
                "cannot open it as a directory without following a symlink ({e}); it must exist"
            ))
        })?;
        let st = rustix::fs::fstat(&dir).map_err(|e| unfit(e.to_string()))?;
        let me = nix::unistd::geteuid().as_raw();
        if st.st_uid != me {
            return Err(unfit(format!(
                "owned by uid {}, not by the daemon's user (uid {me})",
                st.st_uid
            )));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(unfit(format!(
                "mode {:o} lets others write it (write access there is the power to impersonate every agent)",
                st.st_mode & 0o7777
            )));
        }
        let fs = rustix::fs::fstatfs(&dir).map_err(|e| unfit(e.to_string()))?;
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
        let magic = fs.f_type as i64;
        if let Some((_, name)) = REMOTE_FS.iter().find(|(m, _)| *m == magic) {
            return Err(unfit(format!("on a {name} file system; it must be local")));
        }
        Ok(Publisher {
            path: path.to_path_buf(),
            dir,
            written: std::sync::Mutex::new(None),
        })
    }

    /// Write the discovery document for `issuer` and the key set `jwks()` gives when either
    /// differs from what was last written (always at the first call). Each file is replaced
    /// whole. The key set is read under the same lock as the write, so a writer that read an
    /// older set can never replace a newer one. Blocking (fsync): call off the reactor.
    pub fn publish(
        &self,
        issuer: &str,
        jwks: impl FnOnce() -> Value,
    ) -> Result<bool, PublishError> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let body = serde_json::to_vec_pretty(&jwks()).unwrap_or_default();
        if written
            .as_ref()
            .is_some_and(|(i, b)| i == issuer && *b == body)
        {
            return Ok(false);
        }
        let err = |file: &'static str| {
            let path = self.path.display().to_string();
            move |source: std::io::Error| PublishError::Write { path, file, source }
        };
        let same_issuer = written.as_ref().is_some_and(|(i, _)| i == issuer);
        if !same_issuer {
            let well_known = open_subdir(&self.dir, ".well-known")
                .map_err(err(".well-known/openid-configuration"))?;
            let doc = serde_json::to_vec_pretty(&discovery_document(issuer)).unwrap_or_default();
            crate::durable::write_atomic_at(&well_known, "openid-configuration", &doc)
                .map_err(err(".well-known/openid-configuration"))?;
        }
        crate::durable::write_atomic_at(&self.dir, "jwks.json", &body).map_err(err("jwks.json"))?;
        *written = Some((issuer.to_string(), body));
        Ok(true)
    }
}

/// `name` inside `dir`, made (0755) when missing; a symlink there is refused.
fn open_subdir(dir: &OwnedFd, name: &str) -> std::io::Result<OwnedFd> {
    let made = match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(e.into()),
    };
    let fd = rustix::fs::openat(
        dir.as_fd(),
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if made {
        // Traversable by the web server whatever the daemon's umask.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))?;
    }
    // One found there must meet the same bar as publish_dir itself: someone else's
    // `.well-known` could swap the discovery document (and its jwks_uri) at will.
    let st = rustix::fs::fstat(&fd)?;
    if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{name} is owned by uid {} with mode {:o}: it must be the daemon's and not group/world-writable",
                st.st_uid,
                st.st_mode & 0o7777
            ),
        ));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(issuer: &str) -> FederationConfig {
        FederationConfig {
            issuer: Some(issuer.into()),
            publish_dir: None,
        }
    }

    #[test]
    fn issuers_follow_the_contract() {
        assert_eq!(
            cfg("https://idp.example.com/tessera/{host}")
                .issuer_for("web-1")
                .unwrap()
                .as_deref(),
            Some("https://idp.example.com/tessera/web-1")
        );
        for bad in [
            "http://idp.example.com/t",
            "https://idp.example.com:8443/t",
            "https://idp.example.com:443/t",
            "https://idp.example.com/t?x=1",
            "https://idp.example.com/t#f",
            "https://idp.example.com/t/",
            "https://u@idp.example.com/t",
            "https://IDP.example.com/t",
            "https:///t",
            "idp.example.com",
        ] {
            assert!(cfg(bad).issuer_for("h").is_err(), "{bad} accepted");
        }
        assert!(cfg("https://x.example/{host}").issuer_for("Web_1").is_err());
        let only_dir = FederationConfig {
            issuer: None,
            publish_dir: Some("/srv".into()),
        };
        assert!(only_dir.issuer_for("h").is_err());
    }

    #[test]
    fn inline_keeps_only_key_members() {
        let set = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "kid": "k", "alg": "ES256", "use": "sig", "x5c": ["c"], "extra": 1}]});
        assert_eq!(
            inline_jwks(&set),
            json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "kid": "k", "alg": "ES256", "use": "sig"}]})
        );
    }

    #[test]
    fn a_publish_dir_is_checked_and_written_whole() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("tessera-pub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("pub");
        assert!(Publisher::open(&dir).is_err(), "a missing dir is refused");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            Publisher::open(&dir).is_err(),
            "a world-writable dir is refused"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(Publisher::open(&link).is_err(), "a symlink is refused");
        // Someone else's writable .well-known inside is refused too.
        std::fs::create_dir(dir.join(".well-known")).unwrap();
        let mode = |m| std::fs::Permissions::from_mode(m);
        std::fs::set_permissions(dir.join(".well-known"), mode(0o777)).unwrap();
        let p = Publisher::open(&dir).unwrap();
        let set = json!({"keys": []});
        assert!(p.publish("https://i.example/h", || set.clone()).is_err());
        std::fs::set_permissions(dir.join(".well-known"), mode(0o755)).unwrap();
        assert!(p.publish("https://i.example/h", || set.clone()).unwrap());
        let again = p.publish("https://i.example/h", || set.clone()).unwrap();
        assert!(!again, "unchanged");
        let doc: Value = serde_json::from_slice(
            &std::fs::read(dir.join(".well-known/openid-configuration")).unwrap(),
        )
        .unwrap();
        assert_eq!(doc["jwks_uri"], "https://i.example/h/jwks.json");
        let jwks: Value =
            serde_json::from_slice(&std::fs::read(dir.join("jwks.json")).unwrap()).unwrap();
        assert_eq!(jwks, set);
        let _ = std::fs::remove_dir_all(&base);
    }
}
