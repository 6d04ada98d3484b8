//! The token endpoint: building token requests (RFC 6749 §4–6) and parsing their answers;
//! the device authorization grant (RFC 8628); authorization server discovery (RFC 8414).

mod client;
pub mod device;
pub mod discovery;
mod lenient;
mod response;
pub(crate) mod token_headers;

pub use client::{GrantRequest, TokenClient, TokenClientError, TokenEndpoint};
pub use response::{parse, AccessToken, Answer, TokenAnswer, TokenError, TokenResponse};
