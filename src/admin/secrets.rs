//! Secrets at rest: app secrets, webhook secrets and model API keys are sealed with AES-256-GCM
//! (aws-lc-rs, a random 96-bit nonce per seal) before they reach the store. The record's kind and
//! id (and a bot's backend origin) are the associated data, so a sealed value cannot be moved to
//! another record. A sealed value reads `v2.<key id>.<base64url(nonce ‖ ciphertext ‖ tag)>`,
//! where the key id (the first bytes of the master key's SHA-256) tells which master key sealed
//! it: during a rotation the previous key still opens old values, and [`Sealer::needs_reseal`]
//! finds them so they are sealed again with the current key.
//!
//! The master key itself encrypts nothing: HKDF-SHA-256 derives one key for sealing and another
//! for the keyed digests, so neither use weakens the other. Values of the first scheme (`v1`,
//! sealed under the master key directly) are still opened, and resealed.

use std::io::Write;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, Nonce, RandomizedNonceKey};
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::hkdf;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::config::{SecurityConfig, StorageConfig};

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const VERSION: &str = "v2";
/// Sealed under the master key itself (before the keys were derived with HKDF).
const LEGACY_VERSION: &str = "v1";
const HKDF_SALT: &[u8] = b"teams-router master key";
const SEALING_INFO: &[u8] = b"teams-router seal v2";
const DIGEST_INFO: &[u8] = b"teams-router digest v2";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("master key: {0}")]
    Key(String),
    #[error("a sealed secret cannot be opened: {0}")]
    Open(&'static str),
}

struct MasterKey {
    id: String,
    /// Derived with HKDF: seals `v2` values.
    key: RandomizedNonceKey,
    /// Derived with HKDF: the keyed digests.
    mac: aws_lc_rs::hmac::Key,
    /// The master key itself, for `v1` values and digests of the first scheme only.
    legacy: RandomizedNonceKey,
    legacy_mac: aws_lc_rs::hmac::Key,
}

impl MasterKey {
    fn new(bytes: &[u8]) -> Result<Self, SecretError> {
        if bytes.len() != KEY_LEN {
            return Err(SecretError::Key(format!(
                "must be {KEY_LEN} bytes, found {}",
                bytes.len()
            )));
        }
        let rejected = || SecretError::Key("rejected by AES-256-GCM".into());
        let legacy = RandomizedNonceKey::new(&AES_256_GCM, bytes).map_err(|_| rejected())?;
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(bytes);
        let derive = |info: &[u8]| -> Result<[u8; KEY_LEN], SecretError> {
            let mut out = [0u8; KEY_LEN];
            prk.expand(&[info], hkdf::HKDF_SHA256)
                .and_then(|okm| okm.fill(&mut out))
                .map_err(|_| SecretError::Key("key derivation failed".into()))?;
            Ok(out)
        };
        let key = RandomizedNonceKey::new(&AES_256_GCM, &derive(SEALING_INFO)?)
            .map_err(|_| rejected())?;
        let mac = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &derive(DIGEST_INFO)?);
        let id = hex(&digest(&SHA256, bytes).as_ref()[..4]);
        Ok(Self {
            id,
            key,
            mac,
            legacy,
            legacy_mac: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes),
        })
    }
}

/// Seals and opens secrets with the current master key (and the previous one, while rotating).
pub struct Sealer {
    current: MasterKey,
    previous: Option<MasterKey>,
}

impl Sealer {
    /// The master key from `security.master_key_env`, else from the key file (generated with
    /// mode 0600 when it does not exist yet).
    pub fn from_config(
        security: &SecurityConfig,
        storage: &StorageConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SecretError> {
        let current =
            match &security.master_key_env {
                Some(name) => {
                    let text = env(name).ok_or_else(|| {
                        SecretError::Key(format!("environment variable {name} is not set"))
                    })?;
                    MasterKey::new(&decode_key(&text).map_err(|e| {
                        SecretError::Key(format!("environment variable {name}: {e}"))
                    })?)?
                }
                None => {
                    let path = security
                        .master_key_file
                        .clone()
                        .unwrap_or_else(|| default_key_file(&storage.path));
                    MasterKey::new(&load_or_create_key_file(&path)?)?
                }
            };
        let previous = match &security.previous_master_key_env {
            Some(name) => {
                let text = env(name).ok_or_else(|| {
                    SecretError::Key(format!("environment variable {name} is not set"))
                })?;
                Some(MasterKey::new(&decode_key(&text).map_err(|e| {
                    SecretError::Key(format!("environment variable {name}: {e}"))
                })?)?)
            }
            None => None,
        };
        Ok(Self { current, previous })
    }

    /// A sealer over one explicit key (tests, tools).
    pub fn from_key(key: &[u8]) -> Result<Self, SecretError> {
        Ok(Self {
            current: MasterKey::new(key)?,
            previous: None,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// Seals `plaintext` for the record `context` (kind and id).
    pub fn seal(&self, context: &str, plaintext: &str) -> String {
        let mut buffer = plaintext.as_bytes().to_vec();
        let nonce = match self
            .current
            .key
            .seal_in_place_append_tag(Aad::from(context.as_bytes()), &mut buffer)
        {
            Ok(nonce) => nonce,
            // Sealing fails only when the system's random source does; nothing sensible can be
            // stored then, and an empty secret makes the setup check say so.
            Err(_) => return String::new(),
        };
        let mut sealed = Vec::with_capacity(NONCE_LEN + buffer.len());
        sealed.extend_from_slice(nonce.as_ref());
        sealed.extend_from_slice(&buffer);
        format!(
            "{VERSION}.{}.{}",
            self.current.id,
            URL_SAFE_NO_PAD.encode(sealed)
        )
    }

    /// Opens a value sealed for `context` by the current or the previous master key.
    pub fn open(&self, context: &str, sealed: &str) -> Result<String, SecretError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some(version), Some(key_id), Some(payload)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(SecretError::Open("unknown format"));
        };
        if version != VERSION && version != LEGACY_VERSION {
            return Err(SecretError::Open("unknown format"));
        }
        let key = if key_id == self.current.id {
            &self.current
        } else {
            match &self.previous {
                Some(previous) if previous.id == key_id => previous,
                _ => return Err(SecretError::Open("sealed with an unknown master key")),
            }
        };
        let mut bytes = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| SecretError::Open("not base64url"))?;
        if bytes.len() < NONCE_LEN {
            return Err(SecretError::Open("too short"));
        }
        let nonce = Nonce::try_assume_unique_for_key(&bytes[..NONCE_LEN])
            .map_err(|_| SecretError::Open("bad nonce"))?;
        let cipher = if version == VERSION {
            &key.key
        } else {
            &key.legacy
        };
        let plaintext = cipher
            .open_in_place(
                nonce,
                Aad::from(context.as_bytes()),
                &mut bytes[NONCE_LEN..],
            )
            .map_err(|_| SecretError::Open("authentication failed (wrong key or record)"))?;
        String::from_utf8(plaintext.to_vec()).map_err(|_| SecretError::Open("not UTF-8"))
    }

    /// A keyed digest (HMAC-SHA-256 under the master key): tells whether data that holds a
    /// secret changed, without letting anyone who reads the store test guesses of the secret.
    pub fn fingerprint(&self, data: &[u8]) -> String {
        hex(aws_lc_rs::hmac::sign(&self.current.mac, data).as_ref())
    }

    /// True when `sealed` was sealed by another key than the current one, or by the old scheme.
    pub fn needs_reseal(&self, sealed: &str) -> bool {
        let mut parts = sealed.split('.');
        parts.next() != Some(VERSION) || parts.next() != Some(self.current.id.as_str())
    }

    /// [`Sealer::fingerprint`] under the master key named `key_id` (current or previous), or
    /// `None` when this process does not have that key.
    pub fn fingerprint_by(&self, key_id: &str, data: &[u8]) -> Option<String> {
        [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|key| key.id == key_id)
            .map(|key| hex(aws_lc_rs::hmac::sign(&key.mac, data).as_ref()))
    }

    /// The keyed digest of the first scheme (HMAC under the master key itself), to recognise
    /// digests stored before the keys were derived.
    pub fn legacy_fingerprint(&self, data: &[u8]) -> String {
        hex(aws_lc_rs::hmac::sign(&self.current.legacy_mac, data).as_ref())
    }

    /// A value that tells whether another process uses the same master key, without telling
    /// anything about the key: a keyed digest of a fixed text.
    pub fn key_check(&self) -> String {
        self.fingerprint(b"teams-router master key check")
    }

    /// [`Sealer::key_check`] of the previous master key (during a rotation).
    pub fn previous_key_check(&self) -> Option<String> {
        self.previous.as_ref().map(|previous| {
            hex(aws_lc_rs::hmac::sign(&previous.mac, b"teams-router master key check").as_ref())
        })
    }
}

fn decode_key(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    if text.len() == KEY_LEN * 2 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (0..KEY_LEN)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
            .collect();
    }
    STANDARD
        .decode(text)
        .or_else(|_| URL_SAFE_NO_PAD.decode(text))
        .map_err(|_| format!("expected {KEY_LEN} bytes as base64 or hex"))
}

fn load_or_create_key_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            if mode & 0o077 != 0 {
                return Err(SecretError::Key(format!(
                    "{} is readable by others (mode {mode:o}); chmod 600 it",
                    path.display()
                )));
            }
            decode_key(&text).map_err(|e| SecretError::Key(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    SecretError::Key(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            let mut key = vec![0u8; KEY_LEN];
            aws_lc_rs::rand::fill(&mut key)
                .map_err(|_| SecretError::Key("the system random source failed".into()))?;
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut file| {
                    file.write_all(format!("{}\n", STANDARD.encode(&key)).as_bytes())?;
                    file.sync_all()
                });
            match created {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "generated a new master key for secrets at rest; back it up");
                    Ok(key)
                }
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create_key_file(path)
                }
                Err(e) => Err(SecretError::Key(format!(
                    "cannot write {}: {e}",
                    path.display()
                ))),
            }
        }
        Err(e) => Err(SecretError::Key(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// The key file's default: beside the data directory, not in it (`data` → `data.master.key`), so
/// that a copy of the data is not also the key that opens its secrets. A key file left inside the
/// data directory by an earlier version is still used, with a warning to move it.
pub fn default_key_file(storage_path: &Path) -> std::path::PathBuf {
    let normalized: std::path::PathBuf = storage_path.components().collect();
    let beside = match normalized.file_name() {
        Some(name) => {
            let mut name = name.to_os_string();
            name.push(".master.key");
            normalized.with_file_name(name)
        }
        None => normalized.join("..").join("teams-router.master.key"),
    };
    let inside = storage_path.join("master.key");
    if !beside.exists() && inside.exists() {
        tracing::warn!(
            old = %inside.display(),
            new = %beside.display(),
            "the master key file is inside the data directory; move it to the new default path (or set security.master_key_file)"
        );
        return inside;
    }
    beside
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_open_only_for_their_record() {
        let sealer = Sealer::from_key(&[7u8; 32]).unwrap();
        let sealed = sealer.seal("integration/a", "hunter2");
        assert!(!sealed.contains("hunter2"));
        assert_eq!(sealer.open("integration/a", &sealed).unwrap(), "hunter2");
        assert!(sealer.open("integration/b", &sealed).is_err());
        // A fresh nonce each time.
        assert_ne!(sealed, sealer.seal("integration/a", "hunter2"));
    }

    /// A value as the first scheme sealed it: under the master key itself, `v1`.
    fn seal_v1(key: &[u8], context: &str, plaintext: &str) -> String {
        let cipher = RandomizedNonceKey::new(&AES_256_GCM, key).unwrap();
        let mut buffer = plaintext.as_bytes().to_vec();
        let nonce = cipher
            .seal_in_place_append_tag(Aad::from(context.as_bytes()), &mut buffer)
            .unwrap();
        let mut sealed = nonce.as_ref().to_vec();
        sealed.extend_from_slice(&buffer);
        let id = hex(&digest(&SHA256, key).as_ref()[..4]);
        format!("v1.{id}.{}", URL_SAFE_NO_PAD.encode(sealed))
    }

    #[test]
    fn values_of_the_first_scheme_open_and_are_resealed_under_derived_keys() {
        let key = [9u8; 32];
        let sealer = Sealer::from_key(&key).unwrap();
        let old = seal_v1(&key, "bots/a", "webhook-secret");
        assert_eq!(sealer.open("bots/a", &old).unwrap(), "webhook-secret");
        assert!(sealer.needs_reseal(&old));
        let new = sealer.seal("bots/a", "webhook-secret");
        assert!(new.starts_with("v2."));
        assert!(!sealer.needs_reseal(&new));
        // The derived sealing key is not the master key: a v2 value relabelled v1 does not open.
        let relabelled = new.replacen("v2.", "v1.", 1);
        assert!(sealer.open("bots/a", &relabelled).is_err());
        // The digest key is not the master key either.
        let raw_mac = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
        let raw = hex(aws_lc_rs::hmac::sign(&raw_mac, b"x").as_ref());
        assert_ne!(sealer.fingerprint(b"x"), raw);
        // Two keys tell each other apart by their checks; one key agrees with itself.
        assert_eq!(
            sealer.key_check(),
            Sealer::from_key(&key).unwrap().key_check()
        );
        assert_ne!(
            sealer.key_check(),
            Sealer::from_key(&[8u8; 32]).unwrap().key_check()
        );
    }

    #[test]
    fn the_default_key_file_is_beside_the_data_directory() {
        let dir = std::env::temp_dir().join(format!("tr-keyfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let data = dir.join("data");
        assert_eq!(default_key_file(&data), dir.join("data.master.key"));
        assert_eq!(
            default_key_file(&dir.join("data/")),
            dir.join("data.master.key")
        );
        // An earlier version's file inside the directory is still found.
        std::fs::write(data.join("master.key"), "k").unwrap();
        assert_eq!(default_key_file(&data), data.join("master.key"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotation_opens_old_values_and_flags_them() {
        let old = Sealer::from_key(&[1u8; 32]).unwrap();
        let sealed = old.seal("bot/x", "k");
        let rotated = Sealer {
            current: MasterKey::new(&[2u8; 32]).unwrap(),
            previous: Some(MasterKey::new(&[1u8; 32]).unwrap()),
        };
        assert!(rotated.needs_reseal(&sealed));
        assert_eq!(rotated.open("bot/x", &sealed).unwrap(), "k");
        let resealed = rotated.seal("bot/x", "k");
        assert!(!rotated.needs_reseal(&resealed));
        let without_previous = Sealer::from_key(&[2u8; 32]).unwrap();
        assert!(without_previous.open("bot/x", &sealed).is_err());
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("teams-router-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("master.key");
        let first = load_or_create_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_key_file(&path).unwrap(), first);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create_key_file(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
