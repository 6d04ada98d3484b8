//! Request bodies sent upstream: streamed as they arrive, or held (up to
//! `retry_body_limit`) so the request can be sent again after a 401.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// A request body on its way upstream.
pub enum UpstreamBody {
    /// Fully held; can be cloned for a retry.
    Full(Option<Bytes>),
    /// Streamed, after replaying what was read while deciding whether to hold it.
    Stream {
        prefix: VecDeque<Bytes>,
        rest: Incoming,
    },
}

impl UpstreamBody {
    pub fn full(b: Bytes) -> Self {
        UpstreamBody::Full(if b.is_empty() { None } else { Some(b) })
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::Stream { prefix, rest } => {
                if let Some(b) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Pin::new(rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(b) => b.is_none(),
            UpstreamBody::Stream { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Stream { prefix, rest } => {
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
/// exceeds the limit is not read at all.
pub async fn hold_up_to(mut body: Incoming, limit: u64) -> Result<UpstreamBody, hyper::Error> {
    if body.is_end_stream() {
        return Ok(UpstreamBody::Full(None));
    }
    if body.size_hint().lower() > limit {
        return Ok(UpstreamBody::Stream {
            prefix: VecDeque::new(),
            rest: body,
        });
    }
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            chunks.push_back(data);
            if total > limit {
                return Ok(UpstreamBody::Stream {
                    prefix: chunks,
                    rest: body,
                });
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
