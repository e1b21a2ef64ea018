//! Bearer tokens of the worker's protected endpoints (`/admin/*`, and the served
//! agents at `/mcp` and `/a2a/*`): read from an environment variable, compared in
//! constant time.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use subtle::ConstantTimeEq;

/// A bearer token; `None` disables what it protects.
#[derive(Clone)]
pub struct BearerToken(Option<String>);

impl BearerToken {
    /// Reads the token from `env`; unset or empty disables what it protects.
    pub fn from_env(env: &str) -> Self {
        Self(std::env::var(env).ok().filter(|t| !t.is_empty()))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    fn accepts(&self, presented: &str) -> bool {
        let Some(expected) = &self.0 else {
            return false;
        };
        // Constant time, so timing does not reveal how much of a guess was right
        // (`ct_eq` on slices of different lengths is false; the length is no secret).
        bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// `None` when `headers` carry this token as `Authorization: Bearer <token>`;
    /// otherwise the answer: 403 while no token is set (`disabled` says which setting
    /// enables it), 401 for a missing or wrong one.
    pub(crate) fn refusal(&self, headers: &HeaderMap, disabled: &str) -> Option<Response> {
        if !self.is_set() {
            return Some(
                (
                    StatusCode::FORBIDDEN,
                    axum::Json(json!({ "error": disabled })),
                )
                    .into_response(),
            );
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(token) if self.accepts(token) => None,
            _ => Some(
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    axum::Json(
                        json!({ "error": "a valid `Authorization: Bearer <token>` header is required" }),
                    ),
                )
                    .into_response(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BearerToken;

    #[test]
    fn the_token_must_match_exactly() {
        let token = BearerToken(Some("s3cret-token".to_owned()));
        assert!(token.accepts("s3cret-token"));
        for wrong in [
            "",
            "s3cret",
            "s3cret-tokeN",
            "s3cret-token ",
            "x3cret-token",
        ] {
            assert!(!token.accepts(wrong), "{wrong:?}");
        }
        assert!(!BearerToken(None).accepts(""));
    }
}
