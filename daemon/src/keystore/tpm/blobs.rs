//! Key blobs on disk: TPM2B_PUBLIC / TPM2B_PRIVATE files, written whole or not at all.

use super::*;

/// TPM2B_* framing: a big-endian u16 size, then the bytes.
pub(super) fn tpm2b(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

pub(super) fn un_tpm2b<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a [u8], KeyStoreError> {
    let bad = || {
        state_err(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "truncated TPM2B blob"),
        )
    };
    let len = u16::from_be_bytes([
        *bytes.first().ok_or_else(bad)?,
        *bytes.get(1).ok_or_else(bad)?,
    ]);
    bytes.get(2..2 + len as usize).ok_or_else(bad)
}

/// Write a key blob whole or not at all.
pub(super) fn write_blob(path: &Path, data: &[u8]) -> Result<(), KeyStoreError> {
    crate::durable::write_atomic(path, &tpm2b(data)).map_err(|e| state_err(path, e))
}

/// A TPM2B blob file's payload, or None when the file does not exist.
pub(super) fn read_blob(path: &Path) -> Result<Option<Vec<u8>>, KeyStoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(un_tpm2b(&bytes, path)?.to_vec())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(state_err(path, e)),
    }
}

impl TpmKeyStore {
    pub(super) fn pub_path(&self, id: &str) -> PathBuf {
        self.keys_dir.join(format!("{id}.pub"))
    }
    pub(super) fn priv_path(&self, id: &str) -> PathBuf {
        self.keys_dir.join(format!("{id}.priv"))
    }

    pub(super) fn read_public(&self, id: &str) -> Result<Public, KeyStoreError> {
        let bytes = read_blob(&self.pub_path(id))?
            .ok_or_else(|| KeyStoreError::KeyNotFound(id.to_string()))?;
        Public::unmarshall(&bytes).map_err(|e| tpm_err("read public blob", e))
    }

    pub(super) fn read_private(&self, id: &str) -> Result<Private, KeyStoreError> {
        let bytes = read_blob(&self.priv_path(id))?
            .ok_or_else(|| KeyStoreError::KeyNotFound(id.to_string()))?;
        Private::try_from(bytes).map_err(|e| tpm_err("read private blob", e))
    }
}
