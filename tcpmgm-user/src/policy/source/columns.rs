//! Column renames: the tcp_mgm module's `<column>_col` parameters (and the configuration file's
//! `[columns]`), for a table whose columns have other names. The source reads each renamed
//! column under its canonical name, so nothing past it knows of renames.
use std::collections::BTreeMap;

use super::TableName;
use crate::policy::rule::ROW_COLUMNS;

/// The columns a rename may name: `id`, those of every table version, and version 1's
/// `parallel_read`.
pub fn renameable() -> impl Iterator<Item = &'static str> {
    ROW_COLUMNS.into_iter()
}

/// The table's name for each renamed column, by canonical name.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "BTreeMap<String, String>")]
pub struct ColumnMap(BTreeMap<String, String>);

impl ColumnMap {
    /// Reads `canonical` from the column `actual`: a plain SQL name that no other column is
    /// read from.
    pub fn rename(&mut self, canonical: &str, actual: &str) -> Result<(), String> {
        let Some(canonical) = renameable().find(|c| *c == canonical) else {
            return Err(format!(
                "{canonical:?} is not a column of the tcp_mgm table (expected one of {})",
                renameable().collect::<Vec<_>>().join(", ")
            ));
        };
        let actual = TableName::new(actual)
            .map_err(|e| {
                format!(
                    "column {canonical}: {}",
                    e.replacen("table name", "name", 1)
                )
            })?
            .as_str()
            .to_ascii_lowercase();
        if let Some((other, _)) = self
            .0
            .iter()
            .find(|(other, a)| **a == actual && *other != canonical)
        {
            return Err(format!(
                "column {actual} is already where {other} is read from; two columns cannot \
                 share one"
            ));
        }
        self.0.insert(canonical.to_owned(), actual);
        Ok(())
    }

    /// `over`'s renames on top of these (the configuration file over --opensips-cfg).
    pub fn overlay(&mut self, over: &ColumnMap) -> Result<(), String> {
        for (canonical, actual) in &over.0 {
            self.0.remove(canonical);
            self.rename(canonical, actual)?;
        }
        Ok(())
    }

    /// The column `canonical` is read from.
    pub fn actual<'a>(&'a self, canonical: &'a str) -> &'a str {
        self.0.get(canonical).map_or(canonical, String::as_str)
    }

    /// The name a column of the table (lowercase) is read as: None for a column named as a
    /// canonical one that is read from another column.
    pub fn read_as(&self, actual: &str) -> Option<String> {
        match self.0.iter().find(|(_, a)| *a == actual) {
            Some((canonical, _)) => Some(canonical.clone()),
            None if self.0.contains_key(actual) => None,
            None => Some(actual.to_owned()),
        }
    }

    /// `'name'`, or for a renamed column `'actual' (canonical, renamed)`, for errors.
    pub fn describe(&self, canonical: &str) -> String {
        match self.0.get(canonical) {
            Some(actual) => format!("'{actual}' (its {canonical} column, renamed)"),
            None => format!("'{canonical}'"),
        }
    }
}

impl TryFrom<BTreeMap<String, String>> for ColumnMap {
    type Error = String;
    fn try_from(given: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        let mut map = ColumnMap::default();
        for (canonical, actual) in &given {
            map.rename(canonical, actual)?;
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renamed_columns_are_read_under_their_canonical_names() {
        let mut m = ColumnMap::default();
        m.rename("keepidle", "KA_Idle").unwrap();
        m.rename("id", "rule_id").unwrap();
        assert_eq!(m.read_as("ka_idle").as_deref(), Some("keepidle"));
        assert_eq!(m.read_as("rule_id").as_deref(), Some("id"));
        assert_eq!(m.read_as("keepidle"), None, "shadowed by the rename");
        assert_eq!(m.read_as("keepcount").as_deref(), Some("keepcount"));
        assert_eq!(m.actual("id"), "rule_id");
        // A swap is two renames.
        let mut swap = ColumnMap::default();
        swap.rename("keepidle", "keepinterval").unwrap();
        swap.rename("keepinterval", "keepidle").unwrap();
        assert_eq!(swap.read_as("keepidle").as_deref(), Some("keepinterval"));
        assert_eq!(swap.read_as("keepinterval").as_deref(), Some("keepidle"));
    }

    #[test]
    fn what_cannot_be_read_is_refused() {
        let mut m = ColumnMap::default();
        assert!(
            m.rename("direction", "dir")
                .unwrap_err()
                .contains("not a column")
        );
        assert!(
            m.rename("keepidle", "ka-idle")
                .unwrap_err()
                .contains("plain SQL name")
        );
        m.rename("keepidle", "ka").unwrap();
        assert!(m.rename("keepcount", "ka").unwrap_err().contains("already"));
        let mut over = ColumnMap::default();
        over.rename("keepidle", "idle").unwrap();
        m.overlay(&over).unwrap();
        assert_eq!(m.actual("keepidle"), "idle");
    }
}
