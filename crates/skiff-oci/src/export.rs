//! `export`: an image of the store as a single-layer OCI image layout.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use skiff_format::{ChunkRef, ImageIndex, ImageManifest, Inode, InodeKind};
use skiff_store::Store;

use crate::error::IoContext;
use crate::verify::sha256_digest;
use crate::OciError;

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub dir: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    pub layer_bytes: u64,
}

/// Writes `manifest`'s image into the OCI layout `dir` under `tag`: one gzip
/// layer holding the merged root, the original config with `rootfs` and
/// `history` rewritten for that one layer. `progress` hears of every file's
/// bytes as they are written.
pub fn export(
    store: &Store,
    manifest: &ImageManifest,
    dir: &Path,
    tag: &str,
    progress: &dyn Fn(u64),
) -> Result<ExportReport, OciError> {
    let index = store.index(&manifest.index.digest)?;
    let blobs = prepare_layout(dir)?;
    let layer = write_layer(&blobs, flate2::Compression::fast(), |tar| {
        write_tree(tar, store, &index, progress)
    })?;
    let manifest_digest = write_image(
        dir,
        tag,
        manifest.config.get(),
        std::slice::from_ref(&layer),
    )?;
    Ok(ExportReport {
        dir: dir.to_owned(),
        tag: tag.to_owned(),
        manifest_digest,
        layer_digest: layer.digest,
        layer_bytes: layer.size,
    })
}

/// A layer blob as written into a layout.
#[derive(Clone, Debug, Serialize)]
pub struct WrittenLayer {
    /// Of the gzip blob.
    pub digest: String,
    pub size: u64,
    /// Of the tar inside.
    pub diff_id: String,
}

/// `dir` made ready to take images (an OCI layout already there, an empty
/// directory, or none); its `blobs/sha256`.
pub(crate) fn prepare_layout(dir: &Path) -> Result<PathBuf, OciError> {
    let blobs = dir.join("blobs/sha256");
    if dir.exists()
        && !dir.join("oci-layout").exists()
        && fs::read_dir(dir)
            .context(|| format!("listing {}", dir.display()))?
            .next()
            .is_some()
    {
        return Err(OciError::BadOutput(dir.to_owned()));
    }
    fs::create_dir_all(&blobs).context(|| format!("creating {}", blobs.display()))?;
    Ok(blobs)
}

/// Writes the gzip layer `write` makes into `blobs`, appearing whole or not at all.
pub(crate) fn write_layer(
    blobs: &Path,
    level: flate2::Compression,
    write: impl FnOnce(&mut tar::Builder<HashingWriter<LayerGz<'_>>>) -> Result<(), OciError>,
) -> Result<WrittenLayer, OciError> {
    // The layer goes to a temporary file, hashed twice on the way: the tar
    // (diff_id) and the gzip stream (blob digest).
    let tmp = tempfile::NamedTempFile::new_in(blobs)
        .context(|| format!("creating a file in {}", blobs.display()))?;
    let blob_writer = HashingWriter::new(io::BufWriter::new(tmp.as_file()));
    let gz = flate2::write::GzEncoder::new(blob_writer, level);
    let mut tar = tar::Builder::new(HashingWriter::new(gz));
    write(&mut tar)?;
    tar.finish().context(|| "finishing layer tar".into())?;
    let tar_hashed = tar.into_inner().context(|| "finishing layer tar".into())?;
    let (gz, diff_id, _) = tar_hashed.finish();
    let blob_writer = gz.finish().context(|| "finishing gzip".into())?;
    let (mut buffered, digest, size) = blob_writer.finish();
    buffered.flush().context(|| "writing layer".into())?;
    drop(buffered);
    tmp.as_file()
        .sync_all()
        .context(|| "syncing layer".into())?;
    let layer_path = blobs.join(&digest["sha256:".len()..]);
    tmp.persist(&layer_path).map_err(|e| OciError::Io {
        context: format!("writing {}", layer_path.display()),
        source: e.error,
    })?;
    Ok(WrittenLayer {
        digest,
        size,
        diff_id,
    })
}

/// The gzip stream a layer's tar is written into.
pub(crate) type LayerGz<'a> = flate2::write::GzEncoder<HashingWriter<io::BufWriter<&'a fs::File>>>;

/// Writes an image of `layers` (in `dir`'s blobs already) with the source
/// `config` into the layout `dir` under `tag`; returns its manifest's digest.
pub(crate) fn write_image(
    dir: &Path,
    tag: &str,
    config: &str,
    layers: &[WrittenLayer],
) -> Result<String, OciError> {
    let (digest, size) = write_image_blobs(dir, config, layers)?;
    tag_images(dir, &[(tag.to_owned(), digest.clone(), size)])?;
    Ok(digest)
}

/// The tags `dir`'s index.json names (none if it has none yet).
pub(crate) fn layout_tags(dir: &Path) -> Result<Vec<String>, OciError> {
    let path = dir.join("index.json");
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(|| format!("reading {}", path.display())),
    };
    let index: Value = serde_json::from_slice(&bytes).map_err(|e| OciError::Malformed {
        what: format!("{}", path.display()),
        reason: e.to_string(),
    })?;
    Ok(index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["annotations"][REF_NAME].as_str().map(str::to_owned))
        .collect())
}

/// Writes the config and manifest of an image of `layers` into `dir`'s
/// blobs, untagged; returns the manifest's digest and size.
pub(crate) fn write_image_blobs(
    dir: &Path,
    config: &str,
    layers: &[WrittenLayer],
) -> Result<(String, usize), OciError> {
    let blobs = dir.join("blobs/sha256");
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = rewrite_config(config, &diff_ids)?;
    let config_digest = write_blob(&blobs, &config)?;
    let layers: Vec<Value> = layers
        .iter()
        .map(|l| json!({ "mediaType": LAYER_MEDIA_TYPE, "digest": l.digest, "size": l.size }))
        .collect();
    let image_manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len() },
        "layers": layers,
    }))
    .expect("JSON value serialises");
    let manifest_digest = write_blob(&blobs, &image_manifest)?;
    Ok((manifest_digest, image_manifest.len()))
}

/// Names images in `dir`'s index.json, in one write: `(tag, manifest
/// digest, manifest size)`, each replacing an older image of its tag.
pub(crate) fn tag_images(dir: &Path, images: &[(String, String, usize)]) -> Result<(), OciError> {
    write_atomically(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    update_layout_index(dir, images)
}

/// The source config with `rootfs` naming the new layers; its `history`
/// described the old layers, so it goes.
fn rewrite_config(config: &str, diff_ids: &[&str]) -> Result<Vec<u8>, OciError> {
    let mut value: Value = serde_json::from_str(config).map_err(|e| OciError::Malformed {
        what: "stored image config".into(),
        reason: e.to_string(),
    })?;
    let object = value.as_object_mut().ok_or_else(|| OciError::Malformed {
        what: "stored image config".into(),
        reason: "not a JSON object".into(),
    })?;
    object.insert(
        "rootfs".into(),
        json!({ "type": "layers", "diff_ids": diff_ids }),
    );
    object.remove("history");
    Ok(serde_json::to_vec(&value).expect("JSON value serialises"))
}

fn write_blob(blobs: &Path, data: &[u8]) -> Result<String, OciError> {
    let digest = sha256_digest(data);
    write_atomically(&blobs.join(&digest["sha256:".len()..]), data)?;
    Ok(digest)
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), OciError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(data)
        .and_then(|()| tmp.as_file().sync_all())
        .context(|| format!("writing {}", path.display()))?;
    tmp.persist(path).map_err(|e| OciError::Io {
        context: format!("writing {}", path.display()),
        source: e.error,
    })?;
    Ok(())
}

/// Adds `images` to the layout's index.json, each replacing an older image of its tag.
fn update_layout_index(dir: &Path, images: &[(String, String, usize)]) -> Result<(), OciError> {
    let path = dir.join("index.json");
    let mut index = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes).map_err(|e| OciError::Malformed {
            what: format!("{}", path.display()),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            json!({ "schemaVersion": 2, "manifests": [] })
        }
        Err(e) => return Err(e).context(|| format!("reading {}", path.display())),
    };
    let manifests = index
        .get_mut("manifests")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| OciError::Malformed {
            what: format!("{}", path.display()),
            reason: "no manifests array".into(),
        })?;
    for (tag, digest, size) in images {
        manifests.retain(|m| {
            m.pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1")))
                .and_then(Value::as_str)
                != Some(tag.as_str())
        });
        manifests.push(json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": digest,
            "size": size,
            "annotations": { REF_NAME: tag },
        }));
    }
    write_atomically(
        &path,
        &serde_json::to_vec(&index).expect("JSON value serialises"),
    )
}

/// Writes every path of the index in depth-first name order; the second and
/// later names of an inode become hard links to the first.
fn write_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    store: &Store,
    index: &ImageIndex,
    progress: &dyn Fn(u64),
) -> Result<(), OciError> {
    let mut first_path: HashMap<u64, Vec<u8>> = HashMap::new();
    for (path, ino) in index.walk() {
        let inode = index.inode(ino).expect("walk yields valid inodes");
        let link_to = match inode.kind {
            InodeKind::Directory { .. } => None,
            _ => match first_path.get(&ino) {
                Some(first) => Some(first.as_slice()),
                None => {
                    first_path.insert(ino, path.clone());
                    None
                }
            },
        };
        append_entry(tar, store, &path, inode, link_to, progress)?;
    }
    Ok(())
}

/// Appends `inode` at `path` (empty: the root) to a layer's tar, or a hard
/// link at `path` to `link_to`, with every attribute the index holds (PAX
/// records for xattrs, long link targets and exact times).
pub(crate) fn append_entry<W: Write>(
    tar: &mut tar::Builder<W>,
    store: &Store,
    path: &[u8],
    inode: &Inode,
    link_to: Option<&[u8]>,
    progress: &dyn Fn(u64),
) -> Result<(), OciError> {
    let name = if path.is_empty() {
        b"./".to_vec()
    } else {
        path.to_vec()
    };
    let path_str = String::from_utf8_lossy(&name).into_owned();
    let io_err = |e: io::Error| OciError::Io {
        context: format!("writing {path_str} to the layer"),
        source: e,
    };

    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    for xattr in &inode.meta.xattrs {
        let key = std::str::from_utf8(&xattr.name).map_err(|_| OciError::BadEntry {
            layer: 0,
            path: path_str.clone(),
            reason: "xattr name is not UTF-8".into(),
        })?;
        pax.push((format!("SCHILY.xattr.{key}"), xattr.value.clone()));
    }
    if let InodeKind::Symlink { target } = &inode.kind {
        // ustar holds 100 bytes of link target; PAX holds the rest.
        if target.len() > 100 {
            pax.push(("linkpath".into(), target.clone()));
        }
    }
    if inode.meta.mtime_nsec != 0 || inode.meta.mtime < 0 {
        pax.push((
            "mtime".into(),
            format_pax_time(inode.meta.mtime, inode.meta.mtime_nsec).into_bytes(),
        ));
    }
    if !pax.is_empty() {
        let records = pax_records(&pax);
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::XHeader);
        header.set_size(records.len() as u64);
        header.set_mode(0o644);
        // An ASCII name: a long or non-UTF-8 file name must not make the header invalid.
        let pax_name = "PaxHeaders/skiff";
        header.set_path(pax_name).map_err(io_err)?;
        header.set_cksum();
        tar.append(&header, records.as_slice()).map_err(io_err)?;
    }

    let mut header = tar::Header::new_gnu();
    header.set_mode(inode.meta.mode);
    header.set_uid(u64::from(inode.meta.uid));
    header.set_gid(u64::from(inode.meta.gid));
    header.set_mtime(inode.meta.mtime.max(0) as u64);
    header.set_size(0);
    let os_path = Path::new(std::ffi::OsStr::from_encoded_bytes_checked(&name));
    if let Some(first) = link_to {
        header.set_entry_type(tar::EntryType::Link);
        let target = Path::new(std::ffi::OsStr::from_encoded_bytes_checked(first));
        return tar
            .append_link(&mut header, os_path, target)
            .map_err(io_err);
    }
    match &inode.kind {
        InodeKind::Directory { .. } => {
            header.set_entry_type(tar::EntryType::Directory);
            tar.append_data(&mut header, os_path, io::empty())
                .map_err(io_err)?;
        }
        InodeKind::File { size, chunks } => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(*size);
            let reader = ChunkReader::new(store, chunks);
            tar.append_data(&mut header, os_path, reader).map_err(|e| {
                match e.get_ref().and_then(|e| e.downcast_ref::<StoreErrorBox>()) {
                    Some(StoreErrorBox(msg)) => OciError::Io {
                        context: format!("reading {path_str} from the store"),
                        source: io::Error::other(msg.clone()),
                    },
                    None => io_err(e),
                }
            })?;
            progress(*size);
        }
        InodeKind::Symlink { target } => {
            // Literal: `append_link` would normalise the target (`a//b` → `a/b`).
            header.set_entry_type(tar::EntryType::Symlink);
            header
                .set_link_name_literal(&target[..target.len().min(100)])
                .map_err(io_err)?;
            tar.append_data(&mut header, os_path, io::empty())
                .map_err(io_err)?;
        }
        InodeKind::CharDevice { major, minor } | InodeKind::BlockDevice { major, minor } => {
            let char_dev = matches!(inode.kind, InodeKind::CharDevice { .. });
            header.set_entry_type(if char_dev {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            });
            header.set_device_major(*major).map_err(io_err)?;
            header.set_device_minor(*minor).map_err(io_err)?;
            tar.append_data(&mut header, os_path, io::empty())
                .map_err(io_err)?;
        }
        InodeKind::Fifo => {
            header.set_entry_type(tar::EntryType::Fifo);
            tar.append_data(&mut header, os_path, io::empty())
                .map_err(io_err)?;
        }
        InodeKind::Socket => {} // tar cannot hold sockets; images do not carry them.
    }
    Ok(())
}

/// `std::ffi::OsStr::from_bytes` under a name that reads at the call sites.
trait FromEncodedBytes {
    fn from_encoded_bytes_checked(bytes: &[u8]) -> &std::ffi::OsStr;
}

impl FromEncodedBytes for std::ffi::OsStr {
    fn from_encoded_bytes_checked(bytes: &[u8]) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(bytes)
    }
}

/// PAX extended header records: `LEN KEY=VALUE\n`, LEN counting itself.
fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

fn format_pax_time(secs: i64, nsec: u32) -> String {
    if secs < 0 && nsec > 0 {
        // -2 s + 0.5 s is written -1.5.
        format!("-{}.{:09}", -(secs + 1), 1_000_000_000 - nsec)
    } else {
        format!("{secs}.{nsec:09}")
    }
}

#[derive(Debug)]
struct StoreErrorBox(String);

impl std::fmt::Display for StoreErrorBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreErrorBox {}

/// A file's bytes, read chunk by chunk from the store.
pub(crate) struct ChunkReader<'a> {
    store: &'a Store,
    chunks: &'a [ChunkRef],
    next: usize,
    current: Vec<u8>,
    pos: usize,
}

impl<'a> ChunkReader<'a> {
    pub(crate) fn new(store: &'a Store, chunks: &'a [ChunkRef]) -> Self {
        ChunkReader {
            store,
            chunks,
            next: 0,
            current: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            let Some(chunk) = self.chunks.get(self.next) else {
                return Ok(0);
            };
            self.current = self
                .store
                .read_chunk(&chunk.id)
                .map_err(|e| io::Error::other(StoreErrorBox(e.to_string())))?;
            // The tar header already promised the index's length: bytes that
            // disagree would shift every header after this file.
            if self.current.len() != chunk.len as usize {
                return Err(io::Error::other(StoreErrorBox(format!(
                    "chunk {} is {} bytes, but the index says {}",
                    chunk.id,
                    self.current.len(),
                    chunk.len
                ))));
            }
            self.pos = 0;
            self.next += 1;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Passes writes through while hashing them.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.bytes,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        let records = pax_records(&[("mtime".into(), b"1.5".to_vec())]);
        assert_eq!(records, b"13 mtime=1.5\n");
        let long = pax_records(&[("k".into(), vec![b'x'; 95])]);
        assert_eq!(&long[..4], b"102 ");
        assert_eq!(long.len(), 102);
    }

    #[test]
    fn negative_times_round_trip_through_pax() {
        assert_eq!(format_pax_time(-2, 500_000_000), "-1.500000000");
        assert_eq!(format_pax_time(5, 0), "5.000000000");
    }
}
