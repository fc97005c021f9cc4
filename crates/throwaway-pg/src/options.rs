//! Cluster options and how they become configuration files.

use std::fmt::Write as _;

use crate::error::Error;

/// How to configure a throwaway cluster.
///
/// Construct with struct-update syntax so that fields added later keep
/// their defaults:
///
/// ```
/// let options = throwaway_pg::Options {
///     max_connections: 20,
///     ..Default::default()
/// }
/// .setting("password_encryption", "md5");
/// # assert_eq!(options.settings.len(), 1);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// `max_connections`. Default 100.
    pub max_connections: u32,
    /// Extra `postgresql.conf` settings as (name, value) pairs, e.g.
    /// `("password_encryption", "md5")`. They are written after the
    /// crate's own settings, so they can override them (`fsync`, say);
    /// `port`, `listen_addresses` and `unix_socket_directories` are also
    /// passed on the server's command line, which wins.
    pub settings: Vec<(String, String)>,
    /// The full contents of `pg_hba.conf`. `None` (the default) trusts every
    /// local connection: Unix sockets, 127.0.0.1/32 and ::1/128, including
    /// replication connections, which [`Cluster::standby`](crate::Cluster::standby)
    /// needs.
    pub hba: Option<String>,
    /// Files written into the data directory before the server first
    /// starts, as (file name, contents), owned by the server user with mode
    /// 0600: TLS certificates and keys, say. Settings refer to them by bare
    /// name (`("ssl_cert_file", "server.crt")`), as relative paths resolve
    /// against the data directory. Giving contents rather than a path means
    /// the server never has to read the caller's files, which its user may
    /// not be allowed to. A standby gets them too, through its base backup.
    pub data_files: Vec<(String, Vec<u8>)>,
    /// The bootstrap superuser's name. Default `postgres`. Restricted to
    /// ASCII letters, digits and underscores (not leading with a digit) so
    /// it needs no quoting anywhere.
    pub superuser: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_connections: 100,
            settings: Vec::new(),
            hba: None,
            data_files: Vec::new(),
            superuser: String::from("postgres"),
        }
    }
}

/// The `pg_hba.conf` used when [`Options::hba`] is `None`.
pub const DEFAULT_HBA: &str = "\
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 trust
host    all          all   127.0.0.1/32  trust
host    all          all   ::1/128       trust
local   replication  all                 trust
host    replication  all   127.0.0.1/32  trust
host    replication  all   ::1/128       trust
";

impl Options {
    /// Adds one `postgresql.conf` setting; a builder-style shorthand for
    /// pushing onto [`Options::settings`].
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Rejects options that would produce a broken or ambiguous configuration.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.max_connections == 0 {
            return Err(Error::InvalidOptions(
                "max_connections must be at least 1".into(),
            ));
        }
        if !is_identifier(&self.superuser) || self.superuser.len() > 63 {
            return Err(Error::InvalidOptions(format!(
                "superuser {:?} must be 1 to 63 ASCII letters, digits or underscores, not starting with a digit",
                self.superuser
            )));
        }
        for (name, value) in &self.settings {
            if !is_setting_name(name) {
                return Err(Error::InvalidOptions(format!(
                    "invalid setting name {name:?}"
                )));
            }
            if value.contains(['\n', '\r', '\0']) {
                return Err(Error::InvalidOptions(format!(
                    "value of setting {name} contains a line break or NUL"
                )));
            }
        }
        for (name, _) in &self.data_files {
            if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
                return Err(Error::InvalidOptions(format!(
                    "data file name {name:?} must be a plain file name"
                )));
            }
        }
        if self.hba.as_deref().is_some_and(|h| h.contains('\0')) {
            return Err(Error::InvalidOptions("hba contains a NUL byte".into()));
        }
        Ok(())
    }

    /// The `pg_hba.conf` contents, ending in a newline.
    pub(crate) fn hba_contents(&self) -> String {
        let mut hba = self.hba.clone().unwrap_or_else(|| DEFAULT_HBA.to_string());
        if !hba.ends_with('\n') {
            hba.push('\n');
        }
        hba
    }

    /// Lines appended to `postgresql.conf` at creation: speed-oriented
    /// defaults, then `max_connections`, then the caller's settings (later
    /// lines win in `postgresql.conf`).
    pub(crate) fn conf_lines(&self) -> String {
        let mut out = String::new();
        // Durability is pointless for a throwaway cluster and costs a lot of
        // time on slow CI disks.
        for (name, value) in [
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
        ] {
            push_setting(&mut out, name, value);
        }
        push_setting(
            &mut out,
            "max_connections",
            &self.max_connections.to_string(),
        );
        for (name, value) in &self.settings {
            push_setting(&mut out, name, value);
        }
        out
    }
}

/// Appends `name = 'value'` with the value quoted for `postgresql.conf`.
pub(crate) fn push_setting(out: &mut String, name: &str, value: &str) {
    let _ = writeln!(out, "{name} = {}", quote_conf_value(value));
}

/// Quotes a value for `postgresql.conf`: single quotes, with `'` doubled
/// and `\` escaped (the file parser processes backslash escapes). Quoting is
/// accepted for every type, numbers and booleans included.
fn quote_conf_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Setting names may be qualified (`auto_explain.log_min_duration`).
fn is_setting_name(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_identifier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let o = Options::default();
        assert_eq!(o.max_connections, 100);
        assert_eq!(o.superuser, "postgres");
        assert!(o.settings.is_empty());
        assert!(o.hba.is_none());
        assert!(o.validate().is_ok());
        assert!(o
            .hba_contents()
            .contains("host    replication  all   127.0.0.1/32  trust"));
    }

    #[test]
    fn conf_lines_quote_and_order() {
        let o = Options {
            max_connections: 7,
            ..Default::default()
        }
        .setting("password_encryption", "md5")
        .setting("application_name", r"it's a\b");
        let conf = o.conf_lines();
        assert!(conf.starts_with("fsync = 'off'\n"));
        assert!(conf.contains("max_connections = '7'\n"));
        assert!(conf.ends_with("password_encryption = 'md5'\napplication_name = 'it''s a\\\\b'\n"));
    }

    #[test]
    fn rejects_bad_options() {
        let bad = [
            Options {
                max_connections: 0,
                ..Default::default()
            },
            Options {
                superuser: "bad name".into(),
                ..Default::default()
            },
            Options {
                superuser: "1abc".into(),
                ..Default::default()
            },
            Options::default().setting("x; drop", "1"),
            Options::default().setting("work_mem", "1\nfsync=on"),
            Options {
                data_files: vec![("../escape".into(), Vec::new())],
                ..Default::default()
            },
        ];
        for o in bad {
            assert!(
                matches!(o.validate(), Err(Error::InvalidOptions(_))),
                "{o:?}"
            );
        }
        assert!(Options::default()
            .setting("auto_explain.log_min_duration", "0")
            .validate()
            .is_ok());
    }
}
