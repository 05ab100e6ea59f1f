//! Transports: WebSocket (behind an HTTP upgrade) and raw TCP. Both produce the
//! same kind of connection; what a connection's user, groups and pushes are
//! does not depend on how it arrived.

pub(crate) mod http;
pub(crate) mod tcp;
pub(crate) mod ws;

pub use tcp::TcpOptions;
pub use ws::upgrade;

use std::io;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// One read from `stream` by `read` (given the socket and how many bytes it
/// may read, `room`), as `TcpStream::try_read` does, except that a read the
/// socket could not fill marks the socket drained.
///
/// Without that, a reader that loops until `WouldBlock` (tungstenite does,
/// and so does the TCP framing) pays one more system call per message that
/// finds nothing. A short read shows the receive queue was emptied, and the
/// edge-triggered poller announces anything that arrives afterwards, so the
/// next read waits for readiness instead. tokio's own `poll_read` does the
/// same; its `try_read` does not.
pub(crate) fn read_once(
    stream: &TcpStream,
    room: usize,
    read: impl FnOnce(&socket2::Socket) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut short = 0;
    let r = stream.try_io(Interest::READABLE, || {
        let n = read(&socket2::SockRef::from(stream))?;
        if n > 0 && n < room {
            // Reported as `WouldBlock` so that `try_io` clears the
            // readiness it saw (and only that: an event since is kept).
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(short),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    fn read(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        read_once(stream, buf.len(), |s| {
            let mut s: &socket2::Socket = s;
            io::Read::read(&mut s, buf)
        })
    }

    /// Whether tokio holds the socket readable now (without waiting).
    async fn marked_readable(stream: &TcpStream) -> bool {
        poll_fn(|cx| Poll::Ready(stream.poll_read_ready(cx).is_ready())).await
    }

    #[tokio::test]
    async fn a_short_read_marks_the_socket_drained_and_a_full_one_does_not() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();

        client.write_all(b"hello").await.unwrap();
        server.readable().await.unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(read(&server, &mut buf).unwrap(), 4, "filled");
        assert!(marked_readable(&server).await, "more may be there");
        assert_eq!(read(&server, &mut buf).unwrap(), 1, "short");
        assert_eq!(buf[0], b'o');
        assert!(
            !marked_readable(&server).await,
            "drained: the next read waits instead of finding nothing"
        );

        // Data that comes later is announced.
        client.write_all(b"later").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.readable())
            .await
            .expect("announced")
            .unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(read(&server, &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"later");
    }
}
