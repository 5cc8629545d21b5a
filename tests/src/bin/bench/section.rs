//! The sections of BENCHMARKS.md that runs of their own write (`--rate`, `--soak`, ...): each
//! between two markers, replaced by its own run and kept by every other.

/// A section's markers.
pub struct Section {
    pub begin: &'static str,
    pub end: &'static str,
}

pub const SOAK: Section = Section {
    begin: "<!-- soak: written by `cargo xtask bench --soak MINUTES`, kept by the other runs -->",
    end: "<!-- soak end -->",
};

pub const TABLE_READ: Section = Section {
    begin: "<!-- table read: written by `cargo xtask bench -- --table-read`, kept by the other runs -->",
    end: "<!-- table read end -->",
};

pub const MEMORY: Section = Section {
    begin: "<!-- memory: written by `cargo xtask bench -- --memory`, kept by the other runs -->",
    end: "<!-- memory end -->",
};

pub const FLEET: Section = Section {
    begin: "<!-- fleet: written by `cargo xtask bench --fleet N`, kept by the other runs -->",
    end: "<!-- fleet end -->",
};

pub const RATE: Section = Section {
    begin: "<!-- rate: written by `cargo xtask bench -- --rate`, kept by the other runs -->",
    end: "<!-- rate end -->",
};

pub const RELOAD: Section = Section {
    begin: "<!-- reload: written by `cargo xtask bench -- --reload`, kept by the other runs -->",
    end: "<!-- reload end -->",
};

/// Every section runs of their own write, in the order the report keeps them.
pub const ALL: [&Section; 6] = [&RELOAD, &RATE, &TABLE_READ, &MEMORY, &FLEET, &SOAK];

impl Section {
    /// The section in `doc`, markers included.
    pub fn of<'a>(&self, doc: &'a str) -> Option<&'a str> {
        let begin = doc.find(self.begin)?;
        let end = doc[begin..].find(self.end)? + begin + self.end.len();
        Some(&doc[begin..end])
    }

    /// `doc` with this section replaced by `section`, or `section` appended when it has none.
    pub fn put(&self, doc: &str, section: &str) -> String {
        let section = section.trim_end();
        match self.of(doc) {
            Some(old) => doc.replacen(old, section, 1),
            None if doc.is_empty() => format!("{section}\n"),
            None => format!("{}\n\n{section}\n", doc.trim_end()),
        }
    }
}

impl Section {
    /// Prints `section` and puts it in the report at `out`, the rest of the report kept.
    pub fn write(&self, out: &std::path::Path, section: &str) -> anyhow::Result<()> {
        use anyhow::Context as _;
        print!("{section}");
        let doc = std::fs::read_to_string(out).unwrap_or_default();
        std::fs::write(out, self.put(&doc, section))
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("written to {}", out.display());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_section_is_replaced() {
        let (b, e) = (SOAK.begin, SOAK.end);
        let other = format!("{}\nkept\n{}", TABLE_READ.begin, TABLE_READ.end);
        let doc = format!("# t\n\nbefore\n\n{b}\nold\n{e}\n\n{other}\n");
        let new = format!("{b}\nnew\n{e}\n");
        assert_eq!(
            SOAK.put(&doc, &new),
            format!("# t\n\nbefore\n\n{b}\nnew\n{e}\n\n{other}\n")
        );
        assert_eq!(SOAK.put("# t\n", &new), format!("# t\n\n{b}\nnew\n{e}\n"));
        assert_eq!(TABLE_READ.of(&doc), Some(other.as_str()));
    }
}
