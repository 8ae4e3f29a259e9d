//! `meshca issue`.

use std::path::PathBuf;
use std::time::Duration;

use meshca_proto::v1::SignCertificateRequest;
use meshca_proto::v1::identity_service_client::IdentityServiceClient;
use rotator::client::{
    Identity, channel, client_tls, make_csr, parse_pem_certs, read_pem_certs, verify_svid,
};
use rotator::clock::rfc3339;
use rotator::pki::{SecretKey, pem_cert};
use rotator::spiffe::SpiffeId;
use rotator::store::write_atomic;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

use crate::{Failed, Output, grpc_failure, runtime};

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The server's gRPC URL, e.g. https://127.0.0.1:8443.
    #[arg(long)]
    server: String,
    /// PEM file with the trust bundle the server's certificate is verified against.
    #[arg(long, value_name = "FILE")]
    ca_bundle: PathBuf,
    /// File holding a bearer token (e.g. `<state-dir>/bootstrap-token`).
    #[arg(long, value_name = "FILE", required_unless_present = "cert")]
    token_file: Option<PathBuf>,
    /// Renew over mTLS instead: the current certificate (PEM, leaf first) ...
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// ... and its key.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// The SPIFFE ID to ask for.
    #[arg(long)]
    spiffe_id: SpiffeId,
    /// Requested lifetime, e.g. 24h (the server clamps it).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Instance id for bundle-convergence tracking (e.g. a pod UID). Default: derived from this
    /// host and the `--out` path, so renewing the same output counts as the same workload.
    #[arg(long, default_value = "")]
    instance_id: String,
    /// Output prefix: writes PREFIX.crt (leaf then issuer), PREFIX.key (0600), PREFIX.bundle.pem.
    #[arg(long, value_name = "PREFIX")]
    out: PathBuf,
}

/// The instance this request renews: `--instance-id`, else `cli:` and a hash of (host name,
/// absolute `--out` path, SPIFFE ID) — stable across renewals of the same output on one host, so
/// the ledger counts them as one workload (a new key each time would otherwise look like a new
/// workload until the old leaf expired, holding the measured gates closed).
fn instance_id(a: &IssueArgs) -> String {
    if !a.instance_id.is_empty() {
        return a.instance_id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into());
    let out = std::path::absolute(&a.out).unwrap_or_else(|_| a.out.clone());
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        host.trim().as_bytes(),
        out.as_os_str().as_encoded_bytes(),
        a.spiffe_id.as_str().as_bytes(),
    ] {
        ctx.update(part);
        ctx.update(&[0]);
    }
    format!("cli:{}", hex::encode(&ctx.finish().as_ref()[..8]))
}

pub fn run(a: IssueArgs, output: Output) -> Result<(), Failed> {
    let bundle = read_pem_certs(&a.ca_bundle.display().to_string())?;
    let (identity, token) = credentials(&a)?;
    let key = SecretKey::generate_p256()?;
    let csr = make_csr(&a.spiffe_id, &key)?;
    let tls = client_tls(&bundle, identity.as_ref())?;
    let mut req = tonic::Request::new(SignCertificateRequest {
        csr,
        ttl: a.ttl.map(|d| prost_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        instance_id: instance_id(&a),
    });
    if let Some(t) = &token {
        let v = format!("Bearer {}", t.as_str())
            .parse()
            .map_err(|_| Failed::new("the token file holds characters not allowed in a header"))?;
        req.metadata_mut().insert("authorization", v);
    }
    let resp = runtime()?
        .block_on(async {
            let ch = channel(&a.server, tls)?;
            IdentityServiceClient::new(ch)
                .sign_certificate(req)
                .await
                .map_err(|s| grpc_failure(&a.server, &s))
        })?
        .into_inner();

    let (got, chain, new_bundle) = checked(&a, &resp)?;
    let crt_path = with_ext(&a.out, "crt");
    let key_path = with_ext(&a.out, "key");
    let bundle_path = with_ext(&a.out, "bundle.pem");
    let chain_pem: String = chain.iter().map(|c| pem_cert(c)).collect();
    let bundle_pem: String = new_bundle.iter().map(|c| pem_cert(c)).collect();
    let key_pem = key.to_pem();
    write_credential(
        &a.out,
        &resp.serial,
        [
            ("crt", chain_pem.as_bytes(), 0o644),
            ("key", key_pem.as_bytes(), 0o600),
            ("bundle.pem", bundle_pem.as_bytes(), 0o644),
        ],
    )?;
    // Sanity: what we wrote parses back.
    if parse_pem_certs(&chain_pem).len() != chain.len() {
        return Err(Failed::new("internal: written chain does not parse back"));
    }
    let ts = |t: Option<prost_types::Timestamp>| {
        t.and_then(|t| OffsetDateTime::from_unix_timestamp(t.seconds).ok())
            .map(rfc3339)
            .unwrap_or_default()
    };
    let not_after = ts(resp.not_after);
    let refresh_at = ts(resp.refresh_at);
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "spiffe_id": got.to_string(), "serial": resp.serial, "not_after": not_after,
                "refresh_at": refresh_at, "bundle_version": resp.bundle_version,
                "certificate": crt_path, "key": key_path, "bundle": bundle_path,
            })
        ),
        Output::Text => println!(
            "issued {got}\n  serial      {}\n  not after   {not_after}\n  renew at    {refresh_at}\n  bundle      version {}\n  wrote       {} (leaf + issuer), {} (0600), {}",
            resp.serial,
            resp.bundle_version,
            crt_path.display(),
            key_path.display(),
            bundle_path.display()
        ),
    }
    Ok(())
}

/// What came back, checked before anything is written: the chain verifies to the returned
/// bundle and the leaf carries exactly the identity asked for.
fn checked(
    a: &IssueArgs,
    resp: &meshca_proto::v1::SignCertificateResponse,
) -> Result<
    (
        SpiffeId,
        Vec<CertificateDer<'static>>,
        Vec<CertificateDer<'static>>,
    ),
    Failed,
> {
    let chain: Vec<CertificateDer<'static>> = resp
        .certificate_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let new_bundle: Vec<CertificateDer<'static>> = resp
        .trust_bundle
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let got = verify_svid(
        &chain,
        &new_bundle,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .map_err(|e| Failed::new(format!("the server's answer does not verify: {e}")))?;
    if got != a.spiffe_id {
        return Err(Failed::new(format!(
            "the server issued {got}, not the requested {}",
            a.spiffe_id
        )));
    }
    Ok((got, chain, new_bundle))
}

/// The caller's credentials: a certificate and key (renewal over mTLS), a token, or both.
fn credentials(
    a: &IssueArgs,
) -> Result<(Option<Identity>, Option<zeroize::Zeroizing<String>>), Failed> {
    let identity = match (&a.cert, &a.key) {
        (Some(c), Some(k)) => {
            let chain = read_pem_certs(&c.display().to_string())?;
            let key_text = zeroize::Zeroizing::new(
                std::fs::read_to_string(k)
                    .map_err(|e| Failed::new(format!("{}: {e}", k.display())))?,
            );
            let key = SecretKey::from_pem(&key_text)
                .map_err(|e| Failed::new(format!("{}: {e}", k.display())))?;
            Some(Identity { chain, key })
        }
        _ => None,
    };
    let token = match &a.token_file {
        Some(p) => Some(zeroize::Zeroizing::new(
            std::fs::read_to_string(p)
                .map_err(|e| Failed::new(format!("{}: {e}", p.display())))?
                .trim()
                .to_owned(),
        )),
        None => None,
    };
    Ok((identity, token))
}

fn with_ext(prefix: &std::path::Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Writes a credential so that a reader, or a crash at any instant, sees the whole old one or the
/// whole new one — never a key beside a certificate it does not match (the layout the kubelet
/// uses for Secret volumes):
///
/// ```text
/// PREFIX.crt        -> .PREFIX.live/crt          (symlinks made once)
/// PREFIX.key        -> .PREFIX.live/key
/// PREFIX.bundle.pem -> .PREFIX.live/bundle.pem
/// .PREFIX.live      -> .PREFIX.<serial>          (replaced by one rename: the commit point)
/// .PREFIX.<serial>/crt|key|bundle.pem            (a new directory per credential)
/// ```
///
/// Older `.PREFIX.<serial>` directories, their keys included, are deleted once the new one is
/// live. A PREFIX.crt (etc.) that is a regular file (written by an older meshca) is replaced by
/// its symlink after the swap.
fn write_credential(
    prefix: &std::path::Path,
    serial: &str,
    files: [(&str, &[u8], u32); 3],
) -> Result<(), Failed> {
    use std::os::unix::fs::DirBuilderExt;
    let fail = |p: &std::path::Path, e: &dyn std::fmt::Display| {
        Failed::new(format!("{}: {e}", p.display()))
    };
    let dir = prefix
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let base = prefix
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Failed::new(format!("{}: not a file name prefix", prefix.display())))?;
    let mut serial: String = serial.chars().filter(char::is_ascii_hexdigit).collect();
    if serial.is_empty() {
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        serial = format!("{:x}", nanos.unsigned_abs());
    }
    let version = format!(".{base}.{serial}");
    let vdir = dir.join(&version);
    // A new directory of our own (never one someone left there).
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&vdir)
        .map_err(|e| fail(&vdir, &e))?;
    for (name, bytes, mode) in files {
        write_atomic(&vdir.join(name), bytes, mode).map_err(|e| Failed::new(e.to_string()))?;
    }
    rotator::store::fault_point("issue:before-swap");
    // The commit point: one rename of a fresh symlink over `.PREFIX.live`.
    let live = format!(".{base}.live");
    swap_symlink(dir, &version, &live)?;
    rotator::store::fault_point("issue:after-swap");
    for (name, _, _) in files {
        let link = dir.join(format!("{base}.{name}"));
        let target = format!("{live}/{name}");
        if std::fs::read_link(&link).ok().as_deref() != Some(std::path::Path::new(&target)) {
            swap_symlink(dir, &target, &format!("{base}.{name}"))?;
        }
    }
    // Old credentials can never be used again: delete them (keys included).
    let prefix_dot = format!(".{base}.");
    for e in std::fs::read_dir(dir).map_err(|e| fail(dir, &e))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix_dot) else {
            continue;
        };
        let is_version = !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit());
        if is_version && name != version && e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail(dir, &e))
}

/// Points `dir/name` at `target` atomically: a fresh symlink under a temporary name, renamed over
/// `name` (which may be a file, a symlink, or missing), then the directory synced.
fn swap_symlink(dir: &std::path::Path, target: &str, name: &str) -> Result<(), Failed> {
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)))
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Failed::new(format!("{}: {e}", dir.join(name).display()))
        })
}
