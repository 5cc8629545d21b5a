//! A row as the database returned it, before any interpretation.
use std::fmt;

use crate::policy::values::{QUOTED_CHARS, quote};

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

/// The columns of OpenSIPS's tcp_mgm table that every version has, besides `id`.
pub const COLUMNS: [&str; 17] = crate::policy::column::EVERY_VERSION;

/// The columns a row keeps: `id`, `COLUMNS`, and `parallel_read` (version 1 tables). Validation
/// reads no other; they are also the columns a rename may name.
pub const ROW_COLUMNS: [&str; COLUMNS.len() + 2] = {
    let mut all = [""; COLUMNS.len() + 2];
    all[0] = "id";
    let mut i = 0;
    while i < COLUMNS.len() {
        all[i + 1] = COLUMNS[i];
        i += 1;
    }
    all[COLUMNS.len() + 1] = "parallel_read";
    all
};

/// A `tcp_mgm` row: a cell for each of `ROW_COLUMNS` the table has, by position (no map and no
/// column name is allocated per row: a table is read at hundreds of thousands of rows a
/// second). A column the table lacks is absent; other columns are not kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    cells: [Option<Cell>; ROW_COLUMNS.len()],
}

impl Row {
    /// The position of `column` in `ROW_COLUMNS`, if a row keeps it.
    pub fn position(column: &str) -> Option<usize> {
        ROW_COLUMNS.iter().position(|c| *c == column)
    }

    pub fn get(&self, column: &str) -> Option<&Cell> {
        Self::position(column).and_then(|i| self.cells[i].as_ref())
    }

    /// Sets the cell at `position` (of `ROW_COLUMNS`); nothing for a position past them.
    pub fn set(&mut self, position: usize, cell: Cell) {
        if let Some(slot) = self.cells.get_mut(position) {
            *slot = Some(cell);
        }
    }

    /// The row with `column` set to `cell`; a column a row does not keep is left out.
    pub fn with(mut self, column: &str, cell: Cell) -> Self {
        if let Some(i) = Self::position(column) {
            self.set(i, cell);
        }
        self
    }

    /// The columns the row has, with their cells, in `ROW_COLUMNS` order.
    pub fn cells(&self) -> impl Iterator<Item = (&'static str, &Cell)> {
        ROW_COLUMNS
            .iter()
            .zip(&self.cells)
            .filter_map(|(name, cell)| cell.as_ref().map(|c| (*name, c)))
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

    #[test]
    fn a_row_keeps_the_id_every_opensips_column_and_parallel_read() {
        let expected: Vec<&str> = ["id"]
            .into_iter()
            .chain(COLUMNS)
            .chain(["parallel_read"])
            .collect();
        assert_eq!(ROW_COLUMNS.to_vec(), expected);
        let row = Row::default()
            .with("keepidle", Cell::Int(5))
            .with("no_such_column", Cell::Int(6));
        assert_eq!(row.get("keepidle"), Some(&Cell::Int(5)));
        assert_eq!(row.get("no_such_column"), None);
        assert_eq!(row.get("id"), None);
        assert_eq!(row.cells().count(), 1);
    }
}
