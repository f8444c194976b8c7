//! `docker/` cannot be built here (no Docker engine runs on this machine or in
//! CI), so this checks what could drift without one: the image's build stage
//! runs the README's set-up script and `make build`; the runtime stage copies
//! the libtorch folder the binary is linked against, from the same path; the
//! compose file keeps the data on a volume where the image writes it and
//! checks `/ready` on the port the image listens on. `make test` runs
//! `scripts/setup.sh` itself, so a broken set-up fails CI too.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Dockerfile's instructions, `(KEYWORD, arguments)`, continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docker/Dockerfile")).unwrap();
    let joined = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    joined
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (keyword, args) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
            (keyword.to_uppercase(), args.trim().to_string())
        })
        .collect()
}

/// The instructions of each stage, in order (the global `ARG`s first, as stage 0).
fn stages() -> Vec<Vec<(String, String)>> {
    let mut stages = vec![Vec::new()];
    for instruction in dockerfile() {
        if instruction.0 == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().unwrap().push(instruction);
    }
    stages
}

/// `ARG NAME=default` and `ENV NAME=value ...` pairs of a stage.
fn assignments(stage: &[(String, String)], keyword: &str) -> HashMap<String, String> {
    stage
        .iter()
        .filter(|(k, _)| k == keyword)
        .flat_map(|(_, args)| args.split_whitespace().filter_map(|a| a.split_once('=')))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn args_of<'a>(stage: &'a [(String, String)], keyword: &str) -> Vec<&'a str> {
    stage.iter().filter(|(k, _)| k == keyword).map(|(_, a)| a.as_str()).collect()
}

#[test]
fn the_image_is_built_by_the_readme_setup_and_runs_on_a_cuda_base() {
    let stages = stages();
    assert_eq!(stages.len(), 3, "global ARGs, a build stage and a runtime stage");
    let globals = assignments(&stages[0], "ARG");
    let (build, runtime) = (&stages[1], &stages[2]);

    assert!(args_of(build, "FROM")[0].ends_with("AS build"));
    let runs = args_of(build, "RUN").join(" && ");
    assert!(runs.contains("scripts/setup.sh") && runs.contains("make build"), "build stage runs: {runs}");
    let makefile = std::fs::read_to_string(Path::new(ROOT).join("Makefile")).unwrap();
    assert!(makefile.contains("\n\tscripts/setup.sh\n"), "`make setup` no longer runs scripts/setup.sh");
    let setup = Path::new(ROOT).join("scripts/setup.sh");
    assert!(std::os::unix::fs::PermissionsExt::mode(&setup.metadata().unwrap().permissions()) & 0o111 != 0);

    assert_eq!(args_of(runtime, "FROM"), ["${CUDA_IMAGE}"]);
    let cuda = &globals["CUDA_IMAGE"];
    assert!(cuda.starts_with("nvidia/cuda:") && cuda.contains("-runtime-"), "{cuda}");
    assert_eq!(args_of(build, "WORKDIR"), args_of(runtime, "WORKDIR"), "the rpath and model path need one path");
}

#[test]
fn the_runtime_stage_copies_what_the_binary_is_linked_against() {
    let stages = stages();
    let runtime = &stages[2];
    let workdir = args_of(runtime, "WORKDIR")[0];
    let site = &assignments(runtime, "ARG")["PYTHON_SITE"];
    let copies: Vec<String> = args_of(runtime, "COPY").iter().map(|c| c.replace("${PYTHON_SITE}", site)).collect();
    // From the build stage's checkout to the same place below WORKDIR.
    let copied = |path: &str| copies.contains(&format!("--from=build {workdir}/{path} {path}"));

    // The binary's runpath is the venv's torch/lib under the checkout; the
    // image must hold that folder at the same place below WORKDIR.
    let readelf = Command::new("readelf").args(["-d", env!("CARGO_BIN_EXE_lookalike")]).output().unwrap();
    let dynamic = String::from_utf8_lossy(&readelf.stdout);
    let torch_lib = format!("{ROOT}/{site}/torch/lib");
    assert!(dynamic.contains(&format!("[{torch_lib}]")), "runpath is not {torch_lib}:\n{dynamic}");
    assert!(copied(&format!("{site}/torch/lib")) && copied(&format!("{site}/nvidia")), "{copies:?}");
    assert!(Path::new(&torch_lib).is_dir());

    // The bundled model is found at the path compiled in; the entry point is `make build`'s output.
    assert_eq!(lookalike::manifest::BUNDLED_MODEL_DIR, format!("{ROOT}/models/default"));
    assert_eq!(lookalike::manifest::FASHION_MODEL_DIR, format!("{ROOT}/models/fashion-mnist"));
    assert!(copied("models/default") && copied("models/fashion-mnist"), "{copies:?}");
    assert!(copied("target/release/lookalike"), "{copies:?}");
    assert_eq!(args_of(runtime, "ENTRYPOINT"), [format!("[\"{workdir}/target/release/lookalike\"]")]);
    assert!(args_of(runtime, "HEALTHCHECK")[0].contains("/ready"));
}

#[test]
fn compose_keeps_data_on_a_volume_and_checks_readiness() {
    let stages = stages();
    let env = assignments(&stages[2], "ENV");
    let read = |name: &str| -> Value {
        let text = std::fs::read_to_string(Path::new(ROOT).join("docker").join(name)).unwrap();
        serde_saphyr::from_str(&text).unwrap()
    };
    let compose = read("compose.yaml");
    let service = &compose["services"]["lookalike"];
    assert_eq!(service["build"]["dockerfile"], "docker/Dockerfile");
    assert_eq!(service["build"]["context"], "..");

    let data_dir = &env["LOOKALIKE_DATA_DIR"];
    let volume = service["volumes"].as_array().unwrap().iter().find_map(|v| {
        let (name, target) = v.as_str()?.split_once(':')?;
        (target == data_dir).then_some(name.to_string())
    });
    let volume = volume.expect("a volume mounted at the image's data dir");
    assert!(compose["volumes"].get(&volume).is_some(), "`{volume}` is a named volume");

    let port = &env["LOOKALIKE_PORT"];
    assert!(service["ports"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().ends_with(&format!(":{port}"))));
    let check =
        service["healthcheck"]["test"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect::<Vec<_>>();
    assert!(check.contains(&format!("http://127.0.0.1:{port}/ready").as_str()), "{check:?}");
    // Docker's SIGKILL must not come before the service's own two grace periods.
    let grace: u64 = service["stop_grace_period"].as_str().unwrap().trim_end_matches('s').parse().unwrap();
    assert!(grace > 2 * 30, "stop_grace_period {grace}s");

    let gpu = read("compose.gpu.yaml");
    let devices = &gpu["services"]["lookalike"]["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(devices["driver"], "nvidia");
    assert_eq!(devices["capabilities"][0], "gpu");
}

/// Both compose files publish a port beyond the host, so each service reads an
/// API key and the admin token from secret files the set-up writes, which
/// neither git nor the image's build context may hold.
#[test]
fn compose_files_ship_keys_from_secret_files_that_stay_out_of_git_and_the_image() {
    let docker = Path::new(ROOT).join("docker");
    for (file, service) in [("compose.yaml", "lookalike"), ("compose.cluster.yaml", "replica-1")] {
        let compose: Value = serde_saphyr::from_str(&std::fs::read_to_string(docker.join(file)).unwrap()).unwrap();
        let service = &compose["services"][service];
        for (variable, secret) in [("LOOKALIKE_API_KEY_FILE", "api_key"), ("LOOKALIKE_ADMIN_TOKEN_FILE", "admin_token")]
        {
            assert_eq!(service["environment"][variable], format!("/run/secrets/{secret}"), "{file}");
            assert!(service["secrets"].as_array().unwrap().iter().any(|s| s == secret), "{file}: {secret}");
            assert_eq!(compose["secrets"][secret]["file"], format!("./secrets/{secret}"), "{file}");
        }
    }
    let makefile = std::fs::read_to_string(Path::new(ROOT).join("Makefile")).unwrap();
    // Make expands a rule's prerequisites where it reads the rule: the list must come first.
    let (defined, used) = (makefile.find("DOCKER_SECRETS :="), makefile.find("setup: $(STAMP) $(DOCKER_SECRETS)"));
    assert!(matches!((defined, used), (Some(d), Some(u)) if d < u), "make setup writes the secret files");
    let gitignore = std::fs::read_to_string(Path::new(ROOT).join(".gitignore")).unwrap();
    assert!(gitignore.lines().any(|l| l == "/docker/secrets/"), "secrets are never committed");
    let dockerignore = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap();
    for path in ["docker/secrets", "docker/admin_token"] {
        assert!(dockerignore.lines().any(|l| l == path), "{path} stays out of the build context");
    }
}

#[test]
fn the_cluster_compose_file_puts_replicas_over_pgvector_behind_a_proxy() {
    let docker = Path::new(ROOT).join("docker");
    let compose: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(docker.join("compose.cluster.yaml")).unwrap()).unwrap();
    let services = &compose["services"];
    let named_volume = |service: &Value, target: &str| {
        let mounted = service["volumes"].as_array().unwrap().iter().find_map(|v| {
            let (name, at) = v.as_str()?.split_once(':')?;
            (at == target).then_some(name.to_string())
        });
        let name = mounted.unwrap_or_else(|| panic!("nothing mounted at {target}"));
        assert!(compose["volumes"].get(&name).is_some(), "`{name}` is a named volume");
    };

    let postgres = &services["postgres"];
    assert!(postgres["image"].as_str().unwrap().starts_with("pgvector/pgvector:0.8"), "pgvector 0.8 or later");
    assert!(postgres["healthcheck"]["test"].as_array().unwrap().iter().any(|t| t == "pg_isready"));
    named_volume(postgres, "/var/lib/postgresql/data");

    let replicas: Vec<&str> = ["replica-1", "replica-2"].into();
    for name in &replicas {
        let replica = &services[*name];
        assert_eq!(replica["build"]["dockerfile"], "docker/Dockerfile", "{name}");
        let url = replica["environment"]["LOOKALIKE_DATABASE_URL"].as_str().unwrap();
        assert!(url.starts_with("postgres://") && url.contains("@postgres:5432/"), "{name}: {url}");
        assert_eq!(replica["depends_on"]["postgres"]["condition"], "service_healthy", "{name}");
        let check = replica["healthcheck"]["test"].as_array().unwrap();
        assert!(check.iter().any(|t| t == "http://127.0.0.1:8080/ready"), "{name}: {check:?}");
        assert!(replica.get("ports").is_none(), "{name} is reached through the proxy only");
        named_volume(replica, "/data");
    }

    let proxy = &services["proxy"];
    assert!(proxy["ports"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().ends_with(":80")));
    assert!(proxy["healthcheck"]["test"].as_array().unwrap().iter().any(|t| t.as_str().unwrap().ends_with("/ready")));
    for name in &replicas {
        assert_eq!(proxy["depends_on"][*name]["condition"], "service_healthy");
    }
    let conf = std::fs::read_to_string(docker.join("nginx.cluster.conf")).unwrap();
    for name in &replicas {
        assert!(conf.contains(&format!("server {name}:8080")), "the proxy sends to {name}");
    }
    let mounted = proxy["volumes"][0].as_str().unwrap();
    assert!(mounted.starts_with("./nginx.cluster.conf:"), "{mounted}");
}
