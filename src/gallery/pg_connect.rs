//! How the service reaches PostgreSQL: the database URL with libpq's
//! `sslmode` and `sslrootcert` honoured, over rustls. tokio-postgres knows
//! only `disable`, `prefer` and `require`, and checks no certificate itself,
//! so the two verifying modes are taken out of the URL and become the TLS
//! connector's certificate check:
//!
//! | `sslmode` | encrypted | certificate checked |
//! | --- | --- | --- |
//! | `disable` | no | - |
//! | `prefer` (default), `allow` | when the server offers it | no |
//! | `require` | yes | no; with `sslrootcert`, as `verify-ca` (as libpq does) |
//! | `verify-ca` | yes | signed by a trusted CA |
//! | `verify-full` | yes | signed by a trusted CA, and names the host |
//!
//! Trusted CAs: the PEM file `sslrootcert` names, else the system's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::GalleryError;

/// An error with its causes (`a: b: c`): a refused certificate shows why,
/// not only that the handshake failed.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let more = next.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = next.source();
    }
    text
}

/// The connector every connection to the database goes through: rustls's,
/// except that tokio-postgres asks for one with an empty name for a Unix
/// socket too, where it never uses it (TLS is off there), and an empty name
/// is no server name to rustls.
#[derive(Clone)]
pub struct Tls(MakeRustlsConnect);

impl<S> MakeTlsConnect<S> for Tls
where
    MakeRustlsConnect: MakeTlsConnect<S>,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        let domain = if domain.is_empty() { "unix-socket.invalid" } else { domain };
        self.0.make_tls_connect(domain)
    }
}

/// A parsed database URL and the TLS connector its `sslmode` asks for.
#[derive(Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Encrypt, trust any certificate.
    Nothing,
    /// A trusted CA signed it; the name is not checked.
    Ca,
    /// A trusted CA signed it for this host name.
    Full,
}

impl PgTarget {
    /// Parses `url` (`postgres://…` or `key=value …`), taking out `sslmode`
    /// and `sslrootcert` for the connector.
    pub fn parse(url: &str) -> Result<Self, GalleryError> {
        let invalid = |why: String| GalleryError::Unavailable(format!("the database URL: {why}"));
        let (rest, sslmode, rootcert) = take_tls_options(url);
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| invalid(format!("{e}")))?;
        let rootcert = rootcert.map(PathBuf::from);
        let (mode, check) = match sslmode.as_deref().unwrap_or("prefer") {
            "disable" => (SslMode::Disable, Check::Nothing),
            "allow" | "prefer" => (SslMode::Prefer, Check::Nothing),
            "require" if rootcert.is_some() => (SslMode::Require, Check::Ca),
            "require" => (SslMode::Require, Check::Nothing),
            "verify-ca" => (SslMode::Require, Check::Ca),
            "verify-full" => (SslMode::Require, Check::Full),
            other => return Err(invalid(format!("unknown sslmode `{other}`"))),
        };
        // As libpq: no TLS over a Unix socket (the connector has no name to check there).
        let unix_only = config.get_hosts().iter().all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        config.ssl_mode(if unix_only && !config.get_hosts().is_empty() { SslMode::Disable } else { mode });
        let tls = connector(check, rootcert.as_deref()).map_err(invalid)?;
        Ok(Self { config, tls })
    }
}

/// The URL without `sslmode` and `sslrootcert`, and their values.
fn take_tls_options(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut sslmode, mut rootcert) = (None, None);
    // True for a pair to keep; the two TLS options are taken.
    let mut take = |pair: &str| match pair.split_once('=') {
        Some(("sslmode", value)) => {
            sslmode = Some(value.trim_matches('\'').to_string());
            false
        }
        Some(("sslrootcert", value)) => {
            rootcert = Some(value.trim_matches('\'').to_string());
            false
        }
        _ => true,
    };
    let rest = match url.split_once('?') {
        Some((base, query)) if url.contains("://") => {
            let kept: Vec<&str> = query.split('&').filter(|pair| take(pair)).collect();
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
        _ if url.contains("://") => url.to_string(),
        _ => url.split_whitespace().filter(|pair| take(pair)).collect::<Vec<_>>().join(" "),
    };
    (rest, sslmode, rootcert)
}

fn connector(check: Check, rootcert: Option<&Path>) -> Result<Tls, String> {
    // ring builds with a C compiler alone (aws-lc-rs wants CMake); PostgreSQL gains nothing from
    // the post-quantum key exchange whose absence the deprecation is about.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let webpki = match check {
        Check::Nothing => None,
        Check::Ca | Check::Full => {
            let roots = Arc::new(trusted_roots(rootcert)?);
            let built = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build();
            Some(built.map_err(|e| e.to_string())?)
        }
    };
    let verifier = Arc::new(Verifier { check, webpki, provider });
    let config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    Ok(Tls(MakeRustlsConnect::new(config)))
}

/// The CAs in `rootcert` (PEM), else the system's.
fn trusted_roots(rootcert: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certificates: Vec<CertificateDer<'static>> = match rootcert {
        Some(path) => CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect())
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?,
        None => rustls_native_certs::load_native_certs().certs,
    };
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        let from = rootcert.map_or("the system".to_string(), |p| p.display().to_string());
        return Err(format!("no CA certificate could be read from {from}"));
    }
    Ok(roots)
}

/// The certificate check `sslmode` asks for; the handshake's signatures are
/// checked against the certificate in every mode.
#[derive(Debug)]
struct Verifier {
    check: Check,
    /// The web PKI check (`verify-ca`, `verify-full`); `None` trusts any certificate.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else { return Ok(ServerCertVerified::assertion()) };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // webpki checks the chain before the name: only the name is forgiven for `verify-ca`.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Ca => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_come_out_of_both_url_forms() {
        let (rest, mode, root) = take_tls_options("postgres://u@h:5/db?sslmode=verify-full&sslrootcert=/ca.pem");
        assert_eq!(
            (rest.as_str(), mode.as_deref(), root.as_deref()),
            ("postgres://u@h:5/db", Some("verify-full"), Some("/ca.pem"))
        );
        let (rest, mode, _) = take_tls_options("postgres://u@h/db?application_name=x&sslmode=require");
        assert_eq!((rest.as_str(), mode.as_deref()), ("postgres://u@h/db?application_name=x", Some("require")));
        let (rest, mode, root) = take_tls_options("host=h dbname=db sslmode=verify-ca sslrootcert=/r.pem");
        assert_eq!(
            (rest.as_str(), mode.as_deref(), root.as_deref()),
            ("host=h dbname=db", Some("verify-ca"), Some("/r.pem"))
        );
        assert_eq!(take_tls_options("postgres://u@h/db").0, "postgres://u@h/db");
    }

    #[test]
    fn unknown_modes_and_unreadable_ca_files_are_refused() {
        assert!(PgTarget::parse("postgres://u@h/db?sslmode=maybe").is_err());
        assert!(PgTarget::parse("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/no/such.pem").is_err());
        let parsed = PgTarget::parse("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(parsed.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(PgTarget::parse("postgres://u@h/db").unwrap().config.get_ssl_mode(), SslMode::Prefer);
        let socket = PgTarget::parse("postgres://u@%2Ftmp%2Fpg:5432/db?sslmode=require").unwrap();
        assert_eq!(socket.config.get_ssl_mode(), SslMode::Disable, "no TLS over a Unix socket");
    }
}
