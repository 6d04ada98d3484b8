//! Message heads on the fast path: a request head from the app becomes the upstream's
//! request head ([`request`]), and the upstream's response head becomes the app's
//! ([`response`]). Anything unusual is declined, and the general path handles it.

mod request;
mod response;

use std::ops::Range;

pub use request::{plan_request, Parsed, RequestPlan, Rules, WebSocket};
pub use response::{rewrite_response, BadResponse, Redirects, ResponseHead};

/// httparse's header slots; more than this many headers goes to the general path.
const MAX_HEADERS: usize = 100;

/// A Content-Length value: digits only (a list of equal values is declined).
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The position of `part` (a subslice) within `whole`.
fn range_in(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}
