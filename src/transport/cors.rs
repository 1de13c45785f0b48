//! CORS for browsers on other origins: the origins `server.allowed_origins` names (or
//! same-origin), echoed back with credentials allowed; never a wildcard with credentials.
//!
//! [`layer`] is tower-http's CORS layer, on every route but the WebSocket upgrades.
//! [`Late`] gives `/poll` the same answers without holding them: tower-http computes a
//! response's CORS headers when the request comes and keeps them (a `HeaderMap`, ~400 B
//! on the heap, and the request's `Origin` value, which shares hyper's read buffer) in
//! its future until the response; a pending long-poll is that future for up to a
//! minute. [`Late`] keeps only a copy of the allowed origin and writes the rest, which
//! never varies, on the response. A test holds the two to the same headers.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use axum::{
    extract::Request,
    http::{HeaderName, HeaderValue, Method, header},
    response::Response,
};
use bytes::Bytes;
use futures_util::future::Either;
use tower::Layer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::origin_allowed;
use crate::config::Config;

/// The response header a browser script may read besides the safelisted ones.
const EXPOSE: &str = "x-parley-cursor";

/// tower-http's CORS for every CORS route; see the module's note.
pub fn layer(config: Arc<Config>) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, parts| {
            let mut headers = parts.headers.clone();
            headers.insert(header::ORIGIN, origin.clone());
            origin_allowed(&config.server, &headers, &parts.uri)
        }))
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("last-event-id"),
            header::RANGE,
        ])
        .expose_headers([HeaderName::from_static(EXPOSE)])
        .max_age(std::time::Duration::from_secs(600))
}

/// [`layer`]'s answers, with nothing held while the request runs but the allowed
/// origin; see the module's note. A preflight (`OPTIONS`) is answered by [`layer`]
/// itself (boxed: it is rare, and its future would be room in every request's).
#[derive(Clone)]
pub struct Late<S> {
    config: Arc<Config>,
    inner: S,
}

impl<S> Late<S> {
    pub fn new(config: Arc<Config>, inner: S) -> Self {
        Self { config, inner }
    }
}

type Preflight = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> tower::Service<Request> for Late<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<LateFuture<S::Future>, Preflight>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if req.method() == Method::OPTIONS {
            // tower-http answers it without calling the inner service.
            let cors = layer(self.config.clone()).layer(self.inner.clone());
            return Either::Right(Box::pin(tower::ServiceExt::oneshot(cors, req)));
        }
        // tower-http's predicate, as it calls it (with the request's first `Origin`). A
        // copy, not the request's value: that one shares hyper's read buffer.
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .filter(|_| origin_allowed(&self.config.server, req.headers(), req.uri()))
            .map(|o| Box::from(o.as_bytes()));
        Either::Left(LateFuture {
            inner: self.inner.call(req),
            origin,
        })
    }
}

pin_project_lite::pin_project! {
    /// [`Late`]'s future: the inner one, then the CORS headers on its response.
    pub struct LateFuture<F> {
        #[pin]
        inner: F,
        // The allowed origin's bytes (a `HeaderValue` is 40 bytes inline).
        origin: Option<Box<[u8]>>,
    }
}

impl<F> Future for LateFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        // As tower-http writes them: `Vary` added to any the response has, the others
        // replacing theirs, in its order.
        let h = response.headers_mut();
        h.append(
            header::VARY,
            HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE),
        );
        if let Some(origin) = this.origin.take()
            && let Ok(origin) = HeaderValue::from_maybe_shared(Bytes::from(origin))
        {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::StatusCode};
    use tower::ServiceExt;

    use super::*;

    /// A response with a `Vary` and an `Access-Control-Expose-Headers` of its own.
    async fn inner(_: Request) -> Result<Response, Infallible> {
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::VARY, "accept-encoding")
            .header(header::ACCESS_CONTROL_EXPOSE_HEADERS, "x-other")
            .body(Body::empty())
            .unwrap())
    }

    fn request(method: &Method, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().method(method).uri("/poll?session_id=s");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    fn lines(r: &Response) -> Vec<(String, Vec<u8>)> {
        r.headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    /// [`Late`] answers every request as tower-http's layer does: headers, values and
    /// order, for a request without an origin, the same origin, an allowed one, another,
    /// one that is not text, and a preflight.
    #[tokio::test]
    async fn late_cors_answers_as_tower_http_does() {
        let mut config = Config::default();
        config.server.allowed_origins = vec!["https://app.example".into()];
        let config = Arc::new(config);
        let cases: [(Method, Vec<(&str, &str)>); 7] = [
            (Method::GET, vec![]),
            (Method::GET, vec![("origin", "https://app.example")]),
            (
                Method::HEAD,
                vec![("origin", "http://h.example"), ("host", "h.example")],
            ),
            (Method::GET, vec![("origin", "https://evil.example")]),
            (Method::POST, vec![("origin", "https://app.example")]),
            (
                Method::OPTIONS,
                vec![
                    ("origin", "https://app.example"),
                    ("access-control-request-method", "GET"),
                ],
            ),
            (
                Method::OPTIONS,
                vec![
                    ("origin", "https://evil.example"),
                    ("access-control-request-method", "GET"),
                ],
            ),
        ];
        for (method, headers) in cases {
            let inner = tower::service_fn(inner);
            let ours = Late::new(config.clone(), inner)
                .oneshot(request(&method, &headers))
                .await
                .unwrap();
            let theirs = layer(config.clone())
                .layer(inner)
                .oneshot(request(&method, &headers))
                .await
                .unwrap();
            assert_eq!(ours.status(), theirs.status(), "{method} {headers:?}");
            assert_eq!(lines(&ours), lines(&theirs), "{method} {headers:?}");
        }
        // Not text: tower-http's predicate is still asked (and `origin_allowed` lets it
        // through, as if there were none).
        let bytes = HeaderValue::from_bytes(b"https://\xffx.example").unwrap();
        let mut a = request(&Method::GET, &[]);
        a.headers_mut().insert(header::ORIGIN, bytes.clone());
        let mut b = request(&Method::GET, &[]);
        b.headers_mut().insert(header::ORIGIN, bytes);
        let inner = tower::service_fn(inner);
        let ours = Late::new(config.clone(), inner).oneshot(a).await.unwrap();
        let theirs = layer(config).layer(inner).oneshot(b).await.unwrap();
        assert_eq!(lines(&ours), lines(&theirs));
    }
}
