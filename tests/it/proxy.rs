//! A TCP proxy on a loopback port in front of the local PostgreSQL or RabbitMQ, which a
//! test can pause (nothing more goes from the server to the client), cut (every
//! connection closed, new ones closed at once) and open again, and which can slip
//! AMQP frames of its own to the client between the server's frames.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Open,
    /// Forwards client → server only: answers (confirms, deliveries) are held back.
    Paused,
    /// Closes every connection and every new one: the server is "unreachable".
    Cut,
}

/// What the proxy forwards server → client in one piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Bytes as they come (PostgreSQL).
    Raw,
    /// Whole AMQP 0-9-1 frames, so that [`Proxy::inject`] lands between frames.
    Amqp,
}

type Senders = Arc<Mutex<Vec<mpsc::UnboundedSender<Vec<u8>>>>>;

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    senders: Senders,
    /// Connections accepted while not cut.
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr, framing: Framing) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, _) = watch::channel(Mode::Open);
        let senders: Senders = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let task = {
            let (mode, senders, connections) = (mode.clone(), senders.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *mode.borrow() == Mode::Cut {
                        drop(client);
                        continue;
                    }
                    connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(relay(
                        client,
                        upstream,
                        mode.subscribe(),
                        framing,
                        senders.clone(),
                    ));
                }
            })
        };
        Proxy {
            port,
            mode,
            senders,
            connections,
            task,
        }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Sends `frame` to the client of every open connection, after the frames already
    /// on their way.
    pub fn inject(&self, frame: Vec<u8>) {
        self.senders
            .lock()
            .unwrap()
            .retain(|tx| tx.send(frame.clone()).is_ok());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Mode::Cut);
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    framing: Framing,
    senders: Senders,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    senders.lock().unwrap().push(tx.clone());
    let up = async { tokio::io::copy(&mut cr, &mut sw).await };
    let read_down = async move {
        loop {
            let piece = match framing {
                Framing::Raw => {
                    let mut buf = vec![0u8; 16 * 1024];
                    match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some(buf)
                        }
                    }
                }
                Framing::Amqp => read_frame(&mut sr).await,
            };
            let Some(p) = piece else { break };
            if tx.send(p).is_err() {
                break;
            }
        }
    };
    let mut gate = mode.clone();
    let write_down = async move {
        while let Some(piece) = rx.recv().await {
            match gate.wait_for(|m| *m != Mode::Paused).await {
                Ok(m) if *m == Mode::Open => {}
                _ => break,
            }
            if cw.write_all(&piece).await.is_err() {
                break;
            }
        }
    };
    let cut = mode.wait_for(|m| *m == Mode::Cut);
    tokio::select! {
        _ = up => {}
        _ = read_down => {}
        _ = write_down => {}
        _ = cut => {}
    }
}

/// One AMQP frame: type, channel, size, payload, frame-end.
async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
    let mut frame = vec![0u8; 7];
    r.read_exact(&mut frame).await.ok()?;
    let size = u32::from_be_bytes(frame[3..7].try_into().unwrap()) as usize;
    frame.resize(7 + size + 1, 0);
    r.read_exact(&mut frame[7..]).await.ok()?;
    Some(frame)
}

/// A method frame on channel 0.
fn connection_method(method: u16, args: &[u8]) -> Vec<u8> {
    let mut payload = 10u16.to_be_bytes().to_vec(); // class `connection`
    payload.extend(method.to_be_bytes());
    payload.extend(args);
    let mut frame = vec![1u8, 0, 0];
    frame.extend((payload.len() as u32).to_be_bytes());
    frame.extend(payload);
    frame.push(0xCE);
    frame
}

/// `connection.blocked` (RabbitMQ's notice of a memory or disk alarm) with `reason`.
pub fn connection_blocked(reason: &str) -> Vec<u8> {
    let mut args = vec![reason.len() as u8];
    args.extend(reason.as_bytes());
    connection_method(60, &args)
}

/// `connection.unblocked`.
pub fn connection_unblocked() -> Vec<u8> {
    connection_method(61, &[])
}

/// Host and port of a URL, resolved to a socket address.
pub async fn upstream_of(url: &str) -> SocketAddr {
    let u = url::Url::parse(url).unwrap();
    let host = u.host_str().unwrap().to_string();
    let port = u.port_or_known_default().unwrap_or(match u.scheme() {
        "postgres" | "postgresql" => 5432,
        _ => 5672,
    });
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap()
}

/// `url` with its host and port replaced by the proxy's.
pub fn through(url: &str, proxy: &Proxy) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_host(Some("127.0.0.1")).unwrap();
    u.set_port(Some(proxy.port)).unwrap();
    u.to_string()
}
