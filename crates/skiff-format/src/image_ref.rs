use std::fmt;
use std::str::FromStr;

use crate::FormatError;

/// A `NAME[:TAG]` image reference inside a skiff store; the tag defaults to `latest`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageRef {
    pub name: String,
    pub tag: String,
}

impl ImageRef {
    /// The key under which the image is catalogued: `NAME:TAG`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

impl FromStr for ImageRef {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| FormatError::InvalidImageRef {
            reference: s.to_owned(),
            reason,
        };
        // A colon after the last slash separates the tag (a registry port is before a slash).
        let (name, tag) = match s.rfind(':') {
            Some(i) if !s[i..].contains('/') => (&s[..i], &s[i + 1..]),
            _ => (s, "latest"),
        };
        if name.is_empty() || name.len() > 255 {
            return Err(err("the name must be 1 to 255 characters"));
        }
        let name_ok = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
            && !name.starts_with(['.', '-', '/'])
            && !name
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..");
        if !name_ok {
            return Err(err(
                "the name may hold lowercase letters, digits and . _ - / separated components",
            ));
        }
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && !tag.starts_with(['.', '-']);
        if !tag_ok {
            return Err(err(
                "the tag must be 1 to 128 of [A-Za-z0-9_.-], not starting with . or -",
            ));
        }
        Ok(ImageRef {
            name: name.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_and_tag() {
        let r: ImageRef = "library/debian:bookworm".parse().unwrap();
        assert_eq!(
            (r.name.as_str(), r.tag.as_str()),
            ("library/debian", "bookworm")
        );
        let r: ImageRef = "localhost:5000/app".parse().unwrap();
        assert_eq!(
            (r.name.as_str(), r.tag.as_str()),
            ("localhost:5000/app", "latest")
        );
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "", ":tag", "Upper:x", "a/../b", "a:", "a:-x", "/abs", "a//b",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?} was accepted");
        }
    }
}
