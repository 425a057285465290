//! `skiff serve`, `push` and `pull` against a real server on 127.0.0.1:
//! every route, every refusal, concurrent pushes, and transfers killed
//! half-way and run again.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};
use skiff_format::wire::{self, ChunkRecord, RecordKind, RecordReader};
use skiff_format::{ChunkId, ImageIndex, IndexDigest};
use skiff_tests::*;

/// Two layers: shared text and noise, and files only this image has.
fn image(seed: u64, shared_mb: usize) -> Image {
    Image::new(vec![
        (
            Layer::new()
                .file("usr/lib/big.bin", 0o644, noise(shared_mb << 20, 7))
                .file("usr/share/doc.txt", 0o644, text(300_000, 8))
                .symlink("usr/lib/link", "big.bin"),
            Compression::Gzip,
        ),
        (
            Layer::new()
                .file("etc/own.conf", 0o600, text(2_000, seed))
                .file("opt/own.bin", 0o755, noise(200_000, seed)),
            Compression::Gzip,
        ),
    ])
}

/// Paths named `names` inside the test's temporary directory.
fn dirs<const N: usize>(tmp: &tempfile::TempDir, names: [&str; N]) -> [std::path::PathBuf; N] {
    names.map(|name| tmp.path().join(name))
}

/// Starts `skiff --store STORE ARGS...` with its output captured.
fn spawn_skiff(store: &Path, args: &[&str]) -> std::process::Child {
    Command::new(skiff_bin())
        .arg("--store")
        .arg(store)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (up to a minute) until a server's counter is above zero.
fn wait_for_metric(server: &SkiffServer, metric: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric(metric, &[]) == 0.0 {
        assert!(Instant::now() < deadline, "{metric} stayed 0");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Converts `image` into `store` as `name`; returns the layout it came from.
fn convert(store: &Path, dir: &Path, image: &Image, name: &str) {
    image.write_layout(dir, "latest");
    skiff_ok(store, &["convert", &format!("oci:{}", dir.display()), name]);
}

/// The index of `name` in `store` (which no server may hold at the time).
fn index_of(store: &Path, name: &str) -> ImageIndex {
    let images = skiff_json(store, &["images", "--json"]);
    let digest = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| {
            format!(
                "{}:{}",
                i["name"].as_str().unwrap(),
                i["tag"].as_str().unwrap()
            ) == name
        })
        .unwrap_or_else(|| panic!("{name} not in {images}"))["index"]
        .as_str()
        .unwrap()
        .to_owned();
    read_index(store, &IndexDigest::from_str(&digest).unwrap())
}

/// Reads an index through a throwaway server, the only way in from outside.
fn read_index(store: &Path, digest: &IndexDigest) -> ImageIndex {
    SkiffServer::start(store, &[]).index_by_digest(digest)
}

fn distinct_ids(index: &ImageIndex) -> Vec<ChunkId> {
    let mut seen = std::collections::HashSet::new();
    index
        .chunk_refs()
        .map(|c| c.id)
        .filter(|id| seen.insert(*id))
        .collect()
}

fn push(store: &Path, server: &SkiffServer, name: &str, token: Option<&Path>) -> Value {
    let mut args = vec!["push", name, "--server", &server.url, "--json"];
    let token_arg;
    if let Some(t) = token {
        token_arg = t.display().to_string();
        args.extend(["--token-file", &token_arg]);
    }
    skiff_json(store, &args)
}

fn pull(store: &Path, server: &SkiffServer, name: &str) -> Value {
    skiff_json(store, &["pull", name, "--server", &server.url, "--json"])
}

/// The image in `store` exported and unpacked, against `source` unpacked.
fn assert_same_tree(store: &Path, name: &str, source: &Path, tmp: &Path) {
    let expected = umoci_unpack(source, "latest", &tmp.join("unpack-src"));
    let out = tmp.join("exported");
    skiff_ok(
        store,
        &["export", name, &format!("oci:{}:e", out.display())],
    );
    let actual = umoci_unpack(&out, "e", &tmp.join("unpack-out"));
    let diffs = diff_trees(&expected, &actual, false);
    assert!(diffs.is_empty(), "{diffs:#?}");
    fs::remove_dir_all(tmp.join("unpack-src")).unwrap();
    fs::remove_dir_all(tmp.join("unpack-out")).unwrap();
    fs::remove_dir_all(out).unwrap();
}

fn fsck_clean(store: &Path) {
    let report = skiff_json(store, &["fsck", "--json"]);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
}

fn records(body: &[u8]) -> Vec<ChunkRecord> {
    RecordReader::new(body)
        .collect::<std::io::Result<_>>()
        .unwrap()
}

fn upload_body(chunks: &[(ChunkId, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (id, data) in chunks {
        wire::write_chunk_record(&mut body, id, &zstd::encode_all(*data, 3).unwrap());
    }
    body
}

#[test]
fn every_route_serves_what_push_sent_and_pull_gets_the_same_bytes() {
    let tmp = tempdir();
    let [local, served, pulled] = dirs(&tmp, ["local", "served", "pulled"]);
    let source = tmp.path().join("src-a");
    convert(&local, &source, &image(1, 3), "app:1");
    convert(&local, &tmp.path().join("src-b"), &image(2, 3), "app:2");
    let index = index_of(&local, "app:1");
    let ids = distinct_ids(&index);

    let server = SkiffServer::start(&served, &[]);
    let http = Client::new();
    let url = |path: &str| format!("{}{path}", server.url);

    // Push: everything the first time, only the other image's own chunks the second.
    let first = push(&local, &server, "app:1", None);
    assert_eq!(first["chunks_sent"], first["chunks"]);
    assert_eq!(first["chunks"].as_u64().unwrap(), ids.len() as u64);
    let second = push(&local, &server, "app:2", None);
    let second_ids = distinct_ids(&index_of(&local, "app:2"));
    let own: Vec<_> = second_ids.iter().filter(|id| !ids.contains(id)).collect();
    assert_eq!(second["chunks_sent"].as_u64().unwrap(), own.len() as u64);
    assert!(
        own.len() * 4 < second_ids.len(),
        "the images share most chunks"
    );
    let again = push(&local, &server, "app:1", None);
    assert_eq!(again["chunks_sent"], 0);

    // Catalog routes.
    let listed = skiff_json(&local, &["images", "--server", &server.url, "--json"]);
    let names: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}:{}",
                i["name"].as_str().unwrap(),
                i["tag"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["app:1", "app:2"]);
    let tags: Value = serde_json::from_slice(
        &http
            .get(url("/v1/tags/app"))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["1", "2"]));
    assert_eq!(
        http.get(url("/v1/tags/nope")).send().unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // Manifest and index.
    let manifest: Value = serde_json::from_slice(
        &http
            .get(url("/v1/manifests/app:1"))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    let digest = IndexDigest::from_str(manifest["index"]["digest"].as_str().unwrap()).unwrap();
    assert_eq!(digest, index.digest());
    let compressed = http
        .get(url(&format!("/v1/indexes/{digest}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(
        ImageIndex::decode(&zstd::decode_all(&compressed[..]).unwrap()).unwrap(),
        index
    );

    let conditional = http
        .get(url(&format!("/v1/indexes/{digest}")))
        .header("if-none-match", format!("\"{digest}\""))
        .send()
        .unwrap();
    assert_eq!(conditional.status(), StatusCode::NOT_MODIFIED);

    // One chunk: bytes, caching headers, conditional GET, HEAD.
    let id = ids[0];
    let response = http.get(url(&format!("/v1/chunks/{id}"))).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{id}\""));
    assert!(response.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    let data = zstd::decode_all(&response.bytes().unwrap()[..]).unwrap();
    assert_eq!(ChunkId::of(&data), id);
    let conditional = http
        .get(url(&format!("/v1/chunks/{id}")))
        .header("if-none-match", &etag)
        .send()
        .unwrap();
    assert_eq!(conditional.status(), StatusCode::NOT_MODIFIED);
    let head = http.head(url(&format!("/v1/chunks/{id}"))).send().unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["x-skiff-chunk-length"].to_str().unwrap(),
        data.len().to_string()
    );
    let unknown = ChunkId::of(b"no such chunk");
    assert_eq!(
        http.head(url(&format!("/v1/chunks/{unknown}")))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    // Batch fetch: every chunk in request order, a missing record for the unknown id.
    let mut ask = ids.clone();
    ask.push(unknown);
    let body = http
        .post(url("/v1/chunks/fetch"))
        .body(wire::encode_ids(&ask))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let got = records(&body);
    assert_eq!(got.len(), ask.len());
    for (record, id) in got.iter().zip(&ask) {
        match record {
            ChunkRecord::Chunk { id: got, wire } => {
                assert_eq!(got, id);
                assert_eq!(ChunkId::of(&zstd::decode_all(&wire[..]).unwrap()), *id);
            }
            ChunkRecord::Missing(got) => assert_eq!((got, id), (&unknown, &unknown)),
            ChunkRecord::Frame { .. } => panic!("a frame record to a client that did not ask"),
        }
    }

    // The same to a client that takes frames: each id once, whole frames as stored.
    let answer = http
        .post(url("/v1/chunks/fetch"))
        .header("accept", wire::FRAME_RECORDS_CONTENT_TYPE)
        .body(wire::encode_ids(&ask))
        .send()
        .unwrap();
    assert_eq!(
        answer.headers()["content-type"],
        wire::FRAME_RECORDS_CONTENT_TYPE
    );
    let body = answer.bytes().unwrap();
    let mut delivered = Vec::new();
    let (mut frames, mut missing) = (0, Vec::new());
    for record in records(&body) {
        match record {
            ChunkRecord::Chunk { id, wire } => {
                assert_eq!(ChunkId::of(&zstd::decode_all(&wire[..]).unwrap()), id);
                delivered.push(id);
            }
            ChunkRecord::Frame {
                chunks,
                raw_len,
                frame,
            } => {
                frames += 1;
                let raw = zstd::bulk::decompress(&frame, raw_len as usize).unwrap();
                assert_eq!(raw.len(), raw_len as usize);
                for c in chunks {
                    let data = &raw[c.offset as usize..(c.offset + c.len) as usize];
                    assert_eq!(ChunkId::of(data), c.id);
                    delivered.push(c.id);
                }
            }
            ChunkRecord::Missing(id) => missing.push(id),
        }
    }
    assert_eq!(missing, [unknown]);
    assert!(
        frames > 0,
        "every chunk of the image asked for, and no frame sent whole"
    );
    let mut want: Vec<ChunkId> = ids.clone();
    want.sort();
    want.dedup();
    delivered.sort();
    assert_eq!(delivered, want, "each chunk once");

    // Which are missing.
    let missing = http
        .post(url("/v1/chunks/missing"))
        .body(wire::encode_ids(&ask))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(wire::decode_ids(&missing).unwrap(), [unknown]);

    // The manifest fetch above warmed the cache; reads were counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("skiff_cache_warmed_total", &[]) == 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.metric("skiff_cache_warmed_total", &[]) > 0.0);
    assert!(server.metric("skiff_cache_hits_total", &[]) > 0.0);
    assert!(
        server.metric(
            "skiff_http_requests_total",
            &["route=\"/v1/chunks/{id}\"", "status=\"200\""]
        ) >= 1.0
    );
    // Streamed batches and whole bodies (the index) are both counted.
    assert!(
        server.metric("skiff_http_response_bytes_total", &[])
            >= (body.len() + compressed.len()) as f64
    );
    assert!(
        server.metric(
            "skiff_http_request_duration_seconds_count",
            &["route=\"/v1/chunks/fetch\""]
        ) >= 1.0
    );

    // Pull into an empty store: the same bytes as the source image.
    let report = pull(&pulled, &server, "app:1");
    assert_eq!(report["chunks_sent"], report["chunks"]);
    fsck_clean(&pulled);
    assert_same_tree(&pulled, "app:1", &source, tmp.path());
    let report = pull(&pulled, &server, "app:2");
    assert_eq!(report["chunks_sent"].as_u64().unwrap(), own.len() as u64);

    // Delete a tag.
    let deleted = http.delete(url("/v1/manifests/app:2")).send().unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        http.get(url("/v1/manifests/app:2"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let removed = skiff_ok(&local, &["rmi", "app:1", "--server", &server.url]);
    assert!(removed.contains("removed app:1"), "{removed}");
    assert_eq!(
        skiff_json(&local, &["images", "--server", &server.url, "--json"]),
        serde_json::json!([])
    );
    let health = http.get(url("/healthz")).send().unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    drop(server);
    fsck_clean(&served);
}

#[test]
fn bad_requests_get_clear_statuses_and_change_nothing() {
    let tmp = tempdir();
    let [local, served] = dirs(&tmp, ["local", "served"]);
    convert(&local, &tmp.path().join("src"), &image(1, 1), "app:1");
    let token = tmp.path().join("token");
    fs::write(&token, "s3cret-write\n").unwrap();
    let server = SkiffServer::start(&served, &["--token-file", token.to_str().unwrap()]);
    let http = Client::new();
    let url = |path: &str| format!("{}{path}", server.url);
    let auth = "Bearer s3cret-write";

    // Without the token a push is refused before it sends anything.
    let out = skiff(&local, &["push", "app:1", "--server", &server.url]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refuses uploads without a valid token"),
        "{stderr}"
    );
    let access = |token: Option<&str>| -> Value {
        let request = http.get(url("/v1/auth"));
        let request = match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        };
        serde_json::from_slice(&request.send().unwrap().bytes().unwrap()).unwrap()
    };
    assert_eq!(
        access(None),
        serde_json::json!({"read": true, "write": false})
    );
    assert_eq!(
        access(Some("nope")),
        serde_json::json!({"read": true, "write": false})
    );
    assert_eq!(
        access(Some("s3cret-write")),
        serde_json::json!({"read": true, "write": true})
    );
    push(&local, &server, "app:1", Some(&token));
    let index = index_of(&local, "app:1");
    let ids = distinct_ids(&index);
    let before = store_state(&served);

    let status = |request: reqwest::blocking::RequestBuilder| request.send().unwrap().status();
    let good = b"a chunk nobody has uploaded".to_vec();
    let good_id = ChunkId::of(&good);
    let manifest = http
        .get(url("/v1/manifests/app:1"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let other_manifest = manifest.replace("\"tag\":\"1\"", "\"tag\":\"2\"");

    // Writes without a valid token: 401, whatever the body.
    for bearer in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-writ"),
        Some("s3cret-write"),
    ] {
        let with = |r: reqwest::blocking::RequestBuilder| match bearer {
            Some(b) => r.header("authorization", b),
            None => r,
        };
        let upload = upload_body(&[(good_id, &good)]);
        assert_eq!(status(with(http.post(url("/v1/chunks")).body(upload))), 401);
        assert_eq!(
            status(with(
                http.put(url("/v1/manifests/app:2"))
                    .body(other_manifest.clone())
            )),
            401
        );
        assert_eq!(
            status(with(
                http.put(url(&format!("/v1/indexes/{}", index.digest())))
                    .body("x")
            )),
            401
        );
        assert_eq!(status(with(http.delete(url("/v1/manifests/app:1")))), 401);
    }

    // Malformed ids, digests and names: 400; unknown ones: 404.
    for path in ["/v1/chunks/xyz", "/v1/chunks/ABCDEF", "/v1/indexes/123"] {
        assert_eq!(status(http.get(url(path))), 400, "{path}");
    }
    assert_eq!(status(http.get(url("/v1/manifests/UPPER:case"))), 400);
    assert_eq!(status(http.get(url("/v1/manifests/app:bad%20tag"))), 400);
    assert_eq!(status(http.get(url(&format!("/v1/chunks/{good_id}")))), 404);
    assert_eq!(
        status(http.get(url(&format!("/v1/indexes/{}", IndexDigest::of(b"none"))))),
        404
    );
    assert_eq!(status(http.get(url("/v1/manifests/app:9"))), 404);
    assert_eq!(
        status(
            http.delete(url("/v1/manifests/app:9"))
                .header("authorization", auth)
        ),
        404
    );
    assert_eq!(
        status(http.post(url("/v1/chunks/fetch")).body(vec![0u8; 33])),
        400
    );
    assert_eq!(
        status(http.post(url("/v1/chunks/missing")).body(Vec::new())),
        400
    );

    // Bodies over a limit: 413.
    let too_many_ids = vec![0u8; (65_536 + 1) * 32];
    assert_eq!(
        status(
            http.post(url("/v1/chunks/fetch"))
                .body(too_many_ids.clone())
        ),
        413
    );
    assert_eq!(
        status(http.post(url("/v1/chunks/missing")).body(too_many_ids)),
        413
    );
    let huge = vec![0u8; 65 << 20];
    let refused = http
        .post(url("/v1/chunks"))
        .header("authorization", auth)
        .body(huge)
        .send()
        .unwrap();
    assert_eq!(refused.status(), 413);
    let error: Value = serde_json::from_slice(&refused.bytes().unwrap()).unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("limit"),
        "{error}"
    );
    assert_eq!(
        status(
            http.put(url("/v1/manifests/app:2"))
                .header("authorization", auth)
                .body(vec![b' '; 5 << 20])
        ),
        413
    );

    // Uploads that lie: a chunk not matching its id refuses the whole body,
    // including the good chunk before it.
    let bad = upload_body(&[(good_id, &good), (ChunkId::of(b"claimed"), b"actual")]);
    assert_eq!(
        status(
            http.post(url("/v1/chunks"))
                .header("authorization", auth)
                .body(bad)
        ),
        422
    );
    let not_zstd = {
        let mut body = Vec::new();
        wire::write_chunk_record(&mut body, &good_id, b"not zstd at all");
        body
    };
    assert_eq!(
        status(
            http.post(url("/v1/chunks"))
                .header("authorization", auth)
                .body(not_zstd)
        ),
        422
    );
    let mut truncated = upload_body(&[(good_id, &good)]);
    truncated.truncate(truncated.len() - 3);
    assert_eq!(
        status(
            http.post(url("/v1/chunks"))
                .header("authorization", auth)
                .body(truncated)
        ),
        400
    );
    let missing_record = wire::record_header(&good_id, RecordKind::Missing, 0).to_vec();
    assert_eq!(
        status(
            http.post(url("/v1/chunks"))
                .header("authorization", auth)
                .body(missing_record)
        ),
        400
    );
    assert!(server.metric("skiff_chunks_rejected_total", &[]) >= 2.0);

    // Manifests and indexes that do not add up: 400 or 422.
    let put_manifest = |path: &str, body: String| {
        status(http.put(url(path)).header("authorization", auth).body(body))
    };
    assert_eq!(
        put_manifest("/v1/manifests/app:3", other_manifest.clone()),
        400
    );
    assert_eq!(put_manifest("/v1/manifests/app:2", "{not json".into()), 400);
    let unknown_index =
        other_manifest.replace(&index.digest().to_hex(), &IndexDigest::of(b"none").to_hex());
    assert_eq!(put_manifest("/v1/manifests/app:2", unknown_index), 422);
    // An index naming a chunk the server lacks.
    let mut lacking = index.clone();
    let ino = lacking
        .inodes
        .iter()
        .position(|i| matches!(i.kind, skiff_format::InodeKind::File { .. }))
        .unwrap();
    if let skiff_format::InodeKind::File { chunks, .. } = &mut lacking.inodes[ino].kind {
        chunks[0].id = good_id;
    }
    let encoded = lacking.encode();
    let put_index = |digest: IndexDigest, body: Vec<u8>| {
        status(
            http.put(url(&format!("/v1/indexes/{digest}")))
                .header("authorization", auth)
                .body(body),
        )
    };
    let compressed = zstd::encode_all(&encoded[..], 3).unwrap();
    assert_eq!(
        put_index(IndexDigest::of(&encoded), compressed.clone()),
        422
    );
    assert_eq!(
        put_index(index.digest(), compressed),
        422,
        "digest mismatch"
    );
    assert_eq!(
        put_index(IndexDigest::of(&encoded), b"not zstd".to_vec()),
        422
    );
    let garbage = zstd::encode_all(&b"SKIFFIDXgarbage"[..], 3).unwrap();
    assert_eq!(put_index(IndexDigest::of(b"SKIFFIDXgarbage"), garbage), 422);

    // None of it changed the store; the good chunk was never stored.
    let lacks = http
        .post(url("/v1/chunks/missing"))
        .body(wire::encode_ids([&good_id, &ids[0]]))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(wire::decode_ids(&lacks).unwrap(), [good_id]);
    assert_eq!(store_state(&served), before);
    drop(server);
    fsck_clean(&served);
}

#[test]
fn a_read_token_guards_reads_and_the_write_token_also_reads() {
    let tmp = tempdir();
    let served = tmp.path().join("served");
    seed_store(&served, &tmp.path().join("seed"));
    let (read, write) = (tmp.path().join("read"), tmp.path().join("write"));
    fs::write(&read, "reader").unwrap();
    fs::write(&write, "writer").unwrap();
    let server = SkiffServer::start(
        &served,
        &[
            "--token-file",
            write.to_str().unwrap(),
            "--read-token-file",
            read.to_str().unwrap(),
        ],
    );
    let http = Client::new();
    let images = format!("{}/v1/images", server.url);
    let get = |token: Option<&str>| {
        let request = http.get(&images);
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
        .send()
        .unwrap()
        .status()
    };
    assert_eq!(get(None), 401);
    assert_eq!(get(Some("wrong")), 401);
    assert_eq!(get(Some("reader")), 200);
    assert_eq!(get(Some("writer")), 200);
    let out = skiff(&served, &["images", "--server", &server.url]);
    assert!(!out.status.success());
    let listed = skiff_ok(
        &served,
        &[
            "images",
            "--server",
            &server.url,
            "--token-file",
            read.to_str().unwrap(),
        ],
    );
    assert!(listed.contains("seed:latest"), "{listed}");
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(
        http.get(format!("{}/healthz", server.url))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{}/metrics", server.url))
            .send()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn concurrent_pushes_of_overlapping_images_both_land() {
    let tmp = tempdir();
    let [a, b, served, pulled] = dirs(&tmp, ["a", "b", "served", "pulled"]);
    let (src_a, src_b) = (tmp.path().join("src-a"), tmp.path().join("src-b"));
    convert(&a, &src_a, &image(1, 24), "app:a");
    convert(&b, &src_b, &image(2, 24), "app:b");
    let server = SkiffServer::start(&served, &[]);
    let spawn = |store: &Path, name: &str| {
        spawn_skiff(store, &["push", name, "--server", &server.url, "--json"])
    };
    let (one, two) = (spawn(&a, "app:a"), spawn(&b, "app:b"));
    for child in [one, two] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The server holds each distinct chunk once.
    let mut union: Vec<_> = distinct_ids(&index_of(&a, "app:a"));
    union.extend(distinct_ids(&index_of(&b, "app:b")));
    union.sort();
    union.dedup();
    drop(server);
    fsck_clean(&served);
    assert_eq!(
        skiff_json(&served, &["stats", "--json"])["chunks"]
            .as_u64()
            .unwrap(),
        union.len() as u64
    );
    let server = SkiffServer::start(&served, &[]);
    pull(&pulled, &server, "app:a");
    pull(&pulled, &server, "app:b");
    assert_same_tree(&pulled, "app:a", &src_a, tmp.path());
    assert_same_tree(&pulled, "app:b", &src_b, tmp.path());
}

#[test]
fn a_push_cut_off_by_a_killed_server_resumes_without_resending() {
    let tmp = tempdir();
    let [local, served, pulled] = dirs(&tmp, ["local", "served", "pulled"]);
    let source = tmp.path().join("src");
    convert(&local, &source, &image(1, 48), "app:1");
    let total = distinct_ids(&index_of(&local, "app:1")).len() as u64;
    let mut server = SkiffServer::start(&served, &[]);
    let mut push_child = spawn_skiff(
        &local,
        &["push", "app:1", "--server", &server.url, "--retry-for", "0"],
    );
    // Kill the server once some, not all, chunks are stored.
    wait_for_metric(&server, "skiff_chunks_stored_total");
    server.kill();
    let status = push_child.wait().unwrap();
    let mut stderr = String::new();
    push_child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        !status.success(),
        "the push should fail when its server dies"
    );
    assert!(stderr.contains("pushing app:1"), "{stderr}");

    // The server's store recovers and is consistent; the rerun sends only the rest.
    fsck_clean(&served);
    let server = SkiffServer::start(&served, &[]);
    let rerun = push(&local, &server, "app:1", None);
    let resent = rerun["chunks_sent"].as_u64().unwrap();
    assert!(resent < total, "resent {resent} of {total} chunks");
    pull(&pulled, &server, "app:1");
    assert_same_tree(&pulled, "app:1", &source, tmp.path());
    drop(server);
    fsck_clean(&served);
}

#[test]
fn a_killed_pull_resumes_without_refetching() {
    let tmp = tempdir();
    let (served, pulled) = (tmp.path().join("served"), tmp.path().join("pulled"));
    let source = tmp.path().join("src");
    convert(&served, &source, &image(1, 48), "app:1");
    let total = distinct_ids(&index_of(&served, "app:1")).len() as u64;
    // A small cache keeps the server reading from its store, which paces the pull.
    let server = SkiffServer::start(&served, &["--cache-mb", "0"]);
    let mut pull_child = spawn_skiff(&pulled, &["pull", "app:1", "--server", &server.url]);
    // Kill -9 the client once its store holds a finished batch.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the pull never stored a batch");
        let stats = skiff(&pulled, &["stats", "--json"]);
        if stats.status.success() {
            let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
            if stats["chunks"].as_u64().unwrap_or(0) > 0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    pull_child.kill().unwrap();
    pull_child.wait().unwrap();
    let rerun = pull(&pulled, &server, "app:1");
    let fetched = rerun["chunks_sent"].as_u64().unwrap();
    assert!(fetched < total, "fetched {fetched} of {total} chunks again");
    fsck_clean(&pulled);
    assert_same_tree(&pulled, "app:1", &source, tmp.path());
}

#[test]
fn sigterm_lets_a_streaming_fetch_finish_then_closes_the_store() {
    let tmp = tempdir();
    let served = tmp.path().join("served");
    convert(&served, &tmp.path().join("src"), &image(1, 16), "app:1");
    let ids = distinct_ids(&index_of(&served, "app:1"));
    let mut server = SkiffServer::start(&served, &["--cache-mb", "0"]);
    let mut response = Client::new()
        .post(format!("{}/v1/chunks/fetch", server.url))
        .body(wire::encode_ids(&ids))
        .send()
        .unwrap();
    let mut first = [0u8; 64];
    response.read_exact(&mut first).unwrap();
    // The signal arrives while most of the batch is still to be read and sent.
    let signalled = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let mut rest = Vec::new();
    response.read_to_end(&mut rest).unwrap();
    let mut body = first.to_vec();
    body.extend(rest);
    assert_eq!(
        records(&body).len(),
        ids.len(),
        "the in-flight batch finished"
    );
    let status = server.terminate_wait();
    assert!(status.success(), "skiff serve exited with {status}");
    fsck_clean(&served);
}

#[test]
fn transfers_ride_out_a_server_restart() {
    let tmp = tempdir();
    let [local, served, pulled] = dirs(&tmp, ["local", "served", "pulled"]);
    let source = tmp.path().join("src");
    convert(&local, &source, &image(1, 48), "app:1");
    let mut server = SkiffServer::start(&served, &[]);
    let port = server.port;
    let transfer = |store: &Path, verb: &str, url: &str| {
        spawn_skiff(store, &[verb, "app:1", "--server", url, "--json"])
    };

    // The server dies mid-push and comes back on the same port: the push retries and finishes.
    let push_child = transfer(&local, "push", &server.url.clone());
    wait_for_metric(&server, "skiff_chunks_stored_total");
    server.kill();
    std::thread::sleep(Duration::from_millis(500));
    // A cold cache paces the pull below, so it is still running when the server dies.
    let mut server = SkiffServer::start_on(port, &served, &["--cache-mb", "0"]);
    let out = push_child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("retrying"));

    // The same for a pull: its batch is asked again from where it was cut.
    let pull_child = transfer(&pulled, "pull", &server.url.clone());
    wait_for_metric(&server, "skiff_chunks_sent_total");
    server.kill();
    std::thread::sleep(Duration::from_millis(500));
    let server = SkiffServer::start_on(port, &served, &[]);
    let out = pull_child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("retrying"));
    drop(server);
    fsck_clean(&served);
    fsck_clean(&pulled);
    assert_same_tree(&pulled, "app:1", &source, tmp.path());
}

#[test]
fn serve_refuses_to_open_writes_unless_told_to() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let read = tmp.path().join("read");
    fs::write(&read, "reader").unwrap();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    // No write token: refused at once, with the way out named, and no store made.
    for extra in [&[][..], &["--read-token-file", read.to_str().unwrap()][..]] {
        let mut args = vec!["serve", "--listen", &listen];
        args.extend_from_slice(extra);
        let out = skiff(&store, &args);
        assert!(!out.status.success(), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--token-file") && stderr.contains("--allow-anonymous-writes"),
            "{stderr}"
        );
        assert!(!store.exists());
    }
    let out = skiff(
        &store,
        &[
            "serve",
            "--allow-anonymous-writes",
            "--token-file",
            read.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());

    // Said in so many words, writes open; a read token alone never grants them.
    seed_store(&store, &tmp.path().join("seed"));
    let write = tmp.path().join("write");
    fs::write(&write, "writer").unwrap();
    let server = SkiffServer::start(&store, &["--read-token-file", read.to_str().unwrap()]);
    let auth = |url: &str, token: Option<&str>| -> Value {
        let request = Client::new().get(format!("{url}/v1/auth"));
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
        .send()
        .unwrap()
        .bytes()
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap()
    };
    assert_eq!(
        auth(&server.url, None),
        serde_json::json!({"read": false, "write": true})
    );
    drop(server);
    let server = SkiffServer::start(
        &store,
        &[
            "--token-file",
            write.to_str().unwrap(),
            "--read-token-file",
            read.to_str().unwrap(),
        ],
    );
    assert_eq!(
        auth(&server.url, Some("reader")),
        serde_json::json!({"read": true, "write": false})
    );
    assert_eq!(
        auth(&server.url, Some("writer")),
        serde_json::json!({"read": true, "write": true})
    );
}

/// Opens a connection that sends `prefix`, then (with `every`) a byte that
/// often, until the server closes it; returns how long the server kept it.
fn dribble(
    port: u16,
    prefix: &'static [u8],
    every: Option<Duration>,
) -> std::thread::JoinHandle<Duration> {
    use std::io::Write;
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(prefix).unwrap();
        let tick = every.unwrap_or(Duration::from_millis(100));
        stream.set_read_timeout(Some(tick)).unwrap();
        let mut buf = [0u8; 256];
        while start.elapsed() < Duration::from_secs(30) {
            // An answer (a 408, say) or EOF: the server has let go.
            match stream.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => return start.elapsed(),
            }
            if every.is_some() && stream.write_all(b"a").is_err() {
                return start.elapsed();
            }
        }
        start.elapsed()
    })
}

#[test]
fn slow_and_idle_clients_cannot_starve_the_others() {
    let tmp = tempdir();
    let [store, local] = dirs(&tmp, ["store", "local"]);
    seed_store(&store, &tmp.path().join("seed"));
    convert(&local, &tmp.path().join("src"), &image(2, 2), "app:1");
    let server = SkiffServer::start(
        &store,
        &[
            "--max-connections",
            "8",
            "--header-timeout",
            "2",
            "--idle-timeout",
            "2",
        ],
    );
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let images = || {
        let started = Instant::now();
        let status = http
            .get(format!("{}/v1/images", server.url))
            .send()
            .unwrap()
            .status();
        (status, started.elapsed())
    };

    // Slowloris under the cap: headers a byte at a time. Others are served
    // meanwhile, and every slow connection is cut at the header timeout
    // although it never stops sending.
    let slow: Vec<_> = (0..6)
        .map(|_| {
            dribble(
                server.port,
                b"GET /v1/images HTTP/1.1\r\nX-Slow: ",
                Some(Duration::from_millis(200)),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (status, took) = images();
    assert_eq!(status, StatusCode::OK);
    assert!(
        took < Duration::from_secs(2),
        "{took:?} while slow clients dribbled"
    );
    for held in slow {
        let held = held.join().unwrap();
        assert!(
            held < Duration::from_secs(6),
            "a slow client held on for {held:?}"
        );
    }

    // Past the cap: silent connections fill every slot; a new client waits
    // in the backlog until their header timeout frees one, then is served.
    let silent: Vec<_> = (0..8).map(|_| dribble(server.port, b"", None)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (status, took) = images();
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(8), "{took:?}");
    for held in silent {
        assert!(held.join().unwrap() < Duration::from_secs(6));
    }

    // Upload bodies that stall hold every upload slot until the idle
    // timeout closes them; then a real push gets through.
    // skiff_server::MAX_CONCURRENT_UPLOADS is 4: two more than that.
    let stalled: Vec<_> = (0..6)
        .map(|_| {
            dribble(
                server.port,
                b"POST /v1/chunks HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nSKIFF",
                None,
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let pushed = push(&local, &server, "app:1", None);
    assert!(pushed["chunks_sent"].as_u64().unwrap() > 0, "{pushed}");
    for held in stalled {
        let held = held.join().unwrap();
        assert!(
            held < Duration::from_secs(8),
            "a stalled upload held on for {held:?}"
        );
    }
    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));
    drop(server);

    // One client may not take every slot: past its own cap its next
    // connection is closed at once, while the others' are served.
    let server = SkiffServer::start(
        &store,
        &["--max-connections-per-client", "2", "--header-timeout", "3"],
    );
    let held: Vec<_> = (0..2).map(|_| dribble(server.port, b"", None)).collect();
    // Long enough for both to be accepted on a busy machine (CI runs the
    // other tests beside this one), well within their 3 s header timeout.
    std::thread::sleep(Duration::from_millis(1000));
    let refused = dribble(server.port, b"", None).join().unwrap();
    assert!(refused < Duration::from_secs(1), "{refused:?}");
    for held in held {
        assert!(held.join().unwrap() >= Duration::from_secs(2));
    }
}

#[test]
fn a_manifest_put_with_if_match_never_moves_a_tag_back() {
    let tmp = tempdir();
    let [local, served] = dirs(&tmp, ["local", "served"]);
    convert(&local, &tmp.path().join("src1"), &image(1, 1), "app:1");
    convert(&local, &tmp.path().join("src2"), &image(2, 2), "app:2");
    let mut server = SkiffServer::start(&served, &[]);
    push(&local, &server, "app:1", None);
    push(&local, &server, "app:2", None);
    let http = Client::new();
    let url = |image: &str| format!("{}/v1/manifests/{image}", server.url);
    let get = |image: &str| {
        let response = http.get(url(image)).send().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let etag = response.headers()["etag"].to_str().unwrap().to_owned();
        let body: Value = serde_json::from_slice(&response.bytes().unwrap()).unwrap();
        (body, etag)
    };
    let put = |body: &Value, if_match: Option<&str>| {
        let mut request = http
            .put(url("app:1"))
            .header("content-type", "application/vnd.skiff.manifest.v1+json")
            .body(serde_json::to_vec(body).unwrap());
        if let Some(etag) = if_match {
            request = request.header("if-match", etag);
        }
        request.send().unwrap().status()
    };
    // A reader takes app:1 to add to it; meanwhile app:1 is pushed anew (app:2's image).
    let (read, etag) = get("app:1");
    let (mut newer, _) = get("app:2");
    newer["tag"] = json!("1");
    assert_eq!(put(&newer, None), StatusCode::CREATED);
    // Its write, conditional on what it read, is refused: the tag stays where the push put it.
    let mut with_profile = read.clone();
    with_profile["profile"] = json!({"command": ["sh"], "read_bytes": 0, "ranges": []});
    assert_eq!(
        put(&with_profile, Some(&etag)),
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(get("app:1").0["index"], newer["index"]);
    // Against what the tag names now it goes through.
    let (now, etag) = get("app:1");
    let mut with_profile = now.clone();
    with_profile["profile"] = json!({"command": ["sh"], "read_bytes": 0, "ranges": []});
    assert_eq!(put(&with_profile, Some(&etag)), StatusCode::CREATED);
    assert_eq!(get("app:1").0["profile"]["command"], json!(["sh"]));
    // With nothing in flight (the client's kept-alive connection is idle),
    // SIGTERM stops the server at once, not after the drain's 30 s.
    let started = Instant::now();
    let signalled = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = server.terminate_wait();
    assert!(status.success(), "skiff serve exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// The FAST '18 registry rule: reading the manifest of a recently pushed
/// image warms the hot cache, with the image's startup profile first; an
/// image nobody pushed to this server is not warmed.
#[test]
fn a_recently_pushed_image_warms_the_cache_with_its_profile_first() {
    let tmp = tempdir();
    let [local, served] = dirs(&tmp, ["local", "served"]);
    convert(&served, &tmp.path().join("src0"), &image(0, 1), "old:1");
    convert(&local, &tmp.path().join("src1"), &image(1, 4), "app:1");
    let index = index_of(&local, "app:1");
    let big = index.lookup_path(b"usr/lib/big.bin").unwrap();
    let skiff_format::InodeKind::File { chunks, .. } = &index.inode(big).unwrap().kind else {
        panic!("big.bin is a file");
    };
    // Its last chunks: far from the first chunks of the smallest files.
    let profiled: Vec<ChunkId> = chunks[chunks.len() - 3..].iter().map(|c| c.id).collect();

    let server = SkiffServer::start(&served, &[]);
    let http = Client::new();
    let manifest_url = |image: &str| format!("{}/v1/manifests/{image}", server.url);
    let get_manifest = |image: &str| -> Value {
        let response = http.get(manifest_url(image)).send().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        serde_json::from_slice(&response.bytes().unwrap()).unwrap()
    };
    get_manifest("old:1");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.metric("skiff_cache_warmed_total", &[]),
        0.0,
        "an image converted into the served store, not pushed to it"
    );

    push(&local, &server, "app:1", None);
    let mut manifest = get_manifest("app:1");
    wait_for_metric(&server, "skiff_cache_warmed_total");
    // A profile recorded later is a push too; the next read warms it first.
    manifest["profile"] = json!({
        "command": ["app"],
        "read_bytes": 3 << 16,
        "ranges": [{ "path": "usr/lib/big.bin", "first": chunks.len() - 3, "count": 3 }],
    });
    let status = http
        .put(manifest_url("app:1"))
        .header("content-type", "application/vnd.skiff.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::CREATED);
    let warmed = server.metric("skiff_cache_warmed_total", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("skiff_cache_warmed_total", &[]) == warmed {
        assert!(
            Instant::now() < deadline,
            "the profiled image was never warmed"
        );
        get_manifest("app:1");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (hits, misses) = (
        server.metric("skiff_cache_hits_total", &[]),
        server.metric("skiff_cache_misses_total", &[]),
    );
    for id in &profiled {
        let response = http
            .get(format!("{}/v1/chunks/{id}", server.url))
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(
        server.metric("skiff_cache_hits_total", &[]) - hits,
        3.0,
        "the profile's chunks were in memory"
    );
    assert_eq!(server.metric("skiff_cache_misses_total", &[]), misses);
}
