//! Response bodies read with a bound: the peer decides how long a body is,
//! so the reader must decide how much of it it will hold.

use std::io::Read;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("a body of {declared} bytes (at most {limit} expected)")]
    Declared { declared: u64, limit: u64 },
    #[error("a body over {limit} bytes")]
    TooLong { limit: u64 },
    #[error("{0}")]
    Read(#[from] std::io::Error),
}

/// Reads `body` (whose header said `declared` bytes, if it said) to its end
/// if that is at most `limit` bytes; more is an error, never a longer buffer.
pub fn read_bounded(
    body: impl Read,
    declared: Option<u64>,
    limit: u64,
) -> Result<Vec<u8>, BodyError> {
    if let Some(declared) = declared.filter(|&n| n > limit) {
        return Err(BodyError::Declared { declared, limit });
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(limit) as usize);
    body.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(BodyError::TooLong { limit });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_past_the_limit_are_refused_without_being_held() {
        assert_eq!(read_bounded(&b"abc"[..], Some(3), 3).unwrap(), b"abc");
        assert!(matches!(
            read_bounded(&b"abc"[..], Some(4), 3),
            Err(BodyError::Declared { declared: 4, .. })
        ));
        // An endless body with no length stops one byte past the limit.
        let endless = std::io::repeat(b'x');
        assert!(matches!(
            read_bounded(endless, None, 1 << 20),
            Err(BodyError::TooLong { .. })
        ));
    }
}
