//! TLS rules, each against real processes on 127.0.0.1 with certificates from
//! `tessera certs`:
//! - the public API over TLS serves clients that trust its CA (`--ca-cert`) and fails, naming
//!   the certificate, for clients that do not;
//! - the coordinator's registration listener and every worker's `Worker` service refuse a
//!   caller without a certificate, or with one another CA signed, before any RPC;
//! - a worker refuses a coordinator whose certificate another CA signed;
//! - once the collectives formed, a worker listens on nothing but its `Worker` service, so
//!   no foreign peer reaches a collective (a peer without the generation's token is turned
//!   away while they form: `collective::tcp::tests::intruders_are_turned_away_and_the_group_still_forms`).

mod cluster_common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster_common::{children, listening_ports, tessera, Proc};
use tessera_client::{Client, ClientError, ClientOptions, GenerateRequest};
use tessera_proto::worker::v1::cluster_client::ClusterClient;
use tessera_proto::worker::v1::worker_client::WorkerClient;
use tessera_proto::worker::v1::{HealthRequest, RegisterRequest};
use tessera_tls::{ClusterTlsFiles, CLUSTER_SERVER_NAME};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

/// `tessera certs --out DIR --node coordinator --node worker`: a CA of its own per call.
fn certs(dir: &Path) -> PathBuf {
    let out = tessera()
        .args(["certs", "--out"])
        .arg(dir)
        .args(["--node", "coordinator", "--node", "worker", "--days", "1"])
        .output()
        .expect("tessera certs");
    assert!(
        out.status.success(),
        "tessera certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("--cluster-ca"),
        "it prints the flags:\n{stdout}"
    );
    dir.to_path_buf()
}

fn file(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// The cluster flags of node `node` of the certificates in `dir`.
fn node_flags(dir: &Path, ca: &Path, node: &str) -> Vec<String> {
    vec![
        "--cluster-ca".into(),
        file(ca, "ca.pem"),
        "--cluster-cert".into(),
        file(dir, &format!("{node}.pem")),
        "--cluster-key".into(),
        file(dir, &format!("{node}-key.pem")),
    ]
}

/// A process whose stderr goes to a file, read at the end.
struct Logged {
    proc: Proc,
    log: PathBuf,
}

impl Logged {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing `text`.
    fn wait_log(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no `{text}` in the log within {timeout:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `tessera ARGS` with stderr into `dir/NAME.log` and stdout piped; returns the
/// process and the stdout lines, as they come.
fn start(dir: &Path, name: &str, args: &[String]) -> (Logged, mpsc::Receiver<String>) {
    let log = dir.join(format!("{name}.log"));
    let mut cmd = tessera();
    cmd.env("RUST_LOG", "warn")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().expect("tessera starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (
        Logged {
            proc: Proc(child),
            log,
        },
        rx,
    )
}

/// The text after `prefix` on the first line of `lines` that has it.
fn find(lines: &mpsc::Receiver<String>, prefix: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some((_, rest)) = line.split_once(prefix) {
                    return rest.trim().to_string();
                }
            }
            Err(_) => panic!("no line with `{prefix}` within {timeout:?}"),
        }
    }
}

/// A channel to `addr` over TLS that trusts `ca` and checks the cluster's name, presenting
/// `member`'s certificate when given.
async fn cluster_channel(
    addr: &str,
    ca: &Path,
    member: Option<&ClusterTlsFiles>,
) -> Result<Channel, tonic::transport::Error> {
    let tls = match member {
        Some(files) => files.load().expect("member files").client_tls(),
        None => ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
            .domain_name(CLUSTER_SERVER_NAME),
    };
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Calls `Health` on a worker's service, as [`answered`] tells.
async fn worker_health(channel: Result<Channel, tonic::transport::Error>) -> Result<Code, String> {
    let channel = channel.map_err(|e| format!("{e:?}"))?;
    answered(
        WorkerClient::new(channel)
            .health(HealthRequest { generation: 1 })
            .await,
    )
}

/// Calls `Register` on a registration listener, like [`worker_health`].
async fn register(channel: Result<Channel, tonic::transport::Error>) -> Result<Code, String> {
    let channel = channel.map_err(|e| format!("{e:?}"))?;
    let request = RegisterRequest {
        port: 9,
        advertise_host: "127.0.0.1".into(),
        backend: "cpu".into(),
        threads: 1,
        hostname: "intruder".into(),
        memory_available_bytes: 1 << 30,
        pid: 0,
    };
    answered(ClusterClient::new(channel).register(request).await)
}

/// `Ok(code)` when the service answered the call (whatever it said); `Err` when the call
/// never reached it: a status that tonic made of a transport error carries that error as
/// its source, one the service sent has none.
fn answered<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<Code, String> {
    match result {
        Ok(_) => Ok(Code::Ok),
        Err(s) if std::error::Error::source(&s).is_some() => Err(format!("{s:?}")),
        Err(s) => Ok(s.code()),
    }
}

fn plaintext(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_clients_that_trust_it_and_refuses_strangers() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = certs(&tmp.path().join("ours"));
    let theirs = certs(&tmp.path().join("theirs"));
    let ca = ours.join("ca.pem");
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--threads",
        "2",
        "--tls-cert",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        file(&ours, "server.pem"),
        "--tls-key".into(),
        file(&ours, "server-key.pem"),
    ]);
    args.extend(node_flags(&ours, &ours, "coordinator"));
    let (serve, lines) = start(tmp.path(), "serve", &args);
    let grpc = find(&lines, "gRPC API:", Duration::from_secs(60));
    let grpc = grpc.split_whitespace().next().unwrap().to_string();
    let http = find(&lines, "OpenAI API:", Duration::from_secs(5));
    let http = http.split_whitespace().next().unwrap().to_string();
    let registration = find(&lines, "registering at", Duration::from_secs(5));
    assert!(grpc.starts_with("https://127.0.0.1:"), "{grpc}");
    assert!(http.starts_with("https://127.0.0.1:"), "{http}");

    // The public API, over TLS, for a client that trusts the CA.
    let trusting = ClientOptions {
        ca_cert: Some(ca.clone()),
        ..ClientOptions::default()
    };
    let mut client = Client::connect_with(&grpc, trusting.clone()).await.unwrap();
    let request = GenerateRequest {
        prompt_ids: vec![464, 13, 7],
        max_tokens: Some(4),
        ignore_eos: true,
        ..Default::default()
    };
    let tokens = client.generate(request.clone()).await.unwrap().token_ids;
    assert_eq!(tokens.len(), 4);
    let cli = tessera()
        .args(["generate", "--endpoint", &grpc, "--prompt-ids", "464,13,7"])
        .args(["--max-tokens", "4", "--ignore-eos", "--json", "--ca-cert"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(String::from_utf8_lossy(&cli.stdout).contains("\"completion_tokens\":4"));
    let pem = std::fs::read(&ca).unwrap();
    let https = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let models = https.get(format!("{http}/models")).send().await.unwrap();
    assert_eq!(models.status(), 200);

    // Clients that do not trust it: the error says it is the certificate.
    let e = Client::connect(&grpc).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Connect { reason, .. } if reason.contains("the server's certificate was refused")),
        "{e}"
    );
    let other_ca = ClientOptions {
        ca_cert: Some(theirs.join("ca.pem")),
        ..ClientOptions::default()
    };
    let e = Client::connect_with(&grpc, other_ca).await.unwrap_err();
    assert!(e.to_string().contains("not signed by a trusted CA"), "{e}");
    let cli = tessera()
        .args(["generate", "--endpoint", &grpc, "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!cli.status.success());
    assert!(
        String::from_utf8_lossy(&cli.stderr).contains("certificate was refused"),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let plain = grpc.replace("https://", "http://");
    let plain_answer = match Client::connect(&plain).await {
        Ok(mut c) => c.model_info().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(plain_answer.is_err(), "no plaintext on a TLS port");
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("{http}/models"))
        .send()
        .await
        .is_err());

    // Registration: only members get an answer (a member is told the cluster is full).
    let member = ClusterTlsFiles {
        ca: ca.clone(),
        cert: ours.join("worker.pem"),
        key: ours.join("worker-key.pem"),
    };
    let foreign = ClusterTlsFiles {
        ca: theirs.join("ca.pem"),
        cert: theirs.join("worker.pem"),
        key: theirs.join("worker-key.pem"),
    };
    assert_eq!(
        register(cluster_channel(&registration, &ca, Some(&member)).await).await,
        Ok(Code::ResourceExhausted)
    );
    let refused = [
        register(plaintext(&registration)).await,
        register(cluster_channel(&registration, &ca, None).await).await,
        register(cluster_channel_as(&registration, &ca, &foreign).await).await,
    ];
    for r in &refused {
        assert!(
            r.is_err(),
            "registration without a member's certificate: {r:?}"
        );
    }
    let public = Endpoint::from_shared(grpc.clone())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pem)))
        .unwrap()
        .connect()
        .await;
    assert_eq!(
        register(public).await,
        Ok(Code::Unimplemented),
        "the public listener does not serve registration"
    );
    let log = serve.wait_log("presented no certificate", Duration::from_secs(5));
    assert!(
        log.contains("worker registration: refused a TLS connection from 127.0.0.1:")
            && log.contains("the client's certificate was refused: not signed by a trusted CA"),
        "{log}"
    );

    // Every worker's service: the same rules; the coordinator is the only member calling.
    let workers = children(serve.proc.pid());
    assert_eq!(workers.len(), 2);
    for pid in workers {
        let ports = listening_ports(pid);
        assert_eq!(
            ports.len(),
            1,
            "once its collectives formed, worker {pid} listens only on its service: {ports:?}"
        );
        let at = format!("127.0.0.1:{}", ports[0]);
        let answered = worker_health(cluster_channel(&at, &ca, Some(&member)).await).await;
        assert!(
            answered.is_ok(),
            "a member reaches the service: {answered:?}"
        );
        for r in [
            worker_health(plaintext(&at)).await,
            worker_health(cluster_channel(&at, &ca, None).await).await,
            worker_health(cluster_channel_as(&at, &ca, &foreign).await).await,
        ] {
            assert!(
                r.is_err(),
                "worker {pid} without a member's certificate: {r:?}"
            );
        }
    }

    let log = serve.wait_log("worker service: refused", Duration::from_secs(5));
    assert!(
        log.contains("worker service: refused a TLS connection from 127.0.0.1:")
            && log.contains("the client presented no certificate"),
        "{log}"
    );

    // None of it disturbed the cluster.
    assert_eq!(client.generate(request).await.unwrap().token_ids, tokens);
}

/// Like [`cluster_channel`] with `presenting`'s certificate, trusting `ca` (not
/// `presenting`'s own CA): a node of another cluster that knows this one's CA.
async fn cluster_channel_as(
    addr: &str,
    ca: &Path,
    presenting: &ClusterTlsFiles,
) -> Result<Channel, tonic::transport::Error> {
    let theirs = presenting.load().expect("their files");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .identity(theirs.identity().to_tonic())
        .domain_name(CLUSTER_SERVER_NAME);
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[test]
fn workers_and_coordinators_of_different_clusters_refuse_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = certs(&tmp.path().join("ours"));
    let theirs = certs(&tmp.path().join("theirs"));
    let mut args: Vec<String> = [
        "coordinator",
        "--preset",
        "gpt2-tiny",
        "--listen",
        "127.0.0.1:0",
        "--cluster-listen",
        "127.0.0.1:0",
        "--register-timeout",
        "60",
    ]
    .map(String::from)
    .to_vec();
    args.extend(node_flags(&ours, &ours, "coordinator"));
    let log = tmp.path().join("coordinator.log");
    let coordinator = Logged {
        proc: Proc(
            tessera()
                .args(&args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ),
        log,
    };
    let line = coordinator.wait_log("--coordinator ", Duration::from_secs(30));
    let registration = line
        .split_once("--coordinator ")
        .unwrap()
        .1
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    let worker = |flags: Vec<String>| {
        let started = Instant::now();
        let out = tessera()
            .env("RUST_LOG", "error")
            .args(["worker", "--coordinator", &registration])
            .args(["--listen", "127.0.0.1:0", "--threads", "1"])
            .args(["--coordinator-timeout", "20"])
            .args(flags)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "refused at once, not after retrying: {:?}",
            started.elapsed()
        );
        String::from_utf8(out.stderr).unwrap()
    };
    // A worker of another cluster does not trust this coordinator.
    let e = worker(node_flags(&theirs, &theirs, "worker"));
    assert!(
        e.contains(&format!(
            "cannot register with the coordinator at {registration}: the coordinator's \
             certificate was refused: not signed by a trusted CA"
        )),
        "{e}"
    );
    let log = coordinator.wait_log("refused this node's certificate", Duration::from_secs(5));
    assert!(log.contains("(alert UnknownCA)"), "{log}");
    // A worker trusting this cluster's CA with another's certificate stops before it
    // dials: its certificate is not one this cluster takes.
    let e = worker(node_flags(&theirs, &ours, "worker"));
    assert!(
        e.contains("not a cluster node's certificate under the CA")
            && e.contains("not signed by a trusted CA"),
        "{e}"
    );
    // The coordinator, for its part, takes no other CA's certificate: the test above
    // presents one to its registration listener directly.
    drop(coordinator);
}

#[test]
fn unusable_tls_settings_are_named_before_anything_listens() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.pem").display().to_string();
    let out = tessera()
        .args([
            "coordinator",
            "--preset",
            "gpt2-tiny",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--tls-cert", &missing, "--tls-key", &missing])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("TLS: ") && e.contains(&missing), "{e}");

    let out = tessera()
        .args([
            "worker",
            "--coordinator",
            "127.0.0.1:1",
            "--cluster-ca",
            &missing,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--cluster-cert") && e.contains("--cluster-key"),
        "{e}"
    );

    let out = tessera()
        .args(["generate", "--endpoint", "127.0.0.1:1", "--prompt", "x"])
        .args(["--ca-cert", &missing])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("a CA certificate is for https:// endpoints"),
        "{e}"
    );
}
