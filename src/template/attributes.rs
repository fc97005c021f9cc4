//! The template attributes: the part of a session's state that a fresh
//! server connection can be given by a restore plan (startup packet, SET,
//! SET ROLE, PREPARE/Parse, LISTEN).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::codec::{DecodeError, Reader, Sink};
use super::id::TemplateId;

/// Version byte that starts a template's canonical encoding. Changing the
/// layout changes every template id, so it gets a new version.
const TEMPLATE_VERSION: u8 = 1;

// Section tags, in encoding order.
const STARTUP: u8 = b'S';
const SETTINGS: u8 = b'G';
const ROLE: u8 = b'R';
const SESSION_AUTHORIZATION: u8 = b'A';
const PREPARED: u8 = b'P';
const LISTENING: u8 = b'L';

/// The restorable state of a session. Sessions with equal templates share
/// one copy in the [`Registry`](super::Registry).
///
/// Names and values are raw bytes in the session's encoding, exactly as the
/// client sent them or the server reported them: PostgreSQL compares them
/// as bytes, and a lossy conversion to `String` could merge two templates.
///
/// A template never holds a password: the startup packet carries none
/// (passwords travel in later authentication messages, which are not
/// session state) and SET ROLE / SET SESSION AUTHORIZATION take none.
/// Templates are journaled and shown by id, so keep it that way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Template {
    /// Startup packet parameters that shape the session: user, database,
    /// application_name, client_encoding, options and any other GUC the
    /// client sent. Names are kept as sent: the server matches `user`,
    /// `database`, `options` and `replication` case-sensitively.
    pub startup: BTreeMap<Bytes, Bytes>,
    /// GUC values set during the session (SET, set_config, ParameterStatus),
    /// by lower-case name (see [`fold_guc_name`]).
    pub settings: BTreeMap<Bytes, Bytes>,
    /// The role chosen by SET ROLE; `None` after RESET ROLE or SET ROLE NONE.
    pub role: Option<Bytes>,
    /// The user chosen by SET SESSION AUTHORIZATION; `None` when it is the
    /// login user.
    pub session_authorization: Option<Bytes>,
    /// Named prepared statements. SQL PREPARE and protocol Parse share one
    /// namespace in PostgreSQL, so one map holds both.
    pub prepared: BTreeMap<Bytes, PreparedStatement>,
    /// Channels from LISTEN.
    pub listening: BTreeSet<Bytes>,
}

/// A named prepared statement, as it must be re-created on a new server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedStatement {
    pub origin: PreparedOrigin,
    /// The text that re-creates it: the query string of the Parse message,
    /// or the whole PREPARE statement.
    pub query: Bytes,
    /// Parameter type OIDs as the client gave them (0 = let the server
    /// infer). Parse carries them; for PREPARE they are in the text.
    pub param_types: Vec<u32>,
}

/// How a prepared statement was created, which decides how it is restored:
/// a PREPARE statement is re-run, a Parse message is re-sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PreparedOrigin {
    /// SQL `PREPARE name AS …`.
    Sql,
    /// Protocol Parse with a non-empty statement name.
    Protocol,
}

impl PreparedOrigin {
    fn as_byte(self) -> u8 {
        match self {
            PreparedOrigin::Sql => b'Q',
            PreparedOrigin::Protocol => b'P',
        }
    }

    fn from_byte(value: u8) -> Result<Self, DecodeError> {
        match value {
            b'Q' => Ok(PreparedOrigin::Sql),
            b'P' => Ok(PreparedOrigin::Protocol),
            value => Err(DecodeError::InvalidByte {
                what: "prepared statement origin",
                value,
            }),
        }
    }
}

/// Folds a GUC name the way PostgreSQL does (`guc_name_compare`): ASCII
/// letters to lower case, every other byte unchanged, so `TimeZone` and
/// `timezone` are one setting.
pub fn fold_guc_name(name: &[u8]) -> Bytes {
    Bytes::from(name.to_ascii_lowercase())
}

impl Template {
    /// Records a GUC value under its folded name.
    pub fn set_setting(&mut self, name: &[u8], value: Bytes) {
        self.settings.insert(fold_guc_name(name), value);
    }

    /// Forgets a GUC value (RESET): the session is back to its startup value.
    pub fn reset_setting(&mut self, name: &[u8]) -> Option<Bytes> {
        self.settings.remove(name.to_ascii_lowercase().as_slice())
    }

    /// The canonical encoding; the journal stores it and [`Template::id`]
    /// hashes it.
    ///
    /// ```text
    /// u8 version (1)
    /// 'S' map startup
    /// 'G' map settings
    /// 'R' option role
    /// 'A' option session authorization
    /// 'P' map name → (u8 origin 'Q'|'P', bytes query, len n, n × u32 oid)
    /// 'L' len n, n × bytes channel (ascending)
    /// ```
    pub fn canonical_encoding(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// blake3 of the canonical encoding, hashed as it is produced.
    pub fn id(&self) -> TemplateId {
        let mut hasher = blake3::Hasher::new();
        self.encode(&mut hasher);
        TemplateId::from_bytes(*hasher.finalize().as_bytes())
    }

    pub(crate) fn encode(&self, out: &mut impl Sink) {
        out.put_u8(TEMPLATE_VERSION);
        out.put_u8(STARTUP);
        put_map(out, &self.startup);
        out.put_u8(SETTINGS);
        put_map(out, &self.settings);
        out.put_u8(ROLE);
        out.put_option(self.role.as_deref());
        out.put_u8(SESSION_AUTHORIZATION);
        out.put_option(self.session_authorization.as_deref());
        out.put_u8(PREPARED);
        out.put_len(self.prepared.len());
        for (name, statement) in &self.prepared {
            out.put_bytes(name);
            out.put_u8(statement.origin.as_byte());
            out.put_bytes(&statement.query);
            out.put_len(statement.param_types.len());
            for oid in &statement.param_types {
                out.put_u32(*oid);
            }
        }
        out.put_u8(LISTENING);
        out.put_len(self.listening.len());
        for channel in &self.listening {
            out.put_bytes(channel);
        }
    }

    /// Reads a canonical encoding back (from the journal). Only canonical
    /// bytes are accepted, so the result's id is the hash of `input`.
    pub fn decode(input: &[u8]) -> Result<Template, DecodeError> {
        let mut r = Reader::new(input);
        let mut template = Template::default();
        r.version(TEMPLATE_VERSION)?;
        r.section(STARTUP)?;
        template.startup = read_map(&mut r)?;
        r.section(SETTINGS)?;
        template.settings = read_map(&mut r)?;
        r.section(ROLE)?;
        template.role = r.option()?;
        r.section(SESSION_AUTHORIZATION)?;
        template.session_authorization = r.option()?;
        r.section(PREPARED)?;
        r.sorted(
            |r| {
                let name = r.bytes()?;
                let origin = PreparedOrigin::from_byte(r.u8()?)?;
                let query = r.bytes()?;
                let count = r.len()?;
                let param_types = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
                Ok((
                    name,
                    PreparedStatement {
                        origin,
                        query,
                        param_types,
                    },
                ))
            },
            |name, statement| {
                template.prepared.insert(name, statement);
            },
        )?;
        r.section(LISTENING)?;
        r.sorted(
            |r| Ok((r.bytes()?, ())),
            |channel, ()| {
                template.listening.insert(channel);
            },
        )?;
        r.finish()?;
        Ok(template)
    }
}

pub(crate) fn put_map(out: &mut impl Sink, map: &BTreeMap<Bytes, Bytes>) {
    out.put_len(map.len());
    for (key, value) in map {
        out.put_bytes(key);
        out.put_bytes(value);
    }
}

pub(crate) fn read_map(r: &mut Reader<'_>) -> Result<BTreeMap<Bytes, Bytes>, DecodeError> {
    let mut map = BTreeMap::new();
    r.sorted(
        |r| Ok((r.bytes()?, r.bytes()?)),
        |key, value| {
            map.insert(key, value);
        },
    )?;
    Ok(map)
}
