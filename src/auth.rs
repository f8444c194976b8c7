//! The admin bearer token: read once from the configuration, compared in
//! constant time, never logged (its `Debug` is redacted).

use std::fmt;

use anyhow::Context;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ServeConfig;

/// Tokens shorter than this are refused at start: they can be guessed.
const MIN_TOKEN_LEN: usize = 16;

pub struct AdminToken {
    /// SHA-256 of the token: comparing digests takes the same time whatever
    /// the length of the presented token.
    digest: [u8; 32],
}

impl AdminToken {
    /// The configured token, if any: `--admin-token` or the contents of `--admin-token-file`.
    pub fn from_config(config: &ServeConfig) -> anyhow::Result<Option<Self>> {
        let token = match (&config.admin_token, &config.admin_token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin token file {}", path.display()))?
                .trim()
                .to_string(),
            (None, None) => return Ok(None),
        };
        anyhow::ensure!(token.len() >= MIN_TOKEN_LEN, "the admin token must be at least {MIN_TOKEN_LEN} characters");
        Ok(Some(Self::new(&token)))
    }

    pub fn new(token: &str) -> Self {
        Self { digest: Sha256::digest(token.as_bytes()).into() }
    }

    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digest.ct_eq(&digest).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_matches() {
        let token = AdminToken::new("correct horse battery staple");
        assert!(token.matches("correct horse battery staple"));
        assert!(!token.matches("correct horse battery stapl"));
        assert!(!token.matches(""));
        assert!(!format!("{token:?}").contains("horse"));
    }
}
