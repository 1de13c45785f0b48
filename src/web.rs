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
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::Duration,
};

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
#[derive(Clone)]
struct Asset {
    body: Arc<str>,
    content_type: &'static str,
    etag: HeaderValue,
    csp: bool,
}

impl Asset {
    fn new(body: impl Into<Arc<str>>, content_type: &'static str) -> Self {
        let body: Arc<str> = body.into();
        let mut h = DefaultHasher::new();
        body.hash(&mut h);
        let etag = HeaderValue::try_from(format!("\"{:016x}\"", h.finish()))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
        Self {
            body,
            content_type,
            etag,
            csp: false,
        }
    }

    fn respond(&self, request: &HeaderMap) -> Response {
        let fresh = request
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes() == self.etag.as_bytes());
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            (StatusCode::OK, self.body.to_string()).into_response()
        };
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(header::ETAG, self.etag.clone());
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
        let mut page = Asset::new(html, HTML);
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
