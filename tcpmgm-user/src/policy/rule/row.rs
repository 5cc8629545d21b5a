//! A row as the database returned it, before any interpretation.
use std::collections::BTreeMap;
use std::fmt;

/// One cell. Databases hand back what the column holds, which may not be what the schema says
/// (SQLite stores text in an INTEGER column without complaint), so validation sees the raw value.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
    /// A value the driver could not hand over as any of the above: why.
    Unreadable(String),
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cell::Null => f.write_str("NULL"),
            Cell::Int(i) => write!(f, "{i}"),
            // Whole numbers in full (SQLite keeps an integer too large for 64 bits, such as
            // 2^63, as a float: shortest round-trip digits would show another number).
            Cell::Real(r) if r.fract() == 0.0 && r.abs() < 1e21 => write!(f, "{r:.0}"),
            Cell::Real(r) => write!(f, "{r:?}"),
            Cell::Text(s) => f.write_str(&quote(s)),
            Cell::Blob(b) => {
                let hex: String = b
                    .iter()
                    .take(QUOTED_CHARS / 2)
                    .map(|x| format!("{x:02x}"))
                    .collect();
                let cut = if b.len() > QUOTED_CHARS / 2 {
                    "…"
                } else {
                    ""
                };
                write!(f, "x'{hex}{cut}' ({} bytes)", b.len())
            }
            Cell::Unreadable(why) => write!(f, "an unreadable value ({})", quote(why)),
        }
    }
}

/// How many characters of a value an error quotes.
const QUOTED_CHARS: usize = 100;

/// A value as every error about a row quotes it: in single quotes, control characters escaped,
/// and past `QUOTED_CHARS` characters cut, with an ellipsis and the value's length, so a
/// megabyte in a cell does not become a megabyte in the reply, the log and the state file.
pub fn quote(value: &str) -> String {
    let mut out = String::from("'");
    for c in value.chars().take(QUOTED_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    let length = value.chars().count();
    if length > QUOTED_CHARS {
        out.insert(out.len() - 1, '…');
        out.push_str(&format!(" ({length} characters)"));
    }
    out
}

/// A `tcp_mgm` row: column name to cell. A column the table lacks is absent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub cells: BTreeMap<String, Cell>,
}

impl Row {
    pub fn get(&self, column: &str) -> Option<&Cell> {
        self.cells.get(column)
    }

    pub fn with(mut self, column: &str, cell: Cell) -> Self {
        self.cells.insert(column.to_owned(), cell);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_short_and_whole_numbers_in_full() {
        assert_eq!(Cell::Text("udp".into()).to_string(), "'udp'");
        assert_eq!(Cell::Text("a\nb".into()).to_string(), "'a\\nb'");
        let long = Cell::Text("x".repeat(1 << 20)).to_string();
        assert_eq!(long, format!("'{}…' (1048576 characters)", "x".repeat(100)));
        assert_eq!(Cell::Real(2f64.powi(63)).to_string(), "9223372036854775808");
        assert_eq!(Cell::Real(1.5).to_string(), "1.5");
        assert_eq!(Cell::Real(1e300).to_string(), "1e300");
        assert_eq!(Cell::Blob(vec![1, 0xab]).to_string(), "x'01ab' (2 bytes)");
    }
}
