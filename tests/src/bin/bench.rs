//! Benchmark: token latency and throughput over the socket (1 and 16 clients) for both
//! backends, agent certificates and attestation evidence (1 client), beside the raw key-store sign time and the audit's own cost, measured in the
//! same run. Run with `scripts/bench` (release build); prints a Markdown report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest;
use tessera::{CertificateOptions, DpopOptions, HttpSignatureOptions, TokenOptions};
use tessera_e2e::daemon::Options;
use tessera_e2e::devices::write_config;
use tessera_e2e::{floors, shared_tempdir, Backend, Daemon};
use tesserad::audit::{Audit, Event};
use tesserad::keystore;
use tesserad::runtime::config::Config;

const AUD: &str = "https://api.example.com";

struct Stats {
    n: usize,
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn stats(mut lat: Vec<Duration>, wall: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Stats {
        n: lat.len(),
        p50: pick(0.50),
        p99: pick(0.99),
        per_sec: lat.len() as f64 / wall.as_secs_f64(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// Raw `KeyStore::sign` on the device, no daemon.
fn raw_sign(backend: &Backend, n: usize) -> Stats {
    let dir = shared_tempdir();
    let cfg = Config::load(&write_config(backend, dir.path(), "")).unwrap();
    for (k, v) in backend.envs() {
        std::env::set_var(k, v);
    }
    let mut store = keystore::open(&cfg.backend, &cfg.state_dir).unwrap();
    store.create("agent-bench").unwrap();
    let digest: [u8; 32] = sha2::Sha256::digest(b"bench").into();
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        store.sign("agent-bench", &digest).unwrap();
        lat.push(t.elapsed());
    }
    stats(lat, t0.elapsed())
}

/// Which credential a benchmark client asks for.
#[derive(Clone, Copy)]
enum Credential {
    Token,
    Certificate,
    Attestation,
    /// A DPoP proof for a request carrying a bound token (fetched once per client).
    Dpop,
    /// An RFC 9421 signature covering method, authority, target URI and a content digest.
    HttpSignature,
}

fn tokens(d: &Daemon, clients: usize, per_client: usize) -> Stats {
    credentials(d, Credential::Token, clients, per_client)
}

/// `workers` concurrent tasks, each timing `per_worker` calls of `call(worker)` on a
/// two-thread runtime: every latency, and the throughput over the wall time.
fn timed_workers<C, F>(workers: usize, per_worker: usize, call: C) -> Stats
where
    C: Fn(usize) -> Box<dyn FnMut() -> F + Send>,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t0 = Instant::now();
        let mut tasks = vec![];
        for w in 0..workers {
            let mut one = call(w);
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_worker);
                for _ in 0..per_worker {
                    let t = Instant::now();
                    one().await;
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        stats(all, t0.elapsed())
    })
}

fn credentials(d: &Daemon, what: Credential, clients: usize, per_client: usize) -> Stats {
    let bound = Arc::new(
        tessera_e2e::rt()
            .block_on(d.client().token(&TokenOptions::new(AUD).bind_dpop()))
            .expect("bound token")
            .token,
    );
    timed_workers(clients, per_client, |_| {
        let c = Arc::new(d.client());
        let bound = bound.clone();
        Box::new(move || {
            let c = c.clone();
            let bound = bound.clone();
            async move {
                match what {
                    Credential::Dpop => {
                        let o = DpopOptions::new("POST", format!("{AUD}/v1/orders"))
                            .access_token(bound.as_str());
                        c.dpop_proof(&o).await.expect("dpop proof");
                    }
                    Credential::HttpSignature => {
                        let o = HttpSignatureOptions::new("POST", format!("{AUD}/v1/orders"))
                            .component("@target-uri")
                            .content_digest(
                                "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
                            );
                        c.http_signature(&o).await.expect("http signature");
                    }
                    Credential::Token => {
                        c.token(&TokenOptions::new(AUD)).await.expect("token");
                    }
                    Credential::Certificate => {
                        c.certificate(&CertificateOptions::default())
                            .await
                            .expect("certificate");
                    }
                    Credential::Attestation => {
                        c.attestation(&rand::random::<[u8; 32]>(), None)
                            .await
                            .expect("attestation");
                    }
                }
            }
        })
    })
}

fn audit_only(writers: usize, per_writer: usize) -> Stats {
    let dir = shared_tempdir();
    let (audit, _) = {
        // Audit::open starts its writer thread; no runtime is needed for that.
        Audit::open(dir.path(), 1 << 30).unwrap()
    };
    let audit = Arc::new(audit);
    timed_workers(writers, per_writer, |_| {
        let a = audit.clone();
        let mut i = 0u64;
        Box::new(move || {
            let a = a.clone();
            i += 1;
            let n = i;
            async move {
                a.record(Event::new("token.issued").details(serde_json::json!({"jti": n})))
                    .await
                    .unwrap();
            }
        })
    })
}

/// Time of a `Revoke` call, and from its return to the first refused token.
fn revocation(mk: &dyn Fn() -> Backend, rounds: usize) -> (Stats, Stats) {
    let bus = tessera_e2e::bus::TestBus::start(tessera_e2e::bus::BusPolicy::Shipped);
    let d = Daemon::start_with(
        mk(),
        Options {
            bus: bus.address.clone(),
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let call = |method: &'static str, body: (String, String)| {
            let conn = conn.clone();
            async move {
                conn.call_method(
                    Some("org.tessera.Tessera1"),
                    "/org/tessera/Tessera1",
                    Some("org.tessera.Tessera1.Manager"),
                    method,
                    &body,
                )
                .await
                .unwrap();
            }
        };
        let (mut revoke, mut cutoff) = (vec![], vec![]);
        let t_all = Instant::now();
        for i in 0..rounds {
            let name = format!("rv{i}");
            let mut sel = std::collections::HashMap::new();
            sel.insert("uid", zbus::zvariant::Value::from(0u32));
            let mut pol = std::collections::HashMap::new();
            pol.insert(
                "audiences",
                zbus::zvariant::Value::from(vec![AUD.to_string()]),
            );
            conn.call_method(
                Some("org.tessera.Tessera1"),
                "/org/tessera/Tessera1",
                Some("org.tessera.Tessera1.Manager"),
                "Enroll",
                &(name.as_str(), sel, pol),
            )
            .await
            .unwrap();
            d.client()
                .token(&TokenOptions::new(AUD))
                .await
                .expect("token before revoke");
            let t0 = Instant::now();
            call("Revoke", (name, "bench".into())).await;
            let t1 = Instant::now();
            let refused = d.client().token(&TokenOptions::new(AUD)).await;
            assert!(refused.is_err(), "token after revoke");
            revoke.push(t1 - t0);
            cutoff.push(t1.elapsed());
        }
        let wall = t_all.elapsed();
        (stats(revoke, wall), stats(cutoff, wall))
    })
}

/// The kill switch with `agents` agents declared in `agents_dir`: (time to enrol them all at
/// start, the `RevokeAll` call, from its return until a sample of agents is refused).
fn kill_switch(backend: Backend, agents: usize) -> (Duration, Duration, Duration) {
    let bus = tessera_e2e::bus::TestBus::start(tessera_e2e::bus::BusPolicy::Shipped);
    let files = (0..agents)
        .map(|i| {
            (
                format!("k{i:05}"),
                format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\n"),
            )
        })
        .collect();
    let mut d = Daemon::prepare(
        backend,
        Options {
            bus: bus.address.clone(),
            agents: files,
            ..Default::default()
        },
    );
    let t0 = Instant::now();
    d.spawn();
    while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(1800), "daemon not up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let enrol = t0.elapsed();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let c = d.client();
        let sample = [0, agents / 2, agents - 1];
        for i in sample {
            let mut o = TokenOptions::new(AUD);
            o.agent = Some(format!("k{i:05}"));
            c.token(&o).await.expect("token before the kill switch");
        }
        let t = Instant::now();
        conn.call_method(
            Some("org.tessera.Tessera1"),
            "/org/tessera/Tessera1",
            Some("org.tessera.Tessera1.Manager"),
            "RevokeAll",
            &("bench",),
        )
        .await
        .unwrap();
        let call = t.elapsed();
        let t = Instant::now();
        for i in sample {
            let mut o = TokenOptions::new(AUD);
            o.agent = Some(format!("k{i:05}"));
            c.token(&o)
                .await
                .expect_err("refused after the kill switch");
        }
        (enrol, call, t.elapsed())
    })
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn wait_socket(d: &mut Daemon, within: Duration) -> Duration {
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
        assert!(t0.elapsed() < within, "daemon not up:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(5));
    }
    t0.elapsed()
}

/// Tokens for a random agent of `names` (named in each request), `clients` at once.
fn named_tokens(d: &Daemon, names: &Arc<Vec<String>>, clients: usize, per_client: usize) -> Stats {
    timed_workers(clients, per_client, |_| {
        let c = Arc::new(d.client());
        let names = names.clone();
        Box::new(move || {
            let c = c.clone();
            let mut o = TokenOptions::new(AUD);
            o.agent = Some(names[rand::random::<usize>() % names.len()].clone());
            async move {
                c.token(&o).await.expect("token");
            }
        })
    })
}

async fn dbus_call(
    conn: &zbus::Connection,
    method: &str,
    body: &(impl serde::Serialize + zbus::zvariant::DynamicType),
) {
    conn.call_method(
        Some("org.tessera.Tessera1"),
        "/org/tessera/Tessera1",
        Some("org.tessera.Tessera1.Manager"),
        method,
        body,
    )
    .await
    .unwrap_or_else(|e| panic!("{method}: {e}"));
}

/// `BENCH_AGENTS=N`: N agents declared in `agents_dir` on each backend: enrolment (key
/// generation included), start with N agents, RSS, tokens for random agents beside one agent,
/// `Revoke` and `RevokeAll` to the first and last refusal.
fn many_agents(agents: usize, n: usize) {
    println!("| backend | agents | measurement | value |");
    println!("|---|---|---|---|");
    // BENCH_AGENTS_PKCS11=N: another count for SoftHSM, whose object operations rescan the
    // token directory (enrolment there is quadratic in the token's objects).
    let pkcs11_agents: usize = std::env::var("BENCH_AGENTS_PKCS11")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(agents);
    for name in ["tpm", "pkcs11"] {
        let agents = if name == "tpm" { agents } else { pkcs11_agents };
        if agents < 2 {
            continue;
        }
        let backend = if name == "tpm" {
            Backend::tpm()
        } else {
            Backend::pkcs11()
        };
        let pkcs11_share = matches!(backend, Backend::Pkcs11(_));
        let bus = tessera_e2e::bus::TestBus::start(tessera_e2e::bus::BusPolicy::Shipped);
        let names: Vec<String> = (0..agents).map(|i| format!("k{i:05}")).collect();
        let policy =
            format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\nrate = 100000000\n");
        let mut d = Daemon::prepare(
            backend,
            Options {
                bus: bus.address.clone(),
                agents: names.iter().map(|a| (a.clone(), policy.clone())).collect(),
                ..Default::default()
            },
        );
        let t0 = Instant::now();
        d.spawn();
        wait_socket(&mut d, Duration::from_secs(4 * 3600));
        let enrol = t0.elapsed();
        println!("| {name} | {agents} | enrol all from agents_dir at first start (keys made in the device) | {:.1} s ({:.1} ms per agent) |", enrol.as_secs_f64(), enrol.as_secs_f64() * 1000.0 / agents as f64);
        d.stop();
        let t0 = Instant::now();
        d.spawn();
        wait_socket(&mut d, Duration::from_secs(600));
        let start = t0.elapsed();
        // What every agent costs at rest, apart from what a burst of requests leaves behind.
        let rss_start = rss_kib(d.pid());
        let names = Arc::new(names);
        let _ = named_tokens(&d, &names, 4, 25);
        println!(
            "| {name} | {agents} | start with all enrolled (spawn -> socket answers) | {} ms |",
            start.as_millis()
        );
        println!(
            "| {name} | {agents} | tesserad RSS at start, before any request | {:.1} MiB |",
            rss_start as f64 / 1024.0
        );
        let many = named_tokens(&d, &names, 16, (n / 16).max(1));
        let rss = rss_kib(d.pid());
        println!(
            "| {name} | {agents} | tesserad RSS after the token run | {:.1} MiB |",
            rss as f64 / 1024.0
        );
        // jemalloc hands freed pages back over about ten seconds (its decay).
        std::thread::sleep(Duration::from_secs(12));
        println!(
            "| {name} | {agents} | tesserad RSS 12 s after the token run | {:.1} MiB |",
            rss_kib(d.pid()) as f64 / 1024.0
        );
        if pkcs11_share {
            // The module's in-process object cache: what opening the same token and listing
            // every key adds to this (otherwise idle) process.
            let before = rss_kib(std::process::id() as i32);
            let cfg = Config::load(&d.config).unwrap();
            for (k, v) in d.backend.envs() {
                std::env::set_var(k, v);
            }
            let mut store = keystore::open(&cfg.backend, &cfg.state_dir).unwrap();
            let listed = store.list().unwrap().len();
            let after = rss_kib(std::process::id() as i32);
            drop(store);
            println!("| {name} | {agents} | of which the SoftHSM module's object cache (RSS a process gains opening the token and listing its {listed} keys) | {:.1} MiB |", after.saturating_sub(before) as f64 / 1024.0);
        }
        let one = Arc::new(vec![names[0].clone()]);
        let single = named_tokens(&d, &one, 16, (n / 16).max(1));
        println!("| {name} | {agents} | token, 16 clients, random agent: p50 / p99 | {} / {} ms ({:.0}/s) |", ms(many.p50), ms(many.p99), many.per_sec);
        println!("| {name} | {agents} | token, 16 clients, always the same agent: p50 / p99 | {} / {} ms ({:.0}/s) |", ms(single.p50), ms(single.p99), single.per_sec);
        println!(
            "| {name} | {agents} | p99 random agent / p99 same agent | {:.2} |",
            many.p99.as_secs_f64() / single.p99.as_secs_f64()
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let conn = zbus::connection::Builder::address(bus.address.as_str())
                .unwrap()
                .build()
                .await
                .unwrap();
            let mut revokes = vec![];
            let t_all = Instant::now();
            for i in 1..=20 {
                let victim = names[i * (agents - 1) / 21].clone();
                let t = Instant::now();
                dbus_call(&conn, "Revoke", &(victim, "bench".to_string())).await;
                revokes.push(t.elapsed());
            }
            let r = stats(revokes, t_all.elapsed());
            println!("| {name} | {agents} | Revoke call, p50 / p99 of 20 | {} / {} ms |", ms(r.p50), ms(r.p99));
            // Two clients keep asking for the first and the last agent's token; each notes
            // when it is first refused, counted from the moment RevokeAll is called.
            let t0 = Arc::new(std::sync::OnceLock::<Instant>::new());
            let mut probes = vec![];
            for who in [names[0].clone(), names[agents - 1].clone()] {
                let c = d.client();
                let t0 = t0.clone();
                probes.push(tokio::spawn(async move {
                    let mut o = TokenOptions::new(AUD);
                    o.agent = Some(who);
                    loop {
                        if c.token(&o).await.is_err() {
                            if let Some(t) = t0.get() {
                                return t.elapsed();
                            }
                        }
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = t0.set(Instant::now());
            let t = Instant::now();
            dbus_call(&conn, "RevokeAll", &("bench".to_string(),)).await;
            let call = t.elapsed();
            let mut refused = vec![];
            for p in probes {
                refused.push(p.await.unwrap());
            }
            refused.sort();
            println!("| {name} | {agents} | RevokeAll: call returned / first agent refused / last agent refused (from the call) | {} / {} / {} ms |", ms(call), ms(refused[0]), ms(refused[1]));
        });
        d.stop();
    }
}

/// `BENCH_CALLGRIND=N`: the daemon under callgrind (SoftHSM), N tokens from one client after
/// a warm-up; prints instructions per token (all of the daemon's threads, the PKCS#11 module
/// included) and leaves the profile for `callgrind_annotate`.
fn callgrind(tokens_n: usize) {
    let out = std::env::var("BENCH_CALLGRIND_OUT").unwrap_or_else(|_| "target/callgrind".into());
    let out = std::path::absolute(out).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    std::env::set_var(
        "TESSERA_DAEMON_WRAPPER",
        format!(
            "valgrind --tool=callgrind --collect-atstart=yes --callgrind-out-file={}/callgrind.out.%p",
            out.display()
        ),
    );
    let mut d = Daemon::prepare(
        Backend::pkcs11(),
        Options {
            agents: vec![(
                "bench".into(),
                format!(
                    "[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\nrate = 100000000\n"
                ),
            )],
            // Longer deadlines: everything runs 20-50x slower under valgrind.
            extra_config: "[limits]\nrequest_deadline = \"120s\"\n".into(),
            ..Default::default()
        },
    );
    d.spawn();
    wait_socket(&mut d, Duration::from_secs(600));
    let rt = tessera_e2e::rt();
    let c = d.client();
    for _ in 0..20 {
        if let Err(e) = rt.block_on(c.token(&TokenOptions::new(AUD))) {
            panic!("warm-up token: {e}\n{}", d.log_text());
        }
    }
    let pid = d.pid().to_string();
    let ctl = |arg: &str| {
        let st = std::process::Command::new("callgrind_control")
            .args([arg, &pid])
            .output()
            .expect("callgrind_control");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    };
    ctl("-z");
    for _ in 0..tokens_n {
        rt.block_on(c.token(&TokenOptions::new(AUD)))
            .expect("token");
    }
    ctl("-d");
    d.stop();
    // The dump after -z holds exactly the N tokens; its `totals:` line is Ir.
    let mut dumps: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".1"))
        .collect();
    dumps.sort();
    let mut total = 0u64;
    for f in &dumps {
        let text = std::fs::read_to_string(f).unwrap();
        if let Some(t) = text.lines().find_map(|l| l.strip_prefix("totals: ")) {
            total += t.split_whitespace().next().unwrap().parse::<u64>().unwrap();
        }
    }
    println!("| measurement | tokens | instructions (Ir) | per token |");
    println!("|---|---|---|---|");
    println!(
        "| tesserad (SoftHSM), 1 client, after 20 warm-up tokens | {tokens_n} | {total} | {} |",
        total / tokens_n as u64
    );
    for f in dumps {
        println!(
            "profile: callgrind_annotate --inclusive=yes {}",
            f.display()
        );
    }
}

/// Full TLS 1.3 handshakes with client authentication against an in-process rustls server
/// (software key), `clients` threads each doing `per_client` handshakes; the server answers
/// one byte after each handshake, so a handshake counts only once the server accepted it.
fn handshakes(
    server: Arc<tessera::tls::rustls::ServerConfig>,
    client: Arc<tessera::tls::rustls::ClientConfig>,
    clients: usize,
    per_client: usize,
) -> Stats {
    use std::io::{Read, Write};
    use tessera::tls::rustls;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let total = clients * per_client;
    let srv = std::thread::spawn(move || {
        let mut workers = vec![];
        for tcp in listener.incoming().take(total) {
            let server = server.clone();
            workers.push(std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(server).unwrap();
                let tcp = tcp.unwrap();
                // Small handshake flights: no Nagle/delayed-ACK stalls in the figures.
                tcp.set_nodelay(true).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut b = [0u8; 1];
                if tls.read_exact(&mut b).is_ok() {
                    let _ = tls.write_all(b"k");
                    let _ = tls.flush();
                }
            }));
        }
        for w in workers {
            let _ = w.join();
        }
    });
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                    tcp.set_nodelay(true).unwrap();
                    let conn = rustls::ClientConnection::new(
                        client.clone(),
                        "localhost".try_into().unwrap(),
                    )
                    .unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    tls.write_all(b"h").unwrap();
                    let mut b = [0u8; 1];
                    tls.read_exact(&mut b)
                        .expect("the server accepted the handshake");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = vec![];
    for t in threads {
        all.extend(t.join().unwrap());
    }
    let s = stats(all, t0.elapsed());
    srv.join().unwrap();
    s
}

/// `BENCH_TLS=N`: keyless mutual TLS handshakes (the agent's CertificateVerify signed by the
/// daemon in the device) beside the same handshakes with a software client key in-process.
fn tls_rows(n: usize) {
    use tessera::tls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer};
    let dir = shared_tempdir();
    for (name, eku) in [("srv", "serverAuth"), ("cli", "clientAuth")] {
        tessera_e2e::openssl_leaf(dir.path(), name, Some(eku));
    }
    let pem = |f: &str| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(dir.path().join(f))
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
    };
    let key =
        |f: &str| rustls::pki_types::PrivateKeyDer::from_pem_file(dir.path().join(f)).unwrap();
    let provider = tessera::tls::provider();
    println!(
        "| backend | measurement | n | p50 ms | p99 ms | per second | daemon p50 / raw sign p50 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for name in ["tpm", "pkcs11"] {
        let backend = if name == "tpm" {
            Backend::tpm()
        } else {
            Backend::pkcs11()
        };
        let raw = raw_sign(&backend, n);
        println!(
            "| {name} | raw key-store sign | {} | {} | {} | {:.0} | 1.0 |",
            raw.n,
            ms(raw.p50),
            ms(raw.p99),
            raw.per_sec
        );
        let d = Daemon::start_with(
            backend,
            Options {
                agents: vec![(
                    "bench".into(),
                    format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\nrate = 100000000\nproof_key = \"session\"\nsession_key_ttl = \"1h\"\n"),
                )],
                ..Default::default()
            },
        );
        let rt = tessera_e2e::rt();
        let mut roots = rustls::RootCertStore::empty();
        for c in
            CertificateDer::pem_slice_iter(rt.block_on(d.client().bundle()).unwrap().as_bytes())
        {
            roots.add(c.unwrap()).unwrap();
        }
        for c in pem("cli.pem") {
            roots.add(c).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(pem("srv.pem"), key("srv.key"))
            .unwrap();
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let server = Arc::new(server);
        let mut srv_roots = rustls::RootCertStore::empty();
        for c in pem("srv.pem") {
            srv_roots.add(c).unwrap();
        }
        let hardware = Arc::new(
            rt.block_on(tessera::tls::client_config(
                &d.client(),
                &tessera::tls::TlsOptions {
                    roots: Some(srv_roots.clone()),
                    ..Default::default()
                },
            ))
            .unwrap(),
        );
        // The same agent presenting its session key (`?key=session`): signed by the daemon in
        // memory, one device signature per key rotation.
        let session = Arc::new(
            rt.block_on(tessera::tls::client_config(
                &d.client(),
                &tessera::tls::TlsOptions {
                    roots: Some(srv_roots.clone()),
                    session_key: true,
                    ..Default::default()
                },
            ))
            .unwrap(),
        );
        let mut software = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(srv_roots)
            .with_client_auth_cert(pem("cli.pem"), key("cli.key"))
            .unwrap();
        software.resumption = rustls::client::Resumption::disabled();
        let software = Arc::new(software);
        handshakes(server.clone(), hardware.clone(), 2, 10); // warm up
        for clients in [1usize, 16] {
            for (label, cfg) in [
                (
                    "TLS 1.3 mTLS handshake, key in device (daemon signs)",
                    &hardware,
                ),
                (
                    "TLS 1.3 mTLS handshake, session key (daemon signs in memory)",
                    &session,
                ),
                ("TLS 1.3 mTLS handshake, software key in-process", &software),
            ] {
                let s = handshakes(server.clone(), cfg.clone(), clients, (n / clients).max(1));
                println!(
                    "| {name} | {label}, {clients} client(s) | {} | {} | {} | {:.0} | {:.1} |",
                    s.n,
                    ms(s.p50),
                    ms(s.p99),
                    s.per_sec,
                    s.p50.as_secs_f64() / raw.p50.as_secs_f64()
                );
            }
        }
    }
}

/// `FetchJWTSVID` over the Workload API beside `/v1/token` over the agent socket, same daemon
/// and run (issue 15: the gRPC door should cost no more than 1.2x the HTTP one). Each gRPC
/// client keeps its connection, as SPIFFE clients do; the socket client connects per request.
fn spiffe_rows(n: usize) {
    println!("| backend | measurement | n | p50 ms | p99 ms | per second | p50 / token p50 |");
    println!("|---|---|---|---|---|---|---|");
    for (name, b) in [("tpm", Backend::tpm()), ("pkcs11", Backend::pkcs11())] {
        let d = Daemon::start_with(
            b,
            Options {
                agents: vec![(
                    "bench".into(),
                    format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\nrate = 100000000\n"),
                )],
                ..Default::default()
            },
        );
        tokens(&d, 4, 50); // warm up
        for clients in [1usize, 16] {
            let per = (n / clients).max(1);
            let t = tokens(&d, clients, per);
            let socket = d.workload_socket();
            let g = timed_workers(clients, per, |_| {
                let socket = socket.clone();
                let client: Arc<tokio::sync::Mutex<Option<tessera_e2e::workload::Client>>> =
                    Arc::new(tokio::sync::Mutex::new(None));
                Box::new(move || {
                    let socket = socket.clone();
                    let client = client.clone();
                    async move {
                        let mut guard = client.lock().await;
                        if guard.is_none() {
                            *guard = Some(tessera_e2e::workload::connect(&socket).await);
                        }
                        let c = guard.as_mut().expect("client");
                        let r = c
                            .fetch_jwtsvid(tessera_e2e::workload::request(
                                tessera_e2e::workload::proto::JwtsvidRequest {
                                    audience: vec![AUD.into()],
                                    spiffe_id: String::new(),
                                },
                            ))
                            .await
                            .expect("FetchJWTSVID");
                        assert_eq!(r.into_inner().svids.len(), 1);
                    }
                })
            });
            for (label, s) in [
                (format!("token over socket, {clients} client(s)"), &t),
                (
                    format!("FetchJWTSVID over the Workload API, {clients} client(s)"),
                    &g,
                ),
            ] {
                println!(
                    "| {name} | {label} | {} | {} | {} | {:.0} | {:.2} |",
                    s.n,
                    ms(s.p50),
                    ms(s.p99),
                    s.per_sec,
                    s.p50.as_secs_f64() / t.p50.as_secs_f64()
                );
            }
        }
    }
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    if let Ok(k) = std::env::var("BENCH_TLS") {
        // BENCH_TLS=N: only the keyless-TLS handshake rows, N handshakes per measurement.
        tls_rows(k.parse().unwrap_or(1000));
        return;
    }
    if let Ok(k) = std::env::var("BENCH_SPIFFE") {
        // BENCH_SPIFFE=N: only FetchJWTSVID beside /v1/token, N requests per measurement.
        spiffe_rows(k.parse().unwrap_or(1000));
        return;
    }
    if let Ok(k) = std::env::var("BENCH_CALLGRIND") {
        callgrind(k.parse().unwrap_or(200));
        return;
    }
    if let Ok(k) = std::env::var("BENCH_AGENTS") {
        // BENCH_AGENTS=N: only the many-agents scenario (issue 18), on swtpm and SoftHSM.
        many_agents(k.parse().unwrap_or(10_000), n);
        return;
    }
    if let Ok(k) = std::env::var("BENCH_KILL_SWITCH") {
        // BENCH_KILL_SWITCH=N: only the kill switch with N agents, on swtpm and SoftHSM.
        let agents: usize = k.parse().unwrap_or(1000);
        println!("| backend | agents | enrol all at start (s) | RevokeAll call (ms) | return -> sample refused (ms) |");
        println!("|---|---|---|---|---|");
        for (name, b) in [("tpm", Backend::tpm()), ("pkcs11", Backend::pkcs11())] {
            let (enrol, call, cut) = kill_switch(b, agents);
            println!(
                "| {name} | {agents} | {:.1} | {} | {} |",
                enrol.as_secs_f64(),
                ms(call),
                ms(cut)
            );
        }
        return;
    }
    // The floors first, in this process and run: the device asked directly, and one synced
    // audit-sized append. Every daemon row is then set against (device sign + one sync).
    let fsync = {
        let dir = shared_tempdir();
        floors::fdatasync_append(dir.path(), n)
    };
    let fsync = stats(fsync.lat, fsync.wall);
    println!(
        "| backend | measurement | n | p50 ms | p99 ms | per second | p50 / floor p50 | per second / device sign rate |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| - | floor: 600-byte append + fdatasync | {} | {} | {} | {:.0} | - | - |",
        fsync.n,
        ms(fsync.p50),
        ms(fsync.p99),
        fsync.per_sec
    );
    for name in ["tpm", "pkcs11"] {
        let mk = || {
            if name == "tpm" {
                Backend::tpm()
            } else {
                Backend::pkcs11()
            }
        };
        let device = match mk() {
            Backend::Tpm(t) => {
                let (resident, reload, context) = floors::tpm_sign(&t, n);
                let (resident, reload, context) = (
                    stats(resident.lat, resident.wall),
                    stats(reload.lat, reload.wall),
                    stats(context.lat, context.wall),
                );
                for (label, s) in [
                    ("floor: TPM2_Sign, key resident (tss-esapi)", &resident),
                    ("floor: TPM2_Load + TPM2_Sign + flush", &reload),
                    ("floor: TPM2_ContextLoad + TPM2_Sign + flush", &context),
                ] {
                    println!(
                        "| tpm | {label} | {} | {} | {} | {:.0} | - | - |",
                        s.n,
                        ms(s.p50),
                        ms(s.p99),
                        s.per_sec
                    );
                }
                resident
            }
            Backend::Pkcs11(h) => {
                let s = floors::pkcs11_sign(&h, n);
                let s = stats(s.lat, s.wall);
                println!(
                    "| pkcs11 | floor: C_Sign (cryptoki, handle found once) | {} | {} | {} | {:.0} | - | - |",
                    s.n,
                    ms(s.p50),
                    ms(s.p99),
                    s.per_sec
                );
                s
            }
        };
        let floor = device.p50 + fsync.p50;
        let row = |label: &str, s: &Stats| {
            println!(
                "| {name} | {label} | {} | {} | {} | {:.0} | {:.2} | {:.0} % |",
                s.n,
                ms(s.p50),
                ms(s.p99),
                s.per_sec,
                s.p50.as_secs_f64() / floor.as_secs_f64(),
                100.0 * s.per_sec / device.per_sec
            );
        };
        let raw = raw_sign(&mk(), n);
        row("raw key-store sign (tessera's store, no daemon)", &raw);
        let d = Daemon::start_with(
            mk(),
            Options {
                agents: vec![(
                    "bench".into(),
                    format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\nrate = 100000000\n"),
                )],
                ..Default::default()
            },
        );
        tokens(&d, 4, 50); // warm up (exe hash cache, key load)
        let (revoke, cutoff) = revocation(&mk, 50);
        row("Revoke call (record + key destroyed in device)", &revoke);
        row("Revoke returned -> first refused token", &cutoff);
        for clients in [1usize, 16] {
            let s = tokens(&d, clients, (n / clients).max(1));
            row(&format!("token over socket, {clients} client(s)"), &s);
        }
        for clients in [1usize, 16] {
            for (what, label) in [
                (Credential::Dpop, "DPoP proof (hardware key)"),
                (
                    Credential::HttpSignature,
                    "RFC 9421 signature (hardware key)",
                ),
            ] {
                let s = credentials(&d, what, clients, (n / clients).max(1));
                row(&format!("{label}, {clients} client(s)"), &s);
            }
        }
        {
            // The same proofs by a session key (policy proof_key = "session"): one device
            // signature per bound token, the proofs in software.
            let ds = Daemon::start_with(
                mk(),
                Options {
                    agents: vec![(
                        "bench-session".into(),
                        format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\nrate = 100000000\nproof_key = \"session\"\nsession_key_ttl = \"1h\"\n"),
                    )],
                    ..Default::default()
                },
            );
            tokens(&ds, 1, 10);
            for clients in [1usize, 16] {
                let s = credentials(&ds, Credential::Dpop, clients, (n / clients).max(1));
                row(
                    &format!("DPoP proof (session key), {clients} client(s)"),
                    &s,
                );
            }
        }
        for (what, label, per) in [
            (
                Credential::Certificate,
                "agent certificate over socket",
                n / 4,
            ),
            (
                Credential::Attestation,
                "attestation evidence over socket",
                n / 10,
            ),
        ] {
            let s = credentials(&d, what, 1, per.max(1));
            row(&format!("{label}, 1 client(s)"), &s);
        }
    }
    for writers in [1usize, 16] {
        let s = audit_only(writers, (n / writers).max(1));
        println!(
            "| - | audit record (write + fdatasync), {writers} writer(s) | {} | {} | {} | {:.0} | - | - |",
            s.n,
            ms(s.p50),
            ms(s.p99),
            s.per_sec
        );
    }
}
