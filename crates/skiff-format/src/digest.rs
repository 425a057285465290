use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::FormatError;

/// Declares a 32-byte BLAKE3 digest newtype: hex in text formats, raw bytes in binary ones.
macro_rules! blake3_digest {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// The digest of `data`.
            pub fn of(data: &[u8]) -> Self {
                Self(*blake3::hash(data).as_bytes())
            }

            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Parses a raw 32-byte slice (as stored in database keys).
            pub fn from_slice(bytes: &[u8]) -> Result<Self, FormatError> {
                <[u8; 32]>::try_from(bytes)
                    .map(Self)
                    .map_err(|_| FormatError::InvalidDigest(hex::encode(bytes)))
            }

            pub fn to_hex(&self) -> String {
                String::from_utf8(self.hex_bytes().to_vec()).expect("hex is ASCII")
            }

            /// Lowercase hex without allocating (the server formats ids per request).
            pub fn hex_bytes(&self) -> [u8; 64] {
                let mut out = [0u8; 64];
                hex::encode_to_slice(self.0, &mut out).expect("64 bytes hold 32 in hex");
                out
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let hex = self.hex_bytes();
                f.write_str(std::str::from_utf8(&hex).expect("hex is ASCII"))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = FormatError;

            /// Accepts `HEX` or `blake3:HEX`, lowercase only, so one digest has one spelling.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let hex_part = s.strip_prefix("blake3:").unwrap_or(s);
                let valid = hex_part.len() == 64
                    && hex_part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                let mut out = [0u8; 32];
                if !valid || hex::decode_to_slice(hex_part, &mut out).is_err() {
                    return Err(FormatError::InvalidDigest(s.to_owned()));
                }
                Ok(Self(out))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.serialize_str(&format!("blake3:{}", self.to_hex()))
                } else {
                    self.0.serialize(serializer)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let s = String::deserialize(deserializer)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; 32]>::deserialize(deserializer).map(Self)
                }
            }
        }
    };
}

blake3_digest!(
    /// The id of a chunk: BLAKE3-256 of its *uncompressed* bytes.
    ChunkId
);

blake3_digest!(
    /// The digest of an encoded [`ImageIndex`](crate::ImageIndex): BLAKE3-256 of its bytes.
    IndexDigest
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_spellings_and_rejects_others() {
        let id = ChunkId::of(b"hello");
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert_eq!(format!("blake3:{id}").parse::<ChunkId>().unwrap(), id);
        assert!(id.to_hex().to_uppercase().parse::<ChunkId>().is_err());
        assert!("abc".parse::<ChunkId>().is_err());
        assert!(format!("sha256:{id}").parse::<ChunkId>().is_err());
    }

    #[test]
    fn json_is_prefixed_hex_and_postcard_is_raw() {
        let id = ChunkId::of(b"x");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"blake3:{}\"", id.to_hex()));
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
        let bin = postcard::to_stdvec(&id).unwrap();
        assert_eq!(bin.len(), 32);
        assert_eq!(postcard::from_bytes::<ChunkId>(&bin).unwrap(), id);
    }
}
