//! The server's accept loop: a bounded number of connections, none held by a silent peer.
//!
//! Every accepted connection holds one permit of a semaphore of `server.max_connections`;
//! at the cap, the loop stops accepting (new peers wait in the kernel's backlog) until a
//! connection closes. A connection that sends nothing for `server.idle_timeout_s` (no TLS
//! handshake, no request, no answer to the server's keepalive pings) is closed, so a peer
//! without a token cannot hold a permit for long. A failed accept (e.g. the process is out
//! of file descriptors) is retried after a pause instead of spinning.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Pause after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// At most one warning about failed accepts per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// An accepted connection with its permit and its idle deadline.
pub struct GuardedConn {
    io: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl GuardedConn {
    fn new(io: TcpStream, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        Self {
            io,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            _permit: permit,
        }
    }
}

impl AsyncRead for GuardedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for GuardedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for GuardedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts connections from `listener` on the current runtime, at most `max` open at once,
/// each closed after `idle` without a byte from its peer. The stream ends when the receiver
/// is dropped.
pub fn guarded_incoming(
    listener: TcpListener,
    max: usize,
    idle: Duration,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<GuardedConn>> {
    let (tx, rx) = mpsc::channel(16);
    let permits = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        let (mut warned_accept, mut warned_full): (Option<Instant>, Option<Instant>) = (None, None);
        let due = |t: Option<Instant>| t.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        loop {
            if permits.available_permits() == 0 && due(warned_full) {
                tracing::warn!(
                    max,
                    "connection limit reached (server.max_connections); new connections wait until one closes"
                );
                warned_full = Some(Instant::now());
            }
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            match listener.accept().await {
                Ok((io, _)) => {
                    let _ = io.set_nodelay(true);
                    if tx
                        .send(Ok(GuardedConn::new(io, permit, idle)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    if due(warned_accept) {
                        tracing::warn!(error = %e, "cannot accept a connection; retrying");
                        warned_accept = Some(Instant::now());
                    }
                    drop(permit);
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
