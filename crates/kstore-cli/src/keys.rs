//! How keys are written on the command line and printed: as text (UTF-8), hex or base64, so
//! that binary keys (such as `kstore_client::keys::composite` ones, or integers encoded to
//! sort in order) can be read, scanned and printed exactly.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// A way of writing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KeyFormat {
    /// UTF-8 text, as typed (printed lossily if a key is not UTF-8: use hex or base64).
    #[default]
    Text,
    /// Two hex digits per byte (upper or lower case on input, lower case on output).
    Hex,
    /// Standard base64 with padding (RFC 4648).
    Base64,
}

impl KeyFormat {
    /// Returns the key's bytes as written in this format, or why it is not.
    pub fn parse(self, written: &str) -> Result<Vec<u8>, String> {
        match self {
            KeyFormat::Text => Ok(written.as_bytes().to_vec()),
            KeyFormat::Hex => {
                if !written.len().is_multiple_of(2) {
                    return Err(format!(
                        "{written:?} is not hex: an odd number of digits ({})",
                        written.len()
                    ));
                }
                (0..written.len())
                    .step_by(2)
                    .map(|i| {
                        written
                            .get(i..i + 2)
                            // from_str_radix alone would take a sign ("+f").
                            .filter(|pair| pair.bytes().all(|b| b.is_ascii_hexdigit()))
                            .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                            .ok_or_else(|| {
                                format!("{written:?} is not hex: no hex byte at position {i}")
                            })
                    })
                    .collect()
            }
            KeyFormat::Base64 => STANDARD
                .decode(written)
                .map_err(|error| format!("{written:?} is not base64: {error}")),
        }
    }

    /// Returns `key` written in this format.
    pub fn print(self, key: &[u8]) -> String {
        match self {
            KeyFormat::Text => String::from_utf8_lossy(key).into_owned(),
            KeyFormat::Hex => key.iter().map(|byte| format!("{byte:02x}")).collect(),
            KeyFormat::Base64 => STANDARD.encode(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_reads_back_what_it_prints_and_refuses_what_it_cannot_read() {
        let keys: [&[u8]; 4] = [b"", b"customer-000042", &[0, 1, 0xfe, 0xff], &[0x80; 7]];
        for format in [KeyFormat::Hex, KeyFormat::Base64] {
            for key in keys {
                assert_eq!(format.parse(&format.print(key)).unwrap(), key, "{format:?}");
            }
        }
        assert_eq!(KeyFormat::Hex.print(&[0, 1, 0xfe, 0xff]), "0001feff");
        assert_eq!(KeyFormat::Hex.parse("00FEff").unwrap(), [0, 0xfe, 0xff]);
        assert_eq!(KeyFormat::Base64.print(b"k\0"), "awA=");
        assert_eq!(KeyFormat::Text.parse("café").unwrap(), "café".as_bytes());
        assert_eq!(KeyFormat::Text.print(b"customer-7"), "customer-7");

        let refused = |format: KeyFormat, written: &str| format.parse(written).unwrap_err();
        assert!(refused(KeyFormat::Hex, "abc").contains("odd number of digits"));
        assert!(refused(KeyFormat::Hex, "zz").contains("no hex byte at position 0"));
        assert!(refused(KeyFormat::Hex, "00é0").contains("not hex"));
        assert!(refused(KeyFormat::Hex, "0+").contains("not hex"));
        assert!(refused(KeyFormat::Hex, "+f").contains("not hex"));
        assert!(refused(KeyFormat::Base64, "a").contains("not base64"));
    }
}
