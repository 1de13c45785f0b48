//! TLS 1.3 traffic keys given back by idle connections (`tls.idle_keys_after`,
//! vendor/rustls change 5). A test binary of its own: rustls's idle clock, its threshold
//! and its count are process-wide, and the other TLS tests' servers set the threshold too.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use futures_util::StreamExt;
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
    wss_json_over(t, tls).await
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

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
    json_ann_joins(&mut ws, &t, "quiet").await;
    let bodies = lettered_bodies(&[5, 16_000, 9_000, 1]);
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
        let sent = ask_json(
            &mut ws,
            format!(
                r#"{{"id":"1{i}","send":{{"room":"quiet","clientMsgId":"m{i}","body":"{body}"}}}}"#
            ),
            "sent",
        )
        .await;
        assert_eq!(sent["sent"]["seq"], (i + 1).to_string());
    }
    let got = history_bodies_json(&mut ws, "quiet").await;
    assert_eq!(got, bodies);
    ws.close(None).await.unwrap();
}
