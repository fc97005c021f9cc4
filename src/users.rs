//! The users file: what clients are checked against, and what Reprise
//! logs in to servers with on a client's behalf.
//!
//! The format is PgBouncer's auth_file: one `"user" "secret"` pair per
//! line, each a double-quoted string in which a doubled quote stands for one
//! quote. Blank lines and lines starting with `#` or `;` are comments. The
//! secret is a password, an MD5 hash (`md5` and 32 hex digits) or a SCRAM
//! verifier (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`),
//! as pg_authid holds them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::auth::scram::{self, Verifier};

#[derive(Debug, thiserror::Error)]
pub enum UsersFileError {
    #[error("cannot read users file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("users file {path}, line {line}: {problem}")]
    Syntax {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// A secret that never shows up in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(text: impl Into<String>) -> Self {
        Password(text.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// `md5` followed by md5(password ‖ user) in hex, as PostgreSQL stores it.
#[derive(Clone, PartialEq, Eq)]
pub struct Md5Hash(String);

impl Md5Hash {
    pub fn parse(text: &str) -> Option<Md5Hash> {
        let hex = text.strip_prefix("md5")?;
        (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Md5Hash(hex.to_ascii_lowercase()))
    }

    pub fn of_password(user: &str, password: &str) -> Md5Hash {
        let digest = md5::Md5::digest([password.as_bytes(), user.as_bytes()].concat());
        Md5Hash(hex(&digest))
    }

    /// What a client answers to an MD5 challenge with this salt.
    pub fn salted(&self, salt: [u8; 4]) -> String {
        let digest = md5::Md5::digest([self.0.as_bytes(), &salt].concat());
        format!("md5{}", hex(&digest))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

use md5::Digest as _;

impl fmt::Debug for Md5Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Md5Hash(***)")
    }
}

/// What is known about one user's password.
#[derive(Clone, Debug)]
pub enum Secret {
    Password(Password),
    Md5(Md5Hash),
    Scram(Verifier),
}

impl Secret {
    /// Reads a users-file or pg_authid secret.
    pub fn parse(text: &str) -> Result<Secret, String> {
        if text.starts_with("SCRAM-SHA-256$") {
            return Verifier::parse(text)
                .map(Secret::Scram)
                .map_err(|err| format!("malformed SCRAM verifier ({err})"));
        }
        Ok(match Md5Hash::parse(text) {
            Some(hash) => Secret::Md5(hash),
            None => Secret::Password(Password(text.to_owned())),
        })
    }
}

/// A user's secret, with the SCRAM verifier of a plain password worked
/// out once, when a client first needs it.
#[derive(Debug)]
pub struct Entry {
    pub secret: Secret,
    derived: OnceLock<Verifier>,
}

impl Entry {
    pub fn new(secret: Secret) -> Entry {
        Entry {
            secret,
            derived: OnceLock::new(),
        }
    }

    /// The verifier a SCRAM exchange checks against; none for an MD5
    /// hash, from which no verifier can be made.
    pub fn verifier(&self) -> Option<&Verifier> {
        match &self.secret {
            Secret::Scram(verifier) => Some(verifier),
            Secret::Password(password) => Some(self.derived.get_or_init(|| {
                use rand::RngCore;
                let mut salt = [0u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut salt);
                Verifier::from_password(password.expose(), &salt, scram::DEFAULT_ITERATIONS)
            })),
            Secret::Md5(_) => None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Users {
    entries: HashMap<String, Arc<Entry>>,
}

impl Users {
    pub fn load(path: &Path) -> Result<Users, UsersFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Users::parse(&text).map_err(|(line, problem)| UsersFileError::Syntax {
            path: path.to_owned(),
            line,
            problem,
        })
    }

    /// Parses the file's text; an error carries the 1-based line number.
    pub fn parse(text: &str) -> Result<Users, (usize, String)> {
        let mut entries = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line_number = index + 1;
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            let (user, rest) = quoted(trimmed)
                .map_err(|problem| (line_number, format!("user name: {problem}")))?;
            let (password, rest) = quoted(rest.trim_start())
                .map_err(|problem| (line_number, format!("password: {problem}")))?;
            if !rest.trim().is_empty() {
                return Err((line_number, "unexpected text after the password".to_owned()));
            }
            if user.is_empty() {
                return Err((line_number, "user name is empty".to_owned()));
            }
            let secret = Secret::parse(&password).map_err(|problem| (line_number, problem))?;
            entries.insert(user, Arc::new(Entry::new(secret)));
        }
        Ok(Users { entries })
    }

    pub fn entry(&self, user: &str) -> Option<&Arc<Entry>> {
        self.entries.get(user)
    }

    pub fn secret(&self, user: &str) -> Option<&Secret> {
        self.entries.get(user).map(|entry| &entry.secret)
    }

    /// What Reprise can log in to a server with as `user` without the
    /// client's help: a password or an MD5 hash, not a bare verifier.
    pub fn login(&self, user: &str) -> Option<crate::auth::Credential> {
        crate::auth::Credential::from_secret(self.secret(user)?)
    }

    /// Whether more users have a SCRAM verifier than another secret.
    pub fn mostly_verifiers(&self) -> bool {
        let verifiers = self
            .entries
            .values()
            .filter(|entry| matches!(entry.secret, Secret::Scram(_)))
            .count();
        2 * verifiers > self.entries.len()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Reads one double-quoted string, returning it and the text after it.
fn quoted(text: &str) -> Result<(String, &str), String> {
    let body = text
        .strip_prefix('"')
        .ok_or("expected a double-quoted string")?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((index, ch)) = chars.next() {
        if ch == '"' {
            if body[index + 1..].starts_with('"') {
                value.push('"');
                chars.next();
            } else {
                return Ok((value, &body[index + 1..]));
            }
        } else {
            value.push(ch);
        }
    }
    Err("missing closing double quote".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbouncer_format() {
        let users = Users::parse(
            "# comment\n\"alice\" \"s3cret\"\n\n\"bob\" \"say \"\"hi\"\"\"\n; other\n",
        )
        .expect("valid");
        assert_eq!(users.len(), 2);
        let password = |user| match users.secret(user) {
            Some(Secret::Password(password)) => Some(password.expose().to_owned()),
            _ => None,
        };
        assert_eq!(password("alice").as_deref(), Some("s3cret"));
        assert_eq!(password("bob").as_deref(), Some("say \"hi\""));
        assert!(users.secret("carol").is_none());
    }

    #[test]
    fn reports_the_line() {
        let (line, problem) = Users::parse("\"a\" \"b\"\n\"c\" d\n").expect_err("bad");
        assert_eq!(line, 2);
        assert!(problem.contains("password"), "{problem}");
        assert_eq!(Users::parse("\"a\" \"b").expect_err("unterminated").0, 1);
        assert_eq!(Users::parse("\"a\" \"b\" x").expect_err("trailing").0, 1);
    }

    #[test]
    fn hashes_and_verifiers() {
        let users = Users::parse(concat!(
            "\"m\" \"md5b52328d7451bfeace80c4b8c338106f9\"\n",
            "\"s\" \"SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$",
            "Xc9qgHgPf3PDy/kNUqJRaBv5zsR3wtNhyPsW8HA7mqc=:",
            "OI6lTJ9yqnZoQYAMoQ2XNtLv5H/Z3jMLpJwXDbPYDWY=\"\n",
        ))
        .expect("valid");
        // md5("secret" || "m")
        assert_eq!(
            users.secret("m").map(
                |s| matches!(s, Secret::Md5(hash) if *hash == Md5Hash::of_password("m", "secret"))
            ),
            Some(true)
        );
        assert!(users.entry("m").expect("m").verifier().is_none());
        assert!(matches!(users.secret("s"), Some(Secret::Scram(_))));
        let bad = Users::parse("\"x\" \"SCRAM-SHA-256$bad\"\n").expect_err("bad verifier");
        assert!(bad.1.contains("SCRAM verifier"), "{}", bad.1);
        // The verifier of a password is made once and then kept.
        let plain = Users::parse("\"p\" \"pw\"\n").expect("valid");
        let entry = plain.entry("p").expect("p");
        let first = entry.verifier().expect("derived").encode();
        assert_eq!(entry.verifier().expect("derived").encode(), first);
        assert!(entry.verifier().expect("derived").matches_password("pw"));
    }

    #[test]
    fn never_prints_a_password() {
        assert_eq!(format!("{:?}", Password::new("hunter2")), "Password(***)");
    }
}
