//! One tar entry of a layer, read raw: GNU long names and PAX records
//! (path, linkpath, uid, gid, mtime, xattrs) are merged here, with a bound on
//! their size, into what the entry means for the merged tree.

use std::io::Read;

use skiff_format::{Metadata, Xattr};

use crate::merge::{normalize_xattrs, Content, EntryKind};
use crate::OciError;

pub(crate) fn bad_layer(layer: usize, e: impl std::fmt::Display) -> OciError {
    OciError::BadLayer {
        layer,
        reason: e.to_string(),
    }
}

/// PAX and GNU long-name headers are metadata: anything bigger is an attack
/// (a few MB of gzip can claim gigabytes of "header").
pub(crate) const MAX_EXTENSION_HEADER: u64 = 1 << 20;

/// Extension headers seen since the last real entry; they describe the next.
#[derive(Default)]
struct PendingExtensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl PendingExtensions {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// The entries of a layer's tar that mean something for the tree, one at a
/// time. Read raw: extension headers come here, so their size is bounded
/// ([`parse_entry`]), and they are merged into the entry they describe.
pub(crate) struct LayerEntries<'a, R: Read> {
    layer: usize,
    entries: tar::Entries<'a, R>,
    pending: PendingExtensions,
}

impl<'a, R: Read> LayerEntries<'a, R> {
    pub(crate) fn new(layer: usize, archive: &'a mut tar::Archive<R>) -> Result<Self, OciError> {
        let entries = archive
            .entries()
            .map_err(|e| bad_layer(layer, e))?
            .raw(true);
        Ok(LayerEntries {
            layer,
            entries,
            pending: PendingExtensions::default(),
        })
    }

    /// The next entry (a regular file's bytes handed to `contents`), or
    /// `None` at the end of the tar; extension headers left describing no
    /// entry are an error.
    pub(crate) fn next_entry(
        &mut self,
        contents: &mut dyn FnMut(&mut dyn Read, u64) -> Result<Content, OciError>,
    ) -> Result<Option<(Vec<u8>, Metadata, EntryKind)>, OciError> {
        for entry in self.entries.by_ref() {
            let mut entry = entry.map_err(|e| bad_layer(self.layer, e))?;
            if let Some(parsed) = parse_entry(self.layer, &mut entry, &mut self.pending, contents)?
            {
                return Ok(Some(parsed));
            }
        }
        if !self.pending.is_empty() {
            return Err(bad_layer(
                self.layer,
                "extension headers at the end describe no entry",
            ));
        }
        Ok(None)
    }
}

/// Reads one entry of a layer read in raw mode. Extension headers are read
/// here, bounded, into `pending`; a real entry is turned into what it means
/// for the merged tree, a regular file's bytes handed to `contents`. `None`
/// for entries that change nothing by themselves.
fn parse_entry<R: Read>(
    layer: usize,
    entry: &mut tar::Entry<'_, R>,
    pending: &mut PendingExtensions,
    contents: &mut dyn FnMut(&mut dyn Read, u64) -> Result<Content, OciError>,
) -> Result<Option<(Vec<u8>, Metadata, EntryKind)>, OciError> {
    use tar::EntryType as T;
    let entry_type = entry.header().entry_type();
    if matches!(
        entry_type,
        T::GNULongName | T::GNULongLink | T::XHeader | T::XGlobalHeader
    ) {
        let size = entry.size();
        let header_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if size > MAX_EXTENSION_HEADER {
            return Err(OciError::BadEntry {
                layer,
                path: header_name,
                reason: format!("{entry_type:?} header claims {size} bytes (at most {MAX_EXTENSION_HEADER} bytes are accepted)"),
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| bad_layer(layer, e))?;
        let slot = match entry_type {
            T::GNULongName => &mut pending.long_name,
            T::GNULongLink => &mut pending.long_link,
            T::XHeader => &mut pending.pax,
            _ => return Ok(None), // global PAX headers set defaults nobody relies on
        };
        if slot.is_some() {
            return Err(bad_layer(
                layer,
                format!("two {entry_type:?} headers for one entry"),
            ));
        }
        if entry_type != T::XHeader {
            // GNU long names are NUL-terminated.
            while data.last() == Some(&0) {
                data.pop();
            }
        }
        *slot = Some(data);
        return Ok(None);
    }
    let extensions = std::mem::take(pending);
    let pax: Vec<(Vec<u8>, Vec<u8>)> = match &extensions.pax {
        Some(records) => tar::PaxExtensions::new(records)
            .map(|r| r.map(|ext| (ext.key_bytes().to_vec(), ext.value_bytes().to_vec())))
            .collect::<Result<_, _>>()
            .map_err(|e| bad_layer(layer, format!("malformed PAX header: {e}")))?,
        None => Vec::new(),
    };
    let pax_value = |key: &[u8]| {
        pax.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let path = extensions
        .long_name
        .or_else(|| pax_value(b"path"))
        .unwrap_or_else(|| entry.path_bytes().into_owned());
    let path_str = || String::from_utf8_lossy(&path).into_owned();
    let bad = |reason: String| OciError::BadEntry {
        layer,
        path: path_str(),
        reason,
    };
    let header = entry.header();
    let number = |value: std::io::Result<u64>, what: &str| -> Result<u64, OciError> {
        value.map_err(|e| bad(format!("bad {what}: {e}")))
    };
    let mut meta = Metadata {
        mode: header.mode().map_err(|e| bad(format!("bad mode: {e}")))? & 0o7777,
        uid: u32::try_from(number(header.uid(), "uid")?)
            .map_err(|_| bad("uid out of range".into()))?,
        gid: u32::try_from(number(header.gid(), "gid")?)
            .map_err(|_| bad("gid out of range".into()))?,
        mtime: i64::try_from(number(header.mtime(), "mtime")?)
            .map_err(|_| bad("mtime out of range".into()))?,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    let link_name = extensions
        .long_link
        .or_else(|| pax_value(b"linkpath"))
        .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
    let mut xattrs = Vec::new();
    for (key, value) in &pax {
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            xattrs.push(Xattr {
                name: name.to_vec(),
                value: value.clone(),
            });
        } else if key == b"mtime" {
            (meta.mtime, meta.mtime_nsec) =
                parse_pax_time(value).ok_or_else(|| bad("bad PAX mtime".into()))?;
        } else if key == b"uid" || key == b"gid" {
            let id = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u32>().ok());
            let id = id.ok_or_else(|| bad(format!("bad PAX {}", String::from_utf8_lossy(key))))?;
            if key == b"uid" {
                meta.uid = id;
            } else {
                meta.gid = id;
            }
        } else if key == b"size" {
            // Raw reading sizes data by the header; a different PAX size would misalign the stream.
            let size = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
            if size != Some(entry.size()) {
                return Err(bad("PAX size record disagrees with the header (files over 8 GiB are not supported)".into()));
            }
        }
    }
    meta.xattrs = normalize_xattrs(xattrs);

    let device = || -> Result<(u32, u32), OciError> {
        let major = header
            .device_major()
            .map_err(|e| bad(format!("bad device major: {e}")))?;
        let minor = header
            .device_minor()
            .map_err(|e| bad(format!("bad device minor: {e}")))?;
        Ok((major.unwrap_or(0), minor.unwrap_or(0)))
    };
    let kind = match entry_type {
        T::Directory => EntryKind::Dir,
        T::Symlink => {
            EntryKind::Symlink(link_name.ok_or_else(|| bad("symlink without a target".into()))?)
        }
        T::Link => {
            EntryKind::HardLink(link_name.ok_or_else(|| bad("hard link without a target".into()))?)
        }
        T::Char => {
            let (major, minor) = device()?;
            EntryKind::CharDevice(major, minor)
        }
        T::Block => {
            let (major, minor) = device()?;
            EntryKind::BlockDevice(major, minor)
        }
        T::Fifo => EntryKind::Fifo,
        T::Regular | T::Continuous => {
            let size = entry.size();
            if size == 0 || is_whiteout(&path) {
                EntryKind::File(Content::Empty, 0)
            } else {
                let content = contents(entry, size).map_err(|e| match e {
                    OciError::Io { source, .. } => bad(format!("reading contents: {source}")),
                    other => other,
                })?;
                EntryKind::File(content, size)
            }
        }
        other => return Err(bad(format!("unsupported tar entry type {other:?}"))),
    };
    Ok(Some((path, meta, kind)))
}

pub(crate) fn is_whiteout(path: &[u8]) -> bool {
    path.rsplit(|&b| b == b'/')
        .next()
        .is_some_and(|name| name.starts_with(b".wh."))
}

/// `SECONDS[.FRACTION]` as in PAX headers (may be negative).
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let negative = secs.starts_with('-');
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nsec: u32 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    if negative && nsec > 0 {
        // -1.5 means 1.5 s before the epoch: -2 s + 0.5 s ("-0.5" too, whose seconds parse as 0).
        return Some((secs.checked_sub(1)?, 1_000_000_000 - nsec));
    }
    Some((secs, nsec))
}

#[cfg(test)]
mod tests {
    use super::parse_pax_time;

    #[test]
    fn pax_times_keep_sign_and_fraction() {
        assert_eq!(
            parse_pax_time(b"1700000000.25"),
            Some((1_700_000_000, 250_000_000))
        );
        assert_eq!(parse_pax_time(b"5"), Some((5, 0)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"-0.5"), Some((-1, 500_000_000)));
        assert_eq!(parse_pax_time(b"1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"abc"), None);
        assert_eq!(parse_pax_time(b"1.x"), None);
        assert_eq!(parse_pax_time(format!("{}.5", i64::MIN).as_bytes()), None);
    }
}
