//! The container image (issue #29), without a registry: base images cannot be pulled here, so
//! the test assembles what the Containerfile's runtime stage holds — the release binaries it
//! builds (`target/image/release`, built by .ci/run exactly as the Containerfile builds them),
//! exactly the shared libraries `ldd` names, `/etc/passwd` with `nonroot`, CA certificates —
//! from scratch, commits it as an image with buildah (the Containerfile's USER, ENTRYPOINT and
//! LABELs, read from the file), mounts that image's filesystem and runs its entrypoint from it
//! as uid 65532 on a read-only root, with a kubelet-style state directory (root-owned, group
//! 65532, mode 2777), the way the Deployment runs it. A container runtime cannot run here, so
//! `unshare --mount` and `chroot --userspec` stand in for it; neither sets rlimits (a runtime's
//! defaults), which this run therefore does not check.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshca_proto::v1::SignCertificateRequest;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use rotator::client::{channel, client_tls, make_csr, read_pem_certs, verify_svid};
use rotator::pki::SecretKey;

/// What the Containerfile's last stage says.
#[derive(Debug, Default)]
struct Stage {
    /// (sources in the build stage, destination directory).
    copies: Vec<(Vec<String>, String)>,
    user: String,
    entrypoint: Vec<String>,
    labels: BTreeMap<String, String>,
    version: String,
}

/// Reads the runtime stage of `Containerfile` (its instructions, joined across `\` lines).
fn runtime_stage() -> Stage {
    let text = std::fs::read_to_string(meshca_tests::repo().join("Containerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let last_from = joined.rfind("\nFROM ").unwrap();
    let mut s = Stage::default();
    for line in joined[last_from..].lines().map(str::trim) {
        let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
        match op {
            "ARG" if rest.starts_with("VERSION=") => s.version = rest["VERSION=".len()..].into(),
            "COPY" => {
                let mut words: Vec<String> = rest
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .map(|w| w.rsplit('/').next().unwrap().to_owned())
                    .collect();
                let dst = rest.split_whitespace().last().unwrap().to_owned();
                words.pop();
                s.copies.push((words, dst));
            }
            "USER" => s.user = rest.into(),
            "ENTRYPOINT" => s.entrypoint = serde_json::from_str(rest).unwrap(),
            "LABEL" => {
                // key="value" pairs; values are quoted and may hold spaces.
                let mut r = rest.trim();
                while let Some((k, v)) = r.split_once("=\"") {
                    let (value, tail) = v.split_once('"').unwrap();
                    // As a builder does: ARGs expand in LABEL values.
                    let value = value.replace("${VERSION}", &s.version);
                    s.labels.insert(k.trim().into(), value);
                    r = tail.trim();
                }
            }
            _ => {}
        }
    }
    s
}

/// The binaries the Containerfile builds, as .ci/run builds them for this test.
fn binaries() -> Option<PathBuf> {
    let dir = meshca_tests::repo().join("target/image/release");
    if dir.join("meshca-server").exists() && dir.join("meshca").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI: .ci/run builds target/image/release (the Containerfile's build) before the tests"
    );
    eprintln!(
        "SKIPPED: no image binaries; build them as the Containerfile does:\n  \
         CARGO_TARGET_DIR=target/image CARGO_PROFILE_RELEASE_DEBUG=false \
         CARGO_PROFILE_RELEASE_STRIP=true cargo build --release --locked --bin meshca-server --bin meshca"
    );
    None
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Copies `from` to `root` + the same absolute path, making its directories.
fn copy_in(root: &Path, from: &Path) {
    let to = root.join(from.strip_prefix("/").unwrap());
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, &to).unwrap();
}

/// The runtime stage's filesystem, from scratch: the binaries at the COPY destination, the
/// libraries `ldd` names (at the paths the loader looks in), what distroless's `nonroot`
/// images carry besides (passwd, group, CA certificates, /tmp), and mount points.
fn assemble(root: &Path, bins: &Path, stage: &Stage) {
    let mut libs = std::collections::BTreeSet::new();
    for (srcs, dst) in &stage.copies {
        let dst = root.join(dst.trim_start_matches('/'));
        std::fs::create_dir_all(&dst).unwrap();
        for src in srcs {
            let bin = bins.join(src);
            std::fs::copy(&bin, dst.join(src)).unwrap();
            let ldd = run(Command::new("ldd").arg(&bin));
            for line in ldd.lines() {
                // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux… (0x…)"
                let path = line
                    .split("=>")
                    .last()
                    .and_then(|r| r.split_whitespace().next())
                    .filter(|p| p.starts_with('/'));
                if let Some(p) = path {
                    libs.insert(PathBuf::from(p));
                }
            }
        }
    }
    for lib in &libs {
        // The file itself at its real path (Debian's /lib is /usr/lib), and the name the
        // loader asks for as a link to it, as the distribution lays them out.
        let real = std::fs::canonicalize(lib).unwrap();
        copy_in(root, &real);
        if &real != lib {
            let link = root.join(lib.strip_prefix("/").unwrap());
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&real, &link).unwrap();
        }
    }
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\nnonroot:x:65532:\n").unwrap();
    if Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        copy_in(root, Path::new("/etc/ssl/certs/ca-certificates.crt"));
    }
    for d in [
        "tmp",
        "proc",
        "dev",
        "etc/meshca",
        "var/run/meshca",
        "home/nonroot",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
}

/// Walks `root`: every file's path relative to it and its size.
fn walk(root: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.push((rel, m.len()));
            }
        }
    }
    out.sort();
    out
}

/// buildah with its own storage under `dir` (vfs: no overlay or fuse needed).
fn buildah(dir: &Path) -> impl Fn(&[&str]) -> String + '_ {
    move |args: &[&str]| {
        run(Command::new("buildah")
            .arg("--root")
            .arg(dir.join("storage"))
            .arg("--runroot")
            .arg(dir.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args))
        .trim()
        .to_owned()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The process `unshare --fork` started (its only child).
fn child_of(pid: u32) -> Option<u32> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    t.split_whitespace().next()?.parse().ok()
}

#[tokio::test]
async fn the_image_runs_as_65532_on_a_read_only_root_and_issues() {
    let stage = runtime_stage();
    // The Containerfile says what the issue asks of it; the version label is Cargo's.
    assert_eq!(stage.user, "65532:65532");
    assert_eq!(stage.entrypoint, ["/usr/local/bin/meshca-server"]);
    assert_eq!(
        stage.version,
        env!("CARGO_PKG_VERSION"),
        "ARG VERSION in Containerfile"
    );
    for k in ["title", "description", "version", "source", "licenses"] {
        assert!(
            stage
                .labels
                .contains_key(&format!("org.opencontainers.image.{k}")),
            "{:?}",
            stage.labels
        );
    }
    assert_eq!(stage.copies.len(), 1, "{:?}", stage.copies);

    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("SKIPPED: running the image's filesystem needs root (unshare, mount, chroot)");
        return;
    }
    let Some(bins) = binaries() else { return };
    let work = tempfile::tempdir().unwrap();
    let scratch = work.path().join("rootfs");
    assemble(&scratch, &bins, &stage);

    // The image: from scratch, the rootfs, the Containerfile's config; then its filesystem as
    // an image's (mounted from buildah's storage), which is what runs below.
    let root = if meshca_tests::require_tool("buildah").is_some() {
        let b = buildah(work.path());
        let ctr = b(&["from", "scratch"]);
        b(&["copy", &ctr, &format!("{}/", scratch.display()), "/"]);
        let mut config = vec![
            "config".to_owned(),
            "--user".into(),
            stage.user.clone(),
            "--entrypoint".into(),
            serde_json::to_string(&stage.entrypoint).unwrap(),
        ];
        for (k, v) in &stage.labels {
            config.extend(["--label".into(), format!("{k}={v}")]);
        }
        config.push(ctr.clone());
        b(&config.iter().map(String::as_str).collect::<Vec<_>>());
        let image = format!("localhost/meshca:{}", stage.version);
        b(&["commit", "--quiet", &ctr, &image]);
        let archive = work.path().join("meshca.oci.tar");
        b(&[
            "push",
            "--quiet",
            &image,
            &format!("oci-archive:{}", archive.display()),
        ]);
        let size = std::fs::metadata(&archive).unwrap().len();
        let inspect: serde_json::Value = serde_json::from_str(&b(&["inspect", &image])).unwrap();
        let cfg = &inspect["OCIv1"]["config"];
        assert_eq!(cfg["User"], "65532:65532", "{cfg}");
        assert_eq!(cfg["Entrypoint"][0], "/usr/local/bin/meshca-server");
        assert_eq!(
            cfg["Labels"]["org.opencontainers.image.version"],
            stage.version.as_str()
        );
        let run_ctr = b(&["from", &image]);
        let mounted = PathBuf::from(b(&["mount", &run_ctr]));
        println!(
            "image {image}: {:.1} MB as an OCI archive, {} files",
            size as f64 / 1e6,
            walk(&mounted).len()
        );
        mounted
    } else {
        eprintln!("buildah is not installed: running the assembled filesystem itself");
        scratch.clone()
    };

    // No shell, package manager or compiler in it; the binaries and their libraries are all.
    let files = walk(&root);
    let total: u64 = files.iter().map(|f| f.1).sum();
    println!(
        "image filesystem: {:.1} MB in {} files:",
        total as f64 / 1e6,
        files.len()
    );
    for (f, n) in &files {
        println!("  {n:>10}  /{f}");
        let name = f.rsplit('/').next().unwrap();
        assert!(
            !matches!(
                name,
                "sh" | "bash"
                    | "dash"
                    | "busybox"
                    | "apt"
                    | "apt-get"
                    | "dpkg"
                    | "cc"
                    | "gcc"
                    | "rustc"
                    | "cargo"
                    | "ld"
                    | "python3"
                    | "perl"
            ),
            "/{f} must not be in the image"
        );
    }

    // A kubelet-style emptyDir with fsGroup 65532: root-owned, group 65532, mode 2777.
    let state = work.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(0), Some(65532)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o2777)).unwrap();
    let conf = work.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let (grpc, http) = (free_port(), free_port());
    std::fs::write(
        conf.join("meshca.toml"),
        format!(
            "state_dir = \"/var/run/meshca\"\ntrust_domain = \"cluster.local\"\n\
             listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\n\
             log_format = \"json\"\n[tls]\nip_addresses = [\"127.0.0.1\"]\n"
        ),
    )
    .unwrap();
    let entry = stage.entrypoint.join(" ");
    let script = format!(
        r#"set -e
R="{root}"
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount -t tmpfs -o mode=0755,size=64k tmpfs "$R/dev"
for d in null zero urandom random; do touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"; done
mount --bind "{state}" "$R/var/run/meshca"
mount --bind "{conf}" "$R/etc/meshca"
mount -o remount,bind,ro "$R/etc/meshca"
mount -o remount,bind,ro "$R"
exec chroot --userspec=65532:65532 "$R" {entry} --config /etc/meshca/meshca.toml"#,
        root = root.display(),
        state = state.display(),
        conf = conf.display(),
    );
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http_addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let start = Instant::now();
    let ready = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the image's entrypoint exited ({status}):\n{err}");
        }
        if std::net::TcpStream::connect(http_addr).is_ok() {
            let (code, body) = meshca_tests::http_get(http_addr, "/readyz").await;
            if code == 200 {
                break body;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("ready in {:?}: {}", start.elapsed(), ready.trim());

    // Who runs, on what root.
    let pid = child_of(child.id()).expect("the server process");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65532"),
        "{uid}"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_mount = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("the process's root mount");
    let options = root_mount.split_whitespace().nth(5).unwrap();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "root mount {root_mount}"
    );

    // The emptyDir is root's (mode 2777): meshca keeps its files in a 0700 directory of its own
    // there, `meshca/`, as docs/kubernetes.md says.
    let own = state.join("meshca");
    let m = std::fs::metadata(&own).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o777),
        (65532, 0o700),
        "{}",
        own.display()
    );

    // One certificate, over TLS, with the bootstrap token the server wrote, verified
    // independently against the bundle it wrote.
    let bundle = read_pem_certs(&own.join("bundle.pem").display().to_string()).unwrap();
    let token = std::fs::read_to_string(own.join("bootstrap-token")).unwrap();
    let tls = client_tls(&bundle, None).unwrap();
    let ch = channel(&format!("https://127.0.0.1:{grpc}"), tls).unwrap();
    let id = "spiffe://cluster.local/ns/default/sa/image-test"
        .parse()
        .unwrap();
    let key = SecretKey::generate_p256().unwrap();
    let mut req = tonic::Request::new(SignCertificateRequest {
        csr: make_csr(&id, &key).unwrap(),
        ttl: None,
        instance_id: String::new(),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    let resp = IdentityServiceClient::new(ch)
        .sign_certificate(req)
        .await
        .unwrap()
        .into_inner();
    let chain: Vec<_> = resp
        .certificate_chain
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    let got = verify_svid(
        &chain,
        &bundle,
        rustls_pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();
    assert_eq!(
        got.to_string(),
        "spiffe://cluster.local/ns/default/sa/image-test"
    );

    // The state it wrote in the emptyDir: its own, keys 0600, directories 0700.
    for e in walk(&state) {
        let p = state.join(&e.0);
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.file_type().is_socket() {
            continue;
        }
        assert_eq!(m.uid(), 65532, "{}", p.display());
        if e.0.ends_with(".key") || e.0.contains("key") {
            assert_eq!(m.mode() & 0o077, 0, "{} is {:o}", p.display(), m.mode());
        }
    }

    // The CLI in the image answers the NOTES.txt command, as the same user.
    let cli = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            r#"set -e; R="{root}"; mount --bind "{state}" "$R/var/run/meshca"; exec chroot --userspec=65532:65532 "$R" /usr/local/bin/meshca status --state-dir /var/run/meshca --output json"#,
            root = root.display(),
            state = state.display(),
        )));
    let status: serde_json::Value = serde_json::from_str(&cli).unwrap();
    assert_eq!(status["trust_domain"], "cluster.local", "{status}");
    assert_eq!(status["anchors"][0]["status"], "active", "{status}");

    child.kill().unwrap();
    child.wait().unwrap();
}
