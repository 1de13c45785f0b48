//! The attachments API over HTTP: upload, download (ranges, ETag, signed URLs), delete.
//! The rules (limits, who may read, signing) are `crate::files`'; this file maps
//! requests and headers onto them.
//!
//! | method and path | who | result |
//! |---|---|---|
//! | `POST /api/v1/files?name=` | user | `201` + `Attachment` (body: the raw bytes, or a `multipart/form-data` form with one file part) |
//! | `GET /api/v1/files/{id}` | uploader, members of a room it was posted to | the bytes |
//! | `GET /api/v1/files/{id}?u=&exp=&sig=` | holder of a signed URL | the bytes |
//! | `POST /api/v1/files/{id}/url` | as GET | `FileUrl` |
//! | `DELETE /api/v1/files/{id}` | uploader | `Done` |
//!
//! Anyone else gets 404, the same as for an id that does not exist. Every error is the
//! Error JSON (`bearer::ApiError`), with `Connection: close` when the upload's body was
//! left unread (`bearer::close_if_unread`).

use std::ops::Range;

use axum::{
    Json, Router,
    body::Body,
    extract::{
        Path, Query, State,
        rejection::{PathRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;

use super::{
    Ctx,
    bearer::{ApiError, close_if_unread, method_not_allowed, status_of, user},
};
use crate::{
    files::{FileError, multipart, sniff},
    proto::{self, ErrorCode},
    store::FileRecord,
};

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/api/v1/files", post(upload).fallback(method_not_allowed))
        .route(
            "/api/v1/files/{id}",
            get(download).delete(delete).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/files/{id}/url",
            post(signed_url).fallback(method_not_allowed),
        )
        .layer(axum::middleware::from_fn(close_if_unread))
}

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        if matches!(e, FileError::Storage(_) | FileError::Store(_)) {
            tracing::error!(error = %e, "file operation failed");
        }
        Self(status_of(e.code()), e.to_proto())
    }
}

#[derive(Deserialize)]
struct UploadQuery {
    #[serde(default)]
    name: String,
}

async fn upload(
    State(app): State<Ctx>,
    headers: HeaderMap,
    query: Result<Query<UploadQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let user = user(&app, &headers)?;
    let Query(q) = query?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let files = &app.core.files;
    let body = body.into_data_stream();
    let file = match Form::of(&content_type) {
        Form::Raw => files.upload(&user, &q.name, declared, body).await?,
        Form::Multipart => {
            let boundary = multipart::boundary(&content_type).map_err(FileError::from)?;
            files
                .upload_form(&user, &q.name, &boundary, declared, body)
                .await?
        }
        Form::Unsupported(essence) => {
            return Err(ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "an upload is the raw bytes or multipart/form-data with one file \
                         part, not {essence}"
                    ),
                )
                .1,
            ));
        }
    };
    tracing::debug!(file = %file.id, size = file.size, %user, "uploaded");
    Ok((StatusCode::CREATED, Json(file.attachment(""))).into_response())
}

/// What an upload body is, from its Content-Type.
enum Form {
    /// The file's bytes (any other type: the label is ignored, the bytes are sniffed).
    Raw,
    /// `multipart/form-data`: one file part (browsers' FormData, `curl -F`).
    Multipart,
    /// A form encoding whose envelope would be stored as the file: 415.
    Unsupported(String),
}

impl Form {
    fn of(content_type: &str) -> Form {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence == "multipart/form-data" {
            Form::Multipart
        } else if essence.starts_with("multipart/")
            || essence == "application/x-www-form-urlencoded"
        {
            Form::Unsupported(essence)
        } else {
            Form::Raw
        }
    }
}

/// The query of a signed URL.
#[derive(Deserialize)]
struct Signed {
    u: Option<String>,
    exp: Option<String>,
    sig: Option<String>,
}

/// The user a download speaks for: a signed URL's (a bad or expired one reads as a
/// missing file), else the bearer token's.
fn reader(app: &Ctx, headers: &HeaderMap, id: &str, q: &Signed) -> Result<String, ApiError> {
    match (&q.u, &q.exp, &q.sig) {
        (None, None, None) => user(app, headers),
        (Some(u), Some(exp), Some(sig)) => exp
            .parse::<i64>()
            .ok()
            .and_then(|exp| app.core.files.verify(id, u, exp, sig))
            .ok_or_else(|| FileError::NotFound.into()),
        _ => Err(FileError::NotFound.into()),
    }
}

/// A `Range: bytes=...` header against a file of `size` bytes: `Ok(None)` serves the
/// whole file (no header, one we do not handle such as several ranges, or a malformed
/// one, which RFC 9110 lets a server ignore); `Err` is 416.
fn parse_range(value: &str, size: u64) -> Result<Option<Range<u64>>, FileError> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    let range = if a.is_empty() {
        // The last `b` bytes.
        let Some(n) = num(b) else { return Ok(None) };
        if n == 0 || size == 0 {
            return Err(FileError::BadRange);
        }
        size.saturating_sub(n)..size
    } else {
        let Some(start) = num(a) else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            size
        } else {
            match num(b) {
                Some(last) if last >= start => last.saturating_add(1).min(size),
                _ => return Ok(None),
            }
        };
        if start >= size {
            return Err(FileError::BadRange);
        }
        start..end
    };
    Ok(Some(range))
}

/// `Content-Disposition`: inline for types a browser shows safely, a download for
/// everything else; the name as a quoted ASCII fallback plus RFC 8187 UTF-8.
fn disposition(file: &FileRecord) -> String {
    let kind = if sniff::inline(&file.content_type) {
        "inline"
    } else {
        "attachment"
    };
    let name = if file.name.is_empty() {
        "file"
    } else {
        &file.name
    };
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

fn set(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

async fn download(
    State(app): State<Ctx>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<Signed>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let Query(q) = query?;
    let user = reader(&app, &headers, &id, &q)?;
    let files = &app.core.files;
    let file = files.readable(&user, &id).await?;
    let etag = format!("\"{}\"", file.sha256);

    let mut out = HeaderMap::new();
    set(&mut out, header::ETAG, &etag);
    set(&mut out, header::CACHE_CONTROL, "private, max-age=3600");
    set(&mut out, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // Should a browser render it anyway: no scripts, no plugins, no same-origin access.
    set(
        &mut out,
        header::CONTENT_SECURITY_POLICY,
        "sandbox; default-src 'none'",
    );
    let header_str = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if header_str(header::IF_NONE_MATCH)
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, out).into_response());
    }
    set(&mut out, header::ACCEPT_RANGES, "bytes");

    // A Range applies only while the file is still the one If-Range names.
    let if_range_ok = header_str(header::IF_RANGE).is_none_or(|v| v.trim() == etag);
    let range = match header_str(header::RANGE).filter(|_| if_range_ok) {
        Some(v) => match parse_range(v, file.size) {
            Ok(r) => r,
            Err(e) => {
                set(
                    &mut out,
                    header::CONTENT_RANGE,
                    &format!("bytes */{}", file.size),
                );
                // The Error JSON, labelled as such (not with the file's type).
                let mut resp = ApiError::from(e).into_response();
                resp.headers_mut().extend(out);
                return Ok(resp);
            }
        },
        None => None,
    };
    set(&mut out, header::CONTENT_TYPE, &file.content_type);
    set(&mut out, header::CONTENT_DISPOSITION, &disposition(&file));
    let (status, bytes) = match range {
        Some(r) => {
            set(
                &mut out,
                header::CONTENT_RANGE,
                &format!("bytes {}-{}/{}", r.start, r.end - 1, file.size),
            );
            (StatusCode::PARTIAL_CONTENT, r)
        }
        None => (StatusCode::OK, 0..file.size),
    };
    set(
        &mut out,
        header::CONTENT_LENGTH,
        &(bytes.end - bytes.start).to_string(),
    );
    let stream = files.read(&file, bytes).await?;
    Ok((status, out, Body::from_stream(stream)).into_response())
}

async fn delete(
    State(app): State<Ctx>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let user = user(&app, &headers)?;
    app.core.files.delete(&user, &id).await?;
    Ok(Json(proto::Done {}).into_response())
}

async fn signed_url(
    State(app): State<Ctx>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let user = user(&app, &headers)?;
    let signed = app.core.files.sign(&user, &id).await?;
    Ok(Json(proto::FileUrl {
        url: signed.url,
        expires_at: signed.expires_at,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |v: &str| parse_range(v, 100).ok();
        assert_eq!(r("bytes=0-9"), Some(Some(0..10)));
        assert_eq!(r("bytes=90-"), Some(Some(90..100)));
        assert_eq!(r("bytes=-5"), Some(Some(95..100)));
        assert_eq!(r("bytes=-500"), Some(Some(0..100)));
        assert_eq!(r("bytes=50-500"), Some(Some(50..100)));
        assert_eq!(r("bytes=0-1,5-6"), Some(None));
        assert_eq!(r("bytes=9-3"), Some(None));
        assert_eq!(r("items=1-2"), Some(None));
        assert_eq!(r("bytes=x-"), Some(None));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=-0", 100).is_err());
    }
}
