//! Bodies on the general path. Request bodies go upstream streamed as they arrive, or
//! held (up to `retry_body_limit`) so the request can be sent again after a 401, all
//! within `body_timeout`. Response bodies come back with `body_idle_timeout` between
//! frames; trailers are dropped, as on the fast path.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::metrics::UpstreamErrorKind;
use crate::proxy::Upstream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body outlived `body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within body_timeout")]
pub struct BodyTimedOut;

/// A request body on its way upstream.
pub enum UpstreamBody {
    /// Fully held; can be cloned for a retry.
    Full(Option<Bytes>),
    /// Streamed, after replaying what was read while deciding whether to hold it.
    Stream {
        prefix: VecDeque<Bytes>,
        rest: Incoming,
        /// The end of `body_timeout`; `expired` tells the sender why the body failed.
        deadline: Pin<Box<Sleep>>,
        expired: Arc<AtomicBool>,
    },
}

impl UpstreamBody {
    pub fn full(b: Bytes) -> Self {
        UpstreamBody::Full(if b.is_empty() { None } else { Some(b) })
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::Stream {
                prefix,
                rest,
                deadline,
                expired,
            } => {
                if let Some(b) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                if let Poll::Ready(frame) = Pin::new(rest).poll_frame(cx) {
                    return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
                }
                if deadline.as_mut().poll(cx).is_ready() {
                    expired.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(BodyTimedOut.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(b) => b.is_none(),
            UpstreamBody::Stream { prefix, rest, .. } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Stream { prefix, rest, .. } => {
                let pre: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                let h = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + pre);
                if let Some(u) = h.upper() {
                    out.set_upper(u + pre);
                }
                out
            }
        }
    }
}

/// Reads up to `limit` bytes: `Ok(Full)` if the whole body fit, otherwise a `Stream`
/// that replays what was read and continues with the rest. A body whose declared length
/// exceeds the limit is not read at all. The whole body must arrive by `deadline`.
pub async fn hold_up_to(
    mut body: Incoming,
    limit: u64,
    deadline: Instant,
    expired: Arc<AtomicBool>,
) -> Result<UpstreamBody, BoxError> {
    let stream = |prefix, rest| UpstreamBody::Stream {
        prefix,
        rest,
        deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
        expired: expired.clone(),
    };
    if body.is_end_stream() {
        return Ok(UpstreamBody::Full(None));
    }
    if body.size_hint().lower() > limit {
        return Ok(stream(VecDeque::new(), body));
    }
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut total = 0u64;
    loop {
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Err(_) => return Err(BodyTimedOut.into()),
            Ok(None) => break,
            Ok(Some(f)) => f?,
        };
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            chunks.push_back(data);
            if total > limit {
                return Ok(stream(chunks, body));
            }
        }
        // Trailers of a held body are dropped: they are hop-by-hop in practice.
    }
    Ok(UpstreamBody::full(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(total as usize);
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    }))
}

/// The upstream's response body on its way to the app: cut (an error, so the app sees
/// a truncated response) when no bytes come for `body_idle_timeout`; trailers dropped.
pub struct ResponseBody {
    inner: Incoming,
    up: Arc<Upstream>,
    idle: Duration,
    /// Made at the first wait (a body that is all there never needs one), then lazily
    /// re-armed: a frame costs a clock read, not a timer update.
    timer: Option<Pin<Box<Sleep>>>,
    last: Instant,
}

impl ResponseBody {
    pub fn new(inner: Incoming, up: Arc<Upstream>) -> ResponseBody {
        ResponseBody {
            idle: up.config.body_idle_timeout.0,
            inner,
            up,
            timer: None,
            last: Instant::now(),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => return Poll::Ready(None),
            Poll::Ready(Some(Ok(frame))) => {
                this.last = Instant::now();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                this.up
                    .recorder
                    .body_cut(UpstreamErrorKind::Other, &e.to_string());
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        let due = this.last + this.idle;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due.into())));
        while timer.as_mut().poll(cx).is_ready() {
            let due = this.last + this.idle;
            if Instant::now() >= due {
                this.up.recorder.body_cut(
                    UpstreamErrorKind::Timeout,
                    "no bytes within body_idle_timeout",
                );
                return Poll::Ready(Some(Err("response body idle timeout".into())));
            }
            timer.as_mut().reset(due.into());
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
