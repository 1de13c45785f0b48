//! TLS 1.3 traffic keys given back by idle connections (`tls.idle_keys_after`,
//! vendor/rustls change 5). A test binary of its own: rustls's idle clock, its threshold
//! and its count are process-wide, and the other TLS tests' servers set the threshold too.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        CipherSuiteCommon, ClientConfig, ConnectionTrafficSecrets, RootCertStore,
        SupportedCipherSuite, Tls13CipherSuite,
        crypto::{
            CryptoProvider,
            cipher::{
                AeadKey, Iv, MessageDecrypter, MessageEncrypter, Tls13AeadAlgorithm,
                UnsupportedOperationError,
            },
        },
        pki_types::ServerName,
    },
};

/// The provider's AEAD as it is, but never given back while idle (not `resumable`): the
/// test's client shares the server's process, and so rustls's process-wide setting.
struct KeptKeys(&'static dyn Tls13AeadAlgorithm);

impl Tls13AeadAlgorithm for KeptKeys {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        self.0.encrypter(key, iv)
    }
    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        self.0.decrypter(key, iv)
    }
    fn key_len(&self) -> usize {
        self.0.key_len()
    }
    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        self.0.extract_keys(key, iv)
    }
}

/// parley's provider, TLS 1.3 only, with keys that stay: only the server gives keys back.
fn client_provider() -> Arc<CryptoProvider> {
    let mut provider = (*parley::server::crypto_provider()).clone();
    provider.cipher_suites = provider
        .cipher_suites
        .iter()
        .filter_map(|suite| match suite {
            SupportedCipherSuite::Tls13(s) => Some(SupportedCipherSuite::Tls13(Box::leak(
                Box::new(Tls13CipherSuite {
                    common: CipherSuiteCommon {
                        suite: s.common.suite,
                        hash_provider: s.common.hash_provider,
                        confidentiality_limit: s.common.confidentiality_limit,
                    },
                    hkdf_provider: s.hkdf_provider,
                    aead_alg: Box::leak(Box::new(KeptKeys(s.aead_alg))),
                    quic: s.quic,
                }),
            ))),
            _ => None,
        })
        .collect();
    Arc::new(provider)
}

async fn wss(t: &TestServer, certs: &Certs) -> Wss {
    let mut roots = RootCertStore::empty();
    roots.add(certs.cert_der.clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(client_provider())
        .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(t.addr()).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/ws", t.addr().port());
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "parley.v1.json".parse().unwrap());
    tokio_tungstenite::client_async(req, tls).await.unwrap().0
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Sends `cmd` and returns the first reply with `key`.
async fn ask(ws: &mut Wss, cmd: String, key: &str) -> Value {
    ws.send(cmd.into()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a reply")
            .expect("the stream is open")
            .expect("a frame");
        if frame.is_ping() {
            continue;
        }
        let v: Value = serde_json::from_str(&frame.into_text().unwrap()).unwrap();
        if v.get(key).is_some() {
            return v;
        }
    }
}

/// An idle WSS connection gives back its expanded TLS keys (`tls.idle_keys_after`,
/// vendor/rustls change 5) between heartbeats and expands them again for the next
/// record: what comes after, both ways and in records of every size, arrives whole.
#[tokio::test]
async fn idle_wss_gives_back_its_tls_keys_and_goes_on_whole() {
    use tokio_rustls::rustls::idle_keys;
    let certs = make_certs("wss-idle-keys");
    let t = tls_server(&certs, |c| {
        c.tls.idle_keys_after = Duration::from_secs(1);
        c.ws.heartbeat_interval = Duration::from_millis(700);
    })
    .await;
    let mut ws = wss(&t, &certs).await;
    let connected = ask(
        &mut ws,
        format!(r#"{{"id":"1","connect":{{"token":"{}"}}}}"#, t.token("ann")),
        "connected",
    )
    .await;
    assert_eq!(connected["connected"]["userId"], "ann");
    ask(
        &mut ws,
        r#"{"id":"2","join":{"room":"quiet"}}"#.into(),
        "joined",
    )
    .await;
    let bodies: Vec<String> = [5usize, 16_000, 9_000, 1]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            (0..len)
                .map(|j| char::from(b'a' + ((i * 7 + j) % 26) as u8))
                .collect()
        })
        .collect();
    for (i, body) in bodies.iter().enumerate() {
        // Quiet for over two ticks of the idle clock, answering the server's pings (the
        // client's reads do): the server's keys go after a heartbeat, and the next record,
        // the client's or the server's, expands them again.
        let before = idle_keys::released();
        let quiet = tokio::time::Instant::now() + Duration::from_millis(2_600);
        while let Ok(frame) = tokio::time::timeout_at(quiet, ws.next()).await {
            // Pings, and the events of the last round (the join's, the message's).
            let frame = frame.expect("the stream is open").expect("a frame");
            assert!(!frame.is_close(), "{frame:?}");
        }
        assert!(
            idle_keys::released() > before,
            "the server gave keys back while quiet (round {i})"
        );
        let sent = ask(
            &mut ws,
            format!(
                r#"{{"id":"1{i}","send":{{"room":"quiet","clientMsgId":"m{i}","body":"{body}"}}}}"#
            ),
            "sent",
        )
        .await;
        assert_eq!(sent["sent"]["seq"], (i + 1).to_string());
    }
    let history = ask(
        &mut ws,
        r#"{"id":"20","history":{"room":"quiet","limit":10}}"#.into(),
        "history",
    )
    .await;
    let got: Vec<&str> = history["history"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(got, bodies.iter().map(String::as_str).collect::<Vec<_>>());
    ws.close(None).await.unwrap();
}
