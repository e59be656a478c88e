//! How snapshot values are written: a tag byte, then postcard (compact, strings copied as they
//! are, nothing escaped). Values written before the tag existed are JSON, which never starts with
//! the tag, and stay readable: the caller reads them with its earlier (JSON) form.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The first byte of a binary value: a control character, which no JSON text starts with.
const BINARY: u8 = 0x01;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("binary snapshot: {0}")]
    Binary(#[from] postcard::Error),
    #[error("JSON snapshot: {0}")]
    Json(#[from] serde_json::Error),
}

/// A stored value, by how it was written.
pub enum Encoded<'a> {
    Binary(&'a [u8]),
    Json(&'a [u8]),
}

pub fn encode(value: &impl Serialize) -> Result<Vec<u8>, CodecError> {
    encode_sized(value, 256)
}

/// [`encode`] into a buffer of `capacity` bytes at first: a value whose size is known roughly
/// (a session's history) is written without growing its buffer step by step.
pub fn encode_sized(value: &impl Serialize, capacity: usize) -> Result<Vec<u8>, CodecError> {
    let mut bytes = Vec::with_capacity(capacity);
    bytes.push(BINARY);
    append(value, &mut bytes)?;
    Ok(bytes)
}

/// Appends `value`'s encoding (without the tag) to `bytes`, or nothing if it does not encode:
/// values written back to back, read one at a time by [`take`].
pub fn append(value: &impl Serialize, bytes: &mut Vec<u8>) -> Result<(), CodecError> {
    let before = bytes.len();
    let written = postcard::serialize_with_flavor(value, Appending(bytes));
    if written.is_err() {
        bytes.truncate(before);
    }
    Ok(written?)
}

/// Appends to a `Vec` a slice at a time: postcard's own `ExtendFlavor` pushes strings byte by
/// byte, which made encoding a session's history the costliest step of a turn.
struct Appending<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Appending<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Reads one value written by [`append`] from the front of `bytes`, and what follows it.
pub fn take<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8]), CodecError> {
    Ok(postcard::take_from_bytes(bytes)?)
}

pub fn encoded(bytes: &[u8]) -> Encoded<'_> {
    match bytes.split_first() {
        Some((&BINARY, rest)) => Encoded::Binary(rest),
        _ => Encoded::Json(bytes),
    }
}

/// Reads a value written by [`encode`], or one of the same shape written as JSON.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match encoded(bytes) {
        Encoded::Binary(rest) => Ok(postcard::from_bytes(rest)?),
        Encoded::Json(json) => Ok(serde_json::from_slice(json)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        turns: u64,
    }

    #[test]
    fn binary_and_earlier_json_values_both_read() {
        let sample = Sample {
            name: "{\"quoted\"}".into(),
            turns: 7,
        };
        let bytes = encode(&sample).expect("encodes");
        assert_eq!(bytes[0], BINARY);
        assert_eq!(decode::<Sample>(&bytes).expect("binary"), sample);
        let json = serde_json::to_vec(&sample).expect("json");
        assert_eq!(decode::<Sample>(&json).expect("json"), sample);
        assert!(decode::<Sample>(&[BINARY, 0xff]).is_err());
        assert!(decode::<Sample>(b"").is_err());
    }
}
