//! Grants with nothing to spend or store (`client_credentials`, `password`, `jwt_bearer`
//! with a freshly signed assertion each time): a token is
//! requested at startup and before expiry, and kept in memory only.

use super::{Failure, Refresher};
use crate::config::url_template::merge_fields;
use crate::credential::RefreshResult;
use crate::oauth::{GrantRequest, TokenAnswer};

impl Refresher {
    /// Asks for a token and publishes it.
    pub(super) async fn refresh_local(
        &mut self,
        grant: GrantRequest<'_>,
    ) -> Result<RefreshResult, Failure> {
        let client = self.client.as_ref().expect("non-static grant has a client");
        let resp = client
            .request(grant)
            .await
            .and_then(TokenAnswer::into_response)
            .map_err(|e| Failure::Error(e.into()))?;
        let generation = self.cred.current().map(|t| t.generation).unwrap_or(0) + 1;
        // Kept in memory only; a field this answer omits keeps its previous value.
        let fields = merge_fields(&self.cred.current_fields(), &resp.fields);
        self.cred
            .publish_with_fields(
                &resp.access_token,
                generation,
                Some(crate::clock::wall_now() + resp.expires_in),
                fields,
                &resp.refused_fields,
            )
            .map_err(|e| Failure::Error(e.into()))?;
        Ok(RefreshResult::Success)
    }
}
