//! The browser side of parley, served by parley itself: the SDK bundles built from `web/`
//! (the ES module `/sdk/parley.js`, the script-tag build `/sdk/parley.global.js` that
//! defines `parley`, their source maps and the type declarations `/sdk/parley.d.ts`), the
//! demo chat page
//! (`/` and `/demo/*`, when `web.demo` is on), and — only in development mode
//! (`web.dev_tokens`) — `POST /api/v1/dev/token`, which mints a token for any user name
//! so the demo page can sign in without an auth service.
//!
//! The files are the committed build (`web/dist/`) and demo sources (`web/demo/`),
//! embedded at compile time; `scripts/test-web` fails when the build is stale against the
//! TypeScript sources. The router is generic over the caller's state: it owns nothing of
//! the server's and knows only the configuration.

use std::{
    hash::{DefaultHasher, Hasher},
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};

use crate::{
    auth::{Authenticator, valid_user_id},
    config::Config,
};

const SDK_JS: &str = include_str!("../web/dist/parley.js");
const SDK_DTS: &str = include_str!("../web/dist/parley.d.ts");
const SDK_MAP: &str = include_str!("../web/dist/parley.js.map");
const SDK_GLOBAL: &str = include_str!("../web/dist/parley.global.js");
const SDK_GLOBAL_MAP: &str = include_str!("../web/dist/parley.global.js.map");
const DEMO_HTML: &str = include_str!("../web/demo/index.html");
const DEMO_JS: &str = include_str!("../web/demo/app.js");
const DEMO_CSS: &str = include_str!("../web/demo/app.css");

/// Marker in `index.html` replaced by `true` or `false` (is development mode on).
const DEV_MARKER: &str = "{{PARLEY_DEV_TOKENS}}";

const JS: &str = "text/javascript; charset=utf-8";
const TS: &str = "application/typescript; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const MAP: &str = "application/json; charset=utf-8";

/// The demo page loads only what parley serves and talks only to its own origin.
const DEMO_CSP: &str = "default-src 'self'; img-src 'self' data:; connect-src 'self'; \
                        frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// One embedded file: its bytes, type and a strong ETag. Browsers revalidate
/// (`Cache-Control: no-cache`) and get `304 Not Modified` while the build is unchanged,
/// so a new parley binary is picked up at once without serving stale SDK code.
///
/// The body points into the binary's read-only data (`Bytes::from_static`): it is not
/// copied onto the heap at start (that was 620 KiB of every process's heap, SDK source
/// maps included, whether or not anything was ever fetched) nor per response, and its
/// ETag is hashed at the first request, so a server that never serves a file never
/// reads (faults in) its pages. Only the demo page, which gets the development-mode
/// flag written into it, is built at start.
#[derive(Clone)]
struct Asset {
    body: Bytes,
    content_type: &'static str,
    etag: Arc<OnceLock<HeaderValue>>,
    csp: bool,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Self {
        Self::with_body(Bytes::from_static(body.as_bytes()), content_type)
    }

    fn owned(body: String, content_type: &'static str) -> Self {
        Self::with_body(Bytes::from(body), content_type)
    }

    fn with_body(body: Bytes, content_type: &'static str) -> Self {
        Self {
            body,
            content_type,
            etag: Arc::default(),
            csp: false,
        }
    }

    /// A strong ETag: the body's hash, computed as a `str`'s (its bytes, then 0xff), so
    /// an unchanged build keeps the ETags it had.
    fn etag(&self) -> &HeaderValue {
        self.etag.get_or_init(|| {
            let mut h = DefaultHasher::new();
            h.write(&self.body);
            h.write_u8(0xff);
            HeaderValue::try_from(format!("\"{:016x}\"", h.finish()))
                .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
        })
    }

    fn respond(&self, request: &HeaderMap) -> Response {
        let fresh = request
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes() == self.etag().as_bytes());
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            (StatusCode::OK, self.body.clone()).into_response()
        };
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(header::ETAG, self.etag().clone());
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if self.csp {
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(DEMO_CSP),
            );
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
        }
        response
    }
}

fn serve<S: Clone + Send + Sync + 'static>(asset: Asset) -> axum::routing::MethodRouter<S> {
    get(move |headers: HeaderMap| async move { asset.respond(&headers) })
}

/// The routes for the SDK, the demo page and (in development mode) dev tokens.
pub fn routes<S: Clone + Send + Sync + 'static>(config: &Config) -> Router<S> {
    let web = &config.web;
    let mut router = Router::new()
        .route("/sdk/parley.js", serve(Asset::new(SDK_JS, JS)))
        .route("/sdk/parley.d.ts", serve(Asset::new(SDK_DTS, TS)))
        .route("/sdk/parley.js.map", serve(Asset::new(SDK_MAP, MAP)))
        .route("/sdk/parley.global.js", serve(Asset::new(SDK_GLOBAL, JS)))
        .route(
            "/sdk/parley.global.js.map",
            serve(Asset::new(SDK_GLOBAL_MAP, MAP)),
        );
    if web.demo {
        let html = DEMO_HTML.replace(DEV_MARKER, if web.dev_tokens { "true" } else { "false" });
        let mut page = Asset::owned(html, HTML);
        page.csp = true;
        router = router
            .route("/", serve(page))
            .route("/demo/app.js", serve(Asset::new(DEMO_JS, JS)))
            .route("/demo/app.css", serve(Asset::new(DEMO_CSS, CSS)));
    }
    if web.dev_tokens {
        match Authenticator::new(&config.auth) {
            Ok(auth) => {
                tracing::warn!(
                    "DEVELOPMENT MODE: web.dev_tokens is on; POST /api/v1/dev/token hands a \
                     token for any user name to anyone. Never enable it in production"
                );
                let dev = DevTokens {
                    auth: Arc::new(auth),
                    ttl: web.dev_token_ttl,
                };
                router = router.merge(
                    Router::new()
                        .route("/api/v1/dev/token", post(dev_token))
                        .with_state(dev),
                );
            }
            // Cannot happen when the server started (it built the same authenticator);
            // leave the endpoint off rather than fail the router.
            Err(e) => tracing::error!(error = %e, "web.dev_tokens: cannot mint tokens"),
        }
    }
    router
}

#[derive(Clone)]
struct DevTokens {
    auth: Arc<Authenticator>,
    ttl: Duration,
}

#[derive(Deserialize)]
struct DevTokenRequest {
    user: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DevToken {
    user: String,
    token: String,
    expires_in_ms: u64,
}

/// `POST /api/v1/dev/token` with `{"user":"alice"}`: a token for alice. Development only.
async fn dev_token(
    State(dev): State<DevTokens>,
    body: Result<Json<DevTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(req)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"code": "ERROR_CODE_INVALID_ARGUMENT", "message": "expected {\"user\":\"name\"}"})),
        )
            .into_response();
    };
    if !valid_user_id(&req.user) {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"code": "ERROR_CODE_INVALID_ARGUMENT", "message": "user ids are 1-128 bytes of A-Z a-z 0-9 _ . @ | + -"})),
        )
            .into_response();
    }
    match dev.auth.mint(&req.user, dev.ttl) {
        Ok(token) => {
            let mut r = Json(DevToken {
                user: req.user,
                token,
                expires_in_ms: dev.ttl.as_millis() as u64,
            })
            .into_response();
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"code": "ERROR_CODE_INTERNAL", "message": e.to_string()})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{DefaultHasher, Hash, Hasher};

    use super::{Asset, JS, SDK_JS};

    /// The body is no longer a `str` on the heap; its ETag must still be the hash of the
    /// text as a `str`, so a client's cached copy of an unchanged build stays fresh.
    #[test]
    fn an_assets_etag_is_its_texts_str_hash() {
        let mut h = DefaultHasher::new();
        SDK_JS.hash(&mut h);
        let want = format!("\"{:016x}\"", h.finish());
        let asset = Asset::new(SDK_JS, JS);
        assert_eq!(asset.etag().to_str().unwrap(), want);
        assert_eq!(&asset.body[..], SDK_JS.as_bytes());
        let page = Asset::owned("<p>x</p>".to_string(), JS);
        let mut h = DefaultHasher::new();
        "<p>x</p>".hash(&mut h);
        assert_eq!(
            page.etag().to_str().unwrap(),
            format!("\"{:016x}\"", h.finish())
        );
    }
}
