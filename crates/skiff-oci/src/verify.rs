//! sha256 verification of blobs and uncompressed layers.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use crate::OciError;

/// `sha256:HEX` of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The hex part of a `sha256:` digest, validated so it can name a file safely.
pub(crate) fn sha256_hex(digest: &str) -> Result<&str, OciError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(OciError::Malformed {
            what: "digest".into(),
            reason: format!("{digest:?} is not sha256:<64 hex digits>"),
        }),
    }
}

/// Hashes everything read through it; [`HashingReader::finish`] drains the
/// rest and compares against the expected digest.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Reads to the end; returns the byte count and the `sha256:` digest of
    /// everything that passed through.
    pub(crate) fn finish(mut self, what: &str) -> Result<(u64, String), OciError> {
        io::copy(&mut self, &mut io::sink()).map_err(|source| OciError::Io {
            context: format!("reading {what}"),
            source,
        })?;
        Ok((
            self.bytes,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
        ))
    }
}

/// An error unless `actual` is `expected`.
pub(crate) fn check_digest(what: &str, expected: &str, actual: String) -> Result<(), OciError> {
    if actual == expected {
        Ok(())
    } else {
        Err(OciError::DigestMismatch {
            what: what.to_owned(),
            expected: expected.to_owned(),
            actual,
        })
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Checks a whole blob read from `reader` against its descriptor.
pub(crate) fn verify_blob(
    reader: impl Read,
    what: &str,
    digest: &str,
    size: Option<u64>,
) -> Result<(), OciError> {
    sha256_hex(digest)?;
    // One byte past the expected size is enough to detect a longer blob.
    let limit = size.map_or(u64::MAX, |s| s + 1);
    let (actual_size, actual) = HashingReader::new(reader.take(limit)).finish(what)?;
    if let Some(expected) = size.filter(|&s| s != actual_size) {
        return Err(OciError::SizeMismatch {
            what: what.to_owned(),
            expected,
            actual: actual_size,
        });
    }
    check_digest(what, digest, actual)
}

/// Checks a blob streamed by someone else's reader: the error surfaces as
/// an `InvalidData` read error at the end of the blob (or as soon as it runs
/// past its size), so whatever decodes it stops with the reason.
pub(crate) struct DigestCheckedReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    digest: String,
    size: u64,
}

impl<R: Read> DigestCheckedReader<R> {
    pub(crate) fn new(inner: R, digest: &str, size: u64) -> Self {
        DigestCheckedReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            digest: digest.to_owned(),
            size,
        }
    }
}

impl<R: Read> Read for DigestCheckedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        if self.bytes > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob {} is longer than the {} bytes its descriptor says",
                    self.digest, self.size
                ),
            ));
        }
        self.hasher.update(&buf[..n]);
        if n == 0 {
            let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
            if self.bytes != self.size || actual != self.digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "blob {} does not match its digest: got {actual}, {} bytes",
                        self.digest, self.bytes
                    ),
                ));
            }
        }
        Ok(n)
    }
}
