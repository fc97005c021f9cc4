//! The scenario format of `replay-tests/` (see its README.md): one
//! directive per line, `keyword: argument`; `#` starts a comment line; a
//! line that begins with whitespace continues the previous argument.

use std::fmt;

/// A client message, ready to send.
pub type Wire = Vec<u8>;

/// What the client does and waits for as one unit: everything it sends
/// in one write, answered by `readies` ReadyForQuery messages.
#[derive(Debug, Default)]
pub struct Step {
    /// The line the step ends on, for messages.
    pub line: usize,
    pub label: String,
    pub send: Wire,
    pub readies: usize,
}

/// A boundary in a transcript: `messages` of step `step` (counted from 1)
/// received. `step` one past the last means the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Point {
    pub step: usize,
    pub messages: usize,
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.step, self.messages)
    }
}

/// A range of boundaries where a cut must end the session with an error.
#[derive(Debug)]
pub struct Expectation {
    pub sqlstate: String,
    /// The cause code the error's DETAIL starts with.
    pub cause: String,
    pub from: Point,
    /// Exclusive.
    pub to: Point,
}

#[derive(Debug, Default)]
pub struct Scenario {
    pub name: String,
    /// Run on a direct server connection once, in a fresh database.
    pub schema: Vec<String>,
    /// Run on a direct server connection before every run.
    pub setup: Vec<String>,
    pub steps: Vec<Step>,
    pub expectations: Vec<Expectation>,
    /// Steps whose data rows may differ between runs (counted from 1).
    pub volatile: Vec<usize>,
}

impl Scenario {
    /// The declared error for a cut at `point`, if any.
    pub fn expected_error(&self, point: Point) -> Option<&Expectation> {
        self.expectations
            .iter()
            .find(|expectation| expectation.from <= point && point < expectation.to)
    }
}

/// The part of a step being built.
#[derive(Default)]
struct Open {
    send: Wire,
    readies: usize,
    labels: Vec<String>,
    pipeline: bool,
    copy: bool,
}

pub fn parse(name: &str, text: &str) -> Result<Scenario, String> {
    let mut scenario = Scenario {
        name: name.to_owned(),
        ..Scenario::default()
    };
    let mut lines: Vec<(usize, String, String)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        if raw.trim().is_empty() || raw.trim_start().starts_with('#') {
            continue;
        }
        if raw.starts_with([' ', '\t']) {
            let Some(last) = lines.last_mut() else {
                return Err(format!(
                    "line {number}: a continuation line with nothing to continue"
                ));
            };
            last.2.push('\n');
            last.2.push_str(raw.trim());
            continue;
        }
        let Some((keyword, argument)) = raw.split_once(':') else {
            return Err(format!("line {number}: expected `keyword: argument`"));
        };
        lines.push((
            number,
            keyword.trim().to_owned(),
            argument.trim().to_owned(),
        ));
    }
    let mut open = Open::default();
    for (number, keyword, argument) in lines {
        let at = |problem: String| format!("line {number}: {problem}");
        let fields = || argument.split('|').map(str::trim).collect::<Vec<_>>();
        if open.copy && !matches!(keyword.as_str(), "data" | "copy-done" | "copy-fail") {
            return Err(at(format!(
                "`{keyword}` inside a COPY; end it with copy-done or copy-fail"
            )));
        }
        match keyword.as_str() {
            "schema" => scenario.schema.push(argument),
            "setup" => scenario.setup.push(argument),
            "query" => {
                open.send.extend(message(b'Q', &[cstr(&argument)]));
                open.readies += 1;
                open.labels.push(format!("query {}", short(&argument)));
                if !open.pipeline {
                    close(&mut scenario, &mut open, number);
                }
            }
            "parse" => {
                // Only the first bar separates: SQL may hold `||`.
                let Some((name, sql)) = argument.split_once('|') else {
                    return Err(at("parse: NAME | SQL".to_owned()));
                };
                let (name, sql) = (name.trim(), sql.trim());
                let mut body = cstr(name);
                body.extend(cstr(sql));
                body.extend(0i16.to_be_bytes());
                open.send.extend(message(b'P', &[body]));
                open.labels.push(format!("parse {}", short(sql)));
            }
            "bind" => {
                let fields = fields();
                let [portal, statement, params @ ..] = &fields[..] else {
                    return Err(at("bind: PORTAL | STATEMENT | PARAM ...".to_owned()));
                };
                let params: Vec<&str> = if params == [""] {
                    Vec::new()
                } else {
                    params.to_vec()
                };
                let mut body = cstr(portal);
                body.extend(cstr(statement));
                body.extend(0i16.to_be_bytes());
                body.extend((params.len() as i16).to_be_bytes());
                for param in &params {
                    if *param == "NULL" {
                        body.extend((-1i32).to_be_bytes());
                    } else {
                        body.extend((param.len() as i32).to_be_bytes());
                        body.extend(param.as_bytes());
                    }
                }
                body.extend(0i16.to_be_bytes());
                open.send.extend(message(b'B', &[body]));
            }
            "execute" => {
                let fields = fields();
                let (portal, rows) = match &fields[..] {
                    [portal] => (*portal, 0),
                    [portal, rows] => (
                        *portal,
                        rows.parse::<i32>()
                            .map_err(|_| at(format!("row limit {rows:?} is not a number")))?,
                    ),
                    _ => return Err(at("execute: PORTAL [| MAX_ROWS]".to_owned())),
                };
                let mut body = cstr(portal);
                body.extend(rows.to_be_bytes());
                open.send.extend(message(b'E', &[body]));
                open.labels.push(format!("execute {portal:?}"));
            }
            "describe" | "close" => {
                let (kind, name) = argument.split_once(' ').unwrap_or((argument.as_str(), ""));
                let kind = match kind {
                    "S" => b'S',
                    "P" => b'P',
                    _ => return Err(at(format!("{keyword}: S NAME or P NAME"))),
                };
                let mut body = vec![kind];
                body.extend(cstr(name.trim()));
                let tag = if keyword == "describe" { b'D' } else { b'C' };
                open.send.extend(message(tag, &[body]));
            }
            "sync" => {
                open.send.extend(message(b'S', &[]));
                open.readies += 1;
                if !open.pipeline {
                    close(&mut scenario, &mut open, number);
                }
            }
            "pipeline" => {
                if open.pipeline {
                    return Err(at("a pipeline is already open".to_owned()));
                }
                open.pipeline = true;
            }
            "wait" => {
                if !open.pipeline || open.readies == 0 {
                    return Err(at("wait ends a pipeline that sent something".to_owned()));
                }
                close(&mut scenario, &mut open, number);
            }
            "copy" => {
                open.send.extend(message(b'Q', &[cstr(&argument)]));
                open.readies += 1;
                open.labels.push(format!("copy {}", short(&argument)));
                open.copy = true;
            }
            "data" => {
                if !open.copy {
                    return Err(at("data outside a COPY".to_owned()));
                }
                let mut row = argument.into_bytes();
                row.push(b'\n');
                open.send.extend(message(b'd', &[row]));
            }
            "copy-done" | "copy-fail" => {
                if !open.copy {
                    return Err(at(format!("{keyword} outside a COPY")));
                }
                open.copy = false;
                if keyword == "copy-done" {
                    open.send.extend(message(b'c', &[]));
                } else {
                    open.send.extend(message(b'f', &[cstr(&argument)]));
                }
                if !open.pipeline {
                    close(&mut scenario, &mut open, number);
                }
            }
            "volatile" => {
                let step = argument
                    .parse()
                    .map_err(|_| at(format!("volatile: a step number, not {argument:?}")))?;
                scenario.volatile.push(step);
            }
            "expect" => scenario
                .expectations
                .push(expectation(&argument).map_err(at)?),
            other => return Err(at(format!("unknown directive `{other}`"))),
        }
    }
    if !open.send.is_empty() || open.pipeline || open.copy {
        return Err("the last step is not finished (sync, wait or copy-done missing)".to_owned());
    }
    if scenario.steps.is_empty() {
        return Err("no steps".to_owned());
    }
    let last = scenario.steps.len();
    for expectation in &scenario.expectations {
        let past = |point: Point| point.step != usize::MAX && point.step > last + 1;
        if past(expectation.from) || past(expectation.to) {
            return Err(format!(
                "an expectation names a step past the last ({last})"
            ));
        }
    }
    Ok(scenario)
}

fn close(scenario: &mut Scenario, open: &mut Open, line: usize) {
    let done = std::mem::take(open);
    scenario.steps.push(Step {
        line,
        label: done.labels.join("; "),
        send: done.send,
        readies: done.readies,
    });
}

/// `SQLSTATE CAUSE from S.M to S.M` (`to end` for the end).
fn expectation(argument: &str) -> Result<Expectation, String> {
    let words: Vec<&str> = argument.split_whitespace().collect();
    let ["from", from, "to", to] = words.get(2..).unwrap_or_default() else {
        return Err("expect: SQLSTATE CAUSE from STEP.MESSAGES to STEP.MESSAGES|end".to_owned());
    };
    let point = |text: &str| -> Result<Point, String> {
        if text == "end" {
            return Ok(Point {
                step: usize::MAX,
                messages: 0,
            });
        }
        let (step, messages) = text.split_once('.').unwrap_or((text, "0"));
        Ok(Point {
            step: step
                .parse()
                .map_err(|_| format!("{text:?} is not STEP.MESSAGES"))?,
            messages: messages
                .parse()
                .map_err(|_| format!("{text:?} is not STEP.MESSAGES"))?,
        })
    };
    Ok(Expectation {
        sqlstate: words[0].to_owned(),
        cause: words[1].to_owned(),
        from: point(from)?,
        to: point(to)?,
    })
}

fn cstr(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

fn message(tag: u8, parts: &[Vec<u8>]) -> Wire {
    let len: usize = parts.iter().map(Vec::len).sum();
    let mut out = vec![tag];
    out.extend(((len + 4) as i32).to_be_bytes());
    for part in parts {
        out.extend(part);
    }
    out
}

fn short(sql: &str) -> String {
    let line = sql.lines().next().unwrap_or_default();
    if line.len() > 40 {
        format!(
            "{}…",
            &line[..line.char_indices().nth(40).map_or(line.len(), |(i, _)| i)]
        )
    } else {
        line.to_owned()
    }
}
