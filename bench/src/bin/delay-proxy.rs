//! A TCP proxy that adds a fixed one-way delay to every byte in both
//! directions: the latency half of an emulated wide-area link (this kernel
//! has no `netem`; bandwidth is shaped by `tc tbf` on a veth pair).
//!
//! Usage: delay-proxy LISTEN_ADDR UPSTREAM_ADDR ONE_WAY_DELAY_MS
//! e.g.   delay-proxy 127.0.0.1:17070 10.77.0.2:7070 10   (20 ms round trip)

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, delay_ms] = args.as_slice() else {
        anyhow::bail!("usage: delay-proxy LISTEN_ADDR UPSTREAM_ADDR ONE_WAY_DELAY_MS");
    };
    let delay = Duration::from_millis(delay_ms.parse().context("ONE_WAY_DELAY_MS")?);
    let listener = TcpListener::bind(listen).await.context("binding")?;
    eprintln!("delay-proxy: {listen} -> {upstream}, {delay:?} each way");
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            // The handshake a real link would take: one round trip.
            tokio::time::sleep(delay * 2).await;
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pipe(client_read, server_write, delay));
            tokio::spawn(pipe(server_read, client_write, delay));
        });
    }
}

/// Copies `from` to `to`, each piece leaving `delay` after it arrived and
/// in order, so the delay adds latency without cutting throughput.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (queue, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, piece)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&piece).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if queue
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(queue);
    let _ = writer.await;
}
