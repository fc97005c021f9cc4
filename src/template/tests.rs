use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use super::codec::{DecodeError, Reader, Sink};
use super::*;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn settings(pairs: &[(&str, &str)]) -> Template {
    let mut t = Template::default();
    for (name, value) in pairs {
        t.set_setting(name.as_bytes(), b(value));
    }
    t
}

fn rich_template() -> Template {
    let mut t = Template::default();
    t.startup.insert(b("user"), b("alice"));
    t.startup.insert(b("database"), b("shop"));
    t.startup.insert(b("application_name"), b("psql"));
    t.startup.insert(b("options"), b("-c geqo=off"));
    t.set_setting(b"TimeZone", b("Europe/Paris"));
    t.set_setting(b"search_path", b("\"$user\", public"));
    t.role = Some(b("reporting"));
    t.session_authorization = Some(b("bob"));
    t.prepared.insert(
        b("q1"),
        PreparedStatement {
            origin: PreparedOrigin::Protocol,
            query: b("SELECT $1::int + $2"),
            param_types: vec![23, 0],
        },
    );
    t.prepared.insert(
        b("q2"),
        PreparedStatement {
            origin: PreparedOrigin::Sql,
            query: b("PREPARE q2(text) AS SELECT upper($1)"),
            param_types: vec![],
        },
    );
    t.listening.insert(b("orders"));
    t.listening.insert(Bytes::from_static(b"caf\xc3\xa9"));
    t
}

fn rich_replay() -> ReplayState {
    let mut r = ReplayState {
        status: TransactionStatus::InTransaction,
        isolation: Some(IsolationLevel::Serializable),
        read_only: Some(true),
        deferrable: Some(false),
        savepoints: vec![b("a"), b("b"), b("a")],
        ..ReplayState::default()
    };
    r.local_settings.insert(b("work_mem"), b("64MB"));
    r.non_recoverable.insert(NonRecoverable::HoldCursors);
    r
}

// ---- template encoding ----

#[test]
fn empty_template_encoding_is_pinned() {
    // Changing this layout changes every template id; bump the version.
    let expected: &[u8] = &[
        1, b'S', 0, 0, 0, 0, b'G', 0, 0, 0, 0, b'R', 0, b'A', 0, b'P', 0, 0, 0, 0, b'L', 0, 0, 0, 0,
    ];
    assert_eq!(Template::default().canonical_encoding(), expected);
    assert_eq!(
        Template::default().id().as_bytes(),
        blake3::hash(expected).as_bytes()
    );
}

#[test]
fn setting_encoding_is_pinned() {
    let t = settings(&[("a", "bc")]);
    let expected: &[u8] = &[
        1, b'S', 0, 0, 0, 0, b'G', 0, 0, 0, 1, 0, 0, 0, 1, b'a', 0, 0, 0, 2, b'b', b'c', b'R', 0,
        b'A', 0, b'P', 0, 0, 0, 0, b'L', 0, 0, 0, 0,
    ];
    assert_eq!(t.canonical_encoding(), expected);
}

#[test]
fn encoding_is_deterministic() {
    let t = rich_template();
    assert_eq!(t.canonical_encoding(), t.clone().canonical_encoding());
    assert_eq!(t.canonical_encoding(), rich_template().canonical_encoding());
    assert_eq!(t.id(), rich_template().id());
}

#[test]
fn id_is_blake3_of_encoding() {
    let t = rich_template();
    assert_eq!(
        t.id().as_bytes(),
        blake3::hash(&t.canonical_encoding()).as_bytes()
    );
}

#[test]
fn id_does_not_depend_on_insertion_order() {
    let forward = settings(&[("a", "1"), ("b", "2"), ("c", "3")]);
    let backward = settings(&[("c", "3"), ("b", "2"), ("a", "1")]);
    assert_eq!(forward.id(), backward.id());

    let mut x = Template::default();
    x.listening.insert(b("one"));
    x.listening.insert(b("two"));
    let mut y = Template::default();
    y.listening.insert(b("two"));
    y.listening.insert(b("one"));
    assert_eq!(x.id(), y.id());
}

#[test]
fn guc_names_are_case_folded() {
    assert_eq!(
        settings(&[("TimeZone", "UTC")]),
        settings(&[("timezone", "UTC")])
    );
    // Only ASCII folds, as in PostgreSQL; values never fold.
    assert_eq!(
        &fold_guc_name(b"X.\xc3\x89t\xc3\xa9")[..],
        b"x.\xc3\x89t\xc3\xa9"
    );
    assert_ne!(settings(&[("a", "UTC")]), settings(&[("a", "utc")]));

    let mut t = settings(&[("DateStyle", "ISO")]);
    assert_eq!(t.reset_setting(b"DATESTYLE"), Some(b("ISO")));
    assert!(t.settings.is_empty());
}

/// Pairs that a careless encoding (concatenation, missing tags, `None` as
/// empty) would confuse.
fn distinct_templates() -> Vec<(&'static str, Template)> {
    let mut cases = vec![("empty", Template::default())];
    cases.push(("ab=c", settings(&[("ab", "c")])));
    cases.push(("a=bc", settings(&[("a", "bc")])));
    cases.push(("a=, b=", settings(&[("a", ""), ("b", "")])));
    cases.push(("a=b", settings(&[("a", "b")])));
    cases.push(("empty name", settings(&[("", "ab")])));

    let mut startup = Template::default();
    startup.startup.insert(b("a"), b("bc"));
    cases.push(("startup a=bc", startup));

    let role_empty = Template {
        role: Some(b("")),
        ..Template::default()
    };
    cases.push(("role ''", role_empty));

    let role = Template {
        role: Some(b("x")),
        ..Template::default()
    };
    cases.push(("role x", role));

    let auth = Template {
        session_authorization: Some(b("x")),
        ..Template::default()
    };
    cases.push(("session authorization x", auth));

    let auth_empty = Template {
        session_authorization: Some(b("")),
        ..Template::default()
    };
    cases.push(("session authorization ''", auth_empty));

    let prepared = |origin, query: &str, param_types: Vec<u32>| {
        let mut t = Template::default();
        t.prepared.insert(
            b("s"),
            PreparedStatement {
                origin,
                query: b(query),
                param_types,
            },
        );
        t
    };
    cases.push(("sql", prepared(PreparedOrigin::Sql, "q", vec![])));
    cases.push(("protocol", prepared(PreparedOrigin::Protocol, "q", vec![])));
    cases.push((
        "one param",
        prepared(PreparedOrigin::Protocol, "q", vec![0]),
    ));
    cases.push((
        "two params",
        prepared(PreparedOrigin::Protocol, "q", vec![0, 0]),
    ));
    cases.push((
        "other query",
        prepared(PreparedOrigin::Protocol, "r", vec![]),
    ));

    let mut listen_ab = Template::default();
    listen_ab.listening.insert(b("ab"));
    cases.push(("listen ab", listen_ab));

    let mut listen_a_b = Template::default();
    listen_a_b.listening.insert(b("a"));
    listen_a_b.listening.insert(b("b"));
    cases.push(("listen a, b", listen_a_b));

    let mut listen_empty = Template::default();
    listen_empty.listening.insert(b(""));
    cases.push(("listen ''", listen_empty));

    cases.push(("rich", rich_template()));
    cases
}

#[test]
fn different_templates_encode_differently() {
    let cases = distinct_templates();
    for (i, (name_i, ti)) in cases.iter().enumerate() {
        for (name_j, tj) in &cases[i + 1..] {
            assert_ne!(ti, tj, "{name_i} vs {name_j}: test cases must differ");
            assert_ne!(
                ti.canonical_encoding(),
                tj.canonical_encoding(),
                "{name_i} vs {name_j}"
            );
            assert_ne!(ti.id(), tj.id(), "{name_i} vs {name_j}");
        }
    }
}

#[test]
fn template_round_trips() {
    // decode ∘ encode = id proves the encoding injective.
    for (name, t) in distinct_templates() {
        let bytes = t.canonical_encoding();
        assert_eq!(Template::decode(&bytes).as_ref(), Ok(&t), "{name}");
    }
}

#[test]
fn template_decode_rejects_non_canonical_input() {
    let bytes = rich_template().canonical_encoding();
    for cut in 0..bytes.len() {
        assert!(Template::decode(&bytes[..cut]).is_err(), "prefix {cut}");
    }

    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(Template::decode(&trailing), Err(DecodeError::Trailing(1)));

    let mut version = bytes.clone();
    version[0] = 2;
    assert_eq!(Template::decode(&version), Err(DecodeError::Version(2)));

    // Settings b then a: a valid layout in the wrong order.
    let unsorted: &[u8] = &[
        1, b'S', 0, 0, 0, 0, b'G', 0, 0, 0, 2, 0, 0, 0, 1, b'b', 0, 0, 0, 0, 0, 0, 0, 1, b'a', 0,
        0, 0, 0, b'R', 0, b'A', 0, b'P', 0, 0, 0, 0, b'L', 0, 0, 0, 0,
    ];
    assert_eq!(Template::decode(unsorted), Err(DecodeError::Unsorted));

    // A huge claimed count fails before anything is allocated for it.
    let huge: &[u8] = &[1, b'S', 0xff, 0xff, 0xff, 0xfe];
    assert_eq!(Template::decode(huge), Err(DecodeError::Truncated));
}

#[test]
fn long_lengths_have_one_form() {
    let mut out = Vec::new();
    out.put_len(0xffff_fffe);
    out.put_len(0xffff_ffff);
    assert_eq!(
        out,
        [0xff, 0xff, 0xff, 0xfe, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]
    );

    let short_in_long_form = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3];
    assert_eq!(
        Reader::new(&short_in_long_form).len(),
        Err(DecodeError::NonCanonicalLength(3))
    );
}

// ---- ids ----

#[test]
fn template_id_hex_round_trips() {
    let id = rich_template().id();
    let hex = id.to_string();
    assert_eq!(hex.len(), 64);
    assert!(hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
    assert_eq!(hex.parse::<TemplateId>(), Ok(id));
    assert_eq!(hex.to_uppercase().parse::<TemplateId>(), Ok(id));

    let zero = TemplateId::from_bytes([0; 32]);
    assert_eq!(zero.to_string(), "0".repeat(64));
    let mut bytes = [0u8; 32];
    bytes[0] = 0xab;
    bytes[31] = 0x01;
    let expected = format!("ab{}01", "0".repeat(60));
    assert_eq!(TemplateId::from_bytes(bytes).to_string(), expected);

    for bad in ["", "00", &"0".repeat(63), &"0".repeat(65), &"g".repeat(64)] {
        assert_eq!(bad.parse::<TemplateId>(), Err(ParseTemplateIdError));
    }
    // Multi-byte characters must not be split into digits.
    let wide = format!("é{}", "0".repeat(62));
    assert_eq!(wide.len(), 64);
    assert_eq!(wide.parse::<TemplateId>(), Err(ParseTemplateIdError));
}

#[test]
fn state_hash_displays_hex() {
    let hash = state_hash(Template::default().id(), &ReplayState::default());
    let hex = hash.to_string();
    assert_eq!(hex.len(), 64);
    assert!(hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
}

// ---- replay state ----

#[test]
fn replay_default_is_a_safe_point() {
    assert!(ReplayState::default().is_safe_point());
    assert!(!rich_replay().is_safe_point());
    let expected: &[u8] = &[
        1, b'X', b'I', b'V', 0, b'O', 0, b'F', 0, b'L', 0, 0, 0, 0, b'S', 0, 0, 0, 0, b'N', 0, 0,
    ];
    assert_eq!(ReplayState::default().canonical_encoding(), expected);
}

/// The default plus one state per field that differs from it in only that
/// field, and a few that differ subtly from each other.
fn distinct_replay_states() -> Vec<(&'static str, ReplayState)> {
    let base = ReplayState::default;
    let mut cases = vec![("default", base())];
    cases.push((
        "in transaction",
        ReplayState {
            status: TransactionStatus::InTransaction,
            ..base()
        },
    ));
    cases.push((
        "failed",
        ReplayState {
            status: TransactionStatus::Failed,
            ..base()
        },
    ));
    for (name, level) in [
        ("read uncommitted", IsolationLevel::ReadUncommitted),
        ("read committed", IsolationLevel::ReadCommitted),
        ("repeatable read", IsolationLevel::RepeatableRead),
        ("serializable", IsolationLevel::Serializable),
    ] {
        cases.push((
            name,
            ReplayState {
                isolation: Some(level),
                ..base()
            },
        ));
    }
    cases.push((
        "read only",
        ReplayState {
            read_only: Some(true),
            ..base()
        },
    ));
    cases.push((
        "read write",
        ReplayState {
            read_only: Some(false),
            ..base()
        },
    ));
    cases.push((
        "deferrable",
        ReplayState {
            deferrable: Some(true),
            ..base()
        },
    ));
    cases.push((
        "not deferrable",
        ReplayState {
            deferrable: Some(false),
            ..base()
        },
    ));
    let local = |name: &str, value: &str| {
        let mut r = base();
        r.local_settings.insert(b(name), b(value));
        r
    };
    cases.push(("local ab=c", local("ab", "c")));
    cases.push(("local a=bc", local("a", "bc")));
    let savepoints = |names: &[&str]| ReplayState {
        savepoints: names.iter().map(|n| b(n)).collect(),
        ..base()
    };
    cases.push(("savepoint ab", savepoints(&["ab"])));
    cases.push(("savepoints a, b", savepoints(&["a", "b"])));
    cases.push(("savepoints b, a", savepoints(&["b", "a"])));
    cases.push(("savepoints a, a", savepoints(&["a", "a"])));
    cases.push(("savepoint ''", savepoints(&[""])));
    let names = [
        "temp objects",
        "hold cursors",
        "advisory locks",
        "load",
        "snapshot import",
        "unclassified",
    ];
    for (name, kind) in names.into_iter().zip(NonRecoverable::ALL) {
        let mut r = base();
        r.non_recoverable.insert(kind);
        cases.push((name, r));
    }
    cases.push(("rich", rich_replay()));
    cases
}

#[test]
fn state_hash_changes_with_every_replay_field() {
    let id = rich_template().id();
    let cases = distinct_replay_states();
    let mut seen = HashSet::new();
    for (name, replay) in &cases {
        assert!(seen.insert(state_hash(id, replay)), "{name} collides");
    }
    for (i, (name_i, ri)) in cases.iter().enumerate() {
        for (name_j, rj) in &cases[i + 1..] {
            assert_ne!(ri, rj, "{name_i} vs {name_j}: test cases must differ");
        }
    }
}

#[test]
fn state_hash_changes_with_template() {
    let replay = ReplayState::default();
    let a = state_hash(settings(&[("a", "1")]).id(), &replay);
    let b = state_hash(settings(&[("a", "2")]).id(), &replay);
    assert_ne!(a, b);
    assert_eq!(a, state_hash(settings(&[("a", "1")]).id(), &replay));
}

#[test]
fn state_hash_is_blake3_of_id_and_encoding() {
    let id = rich_template().id();
    let replay = rich_replay();
    let mut input = id.as_bytes().to_vec();
    input.extend_from_slice(&replay.canonical_encoding());
    assert_eq!(
        state_hash(id, &replay).as_bytes(),
        blake3::hash(&input).as_bytes()
    );
}

#[test]
fn replay_state_round_trips() {
    for (name, replay) in distinct_replay_states() {
        let bytes = replay.canonical_encoding();
        assert_eq!(ReplayState::decode(&bytes).as_ref(), Ok(&replay), "{name}");
        for cut in 0..bytes.len() {
            assert!(ReplayState::decode(&bytes[..cut]).is_err(), "{name} {cut}");
        }
    }
    let mut unknown_flag = ReplayState::default().canonical_encoding();
    let last = unknown_flag.len() - 1;
    unknown_flag[last] = 0x40;
    assert_eq!(
        ReplayState::decode(&unknown_flag),
        Err(DecodeError::UnknownFlags(0x40))
    );
}

#[test]
fn transaction_status_bytes() {
    for status in [
        TransactionStatus::Idle,
        TransactionStatus::InTransaction,
        TransactionStatus::Failed,
    ] {
        assert_eq!(TransactionStatus::from_byte(status.as_byte()), Some(status));
    }
    assert_eq!(TransactionStatus::from_byte(b'X'), None);
}

#[test]
fn non_recoverable_set() {
    let mut set = NonRecoverableSet::default();
    assert!(set.is_empty());
    set.insert(NonRecoverable::Load);
    set.insert(NonRecoverable::TempObjects);
    set.insert(NonRecoverable::Load);
    assert!(set.contains(NonRecoverable::Load));
    assert!(!set.contains(NonRecoverable::AdvisoryLocks));
    assert_eq!(
        set.iter().collect::<Vec<_>>(),
        [NonRecoverable::TempObjects, NonRecoverable::Load]
    );
    set.remove(NonRecoverable::Load);
    set.remove(NonRecoverable::TempObjects);
    assert!(set.is_empty());
    let all: NonRecoverableSet = NonRecoverable::ALL.into_iter().collect();
    assert_eq!(all.iter().count(), NonRecoverable::ALL.len());
}

// ---- registry ----

#[test]
fn registry_and_refs_are_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Registry>();
    assert_send_sync::<TemplateRef>();
}

#[test]
fn ten_thousand_sessions_share_three_templates() {
    let registry = Arc::new(Registry::new());
    let kinds = [
        &[("search_path", "app"), ("timezone", "UTC")][..],
        &[("timezone", "UTC"), ("search_path", "app")][..],
        &[("search_path", "app")][..],
        &[("DateStyle", "ISO, MDY")][..],
    ];
    // Kinds 0 and 1 are the same settings set in a different order.
    let group = |i: usize| match i % 4 {
        0 | 1 => 0,
        2 => 1,
        _ => 2,
    };
    let mut sessions: Vec<(usize, TemplateRef)> = (0..10_000)
        .map(|i| (group(i), registry.acquire(settings(kinds[i % 4]))))
        .collect();

    assert_eq!(registry.len(), 3);
    assert_eq!(
        registry.stats(),
        RegistryStats {
            templates: 3,
            references: 10_000,
            acquisitions: 10_000,
            dedup_hits: 9_997,
        }
    );
    // Each distinct template is stored once.
    for (g, r) in &sessions {
        let first = &sessions.iter().find(|(h, _)| h == g).map(|(_, r)| r);
        assert!(first.is_some_and(|f| Arc::ptr_eq(f.template(), r.template())));
    }

    let freed = sessions[3].1.id();
    sessions.retain(|(g, _)| *g != 2);
    assert_eq!(registry.len(), 2);
    assert!(registry.get(freed).is_none());

    let kept = sessions[0].1.id();
    assert!(registry.get(kept).is_some());
    drop(sessions);
    assert!(registry.is_empty());
    assert!(registry.get(kept).is_none());
    assert_eq!(registry.stats().references, 0);
}

#[test]
fn clone_keeps_the_template_registered() {
    let registry = Arc::new(Registry::new());
    let first = registry.acquire(rich_template());
    let id = first.id();
    assert_eq!(id, rich_template().id());
    let second = first.clone();
    assert_eq!(registry.stats().references, 2);
    drop(first);
    assert_eq!(
        registry.get(id).as_deref(),
        Some(&rich_template()),
        "a clone still holds it"
    );
    drop(second);
    assert!(registry.is_empty());
    assert_eq!(registry.stats().references, 0);
}

#[test]
fn acquire_by_id() {
    let registry = Arc::new(Registry::new());
    let id = rich_template().id();
    assert!(registry.acquire_id(id).is_none());
    let held = registry.acquire(rich_template());
    let by_id = registry.acquire_id(id);
    assert!(by_id
        .as_ref()
        .is_some_and(|r| Arc::ptr_eq(r.template(), held.template())));
    drop(held);
    assert_eq!(registry.len(), 1);
    drop(by_id);
    assert!(registry.is_empty());
    assert_eq!(registry.stats().dedup_hits, 1);
}

#[test]
fn concurrent_acquire_and_release() {
    let registry = Arc::new(Registry::new());
    let templates: Vec<Template> = (0..3)
        .map(|i| settings(&[("application_name", &format!("app{i}"))]))
        .collect();
    let ids: Vec<TemplateId> = templates.iter().map(Template::id).collect();

    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let registry = Arc::clone(&registry);
            let templates = templates.clone();
            let ids = ids.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in 0..5_000usize {
                    let k = (i + thread) % templates.len();
                    let r = registry.acquire(templates[k].clone());
                    assert_eq!(r.id(), ids[k]);
                    // Whatever other threads drop, a held template stays.
                    assert!(registry.get(ids[k]).is_some());
                    if i % 3 == 0 {
                        held.push(r.clone());
                    }
                    if held.len() > 4 {
                        held.remove(0);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().is_ok(), "a thread panicked");
    }
    assert!(registry.is_empty());
    let stats = registry.stats();
    assert_eq!(stats.references, 0);
    assert_eq!(stats.acquisitions, 8 * 5_000);
}
