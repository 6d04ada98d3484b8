//! `authorize --device`: RFC 8628's device flow as a person at a terminal meets it. The
//! verification address and user code are printed; the token endpoint is polled by the
//! rules of [`crate::oauth::device::Polling`] until the user approves, refuses, or the
//! code expires.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::config::CredentialConfig;
use crate::oauth::device::{
    classify, DeviceAuthorization, DeviceAuthorizationError, Next, Polling,
};
use crate::oauth::{GrantRequest, TokenAnswer, TokenClient, TokenError};

/// Why the device flow ended without an answer to store. Each says what happened and
/// what to do; none holds the device code.
#[derive(Debug, thiserror::Error)]
pub enum DeviceFlowError {
    #[error("credentials.{credential}.device_authorization_url is not set: set it to the provider's device authorization endpoint (RFC 8628), or use a preset that sets it (google, microsoft, okta, keycloak, auth0)")]
    NoEndpoint { credential: String },
    #[error("{error}; nothing was stored. Check that the device flow is enabled for this client at the provider, then run `tokenrelay authorize --credential {credential} --device` again")]
    Start {
        credential: String,
        error: DeviceAuthorizationError,
    },
    #[error("the sign-in was denied at the provider{}; nothing was stored. Run `tokenrelay authorize --credential {credential} --device` again and approve the request (with an account allowed to use this client)", description.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Denied {
        credential: String,
        description: Option<String>,
    },
    #[error("the device code expired before the sign-in was approved (it lived {}); nothing was stored. Run `tokenrelay authorize --credential {credential} --device` again and complete the sign-in within that time", minutes(*lifetime))]
    Expired {
        credential: String,
        lifetime: Duration,
    },
    #[error("the token endpoint refused the device code ({error}); nothing was stored. Run `tokenrelay authorize --credential {credential} --device` again; if this repeats, check the client's settings at the provider")]
    Refused {
        credential: String,
        error: TokenError,
    },
}

fn minutes(d: Duration) -> String {
    match d.as_secs() {
        s if s < 120 => format!("{s} s"),
        s => format!("{} min", s / 60),
    }
}

/// Runs the device flow for credential `c`: the answer that ended it successfully.
pub async fn obtain(
    client: &TokenClient,
    c: &CredentialConfig,
) -> Result<TokenAnswer, DeviceFlowError> {
    let credential = c.name.clone();
    if c.device_authorization_url.is_none() {
        return Err(DeviceFlowError::NoEndpoint { credential });
    }
    let auth = client
        .device_authorization()
        .await
        .map_err(|error| DeviceFlowError::Start {
            credential: credential.clone(),
            error,
        })?;
    let mut polling = Polling::new(&auth, Instant::now());
    print_instructions(&credential, &auth);
    let mut next = polling.first(Instant::now());
    loop {
        let wait = match next {
            Next::Poll(wait) => wait,
            Next::Denied(description) => {
                return Err(DeviceFlowError::Denied {
                    credential,
                    description,
                })
            }
            Next::Expired => {
                return Err(DeviceFlowError::Expired {
                    credential,
                    lifetime: auth.expires_in,
                })
            }
            Next::Refused(error) => return Err(DeviceFlowError::Refused { credential, error }),
        };
        tokio::time::sleep(wait).await;
        let poll = match classify(
            client
                .request(GrantRequest::DeviceCode(&auth.device_code))
                .await,
        ) {
            Ok(answer) => return Ok(answer),
            Err(poll) => poll,
        };
        let before = polling.interval();
        let unanswered = match &poll {
            crate::oauth::device::Poll::Unanswered(e) => Some(e.to_string()),
            _ => None,
        };
        next = polling.after(poll, Instant::now());
        if polling.interval() > before {
            eprintln!(
                "note: the provider asked to poll less often (slow_down); polling every {} s from now on",
                polling.interval().as_secs()
            );
        }
        if let (Some(e), Next::Poll(wait)) = (unanswered, &next) {
            eprintln!(
                "warning: polling the token endpoint brought no answer ({e}); trying again in {} s",
                wait.as_secs()
            );
        }
    }
}

/// `text` as a QR code in Unicode half blocks (two rows per line), dark on light with
/// the quiet zone; `None` if it does not fit in one.
fn qr_code(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build(),
    )
}

/// What the person at the terminal does next.
fn print_instructions(credential: &str, auth: &DeviceAuthorization) {
    println!("To authorize credential {credential:?}, open this page in a browser on any device and enter the code:\n");
    println!("  {}", auth.verification_uri);
    println!("  code: {}\n", auth.user_code);
    if let Some(complete) = &auth.verification_uri_complete {
        println!("Or open this address, which carries the code:\n\n  {complete}\n");
    }
    // A phone can scan it; only on a terminal, where half-block characters render.
    if std::io::stdout().is_terminal() {
        let scanned = auth
            .verification_uri_complete
            .as_deref()
            .unwrap_or(&auth.verification_uri);
        if let Some(qr) = qr_code(scanned) {
            println!("Or scan it:\n\n{qr}");
        }
    }
    println!(
        "Waiting for the approval (the code expires in {}; polling every {} s) ...",
        minutes(auth.expires_in),
        auth.interval.as_secs()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verification_url_becomes_a_square_qr_code() {
        let qr = qr_code("https://login.example.com/device?user_code=WDJB-MJHT").unwrap();
        let lines: Vec<&str> = qr.lines().collect();
        let width = lines[0].chars().count();
        // Two modules per line: about half as many lines as columns, all as wide.
        assert!(width >= 21 && lines.iter().all(|l| l.chars().count() == width));
        assert!(
            lines.len() * 2 >= width && lines.len() * 2 <= width + 2,
            "{qr}"
        );
        assert!(
            qr.chars()
                .all(|c| " \u{2580}\u{2584}\u{2588}\n".contains(c)),
            "{qr}"
        );
    }
}
