//! TLS for real. A throwaway CA, made at test time, signs a server certificate for
//! `localhost` / 127.0.0.1; the stub analytics API is served over HTTPS with it, and a
//! TLS-terminating proxy in front of the local RabbitMQ (which is left as it is) serves
//! `amqps://` with it. With the CA named in `ANALYTICS_CA_FILE` / `AMQP_CA_FILE` every
//! record arrives; without it the certificate is refused at once, and the error says so.

use crate::harness::TestApp;
use crate::harness::{
    InProcess, KEY, assert_books_balance, assert_delivered_all, expected_full, history, seeded_db,
    settings_for, small, wait_syncs_finished,
};
use crate::support::{amqp_url, wait_for};
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest};
use loansync::queue::amqp::Broker;
use loansync::queue::memory::MemoryQueue;
use loansync::sink::AnalyticsClient;
use loansync::stub_api::{self, Faults, StubConfig, StubHandle};
use secrecy::ExposeSecret;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// A CA and a `localhost` server certificate signed by it, generated for one test. The
/// CA's certificate is written to a file of its own (removed on drop); no key touches
/// the disk.
struct TestCa {
    dir: PathBuf,
    /// The CA certificate (PEM), as `ANALYTICS_CA_FILE` / `AMQP_CA_FILE` name it.
    ca_file: PathBuf,
    /// Presents the server certificate (and the CA above it).
    acceptor: TlsAcceptor,
}

impl TestCa {
    fn new() -> TestCa {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "loansync throwaway test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.der().clone(), ca_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
            )
            .unwrap();

        let dir = std::env::temp_dir().join(format!("loansync-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        TestCa {
            dir,
            ca_file,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }
    }

    fn ca_path(&self) -> &str {
        self.ca_file.to_str().expect("utf-8 temp path")
    }

    /// A file of this test's directory holding `text`.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().expect("utf-8 temp path").to_string()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// TLS handshakes a server saw, by outcome.
#[derive(Default)]
struct Handshakes {
    accepted: AtomicU32,
    /// Handshakes that failed: here, clients that refused the certificate.
    refused: AtomicU32,
}

impl Handshakes {
    fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::SeqCst)
    }
    fn refused(&self) -> u32 {
        self.refused.load(Ordering::SeqCst)
    }
}

/// Accepts TCP connections on `listener`, completes the TLS handshake of each on a task
/// of its own (one slow client holds up no other), counts the outcomes and hands every
/// established session to `serve`. Aborting the returned task ends every session.
fn terminate_tls<F, Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    counts: Arc<Handshakes>,
    serve: F,
) -> JoinHandle<()>
where
    F: Fn(TlsStream<TcpStream>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        let mut sessions = JoinSet::new();
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let (acceptor, counts, serve) = (acceptor.clone(), counts.clone(), serve.clone());
            sessions.spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        counts.accepted.fetch_add(1, Ordering::SeqCst);
                        serve(tls, peer).await;
                    }
                    Err(_) => {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
            while sessions.try_join_next().is_some() {}
        }
    })
}

/// The established TLS sessions of [`terminate_tls`], as a listener the stub API serves.
struct TlsSessions {
    addr: SocketAddr,
    sessions: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl axum::serve::Listener for TlsSessions {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.sessions.recv().await {
            Some(session) => session,
            // The TLS side stopped: no more connections, ever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// The stub analytics API over HTTPS on a loopback port, presenting the test CA's
/// certificate.
struct HttpsStub {
    stub: StubHandle,
    handshakes: Arc<Handshakes>,
    tls: JoinHandle<()>,
}

impl HttpsStub {
    async fn start(ca: &TestCa) -> HttpsStub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Handshakes::default());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tls = terminate_tls(
            listener,
            ca.acceptor.clone(),
            handshakes.clone(),
            move |session, peer| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((session, peer)).await;
                }
            },
        );
        let stub = stub_api::spawn_on(
            StubConfig {
                api_key: KEY.into(),
                faults: Faults::default(),
            },
            TlsSessions { addr, sessions: rx },
        )
        .unwrap();
        HttpsStub {
            stub,
            handshakes,
            tls,
        }
    }

    /// By name, as the certificate says.
    fn url(&self) -> String {
        format!("https://localhost:{}", self.stub.addr.port())
    }
}

impl Drop for HttpsStub {
    fn drop(&mut self) {
        self.tls.abort();
    }
}

/// A TLS-terminating proxy in front of the local RabbitMQ: `amqps://` on a loopback
/// port with the test CA's certificate, plain AMQP to the broker.
struct AmqpsProxy {
    port: u16,
    handshakes: Arc<Handshakes>,
    task: JoinHandle<()>,
}

impl AmqpsProxy {
    async fn start(ca: &TestCa) -> AmqpsProxy {
        let broker = url::Url::parse(&amqp_url()).unwrap();
        let upstream = format!(
            "{}:{}",
            broker.host_str().unwrap_or("127.0.0.1"),
            broker.port().unwrap_or(5672)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(Handshakes::default());
        let task = terminate_tls(
            listener,
            ca.acceptor.clone(),
            handshakes.clone(),
            move |mut session, _| {
                let upstream = upstream.clone();
                async move {
                    if let Ok(mut plain) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut session, &mut plain).await;
                    }
                }
            },
        );
        AmqpsProxy {
            port,
            handshakes,
            task,
        }
    }

    /// The local broker's credentials and vhost, over TLS, by the certificate's name.
    fn url(&self) -> String {
        let mut u = url::Url::parse(&amqp_url()).unwrap();
        u.set_scheme("amqps").unwrap();
        u.set_host(Some("localhost")).unwrap();
        u.set_port(Some(self.port)).unwrap();
        u.to_string()
    }
}

impl Drop for AmqpsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_https_api_trusted_through_analytics_ca_file_receives_every_record() {
    let ca = TestCa::new();
    let api = HttpsStub::start(&ca).await;
    let db = seeded_db(small()).await;
    let settings = settings_for(&db, &api.url(), &[("ANALYTICS_CA_FILE", ca.ca_path())]);

    let summary =
        loansync::app::sync_in_process(&db.pool, &settings, &crate::harness::full_request())
            .await
            .unwrap();
    assert_eq!(summary.exit_code(), 0, "{}", summary.render());
    let expected = expected_full(&db.pool).await;
    let received = api.stub.received();
    assert_delivered_all(&received, &expected);
    assert_eq!(received.forbidden, 0);
    assert!(api.handshakes.accepted() >= 1, "nothing came over TLS");
    assert_eq!(api.handshakes.refused(), 0);
    assert_books_balance(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_ca_the_api_certificate_is_refused_at_once_and_the_records_can_be_retried() {
    let ca = TestCa::new();
    let api = HttpsStub::start(&ca).await;
    let db = seeded_db(small()).await;
    // A long retry budget: a refused certificate must not spend it.
    let untrusting = settings_for(
        &db,
        &api.url(),
        &[
            ("ETL_RETRY_MAX_ELAPSED_SECS", "120"),
            ("ETL_WORKER_CONCURRENCY", "2"),
        ],
    );
    // Well inside one retry budget: were the refusal retried, this would time out.
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        loansync::app::sync_in_process(&db.pool, &untrusting, &crate::harness::full_request()),
    )
    .await
    .expect("the refused certificate was retried instead of failing at once")
    .unwrap();
    assert_eq!(
        summary.exit_code(),
        loansync::app::EXIT_FAILED,
        "{}",
        summary.render()
    );

    // Nothing reached the API: every connection ended in the handshake.
    let received = api.stub.received();
    assert_eq!(received.requests(), 0, "{received:?}");
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM loansync_chunk")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // The server learns of a refusal a moment after the client: wait for the count.
    wait_for(
        "every refused handshake counted",
        Duration::from_secs(10),
        || async { i64::from(api.handshakes.refused()) >= chunks },
    )
    .await;
    assert_eq!(api.handshakes.accepted(), 0);
    assert_eq!(
        i64::from(api.handshakes.refused()),
        chunks,
        "one refused handshake per chunk: no retries"
    );

    // Visible: the sync failed and says where to look; every record has an error row
    // naming the certificate, the reason and the setting, after a single attempt.
    let h = history(&db.pool).await;
    assert_eq!(h[0].status, "failed");
    assert!(
        h[0].error_message
            .as_deref()
            .is_some_and(|m| m.contains("etl_folder_etlsyncerror")),
        "{:?}",
        h[0].error_message
    );
    let rows: Vec<(String, String, String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT entity_type::text, entity_id::text, error_code::text, error_message, error_details \
         FROM etl_folder_etlsyncerror",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected = expected_full(&db.pool).await;
    let all: usize = expected.values().map(BTreeSet::len).sum();
    assert_eq!(rows.len(), all, "one error row per record");
    for (entity, id, code, message, details) in &rows {
        assert_eq!(code, "TLS_CERTIFICATE_REFUSED", "{entity} {id}");
        assert!(
            message.contains("TLS certificate was refused")
                && message.contains("invalid peer certificate")
                && message.contains("ANALYTICS_CA_FILE"),
            "{message}"
        );
        assert_eq!(details["attempts"], 1, "{details}");
    }
    let marks: i64 = sqlx::query_scalar("SELECT count(*) FROM etl_folder_etllastsync")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(marks, 0, "a failed sync moves no watermark");

    // Once the CA is trusted, `errors retry` delivers every one of them.
    let trusting = settings_for(&db, &api.url(), &[("ANALYTICS_CA_FILE", ca.ca_path())]);
    let queue = MemoryQueue::new();
    loansync::planner::plan_retry(&db.pool, &trusting, &[], &queue)
        .await
        .unwrap();
    let ctx = Arc::new(loansync::app::worker_context(&trusting, db.pool.clone()).unwrap());
    loansync::worker::run_memory(ctx, queue, 2).await;
    let received = api.stub.received();
    assert_delivered_all(&received, &expected);
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM etl_folder_etlsyncerror WHERE NOT resolved")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(open, 0, "the retry resolves every error row");
    assert_books_balance(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_or_garbage_ca_file_is_a_clear_start_up_error() {
    let ca = TestCa::new();
    let db = TestApp::migrated().await;
    let missing = ca.dir.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let garbage = ca.write("garbage.pem", "this is not a certificate\n");
    let bad_block = ca.write(
        "bad-block.pem",
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    let settings = |pairs: &[(&str, &str)]| {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| env.get(k).cloned())
    };
    for name in ["ANALYTICS_CA_FILE", "AMQP_CA_FILE"] {
        for (path, says) in [
            (missing, "cannot read"),
            (garbage.as_str(), "holds no PEM certificate"),
            (bad_block.as_str(), "is not usable as a CA"),
        ] {
            let err = settings(&[(name, path)]).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{name}: ")) && err.contains(path) && err.contains(says),
                "{name}={path}: {err}"
            );
        }
        assert!(settings(&[(name, ca.ca_path())]).is_ok(), "{name}");
    }

    // The client, given settings that skipped that check, refuses text without a
    // certificate too.
    let mut api = settings(&[]).unwrap().api().unwrap().clone();
    api.ca_pem = Some("this is not a certificate\n".into());
    let err = match AnalyticsClient::new(&api) {
        Ok(_) => panic!("a client was built without a CA certificate"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.starts_with("ANALYTICS_CA_FILE: ") && err.contains("no PEM certificate"),
        "{err}"
    );

    // The real commands stop before doing anything, exit 1, and say why.
    for (args, name, path, says) in [
        (
            &["sync", "--full"][..],
            "ANALYTICS_CA_FILE",
            garbage.as_str(),
            "holds no PEM certificate",
        ),
        (&["worker"][..], "AMQP_CA_FILE", missing, "cannot read"),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loansync"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", amqp_url())
            .env("ETL_QUEUE_PREFIX", db.queue_prefix())
            .env(name, path)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("configuration error: {name}: ")) && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
    assert!(history(&db.pool).await.is_empty(), "nothing was planned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_sync_over_amqps_with_amqp_ca_file() {
    let ca = TestCa::new();
    let proxy = AmqpsProxy::start(&ca).await;
    let api = HttpsStub::start(&ca).await;
    let db = seeded_db(small()).await;
    let amqps = proxy.url();
    let settings = Arc::new(settings_for(
        &db,
        &api.url(),
        &[
            ("AMQP_URL", amqps.as_str()),
            ("AMQP_CA_FILE", ca.ca_path()),
            ("ANALYTICS_CA_FILE", ca.ca_path()),
        ],
    ));
    assert!(settings.amqp_url.expose_secret().starts_with("amqps://"));

    let running = InProcess::start(&db, &settings).await;

    // The trigger goes through the proxy as well.
    let admin = Broker::connect_with_ca(
        &amqps,
        &settings.queue_prefix,
        7,
        settings.amqp_ca_pem.as_deref(),
    )
    .await
    .unwrap();
    admin
        .publish_json(
            &admin.topology.plan,
            &[PlanRequest {
                request_id: Some("amqps-1".into()),
                ..crate::harness::full_request()
            }],
        )
        .await
        .unwrap();
    admin.close().await;

    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed", "{:?}", h[0].error_message);
    let expected = expected_full(&db.pool).await;
    let received = api.stub.received();
    for e in EntityKind::ALL {
        assert_eq!(received.ids(e), expected[&e], "{e}");
        let n = expected[&e].len() as i32;
        assert_eq!(h[0].counts(e), (n, n, 0), "{e}: total, success, failed");
    }
    // Planner, two workers and the trigger: every broker connection was TLS.
    assert!(
        proxy.handshakes.accepted() >= 4,
        "{}",
        proxy.handshakes.accepted()
    );
    assert_eq!(proxy.handshakes.refused(), 0);
    assert_books_balance(&db.pool).await;

    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqps_without_amqp_ca_file_is_refused_with_a_clear_error() {
    let ca = TestCa::new();
    let proxy = AmqpsProxy::start(&ca).await;
    let db = TestApp::migrated().await;
    let amqps = proxy.url();
    let settings = Arc::new(settings_for(
        &db,
        "http://127.0.0.1:1",
        &[("AMQP_URL", amqps.as_str())],
    ));

    let err = match Broker::connect_with_ca(&amqps, &settings.queue_prefix, 7, None).await {
        Ok(_) => panic!("connected to a broker whose certificate nothing vouches for"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("the broker's TLS certificate was refused")
            && err.contains("invalid peer certificate")
            && err.contains("AMQP_CA_FILE"),
        "{err}"
    );
    assert!(
        err.contains(&format!("amqps://guest:***@localhost:{}", proxy.port))
            && !err.contains("guest:guest"),
        "the password must be redacted: {err}"
    );
    // The proxy learns of the refusal a moment after the client: wait for the count.
    wait_for(
        "the refused handshake counted",
        Duration::from_secs(10),
        || async { proxy.handshakes.refused() >= 1 },
    )
    .await;
    assert_eq!(proxy.handshakes.accepted(), 0);
    assert_eq!(proxy.handshakes.refused(), 1);

    // A worker keeps trying (each attempt refused) and never reports itself ready.
    let stop = CancellationToken::new();
    let consuming = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(loansync::app::run_worker(
        db.pool.clone(),
        settings.clone(),
        consuming.clone(),
        stop.clone(),
    ));
    wait_for("two refused attempts", Duration::from_secs(20), || async {
        proxy.handshakes.refused() >= 3
    })
    .await;
    assert!(!consuming.load(Ordering::SeqCst), "ready without a broker");
    assert_eq!(proxy.handshakes.accepted(), 0);
    stop.cancel();
    worker.await.unwrap().unwrap();
}
