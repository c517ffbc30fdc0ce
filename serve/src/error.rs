//! Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}` with the
//! HTTP status that says whose fault it was.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to the client. `param` names the request field at fault, if any.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (503 backpressure).
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or a value is out of range; `param` names the field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.into());
        e
    }

    /// 400 without a single field to blame (e.g. the body is not JSON).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400: prompt plus completion do not fit the context.
    pub fn context_overflow(param: &str, message: String) -> ApiError {
        let mut e = Self::invalid(param, message);
        e.code = Some("context_length_exceeded");
        e
    }

    /// 404: no model of that name is loaded.
    pub fn model_not_found(name: &str, loaded: &[String]) -> ApiError {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model '{name}' does not exist; loaded models: {}",
                loaded.join(", ")
            ),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 401: the API key is missing or wrong.
    pub fn unauthorized(message: &str) -> ApiError {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    /// 503 with `Retry-After`: the queue is full; the client should come back later.
    pub fn overloaded(message: String) -> ApiError {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_overloaded",
            message,
        );
        e.retry_after = Some(1);
        e
    }

    /// 503: the models are still loading, or the server is shutting down.
    pub fn unavailable(message: &str) -> ApiError {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_unavailable",
            message,
        )
    }

    /// 500: a failure of the server itself (e.g. non-finite logits from a damaged file).
    pub fn internal(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// Any other status with an OpenAI-shaped body (413 from the body limit, 408 timeouts,
    /// 404 for an unknown route, 405).
    pub fn status(status: StatusCode, message: impl Into<String>) -> ApiError {
        Self::new(status, "invalid_request_error", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
