//! Built-in TLS (a certificate generated at test time), HTTP/2 by ALPN and h2c, SSE and
//! commands multiplexed on one HTTP/2 connection, and WebSocket over HTTP/2 (RFC 8441).

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, body::Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, NamedGroup, RootCertStore, crypto::CryptoProvider, pki_types::ServerName,
    },
};

async fn tls_connect(
    t: &TestServer,
    certs: &Certs,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_connect_to(t.addr(), certs, alpn).await
}

async fn tls_connect_to(
    addr: std::net::SocketAddr,
    certs: &Certs,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_connect_with(addr, certs, alpn, parley::server::crypto_provider()).await
}

/// A TLS client with `provider`'s cipher suites and key exchange groups, in its order.
async fn tls_connect_with(
    addr: std::net::SocketAddr,
    certs: &Certs,
    alpn: &[&[u8]],
    provider: Arc<CryptoProvider>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(certs.cert_der.clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the generated certificate")
}

/// A WebSocket client speaking `parley.v1.json` over the TLS stream `tls`.
async fn wss_json(
    t: &TestServer,
    tls: tokio_rustls::client::TlsStream<TcpStream>,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    wss_json_over(t, tls).await
}

/// A WebSocket over `tls` on which ann connects (the `connected` reply checked).
async fn wss_connects_as_ann(t: &TestServer, tls: tokio_rustls::client::TlsStream<TcpStream>) {
    let mut ws = wss_json(t, tls).await;
    let connect = format!(r#"{{"id":"1","connect":{{"token":"{}"}}}}"#, t.token("ann"));
    ws.send(connect.into()).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap().into_text().unwrap();
    let v: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["connected"]["userId"], "ann");
}

#[tokio::test]
async fn wss_chat_over_built_in_tls() {
    let certs = make_certs("wss");
    let t = tls_server(&certs, |_| {}).await;
    let tls = tls_connect(&t, &certs, &[b"http/1.1"]).await;
    wss_connects_as_ann(&t, tls).await;
    // Plain HTTP to the TLS port fails.
    let r = tokio::time::timeout(WAIT, async {
        let tcp = TcpStream::connect(t.addr()).await.unwrap();
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp)).await
    })
    .await
    .unwrap();
    if let Ok((mut sender, conn)) = r {
        tokio::spawn(conn);
        let req = Request::get("/healthz")
            .header("host", "localhost")
            .body(Empty::new())
            .unwrap();
        assert!(
            sender.send_request(req).await.is_err(),
            "no plaintext on the TLS port"
        );
    }
}

/// Key exchange follows the client's order among the groups parley has: a browser's
/// (the post-quantum hybrid X25519MLKEM768 first, then X25519) gets the hybrid, and a chat
/// works over it; clients without it get the classic group they offer.
#[tokio::test]
async fn key_exchange_is_post_quantum_for_clients_that_offer_it() {
    let certs = make_certs("kx");
    let t = tls_server(&certs, |_| {}).await;
    let offering = |groups: &[NamedGroup]| {
        let mut provider = (*parley::server::crypto_provider()).clone();
        provider.kx_groups = groups
            .iter()
            .map(|g| {
                *provider
                    .kx_groups
                    .iter()
                    .find(|k| k.name() == *g)
                    .unwrap_or_else(|| panic!("parley's provider has {g:?}"))
            })
            .collect();
        Arc::new(provider)
    };
    let browser = [NamedGroup::X25519MLKEM768, NamedGroup::X25519];
    let tls = tls_connect_with(t.addr(), &certs, &[b"http/1.1"], offering(&browser)).await;
    let group = tls.get_ref().1.negotiated_key_exchange_group().unwrap();
    assert_eq!(group.name(), NamedGroup::X25519MLKEM768);
    wss_connects_as_ann(&t, tls).await;
    for classic in [
        NamedGroup::X25519,
        NamedGroup::secp256r1,
        NamedGroup::secp384r1,
    ] {
        let tls = tls_connect_with(t.addr(), &certs, &[b"http/1.1"], offering(&[classic])).await;
        let group = tls.get_ref().1.negotiated_key_exchange_group().unwrap();
        assert_eq!(group.name(), classic);
    }
}

/// A client's close over the built-in TLS gets the close reply, then a clean end of the
/// stream: `close_notify` (a TLS stream that just stops reads as an error). The server
/// shuts its write side down before closing here; only plain TCP skips that step.
#[tokio::test]
async fn a_wss_clients_close_ends_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = make_certs("wss-close");
    let t = tls_server(&certs, |_| {}).await;
    let tls = tls_connect(&t, &certs, &[b"http/1.1"]).await;
    let (mut tls, _) = raw_ws_on(tls, None).await;
    tls.write_all(&masked_frame(0x88, &[0x03, 0xe8]))
        .await
        .unwrap();
    assert_eq!(read_close_code(&mut tls).await, Some(1000));
    let mut rest = [0u8; 64];
    let end = tokio::time::timeout(WAIT, tls.read(&mut rest))
        .await
        .unwrap();
    assert_eq!(end.unwrap(), 0, "close_notify, not a cut stream");
}

/// The server gives its incoming TLS buffer back while a client is silent (vendor/rustls)
/// and reads through a stack probe when bytes come again. What a client sends after
/// silences, cut into pieces that split its records across reads, and in records larger
/// than one read, arrives whole: TLS would fail the connection on one wrong byte, and the
/// history gives the bodies back.
#[tokio::test]
async fn wss_reads_records_split_across_reads_and_silences_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = make_certs("wss-split");
    let t = tls_server(&certs, |_| {}).await;
    // A relay that passes the client's bytes on in pieces of at most 700 bytes, each in two
    // halves 15 ms apart, so the server's reads end inside records again and again.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let server = t.addr();
    let relay_task = tokio::spawn(async move {
        let (client, _) = relay.accept().await.unwrap();
        let upstream = TcpStream::connect(server).await.unwrap();
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = upstream.into_split();
        let back = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        });
        let mut piece = [0u8; 700];
        let mut pieces = 0u32;
        while let Ok(n @ 1..) = from_client.read(&mut piece).await {
            let half = n / 2;
            if to_server.write_all(&piece[..half]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
            if to_server.write_all(&piece[half..n]).await.is_err() {
                break;
            }
            pieces += 1;
        }
        back.abort();
        pieces
    });
    let tls = tls_connect_to(relay_addr, &certs, &[b"http/1.1"]).await;
    let mut ws = wss_json(&t, tls).await;
    json_ann_joins(&mut ws, &t, "split").await;
    // Bodies of 12,000 and 16,000 bytes (one record each, larger than a 4 KiB read) and a
    // small one, each after a silence in which the server's read found nothing.
    let bodies = lettered_bodies(&[12_000, 5, 16_000]);
    for (i, body) in bodies.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = ask_json(
            &mut ws,
            format!(
                r#"{{"id":"1{i}","send":{{"room":"split","clientMsgId":"m{i}","body":"{body}"}}}}"#
            ),
            "sent",
        )
        .await;
        assert_eq!(sent["sent"]["seq"], (i + 1).to_string());
    }
    let got = history_bodies_json(&mut ws, "split").await;
    assert_eq!(got, bodies);
    ws.close(None).await.unwrap();
    drop(ws);
    let pieces = tokio::time::timeout(WAIT, relay_task)
        .await
        .unwrap()
        .unwrap();
    // The two large bodies alone are 28,000 bytes: at least 40 pieces of 700.
    assert!(
        pieces >= 40,
        "the relay cut the stream into {pieces} pieces"
    );
}

#[tokio::test]
async fn https_h2_multiplexes_sse_and_commands_on_one_connection() {
    let certs = make_certs("h2");
    let t = tls_server(&certs, |_| {}).await;
    let tls = tls_connect(&t, &certs, &[b"h2", b"http/1.1"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN picks h2"
    );
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let base = format!("https://localhost:{}", t.addr().port());
    let auth = format!("Bearer {}", t.token("ann"));

    let r = sender
        .clone()
        .send_request(
            Request::get(format!("{base}/healthz"))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, hyper::Version::HTTP_2)
    );

    // A ticket, then an SSE stream, then a command — all streams of one connection.
    let r = sender
        .clone()
        .send_request(
            Request::post(format!("{base}/api/v1/tickets"))
                .header("authorization", &auth)
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let ticket = serde_json::from_slice::<Value>(&body).unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let sse = sender
        .clone()
        .send_request(
            Request::get(format!("{base}/sse?ticket={ticket}"))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let mut sse_body = sse.into_body();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let f = tokio::time::timeout(WAIT, sse_body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&f.into_data().unwrap()).unwrap());
    }
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let session = serde_json::from_str::<Value>(data).unwrap()["connected"]["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let r = sender
        .clone()
        .send_request(
            Request::post(format!("{base}/session/{session}"))
                .header("authorization", &auth)
                .body(http_body_util::Full::new(Bytes::from(
                    r#"{"id":"2","join":{"room":"h2"}}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The join's membership push arrives on the SSE stream of the same connection.
    let mut text = String::new();
    while !text.contains("membership") {
        let f = tokio::time::timeout(WAIT, sse_body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&f.into_data().unwrap()).unwrap());
    }
    assert!(text.contains("id: 1\n"));
}

#[tokio::test]
async fn h2c_prior_knowledge_on_the_plain_port() {
    let t = TestServer::start().await;
    let mut sender = h2c(&t).await;
    let r = h2c_get(&mut sender, &t, "/readyz").await;
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, hyper::Version::HTTP_2)
    );
}

/// An HTTP/2 connection with prior knowledge (h2c) to the plain port.
async fn h2c(t: &TestServer) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(t.addr()).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

async fn h2c_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    t: &TestServer,
    path: &str,
) -> hyper::Response<hyper::body::Incoming> {
    sender
        .send_request(
            Request::get(format!("http://{}{path}", t.addr()))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap()
}

/// `server.h2_response_header_table_size = 0`: the responses' headers are sent as
/// literals after an HPACK table size update to 0 (vendor/README.md, h2 change 8), which
/// the client's decoder (h2's, as browsers') takes; repeated responses on the connection
/// carry their headers whole.
#[tokio::test]
async fn h2c_responses_without_a_header_table_arrive_whole() {
    let t = TestServer::start_with(|c| c.server.h2_response_header_table_size = 0).await;
    let mut sender = h2c(&t).await;
    for _ in 0..3 {
        let r = h2c_get(&mut sender, &t, "/healthz").await;
        assert_eq!(
            (r.status().as_u16(), r.version()),
            (200, hyper::Version::HTTP_2)
        );
        assert!(r.headers().contains_key("date"));
        assert!(r.headers().contains_key("content-type"));
    }
}

/// `server.h2_request_header_table_size = 0`: a client that honours the SETTINGS (h2's,
/// as browsers) makes requests with headers to index, and every request is served.
#[tokio::test]
async fn h2c_requests_without_a_header_table_are_served() {
    let t = TestServer::start_with(|c| c.server.h2_request_header_table_size = 0).await;
    let mut sender = h2c(&t).await;
    for i in 0..3 {
        let r = sender
            .send_request(
                Request::get(format!("http://{}/healthz", t.addr()))
                    .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) parley-test")
                    .header("x-request", i.to_string())
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "request {i}");
    }
}

/// An HTTP/2 frame: (type, flags, stream, payload).
type RawFrame = (u8, u8, u32, Vec<u8>);

async fn write_frame(s: &mut TcpStream, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([ty, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    s.write_all(&f).await.unwrap();
}

async fn read_frame(s: &mut TcpStream) -> RawFrame {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    tokio::time::timeout(WAIT, s.read_exact(&mut head))
        .await
        .expect("a frame in time")
        .expect("a frame, not a close");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).await.unwrap();
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    (head[3], head[4], stream, payload)
}

/// Opens an h2c connection with raw frames: the preface, an empty SETTINGS, the ack of
/// the server's SETTINGS. Returns the socket and the server's SETTINGS entries.
async fn raw_h2c(t: &TestServer) -> (TcpStream, Vec<(u16, u32)>) {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(SETTINGS).await.unwrap();
    loop {
        let (ty, flags, _, payload) = read_frame(&mut s).await;
        if ty == 0x4 && flags & 0x1 == 0 {
            write_frame(&mut s, 0x4, 0x1, 0, &[]).await;
            let settings = payload
                .chunks(6)
                .map(|e| {
                    let id = u16::from_be_bytes([e[0], e[1]]);
                    (id, u32::from_be_bytes([e[2], e[3], e[4], e[5]]))
                })
                .collect();
            return (s, settings);
        }
    }
}

/// Reads frames until a response's HEADERS on `stream` (its first byte: HPACK's
/// `:status`) or a GOAWAY (its error code); `Err` carries the GOAWAY's code.
async fn response_or_goaway(s: &mut TcpStream, stream: u32) -> Result<u8, u32> {
    loop {
        match read_frame(s).await {
            (0x1, _, id, p) if id == stream => return Ok(p[0]),
            (0x7, _, _, p) => return Err(u32::from_be_bytes([p[4], p[5], p[6], p[7]])),
            _ => {}
        }
    }
}

/// `server.h2_request_header_table_size = 0` is sent as SETTINGS_HEADER_TABLE_SIZE (none
/// at the default 4,096), and it binds once acknowledged: a client that then indexes a
/// header anyway cannot refer to it (the connection fails), where at 4,096 the same
/// frames are served.
#[tokio::test]
async fn h2c_a_request_header_table_of_zero_binds_once_acknowledged() {
    // GET /healthz (`:method GET` and `:scheme http` from the static table, `:path` a
    // literal not indexed) with `x-foo: bar` as a literal to index.
    let mut first = vec![0x82, 0x86, 0x04, 8];
    first.extend(b"/healthz");
    first.extend([0x40, 5]);
    first.extend(b"x-foo");
    first.extend([3]);
    first.extend(b"bar");
    // The same, `x-foo: bar` now by its index (62: the newest dynamic entry).
    let mut second = vec![0x82, 0x86, 0x04, 8];
    second.extend(b"/healthz");
    second.push(0x80 | 62);
    // END_STREAM | END_HEADERS.
    let flags = 0x1 | 0x4;

    let default = TestServer::start().await;
    let (mut s, settings) = raw_h2c(&default).await;
    assert!(!settings.iter().any(|&(id, _)| id == 0x1), "{settings:?}");
    write_frame(&mut s, 0x1, flags, 1, &first).await;
    // 0x88: `:status 200` from the static table.
    assert_eq!(response_or_goaway(&mut s, 1).await, Ok(0x88));
    write_frame(&mut s, 0x1, flags, 3, &second).await;
    assert_eq!(response_or_goaway(&mut s, 3).await, Ok(0x88));

    let t = TestServer::start_with(|c| c.server.h2_request_header_table_size = 0).await;
    let (mut s, settings) = raw_h2c(&t).await;
    assert!(settings.contains(&(0x1, 0)), "{settings:?}");
    // raw_h2c acknowledged the SETTINGS before any request: the server reads these
    // with the table bounded.
    write_frame(&mut s, 0x1, flags, 1, &first).await;
    assert_eq!(response_or_goaway(&mut s, 1).await, Ok(0x88));
    write_frame(&mut s, 0x1, flags, 3, &second).await;
    // A GOAWAY: h2 answers every failed HPACK decode with PROTOCOL_ERROR (0x1), where
    // RFC 9113 §4.3 names COMPRESSION_ERROR.
    assert_eq!(response_or_goaway(&mut s, 3).await, Err(0x1));
}

#[tokio::test]
async fn websocket_over_http2_rfc_8441() {
    let t = TestServer::start().await;
    let tcp = TcpStream::connect(t.addr()).await.unwrap();
    let url: url::Url = format!("http://{}/ws", t.addr()).parse().unwrap();
    let builder =
        hyper::http::Request::builder().header("sec-websocket-protocol", "parley.v1.json");
    let mut ws = yawc::http2::handshake(url, tcp, yawc::Options::default(), builder)
        .await
        .expect("extended CONNECT accepted");
    let connect = format!(r#"{{"id":"1","connect":{{"token":"{}"}}}}"#, t.token("ann"));
    ws.send(yawc::frame::Frame::text(connect)).await.unwrap();
    let frame = tokio::time::timeout(WAIT, ws.next_frame())
        .await
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_slice(frame.payload()).unwrap();
    assert_eq!(v["connected"]["userId"], "ann");
}

#[tokio::test]
async fn silent_and_stalled_tls_handshakes_are_cut_at_their_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = make_certs("deadline");
    let (cert, key) = (certs.dir.join("cert.pem"), certs.dir.join("key.pem"));
    let t = TestServer::start_with(|c| {
        c.tls.cert_file = Some(cert.to_str().unwrap().into());
        c.tls.key_file = Some(key.to_str().unwrap().into());
        c.server.tls_handshake_timeout = std::time::Duration::from_millis(400);
        c.server.preface_timeout = std::time::Duration::from_millis(400);
    })
    .await;
    /// How long until the server closes `s` (reading and dropping what it sends).
    async fn closed_after(mut s: impl tokio::io::AsyncRead + Unpin) -> std::time::Duration {
        let start = tokio::time::Instant::now();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while let Ok(1..) = s.read(&mut buf).await {}
        })
        .await
        .expect("the server closes the connection");
        start.elapsed()
    }
    let silent = TcpStream::connect(t.addr()).await.unwrap();
    // A TLS record header announcing a 512-byte ClientHello, then 4 bytes of it.
    let mut stalled = TcpStream::connect(t.addr()).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .await
        .unwrap();
    // A finished handshake that then sends no request: the preface deadline.
    let quiet = tls_connect(&t, &certs, &[b"http/1.1"]).await;
    let (silent, stalled, quiet) = tokio::join!(
        closed_after(silent),
        closed_after(stalled),
        closed_after(quiet)
    );
    for (what, after) in [("silent", silent), ("stalled", stalled), ("quiet", quiet)] {
        assert!(
            after >= std::time::Duration::from_millis(300)
                && after < std::time::Duration::from_secs(3),
            "{what}: closed after {after:?}"
        );
    }
    // A client that completes its handshake and asks is served.
    let tls = tls_connect(&t, &certs, &[b"h2"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let r = sender
        .send_request(
            Request::get(format!("https://localhost:{}/healthz", t.addr().port()))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// One request on its own TLS connection (`Connection: close`); the whole response.
async fn tls_get(t: &TestServer, certs: &Certs, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(t, certs, &[b"http/1.1"]).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    // The server's close_notify ends the response.
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("the response in time")
        .expect("a whole response, ended by close_notify");
    String::from_utf8(got).unwrap()
}

/// Over TLS as over plain TCP, an idle HTTP/1 keep-alive connection gives its HTTP state
/// back after `server.keep_alive_release` and waits for its next bytes: a record with no
/// request in it (a key update, asking for the server's) is taken while it waits, with
/// no new HTTP state; the next requests are served on the same connection, under the new
/// keys both ways; after `server.keep_alive_idle` it is closed with a close_notify.
#[tokio::test]
async fn an_idle_tls_keep_alive_connection_gives_its_state_back_and_serves_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = make_certs("tls-release");
    let t = tls_server(&certs, |c| {
        c.server.header_read_timeout = Duration::from_secs(10);
        c.server.keep_alive_idle = Duration::from_millis(2500);
        c.server.keep_alive_release = Duration::from_millis(200);
    })
    .await;
    let releases = async || {
        let metrics = tls_get(&t, &certs, "/metrics").await;
        metric(&metrics, "parley_http1_idle_releases_total") as u64
    };
    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut s = tls_connect(&t, &certs, &[b"http/1.1"]).await;
    let served = async |s: &mut tokio_rustls::client::TlsStream<TcpStream>| {
        s.write_all(GET).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(WAIT, async {
            while !String::from_utf8_lossy(&got).contains("ok\n") {
                let n = s.read(&mut buf).await.expect("the connection is open");
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the response in time");
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    };
    served(&mut s).await;
    let before = releases().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(releases().await, before + 1, "released after 200 ms idle");

    // A key update: no request, so no new HTTP state (none to give back again).
    s.get_mut().1.refresh_traffic_keys().unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        releases().await,
        before + 1,
        "no HTTP state for a key update"
    );
    served(&mut s).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        releases().await,
        before + 2,
        "released again after the request"
    );
    served(&mut s).await;

    // Then idle until closed: a close_notify (a clean end), after the idle time.
    let answered = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("closed with a close_notify");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let waited = answered.elapsed();
    assert!(
        (Duration::from_millis(2000)..Duration::from_secs(5)).contains(&waited),
        "closed after {waited:?}"
    );
}
