//! What `reprise journal stats` and `reprise journal inspect` compute from
//! a scan: counts per record kind, sessions, the template dedup ratio,
//! safe-point intervals and replay-log sizes, and a readable summary of a
//! command's client messages.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use super::reader::{Damage, ScannedRecord};
use super::record::{Omitted, Record, RecordKind};
use super::recovery::Recovery;
use crate::template::TemplateId;

/// Nearest-rank percentiles of a set of values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Distribution {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Distribution {
    pub fn of(mut values: Vec<u64>) -> Distribution {
        values.sort_unstable();
        let rank = |percent: u64| -> u64 {
            let n = values.len() as u64;
            // Nearest rank: the smallest value with at least `percent` of
            // the values at or below it.
            let index = (percent * n).div_ceil(100).max(1) - 1;
            values.get(index as usize).copied().unwrap_or(0)
        };
        Distribution {
            count: values.len() as u64,
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: values.last().copied().unwrap_or(0),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindCount {
    pub records: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub segments: u64,
    pub segment_bytes: u64,
    /// Whole records read, by kind name, in [`RecordKind::ALL`] order.
    pub records: BTreeMap<&'static str, KindCount>,
    pub sessions: Sessions,
    pub commands: Commands,
    pub templates: Templates,
    /// Between consecutive safe points of one session; a session's start
    /// counts as its first safe point.
    pub safe_point_interval_micros: Distribution,
    pub commands_between_safe_points: Distribution,
    /// Message bytes of the commands between consecutive safe points: what
    /// the in-memory replay log held at most for that stretch.
    pub replay_log_bytes: Distribution,
    pub damage: Vec<DamageReport>,
    pub checkpoint: CheckpointReport,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sessions {
    pub started: u64,
    pub ended: u64,
    pub open: u64,
    /// Open with commands since their last safe point (or records lost to
    /// the size limit): work a crash interrupted.
    pub unfinished: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Commands {
    pub count: u64,
    /// Message bytes as sent, including those of omitted messages.
    pub message_bytes: u64,
    /// Commands written without their messages, by reason.
    pub omitted: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Templates {
    /// Template records read (a definition is written again once the
    /// segments holding it are gone).
    pub definitions: u64,
    pub distinct: u64,
    /// Session starts and safe points naming a template.
    pub references: u64,
    /// References per distinct template: how many copies dedup saved.
    pub dedup_ratio: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamageReport {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    pub reason: String,
    pub zeros: bool,
    pub tail: bool,
    /// The torn tail of the newest segment, which recovery truncates.
    pub torn_tail: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckpointReport {
    pub found: bool,
    pub problems: Vec<String>,
}

/// Where a session stands since its last safe point.
#[derive(Default)]
struct Open {
    boundary_at: Option<u64>,
    commands: u64,
    bytes: u64,
}

/// Gathers a [`Report`] record by record, so that a journal of any size
/// is read in one pass with memory for one value per interval.
#[derive(Default)]
pub struct Collector {
    kinds: HashMap<RecordKind, KindCount>,
    sessions: Sessions,
    commands: Commands,
    definitions: u64,
    distinct: HashSet<TemplateId>,
    references: u64,
    open: HashMap<u64, Open>,
    intervals: Vec<u64>,
    between: Vec<u64>,
    replay_bytes: Vec<u64>,
}

impl Collector {
    pub fn record(&mut self, scanned: &ScannedRecord) {
        let count = self.kinds.entry(scanned.record.kind()).or_default();
        count.records += 1;
        count.bytes += scanned.len;
        match &scanned.record {
            Record::Template { id, .. } => {
                self.definitions += 1;
                self.distinct.insert(*id);
            }
            Record::SessionStart { session, at, .. } => {
                self.sessions.started += 1;
                self.references += 1;
                self.open.insert(
                    *session,
                    Open {
                        boundary_at: Some(*at),
                        ..Open::default()
                    },
                );
            }
            Record::Command {
                session,
                omitted,
                message_len,
                ..
            } => {
                self.commands.count += 1;
                self.commands.message_bytes += message_len;
                if *omitted != Omitted::No {
                    *self.commands.omitted.entry(omitted.name()).or_default() += 1;
                }
                // A session whose start lies before the journal's first
                // segment still counts its commands.
                let open = self.open.entry(*session).or_default();
                open.commands += 1;
                open.bytes += message_len;
            }
            Record::SafePoint { session, at, .. } => {
                self.references += 1;
                let open = self.open.entry(*session).or_default();
                if let Some(previous) = open.boundary_at {
                    self.intervals.push(at.saturating_sub(previous));
                    self.between.push(open.commands);
                    self.replay_bytes.push(open.bytes);
                }
                *open = Open {
                    boundary_at: Some(*at),
                    ..Open::default()
                };
            }
            Record::Outcome { .. } => {}
            Record::SessionEnd { session, .. } => {
                self.sessions.ended += 1;
                self.open.remove(session);
            }
        }
    }

    pub fn finish(self, recovery: &Recovery) -> Report {
        let mut records = BTreeMap::new();
        for kind in RecordKind::ALL {
            records.insert(
                kind.name(),
                self.kinds.get(&kind).cloned().unwrap_or_default(),
            );
        }
        let distinct = self.distinct.len() as u64;
        Report {
            segments: recovery.segments.len() as u64,
            segment_bytes: recovery.segments.iter().map(|scan| scan.len).sum(),
            records,
            sessions: Sessions {
                open: recovery.sessions.len() as u64,
                unfinished: recovery.unfinished().count() as u64,
                ..self.sessions
            },
            commands: self.commands,
            templates: Templates {
                definitions: self.definitions,
                distinct,
                references: self.references,
                dedup_ratio: (distinct > 0).then(|| self.references as f64 / distinct as f64),
            },
            safe_point_interval_micros: Distribution::of(self.intervals),
            commands_between_safe_points: Distribution::of(self.between),
            replay_log_bytes: Distribution::of(self.replay_bytes),
            damage: recovery
                .damage
                .iter()
                .map(|damage| DamageReport::new(damage, recovery.torn_tail.as_ref()))
                .collect(),
            checkpoint: CheckpointReport {
                found: recovery.checkpoint.is_some(),
                problems: recovery.checkpoint_problems.clone(),
            },
        }
    }
}

impl DamageReport {
    pub fn new(damage: &Damage, torn_tail: Option<&Damage>) -> DamageReport {
        DamageReport {
            segment: damage.segment,
            offset: damage.offset,
            len: damage.len,
            reason: damage.kind.to_string(),
            zeros: damage.zeros,
            tail: damage.tail,
            torn_tail: Some(damage) == torn_tail,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |f: &mut fmt::Formatter<'_>, name: &str, value: String| {
            writeln!(f, "  {name:<28} {value}")
        };
        writeln!(f, "segments")?;
        row(f, "count", self.segments.to_string())?;
        row(f, "bytes", self.segment_bytes.to_string())?;
        writeln!(f, "records{:>30} {:>14}", "records", "bytes")?;
        for kind in RecordKind::ALL {
            let count = self.records.get(kind.name()).cloned().unwrap_or_default();
            writeln!(
                f,
                "  {:<20} {:>14} {:>14}",
                kind.name(),
                count.records,
                count.bytes
            )?;
        }
        writeln!(f, "sessions")?;
        row(f, "started", self.sessions.started.to_string())?;
        row(f, "ended", self.sessions.ended.to_string())?;
        row(f, "still open", self.sessions.open.to_string())?;
        row(
            f,
            "with unfinished work",
            self.sessions.unfinished.to_string(),
        )?;
        writeln!(f, "commands")?;
        row(f, "count", self.commands.count.to_string())?;
        row(f, "message bytes", self.commands.message_bytes.to_string())?;
        for omitted in [Omitted::Credential, Omitted::OverBound] {
            let count = self.commands.omitted.get(omitted.name()).copied();
            row(
                f,
                &format!("omitted ({})", omitted.name()),
                count.unwrap_or(0).to_string(),
            )?;
        }
        writeln!(f, "templates")?;
        row(
            f,
            "definitions written",
            self.templates.definitions.to_string(),
        )?;
        row(f, "distinct", self.templates.distinct.to_string())?;
        row(f, "references", self.templates.references.to_string())?;
        row(
            f,
            "dedup ratio",
            self.templates
                .dedup_ratio
                .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.1}")),
        )?;
        writeln!(
            f,
            "between safe points{:>18} {:>10} {:>10} {:>10} {:>10}",
            "count", "p50", "p90", "p99", "max"
        )?;
        let distribution = |f: &mut fmt::Formatter<'_>, name: &str, d: &Distribution| {
            writeln!(
                f,
                "  {name:<24} {:>10} {:>10} {:>10} {:>10} {:>10}",
                d.count, d.p50, d.p90, d.p99, d.max
            )
        };
        distribution(f, "interval (µs)", &self.safe_point_interval_micros)?;
        distribution(f, "commands", &self.commands_between_safe_points)?;
        distribution(f, "replay log (bytes)", &self.replay_log_bytes)?;
        writeln!(f, "checkpoint")?;
        row(
            f,
            "found",
            if self.checkpoint.found { "yes" } else { "no" }.to_owned(),
        )?;
        for problem in &self.checkpoint.problems {
            writeln!(f, "  problem: {problem}")?;
        }
        writeln!(f, "damage")?;
        if self.damage.is_empty() {
            writeln!(f, "  none")?;
        }
        for damage in &self.damage {
            writeln!(
                f,
                "  segment {} offset {}: {} byte{}{} ({}){}{}",
                damage.segment,
                damage.offset,
                damage.len,
                if damage.len == 1 { "" } else { "s" },
                if damage.zeros { ", all zero" } else { "" },
                damage.reason,
                if damage.tail {
                    ", up to the end of the segment"
                } else {
                    ""
                },
                if damage.torn_tail { " [torn tail]" } else { "" },
            )?;
        }
        Ok(())
    }
}

/// One client message of a command, as far as the tools show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MessageSummary {
    /// The message type byte, or `?` for bytes that do not frame.
    pub tag: String,
    /// The whole message, tag included.
    pub len: u64,
    /// The SQL of a Query or Parse message (lossy UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// Splits a command's client messages (tag, length, body, as in
/// <https://www.postgresql.org/docs/current/protocol-message-formats.html>)
/// and reads the SQL of Query and Parse. Bytes that do not frame end the
/// list with one `?` entry: the journal may hold anything a client sent.
pub fn summarize_messages(mut data: &[u8]) -> Vec<MessageSummary> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = data
            .get(1..5)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let Some(len) = len.filter(|len| *len >= 4 && *len < data.len()) else {
            out.push(MessageSummary {
                tag: "?".into(),
                len: data.len() as u64,
                text: None,
            });
            break;
        };
        let tag = data[0];
        let body = &data[5..1 + len];
        let text = match tag {
            b'Q' => Some(cstring(body)),
            // Parse: statement name, then the query.
            b'P' => body
                .iter()
                .position(|byte| *byte == 0)
                .map(|name_end| cstring(&body[name_end + 1..])),
            _ => None,
        };
        out.push(MessageSummary {
            tag: char::from(tag).escape_default().to_string(),
            len: (1 + len) as u64,
            text,
        });
        data = &data[1 + len..];
    }
    out
}

fn cstring(bytes: &[u8]) -> String {
    let end = bytes
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::tests::samples;
    use crate::journal::segment::Position;

    fn scanned(record: Record, offset: u64) -> ScannedRecord {
        let mut out = Vec::new();
        record.encode(&mut out);
        ScannedRecord {
            position: Position { segment: 1, offset },
            len: out.len() as u64,
            record,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let d = Distribution::of((1..=100).rev().collect());
        assert_eq!(
            (d.count, d.p50, d.p90, d.p99, d.max),
            (100, 50, 90, 99, 100)
        );
        assert_eq!(Distribution::of(vec![]), Distribution::default());
        let d = Distribution::of(vec![7]);
        assert_eq!((d.p50, d.p99, d.max), (7, 7, 7));
    }

    #[test]
    fn counts_kinds_sessions_and_intervals() {
        let mut collector = Collector::default();
        for (i, record) in samples().into_iter().enumerate() {
            collector.record(&scanned(record, 40 + 1000 * i as u64));
        }
        let report = collector.finish(&Recovery::default());
        assert_eq!(report.records["command"].records, 2);
        assert_eq!(report.records["template"].records, 1);
        assert!(report.records["command"].bytes > 0);
        assert_eq!(report.sessions.started, 1);
        assert_eq!(report.sessions.ended, 1);
        assert_eq!(report.commands.count, 2);
        assert_eq!(report.commands.message_bytes, 9 + 40);
        assert_eq!(report.commands.omitted.get("credential"), Some(&1));
        assert_eq!(report.templates.distinct, 1);
        // One session start and one safe point name the template.
        assert_eq!(report.templates.dedup_ratio, Some(2.0));
        // Start at 2, safe point at 5, two commands in between.
        assert_eq!(report.safe_point_interval_micros.max, 3);
        assert_eq!(report.commands_between_safe_points.p50, 2);
        assert_eq!(report.replay_log_bytes.max, 49);
        let text = report.to_string();
        assert!(text.contains("dedup ratio"), "{text}");
        let json = serde_json::to_value(&report).expect("serializes");
        assert_eq!(json["commands"]["count"], 2);
    }

    #[test]
    fn messages_are_split_and_sql_read() {
        let mut data = b"Q\0\0\0\x0dSELECT 1\0".to_vec();
        // Parse: length, name "s", the query, no parameter types.
        data.extend_from_slice(b"P\0\0\0\x12s\0SELECT $1\0\0\0");
        data.extend_from_slice(b"S\0\0\0\x04");
        data.extend_from_slice(b"Bxx");
        let summary = summarize_messages(&data);
        let tags: Vec<&str> = summary.iter().map(|m| m.tag.as_str()).collect();
        assert_eq!(tags, ["Q", "P", "S", "?"]);
        assert_eq!(summary[0].text.as_deref(), Some("SELECT 1"));
        assert_eq!(summary[1].text.as_deref(), Some("SELECT $1"));
        assert_eq!(summary[3].len, 3);
    }
}
