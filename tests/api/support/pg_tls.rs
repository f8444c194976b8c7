//! PostgreSQL over TLS for the TLS tests. The test server's build (the PyPI
//! wheel) has no SSL support, so a front speaks PostgreSQL's TLS opening
//! itself: it answers a client's `SSLRequest` with `S`, makes the TLS
//! handshake with a certificate for `localhost` signed by a CA of its own
//! (made with the openssl command), and relays the decrypted stream to the
//! server's Unix socket. Like a `hostssl`-only server, it answers a client
//! that starts without TLS with PostgreSQL's own refusal.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_rustls::TlsAcceptor;

/// PostgreSQL's `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

pub struct TlsFront {
    pub port: u16,
    dir: TempDir,
    /// TLS sessions relayed so far.
    sessions: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    /// Listens on a free port of 127.0.0.1 in front of the server at `socket`.
    pub async fn start(socket: PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        make_certificates(dir.path());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.path().join("server.crt")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(dir.path().join("server.key")).unwrap();
        #[allow(deprecated)] // as in src/gallery/pg_connect.rs
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sessions = Arc::new(AtomicUsize::new(0));
        let counted = sessions.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, socket, counted) = (acceptor.clone(), socket.clone(), counted.clone());
                tokio::spawn(async move {
                    let _ = relay(tcp, acceptor, &socket, &counted).await;
                });
            }
        });
        Self { port, dir, sessions, task }
    }

    /// The CA that signed the front's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `postgres://…` to `host` (`localhost` or `127.0.0.1`) with `options` (`sslmode=…&…`).
    pub fn url(&self, host: &str, options: &str) -> String {
        format!("postgres://postgres@{host}:{}/lookalike?{options}", self.port)
    }

    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut tcp: TcpStream,
    acceptor: TlsAcceptor,
    socket: &Path,
    sessions: &AtomicUsize,
) -> std::io::Result<()> {
    let mut opening = [0u8; 8];
    tcp.read_exact(&mut opening).await?;
    if opening != SSL_REQUEST {
        let fields = b"SFATAL\0C28000\0Mno pg_hba.conf entry for host \"127.0.0.1\", no encryption\0\0";
        let mut refusal = vec![b'E'];
        refusal.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
        refusal.extend_from_slice(fields);
        return tcp.write_all(&refusal).await;
    }
    tcp.write_all(b"S").await?;
    let mut tls = acceptor.accept(tcp).await?;
    sessions.fetch_add(1, Ordering::Relaxed);
    let mut server = UnixStream::connect(socket).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
    Ok(())
}

/// `ca.pem` (a CA) and `server.crt` / `server.key` (for `localhost`, signed by it) in `dir`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl command");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let subject = "/CN=lookalike test CA";
    openssl(
        &[&["req", "-x509", "-days", "2", "-subj", subject, "-keyout", "ca.key", "-out", "ca.pem"][..], &ec].concat(),
    );
    openssl(&[&["req", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"][..], &ec].concat());
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
}
