//! A hand-written SQL lexer over raw bytes: the first stage of statement
//! classification.
//!
//! It follows PostgreSQL's `scan.l` closely enough that every byte lands in
//! the same kind of token as on the server (string, quoted identifier,
//! comment, word), which is all classification needs: a keyword inside a
//! string or comment must never be mistaken for one outside. It works on
//! bytes because the client encoding need not be UTF-8, and it never
//! allocates.
//!
//! See <https://www.postgresql.org/docs/current/sql-syntax-lexical.html>.

use std::ops::Range;

use memchr::memmem;

/// Session settings that change how statement text is tokenized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LexOptions {
    /// `standard_conforming_strings`: when off, a backslash escapes the next
    /// byte in plain `'…'` strings too, so `'a\'b'` is one string.
    pub standard_conforming_strings: bool,
    /// Whether the client encoding never uses bytes below 0x80 inside a
    /// multibyte character. False for the client-only encodings (SJIS,
    /// BIG5, GBK, UHC, GB18030, JOHAB, SHIFT_JIS_2004), where a trailing
    /// byte can be `'` or `\`: text after the first byte >= 0x80 cannot be
    /// tokenized without decoding, so it becomes an error token.
    pub ascii_safe: bool,
}

impl Default for LexOptions {
    fn default() -> Self {
        Self {
            standard_conforming_strings: true,
            ascii_safe: true,
        }
    }
}

impl LexOptions {
    /// Options for a session with these `standard_conforming_strings` and
    /// `client_encoding` values.
    pub fn for_session(standard_conforming_strings: bool, client_encoding: &str) -> Self {
        Self {
            standard_conforming_strings,
            ascii_safe: encoding_is_ascii_safe(client_encoding),
        }
    }
}

/// Whether a client encoding name (any spelling PostgreSQL accepts) keeps
/// bytes below 0x80 for ASCII. Like `clean_encoding_name` in PostgreSQL's
/// `encnames.c`, comparison ignores case and non-alphanumeric characters.
/// Names PostgreSQL does not know are taken as safe: the server refuses them.
pub fn encoding_is_ascii_safe(name: &str) -> bool {
    // The client-only encodings and their aliases from `pg_encname_tbl`.
    const UNSAFE: &[&[u8]] = &[
        b"big5",
        b"gb18030",
        b"gbk",
        b"johab",
        b"mskanji",
        b"shiftjis",
        b"shiftjis2004",
        b"sjis",
        b"uhc",
        b"win932",
        b"win936",
        b"win949",
        b"win950",
        b"windows932",
        b"windows936",
        b"windows949",
        b"windows950",
    ];
    let cleaned = || {
        name.bytes()
            .filter(u8::is_ascii_alphanumeric)
            .map(|b| b.to_ascii_lowercase())
    };
    !UNSAFE
        .iter()
        .any(|unsafe_name| cleaned().eq(unsafe_name.iter().copied()))
}

/// Why the lexer stopped. After an error token the lexer yields nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LexError {
    #[error("unterminated quoted string")]
    UnterminatedString,
    #[error("unterminated quoted identifier")]
    UnterminatedIdentifier,
    #[error("zero-length delimited identifier")]
    EmptyIdentifier,
    #[error("unterminated dollar-quoted string")]
    UnterminatedDollarString,
    #[error("unterminated /* comment")]
    UnterminatedComment,
    #[error("string constant with Unicode escapes while standard_conforming_strings is off")]
    UnsafeUnicodeString,
    #[error("byte above 0x7f in a client encoding whose characters may contain ASCII bytes")]
    UnsafeEncoding,
    #[error("statement text longer than 4 GiB")]
    TooLong,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// An unquoted keyword or identifier; compare it case-insensitively
    /// (ASCII only, as PostgreSQL folds keywords).
    Word,
    /// `"…"` or `U&"…"`; its text keeps the quotes, and `""` stays doubled.
    QuotedIdent,
    /// `'…'`, `E'…'`, `N'…'`, `B'…'`, `X'…'` or `U&'…'`, continuation lines
    /// included.
    String,
    /// `$tag$…$tag$`.
    DollarString,
    Number,
    /// `$1`.
    Param,
    /// An operator or punctuation: `(`, `)`, `,`, `[`, `]`, `.` and `:` are
    /// always one-byte tokens of their own (`..` is one token).
    Operator,
    /// A `;`.
    Semicolon,
    /// A byte that starts no token (`\`, `{`, a control character…); the
    /// server's grammar rejects it.
    Other,
    /// The rest of the input cannot be tokenized; [`Lexer::error`] says
    /// why. (A fieldless kind keeps lexing results in registers.)
    Error,
}

/// A token: its kind and where it lies in the lexed input.
///
/// The offsets are packed into one `u64` so that a token is a pair of
/// scalars, which Rust returns in two registers: returned through memory,
/// every token cost a store-forwarding stall, and classifying a short
/// statement took twice as long. A protocol message is at most 1 GiB;
/// longer input is one error token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    /// `start | end << 32`.
    span: u64,
}

impl Token {
    #[inline]
    fn new(kind: TokenKind, start: usize, end: usize) -> Self {
        debug_assert!(start <= end && end <= MAX_INPUT);
        Token {
            kind,
            span: start as u64 | (end as u64) << 32,
        }
    }

    /// Offset of the token's first byte in the lexed input.
    #[inline]
    pub fn start(&self) -> usize {
        (self.span & 0xffff_ffff) as usize
    }

    /// Offset just past the token; an error token runs to the end of the
    /// input.
    #[inline]
    pub fn end(&self) -> usize {
        (self.span >> 32) as usize
    }

    pub fn range(&self) -> Range<usize> {
        self.start()..self.end()
    }

    /// The token as written in `sql`, the input it was lexed from.
    #[inline]
    pub fn text<'a>(&self, sql: &'a [u8]) -> &'a [u8] {
        sql.get(self.range()).unwrap_or_default()
    }

    #[inline]
    pub fn lexeme<'a>(&self, sql: &'a [u8]) -> Lexeme<'a> {
        Lexeme {
            kind: self.kind,
            text: self.text(sql),
        }
    }
}

/// A token's kind and text, for matching keywords and names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lexeme<'a> {
    pub kind: TokenKind,
    /// The token as written, prefixes and quotes included.
    pub text: &'a [u8],
}

impl<'a> Lexeme<'a> {
    /// Whether this is the unquoted word `lowercase`, in any case.
    #[inline]
    pub fn is_keyword(&self, lowercase: &[u8]) -> bool {
        self.kind == TokenKind::Word && self.text.eq_ignore_ascii_case(lowercase)
    }

    /// Whether this is the one-byte operator or punctuation `byte`.
    #[inline]
    pub fn is_punct(&self, byte: u8) -> bool {
        self.kind == TokenKind::Operator && self.text == [byte]
    }

    /// The name a word or a plain `"…"` identifier stands for, as it reads
    /// before case folding and with `""` still doubled, and whether it was
    /// quoted; `None` for other tokens, including `U&"…"` whose escapes
    /// would need decoding.
    pub fn name(&self) -> Option<(&'a [u8], bool)> {
        match (self.kind, self.text) {
            (TokenKind::Word, text) => Some((text, false)),
            (TokenKind::QuotedIdent, [b'"', name @ .., b'"']) => Some((name, true)),
            _ => None,
        }
    }

    /// Whether the name of this word or quoted identifier is `lowercase`:
    /// case-insensitively for a word, exactly for a quoted identifier (as
    /// PostgreSQL folds only unquoted names).
    #[inline]
    pub fn names(&self, lowercase: &[u8]) -> bool {
        match self.name() {
            Some((name, false)) => name.eq_ignore_ascii_case(lowercase),
            Some((name, true)) => name == lowercase,
            None => false,
        }
    }
}

/// A token's kind and the offset just past it.
type Lexed = (TokenKind, usize);

#[inline]
fn lexed(kind: TokenKind, end: usize) -> Lexed {
    (kind, end)
}

const SPACE: u8 = 1;
const IDENT_START: u8 = 2;
const IDENT_CONT: u8 = 4;
const OP: u8 = 8;
const DIGIT: u8 = 16;

/// Byte classes as in `scan.l`: every byte >= 0x80 is an identifier byte,
/// which holds for UTF-8 and for every encoding allowed on the server.
static CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut class = 0;
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            class |= SPACE;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            class |= IDENT_START | IDENT_CONT;
        }
        if c.is_ascii_digit() {
            class |= DIGIT | IDENT_CONT;
        }
        if c == b'$' {
            class |= IDENT_CONT;
        }
        if matches!(
            c,
            b'~' | b'!'
                | b'@'
                | b'#'
                | b'^'
                | b'&'
                | b'|'
                | b'`'
                | b'?'
                | b'+'
                | b'-'
                | b'*'
                | b'/'
                | b'%'
                | b'<'
                | b'>'
                | b'='
        ) {
            class |= OP;
        }
        table[b] = class;
        b += 1;
    }
    table
};

#[inline]
fn is(byte: Option<&u8>, class: u8) -> bool {
    byte.is_some_and(|&b| CLASS[usize::from(b)] & class != 0)
}

/// An iterator over the tokens of `sql`. Whitespace and comments are
/// skipped; the first error ends the iteration with an error token.
#[derive(Clone, Debug)]
pub struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
    standard_conforming_strings: bool,
    /// Offset of the first byte that cannot be trusted (>= 0x80 in an
    /// encoding that is not ASCII-safe); `usize::MAX` when there is none.
    first_unsafe: usize,
    done: bool,
    error: Option<LexError>,
}

impl<'a> Lexer<'a> {
    pub fn new(sql: &'a [u8], options: &LexOptions) -> Self {
        let first_unsafe = if options.ascii_safe {
            usize::MAX
        } else {
            sql.iter().position(|&b| b >= 0x80).unwrap_or(usize::MAX)
        };
        Self {
            sql,
            pos: 0,
            standard_conforming_strings: options.standard_conforming_strings,
            first_unsafe,
            done: false,
            error: None,
        }
    }

    /// The offset the next token is looked for from.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Why the lexer stopped at an error token.
    pub fn error(&self) -> Option<LexError> {
        self.error
    }

    fn fail(&mut self, start: usize, error: LexError) -> Token {
        self.error = Some(error);
        self.done = true;
        self.pos = self.sql.len();
        Token::new(TokenKind::Error, start, self.sql.len().min(MAX_INPUT))
    }

    /// Skips whitespace, `--` comments and nested `/* */` comments.
    #[inline]
    fn skip_trivia(&mut self) -> Result<(), (usize, LexError)> {
        let sql = self.sql;
        loop {
            let i = self.pos;
            match sql.get(i) {
                Some(&b) if CLASS[usize::from(b)] & SPACE != 0 => self.pos += 1,
                Some(b'-') if sql.get(i + 1) == Some(&b'-') => self.pos = line_end(sql, i),
                Some(b'/') if sql.get(i + 1) == Some(&b'*') => {
                    self.pos =
                        block_comment_end(sql, i).ok_or((i, LexError::UnterminatedComment))?;
                }
                _ => return Ok(()),
            }
        }
    }

    fn failed(&mut self, error: LexError) -> Lexed {
        self.error = Some(error);
        (TokenKind::Error, self.sql.len())
    }

    #[inline]
    fn lex(&mut self, start: usize) -> Lexed {
        let sql = self.sql;
        let byte = sql[start];
        // Words are the most common tokens.
        if CLASS[usize::from(byte)] & IDENT_START != 0 {
            return self.word(start);
        }
        let next = sql.get(start + 1);
        match byte {
            b'\'' => self.string(start + 1, !self.standard_conforming_strings),
            b'"' => self.quoted_ident(start + 1),
            b'$' if is(next, DIGIT) => {
                // Trailing identifier bytes are junk the server rejects; keep
                // them in the parameter so that they do not read as a word.
                let mut end = start + 2;
                while is(sql.get(end), IDENT_CONT) {
                    end += 1;
                }
                lexed(TokenKind::Param, end)
            }
            b'$' => self.dollar(start),
            b';' => lexed(TokenKind::Semicolon, start + 1),
            b'.' if is(next, DIGIT) => self.number(start),
            b'.' if next == Some(&b'.') => lexed(TokenKind::Operator, start + 2),
            b'(' | b')' | b',' | b'[' | b']' | b'.' | b':' => lexed(TokenKind::Operator, start + 1),
            b'0'..=b'9' => self.number(start),
            _ if CLASS[usize::from(byte)] & OP != 0 => {
                let mut end = start + 1;
                // A comment start ends an operator, as in `scan.l`.
                while is(sql.get(end), OP)
                    && !matches!(&sql[end..], [b'-', b'-', ..] | [b'/', b'*', ..])
                {
                    end += 1;
                }
                lexed(TokenKind::Operator, end)
            }
            _ => lexed(TokenKind::Other, start + 1),
        }
    }

    #[inline]
    fn word(&mut self, start: usize) -> Lexed {
        let sql = self.sql;
        let mut end = start + 1;
        while is(sql.get(end), IDENT_CONT) {
            end += 1;
        }
        // A one-letter word directly followed by a quote is a string prefix:
        // the longer match wins in `scan.l`.
        if end == start + 1 {
            let after = &sql[end..];
            match (sql[start].to_ascii_lowercase(), after) {
                (b'e', [b'\'', ..]) => return self.string(end + 1, true),
                (b'b' | b'x', [b'\'', ..]) => return self.string(end + 1, false),
                (b'n', [b'\'', ..]) => {
                    return self.string(end + 1, !self.standard_conforming_strings)
                }
                (b'u', [b'&', b'\'', ..]) => {
                    if !self.standard_conforming_strings {
                        return self.failed(LexError::UnsafeUnicodeString);
                    }
                    return self.string(end + 2, false);
                }
                (b'u', [b'&', b'"', ..]) => return self.quoted_ident(end + 2),
                _ => {}
            }
        }
        lexed(TokenKind::Word, end)
    }

    /// A string whose body starts at `body`; `backslash` says whether a
    /// backslash escapes the next byte.
    #[inline(never)]
    fn string(&mut self, body: usize, backslash: bool) -> Lexed {
        match string_end(self.sql, body, backslash) {
            Some(end) => lexed(TokenKind::String, end),
            None => self.failed(LexError::UnterminatedString),
        }
    }

    #[inline(never)]
    fn quoted_ident(&mut self, body: usize) -> Lexed {
        let sql = self.sql;
        let mut i = body;
        loop {
            match memchr::memchr(b'"', &sql[i.min(sql.len())..]) {
                None => return self.failed(LexError::UnterminatedIdentifier),
                Some(n) if sql.get(i + n + 1) == Some(&b'"') => i += n + 2,
                Some(n) => {
                    let end = i + n + 1;
                    if end == body + 1 {
                        return self.failed(LexError::EmptyIdentifier);
                    }
                    return lexed(TokenKind::QuotedIdent, end);
                }
            }
        }
    }

    /// A dollar-quoted string, or a lone `$`.
    #[inline(never)]
    fn dollar(&mut self, start: usize) -> Lexed {
        let sql = self.sql;
        let mut i = start + 1;
        if is(sql.get(i), IDENT_START) {
            i += 1;
            while is(sql.get(i), IDENT_START | DIGIT) {
                i += 1;
            }
        }
        if sql.get(i) != Some(&b'$') {
            // `$` not opening a delimiter is a lone character in `scan.l`.
            return lexed(TokenKind::Operator, start + 1);
        }
        let delimiter = &sql[start..=i];
        let body = i + 1;
        match memmem::find(&sql[body..], delimiter) {
            Some(n) => lexed(TokenKind::DollarString, body + n + delimiter.len()),
            None => self.failed(LexError::UnterminatedDollarString),
        }
    }

    /// Digits, an optional fraction and an optional exponent. Anything
    /// glued on (`1into`, `0x1f`) is left for the next token: servers
    /// before 15 read `1into` as `1 into`, newer ones reject it, and a word
    /// hidden inside a number must not escape the keyword scan.
    fn number(&mut self, start: usize) -> Lexed {
        let sql = self.sql;
        let digits = |mut i: usize| {
            while is(sql.get(i), DIGIT) {
                i += 1;
            }
            i
        };
        let mut end = digits(start);
        // `1..2` is an integer followed by `..`, as in `scan.l`.
        if sql.get(end) == Some(&b'.') && sql.get(end + 1) != Some(&b'.') {
            end = digits(end + 1);
        }
        if matches!(sql.get(end), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(sql.get(end + 1), Some(b'+' | b'-')));
            if is(sql.get(end + 1 + sign), DIGIT) {
                end = digits(end + 1 + sign);
            }
        }
        lexed(TokenKind::Number, end)
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token;

    #[inline]
    fn next(&mut self) -> Option<Token> {
        if self.done {
            return None;
        }
        if self.sql.len() > MAX_INPUT {
            return Some(self.fail(0, LexError::TooLong));
        }
        if let Err((at, error)) = self.skip_trivia() {
            return Some(self.fail(at.min(self.first_unsafe), error));
        }
        if self.pos > self.first_unsafe {
            // Whitespace or a comment ran over an untrustworthy byte.
            return Some(self.fail(self.first_unsafe, LexError::UnsafeEncoding));
        }
        if self.pos >= self.sql.len() {
            self.done = true;
            return None;
        }
        let start = self.pos;
        let (kind, end) = self.lex(start);
        match kind {
            // The lexing function has recorded why.
            TokenKind::Error => {
                let error = self.error.unwrap_or(LexError::UnterminatedString);
                Some(self.fail(start, error))
            }
            _ if end > self.first_unsafe => Some(self.fail(start, LexError::UnsafeEncoding)),
            _ => {
                self.pos = end;
                Some(Token::new(kind, start, end))
            }
        }
    }
}

impl std::iter::FusedIterator for Lexer<'_> {}

/// Longest input the lexer reads; see [`Token`].
const MAX_INPUT: usize = u32::MAX as usize;

/// The end of the `--` comment starting at `start`: its newline or the end
/// of the input.
#[inline(never)]
fn line_end(sql: &[u8], start: usize) -> usize {
    memchr::memchr2(b'\n', b'\r', &sql[start..]).map_or(sql.len(), |n| start + n)
}

/// The end of the nested block comment starting at `start`, which holds
/// `/*`.
#[inline(never)]
fn block_comment_end(sql: &[u8], start: usize) -> Option<usize> {
    let mut depth = 1usize;
    let mut i = start + 2;
    loop {
        let n = memchr::memchr2(b'*', b'/', &sql[i.min(sql.len())..])?;
        i += n;
        match &sql[i..] {
            [b'*', b'/', ..] => {
                i += 2;
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            [b'/', b'*', ..] => {
                i += 2;
                depth += 1;
            }
            _ => i += 1,
        }
    }
}

/// The end (after the closing quote) of a quoted string whose body starts
/// at `i`, or `None` if it is unterminated.
fn string_end(sql: &[u8], mut i: usize, backslash: bool) -> Option<usize> {
    loop {
        let rest = sql.get(i..)?;
        let n = if backslash {
            memchr::memchr2(b'\'', b'\\', rest)?
        } else {
            memchr::memchr(b'\'', rest)?
        };
        i += n;
        if sql[i] == b'\\' {
            i += 2;
            continue;
        }
        if sql.get(i + 1) == Some(&b'\'') {
            i += 2;
            continue;
        }
        match continuation(sql, i + 1) {
            Some(quote) => i = quote + 1,
            None => return Some(i + 1),
        }
    }
}

/// Where a string continues after its closing quote: `scan.l` joins two
/// quoted strings separated by whitespace that holds at least one newline
/// (`quotecontinue`), and the second part is read in the first one's mode.
/// Returns the offset of the reopening quote.
fn continuation(sql: &[u8], mut i: usize) -> Option<usize> {
    let skip_comment = |i: usize| memchr::memchr2(b'\n', b'\r', &sql[i..]).map(|n| i + n);
    // Horizontal whitespace and `--` comments up to a newline.
    loop {
        match sql.get(i)? {
            b' ' | b'\t' | 0x0b | 0x0c => i += 1,
            b'\n' | b'\r' => {
                i += 1;
                break;
            }
            b'-' if sql.get(i + 1) == Some(&b'-') => i = skip_comment(i)?,
            _ => return None,
        }
    }
    // Then any whitespace, and comments that end in a newline.
    loop {
        match sql.get(i)? {
            &b if CLASS[usize::from(b)] & SPACE != 0 => i += 1,
            b'-' if sql.get(i + 1) == Some(&b'-') => i = skip_comment(i)?,
            b'\'' => return Some(i),
            _ => return None,
        }
    }
}

/// Tracks which `;` end a statement: those outside parentheses and outside
/// the `BEGIN ATOMIC … END` body of `CREATE [OR REPLACE] FUNCTION|PROCEDURE`
/// (CASE … END nests inside it). psql's scanner applies the same rule,
/// except that it opens a body at any BEGIN: a function named `begin`
/// would then swallow the statements after it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Boundary {
    paren_depth: u32,
    atomic_depth: u32,
    routine: Routine,
    after_begin: bool,
    /// A `;` was kept inside the statement.
    pub(crate) swallowed: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Routine {
    #[default]
    Start,
    Create,
    Or,
    OrReplace,
    Yes,
    No,
}

impl Boundary {
    /// Feeds the next token of the statement; true if it is a `;` ending
    /// it.
    #[inline]
    pub(crate) fn feed(&mut self, token: &Lexeme) -> bool {
        match token.kind {
            TokenKind::Semicolon => {
                if self.paren_depth == 0 && self.atomic_depth == 0 {
                    return true;
                }
                self.swallowed = true;
            }
            TokenKind::Operator if token.text == b"(" => self.paren_depth += 1,
            TokenKind::Operator if token.text == b")" => {
                self.paren_depth = self.paren_depth.saturating_sub(1)
            }
            TokenKind::Word => {
                self.word(token);
                return false;
            }
            _ => {}
        }
        self.after_begin = false;
        false
    }

    fn word(&mut self, token: &Lexeme) {
        self.routine = match self.routine {
            Routine::Yes => {
                if self.paren_depth == 0 {
                    if self.after_begin && token.is_keyword(b"atomic") {
                        self.atomic_depth += 1;
                    } else if self.atomic_depth > 0 && token.is_keyword(b"case") {
                        // CASE … END inside the body also ends with END.
                        self.atomic_depth += 1;
                    } else if self.atomic_depth > 0 && token.is_keyword(b"end") {
                        self.atomic_depth -= 1;
                    }
                    if token.is_keyword(b"begin") {
                        self.after_begin = true;
                        return;
                    }
                }
                Routine::Yes
            }
            Routine::No => Routine::No,
            Routine::Start if token.is_keyword(b"create") => Routine::Create,
            Routine::Create if token.is_keyword(b"or") => Routine::Or,
            Routine::Or if token.is_keyword(b"replace") => Routine::OrReplace,
            Routine::Create | Routine::OrReplace
                if token.is_keyword(b"function") || token.is_keyword(b"procedure") =>
            {
                Routine::Yes
            }
            _ => Routine::No,
        };
        self.after_begin = false;
    }

    /// Whether a parenthesis or a routine body is open: a `;` now would
    /// be kept inside the statement.
    pub(crate) fn is_open(&self) -> bool {
        self.paren_depth > 0 || self.atomic_depth > 0
    }

    /// Whether the statement swallowed a `;` and still has an open
    /// parenthesis or body: the split is then a guess.
    pub(crate) fn unbalanced(&self) -> bool {
        self.swallowed && (self.paren_depth > 0 || self.atomic_depth > 0)
    }
}

/// The byte ranges of the statements in a simple-protocol Query string:
/// from the first byte of a statement's first token to the last byte of
/// its last token, separators excluded, empty statements dropped.
///
/// If the text cannot be tokenized, the rest of it, from the start of the
/// statement where the error occurred, is returned as one last range, which
/// [`classify`](super::classify::classify) reports as unknown.
pub fn split_statements(sql: &[u8], options: &LexOptions) -> Vec<Range<usize>> {
    Statements::new(sql, options).collect()
}

/// The statements of a Query string one by one, as
/// [`split_statements`] finds them, without collecting them first.
pub struct Statements<'a> {
    sql: &'a [u8],
    lexer: Lexer<'a>,
    boundary: Boundary,
    current: Option<Range<usize>>,
    done: bool,
}

impl<'a> Statements<'a> {
    pub fn new(sql: &'a [u8], options: &LexOptions) -> Self {
        Statements {
            sql,
            lexer: Lexer::new(sql, options),
            boundary: Boundary::default(),
            current: None,
            done: false,
        }
    }
}

impl Iterator for Statements<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        if self.done {
            return None;
        }
        for token in self.lexer.by_ref() {
            if token.kind == TokenKind::Error {
                let start = self
                    .current
                    .take()
                    .map_or(token.start(), |range| range.start);
                self.done = true;
                return Some(start..self.sql.len());
            }
            if self.boundary.feed(&token.lexeme(self.sql)) {
                self.boundary = Boundary::default();
                match self.current.take() {
                    Some(range) => return Some(range),
                    None => continue,
                }
            }
            match &mut self.current {
                Some(range) => range.end = token.end(),
                None => self.current = Some(token.range()),
            }
        }
        self.done = true;
        self.current.take()
    }
}

impl std::iter::FusedIterator for Statements<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str, options: LexOptions) -> Vec<(TokenKind, String)> {
        Lexer::new(sql.as_bytes(), &options)
            .map(|t| {
                let text = String::from_utf8_lossy(t.text(sql.as_bytes())).into_owned();
                (t.kind, text)
            })
            .collect()
    }

    /// Where the error token starts and why.
    fn error(sql: &[u8], options: LexOptions) -> Option<(usize, LexError)> {
        let mut lexer = Lexer::new(sql, &options);
        let start = lexer.by_ref().find(|t| t.kind == TokenKind::Error)?.start();
        assert_eq!(lexer.next(), None);
        Some((start, lexer.error()?))
    }

    fn texts(sql: &str) -> Vec<String> {
        kinds(sql, LexOptions::default())
            .into_iter()
            .map(|(_, text)| text)
            .collect()
    }

    fn split(sql: &str) -> Vec<&str> {
        split_statements(sql.as_bytes(), &LexOptions::default())
            .into_iter()
            .map(|range| &sql[range])
            .collect()
    }

    const SCS_OFF: LexOptions = LexOptions {
        standard_conforming_strings: false,
        ascii_safe: true,
    };

    #[test]
    fn tokens() {
        use TokenKind::*;
        assert_eq!(
            kinds(
                "SELECT a.\"B\"\"c\", $1, 1.5e-3, E'x\\'y', $q$ ' $q$::text -- c\n/* a /* b */ c */;",
                LexOptions::default()
            ),
            [
                (Word, "SELECT"),
                (Word, "a"),
                (Operator, "."),
                (QuotedIdent, "\"B\"\"c\""),
                (Operator, ","),
                (Param, "$1"),
                (Operator, ","),
                (Number, "1.5e-3"),
                (Operator, ","),
                (String, "E'x\\'y'"),
                (Operator, ","),
                (DollarString, "$q$ ' $q$"),
                (Operator, ":"),
                (Operator, ":"),
                (Word, "text"),
                (Semicolon, ";"),
            ]
            .map(|(k, t)| (k, t.to_owned()))
        );
    }

    #[test]
    fn words_and_prefixes() {
        assert_eq!(texts("thee'x'"), ["thee", "'x'"]);
        assert_eq!(
            texts("e'x' B'01' X'ff' n'y'"),
            ["e'x'", "B'01'", "X'ff'", "n'y'"]
        );
        assert_eq!(
            texts("U&'d\\0061t' u&\"x\" u & v"),
            ["U&'d\\0061t'", "u&\"x\"", "u", "&", "v"]
        );
        assert_eq!(
            texts("a$b$ $1a 1into 0x1f"),
            ["a$b$", "$1a", "1", "into", "0", "x1f"]
        );
        assert_eq!(texts("1..2 .5 x.y"), ["1", "..", "2", ".5", "x", ".", "y"]);
        assert_eq!(texts("$foo bar"), ["$", "foo", "bar"]);
        assert_eq!(texts("Ωmega zé"), ["Ωmega", "zé"]);
    }

    #[test]
    fn operators_stop_at_comments() {
        assert_eq!(texts("a+--c\nb */* x */c"), ["a", "+", "b", "*", "c"]);
        assert_eq!(texts("a<>=b"), ["a", "<>=", "b"]);
    }

    #[test]
    fn strings() {
        assert_eq!(texts("'it''s' 'a\\' x"), ["'it''s'", "'a\\'", "x"]);
        // With standard_conforming_strings off, `\'` escapes a quote.
        let off = kinds("'a\\'b' x", SCS_OFF);
        assert_eq!(off[0].1, "'a\\'b'");
        assert_eq!(off[1].1, "x");
        // …but never in bit strings.
        assert_eq!(kinds("B'1\\' x", SCS_OFF)[1].1, "x");
        assert_eq!(
            error(b"U&'x'", SCS_OFF),
            Some((0, LexError::UnsafeUnicodeString))
        );
    }

    #[test]
    fn string_continuation_keeps_the_mode() {
        // The second part continues an E'' string, so `\'` is escaped.
        assert_eq!(texts("E'a'\n'b\\'c' x"), ["E'a'\n'b\\'c'", "x"]);
        assert_eq!(
            texts("E'a' -- c\n  'b\\'c' x"),
            ["E'a' -- c\n  'b\\'c'", "x"]
        );
        // Without a newline they are two strings (and E'' ends at the first).
        assert_eq!(texts("E'a' 'b' x"), ["E'a'", "'b'", "x"]);
        assert_eq!(texts("'a' /* c */\n'b'"), ["'a'", "'b'"]);
    }

    #[test]
    fn dollar_quotes() {
        assert_eq!(
            texts("$$a$$ $a$ $b$ $$ $a$ x"),
            ["$$a$$", "$a$ $b$ $$ $a$", "x"]
        );
        assert_eq!(texts("$a$ $ba$a$ x"), ["$a$ $ba$a$", "x"]);
        assert_eq!(
            error(b"$a$ x $b$", LexOptions::default()),
            Some((0, LexError::UnterminatedDollarString))
        );
    }

    #[test]
    fn comments() {
        assert_eq!(texts("/*/**/*/a/***/b--x"), ["a", "b"]);
        assert_eq!(
            kinds("a /* /* */", LexOptions::default())[1],
            (TokenKind::Error, "/* /* */".to_owned())
        );
        for sql in [&b"a /* /* */"[..], b"a /*/"] {
            assert_eq!(
                error(sql, LexOptions::default()),
                Some((2, LexError::UnterminatedComment))
            );
        }
    }

    #[test]
    fn errors_end_the_stream() {
        for (sql, error) in [
            ("select 'abc", LexError::UnterminatedString),
            ("select E'abc\\'", LexError::UnterminatedString),
            ("select \"abc", LexError::UnterminatedIdentifier),
            ("select \"\"", LexError::EmptyIdentifier),
        ] {
            let tokens = kinds(sql, LexOptions::default());
            assert_eq!(tokens.len(), 2, "{sql}");
            assert_eq!(tokens[1].0, TokenKind::Error, "{sql}");
            assert_eq!(
                super::tests::error(sql.as_bytes(), LexOptions::default()),
                Some((7, error)),
                "{sql}"
            );
        }
    }

    #[test]
    fn encodings() {
        assert!(encoding_is_ascii_safe("UTF8"));
        assert!(encoding_is_ascii_safe("LATIN1"));
        assert!(encoding_is_ascii_safe("EUC_JP"));
        for name in [
            "SJIS",
            "Shift_JIS",
            "shift_jis_2004",
            "BIG5",
            "gbk",
            "GB18030",
            "UHC",
            "JOHAB",
            "WIN932",
            "Windows-950",
        ] {
            assert!(!encoding_is_ascii_safe(name), "{name}");
        }
        let sjis = LexOptions::for_session(true, "SJIS");
        // 0x95 0x5c is one SJIS character whose second byte is `\`.
        let sql = b"select 1; select '\x95\x5c'; select 2";
        let tokens: Vec<_> = Lexer::new(sql, &sjis).collect();
        assert_eq!(tokens.len(), 5);
        assert_eq!(tokens[4].kind, TokenKind::Error);
        assert_eq!(error(sql, sjis), Some((17, LexError::UnsafeEncoding)));
        assert_eq!(tokens[4].start(), 17);
        assert_eq!(split_statements(sql, &sjis), [0..8, 10..sql.len()]);
        // A high byte in a comment is just as untrustworthy.
        assert_eq!(
            error(b"select -- \x95\n 1", sjis),
            Some((10, LexError::UnsafeEncoding))
        );
        // Latin-1 is ASCII-safe: high bytes are identifier or string bytes.
        let latin1 = LexOptions::for_session(true, "LATIN1");
        assert_eq!(
            Lexer::new(b"select '\xe9t\xe9', caf\xe9", &latin1).count(),
            4
        );
    }

    #[test]
    fn splits_statements() {
        assert_eq!(split("select 1; select 2"), ["select 1", "select 2"]);
        assert_eq!(split(" ; ;select 1;;  ; -- x\n"), ["select 1"]);
        assert_eq!(
            split("select ';' ; select $$;$$; select \"a;b\"; select 1 /* ; */ -- ;\n; x"),
            [
                "select ';'",
                "select $$;$$",
                "select \"a;b\"",
                "select 1",
                "x"
            ]
        );
        assert_eq!(
            split("select E'\\';'; select 2"),
            ["select E'\\';'", "select 2"]
        );
        assert_eq!(
            split_statements(b"select 'a\\'; select 2'; select 3", &SCS_OFF),
            [0..22, 24..32]
        );
        assert!(split("").is_empty());
        assert!(split(" -- only a comment").is_empty());
    }

    #[test]
    fn split_keeps_bodies_together() {
        let create = "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC \
                      SELECT CASE WHEN true THEN 1 END; SELECT 2; END";
        assert_eq!(
            split(&format!("{create}; END; SET x = 1")),
            [create, "END", "SET x = 1"]
        );
        let rule =
            "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); DELETE FROM v)";
        assert_eq!(split(&format!("{rule};select 1")), [rule, "select 1"]);
        // A function merely named begin opens no body.
        assert_eq!(
            split("CREATE FUNCTION begin() RETURNS int AS 'select 1' LANGUAGE sql; END"),
            [
                "CREATE FUNCTION begin() RETURNS int AS 'select 1' LANGUAGE sql",
                "END"
            ]
        );
    }

    #[test]
    fn split_error_returns_the_rest() {
        assert_eq!(
            split("select 1; select 'x; select 2"),
            ["select 1", "select 'x; select 2"]
        );
        assert_eq!(
            split("select 1; select 2 /* x"),
            ["select 1", "select 2 /* x"]
        );
    }

    /// xorshift64*: deterministic, and enough to shake the lexer.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn never_panics_on_random_bytes() {
        // Bytes that matter to the lexer, so that random input hits its
        // corners more often than uniform bytes would.
        const ALPHABET: &[u8] = b"'\"$\\;-/*()eEuUbBxXnN&1 \n\r\t.:_aZ\x80\xff+";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..10_000 {
            let len = (rng.next() % 48) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    let r = rng.next();
                    if round % 2 == 0 {
                        ALPHABET[(r % ALPHABET.len() as u64) as usize]
                    } else {
                        r as u8
                    }
                })
                .collect();
            for options in [
                LexOptions::default(),
                SCS_OFF,
                LexOptions {
                    standard_conforming_strings: true,
                    ascii_safe: false,
                },
            ] {
                let mut last_end = 0;
                for token in Lexer::new(&input, &options) {
                    assert!(token.start() >= last_end && token.end() <= input.len());
                    assert!(token.start() < token.end());
                    last_end = token.end();
                }
                for range in split_statements(&input, &options) {
                    assert!(range.start < range.end && range.end <= input.len());
                }
                let _ = crate::state::classify::classify(&input, &options);
            }
        }
    }
}
