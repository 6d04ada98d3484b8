//! Why a refresh attempt failed: the message `/status`, the log and the metrics carry.
//! Never a token value.

use crate::oauth::TokenError;
use crate::secret::InvalidToken;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The token endpoint's answer (network, status, OAuth error, unusable body).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A 2xx rotated the refresh token but its access-token part is unusable; the new
    /// refresh token was stored durably and the next attempt presents it.
    #[error("{0} (the new refresh token was stored; the next refresh uses it)")]
    UnusableAccessToken(TokenError),
    /// The token cannot be put in a header.
    #[error(transparent)]
    InvalidToken(#[from] InvalidToken),
    #[error("store unavailable")]
    StoreUnavailable,
    #[error("cannot take the refresh lease: {0}")]
    Lease(StoreError),
    #[error("refresh lease is held by another process")]
    LeaseBusy,
    /// The lease could not be confirmed right before sending: the refresh token stays
    /// unsent rather than risk another holder spending it too.
    #[error("the refresh lease could not be confirmed; the refresh token was not sent")]
    LeaseNotConfirmed,
    #[error("stored state changed during refresh")]
    StoredStateChanged,
    /// The provider's refresh rate limit or minimum token age forbids a refresh now.
    #[error("the provider's refresh limits allow the next refresh in {0:?}")]
    ProviderLimit(std::time::Duration),
    /// `invalid_grant`, but another process had rotated meanwhile.
    #[error("{0}; the stored state changed meanwhile, retrying with it")]
    RejectedWhileRotated(TokenError),
}
