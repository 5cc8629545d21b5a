//! `--opensips-cfg`: what tcpmgm takes from OpenSIPS's own configuration file, so that one file
//! configures both: the TCP-based `socket=` / `listen=` lines (the listeners), and the tcp_mgm
//! module's `db_url` (else the global `db_default_url`), `db_table` and `<column>_col` renames.
//!
//! A `<column>_col` renames the column its name says, as the module documents. OpenSIPS 3.3 to
//! 3.6 itself applies the parameters from `direction_col` on to the next column of its list
//! (`keepidle_col` renames keepinterval there; master shifts fewer), and the module has no
//! direction column at all: `direction_col` is an error here.
//!
//! Only what the file says literally is taken. What tcpmgm cannot follow is an error naming the
//! line: an included file, a value that is not a quoted string (an m4 macro, say), a database
//! module other than SQLite, MySQL/MariaDB and PostgreSQL, a setting made twice.
use std::path::{Path, PathBuf};

use crate::policy::source::{ColumnMap, TableName};

#[derive(Debug, thiserror::Error)]
#[error("{}{}: {reason}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct CfgError {
    pub path: PathBuf,
    /// 1-based; None for the file as a whole.
    pub line: Option<usize>,
    pub reason: String,
}

/// A value and the line it was set on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub value: String,
    pub line: usize,
}

/// The text of a token that includes another file (`include_file`, `import_file`, or their
/// `#!` directive forms), which tcpmgm does not follow.
fn included(kind: &Kind) -> Option<&str> {
    match kind {
        Kind::Directive(w) => Some(w),
        Kind::Word(w) if w == "include_file" || w == "import_file" => Some(w),
        _ => None,
    }
}

/// The value of the `socket=` or `listen=` at `tokens[i]`, which runs to the end of its line,
/// and the index after it; None when no `=` follows.
fn socket_value(tokens: &[Token], i: usize) -> Option<(Setting, usize)> {
    let eq = tokens.get(i + 1)?;
    if eq.kind != Kind::Punct('=') {
        return None;
    }
    let line = tokens[i].line;
    let mut value = String::new();
    let mut i = i + 2;
    while let Some(tok) = tokens.get(i).filter(|tok| tok.line == line) {
        value.push_str(&tok.text());
        if tokens
            .get(i + 1)
            .is_some_and(|n| n.line == line && n.spaced)
        {
            value.push(' ');
        }
        i += 1;
    }
    Some((Setting { value, line }, i))
}

/// What an OpenSIPS configuration file gives tcpmgm.
#[derive(Clone, Debug, Default)]
pub struct OpenSipsCfg {
    pub path: PathBuf,
    /// `modparam("tcp_mgm", "db_url", ...)`.
    pub db_url: Option<Setting>,
    /// `db_default_url = ...`, which the module uses when it has no db_url of its own.
    pub db_default_url: Option<Setting>,
    /// `modparam("tcp_mgm", "db_table", ...)`.
    pub db_table: Option<Setting>,
    /// The `socket=` / `listen=` values, by line, UDP and SCTP ones included (the listener
    /// reader skips those).
    pub sockets: Vec<Setting>,
    /// `modparam("tcp_mgm", "<column>_col", ...)`.
    pub columns: ColumnMap,
}

/// The database modules tcpmgm reads, by URL scheme.
const SCHEMES: [&str; 4] = ["sqlite", "mysql", "postgres", "postgresql"];

impl OpenSipsCfg {
    pub fn read(path: &Path) -> Result<OpenSipsCfg, CfgError> {
        let text = std::fs::read_to_string(path).map_err(|e| CfgError {
            path: path.to_path_buf(),
            line: None,
            reason: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<OpenSipsCfg, CfgError> {
        let fail = |line: usize, reason: String| CfgError {
            path: path.to_path_buf(),
            line: Some(line),
            reason,
        };
        let tokens = tokenize(text).map_err(|(line, reason)| fail(line, reason))?;
        let mut cfg = OpenSipsCfg {
            path: path.to_path_buf(),
            ..OpenSipsCfg::default()
        };
        let set = |slot: &mut Option<Setting>, what: &str, value: Setting| match slot {
            Some(first) => Err(fail(
                value.line,
                format!("{what} is set twice (also on line {})", first.line),
            )),
            None => {
                *slot = Some(value);
                Ok(())
            }
        };
        // The line of each `_col` parameter, to name a second setting of it.
        let mut renamed: std::collections::BTreeMap<String, usize> = Default::default();
        let mut i = 0;
        while i < tokens.len() {
            let t = &tokens[i];
            if let Some(w) = included(&t.kind) {
                return Err(fail(
                    t.line,
                    format!(
                        "{w}: tcpmgm does not follow included files; give the table with \
                         --db and --table and the listeners with --listener or \
                         --sockets-from"
                    ),
                ));
            }
            match &t.kind {
                Kind::Word(w) if w == "modparam" => {
                    let (args, next) = call_args(&tokens, i + 1);
                    i = next;
                    let [module, param, value] = args.as_slice() else {
                        continue;
                    };
                    let (Kind::Str(module), Kind::Str(param)) = (&module.kind, &param.kind) else {
                        continue;
                    };
                    let column = param.strip_suffix("_col");
                    if !matches!(param.as_str(), "db_url" | "db_table") && column.is_none() {
                        continue;
                    }
                    if module != "tcp_mgm" {
                        if module.contains("tcp_mgm") {
                            return Err(fail(
                                t.line,
                                format!(
                                    "modparam(\"{module}\", \"{param}\", ...): tcpmgm reads \
                                     modparam(\"tcp_mgm\", ...) only, not module name patterns"
                                ),
                            ));
                        }
                        continue;
                    }
                    let Kind::Str(v) = &value.kind else {
                        return Err(fail(
                            value.line,
                            format!(
                                "modparam(\"tcp_mgm\", \"{param}\", ...): the value is not a \
                                 quoted string (a macro?), which tcpmgm cannot follow; give {}",
                                match param.as_str() {
                                    "db_url" => "--db",
                                    "db_table" => "--table",
                                    _ => "[columns] in tcpmgm's configuration file",
                                }
                            ),
                        ));
                    };
                    if let Some(column) = column {
                        let what = format!("modparam(\"tcp_mgm\", \"{param}\", ...)");
                        if let Some(first) = renamed.insert(param.clone(), value.line) {
                            return Err(fail(
                                value.line,
                                format!("{what} is set twice (also on line {first})"),
                            ));
                        }
                        if column == "direction" {
                            return Err(fail(
                                value.line,
                                format!(
                                    "{what}: the tcp_mgm table has no direction column (OpenSIPS \
                                     applies this parameter to priority), which tcpmgm cannot \
                                     follow; rename priority with priority_col"
                                ),
                            ));
                        }
                        cfg.columns
                            .rename(column, v)
                            .map_err(|e| fail(value.line, format!("{what}: {e}")))?;
                        continue;
                    }
                    let setting = Setting {
                        value: v.clone(),
                        line: value.line,
                    };
                    let what = format!("modparam(\"tcp_mgm\", \"{param}\")");
                    if param == "db_url" {
                        set(&mut cfg.db_url, &what, setting)?;
                    } else {
                        set(&mut cfg.db_table, &what, setting)?;
                    }
                    continue;
                }
                Kind::Word(w) if w == "db_default_url" => {
                    if let Some(eq) = tokens.get(i + 1)
                        && eq.kind == Kind::Punct('=')
                    {
                        match tokens.get(i + 2) {
                            Some(Token {
                                kind: Kind::Str(v),
                                line,
                                ..
                            }) => set(
                                &mut cfg.db_default_url,
                                "db_default_url",
                                Setting {
                                    value: v.clone(),
                                    line: *line,
                                },
                            )?,
                            _ => {
                                return Err(fail(
                                    t.line,
                                    "db_default_url: the value is not a quoted string (a \
                                     macro?), which tcpmgm cannot follow; give --db"
                                        .into(),
                                ));
                            }
                        }
                        i += 3;
                        continue;
                    }
                }
                Kind::Word(w) if w == "socket" || w == "listen" => {
                    if let Some((socket, next)) = socket_value(&tokens, i) {
                        cfg.sockets.push(socket);
                        i = next;
                        continue;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        Ok(cfg)
    }

    /// The `socket=` / `listen=` values of a file and their lines, read as `parse` reads them
    /// (comments of both kinds, and included files refused), and nothing else of it: for
    /// `--sockets-from`, which takes an opensips.cfg or a file of such lines.
    pub fn read_sockets(path: &Path) -> Result<Vec<Setting>, CfgError> {
        let fail = |line: Option<usize>, reason: String| CfgError {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(None, e.to_string()))?;
        let tokens = tokenize(&text).map_err(|(line, reason)| fail(Some(line), reason))?;
        let mut sockets = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            if let Some(w) = included(&tokens[i].kind) {
                return Err(fail(
                    Some(tokens[i].line),
                    format!(
                        "{w}: tcpmgm does not follow included files, whose sockets it \
                         would miss; give --sockets-from a file of socket= lines (or the \
                         included file itself), or the listeners with --listener"
                    ),
                ));
            }
            match &tokens[i].kind {
                Kind::Word(w) if w == "socket" || w == "listen" => {
                    if let Some((socket, next)) = socket_value(&tokens, i) {
                        sockets.push(socket);
                        i = next;
                        continue;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        Ok(sockets)
    }

    /// The rule database URL, as tcpmgm takes it: the module's db_url, else db_default_url.
    pub fn db(&self) -> Result<String, CfgError> {
        let Some(url) = self.db_url.as_ref().or(self.db_default_url.as_ref()) else {
            return Err(CfgError {
                path: self.path.clone(),
                line: None,
                reason: "neither modparam(\"tcp_mgm\", \"db_url\", ...) nor db_default_url is \
                         set; give --db"
                    .into(),
            });
        };
        let fail = |reason: String| CfgError {
            path: self.path.clone(),
            line: Some(url.line),
            reason,
        };
        let scheme = url.value.split(':').next().unwrap_or_default();
        if !url.value.contains("://") || !SCHEMES.contains(&scheme) {
            return Err(fail(format!(
                "database URL with scheme {scheme:?}: tcpmgm reads the tables of db_sqlite \
                 (sqlite:///path), db_mysql (mysql://user:password@host/db) and db_postgres \
                 (postgres://user:password@host/db) only"
            )));
        }
        if url.value.contains("://[") {
            return Err(fail(
                "a mysql://[group]... URL reads credentials from a my.cnf group, which tcpmgm \
                 does not; give --db"
                    .into(),
            ));
        }
        Ok(url.value.clone())
    }

    /// The module's db_table, when set.
    pub fn table(&self) -> Result<Option<TableName>, CfgError> {
        self.db_table
            .as_ref()
            .map(|t| {
                TableName::new(&t.value).map_err(|reason| CfgError {
                    path: self.path.clone(),
                    line: Some(t.line),
                    reason,
                })
            })
            .transpose()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Word(String),
    Str(String),
    Punct(char),
    /// `#!include_file`, `#include_file`, `#!import_file`: what the line says.
    Directive(String),
}

#[derive(Clone, Debug)]
struct Token {
    kind: Kind,
    line: usize,
    /// Whitespace came before it (on the same line).
    spaced: bool,
}

impl Token {
    fn text(&self) -> String {
        match &self.kind {
            Kind::Word(w) | Kind::Directive(w) => w.clone(),
            Kind::Str(s) => format!("\"{s}\""),
            Kind::Punct(c) => c.to_string(),
        }
    }
}

/// The file's tokens, without its comments (`#` to the end of the line, `/* ... */`).
fn tokenize(text: &str) -> Result<Vec<Token>, (usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let (mut i, mut line, mut spaced) = (0, 1, false);
    let word = |c: char| c.is_ascii_alphanumeric() || "_.-/@$*[]".contains(c);
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' => {
                line += 1;
                spaced = false;
                i += 1;
            }
            c if c.is_whitespace() => {
                spaced = true;
                i += 1;
            }
            '#' => {
                let end = chars[i..]
                    .iter()
                    .position(|&c| c == '\n')
                    .map_or(chars.len(), |n| i + n);
                let comment: String = chars[i..end].iter().collect();
                let directive = comment.trim_start_matches(['#', '!']);
                if directive.starts_with("include_file") || directive.starts_with("import_file") {
                    tokens.push(Token {
                        kind: Kind::Directive(comment.trim().to_owned()),
                        line,
                        spaced,
                    });
                }
                i = end;
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                let start = line;
                i += 2;
                loop {
                    match (chars.get(i), chars.get(i + 1)) {
                        (Some('*'), Some('/')) => {
                            i += 2;
                            break;
                        }
                        (Some('\n'), _) => line += 1,
                        (None, _) => return Err((start, "a /* comment is never closed".into())),
                        _ => {}
                    }
                    i += 1;
                }
                spaced = true;
            }
            '"' | '\'' => {
                let (start, quote) = (line, c);
                let mut value = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        Some(&q) if q == quote => break,
                        Some('\\') if chars.get(i + 1).is_some() => {
                            value.push(chars[i + 1]);
                            i += 1;
                        }
                        Some(&ch) => {
                            if ch == '\n' {
                                line += 1;
                            }
                            value.push(ch);
                        }
                        None => return Err((start, "a string is never closed".into())),
                    }
                    i += 1;
                }
                i += 1;
                tokens.push(Token {
                    kind: Kind::Str(value),
                    line: start,
                    spaced,
                });
                spaced = false;
            }
            c if word(c) => {
                let start = i;
                while i < chars.len() && word(chars[i]) {
                    i += 1;
                }
                tokens.push(Token {
                    kind: Kind::Word(chars[start..i].iter().collect()),
                    line,
                    spaced,
                });
                spaced = false;
            }
            c => {
                tokens.push(Token {
                    kind: Kind::Punct(c),
                    line,
                    spaced,
                });
                spaced = false;
                i += 1;
            }
        }
    }
    Ok(tokens)
}

/// The arguments of a call whose `(` is at `open` (each a single token, or the first token of
/// a longer expression), and the index after its `)`.
fn call_args(tokens: &[Token], open: usize) -> (Vec<Token>, usize) {
    if tokens.get(open).map(|t| &t.kind) != Some(&Kind::Punct('(')) {
        return (Vec::new(), open);
    }
    let (mut args, mut depth, mut i, mut fresh) = (Vec::new(), 0, open + 1, true);
    while let Some(t) = tokens.get(i) {
        i += 1;
        match t.kind {
            Kind::Punct('(') => depth += 1,
            Kind::Punct(')') if depth == 0 => break,
            Kind::Punct(')') => depth -= 1,
            Kind::Punct(',') if depth == 0 => {
                fresh = true;
                continue;
            }
            _ => {}
        }
        if fresh {
            args.push(t.clone());
            fresh = false;
        }
    }
    (args, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OpenSipsCfg, CfgError> {
        OpenSipsCfg::parse(Path::new("opensips.cfg"), text)
    }

    #[test]
    fn takes_the_module_settings_and_the_sockets() {
        let cfg = parse(
            r#"
# OpenSIPS residential
log_level = 3
socket = udp:10.0.0.1:5060
socket=tcp:10.0.0.1:5060   # SIP over TCP
socket= tls:10.0.0.1:5061 tag trunks
/* socket=tcp:10.9.9.9:5060
   modparam("tcp_mgm", "db_table", "commented_out") */
loadmodule "tcp_mgm.so"
modparam("tcp_mgm", "db_url",
         "postgres://opensips:s3cr#t@127.0.0.1/opensips")
modparam('tcp_mgm', 'db_table', 'sip_tcp_rules')
modparam("usrloc", "db_url", "mysql://other@host/db")
"#,
        )
        .unwrap();
        assert_eq!(
            cfg.db().unwrap(),
            "postgres://opensips:s3cr#t@127.0.0.1/opensips"
        );
        assert_eq!(cfg.db_url.as_ref().unwrap().line, 11);
        assert_eq!(cfg.table().unwrap().unwrap().as_str(), "sip_tcp_rules");
        let sockets: Vec<(&str, usize)> = cfg
            .sockets
            .iter()
            .map(|s| (s.value.as_str(), s.line))
            .collect();
        assert_eq!(
            sockets,
            [
                ("udp:10.0.0.1:5060", 4),
                ("tcp:10.0.0.1:5060", 5),
                ("tls:10.0.0.1:5061 tag trunks", 6)
            ]
        );
    }

    #[test]
    fn db_default_url_serves_when_the_module_has_none() {
        let cfg = parse("db_default_url=\"sqlite:///var/lib/opensips/rules.db\"\n").unwrap();
        assert_eq!(cfg.db().unwrap(), "sqlite:///var/lib/opensips/rules.db");
        assert_eq!(cfg.table().unwrap(), None);
        let err = parse("socket=tcp:127.0.0.1:5060\n")
            .unwrap()
            .db()
            .unwrap_err();
        assert!(err.to_string().contains("give --db"), "{err}");
    }

    /// `--sockets-from` reads a file's sockets as the configuration reader does: comments of
    /// both kinds left out, values to the end of the line, an included file refused.
    #[test]
    fn a_sockets_file_is_read_as_the_configuration_is() {
        let dir = std::env::temp_dir().join(format!("tcpmgm-sockets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("opensips.cfg");
        let text = "socket=tcp:10.0.0.1:5060 # SIP\n/* socket=tcp:10.9.9.9:5060\nlisten=tls:10.9.9.9:5061 */\nlisten = tls:10.0.0.1:5061 tag trunks\n";
        std::fs::write(&file, text).unwrap();
        let sockets = OpenSipsCfg::read_sockets(&file).unwrap();
        assert_eq!(sockets, parse(text).unwrap().sockets);
        let values: Vec<(&str, usize)> =
            sockets.iter().map(|s| (s.value.as_str(), s.line)).collect();
        assert_eq!(
            values,
            [
                ("tcp:10.0.0.1:5060", 1),
                ("tls:10.0.0.1:5061 tag trunks", 4)
            ]
        );
        for included in [
            "include_file \"more.cfg\"\n",
            "#!import_file \"more.cfg\"\n",
        ] {
            std::fs::write(&file, format!("socket=tcp:10.0.0.1:5060\n{included}")).unwrap();
            let err = OpenSipsCfg::read_sockets(&file).unwrap_err();
            assert_eq!(err.line, Some(2), "{err}");
            assert!(
                err.reason.contains("does not follow included files"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let err = OpenSipsCfg::read_sockets(&dir.join("opensips.cfg")).unwrap_err();
        assert_eq!((err.line, err.path), (None, dir.join("opensips.cfg")));
    }

    #[test]
    fn what_cannot_be_followed_is_named_by_line() {
        let cases = [
            ("log_level=3\ninclude_file \"tcp.cfg\"\n", 2, "include_file"),
            (
                "\n\n#!include_file \"tcp.cfg\"\n",
                3,
                "does not follow included files",
            ),
            (
                "modparam(\"tcp_mgm\", \"db_url\", DBURL)\n",
                1,
                "not a quoted string",
            ),
            (
                "modparam(\"tcp_mgm\", \"db_url\", \"text:///etc/opensips/db\")\n",
                1,
                "scheme \"text\"",
            ),
            (
                "modparam(\"tcp_mgm\", \"db_table\", \"a\")\nmodparam(\"tcp_mgm\", \"db_table\", \"b\")\n",
                2,
                "set twice (also on line 1)",
            ),
            (
                "modparam(\"tcp_mgm\", \"db_table\", \"tcp-rules\")\n",
                1,
                "plain SQL name",
            ),
            (
                "modparam(\"tcp_mgm|usrloc\", \"db_url\", \"mysql://h/d\")\n",
                1,
                "patterns",
            ),
            ("/* never closed\n", 1, "never closed"),
        ];
        for (text, line, says) in cases {
            let err = parse(text)
                .and_then(|c| c.table().and_then(|_| c.db()))
                .expect_err(text);
            assert_eq!(err.line, Some(line), "{text}: {err}");
            assert!(err.to_string().contains(says), "{text}: {err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("opensips.cfg:{line}: "))
            );
        }
    }
}
