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
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cell::Null => f.write_str("NULL"),
            Cell::Int(i) => write!(f, "{i}"),
            Cell::Real(r) => write!(f, "{r}"),
            Cell::Text(s) => write!(f, "'{s}'"),
        }
    }
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
