//! Wire types for meshca's gRPC APIs, generated at build time from `proto/meshca/v1/*.proto`.
//!
//! The `.proto` files are the contract: their comments say what every field means, which
//! certificate comes first in a chain, and which status code answers which failure.

/// `meshca.v1`: the identity (CSR) API.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("meshca.v1");
}

/// `istio.v1.auth`: Istio's certificate service (istio-agent's CSR API), served by meshca too.
pub mod istio {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("istio.v1.auth");
}
