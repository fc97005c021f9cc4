//! Reading a session's state back from the server.
//!
//! When the tracker cannot vouch for a session's state (a statement it
//! could not classify, a DROP that may have dropped the last temporary
//! table, an advisory unlock), Reprise asks the server at the session's
//! next idle boundary, with one query of its own whose answer the client
//! never sees, and rebuilds the template from the answer. That is what
//! makes "non-recoverable until the next safe point" hold.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};

use crate::template::{fold_guc_name, PreparedOrigin, PreparedStatement};
use crate::wire::backend as server_msg;
use crate::wire::frame;

/// One query: (kind, name, value, extra) rows, all text. `$1` is the
/// probe's own statement name, `$2` the custom settings (placeholders such
/// as `app.tenant`, which pg_settings does not list) the tracker knows of.
/// Everything is schema-qualified: the session's search_path is the
/// client's to choose.
const PROBE: &str = "\
SELECT 'setting', name, pg_catalog.current_setting(name), NULL FROM pg_catalog.pg_settings \
 WHERE source OPERATOR(pg_catalog.=) 'session' AND name OPERATOR(pg_catalog.<>) ALL \
 ('{role,session_authorization,transaction_isolation,transaction_read_only,transaction_deferrable}'::pg_catalog.text[]) \
UNION ALL SELECT 'custom', n, pg_catalog.current_setting(n, true), NULL \
 FROM pg_catalog.unnest($2::pg_catalog.text[]) n \
 WHERE n OPERATOR(pg_catalog.<>) ALL (ARRAY(SELECT pg_catalog.lower(name) FROM pg_catalog.pg_settings)) \
UNION ALL SELECT 'role', NULL, pg_catalog.current_setting('role'), NULL \
UNION ALL SELECT 'session_user', NULL, session_user::pg_catalog.text, NULL \
UNION ALL SELECT CASE WHEN from_sql THEN 'prepared_sql' ELSE 'prepared_protocol' END, name, \
 statement, pg_catalog.array_to_string(parameter_types::pg_catalog.oid[], ',') \
 FROM pg_catalog.pg_prepared_statements WHERE name OPERATOR(pg_catalog.<>) $1 \
UNION ALL SELECT 'listen', c, NULL, NULL FROM pg_catalog.pg_listening_channels() c \
UNION ALL SELECT 'temp', NULL, ((SELECT pg_catalog.count(*) FROM pg_catalog.pg_class \
 WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
 OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_proc \
 WHERE pronamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
 OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM pg_catalog.pg_type \
 WHERE typnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()))::pg_catalog.text, NULL \
UNION ALL SELECT 'hold_cursor', name, NULL, NULL FROM pg_catalog.pg_cursors WHERE is_holdable \
UNION ALL SELECT 'advisory', NULL, pg_catalog.count(*)::pg_catalog.text, NULL FROM pg_catalog.pg_locks \
 WHERE locktype OPERATOR(pg_catalog.=) 'advisory' AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()";

/// OID of `text[]`, the type of the probe's second parameter.
const TEXT_ARRAY_OID: u32 = 1009;

/// The session state as the server reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerTruth {
    /// Settings whose source is the session.
    pub settings: BTreeMap<Bytes, Bytes>,
    /// Custom settings asked about by name; `None` when the server has
    /// never heard of one.
    pub custom: BTreeMap<Bytes, Option<Bytes>>,
    /// `None` when no role is set.
    pub role: Option<Bytes>,
    pub session_user: Bytes,
    pub prepared: BTreeMap<Bytes, PreparedStatement>,
    pub listening: BTreeSet<Bytes>,
    pub temp_objects: bool,
    pub hold_cursors: BTreeSet<Bytes>,
    pub advisory_locks: bool,
}

/// Writes the probe as an extended-protocol batch under the statement name
/// `name` (one the session does not use): Parse, Bind to the unnamed
/// portal, Execute, Close, Sync. A named statement leaves the client's
/// unnamed one alone, which a simple Query would drop. `custom` are the
/// custom settings to ask about by name.
pub fn write_probe<'a>(
    out: &mut BytesMut,
    name: &[u8],
    custom: impl IntoIterator<Item = &'a [u8]>,
) {
    frame::write_frame(out, Some(b'P'), |body| {
        body.extend_from_slice(name);
        body.extend_from_slice(&[0]);
        body.extend_from_slice(PROBE.as_bytes());
        body.extend_from_slice(&[0, 0, 2, 0, 0, 0, 25]);
        body.extend_from_slice(&TEXT_ARRAY_OID.to_be_bytes());
    });
    let names = text_array(custom);
    frame::write_frame(out, Some(b'B'), |body| {
        body.extend_from_slice(&[0]);
        body.extend_from_slice(name);
        body.extend_from_slice(&[0]);
        // No parameter formats (text), two parameters, no result formats.
        body.extend_from_slice(&[0, 0, 0, 2]);
        for value in [name, &names[..]] {
            let len = i32::try_from(value.len()).unwrap_or(i32::MAX);
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(value);
        }
        body.extend_from_slice(&[0, 0]);
    });
    frame::write_frame(out, Some(b'E'), |body| {
        body.extend_from_slice(&[0, 0, 0, 0, 0]);
    });
    frame::write_frame(out, Some(b'C'), |body| {
        body.extend_from_slice(b"S");
        body.extend_from_slice(name);
        body.extend_from_slice(&[0]);
    });
    frame::write_frame(out, Some(b'S'), |_| {});
}

/// A `text[]` literal: every element double-quoted, with `"` and `\`
/// escaped, so that no name can break out of its element.
fn text_array<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = vec![b'{'];
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        for &byte in item {
            if byte == b'"' || byte == b'\\' {
                out.push(b'\\');
            }
            out.push(byte);
        }
        out.push(b'"');
    }
    out.push(b'}');
    out
}

impl ServerTruth {
    /// Adds one DataRow of the probe's answer; `None` if it is not one.
    pub fn add_row(&mut self, message: &[u8]) -> Option<()> {
        let mut fields = server_msg::data_row_fields(message)?.into_iter();
        let kind = fields.next()??;
        let name = fields.next()?;
        let value = fields.next()?;
        let extra = fields.next()?;
        let text = |field: Option<&[u8]>| field.map(Bytes::copy_from_slice);
        match kind {
            b"setting" => {
                // pg_settings spells some names in mixed case (TimeZone).
                self.settings.insert(fold_guc_name(name?), text(value)?);
            }
            b"custom" => {
                self.custom.insert(text(name)?, text(value));
            }
            b"role" => {
                let role = text(value)?;
                self.role = (role.as_ref() != b"none").then_some(role);
            }
            b"session_user" => self.session_user = text(value)?,
            b"prepared_sql" | b"prepared_protocol" => {
                let protocol = kind == b"prepared_protocol";
                let param_types = if protocol {
                    parse_oids(extra.unwrap_or_default())?
                } else {
                    Vec::new()
                };
                self.prepared.insert(
                    text(name)?,
                    PreparedStatement {
                        origin: if protocol {
                            PreparedOrigin::Protocol
                        } else {
                            PreparedOrigin::Sql
                        },
                        query: text(value)?,
                        param_types,
                    },
                );
            }
            b"listen" => {
                self.listening.insert(text(name)?);
            }
            b"temp" => self.temp_objects = value? != b"0",
            b"hold_cursor" => {
                self.hold_cursors.insert(text(name)?);
            }
            b"advisory" => self.advisory_locks = value? != b"0",
            _ => return None,
        }
        Some(())
    }
}

fn parse_oids(text: &[u8]) -> Option<Vec<u32>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    std::str::from_utf8(text)
        .ok()?
        .split(',')
        .map(|oid| oid.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame::write_frame(&mut out, Some(b'D'), |body| {
            body.extend_from_slice(&(values.len() as u16).to_be_bytes());
            for value in values {
                match value {
                    Some(text) => {
                        body.extend_from_slice(&(text.len() as i32).to_be_bytes());
                        body.extend_from_slice(text.as_bytes());
                    }
                    None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
        });
        out.to_vec()
    }

    #[test]
    fn rows_build_the_truth() {
        let mut truth = ServerTruth::default();
        for values in [
            [Some("setting"), Some("TimeZone"), Some("UTC"), None],
            [Some("role"), None, Some("none"), None],
            [Some("session_user"), None, Some("app"), None],
            [
                Some("prepared_protocol"),
                Some("s1"),
                Some("SELECT $1"),
                Some("23"),
            ],
            [
                Some("prepared_sql"),
                Some("p"),
                Some("PREPARE p AS SELECT 1"),
                Some(""),
            ],
            [Some("listen"), Some("jobs"), None, None],
            [Some("temp"), None, Some("0"), None],
            [Some("custom"), Some("app.tenant"), Some("42"), None],
            [Some("custom"), Some("app.user"), None, None],
            [Some("advisory"), None, Some("2"), None],
        ] {
            truth.add_row(&row(&values)).expect("a probe row");
        }
        assert_eq!(truth.settings[&b"timezone"[..]].as_ref(), b"UTC");
        assert_eq!(truth.role, None);
        assert_eq!(truth.session_user.as_ref(), b"app");
        assert_eq!(truth.prepared[&b"s1"[..]].param_types, vec![23]);
        assert_eq!(truth.prepared[&b"p"[..]].origin, PreparedOrigin::Sql);
        assert!(truth.listening.contains(&b"jobs"[..]));
        assert!(!truth.temp_objects);
        assert!(truth.advisory_locks);
        assert_eq!(
            truth.custom[&b"app.tenant"[..]].as_deref(),
            Some(&b"42"[..])
        );
        assert_eq!(truth.custom[&b"app.user"[..]], None);
        assert_eq!(
            truth.add_row(&row(&[Some("bogus"), None, None, None])),
            None
        );
    }

    #[test]
    fn names_cannot_break_out_of_the_array() {
        assert_eq!(
            text_array([&b"a.b"[..], b"x\"},\\y"]),
            br#"{"a.b","x\"},\\y"}"#.to_vec()
        );
        assert_eq!(text_array(std::iter::empty()), b"{}".to_vec());
    }

    #[test]
    fn the_probe_is_a_whole_extended_batch() {
        let mut out = BytesMut::new();
        write_probe(&mut out, b"reprise.probe", [&b"app.tenant"[..]]);
        let mut tags = Vec::new();
        let mut rest = &out[..];
        while let Ok(frame::Next::Frame { tag, len }) = frame::next(rest, usize::MAX) {
            let kind = crate::wire::frontend::check(&rest[..len]).expect("a valid frame");
            assert!(kind.is_extended() || kind.ends_request());
            tags.push(tag);
            rest = &rest[len..];
        }
        assert!(rest.is_empty());
        assert_eq!(tags, b"PBECS".to_vec());
    }
}
