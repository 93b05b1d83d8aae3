//! A transaction pooler in front of the local PostgreSQL, as PgBouncer with
//! `pool_mode = transaction` and trust auth behaves: each transaction of a client
//! connection runs on whichever server connection is free. `loansync check` fails its
//! `pooling` line through it, and the planner refuses to plan behind it.
//!
//! The double, in brief: it answers SSLRequest with `N`, takes the client's
//! StartupMessage, and opens its `servers` server connections with the first client's
//! startup message (every client of a test uses one database and user; PgBouncer's
//! `min_pool_size` opens them ahead too); the server's greeting (AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery) is
//! replayed to each client. A server connection is assigned to a client when the client
//! sends a message, and goes back to the pool when every Sync and Query sent to it has
//! been answered by a ReadyForQuery whose status is `I` (idle, no transaction open). A
//! client's Terminate is not forwarded. Prepared statements are not tracked (PgBouncer
//! before 1.21 does not either): a statement prepared on one backend is missing on the
//! next. No cancel requests, no COPY, no authentication other than trust.

use crate::harness::{TestApp, settings_for};
use crate::support::{amqp_url, wait_for};
use bytes::{Buf, Bytes, BytesMut};
use loansync::failure::{Classify, Failure};
use loansync::ledger::lifecycle::PlanningLock;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Which free server connection a client is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The most recently used (PgBouncer's default, `server_round_robin = 0`).
    Lifo,
    /// The one free longest (`server_round_robin = 1`).
    RoundRobin,
}

pub struct Pooler {
    pub port: u16,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Pooler {
    /// A pooler on a loopback port in front of `upstream`, with at most `servers`
    /// server connections.
    pub async fn start(upstream: SocketAddr, servers: usize, order: Order) -> Pooler {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            upstream,
            order,
            size: servers,
            startup: OnceLock::new(),
            greeting: tokio::sync::OnceCell::new(),
            idle: Mutex::default(),
            free: Arc::new(Semaphore::new(servers)),
        });
        let stop = CancellationToken::new();
        let (accepting, stopped) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                };
                let (shared, stopped) = (accepting.clone(), stopped.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stopped.cancelled() => {}
                        _ = serve(shared, client) => {}
                    }
                });
            }
        });
        Pooler { port, shared, stop }
    }

    /// `url` with its host and port replaced by the pooler's.
    pub fn url(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(self.port)).unwrap();
        u.to_string()
    }
}

impl Drop for Pooler {
    /// Every connection closed: PostgreSQL ends the server sessions, and with them any
    /// advisory lock left on them.
    fn drop(&mut self) {
        self.stop.cancel();
        self.shared.idle.lock().unwrap().clear();
    }
}

struct Shared {
    upstream: SocketAddr,
    order: Order,
    /// How many server connections there are.
    size: usize,
    /// The first client's StartupMessage: every server connection is opened with it.
    startup: OnceLock<Bytes>,
    /// What the first server connection answered to it, up to its first ReadyForQuery;
    /// set once all the server connections are open.
    greeting: tokio::sync::OnceCell<Bytes>,
    /// Server connections no client holds.
    idle: Mutex<VecDeque<Wire>>,
    /// One permit per server connection that may be assigned: idle ones hold none, so
    /// idle + assigned never exceeds the pool's size.
    free: Arc<Semaphore>,
}

/// A server connection assigned to a client.
struct Assigned {
    server: Wire,
    _permit: OwnedSemaphorePermit,
}

impl Shared {
    /// A free server connection (waiting for one if all are assigned), or a new one.
    async fn take(&self) -> std::io::Result<Assigned> {
        let permit = self.free.clone().acquire_owned().await.unwrap();
        let idle = {
            let mut idle = self.idle.lock().unwrap();
            match self.order {
                Order::Lifo => idle.pop_back(),
                Order::RoundRobin => idle.pop_front(),
            }
        };
        let server = match idle {
            Some(server) => server,
            // One closed while its client was inside a transaction: replaced.
            None => self.open().await?.0,
        };
        Ok(Assigned {
            server,
            _permit: permit,
        })
    }

    /// Back to the pool, most recently used last.
    fn give_back(&self, assigned: Assigned) {
        self.idle.lock().unwrap().push_back(assigned.server);
    }

    /// Opens every server connection, all idle; returns the first one's greeting.
    async fn warm(&self) -> std::io::Result<Bytes> {
        let mut greeting = None;
        for _ in 0..self.size {
            let (server, hello) = self.open().await?;
            greeting.get_or_insert(hello);
            self.idle.lock().unwrap().push_back(server);
        }
        greeting.ok_or_else(|| std::io::Error::other("a pool of no server connection"))
    }

    /// A new server connection and its greeting. An ErrorResponse (no such database…)
    /// comes back as the error, for the client.
    async fn open(&self) -> std::io::Result<(Wire, Bytes)> {
        let startup = self.startup.get().expect("a client's startup message");
        let mut server = Wire::new(TcpStream::connect(self.upstream).await?);
        server.stream.write_all(startup).await?;
        let mut greeting = BytesMut::new();
        loop {
            let msg = server.message().await?;
            greeting.extend_from_slice(&msg);
            match msg[0] {
                b'Z' => break,
                b'R' if msg[5..9] != [0, 0, 0, 0] => {
                    return Err(std::io::Error::other("only trust authentication"));
                }
                b'E' => return Err(std::io::Error::other(ErrorResponse(msg))),
                _ => {}
            }
        }
        Ok((server, greeting.freeze()))
    }
}

/// An ErrorResponse from a server's start-up, to pass on to the client.
#[derive(Debug)]
struct ErrorResponse(Bytes);

impl std::fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server refused the startup")
    }
}

impl std::error::Error for ErrorResponse {}

/// One client connection, from SSLRequest to Terminate.
async fn serve(shared: Arc<Shared>, client: TcpStream) -> std::io::Result<()> {
    let mut client = Wire::new(client);
    // SSLRequest and GSSENCRequest are answered "no"; a CancelRequest is not served.
    let startup = loop {
        let msg = client.untyped().await?;
        match i32::from_be_bytes(msg[4..8].try_into().unwrap()) {
            80_877_103 | 80_877_104 => client.stream.write_all(b"N").await?,
            80_877_102 => return Ok(()),
            _ => break msg,
        }
    };
    let _ = shared.startup.set(startup);
    // The greeting: the first server connection's, the pool opened for this if need be.
    match shared.greeting.get_or_try_init(|| shared.warm()).await {
        Ok(greeting) => client.stream.write_all(greeting).await?,
        Err(e) => {
            if let Some(ErrorResponse(msg)) = e.get_ref().and_then(|e| e.downcast_ref()) {
                client.stream.write_all(msg).await?;
            }
            return Err(e);
        }
    }

    let mut held: Option<Assigned> = None;
    // Syncs and Queries sent to the held server and not answered by a ReadyForQuery yet.
    let mut unanswered = 0usize;
    // Messages sent since the last Sync or Query: the server will answer them only
    // after a Sync to come, so the client still needs it.
    let mut unsynced = false;
    loop {
        enum Next {
            Client(Bytes),
            Server(Bytes),
        }
        let next = match held.as_mut() {
            None => Next::Client(client.message().await?),
            Some(a) => tokio::select! {
                msg = client.message() => Next::Client(msg?),
                msg = a.server.message() => Next::Server(msg?),
            },
        };
        match next {
            // Terminate: the client leaves. A server it still holds (inside a
            // transaction) is closed, not handed to another client.
            Next::Client(msg) if msg[0] == b'X' => return Ok(()),
            Next::Client(msg) => {
                let a = match held.as_mut() {
                    Some(a) => a,
                    None => held.insert(shared.take().await?),
                };
                a.server.stream.write_all(&msg).await?;
                if matches!(msg[0], b'S' | b'Q') {
                    unanswered += 1;
                    unsynced = false;
                } else {
                    unsynced = true;
                }
            }
            Next::Server(msg) => {
                client.stream.write_all(&msg).await?;
                if msg[0] == b'Z' {
                    unanswered = unanswered.saturating_sub(1);
                    // The transaction is over: the server goes back to the pool.
                    if unanswered == 0
                        && !unsynced
                        && msg[5] == b'I'
                        && let Some(a) = held.take()
                    {
                        shared.give_back(a);
                    }
                }
            }
        }
    }
}

/// One end of a connection, read a whole message at a time.
struct Wire {
    stream: TcpStream,
    buf: BytesMut,
}

impl Wire {
    fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
        }
    }

    /// The next message (type byte, i32 length, body). Cancel-safe (a `select!` branch):
    /// bytes read stay in the buffer until a whole message is there.
    async fn message(&mut self) -> std::io::Result<Bytes> {
        self.frame(1).await
    }

    /// A start-up phase message: i32 length and body, no type byte.
    async fn untyped(&mut self) -> std::io::Result<Bytes> {
        self.frame(0).await
    }

    async fn frame(&mut self, type_bytes: usize) -> std::io::Result<Bytes> {
        loop {
            if self.buf.len() >= type_bytes + 4 {
                let mut len = &self.buf[type_bytes..type_bytes + 4];
                let len = len.get_i32();
                if len < 4 {
                    return Err(std::io::Error::other("a message shorter than its length"));
                }
                let whole = type_bytes + len as usize;
                if self.buf.len() >= whole {
                    return Ok(self.buf.split_to(whole).freeze());
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// The pooler in front of this test's database, and the URL through it.
async fn pooler_for(db: &TestApp, order: Order) -> (Pooler, String) {
    let upstream = crate::proxy::upstream_of(&db.url).await;
    let pooler = Pooler::start(upstream, 4, order).await;
    let url = pooler.url(&db.url);
    (pooler, url)
}

async fn backend_pid(conn: &mut sqlx::PgConnection) -> i32 {
    use sqlx::Row;
    sqlx::raw_sql("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
        .get(0)
}

/// The double does what a transaction pooler does: transactions of one client connection
/// move between backends, and a transaction keeps its backend to its end.
#[tokio::test]
async fn the_pooler_double_moves_connections_between_transactions_only() {
    let db = TestApp::migrated().await;
    for order in [Order::Lifo, Order::RoundRobin] {
        let (_pooler, url) = pooler_for(&db, order).await;
        let pool = loansync::db::connect_url(&url, 2).await.unwrap();
        let (mut a, mut b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
        let mut pids = Vec::new();
        for _ in 0..3 {
            pids.push(backend_pid(&mut a).await);
            pids.push(backend_pid(&mut a).await);
            pids.push(backend_pid(&mut b).await);
        }
        pids.sort();
        pids.dedup();
        match order {
            // One backend serves both clients in turn.
            Order::Lifo => assert_eq!(pids.len(), 1, "{pids:?}"),
            Order::RoundRobin => assert!(pids.len() > 1, "{pids:?}"),
        }
        // Inside a transaction, a client keeps its backend while the other runs on another.
        sqlx::raw_sql("BEGIN").execute(&mut *a).await.unwrap();
        let first = backend_pid(&mut a).await;
        let other = backend_pid(&mut b).await;
        assert_eq!(backend_pid(&mut a).await, first);
        sqlx::raw_sql("COMMIT").execute(&mut *a).await.unwrap();
        assert_ne!(first, other, "{order:?}");
        drop((a, b));
        pool.close().await;
    }
}

/// The planning lock refuses to go on behind a transaction pooler, fatally, whichever
/// backend the pooler hands out; on a direct connection it verifies.
#[tokio::test]
async fn the_planning_lock_refuses_a_transaction_pooler_and_verifies_directly() {
    let db = TestApp::migrated().await;
    let mut lock = PlanningLock::acquire(&db.pool).await.unwrap();
    lock.verify(&db.pool).await.unwrap();
    lock.release().await;

    for order in [Order::Lifo, Order::RoundRobin] {
        // A database each: the lock the pooler's backend keeps must not be in the way.
        let db = TestApp::migrated().await;
        let (pooler, url) = pooler_for(&db, order).await;
        let pool = loansync::db::connect_url(&url, 4).await.unwrap();
        // Taking the lock verifies it: refused before anything else happens.
        let err = PlanningLock::acquire(&pool).await.unwrap_err();
        assert_eq!(err.failure(), Failure::Fatal, "{order:?}: {err:#}");
        let text = err.to_string();
        // Most recently used first, another connection lands on the lock's backend; in
        // turn, the lock's own connection moves.
        let evidence = match order {
            Order::Lifo => "another connection ran on backend",
            Order::RoundRobin => "the planning lock's connection was on backend",
        };
        assert!(
            text.starts_with(&format!("transaction pooling detected: {evidence}")),
            "{text}"
        );
        assert!(
            text.contains("DATABASE_URL of the planner must not point at a transaction pooler"),
            "{text}"
        );
        pool.close().await;
        drop(pooler);
    }
}

/// `loansync check` fails its `pooling` line through the pooler, naming the fix, and
/// passes it on a direct connection.
#[tokio::test]
async fn check_fails_pooling_through_a_transaction_pooler() {
    let db = TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let skip = ["check", "--json", "--skip", "api,broker"];
    let run = |url: String| {
        let mut cmd = crate::harness::loansync_process(&db, &settings, "http://127.0.0.1:9");
        cmd.args(skip).env("DATABASE_URL", url);
        cmd.output()
    };
    let pooling = |out: &std::process::Output| {
        let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let line = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "pooling")
            .cloned()
            .unwrap();
        (
            line["result"].as_str().unwrap().to_string(),
            line["detail"].as_str().unwrap().to_string(),
        )
    };

    let direct = run(db.url.clone()).await.unwrap();
    let (result, detail) = pooling(&direct);
    assert_eq!(result, "ok", "{detail}");
    assert!(detail.contains("no transaction pooler"), "{detail}");
    assert_eq!(direct.status.code(), Some(0));

    let (_pooler, url) = pooler_for(&db, Order::Lifo).await;
    let pooled = run(url).await.unwrap();
    let (result, detail) = pooling(&pooled);
    assert_eq!(result, "failed", "{detail}");
    assert!(
        detail.starts_with(
            "transaction pooling detected: two client connections ran on the same backend"
        ),
        "{detail}"
    );
    assert!(
        detail.contains("a session-mode pool (PgBouncer pool_mode = session) or a direct connection for the planner"),
        "{detail}"
    );
    assert_eq!(pooled.status.code(), Some(1));
}

/// A planner whose DATABASE_URL points at a transaction pooler refuses to start: it takes
/// no message, claims nothing and stops with the fatal error; the message waits in its
/// queue. (Were the pooler put in between later, taking the planning lock refuses it:
/// `the_planning_lock_refuses_a_transaction_pooler_and_verifies_directly`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planner_behind_a_transaction_pooler_plans_nothing_and_stops() {
    let db = TestApp::migrated().await;
    let (_pooler, url) = pooler_for(&db, Order::Lifo).await;
    let settings = Arc::new(settings_for(
        &db,
        "http://127.0.0.1:9",
        &[("DATABASE_URL", &url)],
    ));
    let pool = loansync::db::connect(&settings).await.unwrap();
    let admin = loansync::queue::amqp::Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();
    admin
        .publish_json(
            &admin.topology.plan,
            &[loansync::domain::PlanRequest {
                request_id: Some("behind-a-pooler".into()),
                ..crate::harness::full_request()
            }],
        )
        .await
        .unwrap();

    let consuming = Arc::new(AtomicBool::new(false));
    let planner = loansync::app::run_planner(
        pool.clone(),
        settings.clone(),
        consuming,
        CancellationToken::new(),
    );
    let err = tokio::time::timeout(Duration::from_secs(60), planner)
        .await
        .expect("the planner stops by itself")
        .unwrap_err();
    assert!(
        matches!(err, loansync::app::AppError::Lock(_)),
        "not the planning lock's error: {err:?}"
    );
    assert_eq!(err.failure(), Failure::Fatal, "{err:#}");
    assert!(
        format!("{err:#}").contains("transaction pooling detected"),
        "{err:#}"
    );
    pool.close().await;

    // Nothing claimed, nothing kept, nothing dead-lettered: the message waits in its queue.
    for table in [
        "loansync_sync",
        "loansync_request",
        "etl_folder_etlsynchistory",
    ] {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(rows, 0, "{table}");
    }
    wait_for(
        "the planning message back in its queue",
        Duration::from_secs(20),
        || async { admin.queue_depth(&admin.topology.plan).await.unwrap() == 1 },
    )
    .await;
    assert_eq!(admin.queue_depth(&admin.topology.dead).await.unwrap(), 0);
    admin.close().await;
}
