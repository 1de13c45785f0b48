//! Attachments end to end: real bytes over real HTTP against a server on an ephemeral
//! port. Upload and download round trips (an image with its facts, ranges, ETag),
//! authorization on every path (non-member, guessed id, someone else's or an expired
//! signed URL: all 404), content-type sniffing (HTML labelled as an image is served as a
//! download), limits (size, quota, rate) leaving nothing behind, orphan cleanup,
//! deletion, a 50 MB file through the real binary with its memory measured, and the S3
//! backend against a moto server started here.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{TestServer, code_of, eventually};
use futures_util::StreamExt;
use parley::{
    codec::Encoding,
    config::{Config, FileBackend},
    proto::{self, ErrorCode, client_frame::Cmd, server_frame::Kind},
};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_parley");

/// A per-test directory for uploaded bytes, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("parley-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }

    /// The blobs stored under it.
    fn blobs(&self) -> usize {
        std::fs::read_dir(self.0.join("files")).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('#'))
                .count()
        })
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn server(dir: &Dir, edit: impl FnOnce(&mut Config)) -> TestServer {
    let path = dir.0.to_string_lossy().into_owned();
    TestServer::start_with(move |c| {
        c.files.dir = path;
        edit(c);
    })
    .await
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(t: &TestServer) -> Self {
        Self {
            base: format!("http://{}", t.addr()),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn upload(&self, token: &str, name: &str, bytes: Vec<u8>) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/api/v1/files?name={name}")))
            .bearer_auth(token)
            .header("content-type", "image/png")
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    async fn upload_ok(&self, token: &str, name: &str, bytes: Vec<u8>) -> proto::Attachment {
        let r = self.upload(token, name, bytes).await;
        assert_eq!(r.status(), 201);
        json(r).await
    }

    async fn get(&self, token: Option<&str>, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::of(req.send().await.unwrap()).await
    }

    async fn post(&self, token: &str, path: &str) -> Reply {
        let r = self.http.post(self.url(path)).bearer_auth(token).send();
        Reply::of(r.await.unwrap()).await
    }

    async fn delete(&self, token: &str, path: &str) -> Reply {
        let r = self.http.delete(self.url(path)).bearer_auth(token).send();
        Reply::of(r.await.unwrap()).await
    }
}

/// Uploads a body of unknown length that the server must refuse part way (413). The
/// server answers and closes without reading the rest, so the client may instead see
/// the connection reset while it is still sending; either way nothing may be stored.
async fn refused_while_streaming<S>(api: &Api, token: &str, chunks: S)
where
    S: futures_util::TryStream + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    bytes::Bytes: From<S::Ok>,
{
    let sent = api
        .http
        .post(api.url("/api/v1/files?name=s"))
        .bearer_auth(token)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    match sent {
        Ok(r) => {
            assert_eq!(r.status(), 413);
            assert_eq!(Reply::of(r).await.error(), ErrorCode::FileTooLarge);
        }
        Err(e) => eprintln!("refused upload: connection closed while sending ({e})"),
    }
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

impl Reply {
    async fn of(r: reqwest::Response) -> Self {
        Self {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.bytes().await.unwrap(),
        }
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or(""))
    }

    fn error(&self) -> ErrorCode {
        code_of(&serde_json::from_slice::<proto::Error>(&self.body).expect("JSON error"))
    }
}

async fn json<T: serde::de::DeserializeOwned>(r: reqwest::Response) -> T {
    serde_json::from_slice(&r.bytes().await.unwrap()).expect("JSON body")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A small PNG: a 64x48 gradient.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn send_with(room: &str, id: &str, attachments: Vec<proto::Attachment>) -> Cmd {
    Cmd::Send(proto::Send {
        room: room.into(),
        client_msg_id: id.into(),
        body: "look".into(),
        attachments,
        ..Default::default()
    })
}

fn attach(file_id: &str) -> proto::Attachment {
    proto::Attachment {
        file_id: file_id.into(),
        ..Default::default()
    }
}

/// Uploads and downloads over HTTP/2 (h2c with prior knowledge; a browser on HTTPS
/// multiplexes them the same way): six bodies of 1.5-1.9 MB at once on one connection,
/// then all six read back at once, each byte for byte. Many DATA frames in both
/// directions, flow-control updates and several streams at a time: the paths of the h2
/// fork's read buffer (allocated when bytes arrive, given back while waiting), write
/// buffer (given back after each flush) and stream slab (shrunk as streams end).
#[tokio::test]
async fn concurrent_uploads_and_downloads_over_one_http2_connection_arrive_intact() {
    let dir = Dir::new("h2");
    let t = server(&dir, |_| {}).await;
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let base = format!("http://{}", t.addr());
    let ann = t.token("ann");
    let bodies: Vec<Vec<u8>> = (0..6u32)
        .map(|i| {
            (0..1_500_000 + i * 77_777)
                .map(|j| (j.wrapping_mul(2_654_435_761_u32.wrapping_add(i)) >> 13) as u8)
                .collect()
        })
        .collect();
    let uploads = futures_util::future::join_all(bodies.iter().enumerate().map(|(i, b)| {
        let sent = http
            .post(format!("{base}/api/v1/files?name=h2-{i}.bin"))
            .bearer_auth(&ann)
            .header("content-type", "application/octet-stream")
            .body(b.clone())
            .send();
        async move {
            let r = sent.await.unwrap();
            assert_eq!(r.version(), reqwest::Version::HTTP_2);
            assert_eq!(r.status(), 201);
            json::<proto::Attachment>(r).await
        }
    }))
    .await;
    let downloads = futures_util::future::join_all(uploads.iter().map(|f| {
        let sent = http
            .get(format!("{base}/api/v1/files/{}", f.file_id))
            .bearer_auth(&ann)
            .send();
        async move {
            let r = sent.await.unwrap();
            assert_eq!(
                (r.version(), r.status().as_u16()),
                (reqwest::Version::HTTP_2, 200)
            );
            r.bytes().await.unwrap()
        }
    }))
    .await;
    for ((body, f), got) in bodies.iter().zip(&uploads).zip(&downloads) {
        assert_eq!(f.size, body.len() as u64);
        assert_eq!(f.sha256, sha256_hex(body));
        assert!(got[..] == body[..], "{} came back changed", f.file_id);
    }
}

#[tokio::test]
async fn an_image_round_trips_with_its_facts_ranges_and_room_access() {
    let dir = Dir::new("image");
    let t = server(&dir, |_| {}).await;
    let api = Api::new(&t);
    let (ann, bob, cat) = (t.token("ann"), t.token("bob"), t.token("cat"));
    let bytes = png();

    let f = api
        .upload_ok(&ann, "sunset%20%C3%A9.png", bytes.clone())
        .await;
    assert_eq!(f.content_type, "image/png");
    assert_eq!((f.width, f.height), (64, 48));
    assert_eq!(f.size, bytes.len() as u64);
    assert_eq!(f.sha256, sha256_hex(&bytes));
    assert_eq!(f.name, "sunset é.png");
    assert!(f.blurhash.len() >= 20, "a BlurHash: {:?}", f.blurhash);
    let path = format!("/api/v1/files/{}", f.file_id);

    // Before it is posted anywhere only the uploader reads it.
    assert_eq!(api.get(Some(&ann), &path, &[]).await.status, 200);
    assert_eq!(api.get(Some(&bob), &path, &[]).await.status, 404);

    // Posted to a room: the message carries the attachment, filled in by the server.
    let mut a = t.client("ann", Encoding::Json).await;
    a.join("pics").await;
    let shown = proto::Attachment {
        name: "shown.png".into(),
        content_type: "text/html".into(), // ignored: the server's facts win
        ..attach(&f.file_id)
    };
    let Kind::Sent(sent) = a.request(send_with("pics", "m1", vec![shown])).await else {
        panic!("sent");
    };
    let pushed = a.next_message().await;
    assert_eq!(pushed.seq, sent.seq);
    assert_eq!(pushed.attachments.len(), 1);
    let att = &pushed.attachments[0];
    assert_eq!(
        (att.name.as_str(), att.content_type.as_str(), att.width),
        ("shown.png", "image/png", 64)
    );

    // Only the uploader may attach the file.
    let mut b = t.client("bob", Encoding::Proto).await;
    b.join("pics").await;
    let Kind::Error(e) = b
        .request(send_with("pics", "m2", vec![attach(&f.file_id)]))
        .await
    else {
        panic!("bob may not attach ann's file");
    };
    assert_eq!(code_of(&e), ErrorCode::InvalidArgument);

    // History (and so sync) returns it too.
    let Kind::History(h) = b
        .request(Cmd::History(proto::History {
            room: "pics".into(),
            ..Default::default()
        }))
        .await
    else {
        panic!("history");
    };
    assert_eq!(h.messages[0].attachments[0].file_id, f.file_id);

    // A member downloads it: bytes, type, ETag, disposition, nosniff.
    let r = api.get(Some(&bob), &path, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes);
    assert_eq!(r.header("content-type"), "image/png");
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    assert_eq!(r.header("accept-ranges"), "bytes");
    let etag = r.header("etag").to_string();
    assert_eq!(etag, format!("\"{}\"", f.sha256));
    let cd = r.header("content-disposition");
    assert!(cd.starts_with("inline;"), "{cd}");
    assert!(cd.contains("filename*=UTF-8''sunset%20%C3%A9.png"), "{cd}");

    // Ranges.
    let r = api.get(Some(&bob), &path, &[("range", "bytes=0-9")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, bytes[..10]);
    let n = bytes.len();
    assert_eq!(r.header("content-range"), format!("bytes 0-9/{n}"));
    let r = api.get(Some(&bob), &path, &[("range", "bytes=-7")]).await;
    assert_eq!((r.status, &r.body[..]), (206, &bytes[n - 7..]));
    let r = api.get(Some(&bob), &path, &[("range", "bytes=20-")]).await;
    assert_eq!((r.status, &r.body[..]), (206, &bytes[20..]));
    let r = api
        .get(Some(&bob), &path, &[("range", &format!("bytes={n}-"))])
        .await;
    assert_eq!(r.status, 416);
    assert_eq!(r.error(), ErrorCode::RangeNotSatisfiable);
    // The Error JSON, labelled as JSON (not as the file's image/png).
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("content-range"), format!("bytes */{n}"));
    // A stale If-Range gets the whole file; a matching If-None-Match gets 304.
    let r = api
        .get(
            Some(&bob),
            &path,
            &[("range", "bytes=0-9"), ("if-range", "\"old\"")],
        )
        .await;
    assert_eq!((r.status, r.body.len()), (200, n));
    let r = api
        .get(Some(&bob), &path, &[("if-none-match", &etag)])
        .await;
    assert_eq!((r.status, r.body.len()), (304, 0));

    // Everyone else: 404, never 403; no token: 401.
    assert_eq!(api.get(Some(&cat), &path, &[]).await.status, 404);
    let guessed = "/api/v1/files/0123456789abcdef0123456789abcdef";
    let r = api.get(Some(&ann), guessed, &[]).await;
    assert_eq!((r.status, r.error()), (404, ErrorCode::NotFound));
    assert_eq!(
        api.get(Some(&ann), "/api/v1/files/..%2F..%2Fetc", &[])
            .await
            .status,
        404
    );
    assert_eq!(api.get(None, &path, &[]).await.status, 401);
    assert_eq!(api.post(&cat, &format!("{path}/url")).await.status, 404);
    assert_eq!(api.delete(&cat, &path).await.status, 404);

    // Leaving the room takes the access away.
    b.request(Cmd::Leave(proto::Leave {
        room: "pics".into(),
    }))
    .await;
    assert_eq!(api.get(Some(&bob), &path, &[]).await.status, 404);
    t.server.shutdown();
}

#[tokio::test]
async fn html_labelled_as_an_image_is_served_so_no_browser_runs_it() {
    let dir = Dir::new("html");
    let t = server(&dir, |_| {}).await;
    let api = Api::new(&t);
    let ann = t.token("ann");
    let html = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script>".to_vec();
    let f = api.upload_ok(&ann, "cute.png", html.clone()).await;
    assert_eq!(f.content_type, "application/octet-stream");
    assert_eq!((f.width, f.height, f.blurhash.as_str()), (0, 0, ""));
    let r = api
        .get(Some(&ann), &format!("/api/v1/files/{}", f.file_id), &[])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, html);
    assert_eq!(r.header("content-type"), "application/octet-stream");
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    assert!(r.header("content-disposition").starts_with("attachment;"));
    assert!(r.header("content-security-policy").contains("sandbox"));
    t.server.shutdown();
}

#[tokio::test]
async fn signed_urls_work_without_a_token_for_their_user_until_they_expire() {
    let dir = Dir::new("signed");
    let t = server(&dir, |c| c.files.url_ttl = Duration::from_secs(1)).await;
    let api = Api::new(&t);
    let (ann, bob) = (t.token("ann"), t.token("bob"));
    let f = api.upload_ok(&ann, "a.png", png()).await;
    let mut a = t.client("ann", Encoding::Json).await;
    a.join("r").await;
    let mut b = t.client("bob", Encoding::Json).await;
    b.join("r").await;
    assert!(matches!(
        a.request(send_with("r", "m", vec![attach(&f.file_id)]))
            .await,
        Kind::Sent(_)
    ));

    let r = api
        .post(&bob, &format!("/api/v1/files/{}/url", f.file_id))
        .await;
    assert_eq!(r.status, 200);
    let signed: proto::FileUrl = serde_json::from_slice(&r.body).unwrap();
    assert!(signed.url.contains("u=bob&") && !signed.url.contains(&bob));
    let r = api.get(None, &signed.url, &[]).await;
    assert_eq!((r.status, r.body.len() as u64), (200, f.size));
    assert_eq!(r.header("content-type"), "image/png");

    // Someone else's name on bob's signature, a bad signature, a missing part: 404.
    for bad in [
        signed.url.replace("u=bob", "u=ann"),
        signed.url.replace("sig=", "sig=x"),
        signed.url.split("&sig=").next().unwrap().to_string(),
    ] {
        assert_eq!(api.get(None, &bad, &[]).await.status, 404, "{bad}");
    }
    // After expiry: 404, even for its own user.
    let wait = (signed.expires_at - parley::auth::now_ms()).max(0) as u64 + 50;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(api.get(None, &signed.url, &[]).await.status, 404);
    t.server.shutdown();
}

#[tokio::test]
async fn limits_refuse_uploads_and_leave_nothing_behind() {
    let dir = Dir::new("limits");
    let t = server(&dir, |c| {
        c.files.max_file_bytes = 1000;
        c.files.user_quota_bytes = 2500;
        c.files.uploads_per_minute = 6;
    })
    .await;
    let api = Api::new(&t);
    let ann = t.token("ann");

    // Too large, declared up front.
    let r = api.upload(&ann, "big", vec![7; 1001]).await;
    assert_eq!(r.status(), 413);
    assert_eq!(Reply::of(r).await.error(), ErrorCode::FileTooLarge);
    // Too large, found while streaming (no Content-Length).
    let chunks = futures_util::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![1u8; 100]))),
    );
    refused_while_streaming(&api, &ann, chunks).await;
    assert_eq!(dir.blobs(), 0, "a refused upload leaves no bytes");

    // The quota: two of 1000 fit in 2500, a third does not.
    api.upload_ok(&ann, "1", vec![1; 1000]).await;
    api.upload_ok(&ann, "2", vec![2; 1000]).await;
    let r = api.upload(&ann, "3", vec![3; 1000]).await;
    assert_eq!(r.status(), 413);
    assert_eq!(Reply::of(r).await.error(), ErrorCode::QuotaExceeded);
    assert_eq!(dir.blobs(), 2);
    // Another user has their own quota; then the rate limit (6 a minute) bites.
    let bob = t.token("bob");
    for i in 0..6 {
        let r = api.upload(&bob, "x", vec![i; 10]).await;
        assert_eq!(r.status(), 201);
    }
    let r = api.upload(&bob, "x", vec![9; 10]).await;
    assert_eq!(r.status(), 429);
    let r = Reply::of(r).await;
    assert_eq!(r.error(), ErrorCode::RateLimited);
    // When to come back: Retry-After (whole seconds) and retryAfterMs, as every 429.
    let secs: u64 = r.header("retry-after").parse().expect("Retry-After");
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    let e: proto::Error = serde_json::from_slice(&r.body).unwrap();
    assert!(
        e.retry_after_ms > 0 && u64::from(e.retry_after_ms) <= 60_000,
        "retryAfterMs {}",
        e.retry_after_ms
    );
    assert_eq!(u64::from(e.retry_after_ms).div_ceil(1000), secs);
    assert_eq!(dir.blobs(), 8);
    t.server.shutdown();
}

#[tokio::test]
async fn unattached_uploads_are_cleaned_up_and_uploaders_delete_files() {
    let dir = Dir::new("orphans");
    let t = server(&dir, |c| c.files.orphan_ttl = Duration::from_millis(300)).await;
    let api = Api::new(&t);
    let (ann, bob) = (t.token("ann"), t.token("bob"));
    let orphan = api.upload_ok(&ann, "o", b"never posted".to_vec()).await;
    let kept = api.upload_ok(&ann, "k", b"posted".to_vec()).await;
    let mut a = t.client("ann", Encoding::Json).await;
    a.join("r").await;
    // Attached through the HTTP API this time.
    let post = serde_json::json!({
        "clientMsgId": "m",
        "body": "kept",
        "attachments": [{"fileId": kept.file_id}],
    });
    let r = api
        .http
        .post(api.url("/api/v1/rooms/r/messages"))
        .bearer_auth(&ann)
        .header("content-type", "application/json")
        .body(post.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(dir.blobs(), 2);
    eventually("the orphan is deleted", || dir.blobs() == 1).await;
    let get = |id: &str| format!("/api/v1/files/{id}");
    assert_eq!(
        api.get(Some(&ann), &get(&orphan.file_id), &[]).await.status,
        404
    );
    assert_eq!(
        api.get(Some(&ann), &get(&kept.file_id), &[]).await.status,
        200
    );

    // Deleting: only the uploader; afterwards the file is gone for everyone.
    assert_eq!(api.delete(&bob, &get(&kept.file_id)).await.status, 404);
    assert_eq!(api.delete(&ann, &get(&kept.file_id)).await.status, 200);
    assert_eq!(
        api.get(Some(&ann), &get(&kept.file_id), &[]).await.status,
        404
    );
    assert_eq!(dir.blobs(), 0);
    // The message keeps its attachment entry.
    let Kind::History(h) = a
        .request(Cmd::History(proto::History {
            room: "r".into(),
            ..Default::default()
        }))
        .await
    else {
        panic!("history");
    };
    assert_eq!(h.messages[0].attachments[0].file_id, kept.file_id);
    t.server.shutdown();
}

/// A `multipart/form-data` body as browsers and curl build it: one part per (field name,
/// file name if a file, bytes).
fn form(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, bytes) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let head = match filename {
            Some(f) => format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            ),
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
        };
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

const BOUNDARY: &str = "----WebKitFormBoundary7MA4YWxkTrZu0gW";

impl Api {
    async fn upload_form(&self, token: &str, content_type: &str, body: reqwest::Body) -> Reply {
        let r = self
            .http
            .post(self.url("/api/v1/files"))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        Reply::of(r).await
    }
}

#[tokio::test]
async fn a_multipart_upload_stores_the_file_not_its_envelope() {
    let dir = Dir::new("multipart");
    let t = server(&dir, |c| c.files.max_file_bytes = 100_000).await;
    let api = Api::new(&t);
    let ann = t.token("ann");
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");

    // What FormData sends: the file's bytes are stored, named by the part's filename.
    let data = noise(3, 1000);
    let body = form(BOUNDARY, &[("file", Some("report.bin"), &data)]);
    let r = api.upload_form(&ann, &ct, body.into()).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let f: proto::Attachment = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(f.size, 1000, "the envelope is not stored");
    assert_eq!(f.sha256, sha256_hex(&data));
    assert_eq!(f.name, "report.bin");
    let got = api
        .get(Some(&ann), &format!("/api/v1/files/{}", f.file_id), &[])
        .await;
    assert_eq!(got.body, data);

    // An image in a form gets its facts; its file name is cleaned like any upload name.
    let img = png();
    let body = form(
        BOUNDARY,
        &[("file", Some("C:\\x\\..\\pic\u{202E}gnp.exe"), &img)],
    );
    let r = api.upload_form(&ann, &ct, body.into()).await;
    assert_eq!(r.status, 201);
    let f: proto::Attachment = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (f.name.as_str(), f.content_type.as_str()),
        ("picgnp.exe", "image/png")
    );
    assert_eq!((f.width, f.size), (64, img.len() as u64));
    assert!(!f.blurhash.is_empty());

    // Streamed in small chunks without a Content-Length (chunked), the name from ?name=.
    let body = form(BOUNDARY, &[("file", Some("ignored"), &data)]);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = body
        .chunks(7)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let r = api
        .http
        .post(api.url("/api/v1/files?name=chosen.bin"))
        .bearer_auth(&ann)
        .header("content-type", &ct)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let f: proto::Attachment = json(r).await;
    assert_eq!(
        (f.size, f.sha256.as_str()),
        (1000, sha256_hex(&data).as_str())
    );
    assert_eq!(f.name, "chosen.bin");
    let stored = dir.blobs();

    // Refused (400 and the Error JSON), leaving nothing behind: two parts, a field that
    // is not a file, no closing boundary, headers over the limit, no boundary parameter.
    let long_header = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\nX-Pad: {}\r\n\r\nxx\r\n--{BOUNDARY}--\r\n",
        "p".repeat(9000)
    );
    let mut unterminated = form(BOUNDARY, &[("file", Some("a"), &data)]);
    unterminated.truncate(unterminated.len() - BOUNDARY.len() - 8);
    for (what, ct, body) in [
        (
            "two parts",
            ct.clone(),
            form(
                BOUNDARY,
                &[("file", Some("a"), &data[..10]), ("file", Some("b"), &data)],
            ),
        ),
        (
            "a field, not a file",
            ct.clone(),
            form(BOUNDARY, &[("file", None, &data)]),
        ),
        ("no closing boundary", ct.clone(), unterminated),
        ("long headers", ct.clone(), long_header.into_bytes()),
        (
            "no boundary",
            "multipart/form-data".to_string(),
            form(BOUNDARY, &[("file", Some("a"), &data)]),
        ),
    ] {
        let r = api.upload_form(&ann, &ct, body.into()).await;
        assert_eq!(r.status, 400, "{what}");
        assert_eq!(r.header("content-type"), "application/json", "{what}");
        assert_eq!(r.error(), ErrorCode::InvalidArgument, "{what}");
    }
    // Too large: the file's bytes count, declared (refused before reading, so the client
    // may see the connection close while it still sends) or found while streaming.
    let big = vec![5u8; 200_000];
    let declared = form(BOUNDARY, &[("file", Some("b"), &big)]);
    let streamed: Vec<Result<bytes::Bytes, std::io::Error>> = declared
        .chunks(8192)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    for body in [
        reqwest::Body::from(declared.clone()),
        reqwest::Body::wrap_stream(futures_util::stream::iter(streamed)),
    ] {
        let sent = api
            .http
            .post(api.url("/api/v1/files"))
            .bearer_auth(&ann)
            .header("content-type", &ct)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) => {
                let r = Reply::of(r).await;
                assert_eq!((r.status, r.error()), (413, ErrorCode::FileTooLarge));
            }
            Err(e) => eprintln!("refused form: connection closed while sending ({e})"),
        }
    }
    // Other form encodings would store their envelope: 415.
    for ct in [
        "multipart/mixed; boundary=x",
        "application/x-www-form-urlencoded",
    ] {
        let r = api
            .upload_form(&ann, ct, b"file=report.bin".to_vec().into())
            .await;
        assert_eq!(r.status, 415, "{ct}");
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.error(), ErrorCode::InvalidArgument);
    }
    assert_eq!(dir.blobs(), stored, "refused forms leave nothing behind");

    // curl -F, where curl is installed.
    let curl_ok = std::process::Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if curl_ok {
        let path = dir.0.join("from-curl.txt");
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(&path, &data).unwrap();
        let out = tokio::task::spawn_blocking({
            let (url, ann) = (api.url("/api/v1/files"), ann.clone());
            move || {
                Command::new("curl")
                    .args(["-sS", "-H"])
                    .arg(format!("Authorization: Bearer {ann}"))
                    .arg("-F")
                    .arg(format!("file=@{}", path.display()))
                    .arg(url)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(out.status.success(), "curl: {out:?}");
        let f: proto::Attachment = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (f.size, f.sha256.as_str()),
            (1000, sha256_hex(&data).as_str())
        );
        assert_eq!(f.name, "from-curl.txt");
    } else {
        eprintln!("curl is not installed: skipping the curl -F upload");
    }
    t.server.shutdown();
}

#[tokio::test]
async fn attachment_names_are_cleaned_like_upload_names() {
    let dir = Dir::new("names");
    let t = server(&dir, |_| {}).await;
    let api = Api::new(&t);
    let ann = t.token("ann");
    // An upload name: path, CR LF, ESC and a right-to-left override go.
    let f = api
        .upload_ok(
            &ann,
            "..%2F..%2Fetc%2Fpasswd%0D%0A%1B%5B2J%E2%80%AEtxt.exe",
            b"x".to_vec(),
        )
        .await;
    assert_eq!(f.name, "passwd[2Jtxt.exe");

    let mut a = t.client("ann", Encoding::Json).await;
    a.join("r").await;
    let named = |name: &str| proto::Attachment {
        name: name.into(),
        ..attach(&f.file_id)
    };
    let hostile = "../../etc/passwd\r\nX\0\u{1b}[31m\u{2067}\u{200f}gpj.exe";
    let Kind::Sent(_) = a
        .request(send_with("r", "m1", vec![named(hostile), named("..")]))
        .await
    else {
        panic!("sent");
    };
    let pushed = a.next_message().await;
    let names: Vec<&str> = pushed.attachments.iter().map(|a| a.name.as_str()).collect();
    // Cleaned exactly like an upload name; nothing left of one: the upload's own name.
    assert_eq!(names, ["passwdX[31mgpj.exe", "passwd[2Jtxt.exe"]);
    let Kind::History(h) = a
        .request(Cmd::History(proto::History {
            room: "r".into(),
            ..Default::default()
        }))
        .await
    else {
        panic!("history");
    };
    assert_eq!(h.messages[0].attachments[0].name, "passwdX[31mgpj.exe");
    t.server.shutdown();
}

#[tokio::test]
async fn images_over_max_image_pixels_are_not_decoded() {
    let dir = Dir::new("pixels");
    let t = server(&dir, |c| c.files.max_image_pixels = 10_000).await;
    let api = Api::new(&t);
    let ann = t.token("ann");
    // 64 x 48 = 3,072 pixels: decoded, a BlurHash.
    let small = api.upload_ok(&ann, "small.png", png()).await;
    assert!(!small.blurhash.is_empty());
    // 200 x 100 = 20,000 pixels: the header says too many; its size, no BlurHash.
    let img = image::RgbImage::from_pixel(200, 100, image::Rgb([9, 9, 9]));
    let mut big = std::io::Cursor::new(Vec::new());
    img.write_to(&mut big, image::ImageFormat::Png).unwrap();
    let big = api.upload_ok(&ann, "big.png", big.into_inner()).await;
    assert_eq!(big.content_type, "image/png");
    assert_eq!(
        (big.width, big.height, big.blurhash.as_str()),
        (200, 100, "")
    );
    t.server.shutdown();
}

/// The server's resident memory (`VmRSS`) and its peak (`VmHWM`), in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Kills the child when dropped.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real binary with `env` and returns it with its address.
fn start_binary(env: &[(&str, &str)]) -> (Kill, String) {
    use std::io::{BufRead, BufReader};
    let mut command = Command::new(BIN);
    command
        .args([
            "--config",
            "/nonexistent/parley.toml",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("log line");
        if let Some(rest) = line.split("addr=").nth(1) {
            return (child, rest.split_whitespace().next().unwrap().to_string());
        }
    }
}

/// Deterministic, incompressible-looking bytes (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_file_streams_through_the_binary_with_bounded_memory() {
    const SIZE: usize = 50 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let dir = Dir::new("big");
    let secret = "big-test-secret";
    let (child, addr) = start_binary(&[
        ("PARLEY_STORE__PATH", ":memory:"),
        ("PARLEY_FILES__DIR", dir.0.to_str().unwrap()),
        ("PARLEY_AUTH__JWT_SECRET", secret),
    ]);
    let pid = child.0.id();
    let auth = parley::config::AuthConfig {
        jwt_secret: secret.into(),
        ..Default::default()
    };
    let token = parley::auth::Authenticator::new(&auth)
        .unwrap()
        .mint("ann", Duration::from_secs(600))
        .unwrap();
    let (rss_idle, _) = memory_kib(pid);

    // Upload: generated chunk by chunk, hashed on the way.
    let chunk = bytes::Bytes::from(noise(42, CHUNK));
    let mut expected = Sha256::new();
    for _ in 0..SIZE / CHUNK {
        expected.update(&chunk);
    }
    let expected = format!("{:x}", expected.finalize());
    let body = futures_util::stream::iter(
        (0..SIZE / CHUNK).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let http = reqwest::Client::new();
    let started = Instant::now();
    let r = http
        .post(format!("http://{addr}/api/v1/files?name=big.bin"))
        .bearer_auth(&token)
        .header("content-length", SIZE.to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let up = started.elapsed();
    let f: proto::Attachment = json(r).await;
    assert_eq!(
        (f.size, f.sha256.as_str()),
        (SIZE as u64, expected.as_str())
    );
    // The same file as a multipart/form-data upload (a browser's FormData): streamed too,
    // the envelope stripped on the way.
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; \
         filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let chunk = bytes::Bytes::from(noise(42, CHUNK));
    let parts = std::iter::once(bytes::Bytes::from(head.clone()))
        .chain((0..SIZE / CHUNK).map(move |_| chunk.clone()))
        .chain(std::iter::once(bytes::Bytes::from(tail.clone())));
    let r = http
        .post(format!("http://{addr}/api/v1/files"))
        .bearer_auth(&token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .header(
            "content-length",
            (head.len() + SIZE + tail.len()).to_string(),
        )
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            parts.map(Ok::<_, std::io::Error>),
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let form: proto::Attachment = json(r).await;
    assert_eq!(
        (form.size, form.sha256.as_str(), form.name.as_str()),
        (SIZE as u64, expected.as_str(), "big.bin")
    );
    let (_, peak_upload) = memory_kib(pid);

    // Download, streamed and hashed here.
    let started = Instant::now();
    let r = http
        .get(format!("http://{addr}/api/v1/files/{}", f.file_id))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut got = Sha256::new();
    let mut n = 0;
    let mut stream = r.bytes_stream();
    while let Some(b) = stream.next().await {
        let b = b.unwrap();
        n += b.len();
        got.update(&b);
    }
    let down = started.elapsed();
    assert_eq!((n, format!("{:x}", got.finalize())), (SIZE, expected));
    let (rss_end, peak) = memory_kib(pid);
    let mb = SIZE as f64 / 1e6;
    println!(
        "50 MiB: upload {:.0} MB/s, download {:.0} MB/s; server RSS idle {} KiB, peak \
         during upload {} KiB, peak overall {} KiB, after {} KiB",
        mb / up.as_secs_f64(),
        mb / down.as_secs_f64(),
        rss_idle,
        peak_upload,
        peak,
        rss_end
    );
    // The whole file would be 51200 KiB; the server never grows by more than a fraction
    // (after a raw and a multipart upload and a download).
    assert!(
        peak < rss_idle + 20 * 1024,
        "peak RSS {peak} KiB vs {rss_idle} KiB idle: the file is being buffered"
    );
    drop(child);
}

/// A moto S3 server on a free port, killed when dropped.
struct Moto {
    _child: Kill,
    url: String,
}

/// The Python that has moto: `PARLEY_TEST_MOTO_PYTHON`, else the venv scripts/test
/// makes under target/.
fn moto_python() -> PathBuf {
    if let Ok(p) = std::env::var("PARLEY_TEST_MOTO_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin/python");
    assert!(
        venv.exists(),
        "the S3 test needs the `moto` server from PyPI: run scripts/test (it installs \
         'moto[server]' into target/moto-venv), or `pip install 'moto[server]'` and set \
         PARLEY_TEST_MOTO_PYTHON to that python"
    );
    venv
}

async fn start_moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(moto_python())
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto starts");
    let moto = Moto {
        _child: Kill(child),
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "moto did not start on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    moto
}

#[tokio::test]
async fn the_s3_backend_against_a_real_s3_compatible_server() {
    let moto = start_moto().await;
    let http = reqwest::Client::new();
    let created = http
        .put(format!("{}/parley-test", moto.url))
        .send()
        .await
        .unwrap();
    assert!(
        created.status().is_success(),
        "bucket: {}",
        created.status()
    );
    let objects = || async {
        let list = http
            .get(format!("{}/parley-test?list-type=2", moto.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        list.matches("<Key>").count()
    };

    let dir = Dir::new("s3-unused");
    let endpoint = moto.url.clone();
    let t = server(&dir, move |c| {
        c.files.backend = FileBackend::S3;
        c.files.s3_bucket = "parley-test".into();
        c.files.s3_endpoint = endpoint;
        c.files.s3_allow_http = true;
        c.files.s3_access_key_id = "testing".into();
        c.files.s3_secret_access_key = "testing".into();
        c.files.max_file_bytes = 12 * 1024 * 1024;
    })
    .await;
    let api = Api::new(&t);
    let ann = t.token("ann");

    // 11 MiB: a multipart upload of three parts.
    let bytes = noise(7, 11 * 1024 * 1024);
    let f = api.upload_ok(&ann, "big.bin", bytes.clone()).await;
    assert_eq!(f.sha256, sha256_hex(&bytes));
    assert_eq!(objects().await, 1);
    let path = format!("/api/v1/files/{}", f.file_id);
    let r = api.get(Some(&ann), &path, &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.body == bytes, "the bytes come back");
    let r = api
        .get(Some(&ann), &path, &[("range", "bytes=6000000-6000099")])
        .await;
    assert_eq!((r.status, &r.body[..]), (206, &bytes[6_000_000..6_000_100]));

    // A refused streamed upload leaves no object behind.
    let chunks = futures_util::stream::iter(
        (0..13).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![1u8; 1024 * 1024]))),
    );
    refused_while_streaming(&api, &ann, chunks).await;
    assert_eq!(objects().await, 1);

    assert_eq!(api.delete(&ann, &path).await.status, 200);
    assert_eq!(objects().await, 0);
    assert_eq!(dir.blobs(), 0, "nothing went to the local directory");
    t.server.shutdown();
    drop(moto);
}
