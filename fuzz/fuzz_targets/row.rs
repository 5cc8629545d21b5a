//! Row validation: a `tcp_mgm` row of arbitrary cells (the table's columns, and others), checked
//! against listeners from arbitrary `socket=` specs. Every fault must be reported, never panic,
//! and a row that validates keeps its id.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tcpmgm::policy::listener::Listeners;
use tcpmgm::policy::rule::{Cell, Row, validate_rows};
use tcpmgm::policy::source::COLUMNS;

#[derive(Arbitrary, Debug)]
enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Column {
    /// `id`, `parallel_read` or one of `COLUMNS`, by index.
    Known(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    cells: Vec<(Column, Value)>,
    listeners: Vec<String>,
}

fuzz_target!(|input: Input| {
    let known: Vec<&str> = ["id", "parallel_read"].into_iter().chain(COLUMNS).collect();
    let mut row = Row::default();
    for (column, value) in input.cells {
        let name = match column {
            Column::Known(i) => known[usize::from(i) % known.len()].to_owned(),
            Column::Other(name) => name,
        };
        let cell = match value {
            Value::Null => Cell::Null,
            Value::Int(i) => Cell::Int(i),
            Value::Real(r) => Cell::Real(r),
            Value::Text(t) => Cell::Text(t),
        };
        row = row.with(&name, cell);
    }
    let listeners =
        Listeners::parse_all(input.listeners.iter().map(String::as_str)).unwrap_or_default();
    let (rules, errors) = validate_rows(std::slice::from_ref(&row), &listeners);
    assert_eq!(rules.len() + usize::from(!errors.is_empty()), 1, "{row:?}");
    for rule in &rules {
        let id = match row.get("id") {
            Some(Cell::Int(i)) => Some(*i),
            Some(Cell::Text(t)) => t.trim().parse().ok(),
            // A whole number stored as a real (a FLOAT column, or SQLite's REAL affinity) is
            // taken as that number.
            Some(Cell::Real(r)) if r.fract() == 0.0 && r.abs() < 2f64.powi(63) => Some(*r as i64),
            _ => None,
        };
        assert_eq!(id, Some(i64::from(rule.id)), "{row:?}");
        let _ = rule.describe();
    }
    for e in &errors {
        let _ = e.to_string();
    }
});
