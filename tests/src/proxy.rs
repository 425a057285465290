//! A man in the middle for lazy-mount tests: an HTTP/1.1 proxy in front of
//! a real `skiff serve` that replaces one chunk in batch answers with other
//! bytes (a valid zstd frame, so only the BLAKE3 check can catch it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use skiff_format::wire::{self, ChunkRecord, RecordReader};
use skiff_format::ChunkId;

pub struct TamperingProxy {
    pub url: String,
    /// Chunk records replaced so far.
    pub tampered: Arc<AtomicU64>,
    /// The ids of every fetch request, in the order the requests arrived.
    pub fetches: Arc<Mutex<Vec<Vec<ChunkId>>>>,
}

impl TamperingProxy {
    /// Proxies every request to `upstream` (http://HOST:PORT), swapping the
    /// bytes of the `victims` wherever a batch answer carries them.
    pub fn start(upstream: &str, victims: &[ChunkId]) -> TamperingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let tampered = Arc::new(AtomicU64::new(0));
        let fetches = Arc::new(Mutex::new(Vec::new()));
        let (upstream, counter, log) = (upstream.to_owned(), tampered.clone(), fetches.clone());
        let victims = Arc::new(victims.to_vec());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (upstream, counter, victims, log) = (
                    upstream.clone(),
                    counter.clone(),
                    victims.clone(),
                    log.clone(),
                );
                std::thread::spawn(move || {
                    let _ = serve(stream, &upstream, &victims, &counter, &log);
                });
            }
        });
        TamperingProxy {
            url,
            tampered,
            fetches,
        }
    }
}

fn serve(
    stream: TcpStream,
    upstream: &str,
    victims: &[ChunkId],
    tampered: &AtomicU64,
    fetches: &Mutex<Vec<Vec<ChunkId>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("GET").to_owned(),
        parts.next().unwrap_or("/").to_owned(),
    );
    let mut content_length = 0usize;
    let mut accept = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("accept") {
                accept = Some(value.trim().to_owned());
            }
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    if path == "/v1/chunks/fetch" {
        if let Ok(ids) = wire::decode_ids(&body) {
            fetches.lock().unwrap().push(ids);
        }
    }

    let client = reqwest::blocking::Client::new();
    let url = format!("{upstream}{path}");
    let mut request = match method.as_str() {
        "POST" => client.post(&url).body(body),
        "HEAD" => client.head(&url),
        _ => client.get(&url),
    };
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let (status, content_type, mut answer) = match request.send() {
        Ok(response) => {
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_owned();
            (
                status,
                content_type,
                response.bytes().map(|b| b.to_vec()).unwrap_or_default(),
            )
        }
        Err(_) => (502, "text/plain".to_owned(), b"upstream down".to_vec()),
    };
    if path == "/v1/chunks/fetch" && status == 200 {
        let mut records = RecordReader::new(answer.as_slice());
        let mut rewritten = Vec::new();
        let mut split = Vec::new();
        while let Ok(Some(record)) = records.next_record() {
            // A frame as the server stores it: split into chunk records,
            // so a victim can be swapped without touching its neighbours.
            if let ChunkRecord::Frame {
                chunks,
                raw_len,
                frame,
            } = &record
            {
                let raw = zstd::bulk::decompress(frame, *raw_len as usize)?;
                for chunk in chunks {
                    let data = &raw[chunk.offset as usize..(chunk.offset + chunk.len) as usize];
                    split.push(ChunkRecord::Chunk {
                        id: chunk.id,
                        wire: zstd::encode_all(data, 3)?,
                    });
                }
                continue;
            }
            split.push(record);
        }
        for record in split {
            match record {
                ChunkRecord::Frame { .. } => unreachable!("frames were split"),
                ChunkRecord::Chunk { id, .. } if victims.contains(&id) => {
                    tampered.fetch_add(1, Ordering::SeqCst);
                    let other = zstd::encode_all(&b"these are not the chunk's bytes"[..], 3)?;
                    wire::write_chunk_record(&mut rewritten, &id, &other);
                }
                ChunkRecord::Chunk { id, wire } => {
                    wire::write_chunk_record(&mut rewritten, &id, &wire)
                }
                ChunkRecord::Missing(id) => {
                    rewritten.extend_from_slice(&wire::record_header(
                        &id,
                        wire::RecordKind::Missing,
                        0,
                    ));
                }
            }
        }
        answer = rewritten;
    }
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    )?;
    stream.write_all(&answer)?;
    stream.flush()
}
