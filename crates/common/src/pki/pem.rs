//! PEM framing and serial-number text.
//!
//! Decoding accepts any number of blocks with text between them (comments, `openssl x509
//! -text` output); encoding writes 64-column base64 with LF line endings. Nothing here
//! looks inside the DER.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{PkiError, Result};

/// One decoded PEM block: its label (`CERTIFICATE`, `PRIVATE KEY`, `X509 CRL`, ...) and DER.
#[derive(Clone, PartialEq, Eq)]
pub struct PemBlock {
    /// The label between `-----BEGIN ` and `-----`.
    pub label: String,
    /// The decoded contents.
    pub der: Vec<u8>,
}

impl std::fmt::Debug for PemBlock {
    // Blocks may hold private keys: show only the label and size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemBlock")
            .field("label", &self.label)
            .field("len", &self.der.len())
            .finish()
    }
}

/// Decodes every PEM block in `text`, in order; text outside blocks is ignored.
pub fn pem_decode(text: &str) -> Result<Vec<PemBlock>> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .map(|block| {
            block
                .map(|pem| PemBlock {
                    label: pem.label,
                    der: pem.contents,
                })
                .map_err(|e| PkiError::Pem(e.to_string().to_lowercase()))
        })
        .collect()
}

/// Encodes `der` as one PEM block with `label`, ending in a newline.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // Base64 output is ASCII, so slicing at any byte offset is safe.
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Parses a serial number written as hex, with optional `0x` prefix and `:` separators.
///
/// Leading zero bytes are dropped, so `00:ab` and `ab` name the same certificate.
pub fn serial_from_hex(text: &str) -> Result<Vec<u8>> {
    let trimmed = text.trim();
    let digits: String = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        .unwrap_or(trimmed)
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if digits.is_empty() {
        return Err(PkiError::InvalidSerial(text.to_owned()));
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let mut bytes = hex::decode(&padded).map_err(|_| PkiError::InvalidSerial(text.to_owned()))?;
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros.min(bytes.len().saturating_sub(1)));
    Ok(bytes)
}

/// Lowercase hex of a DER INTEGER's content bytes without the sign-padding zero.
pub(crate) fn serial_to_hex(raw: &[u8]) -> String {
    let zeros = raw.iter().take_while(|b| **b == 0).count();
    hex::encode(&raw[zeros.min(raw.len().saturating_sub(1))..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = format!(
            "comment\n{}junk\n{}",
            pem_encode("CERTIFICATE", &der),
            pem_encode("X509 CRL", &[1, 2, 3])
        );
        let blocks = pem_decode(&text).expect("decodes");
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].label, "CERTIFICATE");
        assert_eq!(blocks[0].der, der);
        assert_eq!(blocks[1].label, "X509 CRL");
        assert_eq!(blocks[1].der, vec![1, 2, 3]);
        assert!(
            text.lines()
                .all(|l| l.len() <= 64 || l.starts_with("-----"))
        );
    }

    #[test]
    fn serial_forms() {
        let check = |text: &str, expected: &[u8]| {
            assert_eq!(serial_from_hex(text).expect(text), expected, "{text}");
        };
        check("ab", &[0xab]);
        check("0xAB", &[0xab]);
        check("00:ab:01", &[0xab, 0x01]);
        check("abc", &[0x0a, 0xbc]);
        check("00", &[0x00]);
        assert!(serial_from_hex("xyz").is_err());
        assert!(serial_from_hex("").is_err());
        assert_eq!(serial_to_hex(&[0x00, 0x8f, 0x01]), "8f01");
    }
}
