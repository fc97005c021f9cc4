//! Whether re-running a command on a new server connection could repeat a
//! commit.
//!
//! A command whose answer was lost with the server connection may have
//! committed before the connection broke. Re-running it is safe only when
//! it cannot have committed anything: it runs inside a transaction block
//! the session opened and does not end it with COMMIT, or it only reads.
//! Everything else waits for the commit-outcome check, and is refused with
//! 08007 (transaction_resolution_unknown) until then.
//!
//! A plain `SELECT` counts as a read. A SELECT that calls a function that
//! writes, in autocommit mode, is the known gap: PostgreSQL gives no way to
//! tell it from a read by its text.

use crate::state::lexer::{LexOptions, Lexer};
use crate::state::Effect;
use crate::template::NonRecoverable;

/// What one statement can do to the transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatementRisk {
    /// Reads data, or changes only session state that the template or the
    /// replay log rebuilds.
    Harmless,
    /// Opens a transaction block.
    Begin,
    /// Ends the transaction block without committing it.
    Rollback,
    /// Commits (or prepares) the transaction.
    Commit,
    /// May write data: commits at once outside a transaction block.
    Write,
}

impl StatementRisk {
    /// The risk of a statement with `effect` and text `sql`.
    pub fn of(effect: &Effect, sql: &[u8], options: &LexOptions) -> StatementRisk {
        match effect {
            Effect::Begin(_) | Effect::Rollback { chain: true } => StatementRisk::Begin,
            Effect::Rollback { chain: false } => StatementRisk::Rollback,
            Effect::Commit { .. } | Effect::PrepareTransaction => StatementRisk::Commit,
            Effect::Set { .. }
            | Effect::Reset { .. }
            | Effect::ResetAll
            | Effect::Role { .. }
            | Effect::SessionAuthorization { .. }
            | Effect::TransactionModes(_)
            | Effect::Savepoint(_)
            | Effect::Release(_)
            | Effect::RollbackTo(_)
            | Effect::Prepare { .. }
            | Effect::Deallocate(_)
            | Effect::Listen(_)
            | Effect::Unlisten(_)
            | Effect::Discard(_)
            | Effect::Close(_)
            | Effect::Reprise(_) => StatementRisk::Harmless,
            // State no template holds, but no data written: a temporary
            // object died with the old server process, a hold cursor or an
            // imported snapshot only reads. The session becomes
            // non-recoverable once it completes, not before.
            Effect::NonRecoverable(
                NonRecoverable::TempObjects
                | NonRecoverable::HoldCursors
                | NonRecoverable::SnapshotImport
                | NonRecoverable::Load,
            )
            | Effect::DeclareHold(_) => StatementRisk::Harmless,
            Effect::None
            | Effect::NonRecoverable(NonRecoverable::AdvisoryLocks)
            | Effect::AdvisoryUnlockAll
            | Effect::SetUnknown(_)
                if reads_only(sql, options) =>
            {
                StatementRisk::Harmless
            }
            _ => StatementRisk::Write,
        }
    }
}

/// The statement starts with a keyword that only reads: SELECT, SHOW,
/// TABLE, VALUES. `SELECT … INTO` creates a table; re-run after a commit
/// it fails with "already exists", which the result check catches.
fn reads_only(sql: &[u8], options: &LexOptions) -> bool {
    let mut lexer = Lexer::new(sql, options);
    let lexeme = loop {
        match lexer.next() {
            Some(token) if token.lexeme(sql).is_punct(b'(') => {}
            Some(token) => break token.lexeme(sql),
            None => return false,
        }
    };
    if lexeme.is_keyword(b"copy") {
        return copies_to_client(lexer, sql);
    }
    ["select", "show", "table", "values"]
        .iter()
        .any(|keyword| lexeme.is_keyword(keyword.as_bytes()))
}

/// Whether a statement that may write can run inside a transaction block
/// Reprise opens around it (`wrap_autocommit_writes`) with the result it
/// has in autocommit mode: plain DML and DDL. Not what PostgreSQL refuses
/// inside a block (VACUUM, CREATE DATABASE, `… CONCURRENTLY`, ALTER
/// SYSTEM …), not what behaves otherwise inside one (CALL and DO may
/// commit, LOCK and DECLARE fail outside a block), and not COPY, whose
/// data must follow the statement with nothing of Reprise's in between.
pub fn wrappable(sql: &[u8], options: &LexOptions) -> bool {
    let mut lexer = Lexer::new(sql, options);
    let mut words = Vec::with_capacity(4);
    while words.len() < 4 {
        match lexer.next() {
            Some(token) if words.is_empty() && token.lexeme(sql).is_punct(b'(') => {}
            Some(token) => words.push(token.lexeme(sql)),
            None => break,
        }
    }
    let Some(first) = words.first() else {
        return false;
    };
    let is = |keyword: &str| first.is_keyword(keyword.as_bytes());
    let later = |keywords: &[&str]| {
        words[1..]
            .iter()
            .any(|word| keywords.iter().any(|k| word.is_keyword(k.as_bytes())))
    };
    const REFUSED_IN_BLOCK: &[&str] = &["database", "tablespace", "subscription", "concurrently"];
    if [
        "insert", "update", "delete", "merge", "with", "truncate", "notify", "grant", "revoke",
    ]
    .iter()
    .any(|keyword| is(keyword))
    {
        return true;
    }
    if is("create") || is("drop") {
        return !later(REFUSED_IN_BLOCK);
    }
    if is("alter") {
        return !later(REFUSED_IN_BLOCK) && !later(&["system"]);
    }
    is("comment") || is("refresh") || is("analyze") || is("analyse")
}

/// The rest of a COPY statement sends data to the client (`TO STDOUT`),
/// rather than loading it (`FROM`) or writing a server file.
fn copies_to_client(mut lexer: Lexer<'_>, sql: &[u8]) -> bool {
    let mut depth = 0usize;
    while let Some(token) = lexer.next() {
        let lexeme = token.lexeme(sql);
        if lexeme.is_punct(b'(') {
            depth += 1;
        } else if lexeme.is_punct(b')') {
            depth = depth.saturating_sub(1);
        } else if depth == 0 && lexeme.is_keyword(b"from") {
            return false;
        } else if depth == 0 && lexeme.is_keyword(b"to") {
            return lexer
                .next()
                .is_some_and(|next| next.lexeme(sql).is_keyword(b"stdout"));
        }
    }
    false
}

/// What a command (its statements in order) does to the transaction,
/// from each status the session may be in when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandRisk {
    from_idle: Course,
    from_block: Course,
}

/// The course of a command from one starting status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Course {
    /// Nothing in it can have committed.
    rerunnable: bool,
    /// In a transaction block after it.
    in_block: bool,
}

impl Course {
    fn then(self, statement: StatementRisk) -> Course {
        match statement {
            StatementRisk::Harmless => self,
            StatementRisk::Begin => Course {
                in_block: true,
                ..self
            },
            StatementRisk::Rollback => Course {
                in_block: false,
                ..self
            },
            StatementRisk::Commit => Course {
                rerunnable: false,
                in_block: false,
            },
            StatementRisk::Write => Course {
                rerunnable: self.rerunnable && self.in_block,
                ..self
            },
        }
    }
}

impl Default for CommandRisk {
    /// A command with no statements yet.
    fn default() -> Self {
        CommandRisk {
            from_idle: Course {
                rerunnable: true,
                in_block: false,
            },
            from_block: Course {
                rerunnable: true,
                in_block: true,
            },
        }
    }
}

impl CommandRisk {
    /// The command runs `statement` next.
    pub fn then(&mut self, statement: StatementRisk) {
        self.from_idle = self.from_idle.then(statement);
        self.from_block = self.from_block.then(statement);
    }

    /// Whether the command can be re-run when it started in a transaction
    /// block (`in_block`) or not; and whether one is open after it.
    pub fn course(&self, in_block: bool) -> (bool, bool) {
        let course = if in_block {
            self.from_block
        } else {
            self.from_idle
        };
        (course.rerunnable, course.in_block)
    }
}

/// Whether commands that started in order from `in_block` can all be re-run.
pub fn rerunnable<'a>(in_block: bool, commands: impl IntoIterator<Item = &'a CommandRisk>) -> bool {
    rerunnable_settled(
        in_block,
        commands.into_iter().map(|command| (command, false)),
    )
}

/// The same, where a command paired with `true` is a COMMIT known not to
/// have committed: it ends the transaction block and can run again.
pub fn rerunnable_settled<'a>(
    mut in_block: bool,
    commands: impl IntoIterator<Item = (&'a CommandRisk, bool)>,
) -> bool {
    for (command, settled) in commands {
        if settled {
            in_block = false;
            continue;
        }
        let (ok, after) = command.course(in_block);
        if !ok {
            return false;
        }
        in_block = after;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn risk(effect: Effect, sql: &str) -> StatementRisk {
        StatementRisk::of(&effect, sql.as_bytes(), &LexOptions::default())
    }

    #[test]
    fn reads_and_writes_by_keyword() {
        assert_eq!(risk(Effect::None, "select 1"), StatementRisk::Harmless);
        assert_eq!(risk(Effect::None, "  (SELECT 1)"), StatementRisk::Harmless);
        assert_eq!(
            risk(Effect::None, "/* c */ show work_mem"),
            StatementRisk::Harmless
        );
        assert_eq!(
            risk(Effect::None, "insert into t values (1)"),
            StatementRisk::Write
        );
        assert_eq!(
            risk(Effect::None, "with x as (delete from t) select 1"),
            StatementRisk::Write
        );
        assert_eq!(risk(Effect::Unknown, "select 1"), StatementRisk::Write);
        assert_eq!(
            risk(Effect::None, "COPY (SELECT 1 FROM t) TO STDOUT"),
            StatementRisk::Harmless
        );
        assert_eq!(
            risk(Effect::None, "copy t from stdin"),
            StatementRisk::Write
        );
        assert_eq!(
            risk(Effect::None, "copy t to '/tmp/file'"),
            StatementRisk::Write
        );
        assert_eq!(
            risk(
                Effect::NonRecoverable(NonRecoverable::AdvisoryLocks),
                "select pg_advisory_lock(1)"
            ),
            StatementRisk::Harmless
        );
        assert_eq!(
            risk(
                Effect::NonRecoverable(NonRecoverable::TempObjects),
                "create temp table t (n int)"
            ),
            StatementRisk::Harmless
        );
        assert_eq!(
            risk(Effect::Commit { chain: false }, "commit"),
            StatementRisk::Commit
        );
    }

    #[test]
    fn only_statements_that_run_alike_in_a_block_are_wrapped() {
        let wraps = |sql: &str| wrappable(sql.as_bytes(), &LexOptions::default());
        assert!(wraps("insert into t values (1)"));
        assert!(wraps("  UPDATE t SET n = n + 1"));
        assert!(wraps(
            "with x as (delete from t returning *) select * from x"
        ));
        assert!(wraps("create table t (n int)"));
        assert!(wraps("create unique index on t (n)"));
        assert!(wraps("alter table t add column m int"));
        assert!(wraps("drop table t"));
        assert!(wraps("notify ch"));
        assert!(!wraps("vacuum t"));
        assert!(!wraps("create database d"));
        assert!(!wraps("create index concurrently on t (n)"));
        assert!(!wraps("create unique index concurrently i on t (n)"));
        assert!(!wraps("drop index concurrently i"));
        assert!(!wraps("alter system set work_mem = '1MB'"));
        assert!(!wraps("drop tablespace s"));
        assert!(!wraps("call p()"));
        assert!(!wraps("do $$ begin commit; end $$"));
        assert!(!wraps("lock table t"));
        assert!(!wraps("copy t from stdin"));
        assert!(!wraps("cluster"));
        assert!(!wraps(""));
    }

    #[test]
    fn a_write_is_rerunnable_only_inside_a_block() {
        let mut write = CommandRisk::default();
        write.then(StatementRisk::Write);
        assert_eq!(write.course(false), (false, false));
        assert_eq!(write.course(true), (true, true));

        let mut begin_write = CommandRisk::default();
        begin_write.then(StatementRisk::Begin);
        begin_write.then(StatementRisk::Write);
        assert_eq!(begin_write.course(false), (true, true));

        let mut commit = CommandRisk::default();
        commit.then(StatementRisk::Commit);
        assert!(!rerunnable(true, [&begin_write, &commit]));
        let mut rollback = CommandRisk::default();
        rollback.then(StatementRisk::Rollback);
        let mut read = CommandRisk::default();
        read.then(StatementRisk::Harmless);
        assert!(rerunnable(false, [&begin_write, &rollback, &read]));
        assert!(!rerunnable(false, [&begin_write, &rollback, &write]));
    }
}
