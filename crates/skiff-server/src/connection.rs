//! Connections: how many are open at once, and how long a client may keep
//! one without sending or reading anything. A slow or idle client holds a
//! slot for a bounded time, so a few of them (slowloris) cannot starve the
//! rest.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What one client may hold, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one client address may hold at once; more are closed.
    pub max_connections_per_client: usize,
    /// Time from the start of a request (or of waiting for the next one on
    /// a kept-alive connection) to its last header byte.
    pub header_timeout: Duration,
    /// Time a connection may pass without a byte read or written while the
    /// server waits on it: a request body that stalls, or a client that
    /// stops reading an answer.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 512,
            max_connections_per_client: 128,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// How many connections each client address holds.
pub(crate) struct PeerSlots {
    limit: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection of a client, given back on drop.
pub(crate) struct PeerSlot {
    peer: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PeerSlots {
    pub(crate) fn new(limit: usize) -> PeerSlots {
        PeerSlots {
            limit,
            open: Arc::default(),
        }
    }

    /// A slot for one more connection of `peer`, unless it holds its limit.
    pub(crate) fn claim(&self, peer: IpAddr) -> Option<PeerSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(peer).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peer,
            open: self.open.clone(),
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// A stream that fails with `TimedOut` once it has waited `idle` for the
/// peer without any byte moving. The clock only runs while someone waits on
/// the stream: a request being answered slowly by the server is not idle.
pub(crate) struct IdleTimeout<T> {
    io: T,
    idle: Duration,
    /// When a byte last moved: cheap to note on every read and write,
    /// unlike moving the timer, which is done only when it fires early.
    last_moved: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleTimeout<T> {
    pub(crate) fn new(io: T, idle: Duration) -> Self {
        IdleTimeout {
            io,
            idle,
            last_moved: Instant::now(),
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn moved(&mut self) {
        self.last_moved = Instant::now();
    }

    /// What a write of the inner stream gave: progress, or a wait that may
    /// have lasted too long.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(result) => {
                self.moved();
                Poll::Ready(result)
            }
            Poll::Pending => self.expired(cx),
        }
    }

    /// Called when the stream is not ready: an error once it has been idle too long.
    fn expired<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last_moved + self.idle;
            if due <= Instant::now() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no byte moved for {:?}", self.idle),
                )));
            }
            // Bytes moved since the timer was set: it goes off later.
            self.timer.as_mut().reset(due);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.expired(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.expired(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_stream_times_out_only_when_nothing_moves() {
        let idle = Duration::from_millis(300);
        let (client, server) = tokio::io::duplex(64);
        let mut server = IdleTimeout::new(server, idle);
        let mut client = client;
        let mut byte = [0u8; 1];
        // A byte every 200 ms keeps it alive well past 300 ms.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut byte).await.unwrap();
        }
        let waited = std::time::Instant::now();
        let error = server.read_exact(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(waited.elapsed() >= idle);

        // A peer that stops reading stalls writes: they time out too.
        let (_reader, writer) = tokio::io::duplex(8);
        let mut writer = IdleTimeout::new(writer, idle);
        let error = writer.write_all(&[0; 64]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
