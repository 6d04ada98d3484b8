//! Buffers of app connections: what is read from the app, the request head sent
//! upstream, and the response head sent back. A connection waiting for its next request
//! holds none: they go back to a small pool of the listener worker's thread and are
//! taken again when bytes arrive, so idle keep-alive connections cost a socket and a
//! task, not buffers each, while busy ones reuse pooled buffers without allocating.

use std::cell::RefCell;

use bytes::BytesMut;

/// Buffers kept per worker thread; more are freed. Enough for the connections one
/// worker has mid-request at once under heavy load.
const KEPT: usize = 128;

/// Room made before each read.
const READ_ROOM: usize = 16 * 1024;

/// Initial room of each head buffer (most heads fit).
const HEAD_ROOM: usize = 1024;

/// One connection's buffers (the default: none allocated).
#[derive(Default)]
pub struct Buffers {
    pub read: BytesMut,
    /// The request head being sent upstream.
    pub out: Vec<u8>,
    /// The response head being sent to the app.
    pub head: Vec<u8>,
}

thread_local! {
    static POOL: RefCell<Vec<Buffers>> = const { RefCell::new(Vec::new()) };
}

/// Buffers for a connection with bytes to read: pooled ones, or new ones.
pub fn take() -> Buffers {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Buffers {
            read: BytesMut::with_capacity(READ_ROOM),
            out: Vec::with_capacity(HEAD_ROOM),
            head: Vec::with_capacity(HEAD_ROOM),
        })
}

/// Returns a connection's buffers, emptied, to the pool (or frees them when the pool is
/// full). Buffers never allocated are not kept.
pub fn give(mut b: Buffers) {
    if b.read.capacity() == 0 {
        return;
    }
    b.read.clear();
    b.out.clear();
    b.head.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEPT {
            p.push(b);
        }
    });
}

/// Makes room to read into.
pub fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(READ_ROOM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_emptied_and_the_pool_is_bounded() {
        let mut b = take();
        assert!(b.read.capacity() >= READ_ROOM && b.out.capacity() >= HEAD_ROOM);
        b.read.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        b.head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let ptr = b.read.as_ptr();
        give(b);
        let again = take();
        assert!(again.read.is_empty() && again.out.is_empty() && again.head.is_empty());
        assert_eq!(again.read.as_ptr(), ptr, "the pooled buffers come back");
        give(again);
        for _ in 0..KEPT + 10 {
            give(take());
            give(Buffers {
                read: BytesMut::with_capacity(64),
                ..Buffers::default()
            });
        }
        assert_eq!(POOL.with(|p| p.borrow().len()), KEPT);
        give(Buffers::default());
        assert_eq!(POOL.with(|p| p.borrow().len()), KEPT);
    }
}
