#![allow(clippy::unwrap_used)]
//! Helpers for skiff's end-to-end tests: build small real OCI images (layout
//! directories and `docker save` archives) from tar entries, run the real
//! `skiff` binary, unpack with umoci, and compare file trees byte for byte.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod cri;
pub mod netns;
pub mod proxy;
pub mod registry_proxy;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use skiff_format::{ChunkRef, ImageIndex, IndexDigest, InodeKind};

/// One entry of a layer tar.
#[derive(Clone, Debug)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    HardLink {
        path: String,
        target: String,
    },
    CharDevice {
        path: String,
        major: u32,
        minor: u32,
    },
    BlockDevice {
        path: String,
        major: u32,
        minor: u32,
    },
    Fifo {
        path: String,
    },
    /// Raw header fields, for malformed input: path bytes, type, claimed size, data.
    Raw {
        path: Vec<u8>,
        kind: tar::EntryType,
        size: u64,
        data: Vec<u8>,
    },
}

impl Entry {
    /// The entry's path, for entries built from strings.
    pub fn path(&self) -> Option<&str> {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::HardLink { path, .. }
            | Entry::CharDevice { path, .. }
            | Entry::BlockDevice { path, .. }
            | Entry::Fifo { path } => Some(path),
            Entry::Raw { .. } => None,
        }
    }
}

/// Owner, time and xattrs applied to an entry.
#[derive(Clone, Debug)]
pub struct Attrs {
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Default for Attrs {
    fn default() -> Self {
        Attrs {
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            xattrs: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// A layer: entries with attributes, written as a tar.
#[derive(Clone, Debug, Default)]
pub struct Layer {
    pub entries: Vec<(Entry, Attrs)>,
}

impl Layer {
    pub fn new() -> Self {
        Layer::default()
    }

    pub fn entry(mut self, entry: Entry) -> Self {
        self.entries.push((entry, Attrs::default()));
        self
    }

    pub fn entry_with(mut self, entry: Entry, attrs: Attrs) -> Self {
        self.entries.push((entry, attrs));
        self
    }

    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.entry(Entry::Dir {
            path: path.into(),
            mode,
        })
    }

    pub fn file(self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        self.entry(Entry::File {
            path: path.into(),
            mode,
            data: data.into(),
        })
    }

    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.entry(Entry::Symlink {
            path: path.into(),
            target: target.into(),
        })
    }

    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.entry(Entry::HardLink {
            path: path.into(),
            target: target.into(),
        })
    }

    pub fn whiteout(self, dir: &str, name: &str) -> Self {
        let path = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&path, 0o644, Vec::new())
    }

    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, Vec::new())
    }

    /// The uncompressed tar bytes. Parent directories not listed are added
    /// (0755, root) before their first child, as image builders do: unpackers
    /// give unlisted directories the current time, which no test can compare.
    pub fn tar(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut listed = std::collections::HashSet::new();
        for (entry, _) in &self.entries {
            if let Entry::Dir { path, .. } = entry {
                listed.insert(path.trim_end_matches('/').to_owned());
            }
        }
        for (entry, attrs) in &self.entries {
            if let Some(path) = entry.path() {
                let parts: Vec<&str> = path
                    .split('/')
                    .filter(|p| !p.is_empty() && *p != ".")
                    .collect();
                for depth in 1..parts.len() {
                    let parent = parts[..depth].join("/");
                    if parts[..depth].contains(&"..") || !listed.insert(parent.clone()) {
                        continue;
                    }
                    write_entry(
                        &mut builder,
                        &Entry::Dir {
                            path: parent,
                            mode: 0o755,
                        },
                        &Attrs::default(),
                    );
                }
            }
            write_entry(&mut builder, entry, attrs);
        }
        builder.into_inner().expect("tar into a Vec")
    }
}

/// Written here rather than borrowed from skiff-oci: fixtures must not share
/// code with what they test.
fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3;
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

fn write_entry(builder: &mut tar::Builder<Vec<u8>>, entry: &Entry, attrs: &Attrs) {
    if !attrs.xattrs.is_empty() {
        let records: Vec<(String, Vec<u8>)> = attrs
            .xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
            .collect();
        let data = pax_records(&records);
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::XHeader);
        header.set_path("PaxHeader").unwrap();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, data.as_slice()).unwrap();
    }
    let mut header = tar::Header::new_gnu();
    header.set_uid(attrs.uid);
    header.set_gid(attrs.gid);
    header.set_mtime(attrs.mtime);
    header.set_size(0);
    header.set_mode(0o644);
    match entry {
        Entry::Dir { path, mode } => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(*mode);
            builder
                .append_data(
                    &mut header,
                    format!("{}/", path.trim_end_matches('/')),
                    std::io::empty(),
                )
                .unwrap();
        }
        Entry::File { path, mode, data } => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(*mode);
            header.set_size(data.len() as u64);
            builder
                .append_data(&mut header, path, data.as_slice())
                .unwrap();
        }
        Entry::Symlink { path, target } => {
            // Literal, as image builders write it (`append_link` would normalise `a//b`).
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_link_name_literal(target).unwrap();
            builder
                .append_data(&mut header, path, std::io::empty())
                .unwrap();
        }
        Entry::HardLink { path, target } => {
            header.set_entry_type(tar::EntryType::Link);
            builder.append_link(&mut header, path, target).unwrap();
        }
        Entry::CharDevice { path, major, minor } | Entry::BlockDevice { path, major, minor } => {
            let kind = if matches!(entry, Entry::CharDevice { .. }) {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            header.set_entry_type(kind);
            header.set_device_major(*major).unwrap();
            header.set_device_minor(*minor).unwrap();
            builder
                .append_data(&mut header, path, std::io::empty())
                .unwrap();
        }
        Entry::Fifo { path } => {
            header.set_entry_type(tar::EntryType::Fifo);
            builder
                .append_data(&mut header, path, std::io::empty())
                .unwrap();
        }
        Entry::Raw {
            path,
            kind,
            size,
            data,
        } => {
            // Bypasses the builder's path checks: this is how hostile tars are made.
            let mut header = tar::Header::new_gnu();
            header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path);
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_size(*size);
            header.set_mtime(attrs.mtime);
            header.set_cksum();
            let mut raw = header.as_bytes().to_vec();
            raw.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            raw.extend(std::iter::repeat_n(0u8, pad));
            builder.get_mut().extend_from_slice(&raw);
        }
    }
}

/// A layer with the host's busybox-static at /bin/busybox, `applets` linked
/// to it in /bin, and empty /etc, /tmp and /data.
pub fn busybox_layer(applets: &[&str]) -> Layer {
    let busybox =
        fs::read("/bin/busybox").expect("busybox-static is installed (tools/install-deps)");
    let mut layer = Layer::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("tmp", 0o1777)
        .dir("data", 0o755)
        .file("bin/busybox", 0o755, busybox);
    for applet in applets {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    layer
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn compress(data: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => data.to_vec(),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

/// An image to write: layers (with their compression) and a config.
#[derive(Clone, Debug)]
pub struct Image {
    pub layers: Vec<(Layer, Compression)>,
    pub config: Value,
}

impl Image {
    pub fn new(layers: Vec<(Layer, Compression)>) -> Self {
        Image {
            layers,
            config: json!({
                "architecture": host_arch(),
                "os": "linux",
                "config": { "Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/" },
            }),
        }
    }

    /// The config JSON with `rootfs.diff_ids` filled in for the layers.
    pub fn config_bytes(&self) -> Vec<u8> {
        let mut config = self.config.clone();
        let diff_ids: Vec<String> = self.layers.iter().map(|(l, _)| sha256(&l.tar())).collect();
        config["rootfs"] = json!({ "type": "layers", "diff_ids": diff_ids });
        serde_json::to_vec(&config).unwrap()
    }

    /// Writes an OCI image layout at `dir` with the image tagged `tag`.
    /// Returns the paths of the layer blobs, bottom first.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Vec<PathBuf> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| -> (String, PathBuf) {
            let digest = sha256(data);
            let path = blobs.join(&digest[7..]);
            fs::write(&path, data).unwrap();
            (digest, path)
        };
        let mut layer_descs = Vec::new();
        let mut paths = Vec::new();
        for (layer, compression) in &self.layers {
            let blob = compress(&layer.tar(), *compression);
            let (digest, path) = put(&blob);
            paths.push(path);
            layer_descs.push(json!({ "mediaType": compression.media_type(), "digest": digest, "size": blob.len() }));
        }
        let config = self.config_bytes();
        let (config_digest, _) = put(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
            "layers": layer_descs,
        }))
        .unwrap();
        let (manifest_digest, _) = put(&manifest);
        write_layout_index(
            dir,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest_digest,
            manifest.len(),
        );
        paths
    }

    /// Writes the image as a `docker save` archive (uncompressed layers).
    pub fn write_docker_archive(&self, file: &Path, repo_tag: &str) {
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, name, data).unwrap();
        };
        let config = self.config_bytes();
        let config_name = format!("{}.json", &sha256(&config)[7..]);
        add(&config_name, &config);
        let mut layer_names = Vec::new();
        for (i, (layer, _)) in self.layers.iter().enumerate() {
            let name = format!("layer{i}/layer.tar");
            add(&name, &layer.tar());
            layer_names.push(name);
        }
        let manifest =
            json!([{ "Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names }]);
        add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        fs::write(file, builder.into_inner().unwrap()).unwrap();
    }
}

pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Deterministic incompressible-ish bytes.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    seed |= 1;
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 32) as u8
        })
        .collect()
}

/// Text-like bytes that compress the way real files do.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        "alpha ", "beta ", "gamma ", "delta\n", "epsilon ", "zeta ", "eta\n", "theta ",
    ];
    let mut out = Vec::with_capacity(len);
    let mut state = seed | 1;
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(words[(state % 8) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

/// The `skiff` binary built beside this test, or `$SKIFF` (the benchmarks' binaries).
pub fn skiff_bin() -> PathBuf {
    if let Some(skiff) = std::env::var_os("SKIFF") {
        return PathBuf::from(skiff);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/skiff
    let bin = exe.parent().unwrap().parent().unwrap().join("skiff");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo test --workspace)",
        bin.display()
    );
    bin
}

/// Runs `skiff --store STORE ARGS...` and returns its output.
pub fn skiff(store: &Path, args: &[&str]) -> Output {
    Command::new(skiff_bin())
        .arg("--store")
        .arg(store)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// Runs skiff and panics with its stderr unless it succeeds.
pub fn skiff_ok(store: &Path, args: &[&str]) -> String {
    let out = skiff(store, args);
    assert!(
        out.status.success(),
        "skiff {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn skiff_json(store: &Path, args: &[&str]) -> Value {
    let out = skiff_ok(store, args);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("skiff {args:?} printed no JSON ({e}): {out}"))
}

/// `umoci unpack --image LAYOUT:TAG DEST`; returns DEST/rootfs.
pub fn umoci_unpack(layout: &Path, tag: &str, dest: &Path) -> PathBuf {
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(dest)
        .output()
        .expect("umoci is required (apt-get install umoci; `make test` installs it)");
    assert!(
        out.status.success(),
        "umoci unpack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dest.join("rootfs")
}

/// Everything `stat`, `readlink`, `getxattr` and `read` say about one path.
#[derive(Debug, PartialEq, Eq)]
struct PathFacts {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    size: u64,
    rdev: u64,
    /// Hard links; directories' counts depend on the file system, so 0 for them.
    nlink: u64,
    link_target: Option<PathBuf>,
    content_sha: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn facts(path: &Path, compare_dir_mtimes: bool) -> PathFacts {
    let meta = fs::symlink_metadata(path).unwrap();
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "socket"
    };
    let mut xattrs = BTreeMap::new();
    if !ft.is_symlink() {
        if let Ok(names) = xattr::list(path) {
            for name in names {
                let value = xattr::get(path, &name).ok().flatten().unwrap_or_default();
                xattrs.insert(name.to_string_lossy().into_owned(), value);
            }
        }
    }
    let mtime = if ft.is_dir() && !compare_dir_mtimes {
        (0, 0)
    } else {
        (meta.mtime(), meta.mtime_nsec())
    };
    PathFacts {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime,
        size: if ft.is_file() || ft.is_symlink() {
            meta.size()
        } else {
            0
        },
        rdev: meta.rdev(),
        nlink: if ft.is_dir() { 0 } else { meta.nlink() },
        link_target: ft.is_symlink().then(|| fs::read_link(path).unwrap()),
        content_sha: ft.is_file().then(|| sha256(&fs::read(path).unwrap())),
        xattrs,
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let child = rel.join(&name);
            if fs::symlink_metadata(root.join(&child)).unwrap().is_dir() {
                stack.push(child.clone());
            }
            out.push(child);
        }
    }
    out.sort();
    out
}

/// Every difference between two trees: paths, types, modes, owners, mtimes,
/// sizes, device numbers, symlink targets, bytes, xattrs and hard-link groups.
pub fn diff_trees(a: &Path, b: &Path, compare_dir_mtimes: bool) -> Vec<String> {
    let (pa, pb) = (walk(a), walk(b));
    let mut diffs = Vec::new();
    if pa != pb {
        let sa: std::collections::BTreeSet<_> = pa.iter().collect();
        let sb: std::collections::BTreeSet<_> = pb.iter().collect();
        for p in sa.difference(&sb) {
            diffs.push(format!("only in {}: {}", a.display(), p.display()));
        }
        for p in sb.difference(&sa) {
            diffs.push(format!("only in {}: {}", b.display(), p.display()));
        }
        return diffs;
    }
    let mut groups_a: HashMap<u64, Vec<&PathBuf>> = HashMap::new();
    let mut groups_b: HashMap<u64, Vec<&PathBuf>> = HashMap::new();
    for p in &pa {
        let (fa, fb) = (
            facts(&a.join(p), compare_dir_mtimes),
            facts(&b.join(p), compare_dir_mtimes),
        );
        if fa != fb {
            diffs.push(format!("{}: {fa:?} != {fb:?}", p.display()));
        }
        let (ma, mb) = (
            fs::symlink_metadata(a.join(p)).unwrap(),
            fs::symlink_metadata(b.join(p)).unwrap(),
        );
        if !ma.is_dir() {
            groups_a.entry(ma.ino()).or_default().push(p);
            groups_b.entry(mb.ino()).or_default().push(p);
        }
    }
    fn norm(g: HashMap<u64, Vec<&PathBuf>>) -> Vec<Vec<&PathBuf>> {
        let mut v: Vec<Vec<&PathBuf>> = g.into_values().filter(|v| v.len() > 1).collect();
        v.iter_mut().for_each(|g| g.sort());
        v.sort();
        v
    }
    let (ga, gb) = (norm(groups_a), norm(groups_b));
    if ga != gb {
        diffs.push(format!("hard-link groups differ: {ga:?} != {gb:?}"));
    }
    diffs
}

/// A temporary directory that unmounts nothing and is removed at drop.
/// A temporary directory for a test; kept for a post-mortem when
/// `SKIFF_TEST_KEEP` is set.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("skiff-test-")
        .disable_cleanup(std::env::var_os("SKIFF_TEST_KEEP").is_some())
        .tempdir()
        .unwrap()
}

/// Edits an OCI layout written by [`Image::write_layout`] and re-links the
/// digests above the edit, so only the intended fault remains.
pub struct LayoutEditor {
    dir: PathBuf,
}

impl LayoutEditor {
    pub fn new(dir: &Path) -> Self {
        LayoutEditor {
            dir: dir.to_owned(),
        }
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(&digest[7..])
    }

    fn put(&self, data: &[u8]) -> String {
        let digest = sha256(data);
        fs::write(self.blob_path(&digest), data).unwrap();
        digest
    }

    fn index(&self) -> Value {
        serde_json::from_slice(&fs::read(self.dir.join("index.json")).unwrap()).unwrap()
    }

    pub fn manifest(&self) -> Value {
        let digest = self.index()["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_owned();
        serde_json::from_slice(&fs::read(self.blob_path(&digest)).unwrap()).unwrap()
    }

    /// Replaces the manifest blob with `bytes` (valid JSON or not).
    pub fn set_manifest_bytes(&self, bytes: &[u8]) {
        let digest = self.put(bytes);
        let mut index = self.index();
        index["manifests"][0]["digest"] = json!(digest);
        index["manifests"][0]["size"] = json!(bytes.len());
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    pub fn edit_manifest(&self, edit: impl FnOnce(&mut Value)) {
        let mut manifest = self.manifest();
        edit(&mut manifest);
        self.set_manifest_bytes(&serde_json::to_vec(&manifest).unwrap());
    }

    pub fn set_config_bytes(&self, bytes: &[u8]) {
        let digest = self.put(bytes);
        self.edit_manifest(|m| {
            m["config"]["digest"] = json!(digest);
            m["config"]["size"] = json!(bytes.len());
        });
    }

    pub fn layer_bytes(&self, layer: usize) -> Vec<u8> {
        let digest = self.manifest()["layers"][layer]["digest"]
            .as_str()
            .unwrap()
            .to_owned();
        fs::read(self.blob_path(&digest)).unwrap()
    }

    pub fn layer_path(&self, layer: usize) -> PathBuf {
        self.blob_path(self.manifest()["layers"][layer]["digest"].as_str().unwrap())
    }

    /// Replaces a layer blob, with a matching descriptor.
    pub fn set_layer_bytes(&self, layer: usize, bytes: &[u8]) {
        let digest = self.put(bytes);
        self.edit_manifest(|m| {
            m["layers"][layer]["digest"] = json!(digest);
            m["layers"][layer]["size"] = json!(bytes.len());
        });
    }
}

/// An image layout at `dir` whose one layer is `layer_gz`, a gzipped tar
/// whose uncompressed digest is `diff_id`: for layers no builder would write
/// (hostile ones) or that are too big to build in memory.
pub fn layout_with_layer(dir: &Path, layer_gz: &[u8], diff_id: &str) {
    let image = Image::new(vec![(
        Layer::new().file("x", 0o644, "x"),
        Compression::Gzip,
    )]);
    image.write_layout(dir, "latest");
    let editor = LayoutEditor::new(dir);
    editor.set_layer_bytes(0, layer_gz);
    let mut config: Value = serde_json::from_slice(&image.config_bytes()).unwrap();
    config["rootfs"]["diff_ids"][0] = json!(diff_id);
    editor.set_config_bytes(&serde_json::to_vec(&config).unwrap());
}

/// The parts of a store that a failed command must leave unchanged.
pub fn store_state(store: &Path) -> (Value, Value) {
    (
        skiff_json(store, &["stats", "--json"]),
        skiff_json(store, &["images", "--json"]),
    )
}

/// Writes a multi-platform OCI layout: `index.json` names an image index
/// whose manifests are `images`, one per `(os/arch, image)`.
pub fn write_multi_platform_layout(dir: &Path, tag: &str, images: &[(&str, &Image)]) {
    let mut manifests = Vec::new();
    for (i, (platform, image)) in images.iter().enumerate() {
        let single = dir.join(format!(".single{i}"));
        image.write_layout(&single, "x");
        let index: Value =
            serde_json::from_slice(&fs::read(single.join("index.json")).unwrap()).unwrap();
        let mut desc = index["manifests"][0].clone();
        desc.as_object_mut().unwrap().remove("annotations");
        let (os, arch) = platform.split_once('/').unwrap();
        desc["platform"] = json!({ "os": os, "architecture": arch });
        manifests.push(desc);
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        for blob in fs::read_dir(single.join("blobs/sha256")).unwrap() {
            let blob = blob.unwrap();
            fs::copy(blob.path(), dir.join("blobs/sha256").join(blob.file_name())).unwrap();
        }
        fs::remove_dir_all(&single).unwrap();
    }
    let image_index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap();
    let digest = sha256(&image_index);
    fs::write(dir.join("blobs/sha256").join(&digest[7..]), &image_index).unwrap();
    write_layout_index(
        dir,
        tag,
        "application/vnd.oci.image.index.v1+json",
        &digest,
        image_index.len(),
    );
}

/// `oci-layout` and an `index.json` naming one blob under `tag`.
fn write_layout_index(dir: &Path, tag: &str, media_type: &str, digest: &str, size: usize) {
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// A free TCP port on 127.0.0.1 (bound, then released for the caller).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("nothing listens on 127.0.0.1:{port} after 5 s");
}

/// A real OCI distribution registry (Debian's docker-registry) on 127.0.0.1,
/// killed on drop.
pub struct Registry {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with_auth(None)
    }

    /// A registry that wants `user`/`password` (htpasswd, bcrypt) for everything.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Registry {
        Self::start_with_auth(Some((user, password)))
    }

    fn start_with_auth(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempdir();
        let port = free_port();
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect(
                    "htpasswd is required (apt-get install apache2-utils; `make test` installs it)",
                );
            assert!(out.status.success(), "htpasswd failed");
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, &out.stdout).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        fs::write(&config, yaml).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry is required (apt-get install docker-registry; `make test` installs it)");
        wait_for_port(port);
        Registry {
            port,
            child,
            _dir: dir,
        }
    }

    /// Pushes an OCI layout's tag to `repo:tag` with skopeo (all platforms).
    pub fn push(&self, layout: &Path, layout_tag: &str, repo_tag: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--all", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{layout_tag}", layout.display()))
            .arg(format!("docker://127.0.0.1:{}/{repo_tag}", self.port))
            .output()
            .expect("skopeo is required (apt-get install skopeo)");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `DOCKER_CONFIG` directory whose config.json holds `auths` for `host`, as `docker login` writes it.
pub fn docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine;
    fs::create_dir_all(dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&json!({ "auths": { host: { "auth": auth } } })).unwrap(),
    )
    .unwrap();
    dir.to_owned()
}

/// A one-file image whose config says `arch` and whose file `arch` holds it.
pub fn image_for_arch(arch: &str) -> Image {
    let mut image = Image::new(vec![(
        Layer::new().file("arch", 0o644, arch),
        Compression::Gzip,
    )]);
    image.config["architecture"] = json!(arch);
    image
}

/// Creates `store` by converting a tiny image (written under `dir`) as `seed`.
pub fn seed_store(store: &Path, dir: &Path) {
    Image::new(vec![(
        Layer::new().file("x", 0o644, "x"),
        Compression::None,
    )])
    .write_layout(dir, "latest");
    skiff_ok(
        store,
        &["convert", &format!("oci:{}", dir.display()), "seed"],
    );
}

/// A real `skiff serve` on 127.0.0.1 over `store`, killed on drop.
pub struct SkiffServer {
    pub port: u16,
    pub url: String,
    child: std::process::Child,
}

impl SkiffServer {
    /// Starts `skiff --store STORE serve --listen 127.0.0.1:PORT EXTRA...` and
    /// waits until `/healthz` answers.
    pub fn start(store: &Path, extra: &[&str]) -> SkiffServer {
        Self::start_on(free_port(), store, extra)
    }

    /// As [`SkiffServer::start`], on a given port (to restart a server).
    /// Unless `extra` names a write token, writes are open to all
    /// (`--allow-anonymous-writes`: the test's server is its own).
    pub fn start_on(port: u16, store: &Path, extra: &[&str]) -> SkiffServer {
        let command = Command::new(skiff_bin());
        let listen = format!("127.0.0.1:{port}");
        Self::start_as(command, &listen, port, &listen, store, extra)
    }

    /// As [`SkiffServer::start`], in the server namespace of `hosts`,
    /// listening on every address there; the test reaches it on its own link.
    pub fn start_for(hosts: &netns::Hosts, store: &Path) -> SkiffServer {
        let port = 7070;
        let command = hosts.in_server(&skiff_bin());
        let reach = format!("{}:{port}", hosts.server_addr(0));
        Self::start_as(
            command,
            &format!("0.0.0.0:{port}"),
            port,
            &reach,
            store,
            &[],
        )
    }

    /// `COMMAND --store STORE serve --listen LISTEN EXTRA...`, healthy at `reach`.
    fn start_as(
        mut command: Command,
        listen: &str,
        port: u16,
        reach: &str,
        store: &Path,
        extra: &[&str],
    ) -> SkiffServer {
        command
            .arg("--store")
            .arg(store)
            .args(["serve", "--listen", listen])
            .args(extra);
        if !extra.contains(&"--token-file") {
            command.arg("--allow-anonymous-writes");
        }
        let child = command
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = SkiffServer {
            port,
            url: format!("http://{reach}"),
            child,
        };
        for _ in 0..400 {
            if reqwest::blocking::get(format!("{}/healthz", server.url))
                .is_ok_and(|r| r.status().is_success())
            {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("skiff serve on {reach} did not become healthy in 10 s");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An index as the server sends it, checked against its digest.
    pub fn index_by_digest(&self, digest: &IndexDigest) -> ImageIndex {
        let body = reqwest::blocking::get(format!("{}/v1/indexes/{digest}", self.url))
            .unwrap()
            .bytes()
            .unwrap();
        let encoded = zstd::decode_all(&body[..]).unwrap();
        assert_eq!(IndexDigest::of(&encoded), *digest);
        ImageIndex::decode(&encoded).unwrap()
    }

    /// The index of image `name` (NAME:TAG) on the server.
    pub fn index(&self, name: &str) -> ImageIndex {
        let body = reqwest::blocking::get(format!("{}/v1/manifests/{name}", self.url))
            .unwrap()
            .bytes()
            .unwrap();
        let manifest: Value = serde_json::from_slice(&body).unwrap();
        let digest = manifest["index"]["digest"].as_str().unwrap();
        self.index_by_digest(&digest.parse().unwrap())
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the server to exit (after a signal sent elsewhere).
    pub fn terminate_wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// One counter or gauge from `/metrics`, summed over its label sets that
    /// contain every string in `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric_at(&self.url, name, labels)
    }
}

impl Drop for SkiffServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn caps() -> Vec<u8> {
    // A VFS_CAP_REVISION_2 security.capability value granting cap_net_bind_service.
    let mut v = vec![0x01, 0x00, 0x00, 0x02];
    v.extend_from_slice(&[0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    v
}

/// Three layers exercising every merge rule and every kind of entry (gzip and plain tar: umoci,
/// the reference, does not read zstd layers; see `zstd_layers_*`).
pub fn rich_image() -> Image {
    let owner = Attrs {
        uid: 1000,
        gid: 1001,
        mtime: 1_600_000_123,
        xattrs: vec![],
    };
    let base = Layer::new()
        .dir("bin", 0o755)
        .file("bin/tool", 0o755, noise(300_000, 1))
        .hardlink("bin/tool-alias", "bin/tool")
        .dir("etc", 0o755)
        .file("etc/config", 0o644, text(10_000, 2))
        .file("etc/removed", 0o644, "gone in layer 2")
        .dir("opaque", 0o755)
        .file("opaque/old", 0o644, "hidden by the opaque marker")
        .dir("opaque/sub", 0o700)
        .file("opaque/sub/old", 0o600, "also hidden")
        .entry_with(
            Entry::File {
                path: "home/user/notes".into(),
                mode: 0o640,
                data: text(5000, 3),
            },
            owner.clone(),
        )
        .entry_with(
            Entry::Dir {
                path: "tmp".into(),
                mode: 0o1777,
            },
            Attrs::default(),
        )
        .file("usr/bin/sudo", 0o4755, noise(20_000, 4))
        .file("usr/bin/wall", 0o2755, noise(10_000, 5))
        .entry_with(
            Entry::File {
                path: "usr/bin/ping".into(),
                mode: 0o755,
                data: noise(40_000, 6),
            },
            Attrs {
                xattrs: vec![
                    ("security.capability".into(), caps()),
                    ("user.note".into(), b"hi".to_vec()),
                ],
                ..Attrs::default()
            },
        )
        .symlink("usr/bin/ping6", "ping")
        .symlink("usr/bin/odd-link", "../lib//x/./y/")
        .entry_with(
            Entry::File {
                path: format!("usr/share/{}", "文".repeat(40)),
                mode: 0o644,
                data: text(100, 10),
            },
            Attrs {
                xattrs: vec![("user.lang".into(), b"zh".to_vec())],
                ..Attrs::default()
            },
        )
        .symlink("lib", "usr/lib")
        .entry(Entry::CharDevice {
            path: "dev/null".into(),
            major: 1,
            minor: 3,
        })
        .entry(Entry::BlockDevice {
            path: "dev/loop0".into(),
            major: 7,
            minor: 0,
        })
        .entry(Entry::Fifo {
            path: "run/fifo".into(),
        })
        .file("empty", 0o644, Vec::new());
    let middle = Layer::new()
        .whiteout("etc", "removed")
        .opaque("opaque")
        .file("opaque/new", 0o644, "from layer 2")
        .hardlink("etc/tool-link", "bin/tool")
        .file("etc/config", 0o600, text(12_000, 7))
        .file(
            &format!("deep/{}/file", "d".repeat(120)),
            0o644,
            "long path",
        );
    let top = Layer::new()
        .whiteout("bin", "tool-alias")
        .file(
            "big/blob",
            0o644,
            [noise(700_000, 8), text(600_000, 9)].concat(),
        )
        .entry_with(
            Entry::Dir {
                path: "home/user".into(),
                mode: 0o750,
            },
            owner,
        );
    Image::new(vec![
        (base, Compression::Gzip),
        (middle, Compression::Gzip),
        (top, Compression::None),
    ])
}

/// The chunks of the file at `path` (relative, no leading slash) in `index`.
pub fn file_chunks(index: &ImageIndex, path: &str) -> Vec<ChunkRef> {
    let (_, ino) = index
        .walk()
        .into_iter()
        .find(|(p, _)| p == path.as_bytes())
        .unwrap_or_else(|| panic!("{path} is not in the index"));
    match &index.inode(ino).unwrap().kind {
        InodeKind::File { chunks, .. } => chunks.clone(),
        other => panic!("{path} is not a file: {other:?}"),
    }
}

/// An image mounted with `skiff mount` (as a daemon), unmounted on drop.
pub struct SkiffMount {
    pub mountpoint: PathBuf,
    pub run_dir: PathBuf,
}

impl SkiffMount {
    /// `skiff --store STORE mount IMAGE MOUNTPOINT --run-dir RUN_DIR EXTRA...`,
    /// which must succeed.
    pub fn start(
        store: &Path,
        image: &str,
        mountpoint: &Path,
        run_dir: &Path,
        extra: &[&str],
    ) -> SkiffMount {
        fs::create_dir_all(mountpoint).unwrap();
        let out = Command::new(skiff_bin())
            .arg("--store")
            .arg(store)
            .arg("mount")
            .arg(image)
            .arg(mountpoint)
            .arg("--run-dir")
            .arg(run_dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skiff mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SkiffMount {
            mountpoint: mountpoint.to_owned(),
            run_dir: run_dir.to_owned(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `skiff status --json`, which must succeed.
    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|stderr| panic!("skiff status failed: {stderr}"))
    }

    /// `skiff status --json`, or what it printed on stderr when it failed.
    pub fn try_status(&self) -> Result<Value, String> {
        let out = Command::new(skiff_bin())
            .arg("status")
            .arg(&self.mountpoint)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--json")
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    }

    /// One counter of `skiff status --json`'s `stats`.
    pub fn stat(&self, name: &str) -> u64 {
        let status = self.status();
        status["stats"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    }

    /// The daemon's pid, from its record.
    pub fn pid(&self) -> u32 {
        self.status()["pid"].as_u64().unwrap() as u32
    }

    /// The pid of the supervisor that keeps the mount across its daemons.
    pub fn supervisor_pid(&self) -> u32 {
        let status = self.status();
        status["supervisor_pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no supervisor in {status}")) as u32
    }

    /// `skiff umount`, which must succeed.
    pub fn umount(self) {
        let out = self.run_umount();
        assert!(
            out.status.success(),
            "skiff umount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::mem::forget(self);
    }

    fn run_umount(&self) -> Output {
        Command::new(skiff_bin())
            .arg("umount")
            .arg(&self.mountpoint)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .output()
            .unwrap()
    }
}

impl Drop for SkiffMount {
    fn drop(&mut self) {
        if !self.run_umount().status.success() {
            // Never leave a mount for the temporary directory's removal to walk into.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// Whether anything is mounted at `path` (from /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let path = path.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path))
}

/// The manifest `reference` names in `repo` of the registry at `base_url`
/// (`http://HOST`), image index or image manifest, as the registry has it.
pub fn oci_manifest(
    base_url: &str,
    repo: &str,
    reference: &str,
    basic_auth: Option<(&str, &str)>,
) -> Value {
    let mut request = reqwest::blocking::Client::new()
        .get(format!("{base_url}/v2/{repo}/manifests/{reference}"))
        .header(
            "Accept",
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
        );
    if let Some((user, password)) = basic_auth {
        request = request.basic_auth(user, Some(password));
    }
    let response = request.send().unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    serde_json::from_slice(&response.bytes().unwrap()).unwrap()
}

/// The skiff artifact's OCI manifest at `repo:tag`, whose index lists it
/// beside its launcher (docs/FORMAT.md, "What the tag holds").
pub fn skiff_artifact_manifest(
    base_url: &str,
    repo: &str,
    tag: &str,
    basic_auth: Option<(&str, &str)>,
) -> Value {
    let index = oci_manifest(base_url, repo, tag, basic_auth);
    let artifact = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["artifactType"] == "application/vnd.skiff.image.v1")
        .unwrap_or_else(|| panic!("{repo}:{tag} lists no skiff artifact: {index}"));
    oci_manifest(
        base_url,
        repo,
        artifact["digest"].as_str().unwrap(),
        basic_auth,
    )
}

/// The sum of the Prometheus samples `name` whose labels include all of
/// `labels` (`key="value"`), scraped from `BASE_URL/metrics`.
pub fn metric_at(base_url: &str, name: &str, labels: &[&str]) -> f64 {
    let text = reqwest::blocking::get(format!("{base_url}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
