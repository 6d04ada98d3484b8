//! Read buffers of app connections. A connection waiting for its next request holds
//! none: its buffer goes back to a small pool of the listener worker's thread and is
//! taken again when bytes arrive, so idle keep-alive connections cost a socket and a
//! task, not a buffer each, while busy ones reuse pooled buffers without allocating.

use std::cell::RefCell;

use bytes::BytesMut;

/// Buffers kept per worker thread; more are freed. Enough for the connections one
/// worker has mid-request at once under heavy load.
const KEPT: usize = 128;

/// Room made before each read.
const READ_ROOM: usize = 16 * 1024;

thread_local! {
    static POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer to read into: a pooled one, or a new one.
pub fn take() -> BytesMut {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_ROOM))
}

/// Returns an emptied buffer to the pool (or frees it when the pool is full).
pub fn give(mut buf: BytesMut) {
    if buf.capacity() == 0 {
        return;
    }
    buf.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEPT {
            p.push(buf);
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
    fn buffers_are_reused_and_the_pool_is_bounded() {
        let mut b = take();
        assert!(b.capacity() >= READ_ROOM);
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let ptr = b.as_ptr();
        give(b);
        let again = take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the pooled buffer comes back");
        give(again);
        for _ in 0..KEPT + 10 {
            give(BytesMut::with_capacity(64));
        }
        assert_eq!(POOL.with(|p| p.borrow().len()), KEPT);
        give(BytesMut::new());
        assert_eq!(POOL.with(|p| p.borrow().len()), KEPT);
    }
}
