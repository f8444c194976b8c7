//! Secrets that guard the service: the admin token and the API keys. Each is
//! read once from the configuration (a value or a file), kept only as its
//! SHA-256, compared in constant time and never logged (`Debug` is redacted).

use std::fmt;
use std::path::PathBuf;

use anyhow::Context;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ServeConfig;

/// Secrets shorter than this are refused at start: they can be guessed.
const MIN_SECRET_LEN: usize = 16;

/// A configured secret, as its digest.
pub struct Secret {
    /// SHA-256 of the secret: comparing digests takes the same time whatever
    /// the length of the presented value.
    digest: [u8; 32],
}

impl Secret {
    pub fn new(secret: &str) -> Self {
        Self { digest: Sha256::digest(secret.as_bytes()).into() }
    }

    /// The secret given as a value or in a file (surrounding whitespace
    /// trimmed), if either is set; `what` names it in errors.
    pub fn configured(value: &Option<String>, file: &Option<PathBuf>, what: &str) -> anyhow::Result<Option<Self>> {
        let secret = match (value, file) {
            (Some(value), _) => value.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the {what} file {}", path.display()))?
                .trim()
                .to_string(),
            (None, None) => return Ok(None),
        };
        anyhow::ensure!(secret.len() >= MIN_SECRET_LEN, "the {what} must be at least {MIN_SECRET_LEN} characters");
        Ok(Some(Self::new(&secret)))
    }

    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digest.ct_eq(&digest).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The bearer token of the `/admin` routes.
pub type AdminToken = Secret;

/// Reads the admin token: `--admin-token` or the contents of `--admin-token-file`.
pub fn admin_token(config: &ServeConfig) -> anyhow::Result<Option<AdminToken>> {
    Secret::configured(&config.admin_token, &config.admin_token_file, "admin token")
}

/// What a presented API key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Searching, verifying and reading the gallery.
    Read,
    /// Everything `Read` allows, and adding and deleting items.
    ReadWrite,
}

/// The API keys: with none configured every gallery and search route is open.
#[derive(Debug, Default)]
pub struct ApiKeys {
    read_write: Option<Secret>,
    read_only: Option<Secret>,
}

impl ApiKeys {
    pub fn from_config(config: &ServeConfig) -> anyhow::Result<Self> {
        let read_write = Secret::configured(&config.api_key, &config.api_key_file, "API key")?;
        let read_only =
            Secret::configured(&config.read_only_api_key, &config.read_only_api_key_file, "read-only API key")?;
        Ok(Self { read_write, read_only })
    }

    /// Whether any key is configured (then every route but the probes needs one).
    pub fn required(&self) -> bool {
        self.read_write.is_some() || self.read_only.is_some()
    }

    /// What `presented` allows; `None` when it is no configured key.
    pub fn access(&self, presented: &str) -> Option<Access> {
        // Both are compared, so the time taken does not tell which one matched.
        let read_write = self.read_write.as_ref().is_some_and(|k| k.matches(presented));
        let read_only = self.read_only.as_ref().is_some_and(|k| k.matches(presented));
        match (read_write, read_only) {
            (true, _) => Some(Access::ReadWrite),
            (false, true) => Some(Access::Read),
            (false, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_secret_matches() {
        let token = Secret::new("correct horse battery staple");
        assert!(token.matches("correct horse battery staple"));
        assert!(!token.matches("correct horse battery stapl"));
        assert!(!token.matches(""));
        assert!(!format!("{token:?}").contains("horse"));
    }

    #[test]
    fn each_key_grants_its_access() {
        let keys = ApiKeys {
            read_write: Some(Secret::new("read-write-key-0123456789")),
            read_only: Some(Secret::new("read-only-key-0123456789")),
        };
        assert!(keys.required() && !ApiKeys::default().required());
        assert_eq!(keys.access("read-write-key-0123456789"), Some(Access::ReadWrite));
        assert_eq!(keys.access("read-only-key-0123456789"), Some(Access::Read));
        assert_eq!(keys.access("read-only-key-012345678"), None);
        assert!(!format!("{keys:?}").contains("key-0123"));
    }
}
