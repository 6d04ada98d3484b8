//! How the demo authorization server checks signed JWTs (RFC 7523): client assertions
//! (`private_key_jwt`, `client_secret_jwt`) and `jwt-bearer` grants. Verification is
//! jsonwebtoken's (signature, algorithm family, `aud`, `exp`); on top, a `jti` may be
//! used once (§3 item 7), and `iss`/`sub` are checked by the caller.

use std::collections::HashMap;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Map, Value};

/// Clock skew tolerated on `exp`, kept small so that expiry tests need no long waits.
const LEEWAY_SECS: u64 = 5;

/// Parses public keys (PEM SubjectPublicKeyInfo: RSA, EC or Ed25519).
pub(super) fn decoding_keys(pems: &[String]) -> io::Result<Vec<DecodingKey>> {
    pems.iter()
        .map(|pem| {
            let b = pem.as_bytes();
            DecodingKey::from_rsa_pem(b)
                .or_else(|_| DecodingKey::from_ec_pem(b))
                .or_else(|_| DecodingKey::from_ed_pem(b))
                .map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("public key: {e}"))
                })
        })
        .collect()
}

/// `jti` values seen, until their assertion expires.
#[derive(Default)]
pub(super) struct ReplayCache(HashMap<String, u64>);

/// A verified assertion: its header's `alg` and `kid`, and its claims.
pub(super) struct Verified {
    pub claims: Map<String, Value>,
    /// `{"alg", "kid", "claims"}`, for the request log (no signature).
    pub summary: Value,
}

/// Verifies `token` with any of `keys` (or HS256 over `secret`) for `audience`, and
/// spends its `jti`. The error says which check failed.
pub(super) fn verify(
    token: &str,
    keys: &[DecodingKey],
    secret: Option<&str>,
    audience: &str,
    replay: &mut ReplayCache,
) -> Result<Verified, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
    let hmac;
    let candidates: Vec<&DecodingKey> = if header.alg == Algorithm::HS256 {
        let Some(s) = secret else {
            return Err("HS256 is not accepted here".into());
        };
        hmac = DecodingKey::from_secret(s.as_bytes());
        vec![&hmac]
    } else {
        keys.iter().collect()
    };
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_SECS;
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "aud", "iss"]);
    let mut claims = None;
    for key in candidates {
        match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
            Ok(data) => {
                claims = Some(data.claims);
                break;
            }
            // Another registered key may be the right one.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm
                ) => {}
            Err(e) => return Err(describe(e.kind())),
        }
    }
    let claims = claims.ok_or("signature does not verify with any registered key")?;
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .ok_or("jti is missing")?
        .to_owned();
    let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    replay.0.retain(|_, e| *e + LEEWAY_SECS >= now);
    if replay.0.insert(jti, exp).is_some() {
        return Err("jti was used before (replayed assertion)".into());
    }
    let summary = json!({"alg": format!("{:?}", header.alg), "kid": header.kid, "claims": claims});
    Ok(Verified { claims, summary })
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "assertion expired".into(),
        ErrorKind::InvalidAudience => "aud is not this token endpoint".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("claim {c} is missing"),
        ErrorKind::ImmatureSignature => "assertion not valid yet".into(),
        other => format!("invalid assertion: {other:?}"),
    }
}
