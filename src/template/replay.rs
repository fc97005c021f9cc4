//! Replay-class state: what a session holds beyond its template, which only
//! replaying its commands since the last safe point can rebuild. It is not
//! part of a template; it goes into the state hash.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::attributes::{put_map, read_map};
use super::codec::{DecodeError, Reader, Sink};

/// Version byte that starts a replay state's canonical encoding.
const REPLAY_VERSION: u8 = 1;

// Section tags, in encoding order.
const STATUS: u8 = b'X';
const ISOLATION: u8 = b'V';
const READ_ONLY: u8 = b'O';
const DEFERRABLE: u8 = b'F';
const LOCAL_SETTINGS: u8 = b'L';
const SAVEPOINTS: u8 = b'S';
const NON_RECOVERABLE: u8 = b'N';

/// Replay-class state. The default is the state at a safe point: idle,
/// nothing transaction-scoped, nothing non-recoverable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayState {
    /// The status byte of the last ReadyForQuery.
    pub status: TransactionStatus,
    /// Isolation level chosen for the current transaction (BEGIN ISOLATION
    /// LEVEL …, SET TRANSACTION …); `None` when the session default applies.
    pub isolation: Option<IsolationLevel>,
    /// READ ONLY / READ WRITE chosen for the current transaction.
    pub read_only: Option<bool>,
    /// DEFERRABLE / NOT DEFERRABLE chosen for the current transaction.
    pub deferrable: Option<bool>,
    /// SET LOCAL values of the current transaction, by folded GUC name
    /// (see [`fold_guc_name`](super::fold_guc_name)).
    pub local_settings: BTreeMap<Bytes, Bytes>,
    /// Open savepoints, outermost first. PostgreSQL allows a name to repeat
    /// (the newest one shadows the others), hence a stack, not a set.
    pub savepoints: Vec<Bytes>,
    /// State that no restore can rebuild; while any is present the session
    /// has no safe point.
    pub non_recoverable: NonRecoverableSet,
}

/// Transaction status as ReadyForQuery reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// `'I'`: not in a transaction block.
    #[default]
    Idle,
    /// `'T'`: in a transaction block.
    InTransaction,
    /// `'E'`: in a failed transaction block; statements are refused until
    /// it ends.
    Failed,
}

impl TransactionStatus {
    /// The ReadyForQuery status byte.
    pub fn as_byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }

    /// Reads a ReadyForQuery status byte; `None` for any other byte.
    pub fn from_byte(value: u8) -> Option<Self> {
        match value {
            b'I' => Some(TransactionStatus::Idle),
            b'T' => Some(TransactionStatus::InTransaction),
            b'E' => Some(TransactionStatus::Failed),
            _ => None,
        }
    }
}

/// Transaction isolation levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IsolationLevel {
    ReadUncommitted,
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

impl IsolationLevel {
    const ALL: [IsolationLevel; 4] = [
        IsolationLevel::ReadUncommitted,
        IsolationLevel::ReadCommitted,
        IsolationLevel::RepeatableRead,
        IsolationLevel::Serializable,
    ];

    /// Position in the encoding; 0 means "not chosen".
    fn code(self) -> u8 {
        match self {
            IsolationLevel::ReadUncommitted => 1,
            IsolationLevel::ReadCommitted => 2,
            IsolationLevel::RepeatableRead => 3,
            IsolationLevel::Serializable => 4,
        }
    }
}

/// A kind of session state that a restore cannot rebuild.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NonRecoverable {
    /// Temporary tables, views, sequences or functions.
    TempObjects,
    /// Cursors declared WITH HOLD, which outlive their transaction.
    HoldCursors,
    /// Session-level advisory locks (pg_advisory_lock and friends).
    AdvisoryLocks,
    /// A library loaded with LOAD.
    Load,
    /// A snapshot imported with SET TRANSACTION SNAPSHOT.
    SnapshotImport,
    /// A statement the proxy could not classify; treated as if it changed
    /// anything.
    Unclassified,
}

impl NonRecoverable {
    /// Every kind, in bit order.
    pub const ALL: [NonRecoverable; 6] = [
        NonRecoverable::TempObjects,
        NonRecoverable::HoldCursors,
        NonRecoverable::AdvisoryLocks,
        NonRecoverable::Load,
        NonRecoverable::SnapshotImport,
        NonRecoverable::Unclassified,
    ];

    /// What it is, in words for an error message.
    pub fn describe(self) -> &'static str {
        match self {
            NonRecoverable::TempObjects => "temporary objects",
            NonRecoverable::HoldCursors => "WITH HOLD cursors",
            NonRecoverable::AdvisoryLocks => "session advisory locks",
            NonRecoverable::Load => "a library loaded with LOAD",
            NonRecoverable::SnapshotImport => "an imported snapshot",
            NonRecoverable::Unclassified => "the effects of a statement Reprise could not classify",
        }
    }

    /// The bit is part of the canonical encoding: never renumber.
    fn bit(self) -> u16 {
        1 << match self {
            NonRecoverable::TempObjects => 0,
            NonRecoverable::HoldCursors => 1,
            NonRecoverable::AdvisoryLocks => 2,
            NonRecoverable::Load => 3,
            NonRecoverable::SnapshotImport => 4,
            NonRecoverable::Unclassified => 5,
        }
    }
}

/// A set of [`NonRecoverable`] kinds, stored as bits so that it is `Copy`
/// and encodes in two bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NonRecoverableSet(u16);

impl NonRecoverableSet {
    const KNOWN_BITS: u16 = 0b11_1111;

    pub fn insert(&mut self, kind: NonRecoverable) {
        self.0 |= kind.bit();
    }

    pub fn remove(&mut self, kind: NonRecoverable) {
        self.0 &= !kind.bit();
    }

    pub fn contains(self, kind: NonRecoverable) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = NonRecoverable> {
        NonRecoverable::ALL
            .into_iter()
            .filter(move |kind| self.contains(*kind))
    }
}

impl FromIterator<NonRecoverable> for NonRecoverableSet {
    fn from_iter<I: IntoIterator<Item = NonRecoverable>>(iter: I) -> Self {
        let mut set = NonRecoverableSet::default();
        for kind in iter {
            set.insert(kind);
        }
        set
    }
}

fn put_flag(out: &mut impl Sink, value: Option<bool>) {
    out.put_u8(match value {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    });
}

fn read_flag(r: &mut Reader<'_>, what: &'static str) -> Result<Option<bool>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(false)),
        2 => Ok(Some(true)),
        value => Err(DecodeError::InvalidByte { what, value }),
    }
}

impl ReplayState {
    /// True when the template alone describes the session, so that a
    /// request boundary in this state is a safe point.
    pub fn is_safe_point(&self) -> bool {
        self.status == TransactionStatus::Idle
            && self.isolation.is_none()
            && self.read_only.is_none()
            && self.deferrable.is_none()
            && self.local_settings.is_empty()
            && self.savepoints.is_empty()
            && self.non_recoverable.is_empty()
    }

    /// The canonical encoding:
    ///
    /// ```text
    /// u8 version (1)
    /// 'X' u8 status 'I' | 'T' | 'E'
    /// 'V' u8 isolation: 0 none, 1 read uncommitted … 4 serializable
    /// 'O' u8 read only: 0 none, 1 false, 2 true
    /// 'F' u8 deferrable: as read only
    /// 'L' map SET LOCAL values
    /// 'S' len n, n × bytes savepoint (outermost first)
    /// 'N' u16 non-recoverable bits
    /// ```
    pub fn canonical_encoding(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    pub(crate) fn encode(&self, out: &mut impl Sink) {
        out.put_u8(REPLAY_VERSION);
        out.put_u8(STATUS);
        out.put_u8(self.status.as_byte());
        out.put_u8(ISOLATION);
        out.put_u8(self.isolation.map_or(0, IsolationLevel::code));
        out.put_u8(READ_ONLY);
        put_flag(out, self.read_only);
        out.put_u8(DEFERRABLE);
        put_flag(out, self.deferrable);
        out.put_u8(LOCAL_SETTINGS);
        put_map(out, &self.local_settings);
        out.put_u8(SAVEPOINTS);
        out.put_len(self.savepoints.len());
        for name in &self.savepoints {
            out.put_bytes(name);
        }
        out.put_u8(NON_RECOVERABLE);
        out.put_u16(self.non_recoverable.0);
    }

    /// Reads a canonical encoding back; only canonical bytes are accepted.
    pub fn decode(input: &[u8]) -> Result<ReplayState, DecodeError> {
        let mut r = Reader::new(input);
        r.version(REPLAY_VERSION)?;
        r.section(STATUS)?;
        let status = r.u8()?;
        let status = TransactionStatus::from_byte(status).ok_or(DecodeError::InvalidByte {
            what: "transaction status",
            value: status,
        })?;
        r.section(ISOLATION)?;
        let isolation = match r.u8()? {
            0 => None,
            code => Some(
                IsolationLevel::ALL
                    .into_iter()
                    .find(|level| level.code() == code)
                    .ok_or(DecodeError::InvalidByte {
                        what: "isolation level",
                        value: code,
                    })?,
            ),
        };
        r.section(READ_ONLY)?;
        let read_only = read_flag(&mut r, "read only")?;
        r.section(DEFERRABLE)?;
        let deferrable = read_flag(&mut r, "deferrable")?;
        r.section(LOCAL_SETTINGS)?;
        let local_settings = read_map(&mut r)?;
        r.section(SAVEPOINTS)?;
        let count = r.len()?;
        let savepoints = (0..count)
            .map(|_| r.bytes())
            .collect::<Result<Vec<_>, _>>()?;
        r.section(NON_RECOVERABLE)?;
        let bits = r.u16()?;
        if bits & !NonRecoverableSet::KNOWN_BITS != 0 {
            return Err(DecodeError::UnknownFlags(bits));
        }
        r.finish()?;
        Ok(ReplayState {
            status,
            isolation,
            read_only,
            deferrable,
            local_settings,
            savepoints,
            non_recoverable: NonRecoverableSet(bits),
        })
    }
}
