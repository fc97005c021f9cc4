//! Named session templates ("borrow hooks"): `<dir>/<name>.toml` files,
//! each describing a session state that a client asks for with
//! `SET reprise.template = 'name'`. The format and the semantics are in
//! `templates/README.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use super::attributes::{fold_guc_name, PreparedOrigin, PreparedStatement, Template};
use crate::config::Config;

/// Why a templates directory could not be loaded. Every message names the
/// file (or directory) and, for a bad value, the key.
#[derive(Debug, thiserror::Error)]
pub enum NamedTemplateError {
    #[error("cannot read templates directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read template file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template file {path}: {problem}")]
    FileName { path: PathBuf, problem: String },
    #[error("template file {path}{}: {message}", line.map(|line| format!(", line {line}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("template file {path}: key `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// One template file, validated. Names and values are the bytes the
/// restore plan sends; GUC names are folded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedTemplate {
    /// The file stem, which is what `SET reprise.template` names.
    pub name: String,
    pub path: PathBuf,
    /// GUC values by folded name (see [`fold_guc_name`]).
    pub settings: BTreeMap<Bytes, Bytes>,
    /// The SET ROLE target; `None` means the login user.
    pub role: Option<Bytes>,
    /// LISTEN channels.
    pub listening: BTreeSet<Bytes>,
    /// Statement name → SQL text, created with protocol Parse.
    pub prepared: BTreeMap<Bytes, Bytes>,
}

impl NamedTemplate {
    /// The template a session moves to: its own startup parameters, and
    /// otherwise exactly what the file describes. Session-level SETs,
    /// roles, prepared statements and LISTENs are replaced, not merged, so
    /// the result does not depend on what the session did before.
    pub fn apply_to(&self, base: &Template) -> Template {
        Template {
            startup: base.startup.clone(),
            settings: self.settings.clone(),
            role: self.role.clone(),
            session_authorization: None,
            prepared: self
                .prepared
                .iter()
                .map(|(name, query)| {
                    (
                        name.clone(),
                        PreparedStatement {
                            origin: PreparedOrigin::Protocol,
                            query: query.clone(),
                            param_types: Vec::new(),
                        },
                    )
                })
                .collect(),
            listening: self.listening.clone(),
        }
    }

    /// Validates one file's text; `name` and `path` only label the result
    /// and the errors.
    fn parse(name: &str, path: &Path, text: &str) -> Result<NamedTemplate, NamedTemplateError> {
        let file: TemplateFile =
            toml::from_str(text).map_err(|err| NamedTemplateError::Syntax {
                path: path.to_owned(),
                line: err.span().map(|span| line_of(text, span.start)),
                message: err.message().trim_end().to_owned(),
            })?;
        let invalid = |key: String, problem: String| NamedTemplateError::Invalid {
            path: path.to_owned(),
            key,
            problem,
        };

        let role = match file.role {
            Some(value) => Some(
                string(value)
                    .and_then(|role| identifier(&role, "role name"))
                    .map_err(|problem| invalid("role".to_owned(), problem))?,
            ),
            None => None,
        };

        let mut listening = BTreeSet::new();
        if let Some(value) = file.listen {
            let toml::Value::Array(channels) = value else {
                return Err(invalid(
                    "listen".to_owned(),
                    format!("expected an array of strings, found {}", value.type_str()),
                ));
            };
            for (index, channel) in channels.into_iter().enumerate() {
                let channel = string(channel)
                    .and_then(|channel| identifier(&channel, "channel name"))
                    .map_err(|problem| invalid(format!("listen[{index}]"), problem))?;
                listening.insert(channel);
            }
        }

        let mut settings = BTreeMap::new();
        if let Some(value) = file.settings {
            let mut flat = Vec::new();
            let value = table(value).map_err(|problem| invalid("settings".to_owned(), problem))?;
            flatten_settings(String::new(), value, &mut flat);
            // Folded name → the spelling first seen, to name both keys of
            // a collision.
            let mut spelled: BTreeMap<Bytes, String> = BTreeMap::new();
            for (name, value) in flat {
                let key = key_path("settings", &name);
                check_guc_name(&name).map_err(|problem| invalid(key.clone(), problem))?;
                let folded = fold_guc_name(name.as_bytes());
                if let Some(first) = spelled.get(&folded) {
                    return Err(invalid(
                        key,
                        format!(
                            "names the same setting as `{}` (GUC names ignore case)",
                            key_path("settings", first)
                        ),
                    ));
                }
                let value = guc_value(value).map_err(|problem| invalid(key, problem))?;
                spelled.insert(folded.clone(), name);
                settings.insert(folded, value);
            }
        }

        let mut prepared = BTreeMap::new();
        if let Some(value) = file.prepared {
            for (name, query) in
                table(value).map_err(|problem| invalid("prepared".to_owned(), problem))?
            {
                let key = key_path("prepared", &name);
                let name = identifier(&name, "statement name")
                    .map_err(|problem| invalid(key.clone(), problem))?;
                let query = string(query)
                    .and_then(|query| sql_text(&query))
                    .map_err(|problem| invalid(key, problem))?;
                prepared.insert(name, query);
            }
        }

        Ok(NamedTemplate {
            name: name.to_owned(),
            path: path.to_owned(),
            settings,
            role,
            listening,
            prepared,
        })
    }
}

/// The file's shape. Values stay untyped here so that a type error can
/// name its key; unknown keys are refused, so a typo is not ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    role: Option<toml::Value>,
    listen: Option<toml::Value>,
    settings: Option<toml::Value>,
    prepared: Option<toml::Value>,
}

/// PostgreSQL truncates longer identifiers (NAMEDATALEN - 1 bytes), so a
/// longer role, channel or statement name would not be the one the server
/// keeps.
const MAX_IDENTIFIER_LEN: usize = 63;

/// Settings a template must not carry, with the reason. The role has its
/// own key; transaction characteristics belong to one transaction;
/// client_encoding is the client's choice and decides how the restore plan
/// is quoted.
const FORBIDDEN_SETTINGS: &[(&str, &str)] = &[
    ("role", "use the `role` key"),
    ("session_authorization", "use the `role` key"),
    (
        "transaction_isolation",
        "it belongs to one transaction; use default_transaction_isolation",
    ),
    (
        "transaction_read_only",
        "it belongs to one transaction; use default_transaction_read_only",
    ),
    (
        "transaction_deferrable",
        "it belongs to one transaction; use default_transaction_deferrable",
    ),
    ("client_encoding", "it is the client's choice"),
];

/// Read-only GUCs the server reports; no session can set them. The same
/// names are skipped by the restore plan.
const READ_ONLY_SETTINGS: &[&str] = &[
    "is_superuser",
    "server_version",
    "server_version_num",
    "server_encoding",
    "integer_datetimes",
    "in_hot_standby",
    "lc_collate",
    "lc_ctype",
    "block_size",
    "segment_size",
    "wal_block_size",
    "wal_segment_size",
    "max_function_args",
    "max_identifier_length",
    "max_index_keys",
    "data_checksums",
    "data_directory_mode",
    "debug_assertions",
    "shared_memory_size",
    "shared_memory_size_in_huge_pages",
    "huge_pages_status",
    "ssl_library",
];

/// The 1-based line of a byte offset, for syntax errors.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// `table.name`, with the name quoted when it is not plain.
fn key_path(table: &str, name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'));
    if plain {
        format!("{table}.{name}")
    } else {
        format!("{table}.{name:?}")
    }
}

fn string(value: toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) => Ok(text),
        other => Err(format!("expected a string, found {}", other.type_str())),
    }
}

fn table(value: toml::Value) -> Result<toml::Table, String> {
    match value {
        toml::Value::Table(table) => Ok(table),
        other => Err(format!("expected a table, found {}", other.type_str())),
    }
}

/// A role, channel or statement name, used as written (the restore plan
/// quotes it, so case matters).
fn identifier(name: &str, what: &str) -> Result<Bytes, String> {
    if name.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if name.contains('\0') {
        return Err(format!("the {what} contains a NUL byte"));
    }
    if name.len() > MAX_IDENTIFIER_LEN {
        return Err(format!(
            "the {what} is {} bytes long; PostgreSQL keeps only the first {MAX_IDENTIFIER_LEN}",
            name.len()
        ));
    }
    Ok(Bytes::copy_from_slice(name.as_bytes()))
}

fn sql_text(query: &str) -> Result<Bytes, String> {
    if query.trim().is_empty() {
        return Err("the SQL text is empty".to_owned());
    }
    if query.contains('\0') {
        return Err("the SQL text contains a NUL byte".to_owned());
    }
    Ok(Bytes::copy_from_slice(query.as_bytes()))
}

/// Turns `[settings] myapp.tenant = "x"` (a nested table in TOML) into
/// the GUC name `myapp.tenant`, so dotted names work quoted or not.
fn flatten_settings(prefix: String, table: toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (name, value) in table {
        let name = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::Table(inner) => flatten_settings(name, inner, out),
            value => out.push((name, value)),
        }
    }
}

/// Checks a GUC name as PostgreSQL parses it in SET: `.`-separated parts
/// of ASCII letters, digits, `_` and `$`, none starting with a digit or
/// `$`; then refuses the names a template must not carry.
fn check_guc_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the GUC name is empty".to_owned());
    }
    if name.contains('\0') {
        return Err("the GUC name contains a NUL byte".to_owned());
    }
    let valid_part = |part: &str| {
        let mut bytes = part.bytes();
        matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
    };
    if !name.split('.').all(valid_part) {
        return Err(format!(
            "{name:?} is not a valid GUC name (ASCII letters, digits, `_` and `$`, not starting \
             with a digit or `$`, optionally in `.`-separated parts such as `myapp.tenant`)"
        ));
    }
    let folded = name.to_ascii_lowercase();
    if let Some((_, reason)) = FORBIDDEN_SETTINGS
        .iter()
        .find(|(forbidden, _)| *forbidden == folded)
    {
        return Err(format!("{name:?} cannot be set by a template: {reason}"));
    }
    if READ_ONLY_SETTINGS.contains(&folded.as_str()) {
        return Err(format!("{name:?} is read-only; no session can set it"));
    }
    if folded.starts_with("reprise.") {
        return Err(format!(
            "{name:?} cannot be set by a template: `reprise.` names are Reprise's own commands"
        ));
    }
    if folded.starts_with("_pq_.") {
        return Err(format!(
            "{name:?} cannot be set by a template: `_pq_.` names are protocol options fixed at login"
        ));
    }
    Ok(())
}

/// A GUC value as PostgreSQL spells it: strings as written, integers in
/// decimal, booleans as on/off.
fn guc_value(value: toml::Value) -> Result<Bytes, String> {
    let text = match value {
        toml::Value::String(text) => {
            if text.contains('\0') {
                return Err("the value contains a NUL byte".to_owned());
            }
            text
        }
        toml::Value::Integer(number) => number.to_string(),
        // The server's parse_real refuses NaN, and Rust would write
        // infinity as "inf".
        toml::Value::Float(number) if number.is_finite() => number.to_string(),
        toml::Value::Float(number) => {
            return Err(format!("{number} is not a finite number"));
        }
        toml::Value::Boolean(true) => "on".to_owned(),
        toml::Value::Boolean(false) => "off".to_owned(),
        other => {
            return Err(format!(
                "expected a string, integer, float or boolean, found {}",
                other.type_str()
            ))
        }
    };
    Ok(Bytes::from(text))
}

/// Checks a file stem: it is what clients write in
/// `SET reprise.template = '…'`.
fn template_name(stem: &str) -> Result<(), String> {
    if stem.is_empty() {
        return Err("the template name (the file name before `.toml`) is empty".to_owned());
    }
    if !stem
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(format!(
            "the template name {stem:?} (the file name before `.toml`) may contain only ASCII \
             letters, digits, `_`, `-` and `.`"
        ));
    }
    Ok(())
}

/// The loaded templates by name; cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct NamedTemplates {
    by_name: Arc<BTreeMap<String, Arc<NamedTemplate>>>,
}

impl NamedTemplates {
    pub fn empty() -> Self {
        NamedTemplates::default()
    }

    /// Reads every `*.toml` file in `dir` (not recursively); other files
    /// are ignored. The first bad file, in name order, fails the whole
    /// load, so a reload never applies half a directory.
    pub fn load_dir(dir: &Path) -> Result<NamedTemplates, NamedTemplateError> {
        let read_dir_error = |source| NamedTemplateError::ReadDir {
            path: dir.to_owned(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
            let file_name = entry.map_err(read_dir_error)?.file_name();
            if file_name.as_encoded_bytes().ends_with(b".toml") {
                files.push(file_name);
            }
        }
        files.sort();

        let mut by_name = BTreeMap::new();
        for file_name in files {
            let path = dir.join(&file_name);
            let name = file_name
                .to_str()
                .and_then(|name| name.strip_suffix(".toml"))
                .ok_or_else(|| NamedTemplateError::FileName {
                    path: path.clone(),
                    problem: "the file name is not valid UTF-8".to_owned(),
                })?;
            template_name(name).map_err(|problem| NamedTemplateError::FileName {
                path: path.clone(),
                problem,
            })?;
            let text =
                std::fs::read_to_string(&path).map_err(|source| NamedTemplateError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
            let template = NamedTemplate::parse(name, &path, &text)?;
            by_name.insert(name.to_owned(), Arc::new(template));
        }
        Ok(NamedTemplates {
            by_name: Arc::new(by_name),
        })
    }

    /// Looks a template up by its exact file stem.
    pub fn get(&self, name: &str) -> Option<Arc<NamedTemplate>> {
        self.by_name.get(name).cloned()
    }

    /// Template names in ascending order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The templates of `templates_dir`; none when the key is unset.
pub fn load_named_templates(config: &Config) -> Result<NamedTemplates, NamedTemplateError> {
    match &config.templates_dir {
        Some(dir) => NamedTemplates::load_dir(dir),
        None => Ok(NamedTemplates::empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::RestorePlan;

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    fn examples_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")
    }

    /// A directory holding the given files.
    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    fn load_one(text: &str) -> Result<Arc<NamedTemplate>, NamedTemplateError> {
        let dir = dir_with(&[("t.toml", text)]);
        let templates = NamedTemplates::load_dir(dir.path())?;
        Ok(templates.get("t").expect("loaded"))
    }

    /// The error message for a file `t.toml` holding `text`; it must name
    /// the file and `key`.
    fn error_for(text: &str, key: &str) -> String {
        let message = load_one(text).expect_err(text).to_string();
        assert!(message.contains("t.toml"), "no file name in {message:?}");
        assert!(message.contains(key), "no key {key:?} in {message:?}");
        message
    }

    #[test]
    fn examples_load() {
        let templates = NamedTemplates::load_dir(&examples_dir()).expect("examples load");
        assert_eq!(
            templates.names().collect::<Vec<_>>(),
            ["reporting", "worker"]
        );

        let reporting = templates.get("reporting").expect("reporting");
        assert_eq!(reporting.name, "reporting");
        assert_eq!(reporting.path, examples_dir().join("reporting.toml"));
        assert_eq!(
            reporting
                .settings
                .get(b"default_transaction_read_only".as_slice()),
            Some(&b("on"))
        );
        for name in ["statement_timeout", "search_path", "work_mem"] {
            assert!(reporting.settings.contains_key(name.as_bytes()), "{name}");
        }
        assert!(reporting.prepared.contains_key(b"recent_orders".as_slice()));
        assert_eq!(reporting.role, None);

        let worker = templates.get("worker").expect("worker");
        assert_eq!(
            worker.listening,
            BTreeSet::from([b("jobs"), b("jobs_cancelled")])
        );
        for name in [
            "application_name",
            "lock_timeout",
            "idle_in_transaction_session_timeout",
        ] {
            assert!(worker.settings.contains_key(name.as_bytes()), "{name}");
        }
        let claim = &worker.prepared[b"claim_jobs".as_slice()];
        assert!(claim.ends_with(b"FOR UPDATE SKIP LOCKED"));
    }

    /// The format block of templates/README.md is itself a valid file.
    #[test]
    fn readme_example_loads() {
        let readme = std::fs::read_to_string(examples_dir().join("README.md")).expect("README");
        let (_, rest) = readme.split_once("```toml\n").expect("a toml block");
        let (block, _) = rest.split_once("```").expect("closed");
        let t = load_one(block).expect("README example loads");
        assert_eq!(t.role, Some(b("reporting")));
        assert_eq!(
            t.listening,
            BTreeSet::from([b("jobs"), b("cache_invalidation")])
        );
        assert_eq!(
            t.settings[b"search_path".as_slice()],
            b("reporting, public")
        );
        assert_eq!(t.settings[b"statement_timeout".as_slice()], b("30s"));
        assert!(t.prepared[b"recent_orders".as_slice()].starts_with(b"SELECT"));
    }

    #[test]
    fn values_as_postgresql_spells_them() {
        let t = load_one(
            "[settings]\n\
             TimeZone = 'UTC'\n\
             work_mem = 4096\n\
             seq_page_cost = 1.5\n\
             random_page_cost = 4.0\n\
             enable_seqscan = false\n\
             jit = true\n\
             search_path = ''\n\
             myapp.tenant = 'acme'\n\
             \"other.Key$1\" = 'x'\n",
        )
        .expect("valid");
        let expected: BTreeMap<Bytes, Bytes> = [
            ("timezone", "UTC"),
            ("work_mem", "4096"),
            ("seq_page_cost", "1.5"),
            ("random_page_cost", "4"),
            ("enable_seqscan", "off"),
            ("jit", "on"),
            ("search_path", ""),
            ("myapp.tenant", "acme"),
            ("other.key$1", "x"),
        ]
        .into_iter()
        .map(|(name, value)| (b(name), b(value)))
        .collect();
        assert_eq!(t.settings, expected);
    }

    #[test]
    fn empty_file_is_the_startup_state() {
        let t = load_one("# nothing\n").expect("valid");
        assert!(t.settings.is_empty() && t.prepared.is_empty() && t.listening.is_empty());
        assert_eq!(t.role, None);
    }

    #[test]
    fn unknown_keys() {
        error_for("lisen = ['jobs']\n", "lisen");
        let message = error_for("role = 'a'\n\n[setings]\nx = '1'\n", "setings");
        assert!(message.contains("line 3"), "{message}");
    }

    #[test]
    fn wrong_types() {
        for (text, key, problem) in [
            ("role = 3\n", "`role`", "expected a string, found integer"),
            (
                "listen = 'jobs'\n",
                "`listen`",
                "expected an array of strings",
            ),
            (
                "listen = ['a', 1]\n",
                "`listen[1]`",
                "expected a string, found integer",
            ),
            (
                "settings = 'x'\n",
                "`settings`",
                "expected a table, found string",
            ),
            (
                "prepared = ['x']\n",
                "`prepared`",
                "expected a table, found array",
            ),
            (
                "[settings]\nwork_mem = [1]\n",
                "`settings.work_mem`",
                "found array",
            ),
            (
                "[settings]\nx = 1979-05-27\n",
                "`settings.x`",
                "expected a string, integer, float or boolean, found datetime",
            ),
            (
                "[settings]\nx = nan\n",
                "`settings.x`",
                "not a finite number",
            ),
            (
                "[settings]\nx = -inf\n",
                "`settings.x`",
                "not a finite number",
            ),
            (
                "[prepared]\nq = 1\n",
                "`prepared.q`",
                "expected a string, found integer",
            ),
            (
                "[prepared]\nq.r = 'SELECT 1'\n",
                "`prepared.q`",
                "found table",
            ),
        ] {
            let message = error_for(text, key);
            assert!(message.contains(problem), "{message}");
        }
    }

    #[test]
    fn nul_bytes() {
        for (text, key) in [
            ("role = \"a\\u0000b\"\n", "`role`"),
            ("listen = [\"a\\u0000b\"]\n", "`listen[0]`"),
            ("[settings]\n\"a\\u0000b\" = '1'\n", "settings.\"a\\0b\""),
            ("[settings]\nx = \"a\\u0000b\"\n", "`settings.x`"),
            (
                "[prepared]\n\"a\\u0000b\" = 'SELECT 1'\n",
                "prepared.\"a\\0b\"",
            ),
            ("[prepared]\nq = \"SELECT 1\\u0000\"\n", "`prepared.q`"),
        ] {
            let message = error_for(text, key);
            assert!(message.contains("NUL byte"), "{message}");
        }
    }

    #[test]
    fn empty_names() {
        for (text, key) in [
            ("role = ''\n", "`role`"),
            ("listen = ['jobs', '']\n", "`listen[1]`"),
            ("[settings]\n\"\" = '1'\n", "`settings.\"\"`"),
            ("[prepared]\n\"\" = 'SELECT 1'\n", "`prepared.\"\"`"),
        ] {
            let message = error_for(text, key);
            assert!(message.contains("is empty"), "{message}");
        }
        let message = error_for("[prepared]\nq = ' '\n", "`prepared.q`");
        assert!(message.contains("SQL text is empty"), "{message}");
    }

    #[test]
    fn long_identifiers() {
        let long = "r".repeat(64);
        let message = error_for(&format!("role = '{long}'\n"), "`role`");
        assert!(message.contains("64 bytes"), "{message}");
        load_one(&format!("role = '{}'\n", "r".repeat(63))).expect("63 bytes fit");
        error_for(&format!("listen = ['{long}']\n"), "`listen[0]`");
        error_for(&format!("[prepared]\n{long} = 'SELECT 1'\n"), &long);
    }

    #[test]
    fn invalid_guc_names() {
        for name in [
            "1abc",
            "bad name",
            "a..b",
            "a.",
            ".a",
            "$x",
            "a.1b",
            "caf\u{e9}",
            "a-b",
        ] {
            let message = error_for(&format!("[settings]\n\"{name}\" = '1'\n"), name);
            assert!(message.contains("not a valid GUC name"), "{message}");
        }
        load_one("[settings]\n\"_x$.y_1\" = '1'\n").expect("valid name");
    }

    #[test]
    fn forbidden_settings() {
        for name in [
            "role",
            "Role",
            "session_authorization",
            "transaction_isolation",
            "transaction_read_only",
            "TRANSACTION_DEFERRABLE",
            "client_encoding",
            "reprise.template",
            "Reprise.anything",
            "_pq_.x",
        ] {
            let message = error_for(&format!("[settings]\n\"{name}\" = '1'\n"), name);
            assert!(message.contains("cannot be set by a template"), "{message}");
        }
        let message = error_for("[settings]\nserver_version = '1'\n", "server_version");
        assert!(message.contains("read-only"), "{message}");
        // Nested spelling of a `reprise.` name.
        error_for(
            "[settings.reprise]\ntemplate = 'x'\n",
            "settings.reprise.template",
        );
        // Only the exact names and prefixes are refused.
        load_one(
            "[settings]\ndefault_transaction_read_only = true\nrolex = '1'\nmyreprise.x = '1'\n",
        )
        .expect("valid");
    }

    #[test]
    fn fold_collisions() {
        let message = error_for(
            "[settings]\nsearch_path = 'a'\nSearch_Path = 'b'\n",
            "Search_Path",
        );
        assert!(message.contains("settings.search_path"), "{message}");
        assert!(message.contains("ignore case"), "{message}");
        // A quoted dotted name and a nested one are one setting.
        let message = error_for(
            "[settings]\n\"myapp.tenant\" = 'a'\nmyapp.Tenant = 'b'\n",
            "myapp.tenant",
        );
        assert!(message.contains("ignore case"), "{message}");
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let message = load_one("role = 'a'\nlisten = [\n")
            .expect_err("unclosed")
            .to_string();
        assert!(
            message.contains("t.toml") && message.contains("line"),
            "{message}"
        );
        let message = load_one("role = 'a'\nrole = 'b'\n")
            .expect_err("duplicate")
            .to_string();
        assert!(
            message.contains("t.toml") && message.contains("role"),
            "{message}"
        );
    }

    #[test]
    fn bad_file_names() {
        for file in ["bad name.toml", "caf\u{e9}.toml", "a+b.toml", ".toml"] {
            let dir = dir_with(&[("good.toml", ""), (file, "")]);
            let message = NamedTemplates::load_dir(dir.path())
                .expect_err(file)
                .to_string();
            assert!(message.contains(file), "{message}");
            assert!(message.contains("template name"), "{message}");
        }
        let dir = dir_with(&[("v1.2-beta_X.toml", "")]);
        let templates = NamedTemplates::load_dir(dir.path()).expect("valid name");
        assert!(templates.get("v1.2-beta_X").is_some());
        assert!(templates.get("v1.2-beta_x").is_none(), "lookup is exact");
    }

    #[test]
    fn io_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("no-such-dir");
        let message = NamedTemplates::load_dir(&missing)
            .expect_err("missing")
            .to_string();
        assert!(message.contains("no-such-dir"), "{message}");
        assert!(message.contains("templates directory"), "{message}");

        // A directory whose name ends in .toml cannot be read as a file.
        std::fs::create_dir(dir.path().join("odd.toml")).expect("mkdir");
        let message = NamedTemplates::load_dir(dir.path())
            .expect_err("directory")
            .to_string();
        assert!(message.contains("odd.toml"), "{message}");
        assert!(message.contains("cannot read template file"), "{message}");
    }

    #[test]
    fn other_files_are_ignored() {
        let dir = dir_with(&[
            ("a.toml", "role = 'a'\n"),
            ("README.md", "# not toml = at all ["),
            ("notes.txt", "]]"),
            ("a.toml.bak", "]]"),
            ("b.TOML", "]]"),
            ("c.toml~", "]]"),
        ]);
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/x.toml"), "]]").expect("write");
        let templates = NamedTemplates::load_dir(dir.path()).expect("loads");
        assert_eq!(templates.names().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn collection() {
        let empty = NamedTemplates::empty();
        assert_eq!(empty.len(), 0);
        assert!(empty.is_empty() && empty.get("a").is_none());

        let dir = dir_with(&[("b.toml", ""), ("a.toml", "")]);
        let templates = NamedTemplates::load_dir(dir.path()).expect("loads");
        assert_eq!(templates.len(), 2);
        assert!(!templates.is_empty());
        assert_eq!(templates.names().collect::<Vec<_>>(), ["a", "b"]);
        let copy = templates.clone();
        let (Some(one), Some(two)) = (templates.get("a"), copy.get("a")) else {
            panic!("a is loaded");
        };
        assert!(Arc::ptr_eq(&one, &two), "clones share the templates");
        assert!(templates.get("A").is_none());
        assert!(templates.get("a.toml").is_none());
    }

    #[test]
    fn config_key() {
        let mut config = Config::default();
        assert!(load_named_templates(&config).expect("unset").is_empty());
        config.templates_dir = Some(examples_dir());
        assert_eq!(load_named_templates(&config).expect("examples").len(), 2);
        config.templates_dir = Some(examples_dir().join("missing"));
        assert!(load_named_templates(&config).is_err());
    }

    fn base() -> Template {
        let mut t = Template::default();
        t.startup.insert(b("user"), b("app"));
        t.startup.insert(b("database"), b("shop"));
        t.startup.insert(b("application_name"), b("psql"));
        t.set_setting(b"search_path", b("mine"));
        t.set_setting(b"DateStyle", b("ISO, DMY"));
        t.role = Some(b("admin"));
        t.session_authorization = Some(b("bob"));
        t.prepared.insert(
            b("mine"),
            PreparedStatement {
                origin: PreparedOrigin::Sql,
                query: b("PREPARE mine AS SELECT 1"),
                param_types: vec![],
            },
        );
        t.listening.insert(b("mine"));
        t
    }

    #[test]
    fn apply_to_replaces_everything_but_startup() {
        let named = load_one(
            "role = 'reporting'\nlisten = ['jobs']\n\
             [settings]\nsearch_path = 'reporting'\nwork_mem = '64MB'\n\
             [prepared]\nq = 'SELECT $1::int'\n",
        )
        .expect("valid");
        let base = base();
        let result = named.apply_to(&base);
        let expected = Template {
            startup: base.startup.clone(),
            settings: BTreeMap::from([
                (b("search_path"), b("reporting")),
                (b("work_mem"), b("64MB")),
            ]),
            role: Some(b("reporting")),
            session_authorization: None,
            prepared: BTreeMap::from([(
                b("q"),
                PreparedStatement {
                    origin: PreparedOrigin::Protocol,
                    query: b("SELECT $1::int"),
                    param_types: vec![],
                },
            )]),
            listening: BTreeSet::from([b("jobs")]),
        };
        assert_eq!(result, expected);
        // The result does not depend on what the session did before.
        let fresh = Template {
            startup: base.startup.clone(),
            ..Template::default()
        };
        assert_eq!(named.apply_to(&fresh), expected);

        let empty = load_one("").expect("valid");
        assert_eq!(empty.apply_to(&base), fresh);
    }

    #[test]
    fn apply_to_has_a_restore_plan() {
        let templates = NamedTemplates::load_dir(&examples_dir()).expect("examples");
        let worker = templates.get("worker").expect("worker");
        let base = base();
        let plan = RestorePlan::between(&base, &worker.apply_to(&base)).expect("plan");
        let sql = String::from_utf8_lossy(&plan.sql_batch()).into_owned();
        for expected in [
            "RESET SESSION AUTHORIZATION",
            "RESET ROLE",
            "set_config(E'lock_timeout', E'5s', false)",
            "RESET \"search_path\"",
            "RESET \"datestyle\"",
            "DEALLOCATE \"mine\"",
            "UNLISTEN \"mine\"",
            "LISTEN \"jobs\"",
        ] {
            assert!(sql.contains(expected), "{expected:?} missing from {sql}");
        }
        let parses: Vec<&Bytes> = plan.parse_steps().map(|step| step.name).collect();
        assert_eq!(parses, [&b("claim_jobs")]);
    }
}
