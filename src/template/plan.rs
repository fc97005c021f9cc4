//! Restore plans: the commands that move a server connection from one
//! template to another, so a session can be attached to any connection
//! that shares its startup parameters.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};

use super::attributes::{fold_guc_name, PreparedOrigin, PreparedStatement, Template};

/// One command of a restore plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreStep {
    /// A simple-protocol SQL statement, with every name and value already
    /// quoted.
    Sql(Bytes),
    /// A protocol Parse of a named statement that the client created with
    /// Parse: PREPARE cannot give it the same parameter types in every case.
    Parse {
        name: Bytes,
        query: Bytes,
        param_types: Vec<u32>,
    },
}

/// Why no plan can turn one template into another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A startup parameter the server fixes at login (or one whose startup
    /// value no command can take back) differs.
    #[error("startup parameter {:?} differs ({:?} vs {:?}); only a new connection can change it", String::from_utf8_lossy(.name), .from.as_deref().map(String::from_utf8_lossy), .to.as_deref().map(String::from_utf8_lossy))]
    StartupDiffers {
        name: Bytes,
        from: Option<Bytes>,
        to: Option<Bytes>,
    },
    /// PostgreSQL cannot carry a NUL byte in a name or value.
    #[error("{what} contains a NUL byte")]
    NulByte { what: &'static str },
    /// The connection's client encoding can hide a backslash inside a
    /// multibyte character, so no byte-wise quoting is safe in it.
    #[error("client encoding {:?} is not safe for quoted SQL", String::from_utf8_lossy(.encoding))]
    UnsafeClientEncoding { encoding: Bytes },
}

/// The steps that bring a server connection from one template to another.
///
/// All [`RestoreStep::Sql`] steps come before all [`RestoreStep::Parse`]
/// steps, so running [`RestorePlan::sql_batch`] and then the Parse steps in
/// order is the same as running the steps in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestorePlan {
    pub steps: Vec<RestoreStep>,
}

/// Startup parameters the server fixes at login: no command changes them,
/// and it matches them case-sensitively.
const FIXED_STARTUP: &[&[u8]] = &[b"user", b"database", b"options", b"replication"];

/// Settings a plan never sets through `set_config`:
/// - `role` and `session_authorization` are the template's role fields,
///   restored with SET ROLE / SET SESSION AUTHORIZATION;
/// - `transaction_*` belong to the current transaction, which replay
///   rebuilds;
/// - the rest are read-only (reported by the server, never settable).
const SKIPPED_SETTINGS: &[&[u8]] = &[
    b"role",
    b"session_authorization",
    b"is_superuser",
    b"server_version",
    b"server_version_num",
    b"server_encoding",
    b"integer_datetimes",
    b"in_hot_standby",
    b"lc_collate",
    b"lc_ctype",
    b"block_size",
    b"segment_size",
    b"wal_block_size",
    b"wal_segment_size",
    b"max_function_args",
    b"max_identifier_length",
    b"max_index_keys",
    b"data_checksums",
    b"data_directory_mode",
    b"debug_assertions",
    b"shared_memory_size",
    b"shared_memory_size_in_huge_pages",
    b"huge_pages_status",
    b"ssl_library",
];

/// Client-only encodings whose multibyte characters may end in 0x5C: the
/// server would read a doubled backslash as part of the character plus an
/// escape, and a quote could be escaped away. Names are normalised as
/// PostgreSQL does (lower case, only letters and digits).
const UNSAFE_ENCODINGS: &[&[u8]] = &[
    b"big5",
    b"gb18030",
    b"gbk",
    b"johab",
    b"mskanji",
    b"shiftjis",
    b"shiftjis2004",
    b"sjis",
    b"uhc",
    b"win936",
    b"win949",
    b"win950",
    b"windows936",
    b"windows949",
    b"windows950",
];

fn skipped_setting(name: &[u8]) -> bool {
    name.starts_with(b"transaction_") || SKIPPED_SETTINGS.contains(&name)
}

/// Protocol options (`_pq_.*`) are negotiated at login, like the fixed
/// parameters.
fn fixed_startup(name: &[u8]) -> bool {
    FIXED_STARTUP.contains(&name) || name.starts_with(b"_pq_.")
}

/// The startup parameters that are ordinary GUCs, by folded name.
fn startup_gucs(template: &Template) -> BTreeMap<Bytes, Bytes> {
    template
        .startup
        .iter()
        .filter(|(name, _)| !fixed_startup(name))
        .map(|(name, value)| (fold_guc_name(name), value.clone()))
        .collect()
}

/// Rejects a plan whose SQL the `from` connection would decode unsafely.
fn check_encoding(from: &Template, startup: &BTreeMap<Bytes, Bytes>) -> Result<(), PlanError> {
    let Some(encoding) = from
        .settings
        .get(b"client_encoding".as_slice())
        .or_else(|| startup.get(b"client_encoding".as_slice()))
    else {
        return Ok(());
    };
    let normalised: Vec<u8> = encoding
        .iter()
        .filter(|b| b.is_ascii_alphanumeric())
        .map(u8::to_ascii_lowercase)
        .collect();
    if UNSAFE_ENCODINGS.contains(&normalised.as_slice()) {
        return Err(PlanError::UnsafeClientEncoding {
            encoding: encoding.clone(),
        });
    }
    Ok(())
}

impl RestorePlan {
    /// The steps that turn a connection whose state is `from` into `to`.
    ///
    /// Order: session authorization (it also resets the role), role
    /// (settings may need its privileges), settings, DEALLOCATE, LISTEN /
    /// UNLISTEN, then PREPARE and Parse last so they resolve names with the
    /// target's search_path and role.
    pub fn between(from: &Template, to: &Template) -> Result<RestorePlan, PlanError> {
        for name in from.startup.keys().chain(to.startup.keys()) {
            if fixed_startup(name) && from.startup.get(name) != to.startup.get(name) {
                return Err(PlanError::StartupDiffers {
                    name: name.clone(),
                    from: from.startup.get(name).cloned(),
                    to: to.startup.get(name).cloned(),
                });
            }
        }
        let from_startup = startup_gucs(from);
        let to_startup = startup_gucs(to);
        check_encoding(from, &from_startup)?;

        let mut steps = Vec::new();
        let mut sql = |text: Vec<u8>| steps.push(RestoreStep::Sql(Bytes::from(text)));

        let authorization_changed = from.session_authorization != to.session_authorization;
        if authorization_changed {
            sql(match &to.session_authorization {
                Some(user) => [
                    b"SET SESSION AUTHORIZATION ".as_slice(),
                    &quote_identifier(user)?,
                ]
                .concat(),
                None => b"RESET SESSION AUTHORIZATION".to_vec(),
            });
        }
        if authorization_changed || from.role != to.role {
            match &to.role {
                Some(role) => sql([b"SET ROLE ".as_slice(), &quote_identifier(role)?].concat()),
                // After a new session authorization there is no role left
                // to reset unless one was set before.
                None if from.role.is_some() => sql(b"RESET ROLE".to_vec()),
                None => {}
            }
        }

        let names: std::collections::BTreeSet<&Bytes> = from
            .settings
            .keys()
            .chain(to.settings.keys())
            .chain(from_startup.keys())
            .chain(to_startup.keys())
            .collect();
        for name in names {
            if skipped_setting(name) {
                continue;
            }
            let current = from.settings.get(name).or_else(|| from_startup.get(name));
            let wanted = to.settings.get(name).or_else(|| to_startup.get(name));
            if current == wanted {
                continue;
            }
            // RESET goes back to the connection's startup value, which is
            // right only when that is the value wanted.
            let reset_value = from_startup.get(name);
            match wanted {
                Some(value) if reset_value != Some(value) => sql([
                    b"SELECT pg_catalog.set_config(".as_slice(),
                    &quote_literal(name)?,
                    b", ",
                    &quote_literal(value)?,
                    b", false)",
                ]
                .concat()),
                Some(_) => sql([b"RESET ".as_slice(), &quote_identifier(name)?].concat()),
                None if reset_value.is_none() => {
                    sql([b"RESET ".as_slice(), &quote_identifier(name)?].concat())
                }
                // The connection was started with a value and the target
                // has the server default, which no command names.
                None => {
                    return Err(PlanError::StartupDiffers {
                        name: name.clone(),
                        from: reset_value.cloned(),
                        to: None,
                    })
                }
            }
        }

        let stale: Vec<&Bytes> = from
            .prepared
            .iter()
            .filter(|(name, statement)| to.prepared.get(*name) != Some(*statement))
            .map(|(name, _)| name)
            .collect();
        if to.prepared.is_empty() && stale.len() > 1 {
            sql(b"DEALLOCATE ALL".to_vec());
        } else {
            for name in &stale {
                sql([b"DEALLOCATE ".as_slice(), &quote_identifier(name)?].concat());
            }
        }

        let unlisten: Vec<&Bytes> = from.listening.difference(&to.listening).collect();
        if to.listening.is_empty() && unlisten.len() > 1 {
            sql(b"UNLISTEN *".to_vec());
        } else {
            for channel in unlisten {
                sql([b"UNLISTEN ".as_slice(), &quote_identifier(channel)?].concat());
            }
        }
        for channel in to.listening.difference(&from.listening) {
            sql([b"LISTEN ".as_slice(), &quote_identifier(channel)?].concat());
        }

        let fresh: Vec<(&Bytes, &PreparedStatement)> = to
            .prepared
            .iter()
            .filter(|(name, statement)| from.prepared.get(*name) != Some(*statement))
            .collect();
        for (_, statement) in &fresh {
            if statement.origin == PreparedOrigin::Sql {
                // The whole PREPARE as the client sent it: its text already
                // was valid SQL naming this statement.
                if statement.query.contains(&0) {
                    return Err(PlanError::NulByte { what: "PREPARE" });
                }
                sql(statement.query.to_vec());
            }
        }
        for (name, statement) in fresh {
            if statement.origin == PreparedOrigin::Protocol {
                steps.push(RestoreStep::Parse {
                    name: name.clone(),
                    query: statement.query.clone(),
                    param_types: statement.param_types.clone(),
                });
            }
        }
        Ok(RestorePlan { steps })
    }

    /// The Sql steps as one simple query, separated by ";\n". Empty when
    /// there are none.
    pub fn sql_batch(&self) -> Bytes {
        let mut out = BytesMut::new();
        for step in &self.steps {
            if let RestoreStep::Sql(text) = step {
                if !out.is_empty() {
                    out.put_slice(b";\n");
                }
                out.put_slice(text);
            }
        }
        out.freeze()
    }

    /// The Parse steps, in order, to send after [`RestorePlan::sql_batch`].
    pub fn parse_steps(&self) -> impl Iterator<Item = ParseStep<'_>> {
        self.steps.iter().filter_map(|step| match step {
            RestoreStep::Parse {
                name,
                query,
                param_types,
            } => Some(ParseStep {
                name,
                query,
                param_types,
            }),
            RestoreStep::Sql(_) => None,
        })
    }
}

/// A protocol Parse of a restore plan.
#[derive(Clone, Copy, Debug)]
pub struct ParseStep<'a> {
    pub name: &'a Bytes,
    pub query: &'a Bytes,
    pub param_types: &'a [u32],
}

/// A double-quoted identifier with embedded `"` doubled, so any bytes name
/// exactly one object and keep their case.
pub fn quote_identifier(name: &[u8]) -> Result<Bytes, PlanError> {
    if name.contains(&0) {
        return Err(PlanError::NulByte { what: "identifier" });
    }
    let mut out = Vec::with_capacity(name.len() + 2);
    out.push(b'"');
    for &byte in name {
        if byte == b'"' {
            out.push(b'"');
        }
        out.push(byte);
    }
    out.push(b'"');
    Ok(Bytes::from(out))
}

/// An escape-string literal (`E'…'`): `'` doubled and `\` escaped, read the
/// same whatever `standard_conforming_strings` says.
pub fn quote_literal(value: &[u8]) -> Result<Bytes, PlanError> {
    if value.contains(&0) {
        return Err(PlanError::NulByte { what: "literal" });
    }
    let mut out = Vec::with_capacity(value.len() + 3);
    out.extend_from_slice(b"E'");
    for &byte in value {
        match byte {
            b'\'' => out.extend_from_slice(b"''"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            byte => out.push(byte),
        }
    }
    out.push(b'\'');
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    fn sql_steps(plan: &RestorePlan) -> Vec<String> {
        plan.steps
            .iter()
            .filter_map(|step| match step {
                RestoreStep::Sql(text) => Some(String::from_utf8_lossy(text).into_owned()),
                RestoreStep::Parse { .. } => None,
            })
            .collect()
    }

    fn plan(from: &Template, to: &Template) -> RestorePlan {
        RestorePlan::between(from, to).expect("plan")
    }

    fn sql_statement(text: &str) -> PreparedStatement {
        PreparedStatement {
            origin: PreparedOrigin::Sql,
            query: b(text),
            param_types: vec![],
        }
    }

    fn parse_statement(text: &str, types: &[u32]) -> PreparedStatement {
        PreparedStatement {
            origin: PreparedOrigin::Protocol,
            query: b(text),
            param_types: types.to_vec(),
        }
    }

    fn rich() -> Template {
        let mut t = Template::default();
        t.startup.insert(b("user"), b("app"));
        t.startup.insert(b("database"), b("db"));
        t.settings.insert(b("search_path"), b("\"$user\", public"));
        t.role = Some(b("r"));
        t.prepared
            .insert(b("s"), sql_statement("PREPARE s AS select 1"));
        t.listening.insert(b("c"));
        t
    }

    #[test]
    fn equal_templates_need_no_steps() {
        assert_eq!(plan(&Template::default(), &Template::default()).steps, []);
        assert_eq!(plan(&rich(), &rich()).steps, []);
        assert_eq!(plan(&rich(), &rich()).sql_batch(), Bytes::new());
    }

    #[test]
    fn quoting_makes_hostile_text_inert() {
        assert_eq!(
            quote_literal(b"'); drop table x; --").expect("quote"),
            b("E'''); drop table x; --'")
        );
        assert_eq!(quote_literal(b"it's").expect("quote"), b("E'it''s'"));
        assert_eq!(
            quote_literal(b"a\\'b\\").expect("quote"),
            b("E'a\\\\''b\\\\'")
        );
        assert_eq!(quote_literal(b"").expect("quote"), b("E''"));
        assert_eq!(
            quote_identifier(b"x\"; drop table y; --").expect("quote"),
            b("\"x\"\"; drop table y; --\"")
        );
        assert_eq!(
            quote_identifier(b"Mixed Case").expect("quote"),
            b("\"Mixed Case\"")
        );
        assert_eq!(
            quote_identifier(b"a\0b"),
            Err(PlanError::NulByte { what: "identifier" })
        );
        assert_eq!(
            quote_literal(b"a\0b"),
            Err(PlanError::NulByte { what: "literal" })
        );
    }

    #[test]
    fn hostile_names_and_values_in_a_plan() {
        let mut to = Template::default();
        to.settings
            .insert(b("application_name"), b("'); drop table x; --"));
        to.role = Some(b("r\"; drop role x; --"));
        to.listening.insert(b("ch'\""));
        to.prepared
            .insert(b("p\"1"), parse_statement("select 1", &[23]));
        assert_eq!(
            sql_steps(&plan(&Template::default(), &to)),
            [
                "SET ROLE \"r\"\"; drop role x; --\"",
                "SELECT pg_catalog.set_config(E'application_name', E'''); drop table x; --', false)",
                "LISTEN \"ch'\"\"\"",
            ]
        );
    }

    #[test]
    fn authorization_then_role_then_settings() {
        let mut from = Template {
            role: Some(b("old")),
            ..Template::default()
        };
        from.settings.insert(b("work_mem"), b("64kB"));
        from.settings.insert(b("search_path"), b("a"));
        let mut to = Template {
            session_authorization: Some(b("alice")),
            role: Some(b("old")),
            ..Template::default()
        };
        to.settings.insert(b("search_path"), b("\"$user\", public"));
        to.settings.insert(b("statement_timeout"), b("5s"));
        assert_eq!(
            sql_steps(&plan(&from, &to)),
            [
                "SET SESSION AUTHORIZATION \"alice\"",
                // Re-set: the new authorization dropped it.
                "SET ROLE \"old\"",
                "SELECT pg_catalog.set_config(E'search_path', E'\"$user\", public', false)",
                "SELECT pg_catalog.set_config(E'statement_timeout', E'5s', false)",
                "RESET \"work_mem\"",
            ]
        );
        assert_eq!(
            sql_steps(&plan(&to, &Template::default())),
            [
                "RESET SESSION AUTHORIZATION",
                "RESET ROLE",
                "RESET \"search_path\"",
                "RESET \"statement_timeout\"",
            ]
        );
    }

    #[test]
    fn skipped_settings_are_left_alone() {
        let mut to = Template::default();
        for name in [
            "role",
            "session_authorization",
            "transaction_isolation",
            "is_superuser",
        ] {
            to.settings.insert(b(name), b("x"));
        }
        to.settings.insert(b("server_version"), b("17"));
        assert_eq!(plan(&Template::default(), &to).steps, []);
    }

    #[test]
    fn changed_statements_are_deallocated_before_reprepare() {
        let mut from = Template::default();
        from.prepared
            .insert(b("a"), sql_statement("PREPARE a AS select 1"));
        from.prepared
            .insert(b("gone"), sql_statement("PREPARE gone AS select 2"));
        from.prepared
            .insert(b("p"), parse_statement("select $1", &[23]));
        from.listening.insert(b("x"));
        let mut to = Template::default();
        to.prepared
            .insert(b("a"), sql_statement("PREPARE a AS select 3"));
        // Same text, other types: must be re-sent.
        to.prepared
            .insert(b("p"), parse_statement("select $1", &[25]));
        to.prepared
            .insert(b("new"), parse_statement("select 4", &[]));
        to.listening.insert(b("y"));
        let result = plan(&from, &to);
        assert_eq!(
            result.steps,
            [
                RestoreStep::Sql(b("DEALLOCATE \"a\"")),
                RestoreStep::Sql(b("DEALLOCATE \"gone\"")),
                RestoreStep::Sql(b("DEALLOCATE \"p\"")),
                RestoreStep::Sql(b("UNLISTEN \"x\"")),
                RestoreStep::Sql(b("LISTEN \"y\"")),
                RestoreStep::Sql(b("PREPARE a AS select 3")),
                RestoreStep::Parse {
                    name: b("new"),
                    query: b("select 4"),
                    param_types: vec![],
                },
                RestoreStep::Parse {
                    name: b("p"),
                    query: b("select $1"),
                    param_types: vec![25],
                },
            ]
        );
        assert_eq!(
            result.sql_batch(),
            b("DEALLOCATE \"a\";\nDEALLOCATE \"gone\";\nDEALLOCATE \"p\";\nUNLISTEN \"x\";\nLISTEN \"y\";\nPREPARE a AS select 3")
        );
        assert_eq!(result.parse_steps().count(), 2);
    }

    #[test]
    fn emptying_everything_uses_the_short_forms() {
        let mut from = rich();
        from.prepared
            .insert(b("t"), parse_statement("select 2", &[]));
        from.listening.insert(b("d"));
        let to = Template {
            startup: from.startup.clone(),
            ..Template::default()
        };
        assert_eq!(
            sql_steps(&plan(&from, &to)),
            [
                "RESET ROLE",
                "RESET \"search_path\"",
                "DEALLOCATE ALL",
                "UNLISTEN *"
            ]
        );
    }

    #[test]
    fn fixed_startup_parameters_cannot_change() {
        for name in ["user", "database", "options", "replication"] {
            let mut to = rich();
            to.startup.insert(b(name), b("other"));
            match RestorePlan::between(&rich(), &to) {
                Err(PlanError::StartupDiffers { name: found, .. }) => assert_eq!(found, b(name)),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn startup_gucs_are_set_like_settings() {
        let mut from = Template::default();
        from.startup.insert(b("application_name"), b("a"));
        from.startup.insert(b("DateStyle"), b("ISO, MDY"));
        let mut to = Template::default();
        to.startup.insert(b("application_name"), b("b"));
        to.startup.insert(b("DateStyle"), b("ISO, MDY"));
        assert_eq!(
            sql_steps(&plan(&from, &to)),
            ["SELECT pg_catalog.set_config(E'application_name', E'b', false)"]
        );

        // A session SET back to the startup value is a RESET.
        let mut from_set = from.clone();
        from_set.settings.insert(b("datestyle"), b("German, DMY"));
        let mut back = from.clone();
        back.settings.insert(b("application_name"), b("a"));
        assert_eq!(sql_steps(&plan(&from_set, &back)), ["RESET \"datestyle\""]);

        // The server default cannot be named once a startup value is in.
        let mut bare = Template::default();
        bare.startup.insert(b("DateStyle"), b("ISO, MDY"));
        assert!(matches!(
            RestorePlan::between(&from, &bare),
            Err(PlanError::StartupDiffers { .. })
        ));
    }

    #[test]
    fn unsafe_client_encodings_are_refused() {
        let mut from = Template::default();
        from.settings.insert(b("client_encoding"), b("SJIS"));
        let mut to = Template::default();
        to.settings.insert(b("application_name"), b("x"));
        assert!(matches!(
            RestorePlan::between(&from, &to),
            Err(PlanError::UnsafeClientEncoding { .. })
        ));
        from.settings.insert(b("client_encoding"), b("UTF8"));
        assert!(RestorePlan::between(&from, &to).is_ok());
    }
}
