//! The request-path rules of both engines, over bytes and `HeaderMap`s. The fast path
//! and the hyper path both call these, so a rule changed here changes in both:
//! [`headers`], [`query_token`], [`target`], [`redirects`], and the 401 sequence
//! ([`retry`]).

pub mod headers;
pub mod query_token;
pub mod redirects;
pub mod retry;
pub mod target;

pub use crate::http_names::{connection_may_drop, is_hop_by_hop, list_items};
pub use headers::*;
pub use query_token::*;
pub use redirects::*;
pub use target::*;
