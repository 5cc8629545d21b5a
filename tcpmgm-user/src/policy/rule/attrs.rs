//! The `attrs` column: `key=int;key=int`.
use super::quote;

/// Parses `key=int;key=int`. Empty pairs (a trailing `;`) are allowed; everything else that is
/// not `key=integer` is an error naming the piece at fault.
pub fn parse_attrs(s: &str) -> Result<Vec<(String, i64)>, String> {
    let mut out = Vec::new();
    for piece in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = piece
            .split_once('=')
            .ok_or_else(|| format!("{} is not key=integer", quote(piece)))?;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "{}: key must be letters, digits or '_'",
                quote(piece)
            ));
        }
        let value: i64 =
            value
                .trim()
                .parse()
                .map_err(|e: std::num::ParseIntError| match e.kind() {
                    std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                        format!("{}: value is out of range (64-bit integers)", quote(piece))
                    }
                    _ => format!("{}: value is not an integer", quote(piece)),
                })?;
        if key.len() > tcpmgm_common::MAX_ATTR_KEY {
            return Err(format!(
                "{}: keys are at most {} bytes",
                quote(key),
                tcpmgm_common::MAX_ATTR_KEY
            ));
        }
        if out.iter().any(|(k, _)| k == key) {
            return Err(format!("{} is given twice", quote(key)));
        }
        out.push((key.to_owned(), value));
    }
    if out.len() > tcpmgm_common::MAX_ATTRS {
        return Err(format!(
            "{} pairs, at most {} are kept per rule",
            out.len(),
            tcpmgm_common::MAX_ATTRS
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_rejects_the_rest() {
        assert_eq!(
            parse_attrs("max_msg_chunks=8; x_y=-2;").unwrap(),
            vec![("max_msg_chunks".into(), 8), ("x_y".into(), -2)]
        );
        assert_eq!(parse_attrs("").unwrap(), vec![]);
        assert!(
            parse_attrs("max_msg_chunks")
                .unwrap_err()
                .contains("key=integer")
        );
        assert!(
            parse_attrs("max_msg_chunks=eight")
                .unwrap_err()
                .contains("not an integer")
        );
        assert_eq!(
            parse_attrs("max_msg_chunks=9223372036854775808").unwrap_err(),
            "'max_msg_chunks=9223372036854775808': value is out of range (64-bit integers)"
        );
        assert!(parse_attrs("=3").unwrap_err().contains("key must be"));
        assert!(parse_attrs("a=1;a=2").unwrap_err().contains("twice"));
        assert!(
            parse_attrs("a=1;b=2;c=3;d=4;e=5")
                .unwrap_err()
                .contains("at most 4")
        );
        assert!(
            parse_attrs("a_very_long_attribute_key_name=1")
                .unwrap_err()
                .contains("at most 24 bytes")
        );
    }
}
