//! The setup check: a live OAuth 2.0 client-credentials request with the integration's stored
//! App ID and secret, against `{login_url}/{tenantId or botframework.com}/oauth2/v2.0/token`.
//! Failures get a stable code and a message that quotes neither the secret nor the tenant (the
//! token endpoint's own description can name the directory, so it is not passed on).

use std::sync::Arc;
use std::time::Duration;

use metrics::counter;

use crate::connector::{TokenError, TokenProvider};
use crate::registry::{Integration, SetupResult, SetupStatus};
use crate::store::now_ms;
use crate::telemetry::SETUP_CHECKS;

pub struct SetupChecker {
    tokens: Arc<TokenProvider>,
    timeout: Duration,
}

impl SetupChecker {
    pub fn new(tokens: Arc<TokenProvider>, timeout: Duration) -> Self {
        Self { tokens, timeout }
    }

    pub async fn check(&self, integration: &Integration) -> SetupResult {
        let outcome = match integration.credentials.as_deref() {
            Some(credentials) if !credentials.app_secret.is_empty() => {
                match tokio::time::timeout(self.timeout, self.tokens.check(credentials)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(classify(&error)),
                    Err(_) => Err((
                        "token_endpoint_unreachable",
                        format!(
                            "the token endpoint did not answer within {} ms",
                            self.timeout.as_millis()
                        ),
                    )),
                }
            }
            Some(_) => Err((
                "missing_credentials",
                "botFrameworkAppSecret is not set: update the integration with the App Secret"
                    .to_owned(),
            )),
            // Development mode has no credentials to check: it is set up as configured.
            None if integration.is_development() => Ok(()),
            None => Err((
                "missing_credentials",
                "botFrameworkAppId is not set: update the integration with the App ID and secret"
                    .to_owned(),
            )),
        };
        let checked_at = Some(now_ms());
        match outcome {
            Ok(()) => {
                counter!(SETUP_CHECKS, "result" => "ok").increment(1);
                SetupResult {
                    status: SetupStatus::Succeeded,
                    checked_at,
                    code: None,
                    message: None,
                }
            }
            Err((code, message)) => {
                counter!(SETUP_CHECKS, "result" => code).increment(1);
                SetupResult {
                    status: SetupStatus::Failed,
                    checked_at,
                    code: Some(code.to_owned()),
                    message: Some(message),
                }
            }
        }
    }
}

/// Maps a token endpoint failure to the troubleshooting cases of the setup documentation.
fn classify(error: &TokenError) -> (&'static str, String) {
    match error {
        TokenError::Refused {
            status,
            error,
            aadsts,
        } => {
            let code = aadsts.as_deref().unwrap_or("");
            let detail = if code.is_empty() {
                format!("HTTP {status}, {error}")
            } else {
                format!("HTTP {status}, {error}, {code}")
            };
            match code {
                // Invalid or expired client secret.
                "AADSTS7000215" | "AADSTS7000222" => (
                    "invalid_secret",
                    format!(
                        "the App Secret was refused ({detail}): it may have expired or been regenerated; update botFrameworkAppSecret"
                    ),
                ),
                // The app is not registered in that directory, or the directory does not exist.
                "AADSTS700016" | "AADSTS90002" | "AADSTS900023" | "AADSTS90023" => (
                    "wrong_tenant",
                    format!(
                        "the App ID is not registered in the tenant used for the check ({detail}): for a single-tenant bot set tenantId to its directory ID, for a multi-tenant bot clear it"
                    ),
                ),
                _ if error == "invalid_client" => (
                    "invalid_secret",
                    format!("the client credentials were refused ({detail})"),
                ),
                _ => (
                    "credentials_refused",
                    format!("the token endpoint refused the credentials ({detail})"),
                ),
            }
        }
        TokenError::Unreachable(_) => (
            "token_endpoint_unreachable",
            "the token endpoint could not be reached".to_owned(),
        ),
        TokenError::Invalid(_) => (
            "token_endpoint_invalid",
            "the token endpoint answered without a usable token".to_owned(),
        ),
        TokenError::NoSecret => (
            "missing_credentials",
            "the stored App Secret cannot be opened with this router's master key (or there is \
             none): update the integration with botFrameworkAppSecret"
                .to_owned(),
        ),
    }
}
