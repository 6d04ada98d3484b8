//! The token endpoint: building token requests (RFC 6749 §4–6) and parsing their answers.

mod client;
mod lenient;
mod response;

pub use client::{GrantRequest, TokenClient, TokenClientError, TokenEndpoint};
pub use response::{parse, AccessToken, Answer, TokenAnswer, TokenError, TokenResponse};
