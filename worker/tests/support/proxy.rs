//! A TCP proxy a test can pause, resume and cut, to put a network partition between a
//! client (a worker) and a server (NATS) without stopping either.
//!
//! [`TcpProxy::pause`] *holds* bytes: each direction of each connection stops reading
//! once it holds one buffer, and writes it on [`TcpProxy::resume`]. Nothing is lost and
//! both ends keep their connection, as across a short partition, so a paused worker
//! carries on where it stopped. The rest queues in the kernel's socket buffers and
//! then in the sender, as a TCP sender's data does when no acks come back. A pause
//! longer than a protocol's keep-alive (NATS: ping interval × max pings outstanding)
//! ends the connection the way a long partition does: one end gives up on it.
//!
//! [`TcpProxy::cut`] closes every current connection (a reset path, a dead peer);
//! new ones are accepted. Dropping the proxy closes the listener and every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Bytes one direction of a connection reads before it forwards them; also the most it
/// holds while paused.
const BUFFER_BYTES: usize = 16 * 1024;

/// A proxy on `127.0.0.1:<free port>` forwarding every connection to one upstream.
pub struct TcpProxy {
    addr: SocketAddr,
    /// `true` while paused.
    paused: watch::Sender<bool>,
    /// Cancelled on drop: the listener and every connection.
    closed: CancellationToken,
    /// The connections accepted since the last [`TcpProxy::cut`]; a child of `closed`.
    current: Arc<Mutex<CancellationToken>>,
    open: Arc<AtomicUsize>,
}

impl TcpProxy {
    /// Listens on a free local port and forwards to `upstream` (connected to per
    /// accepted connection; a refused upstream closes that connection). Needs a Tokio
    /// runtime.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a free local port");
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).expect("inside a Tokio runtime");
        let addr = listener.local_addr().unwrap();
        let (paused, _) = watch::channel(false);
        let closed = CancellationToken::new();
        let current = Arc::new(Mutex::new(closed.child_token()));
        let open = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept(
            listener,
            upstream,
            paused.clone(),
            closed.clone(),
            current.clone(),
            open.clone(),
        ));
        Self {
            addr,
            paused,
            closed,
            current,
            open,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding in both directions, keeping connections open: once this
    /// returns, no byte the proxy has not read yet is forwarded until
    /// [`TcpProxy::resume`]. Connections accepted meanwhile are held the same way.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Forwards again, the held bytes first.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Closes every current connection (held bytes are dropped with it); the proxy
    /// goes on accepting new ones, paused or not as it was.
    pub fn cut(&self) {
        let mut current = self.current.lock().unwrap();
        current.cancel();
        *current = self.closed.child_token();
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    paused: watch::Sender<bool>,
    closed: CancellationToken,
    current: Arc<Mutex<CancellationToken>>,
    open: Arc<AtomicUsize>,
) {
    loop {
        let client = tokio::select! {
            () = closed.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
        };
        let cut = current.lock().unwrap().clone();
        let (paused, open) = (paused.subscribe(), open.clone());
        tokio::spawn(async move {
            let _open = Counted::enter(open);
            tokio::select! {
                // Dropping the sockets closes them.
                () = cut.cancelled() => {}
                () = connection(client, upstream, paused) => {}
            }
        });
    }
}

/// Connects to `upstream` and forwards both ways until both directions end.
async fn connection(client: TcpStream, upstream: SocketAddr, paused: watch::Receiver<bool>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        forward(client_read, server_write, paused.clone()),
        forward(server_read, client_write, paused),
    );
}

/// Copies `from` to `to`, holding what it read while `paused` is `true`; on end of
/// stream it shuts `to`'s write side, so a half-close reaches the other end.
async fn forward(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut paused: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; BUFFER_BYTES];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        // Checked after the read: whatever was read once the pause began is held.
        if paused.wait_for(|paused| !paused).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Counts one open connection for as long as it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn enter(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
