//! Process-wide measurements for the Prometheus text exposition (`[metrics] listen`). A leaf
//! like `fault` and `durable`: every part may record into it (the key store and the audit
//! writer included), and it imports nothing of the daemon. Values known only at scrape time
//! (agents by status, CA and CRL expiry, queue depth) are set by the metrics door just before
//! it encodes.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// 100 µs to ~6.5 s: a SoftHSM signature to a slow TPM's key creation.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    issued: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    device: Histograms,
    audit_sync: Histogram,
    pub device_queue: Gauge,
    pub agents: Family<Labels, Gauge>,
    pub host_ca_expiry: Gauge,
    pub crl_expiry: Gauge,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("tessera");
    let issued = Family::<Labels, Counter>::default();
    registry.register(
        "credentials_issued",
        "Credentials issued, by type (token, proof, wit, certificate, jwt-svid, tls-signature) and agent",
        issued.clone(),
    );
    let refusals = Family::<Labels, Counter>::default();
    registry.register(
        "refusals",
        "Requests refused, by problem type (urn:tessera:problem:<problem>) and door",
        refusals.clone(),
    );
    let device: Histograms = Family::new_with_constructor(latency_histogram);
    registry.register(
        "device_operation_seconds",
        "Key store operation latency on the device, by operation",
        device.clone(),
    );
    let audit_sync = latency_histogram();
    registry.register(
        "audit_sync_seconds",
        "Audit trail write + fdatasync latency (one group commit)",
        audit_sync.clone(),
    );
    let device_queue = Gauge::default();
    registry.register(
        "device_queue_depth",
        "Signing requests waiting for a device session",
        device_queue.clone(),
    );
    let agents = Family::<Labels, Gauge>::default();
    registry.register("agents", "Agent records by status", agents.clone());
    let host_ca_expiry = Gauge::default();
    registry.register(
        "host_ca_expiry_seconds",
        "Seconds until the host CA certificate (or its chain) expires",
        host_ca_expiry.clone(),
    );
    let crl_expiry = Gauge::default();
    registry.register(
        "crl_expiry_seconds",
        "Seconds until the current CRL's nextUpdate",
        crl_expiry.clone(),
    );
    Metrics {
        registry,
        issued,
        refusals,
        device,
        audit_sync,
        device_queue,
        agents,
        host_ca_expiry,
        crl_expiry,
    }
});

/// One credential of `kind` for `agent`.
pub fn issued(kind: &str, agent: &str) {
    METRICS
        .issued
        .get_or_create(&vec![
            ("type".to_string(), kind.to_string()),
            ("agent".to_string(), agent.to_string()),
        ])
        .inc();
}

/// The credential types counted in `credentials_issued`.
pub const CREDENTIAL_TYPES: [&str; 6] = [
    "token",
    "proof",
    "wit",
    "certificate",
    "jwt-svid",
    "tls-signature",
];

/// Drop a revoked agent's `credentials_issued` series: otherwise every agent ever enrolled
/// stays in the scrape and in memory (the soak's churn).
pub fn forget_agent(agent: &str) {
    for kind in CREDENTIAL_TYPES {
        METRICS.issued.remove(&vec![
            ("type".to_string(), kind.to_string()),
            ("agent".to_string(), agent.to_string()),
        ]);
    }
}

/// One refusal (`problem`: the stable slug) at `door` ("socket", "dbus", "spiffe").
pub fn refused(problem: &str, door: &str) {
    METRICS
        .refusals
        .get_or_create(&vec![
            ("problem".to_string(), problem.to_string()),
            ("door".to_string(), door.to_string()),
        ])
        .inc();
}

/// A device operation took `took`.
pub fn device_op(operation: &str, took: Duration) {
    METRICS
        .device
        .get_or_create(&vec![("operation".to_string(), operation.to_string())])
        .observe(took.as_secs_f64());
}

/// An audit group commit (write + fdatasync) took `took`.
pub fn audit_sync(took: Duration) {
    METRICS.audit_sync.observe(took.as_secs_f64());
}

/// The text exposition (OpenMetrics text, which Prometheus reads).
pub fn encode_text() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &METRICS.registry);
    out
}
