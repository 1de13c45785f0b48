//! `src/web.rs`: the embedded SDK and demo page are served with the right types and
//! revalidation, and the dev-token endpoint exists only in development mode and mints
//! tokens the server accepts.

mod common;

use common::{TestServer, http};

#[tokio::test]
async fn sdk_and_demo_are_served_with_types_and_etags() {
    let s = TestServer::start().await;
    let js = http(s.addr(), "GET", "/sdk/parley.js", &[], "").await;
    assert_eq!(js.status, 200);
    assert_eq!(js.headers["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(js.headers["cache-control"], "no-cache");
    assert!(std::str::from_utf8(&js.body).unwrap().contains("class "));
    let etag = js.headers["etag"].to_str().unwrap().to_string();
    let again = http(
        s.addr(),
        "GET",
        "/sdk/parley.js",
        &[("if-none-match", &etag)],
        "",
    )
    .await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());

    let dts = http(s.addr(), "GET", "/sdk/parley.d.ts", &[], "").await;
    assert_eq!(dts.status, 200);
    assert!(
        std::str::from_utf8(&dts.body)
            .unwrap()
            .contains("export declare class Parley")
    );

    // The source map the module names, and the script-tag build with its own.
    let js_text = std::str::from_utf8(&js.body).unwrap();
    assert!(js_text.ends_with("//# sourceMappingURL=parley.js.map\n"));
    for (path, sources) in [
        ("/sdk/parley.js.map", "../src/parley.ts"),
        ("/sdk/parley.global.js.map", "../src/parley.ts"),
    ] {
        let map = http(s.addr(), "GET", path, &[], "").await;
        assert_eq!(map.status, 200, "{path}");
        assert_eq!(
            map.headers["content-type"],
            "application/json; charset=utf-8"
        );
        let v: serde_json::Value = serde_json::from_slice(&map.body).unwrap();
        assert_eq!(v["version"], 3);
        assert!(
            v["sources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == sources)
        );
    }
    let global = http(s.addr(), "GET", "/sdk/parley.global.js", &[], "").await;
    assert_eq!(global.status, 200);
    assert_eq!(
        global.headers["content-type"],
        "text/javascript; charset=utf-8"
    );
    let global = std::str::from_utf8(&global.body).unwrap();
    assert!(
        global.contains("var parley=(()=>{"),
        "defines the global `parley`"
    );

    let page = http(s.addr(), "GET", "/", &[], "").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert!(page.headers.contains_key("content-security-policy"));
    let html = std::str::from_utf8(&page.body).unwrap();
    assert!(html.contains(r#"<meta name="parley-dev-tokens" content="false">"#));
    for asset in ["/demo/app.js", "/demo/app.css"] {
        assert_eq!(http(s.addr(), "GET", asset, &[], "").await.status, 200);
    }
    // Off by default: no way to get a token for anyone.
    let dev = http(
        s.addr(),
        "POST",
        "/api/v1/dev/token",
        &[],
        r#"{"user":"alice"}"#,
    )
    .await;
    assert_eq!(dev.status, 404);
}

#[tokio::test]
async fn demo_can_be_turned_off() {
    let s = TestServer::start_with(|c| c.web.demo = false).await;
    assert_eq!(http(s.addr(), "GET", "/", &[], "").await.status, 404);
    assert_eq!(
        http(s.addr(), "GET", "/sdk/parley.js", &[], "")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn dev_tokens_only_in_development_mode() {
    let s = TestServer::start_with(|c| c.web.dev_tokens = true).await;
    let json = [("content-type", "application/json")];
    let r = http(
        s.addr(),
        "POST",
        "/api/v1/dev/token",
        &json,
        r#"{"user":"alice"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["user"], "alice");
    let token = body["token"].as_str().unwrap();
    // The server accepts it: the HTTP API answers for alice.
    let auth = format!("Bearer {token}");
    let rooms = http(
        s.addr(),
        "GET",
        "/api/v1/rooms",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(rooms.status, 200);

    let page = http(s.addr(), "GET", "/", &[], "").await;
    let html = std::str::from_utf8(&page.body).unwrap();
    assert!(html.contains(r#"<meta name="parley-dev-tokens" content="true">"#));

    for bad in [
        r#"{"user":"no spaces"}"#,
        r#"{"user":""}"#,
        r#"{"name":"x"}"#,
        "nope",
    ] {
        let r = http(s.addr(), "POST", "/api/v1/dev/token", &json, bad).await;
        assert_eq!(r.status, 400, "{bad}");
    }
}
