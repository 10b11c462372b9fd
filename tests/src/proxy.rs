//! A fault proxy: a TCP forwarder on 127.0.0.1 that sits between `treatyd` and one
//! participant, and on command passes, delays, black-holes or cuts the traffic.
//!
//! The transaction's branch endpoints name the proxy, so every call the coordinator makes to
//! that participant crosses it. The participant may be killed and restarted on the same
//! address: the proxy dials its target afresh for every accepted connection.
//!
//! Faults (see [`Fault`]):
//! - **pass**: bytes are copied both ways as they come;
//! - **delay**: every chunk waits the given time before it is forwarded (order is kept);
//! - **black-hole**: connections are accepted (new ones are not even dialed through), bytes
//!   are read and thrown away, nothing is answered. Leaving black-hole mode closes every
//!   connection, because the ones that lost bytes are corrupt streams;
//! - **cut** ([`Proxy::cut`]): every open connection is closed at once (both sides see the
//!   connection drop); later connections are handled by the current mode.
//!
//! Control methods are synchronous and cheap, so a fault schedule can run on a plain thread.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything as it comes.
    Pass,
    /// Forward every chunk after this delay.
    Delay(Duration),
    /// Accept, read and discard; forward and answer nothing.
    Blackhole,
}

/// Counters of what the proxy has done (for tests and reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Connections closed by a cut (or by leaving black-hole mode).
    pub cut: u64,
    /// Bytes thrown away in black-hole mode.
    pub discarded_bytes: u64,
}

struct Shared {
    target: SocketAddr,
    fault: Mutex<Fault>,
    /// Bumped by every cut: connections opened before it close.
    epoch: watch::Sender<u64>,
    accepted: AtomicU64,
    cut: AtomicU64,
    discarded: AtomicU64,
    /// Connections currently open (to count what a cut closed).
    open: AtomicU64,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fault proxy. Stops (and closes every connection) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

/// Size of one forwarded chunk.
const CHUNK_BYTES: usize = 16 * 1024;

impl Proxy {
    /// Listen on 127.0.0.1 (an OS-assigned port) and forward to `target`. Must be called
    /// inside a tokio runtime; the proxy's tasks run on it.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let (epoch, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            target,
            fault: Mutex::new(Fault::Pass),
            epoch,
            accepted: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            open: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            addr,
            shared,
            accept,
        })
    }

    /// The proxy's own address (what clients dial).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<proxy addr>`: the endpoint to give branches.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address traffic is forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// Switch to `fault`. Leaving black-hole mode cuts every connection (their streams lost
    /// bytes and cannot be resumed).
    pub fn set(&self, fault: Fault) {
        let before = {
            let mut f = self.shared.fault.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *f, fault)
        };
        if before == Fault::Blackhole && fault != Fault::Blackhole {
            self.cut();
        }
    }

    /// Back to forwarding everything.
    pub fn pass(&self) {
        self.set(Fault::Pass);
    }

    /// Close every open connection now (both sides see it drop).
    pub fn cut(&self) {
        let open = self.shared.open.load(Ordering::Acquire);
        self.shared.cut.fetch_add(open, Ordering::AcqRel);
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// What the proxy has done so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            accepted: self.shared.accepted.load(Ordering::Acquire),
            cut: self.shared.cut.load(Ordering::Acquire),
            discarded_bytes: self.shared.discarded.load(Ordering::Acquire),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Close every connection too: nothing may outlive the proxy.
        self.shared.epoch.send_modify(|e| *e += 1);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        shared.accepted.fetch_add(1, Ordering::AcqRel);
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut epoch = shared.epoch.subscribe();
            shared.open.fetch_add(1, Ordering::AcqRel);
            tokio::select! {
                _ = connection(client, &shared) => {}
                // A cut (or the proxy dropped: the sender is gone) closes this connection by
                // dropping its sockets.
                _ = epoch.changed() => {}
            }
            shared.open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Serve one accepted connection until either side ends it.
async fn connection(mut client: TcpStream, shared: &Shared) {
    if shared.fault() == Fault::Blackhole {
        // Not even dialed: swallow until the client gives up or a cut closes it.
        swallow(&mut client, shared).await;
        return;
    }
    let Ok(upstream) = TcpStream::connect(shared.target).await else {
        // Target down (e.g. killed): the client sees the connection close, as it would.
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    // When one direction ends, the other may still carry the last answer: wait for both.
    tokio::join!(pump(cr, uw, shared), pump(ur, cw, shared));
}

async fn swallow(client: &mut TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                shared.discarded.fetch_add(n as u64, Ordering::AcqRel);
            }
        }
    }
}

/// Copy `from` to `to` chunk by chunk, applying the fault in force when each chunk arrives.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        match shared.fault() {
            Fault::Pass => {}
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Blackhole => {
                shared.discarded.fetch_add(n as u64, Ordering::AcqRel);
                continue;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// Send `msg` and read the echo, within `bound`; `None` if nothing (or not all) came back.
    async fn roundtrip(s: &mut TcpStream, msg: &[u8], bound: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut got = vec![0u8; msg.len()];
        match tokio::time::timeout(bound, s.read_exact(&mut got)).await {
            Ok(Ok(_)) => Some(got),
            _ => None,
        }
    }

    /// Whether the peer closed `s` within `bound`.
    async fn closed(s: &mut TcpStream, bound: Duration) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(bound, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    const BOUND: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn passes_traffic_both_ways() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut s, b"hello", BOUND).await.as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(p.stats().accepted, 1);
    }

    #[tokio::test]
    async fn delays_each_chunk_and_keeps_order() {
        let p = Proxy::start(echo().await).await.unwrap();
        p.set(Fault::Delay(Duration::from_millis(150)));
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let start = Instant::now();
        assert_eq!(
            roundtrip(&mut s, b"abc", BOUND).await.as_deref(),
            Some(&b"abc"[..])
        );
        // Delayed on the way in and on the way back.
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        p.pass();
        let start = Instant::now();
        assert_eq!(
            roundtrip(&mut s, b"de", BOUND).await.as_deref(),
            Some(&b"de"[..])
        );
        assert!(
            start.elapsed() < Duration::from_millis(150),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn black_hole_answers_nothing_and_restoring_closes_its_connections() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut before = TcpStream::connect(p.addr()).await.unwrap();
        assert!(roundtrip(&mut before, b"x", BOUND).await.is_some());
        p.set(Fault::Blackhole);
        // An open connection goes silent, and so does a new one (which is still accepted).
        assert_eq!(
            roundtrip(&mut before, b"lost", Duration::from_millis(300)).await,
            None
        );
        let mut during = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut during, b"lost too", Duration::from_millis(300)).await,
            None
        );
        assert!(p.stats().discarded_bytes >= 4);
        p.pass();
        // Their streams lost bytes: both are closed; a new connection works.
        assert!(closed(&mut before, BOUND).await);
        assert!(closed(&mut during, BOUND).await);
        let mut after = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut after, b"ok", BOUND).await.as_deref(),
            Some(&b"ok"[..])
        );
    }

    #[tokio::test]
    async fn cut_closes_open_connections_and_new_ones_work() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut a = TcpStream::connect(p.addr()).await.unwrap();
        assert!(roundtrip(&mut a, b"1", BOUND).await.is_some());
        p.cut();
        assert!(closed(&mut a, BOUND).await);
        assert!(p.stats().cut >= 1);
        let mut b = TcpStream::connect(p.addr()).await.unwrap();
        assert!(roundtrip(&mut b, b"2", BOUND).await.is_some());
    }

    #[tokio::test]
    async fn a_dead_target_closes_the_connection_and_a_restarted_one_is_reached() {
        // Reserve an address, then free it: nothing listens there.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = l.local_addr().unwrap();
        drop(l);
        let p = Proxy::start(target).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert!(closed(&mut s, BOUND).await);
        // The target comes back on the same address: the next connection reaches it.
        let l = TcpListener::bind(target).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let (mut server, _) = tokio::time::timeout(BOUND, l.accept())
            .await
            .unwrap()
            .unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_everything() {
        let p = Proxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert!(roundtrip(&mut s, b"1", BOUND).await.is_some());
        drop(p);
        assert!(closed(&mut s, BOUND).await);
    }
}
