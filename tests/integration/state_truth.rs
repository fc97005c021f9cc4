//! The tracker against the server's truth: random sequences of the
//! statements whose effects Reprise tracks, valid and failing, inside and
//! outside transactions, in the simple and the extended protocol, each on a
//! fresh session through the proxy. After every step the tracker's view
//! (`SHOW reprise.state`) must match what PostgreSQL reports for the same
//! session; at the end, a restore plan built from that view must give a
//! fresh session the same state, template id and state hash.
//!
//! Left out of the generator because no tracker can follow them from the
//! statement text (documented limits): state changed inside functions (DO,
//! procedures, user functions calling set_config) and sequence state
//! (currval, lastval).
//!
//! `REPRISE_TEST_SEED` replays a run; `REPRISE_TEST_SEQUENCE` runs one
//! sequence of it alone; `REPRISE_TEST_SEQUENCES` sets how many run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reprise::template::{PreparedOrigin, PreparedStatement, RestorePlan, Template};

use crate::support::{
    bind_message, close_message, data_rows, execute_message, parse_message, query, sync_message,
    Harness, Message, RawClient,
};

const SEQUENCES: usize = 2000;
const MAX_STEPS: usize = 12;
/// Sessions run side by side: most of a step's time is round trips.
const WORKERS: usize = 4;
const LOGIN_USER: &str = "postgres";
/// `application_name` is a startup GUC so that RESET has a non-default
/// value to go back to. The generator never SETs this exact value: a plan
/// sees it as "no change" and the restored session would show source
/// 'client' where the original shows 'session'.
const STARTUP: &[(&str, &str)] = &[
    ("user", LOGIN_USER),
    ("database", "postgres"),
    ("application_name", "state_truth"),
];

const SETUP: &str = "
    CREATE ROLE r1 NOLOGIN;
    CREATE ROLE r2 NOLOGIN;
    GRANT r2 TO r1;
    CREATE TABLE t1 (a int);
    INSERT INTO t1 VALUES (1), (2);
    GRANT SELECT, INSERT ON t1 TO PUBLIC;
    CREATE SCHEMA s1;
    CREATE SCHEMA \"MySchema\";
    CREATE SCHEMA \"odd schema\";
    GRANT USAGE ON SCHEMA s1, \"MySchema\", \"odd schema\" TO PUBLIC;
";

/// One query, so that a step's truth costs one round trip with the
/// `SHOW reprise.state` pipelined behind it. Simple protocol: it creates no
/// named statement of its own.
const TRUTH: &str = "
    SELECT CASE WHEN setting IS NOT DISTINCT FROM reset_val THEN 'at_reset' ELSE 'setting' END,
           lower(name::text), current_setting(name::text)
      FROM pg_settings WHERE source = 'session'
    UNION ALL SELECT 'custom', 'myapp.x', coalesce(current_setting('myapp.x', true), '')
    UNION ALL SELECT 'users', current_user::text, session_user::text
    UNION ALL SELECT 'prepared', name::text, from_sql::text || ' ' || parameter_types::text
      FROM pg_prepared_statements
    UNION ALL SELECT 'listen', c::text, '' FROM pg_listening_channels() c
    UNION ALL SELECT 'isolation', current_setting('transaction_isolation'), ''
    UNION ALL SELECT 'read_only', current_setting('transaction_read_only'), ''
    UNION ALL SELECT 'deferrable', current_setting('transaction_deferrable'), ''
    UNION ALL SELECT 'temp', count(*)::text, ''
      FROM pg_class WHERE relnamespace = pg_my_temp_schema()
    UNION ALL SELECT 'hold', count(*)::text, '' FROM pg_cursors WHERE is_holdable
    UNION ALL SELECT 'advisory', count(*)::text, ''
      FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()";

/// The custom GUC of the test. A placeholder (no module defines it) is
/// hidden from pg_settings, so its source is unknown: only its value is
/// compared, with "" for never set or back to its default.
const CUSTOM_GUC: &str = "myapp.x";

/// GUCs that belong to the current transaction. BEGIN / SET TRANSACTION
/// set them with source 'session' for the transaction, and SET TRANSACTION
/// outside a transaction block leaves that source behind (with the default
/// value), though every transaction starts from the default_transaction_*
/// values. They are compared with the tracker's isolation / read_only /
/// deferrable rows instead.
const TRANSACTION_GUCS: &[&str] = &[
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
];

// ---------------------------------------------------------------------------
// The generator

/// A GUC of the test: its spellings and values.
struct Guc {
    /// As a client may write the name.
    names: &'static [&'static str],
    /// Folded, as the tracker keys it.
    key: &'static str,
    values: &'static [GucValue],
}

struct GucValue {
    /// After `SET name =`.
    sql: &'static str,
    /// The same value as a `set_config` argument.
    text: &'static str,
    /// The server shows the value exactly as the tracker records it, so
    /// the two can be compared at every step.
    canonical: bool,
}

const fn v(sql: &'static str, text: &'static str, canonical: bool) -> GucValue {
    GucValue {
        sql,
        text,
        canonical,
    }
}

const GUCS: &[Guc] = &[
    Guc {
        names: &["work_mem", "Work_Mem"],
        key: "work_mem",
        values: &[
            v("'8MB'", "8MB", true),
            v("'64kB'", "64kB", true),
            v("'1GB'", "1GB", true),
            v("'4MB'", "4MB", true),
            v("'8192kB'", "8192kB", false),
            v("4096", "4096", false),
        ],
    },
    Guc {
        names: &["search_path", "Search_Path"],
        key: "search_path",
        values: &[
            v("public", "public", true),
            v("s1, public", "s1, public", true),
            v("\"MySchema\", public", "\"MySchema\", public", true),
            v("\"$user\", public", "\"$user\", public", true),
            v("'s1'", "s1", true),
            v("\"odd schema\", s1", "\"odd schema\", s1", true),
            v("MySchema", "myschema", true),
        ],
    },
    Guc {
        names: &["application_name"],
        key: "application_name",
        values: &[
            v("'app1'", "app1", true),
            v("'My App'", "My App", true),
            v("app2", "app2", true),
        ],
    },
    Guc {
        names: &["DateStyle", "datestyle"],
        key: "datestyle",
        values: &[
            v("'ISO, DMY'", "ISO, DMY", true),
            v("'German, DMY'", "German, DMY", true),
            v("'SQL, MDY'", "SQL, MDY", true),
            v("'Postgres, DMY'", "Postgres, DMY", true),
            v("'ISO, MDY'", "ISO, MDY", true),
            // Reported GUCs: the tracker takes the server's spelling.
            v("iso", "iso", true),
            v("'sql, dmy'", "sql, dmy", true),
            v("German", "German", true),
        ],
    },
    Guc {
        names: &["TimeZone", "timezone"],
        key: "timezone",
        values: &[
            v("'UTC'", "UTC", true),
            v("'Europe/Paris'", "Europe/Paris", true),
            v("'Asia/Tokyo'", "Asia/Tokyo", true),
            v("'America/New_York'", "America/New_York", true),
            v("'utc'", "utc", true),
            v("'europe/paris'", "europe/paris", true),
        ],
    },
    Guc {
        names: &["statement_timeout"],
        key: "statement_timeout",
        // Each long enough never to cancel a truth query on a busy machine.
        values: &[
            v("'5s'", "5s", true),
            v("'1min'", "1min", true),
            v("0", "0", true),
            v("'90s'", "90s", true),
            v("5000", "5000", false),
            v("'60s'", "60s", false),
        ],
    },
    Guc {
        names: &["myapp.x", "MyApp.X"],
        key: "myapp.x",
        values: &[
            v("'a'", "a", true),
            v("'b c'", "b c", true),
            v("42", "42", true),
            v("on", "on", true),
        ],
    },
];

/// What the comparisons must tolerate in one sequence, learnt from the
/// statements generated (whether or not they succeeded).
#[derive(Default)]
struct Leeway {
    /// GUCs given a value in a spelling the server shows differently:
    /// their values are compared only by the restore check.
    tainted: BTreeSet<String>,
    /// A DROP ran: the tracker keeps TempObjects, as it cannot tell which
    /// object was dropped.
    temp_dropped: bool,
    /// pg_advisory_unlock ran: releasing one lock may or may not release
    /// the last, so the tracker keeps AdvisoryLocks (and marks the
    /// statement unclassified).
    unlocked: bool,
    /// A statement the tracker cannot follow may have run (that unlock, a
    /// set_config whose value is a bind parameter): it must say so with
    /// Unclassified, and until DISCARD ALL its view of the restorable
    /// state is not comparable.
    opaque: bool,
}

struct Generator {
    rng: StdRng,
    /// Advisory lock key, unique per sequence: sessions run side by side.
    key: usize,
    leeway: Leeway,
    /// The status after the last step: the generator leans towards ending
    /// a failed transaction, where everything else is refused.
    status: u8,
    /// Statement names PREPARE or Parse may have created: Bind prefers
    /// them.
    named: BTreeSet<&'static str>,
}

/// One request of a step.
#[derive(Clone, Debug)]
enum Step {
    /// One Query message: the statements joined by "; ".
    Simple(Vec<String>),
    /// Extended-protocol messages, then Sync.
    Extended(Vec<Ext>),
}

#[derive(Clone, Debug)]
enum Ext {
    Parse {
        name: &'static str,
        sql: String,
        types: Vec<u32>,
    },
    /// Bind of a statement to the unnamed portal, then Execute.
    Run {
        statement: &'static str,
        params: Vec<&'static str>,
    },
    Close(&'static str),
}

/// Protocol-level named statements: (name, body, parameter types). A name
/// comes with several bodies so that a Parse of an existing name (refused)
/// must not change what the tracker thinks the name does.
const NAMED: &[(&str, &str, &[u32])] = &[
    ("s1", "SELECT 1", &[]),
    ("s1", "SET application_name = 'from_s1'", &[]),
    ("s2", "SELECT $1::int + 1", &[23]),
    ("s2", "SELECT set_config('myapp.x', $1, false)", &[0]),
    ("s3", "SET work_mem = '4MB'", &[]),
    ("s3", "SELECT set_config('myapp.x', 'from_s3', false)", &[]),
    ("S Mixed", "SELECT $1", &[25]),
    ("s4", "SET LOCAL statement_timeout = '5s'", &[]),
    ("s5", "LISTEN c2", &[]),
];

/// Names a protocol Bind or Close may use, with the parameters every body
/// of that name takes. p1..p3 are SQL-prepared.
const RUNNABLE: &[(&str, &[&str])] = &[
    ("s1", &[]),
    ("s2", &["5"]),
    ("s3", &[]),
    ("S Mixed", &["x"]),
    ("s4", &[]),
    ("s5", &[]),
    ("p1", &[]),
    ("p2", &["3"]),
    ("p3", &[]),
];

const ROLE_STATEMENTS: &[&str] = &[
    "SET ROLE r1",
    "SET ROLE r2",
    "SET ROLE NONE",
    "SET ROLE postgres",
    "RESET ROLE",
    "SET LOCAL ROLE r2",
    "SET SESSION ROLE r1",
    "SET SESSION AUTHORIZATION r1",
    "SET SESSION AUTHORIZATION DEFAULT",
    "SET SESSION AUTHORIZATION postgres",
    "RESET SESSION AUTHORIZATION",
    "SET LOCAL SESSION AUTHORIZATION r1",
    "SELECT set_config('role', 'r2', false)",
    "SELECT set_config('role', 'none', true)",
    "SET ROLE 'r1'",
    "SELECT set_config('session_authorization', 'r1', false)",
    "SET LOCAL SESSION AUTHORIZATION DEFAULT",
];

/// (name, PREPARE)
const PREPARES: &[(&str, &str)] = &[
    ("p1", "PREPARE p1 AS SELECT 1"),
    ("p2", "PREPARE p2(int) AS SELECT $1 + 1"),
    (
        "p3",
        "PREPARE p3 AS SELECT set_config('myapp.x', 'prepared', false)",
    ),
    (
        "P Mixed",
        "PREPARE \"P Mixed\" AS SELECT count(*) FROM public.t1",
    ),
    // One namespace with protocol statements: s3 is also parsed.
    (
        "s3",
        "PREPARE s3 AS SELECT set_config('myapp.x', 'sql_s3', false)",
    ),
];

/// (name, statement using it); SQL EXECUTE and DEALLOCATE also reach
/// statements created by protocol Parse.
const PREPARED_USES: &[(&str, &str)] = &[
    ("p1", "EXECUTE p1"),
    ("p2", "EXECUTE p2(3)"),
    ("p3", "EXECUTE p3"),
    ("P Mixed", "EXECUTE \"P Mixed\""),
    ("s1", "EXECUTE s1"),
    ("s3", "EXECUTE s3"),
    ("p1", "DEALLOCATE p1"),
    ("p2", "DEALLOCATE PREPARE p2"),
    ("P Mixed", "DEALLOCATE \"P Mixed\""),
    ("s3", "DEALLOCATE s3"),
    ("s1", "DEALLOCATE PREPARE s1"),
    ("", "DEALLOCATE ALL"),
];

const LISTEN_STATEMENTS: &[&str] = &[
    "LISTEN c1",
    "LISTEN \"Mixed Chan\"",
    "LISTEN c2",
    "UNLISTEN c1",
    "UNLISTEN \"Mixed Chan\"",
    "UNLISTEN *",
];

const DISCARD_STATEMENTS: &[&str] = &[
    "DISCARD ALL",
    "DISCARD PLANS",
    "DISCARD SEQUENCES",
    "DISCARD TEMP",
    "DISCARD TEMPORARY",
];

/// The first eight begin a transaction.
const TRANSACTION_STATEMENTS: &[&str] = &[
    "BEGIN",
    "BEGIN",
    "BEGIN ISOLATION LEVEL SERIALIZABLE",
    "BEGIN READ ONLY",
    "BEGIN TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "START TRANSACTION",
    "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    "START TRANSACTION READ WRITE, DEFERRABLE",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET TRANSACTION READ ONLY",
    "SET TRANSACTION READ WRITE",
    "SET TRANSACTION DEFERRABLE",
    "SAVEPOINT a",
    "SAVEPOINT b",
    "RELEASE a",
    "RELEASE SAVEPOINT b",
    "ROLLBACK TO a",
    "ROLLBACK TO SAVEPOINT b",
    "SAVEPOINT \"A b\"",
    "ROLLBACK TO \"A b\"",
    "RELEASE \"A b\"",
    "COMMIT",
    "COMMIT",
    "ROLLBACK",
    "END",
    "ABORT",
    "COMMIT AND CHAIN",
    "ROLLBACK AND CHAIN",
];

/// What ends or repairs a failed transaction.
const RECOVERY_STATEMENTS: &[&str] = &[
    "ROLLBACK",
    "ROLLBACK",
    "ABORT",
    "COMMIT",
    "ROLLBACK TO a",
    "ROLLBACK TO SAVEPOINT b",
    "ROLLBACK AND CHAIN",
    "COMMIT AND CHAIN",
];

const FAILING_STATEMENTS: &[&str] = &[
    "SELECT 1/0",
    "SELECT * FROM no_such_table",
    "SET work_mem = 'bogus'",
    "SET no_such_param = 1",
    "SELECT set_config('work_mem', 'bogus', false)",
    "SET statement_timeout = 'soon'",
    "SET TIME ZONE 'Nowhere/Land'",
    "SELEC 1",
];

const ORDINARY_STATEMENTS: &[&str] = &[
    "SELECT 1",
    "SELECT count(*) FROM public.t1",
    "INSERT INTO public.t1 VALUES (3)",
    "SHOW work_mem",
    "VALUES (1)",
];

impl Generator {
    fn new(seed: u64, index: usize) -> Self {
        let mixed = seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Generator {
            rng: StdRng::seed_from_u64(mixed),
            key: 1000 + index,
            leeway: Leeway::default(),
            status: b'I',
            named: BTreeSet::new(),
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        *items.choose(&mut self.rng).expect("a non-empty pool")
    }

    fn step(&mut self) -> Step {
        match self.rng.gen_range(0..100) {
            0..=49 => Step::Simple(vec![self.statement()]),
            50..=54 => Step::Simple(vec![format!("{};", self.statement())]),
            55..=74 => {
                let count = self.rng.gen_range(2..=4);
                Step::Simple((0..count).map(|_| self.statement()).collect())
            }
            _ => {
                let count = self.rng.gen_range(1..=3);
                let mut items = Vec::new();
                for _ in 0..count {
                    self.extended(&mut items);
                }
                Step::Extended(items)
            }
        }
    }

    fn extended(&mut self, items: &mut Vec<Ext>) {
        match self.rng.gen_range(0..10) {
            0..=4 => {
                let sql = self.statement();
                items.push(Ext::Parse {
                    name: "",
                    sql,
                    types: Vec::new(),
                });
                items.push(Ext::Run {
                    statement: "",
                    params: Vec::new(),
                });
            }
            5 | 6 => {
                let (name, sql, types) = self.pick(NAMED);
                self.named.insert(name);
                if sql.contains("$1, false") {
                    self.leeway.opaque = true;
                }
                items.push(Ext::Parse {
                    name,
                    sql: sql.to_owned(),
                    types: types.to_vec(),
                });
            }
            7 | 8 => {
                let known: Vec<(&'static str, &'static [&'static str])> = RUNNABLE
                    .iter()
                    .copied()
                    .filter(|(name, _)| self.named.contains(name))
                    .collect();
                let (statement, params) = if !known.is_empty() && self.rng.gen_bool(0.8) {
                    self.pick(&known)
                } else {
                    self.pick(RUNNABLE)
                };
                items.push(Ext::Run {
                    statement,
                    params: params.to_vec(),
                });
            }
            _ => {
                let (name, _) = self.pick(RUNNABLE);
                items.push(Ext::Close(name));
            }
        }
    }

    /// A statement, now and then with a comment before it.
    fn statement(&mut self) -> String {
        let statement = self.statement_body();
        match self.rng.gen_range(0..25) {
            0 => format!("/* note */ {statement}"),
            1 => format!("-- note\n{statement}"),
            _ => statement,
        }
    }

    fn statement_body(&mut self) -> String {
        if self.status == b'E' && self.rng.gen_bool(0.5) {
            return self.pick(RECOVERY_STATEMENTS).to_owned();
        }
        match self.rng.gen_range(0..100) {
            0..=29 => self.guc_statement(),
            30..=37 => self.pick(ROLE_STATEMENTS).to_owned(),
            38..=47 => self.prepared_statement(),
            48..=53 => self.pick(LISTEN_STATEMENTS).to_owned(),
            54..=57 => self.pick(DISCARD_STATEMENTS).to_owned(),
            // Mostly a BEGIN when idle: savepoints need a block.
            58..=79 if self.status == b'I' && self.rng.gen_bool(0.6) => {
                self.pick(&TRANSACTION_STATEMENTS[..8]).to_owned()
            }
            58..=79 => self.pick(TRANSACTION_STATEMENTS).to_owned(),
            80..=87 => self.non_recoverable_statement(),
            88..=93 => self.pick(FAILING_STATEMENTS).to_owned(),
            _ => self.pick(ORDINARY_STATEMENTS).to_owned(),
        }
    }

    /// Mostly uses of names this sequence may have prepared.
    fn prepared_statement(&mut self) -> String {
        if self.named.is_empty() || self.rng.gen_bool(0.4) {
            let (name, statement) = self.pick(PREPARES);
            self.named.insert(name);
            return statement.to_owned();
        }
        let known: Vec<(&str, &str)> = PREPARED_USES
            .iter()
            .copied()
            .filter(|(name, _)| name.is_empty() || self.named.contains(name))
            .collect();
        let (_, statement) = if !known.is_empty() && self.rng.gen_bool(0.8) {
            self.pick(&known)
        } else {
            self.pick(PREPARED_USES)
        };
        statement.to_owned()
    }

    fn guc_statement(&mut self) -> String {
        let guc = &GUCS[self.rng.gen_range(0..GUCS.len())];
        let name = self.pick(guc.names);
        let canonical = self.rng.gen_bool(0.85);
        let choices: Vec<&GucValue> = guc
            .values
            .iter()
            .filter(|value| value.canonical == canonical)
            .collect();
        let value = match choices.choose(&mut self.rng) {
            Some(value) => *value,
            None => &guc.values[0],
        };
        let form = self.rng.gen_range(0..16);
        if (form < 8 || form == 13) && !value.canonical {
            self.leeway.tainted.insert(guc.key.to_owned());
        }
        match form {
            0 | 1 => format!("SET {name} = {}", value.sql),
            2 => format!("SET {name} TO {}", value.sql),
            3 => format!("SET SESSION {name} = {}", value.sql),
            4 | 5 => format!("SET LOCAL {name} TO {}", value.sql),
            6 => format!("SELECT set_config('{name}', '{}', false)", value.text),
            7 => format!("SELECT set_config('{name}', '{}', true)", value.text),
            8 | 9 => format!("RESET {name}"),
            10 => format!("SET {name} TO DEFAULT"),
            11 => format!("SET LOCAL {name} = DEFAULT"),
            12 => "RESET ALL".to_owned(),
            13 => format!(
                "SELECT set_config('{name}', '{}', false), set_config('myapp.x', 'pair', true)",
                value.text
            ),
            14 => {
                let schema = self.pick(&["'s1'", "'MySchema'", "'odd schema'"]);
                format!("SET SCHEMA {schema}")
            }
            _ => {
                let zone = GUCS
                    .iter()
                    .find(|guc| guc.key == "timezone")
                    .expect("TimeZone is a test GUC");
                let value = &zone.values[self.rng.gen_range(0..zone.values.len())];
                let statement = match self.rng.gen_range(0..5) {
                    0 | 1 => format!("SET TIME ZONE {}", value.sql),
                    2 => format!("SET LOCAL TIME ZONE {}", value.sql),
                    3 => "SET TIME ZONE LOCAL".to_owned(),
                    _ => "RESET TIME ZONE".to_owned(),
                };
                if statement.contains(value.sql) && !value.canonical {
                    self.leeway.tainted.insert(zone.key.to_owned());
                }
                statement
            }
        }
    }

    fn non_recoverable_statement(&mut self) -> String {
        let key = self.key;
        match self.rng.gen_range(0..14) {
            0 | 1 => "CREATE TEMP TABLE tt (a int)".to_owned(),
            2 => self
                .pick(&[
                    "CREATE TEMPORARY TABLE tt2 AS SELECT 1 AS a",
                    "SELECT a INTO TEMP tt3 FROM public.t1",
                ])
                .to_owned(),
            3 => {
                self.leeway.temp_dropped = true;
                "DROP TABLE tt".to_owned()
            }
            4 | 5 => "DECLARE h1 CURSOR WITH HOLD FOR SELECT 1".to_owned(),
            6 => "DECLARE h2 CURSOR WITH HOLD FOR SELECT a FROM public.t1".to_owned(),
            7 => "DECLARE n1 CURSOR FOR SELECT 1".to_owned(),
            8 => self
                .pick(&["CLOSE h1", "CLOSE h2", "CLOSE n1", "CLOSE ALL", "FETCH h1"])
                .to_owned(),
            9 | 10 => format!("SELECT pg_advisory_lock({key})"),
            11 => format!("SELECT pg_try_advisory_lock({key})"),
            12 => "SELECT pg_advisory_unlock_all()".to_owned(),
            _ => {
                self.leeway.unlocked = true;
                self.leeway.opaque = true;
                format!("SELECT pg_advisory_unlock({key})")
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Running steps and reading both views

/// What a step's response said.
struct Outcome {
    status: u8,
    errors: Vec<String>,
}

impl Step {
    fn protocol(&self) -> Protocol {
        match self {
            Step::Simple(statements) if statements.len() == 1 => Protocol::Simple,
            Step::Simple(_) => Protocol::MultiStatement,
            Step::Extended(_) => Protocol::Extended,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Step::Simple(statements) => query(&statements.join("; ")),
            Step::Extended(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Ext::Parse { name, sql, types } => {
                            out.extend(parse_message(name, sql, types))
                        }
                        Ext::Run { statement, params } => {
                            out.extend(bind_message("", statement, params));
                            out.extend(execute_message("", 0));
                        }
                        Ext::Close(name) => out.extend(close_message(b'S', name)),
                    }
                }
                out.extend(sync_message());
                out
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Step::Simple(statements) => format!("Query {:?}", statements.join("; ")),
            Step::Extended(items) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|item| match item {
                        Ext::Parse { name, sql, types } => {
                            format!("Parse({name:?}, {sql:?}, {types:?})")
                        }
                        Ext::Run { statement, params } => {
                            format!("Bind/Execute({statement:?}, {params:?})")
                        }
                        Ext::Close(name) => format!("Close({name:?})"),
                    })
                    .collect();
                format!("{} Sync", items.join(" "))
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Protocol {
    Simple,
    MultiStatement,
    Extended,
}

fn errors(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.tag == b'E')
        .map(|m| {
            format!(
                "{}: {}",
                m.sqlstate().unwrap_or_default(),
                m.field(b'M').unwrap_or_default()
            )
        })
        .collect()
}

fn last_status(messages: &[Message]) -> u8 {
    messages
        .iter()
        .rev()
        .find_map(Message::ready_status)
        .unwrap_or(b'?')
}

async fn run(client: &mut RawClient, step: &Step) -> Outcome {
    client.send(&step.bytes()).await;
    let messages = client.until_ready().await;
    Outcome {
        status: last_status(&messages),
        errors: errors(&messages),
    }
}

/// What PostgreSQL says about the session.
#[derive(Debug, Default, PartialEq, Eq)]
struct Truth {
    /// Lower-cased names with source 'session', transaction GUCs apart.
    settings: BTreeMap<String, String>,
    /// Those of `settings` whose value is the one RESET would give.
    at_reset: BTreeSet<String>,
    custom: String,
    transaction: BTreeMap<String, String>,
    current_user: String,
    session_user: String,
    /// Name → (from_sql, parameter types).
    prepared: BTreeMap<String, (bool, String)>,
    channels: BTreeSet<String>,
    isolation: String,
    read_only: String,
    deferrable: String,
    temp_objects: u64,
    hold_cursors: u64,
    advisory_locks: u64,
}

impl Truth {
    /// Settings whose value is not the one RESET gives (see `differences`).
    fn without_defaults(&self) -> BTreeMap<&String, &String> {
        self.settings
            .iter()
            .filter(|(name, _)| !self.at_reset.contains(*name))
            .collect()
    }

    fn from_rows(rows: Vec<Vec<Option<String>>>) -> Truth {
        let mut truth = Truth::default();
        for row in rows {
            let [kind, name, value] = <[Option<String>; 3]>::try_from(row)
                .map(|row| row.map(Option::unwrap_or_default))
                .expect("three columns");
            match kind.as_str() {
                "setting" | "at_reset" if TRANSACTION_GUCS.contains(&name.as_str()) => {
                    truth.transaction.insert(name, value);
                }
                "setting" | "at_reset" => {
                    if kind == "at_reset" {
                        truth.at_reset.insert(name.clone());
                    }
                    truth.settings.insert(name, value);
                }
                "custom" => truth.custom = value,
                "users" => {
                    truth.current_user = name;
                    truth.session_user = value;
                }
                "prepared" => {
                    let (from_sql, types) = value.split_once(' ').unwrap_or((&value, ""));
                    truth
                        .prepared
                        .insert(name, (from_sql == "true", types.to_owned()));
                }
                "listen" => {
                    truth.channels.insert(name);
                }
                "isolation" => truth.isolation = name,
                "read_only" => truth.read_only = name,
                "deferrable" => truth.deferrable = name,
                "temp" => truth.temp_objects = name.parse().unwrap_or(0),
                "hold" => truth.hold_cursors = name.parse().unwrap_or(0),
                "advisory" => truth.advisory_locks = name.parse().unwrap_or(0),
                other => panic!("unexpected truth row kind {other}"),
            }
        }
        truth
    }
}

/// The tracker's view: the rows of `SHOW reprise.state`.
#[derive(Debug, Default, Clone)]
struct View {
    rows: Vec<(String, String, String)>,
    template: String,
    state_hash: String,
    status: String,
    startup: BTreeMap<String, String>,
    settings: BTreeMap<String, String>,
    role: Option<String>,
    session_authorization: Option<String>,
    /// Name → (origin, text).
    prepared: BTreeMap<String, (PreparedOrigin, String)>,
    param_types: BTreeMap<String, Vec<u32>>,
    channels: BTreeSet<String>,
    isolation: Option<String>,
    read_only: Option<String>,
    deferrable: Option<String>,
    locals: BTreeMap<String, String>,
    non_recoverable: BTreeSet<String>,
}

impl View {
    fn from_rows(rows: Vec<Vec<Option<String>>>) -> View {
        let mut view = View::default();
        for row in rows {
            let [kind, name, value] = <[Option<String>; 3]>::try_from(row)
                .map(|row| row.map(Option::unwrap_or_default))
                .expect("three columns");
            view.rows.push((kind.clone(), name.clone(), value.clone()));
            match kind.as_str() {
                "template" => view.template = value,
                "state_hash" => view.state_hash = value,
                "startup" => {
                    view.startup.insert(name, value);
                }
                "setting" => {
                    view.settings.insert(name, value);
                }
                "role" => view.role = Some(value),
                "session_authorization" => view.session_authorization = Some(value),
                "prepared_sql" => {
                    view.prepared.insert(name, (PreparedOrigin::Sql, value));
                }
                "prepared_protocol" => {
                    view.prepared
                        .insert(name, (PreparedOrigin::Protocol, value));
                }
                "param_types" => {
                    let types = value
                        .split(',')
                        .map(|oid| oid.parse().expect("an oid"))
                        .collect();
                    view.param_types.insert(name, types);
                }
                "listen" => {
                    view.channels.insert(name);
                }
                "status" => view.status = value,
                "isolation" => view.isolation = Some(value),
                "read_only" => view.read_only = Some(value),
                "deferrable" => view.deferrable = Some(value),
                "local" => {
                    view.locals.insert(name, value);
                }
                "savepoint" | "replay_log" => {}
                "non_recoverable" => {
                    view.non_recoverable.insert(name);
                }
                other => panic!("unexpected state row kind {other}"),
            }
        }
        view
    }

    /// GUC name → value in effect: SET LOCAL over SET, and no entry where
    /// SET LOCAL … TO DEFAULT put the session default back.
    fn effective_settings(&self) -> BTreeMap<String, String> {
        let mut out = self.settings.clone();
        for (name, value) in &self.locals {
            if name == "role" || name == "session_authorization" {
                continue;
            }
            if value == "DEFAULT" {
                out.remove(name);
            } else {
                out.insert(name.clone(), value.clone());
            }
        }
        out
    }

    fn session_user(&self) -> String {
        match self.locals.get("session_authorization").map(String::as_str) {
            Some("DEFAULT") => LOGIN_USER.to_owned(),
            Some(user) => user.to_owned(),
            None => self
                .session_authorization
                .clone()
                .unwrap_or_else(|| LOGIN_USER.to_owned()),
        }
    }

    fn current_user(&self) -> String {
        match self.locals.get("role").map(String::as_str) {
            Some("none") => self.session_user(),
            Some(role) => role.to_owned(),
            None => self.role.clone().unwrap_or_else(|| self.session_user()),
        }
    }

    /// The template the rows describe.
    fn template(&self) -> Template {
        let mut template = Template::default();
        for (name, value) in &self.startup {
            template.startup.insert(b(name), b(value));
        }
        for (name, value) in &self.settings {
            template.settings.insert(b(name), b(value));
        }
        template.role = self.role.as_deref().map(b);
        template.session_authorization = self.session_authorization.as_deref().map(b);
        for (name, (origin, query)) in &self.prepared {
            template.prepared.insert(
                b(name),
                PreparedStatement {
                    origin: *origin,
                    query: b(query),
                    param_types: self.param_types.get(name).cloned().unwrap_or_default(),
                },
            );
        }
        for channel in &self.channels {
            template.listening.insert(b(channel));
        }
        template
    }
}

fn b(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

/// Reads the server's truth (unless the transaction failed, when nothing
/// can be read) and the tracker's view, in one round trip.
async fn observe(client: &mut RawClient, status: u8) -> Result<(Option<Truth>, View), String> {
    let mut bytes = Vec::new();
    if status != b'E' {
        bytes.extend(query(TRUTH));
    }
    bytes.extend(query("SHOW reprise.state"));
    client.send(&bytes).await;
    let truth = if status != b'E' {
        let messages = client.until_ready().await;
        let failed = errors(&messages);
        if !failed.is_empty() {
            return Err(format!("the truth query failed: {failed:?}"));
        }
        Some(Truth::from_rows(data_rows(&messages)))
    } else {
        None
    };
    let messages = client.until_ready().await;
    let failed = errors(&messages);
    if !failed.is_empty() {
        return Err(format!("SHOW reprise.state failed: {failed:?}"));
    }
    Ok((truth, View::from_rows(data_rows(&messages))))
}

fn on_off(value: Option<&String>) -> &str {
    value.map(String::as_str).unwrap_or("off")
}

/// Every way the tracker's view disagrees with the server.
fn differences(status: u8, truth: Option<&Truth>, view: &View, leeway: &Leeway) -> Vec<String> {
    let mut out = Vec::new();
    let status = char::from(status).to_string();
    if view.status != status {
        out.push(format!("status: server {status}, tracker {}", view.status));
    }
    let Some(truth) = truth else {
        return out;
    };
    let unclassified = view.non_recoverable.contains("Unclassified");
    if unclassified && !leeway.opaque {
        out.push("non-recoverable Unclassified without a cause".to_owned());
    }
    non_recoverable_differences(truth, view, leeway, &mut out);
    if unclassified {
        return out;
    }

    let mut tracked = view.effective_settings();
    let custom = tracked.remove(CUSTOM_GUC).unwrap_or_default();
    if truth.custom != custom && !leeway.tainted.contains(CUSTOM_GUC) {
        out.push(format!(
            "setting {CUSTOM_GUC}: server {:?}, tracker {custom:?}",
            truth.custom
        ));
    }
    // RESET x (or SET x TO DEFAULT) then SET LOCAL x in one transaction
    // leaves x at its default after commit but with source 'session'
    // (AtEOXact_GUC restores a masked value as PGC_S_SESSION). The tracker
    // cannot know the default's text, and nothing but pg_settings.source
    // tells the two apart, so such a name may be missing from its view.
    let truth_names: BTreeSet<&String> = truth
        .settings
        .keys()
        .filter(|name| !truth.at_reset.contains(*name) || tracked.contains_key(*name))
        .collect();
    let tracked_names: BTreeSet<&String> = tracked.keys().collect();
    if truth_names != tracked_names {
        out.push(format!(
            "setting names: server {truth_names:?}, tracker {tracked_names:?}"
        ));
    }
    for (name, value) in &tracked {
        if leeway.tainted.contains(name) {
            continue;
        }
        if let Some(server) = truth.settings.get(name) {
            if server != value {
                out.push(format!(
                    "setting {name}: server {server:?}, tracker {value:?}"
                ));
            }
        }
    }

    if truth.current_user != view.current_user() || truth.session_user != view.session_user() {
        out.push(format!(
            "users (current, session): server ({}, {}), tracker ({}, {})",
            truth.current_user,
            truth.session_user,
            view.current_user(),
            view.session_user()
        ));
    }

    let truth_prepared: BTreeMap<&String, bool> = truth
        .prepared
        .iter()
        .map(|(name, (from_sql, _))| (name, *from_sql))
        .collect();
    let tracked_prepared: BTreeMap<&String, bool> = view
        .prepared
        .iter()
        .map(|(name, (origin, _))| (name, *origin == PreparedOrigin::Sql))
        .collect();
    if truth_prepared != tracked_prepared {
        out.push(format!(
            "prepared (name → from_sql): server {truth_prepared:?}, tracker {tracked_prepared:?}"
        ));
    }

    if truth.channels != view.channels {
        out.push(format!(
            "channels: server {:?}, tracker {:?}",
            truth.channels, view.channels
        ));
    }

    // No test session changes the default_transaction_* GUCs.
    let isolation = view.isolation.as_deref().unwrap_or("read committed");
    if truth.isolation != isolation
        || truth.read_only != on_off(view.read_only.as_ref())
        || truth.deferrable != on_off(view.deferrable.as_ref())
    {
        out.push(format!(
            "transaction (isolation, read only, deferrable): server ({}, {}, {}), tracker ({isolation}, {}, {})",
            truth.isolation,
            truth.read_only,
            truth.deferrable,
            on_off(view.read_only.as_ref()),
            on_off(view.deferrable.as_ref()),
        ));
    }

    out
}

fn non_recoverable_differences(truth: &Truth, view: &View, leeway: &Leeway, out: &mut Vec<String>) {
    // Conservative is allowed only where the tracker cannot know better:
    // TempObjects after a DROP, AdvisoryLocks after pg_advisory_unlock
    // (which it also marks Unclassified).
    let shows = |kind: &str| view.non_recoverable.contains(kind);
    let checks = [
        ("TempObjects", truth.temp_objects > 0, leeway.temp_dropped),
        ("HoldCursors", truth.hold_cursors > 0, false),
        ("AdvisoryLocks", truth.advisory_locks > 0, leeway.unlocked),
    ];
    for (kind, held, may_linger) in checks {
        if held != shows(kind) && !(may_linger && shows(kind)) {
            out.push(format!(
                "non-recoverable {kind}: server {held}, tracker {}",
                shows(kind)
            ));
        }
    }
    for kind in &view.non_recoverable {
        if !matches!(
            kind.as_str(),
            "TempObjects" | "HoldCursors" | "AdvisoryLocks" | "Unclassified"
        ) {
            out.push(format!("non-recoverable {kind} without a cause"));
        }
    }
}

// ---------------------------------------------------------------------------
// Sequences

#[derive(Default, Debug)]
struct Counts {
    sequences: usize,
    steps: usize,
    simple: usize,
    multi_statement: usize,
    extended: usize,
    failing: usize,
    in_transaction: usize,
    failed_transaction: usize,
    restore_checks: usize,
    /// Steps after which the tracker said Unclassified, so that only the
    /// status and non-recoverable state were compared.
    unclassified: usize,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.sequences += other.sequences;
        self.steps += other.steps;
        self.simple += other.simple;
        self.multi_statement += other.multi_statement;
        self.extended += other.extended;
        self.failing += other.failing;
        self.in_transaction += other.in_transaction;
        self.failed_transaction += other.failed_transaction;
        self.restore_checks += other.restore_checks;
        self.unclassified += other.unclassified;
    }
}

struct Failure {
    seed: u64,
    index: usize,
    scripted: bool,
    transcript: Vec<String>,
}

impl Failure {
    fn report(&self, what: &str) -> String {
        let which = if self.scripted {
            format!("regression sequence {}", self.index)
        } else {
            format!(
                "REPRISE_TEST_SEED={} REPRISE_TEST_SEQUENCE={}",
                self.seed, self.index
            )
        };
        format!(
            "seed {} ({which}):\n  {}\n{what}",
            self.seed,
            self.transcript.join("\n  "),
        )
    }
}

/// Runs one sequence on a fresh session: `script`, or random steps.
async fn run_sequence(
    proxy: SocketAddr,
    seed: u64,
    index: usize,
    script: Option<Vec<Step>>,
) -> Result<Counts, String> {
    let mut generator = Generator::new(seed, index);
    let steps = match &script {
        Some(script) => script.len(),
        None => generator.rng.gen_range(1..=MAX_STEPS),
    };
    let mut failure = Failure {
        seed,
        index,
        scripted: script.is_some(),
        transcript: Vec::new(),
    };
    let mut script = script.map(Vec::into_iter);
    let mut counts = Counts {
        sequences: 1,
        ..Counts::default()
    };
    let (mut client, greeting) = RawClient::login_with(proxy, STARTUP).await;
    let refused = errors(&greeting);
    if !refused.is_empty() {
        return Err(failure.report(&format!("login refused: {refused:?}")));
    }

    let mut last = None;
    for _ in 0..steps {
        let step = match &mut script {
            Some(script) => script.next().expect("counted"),
            None => generator.step(),
        };
        let outcome = run(&mut client, &step).await;
        generator.status = outcome.status;
        failure.transcript.push(format!(
            "{} -> {}{}",
            step.describe(),
            char::from(outcome.status),
            if outcome.errors.is_empty() {
                String::new()
            } else {
                format!(" {:?}", outcome.errors)
            }
        ));
        counts.steps += 1;
        match step.protocol() {
            Protocol::Simple => counts.simple += 1,
            Protocol::MultiStatement => counts.multi_statement += 1,
            Protocol::Extended => counts.extended += 1,
        }
        if !outcome.errors.is_empty() {
            counts.failing += 1;
        }
        match outcome.status {
            b'T' => counts.in_transaction += 1,
            b'E' => counts.failed_transaction += 1,
            _ => {}
        }
        let (truth, view) = observe(&mut client, outcome.status)
            .await
            .map_err(|err| failure.report(&err))?;
        if view.non_recoverable.contains("Unclassified") {
            counts.unclassified += 1;
        }
        let diffs = differences(outcome.status, truth.as_ref(), &view, &generator.leeway);
        if !diffs.is_empty() {
            return Err(failure.report(&format!(
                "mismatch after the last step:\n  {}\ntracker rows: {:?}\nserver truth: {:?}",
                diffs.join("\n  "),
                view.rows,
                truth
            )));
        }
        last = Some((outcome.status, truth, view));
    }

    if let Some((b'I', Some(truth), view)) = last {
        if view.non_recoverable.is_empty() {
            restore_check(proxy, &mut client, &truth, &view)
                .await
                .map_err(|err| failure.report(&format!("restore check: {err}")))?;
            counts.restore_checks += 1;
        }
    }
    client.send(&crate::support::frame(b'X', b"")).await;
    Ok(counts)
}

/// `SHOW reprise.template` and `SHOW reprise.state_hash`, pipelined.
async fn ids(client: &mut RawClient) -> Result<(String, String), String> {
    let mut bytes = query("SHOW reprise.template");
    bytes.extend(query("SHOW reprise.state_hash"));
    client.send(&bytes).await;
    let mut values = Vec::new();
    for _ in 0..2 {
        let messages = client.until_ready().await;
        let failed = errors(&messages);
        if !failed.is_empty() {
            return Err(format!("SHOW failed: {failed:?}"));
        }
        let rows = data_rows(&messages);
        values.push(
            rows.first()
                .and_then(|row| row.first().cloned().flatten())
                .unwrap_or_default(),
        );
    }
    Ok((values[0].clone(), values[1].clone()))
}

/// Rebuilds the tracked template, restores it on a fresh session, and
/// compares both sessions, the server's view and the tracker's.
async fn restore_check(
    proxy: SocketAddr,
    original: &mut RawClient,
    truth: &Truth,
    view: &View,
) -> Result<(), String> {
    let original_ids = ids(original).await?;
    if original_ids != (view.template.clone(), view.state_hash.clone()) {
        return Err(format!(
            "SHOW reprise.template / state_hash {original_ids:?} disagree with the state rows"
        ));
    }
    let tracked = view.template();
    let startup_only = Template {
        startup: tracked.startup.clone(),
        ..Template::default()
    };
    let plan = RestorePlan::between(&startup_only, &tracked).map_err(|err| err.to_string())?;

    let (mut fresh, greeting) = RawClient::login_with(proxy, STARTUP).await;
    let refused = errors(&greeting);
    if !refused.is_empty() {
        return Err(format!("login refused: {refused:?}"));
    }
    let batch = plan.sql_batch();
    if !batch.is_empty() {
        fresh
            .send(&query(std::str::from_utf8(&batch).expect("utf-8 plan")))
            .await;
        let failed = errors(&fresh.until_ready().await);
        if !failed.is_empty() {
            return Err(format!("plan {batch:?} failed: {failed:?}"));
        }
    }
    let mut parses = Vec::new();
    for step in plan.parse_steps() {
        parses.extend(parse_message(
            std::str::from_utf8(step.name).expect("utf-8 name"),
            std::str::from_utf8(step.query).expect("utf-8 query"),
            step.param_types,
        ));
    }
    if !parses.is_empty() {
        parses.extend(sync_message());
        fresh.send(&parses).await;
        let failed = errors(&fresh.until_ready().await);
        if !failed.is_empty() {
            return Err(format!("plan Parse steps failed: {failed:?}"));
        }
    }

    let (restored, restored_view) = observe(&mut fresh, b'I').await?;
    let restored = restored.expect("idle sessions have a truth");
    let mut diffs = Vec::new();
    if truth.without_defaults() != restored.without_defaults() || restored.custom != truth.custom {
        diffs.push(format!(
            "settings: original {:?} {:?}, restored {:?} {:?}",
            truth.settings, truth.custom, restored.settings, restored.custom
        ));
    }
    if (&restored.current_user, &restored.session_user)
        != (&truth.current_user, &truth.session_user)
    {
        diffs.push(format!(
            "users: original ({}, {}), restored ({}, {})",
            truth.current_user, truth.session_user, restored.current_user, restored.session_user
        ));
    }
    if restored.prepared != truth.prepared {
        diffs.push(format!(
            "prepared: original {:?}, restored {:?}",
            truth.prepared, restored.prepared
        ));
    }
    if restored.channels != truth.channels {
        diffs.push(format!(
            "channels: original {:?}, restored {:?}",
            truth.channels, restored.channels
        ));
    }
    let restored_ids = ids(&mut fresh).await?;
    if restored_ids != original_ids {
        diffs.push(format!(
            "template / state hash: original {original_ids:?}, restored {restored_ids:?}\n  original rows: {:?}\n  restored rows: {:?}",
            view.rows, restored_view.rows
        ));
    }
    fresh.send(&crate::support::frame(b'X', b"")).await;
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!("plan {:?}:\n  {}", plan.steps, diffs.join("\n  ")))
    }
}

fn q(sql: &str) -> Step {
    Step::Simple(vec![sql.to_owned()])
}

fn parse(name: &'static str, sql: &str) -> Ext {
    Ext::Parse {
        name,
        sql: sql.to_owned(),
        types: Vec::new(),
    }
}

fn run_named(statement: &'static str) -> Ext {
    Ext::Run {
        statement,
        params: Vec::new(),
    }
}

/// An unnamed Parse, Bind and Execute of each statement, then Sync.
fn batch(statements: &[&str]) -> Step {
    let mut items = Vec::new();
    for sql in statements {
        items.push(parse("", sql));
        items.push(run_named(""));
    }
    Step::Extended(items)
}

/// Sequences that once showed a tracker bug, checked like the random ones
/// before them.
fn regressions() -> Vec<Vec<Step>> {
    vec![
        // A refused Parse leaves the name as it was.
        vec![
            Step::Extended(vec![parse("s1", "SELECT 1")]),
            Step::Extended(vec![
                run_named("nope"),
                parse("s1", "SET application_name = 'from_s1'"),
            ]),
            Step::Extended(vec![parse("s1", "SET application_name = 'from_s1'")]),
            Step::Extended(vec![run_named("s1")]),
        ],
        // SQL PREPARE and protocol Parse share one namespace.
        vec![
            Step::Extended(vec![parse("s3", "SET work_mem = '4MB'")]),
            q("DEALLOCATE s3"),
            q("PREPARE s3 AS SELECT set_config('myapp.x', 'sql_s3', false)"),
            Step::Extended(vec![run_named("s3")]),
            q("DISCARD ALL"),
            q("PREPARE s3 AS SELECT set_config('myapp.x', 'again', false)"),
            Step::Extended(vec![run_named("s3")]),
        ],
        // Bind of a statement that SQL PREPARE made earlier in the batch.
        vec![Step::Extended(vec![
            parse(
                "",
                "PREPARE p3 AS SELECT set_config('myapp.x', 'prepared', false)",
            ),
            run_named(""),
            run_named("p3"),
        ])],
        // DISCARD ALL commits at once; the error undoes only what follows.
        vec![
            q("SET work_mem = '8MB'"),
            batch(&["DISCARD ALL", "SET work_mem = '64kB'", "SELECT 1/0"]),
        ],
        // CLOSE is not undone by a rollback.
        vec![
            q("DECLARE h1 CURSOR WITH HOLD FOR SELECT 1"),
            q("BEGIN"),
            q("SAVEPOINT a"),
            q("CLOSE h1"),
            q("ROLLBACK TO a"),
            q("ROLLBACK"),
        ],
        // Characteristics of chained transactions after errors.
        vec![
            q("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY"),
            q("SELECT 1/0"),
            q("ROLLBACK AND CHAIN"),
            q("START TRANSACTION"),
            q("SET TRANSACTION DEFERRABLE"),
            q("ROLLBACK AND CHAIN"),
            q("SELECT 1/0"),
            q("COMMIT AND CHAIN"),
            q("ROLLBACK; BEGIN READ ONLY; SAVEPOINT a"),
            q("SELECT 1/0"),
            q("COMMIT AND CHAIN"),
            q("ROLLBACK; BEGIN; SAVEPOINT b; SET TRANSACTION READ ONLY; SAVEPOINT c"),
            q("SELECT 1/0"),
            q("ROLLBACK AND CHAIN"),
            q("SAVEPOINT b; SET TRANSACTION READ ONLY"),
            q("COMMIT AND CHAIN"),
            q("ROLLBACK"),
        ],
        // Modes of a nested BEGIN, of an implicit block that BEGIN takes
        // over, and inside savepoints.
        vec![
            q("BEGIN"),
            q("BEGIN READ ONLY"),
            q("ROLLBACK"),
            q("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; BEGIN"),
            q("COMMIT"),
            q("BEGIN"),
            q("SAVEPOINT a"),
            q("SET TRANSACTION READ ONLY"),
            q("RELEASE a"),
            q("SAVEPOINT b"),
            q("SET TRANSACTION READ ONLY"),
            q("ROLLBACK TO b"),
            q("COMMIT"),
        ],
        // Reported GUCs: SET LOCAL … TO DEFAULT, and the server's spelling
        // when nothing is reported.
        vec![
            q("SET TimeZone = 'Asia/Tokyo'"),
            q("BEGIN"),
            q("SET LOCAL TimeZone TO DEFAULT"),
            q("COMMIT"),
            q("SET TimeZone = 'Europe/Paris'"),
            q("SET TIME ZONE 'europe/paris'"),
        ],
        // RESET ALL skips a GUC that SET LOCAL put back to its default.
        vec![
            q("SET statement_timeout = '1min'"),
            q("SET work_mem = '8MB'"),
            q("BEGIN"),
            q("SET LOCAL statement_timeout TO DEFAULT; SET LOCAL work_mem = '64kB'"),
            q("RESET ALL"),
            q("COMMIT"),
        ],
        // The text of a PREPARE after a comment, which a Parse message
        // keeps and a split query string drops.
        vec![batch(&["-- note\nPREPARE p1 AS SELECT 1"])],
    ]
}

fn seed() -> u64 {
    match std::env::var("REPRISE_TEST_SEED") {
        Ok(text) => text.trim().parse().expect("REPRISE_TEST_SEED is a u64"),
        Err(_) => rand::random(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracker_matches_the_server_through_random_sequences() {
    let started = Instant::now();
    let seed = seed();
    let only: Option<usize> = std::env::var("REPRISE_TEST_SEQUENCE").ok().map(|text| {
        text.trim()
            .parse()
            .expect("REPRISE_TEST_SEQUENCE is an index")
    });
    eprintln!("state_truth: seed {seed}");

    let harness = Harness::start().await;
    let (admin, _messages) = harness.connect_direct().await;
    admin.batch_execute(SETUP).await.expect("setup");

    let mut counts = Counts::default();
    for (index, script) in regressions().into_iter().enumerate() {
        match run_sequence(harness.proxy, seed, index, Some(script)).await {
            Ok(regression) => counts.add(&regression),
            Err(failure) => panic!("{failure}"),
        }
    }

    // More for a soak run.
    let sequences = std::env::var("REPRISE_TEST_SEQUENCES")
        .ok()
        .map_or(SEQUENCES, |text| {
            text.trim()
                .parse()
                .expect("REPRISE_TEST_SEQUENCES is a count")
        });
    let indexes: Vec<usize> = match only {
        Some(index) => vec![index],
        None => (0..sequences).collect(),
    };
    let indexes = Arc::new(indexes);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let indexes = Arc::clone(&indexes);
        let next = Arc::clone(&next);
        let proxy = harness.proxy;
        workers.push(tokio::spawn(async move {
            let mut counts = Counts::default();
            loop {
                let at = next.fetch_add(1, Ordering::Relaxed);
                let Some(&index) = indexes.get(at) else {
                    return Ok(counts);
                };
                match run_sequence(proxy, seed, index, None).await {
                    Ok(sequence) => counts.add(&sequence),
                    Err(failure) => {
                        // The others stop after their current sequence.
                        next.store(indexes.len(), Ordering::Relaxed);
                        return Err(failure);
                    }
                }
            }
        }));
    }
    let mut failures: Vec<String> = Vec::new();
    for worker in workers {
        match worker.await.expect("worker") {
            Ok(worker_counts) => counts.add(&worker_counts),
            Err(failure) => failures.push(failure),
        }
    }
    if let Some(failure) = failures.first() {
        panic!("{failure}");
    }

    eprintln!(
        "state_truth: seed {seed}: {} sequences, {} steps ({} simple, {} multi-statement, {} extended), \
         {} failing, {} in a transaction, {} in a failed one, {} after an unclassified statement, \
         {} restore checks, {:.1?}",
        counts.sequences,
        counts.steps,
        counts.simple,
        counts.multi_statement,
        counts.extended,
        counts.failing,
        counts.in_transaction,
        counts.failed_transaction,
        counts.unclassified,
        counts.restore_checks,
        started.elapsed()
    );
    if only.is_none() {
        let categories = [
            ("sequences", counts.sequences),
            ("steps", counts.steps),
            ("simple steps", counts.simple),
            ("multi-statement steps", counts.multi_statement),
            ("extended steps", counts.extended),
            ("failing steps", counts.failing),
            ("steps in a transaction", counts.in_transaction),
            ("steps in a failed transaction", counts.failed_transaction),
            ("restore checks", counts.restore_checks),
        ];
        for (what, count) in categories {
            assert!(count > 0, "seed {seed}: no {what} ran");
        }
    }
}
