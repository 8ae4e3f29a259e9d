//! Compiles the `.proto` files with protox (pure Rust), so a fresh machine needs no `protoc`.

use std::io::{Error, Result};

const PROTOS: &[&str] = &[
    "meshca/v1/identity.proto",
    "meshca/v1/admin.proto",
    "istio/v1/auth/istioca.proto",
];

fn main() -> Result<()> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."]).map_err(|e| Error::other(format!("{e:?}")))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
}
