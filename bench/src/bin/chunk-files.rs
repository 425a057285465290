//! Writes the chunks of one image as static files, byte for byte what
//! `GET /v1/chunks/{id}` answers, so a static web server (the nginx
//! baseline of bench/serve.sh) can serve the same route from disk.
//!
//! Usage: chunk-files STORE NAME:TAG OUT_DIR
//! Writes OUT_DIR/v1/chunks/<id> and prints one id per line.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use skiff_format::ImageRef;
use skiff_store::Store;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, image, out] = args.as_slice() else {
        bail!("usage: chunk-files STORE NAME:TAG OUT_DIR");
    };
    let store = Store::open_read_only(&PathBuf::from(store))?;
    let manifest = store.image(&ImageRef::from_str(image)?)?;
    let index = store.index(&manifest.index.digest)?;
    let dir = PathBuf::from(out).join("v1/chunks");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut seen = HashSet::new();
    let mut stdout = std::io::stdout().lock();
    for chunk in index.chunk_refs() {
        if !seen.insert(chunk.id) {
            continue;
        }
        let wire = skiff_chunk::compress_chunk(&store.read_chunk(&chunk.id)?)?;
        let path = dir.join(chunk.id.to_hex());
        std::fs::write(&path, wire).with_context(|| format!("writing {}", path.display()))?;
        writeln!(stdout, "{}", chunk.id)?;
    }
    Ok(())
}
