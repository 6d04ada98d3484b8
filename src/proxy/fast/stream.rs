//! The byte stream of one upstream connection on the fast path: plain TCP, or TLS over
//! it (rustls). The exchange reads and writes it the same way either way; TLS only adds
//! a flush after each write (rustls may keep a record it could not send yet).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub enum UpstreamStream {
    Plain(TcpStream),
    /// Boxed: the TLS state is large, and the pool moves connections around.
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Writes all of `buf` and pushes it onto the wire.
    pub async fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_all(buf).await?;
        match self {
            UpstreamStream::Plain(_) => Ok(()),
            // A write that found the socket full returns once rustls has taken in the
            // plaintext; its last records are only sent here. Nothing else would write
            // them while the response is awaited (tests/fast_path.rs,
            // `bodies_of_every_size_reach_an_upstream_that_reads_late`).
            UpstreamStream::Tls(s) => s.flush().await,
        }
    }

    /// Whether an idle connection still looks open: nothing to read and no end of
    /// stream. Costs no syscall for plain TCP when the socket had no event since its
    /// last read. For TLS, records that arrived meanwhile (session tickets, a
    /// close_notify) are processed; any application data means the connection is out
    /// of step and not reused.
    pub fn idle_and_open(&mut self) -> bool {
        match self {
            UpstreamStream::Plain(s) => matches!(
                s.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
            UpstreamStream::Tls(s) => {
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                let mut cx = Context::from_waker(Waker::noop());
                Pin::new(&mut **s).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
