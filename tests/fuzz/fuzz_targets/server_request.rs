//! Requests to `skiff serve`, in-process: the input picks a method and a
//! token, then gives the path (up to the first newline) and the body.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct App {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _dir: tempfile::TempDir,
}

fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = skiff_store::Store::open_or_create(
            &dir.path().join("store"),
            &skiff_store::StoreConfig::default(),
        )
        .expect("a new store");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let config = skiff_server::ServerConfig {
            tokens: skiff_server::Tokens {
                write: Some("w".into()),
                ..Default::default()
            },
            cache_bytes: 1 << 20,
            ..Default::default()
        };
        let server = runtime
            .block_on(skiff_server::Server::bind(
                "127.0.0.1:0",
                Arc::new(store),
                config,
            ))
            .expect("a server");
        App {
            router: server.router(),
            runtime,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = match selector % 5 {
        0 => Method::GET,
        1 => Method::PUT,
        2 => Method::POST,
        3 => Method::DELETE,
        _ => Method::HEAD,
    };
    let (path, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let mut request = Request::builder().method(method).uri(format!("/{path}"));
    if selector & 0x80 != 0 {
        request = request.header("authorization", "Bearer w");
    }
    let Ok(request) = request.body(Body::from(body.to_vec())) else {
        return;
    };
    let app = app();
    let response = app
        .runtime
        .block_on(app.router.clone().oneshot(request))
        .expect("the router never fails");
    // Whatever was asked, the server answers; it never panics or hangs.
    assert!(response.status().as_u16() >= 200);
});
