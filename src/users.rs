//! The users file: the passwords Reprise uses to log in to servers on a
//! client's behalf.
//!
//! The format is PgBouncer's auth_file: one `"user" "password"` pair per
//! line, each a double-quoted string in which a doubled quote stands for one
//! quote. Blank lines and lines starting with `#` or `;` are comments.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

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

#[derive(Clone, Debug, Default)]
pub struct Users {
    passwords: HashMap<String, Password>,
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
        let mut passwords = HashMap::new();
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
            passwords.insert(user, Password(password));
        }
        Ok(Users { passwords })
    }

    pub fn password(&self, user: &str) -> Option<&Password> {
        self.passwords.get(user)
    }

    pub fn len(&self) -> usize {
        self.passwords.len()
    }

    pub fn is_empty(&self) -> bool {
        self.passwords.is_empty()
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
        assert_eq!(
            users.password("alice").map(Password::expose),
            Some("s3cret")
        );
        assert_eq!(
            users.password("bob").map(Password::expose),
            Some("say \"hi\"")
        );
        assert!(users.password("carol").is_none());
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
    fn never_prints_a_password() {
        assert_eq!(format!("{:?}", Password::new("hunter2")), "Password(***)");
    }
}
