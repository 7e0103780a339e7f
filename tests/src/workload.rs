//! A SPIFFE Workload API client for tests and benchmarks: tesserad's own generated gRPC client
//! over the daemon's Workload API socket (the relying-party checks use py-spiffe instead).

use std::path::{Path, PathBuf};

pub use tesserad::doors::spiffe::proto;
use tesserad::doors::spiffe::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::{Channel, Endpoint};

pub type Client = SpiffeWorkloadApiClient<Channel>;

/// Connect to the Workload API at `socket`.
pub async fn connect(socket: &Path) -> Client {
    let path: PathBuf = socket.to_path_buf();
    // The URI is required by the API and unused: the connector dials the Unix socket.
    let channel = Endpoint::try_from("http://workload.invalid")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("connect to the Workload API socket");
    SpiffeWorkloadApiClient::new(channel)
}

/// `msg` with the `workload.spiffe.io: true` metadata the specification requires.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// The `kid`s of a JWKS given as JSON bytes.
pub fn kids(jwks: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(jwks).expect("JWKS JSON");
    v["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str().map(str::to_string))
        .collect()
}

/// The `spiffe_sequence` of a JWKS given as JSON bytes.
pub fn sequence(jwks: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(jwks).expect("JWKS JSON");
    v["spiffe_sequence"].as_u64().expect("spiffe_sequence")
}
