"""A PostgreSQL SQL tokenizer: just enough lexing to find statement keywords.

Comments, string literals (standard, E'' escape and dollar-quoted) and quoted identifiers are
read whole, so text inside them never looks like a keyword. Also the small helpers the
session-state rules use to read a token list, and :func:`mask_literals`, which prints SQL
with its literals hidden.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "Token",
    "UnterminatedError",
    "is_op",
    "mask_literals",
    "matching_paren",
    "snippet",
    "split_statements",
    "tokenize",
    "top_level_sequence",
    "word",
]


@dataclass(frozen=True, slots=True)
class Token:
    # "word" (keyword or unquoted identifier, lower-cased), "ident" (quoted identifier, exact),
    # "string" (literal, value unescaped), "number", "param", or "op" (one punctuation char, or
    # "::").
    kind: str
    value: str
    start: int
    end: int


_WORD_RE = re.compile(r"[^\W\d][\w$]*")
_NUMBER_RE = re.compile(r"\d[\w.]*|\.\d[\w.]*")
_DOLLAR_TAG_RE = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_PARAM_RE = re.compile(r"\$\d+|%\([^)]*\)[sbt]|%[sbt]")
_SPACE_RE = re.compile(r"\s+")


class UnterminatedError(ValueError):
    """The SQL ends inside a string, comment or quoted identifier."""


def tokenize(sql: str) -> Iterator[Token]:
    """Yield the significant tokens of `sql`, skipping whitespace and comments."""
    pos = 0
    n = len(sql)
    while pos < n:
        ch = sql[pos]
        if ch.isspace():
            pos = _SPACE_RE.match(sql, pos).end()  # type: ignore[union-attr]
        elif sql.startswith("--", pos):
            end = sql.find("\n", pos)
            pos = n if end < 0 else end + 1
        elif sql.startswith("/*", pos):
            pos = _skip_block_comment(sql, pos)
        elif ch == "'":
            value, end = _read_string(sql, pos, backslash=False)
            yield Token("string", value, pos, end)
            pos = end
        elif ch == '"':
            value, end = _read_quoted(sql, pos, '"')
            yield Token("ident", value, pos, end)
            pos = end
        elif ch == "$":
            tag = _DOLLAR_TAG_RE.match(sql, pos)
            param = _PARAM_RE.match(sql, pos)
            if tag:
                close = sql.find(tag.group(), tag.end())
                if close < 0:
                    raise UnterminatedError("dollar-quoted string")
                end = close + len(tag.group())
                yield Token("string", sql[tag.end() : close], pos, end)
                pos = end
            elif param:
                yield Token("param", param.group(), pos, param.end())
                pos = param.end()
            else:
                yield Token("op", ch, pos, pos + 1)
                pos += 1
        elif ch == "%":
            param = _PARAM_RE.match(sql, pos)
            end = param.end() if param else pos + 1
            yield Token("param" if param else "op", sql[pos:end], pos, end)
            pos = end
        elif "0" <= ch <= "9" or (ch == "." and pos + 1 < n and "0" <= sql[pos + 1] <= "9"):
            end = _NUMBER_RE.match(sql, pos).end()  # type: ignore[union-attr]
            yield Token("number", sql[pos:end], pos, end)
            pos = end
        elif ch.isalpha() or ch == "_":
            end = _WORD_RE.match(sql, pos).end()  # type: ignore[union-attr]
            # E'...' is an escape string: backslash escapes, including \'.
            if end == pos + 1 and ch in "eE" and end < n and sql[end] == "'":
                value, end = _read_string(sql, end, backslash=True)
                yield Token("string", value, pos, end)
            else:
                yield Token("word", sql[pos:end].lower(), pos, end)
            pos = end
        elif sql.startswith("::", pos):
            yield Token("op", "::", pos, pos + 2)
            pos += 2
        else:
            yield Token("op", ch, pos, pos + 1)
            pos += 1


def _skip_block_comment(sql: str, pos: int) -> int:
    # PostgreSQL block comments nest, unlike C's: /* a /* b */ still a comment */.
    depth = 0
    n = len(sql)
    while pos < n:
        if sql.startswith("/*", pos):
            depth += 1
            pos += 2
        elif sql.startswith("*/", pos):
            depth -= 1
            pos += 2
            if depth == 0:
                return pos
        else:
            pos += 1
    raise UnterminatedError("block comment")


def _read_quoted(sql: str, pos: int, quote: str) -> tuple[str, int]:
    """Read a quote-delimited token where a doubled quote stands for one; return value, end."""
    parts = []
    start = pos + 1
    while True:
        close = sql.find(quote, start)
        if close < 0:
            raise UnterminatedError("quoted text")
        parts.append(sql[start:close])
        if sql.startswith(quote, close + 1):
            parts.append(quote)
            start = close + 2
        else:
            return "".join(parts), close + 1


def _read_string(sql: str, pos: int, *, backslash: bool) -> tuple[str, int]:
    if not backslash:
        return _read_quoted(sql, pos, "'")
    # Only the end of the literal matters here, so escapes other than \' and \\ are kept as
    # written; a value compared against keywords ('false') never contains them.
    parts = []
    i = pos + 1
    n = len(sql)
    while i < n:
        ch = sql[i]
        if ch == "\\" and i + 1 < n:
            parts.append(sql[i + 1] if sql[i + 1] in "'\\" else sql[i : i + 2])
            i += 2
        elif ch == "'":
            if sql.startswith("'", i + 1):
                parts.append("'")
                i += 2
            else:
                return "".join(parts), i + 1
        else:
            parts.append(ch)
            i += 1
    raise UnterminatedError("escape string")


def split_statements(tokens: Sequence[Token]) -> list[list[Token]]:
    """Split on top-level semicolons.

    Semicolons inside parentheses (CREATE RULE ... DO (a; b)) and inside a SQL-standard
    function body (CREATE FUNCTION ... BEGIN ATOMIC a; b; END) do not end the statement.
    """
    statements: list[list[Token]] = []
    current: list[Token] = []
    parens = 0
    atomic = 0  # nesting inside BEGIN ATOMIC ... END: CASE ... END nests within it
    for tok in tokens:
        if tok.kind == "op":
            if tok.value == ";" and parens == 0 and atomic == 0:
                if current:
                    statements.append(current)
                current = []
                continue
            if tok.value == "(":
                parens += 1
            elif tok.value == ")":
                parens = max(0, parens - 1)
        elif tok.kind == "word":
            opens_body = tok.value == "atomic" and word(current, len(current) - 1) == "begin"
            if opens_body or (atomic and tok.value == "case"):
                atomic += 1
            elif atomic and tok.value == "end":
                atomic -= 1
        current.append(tok)
    if current:
        statements.append(current)
    return statements


def snippet(sql: str, stmt: Sequence[Token], limit: int = 80) -> str:
    # Rebuilt from tokens so comments vanish and literals (which may hold secrets, e.g.
    # SET app.api_key = '...') never reach a log line or an exception message.
    out: list[str] = []
    prev_end = stmt[0].start if stmt else 0
    for tok in stmt:
        if tok.start > prev_end:
            out.append(" ")
        if tok.kind == "string":
            out.append("$…$" if sql[tok.start] == "$" else "'…'")
        else:
            out.append(sql[tok.start : tok.end])
        prev_end = tok.end
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mask_literals(sql: str, limit: int = 200) -> str:
    """`sql` with string literals masked and comments dropped, safe to print (say, a query
    from pg_stat_activity). Text cut off inside a literal (pg_stat_activity truncates) ends
    with the masked part."""
    tokens: list[Token] = []
    try:
        tokens.extend(tokenize(sql))
    except UnterminatedError:
        return (snippet(sql, tokens, limit) + " '…").strip()[:limit]
    return snippet(sql, tokens, limit)


def word(stmt: Sequence[Token], i: int) -> str:
    """The lower-cased keyword at index `i`, or "" (past the end, or not a bare word)."""
    if i < len(stmt) and stmt[i].kind == "word":
        return stmt[i].value
    return ""


def is_op(stmt: Sequence[Token], i: int, value: str) -> bool:
    return 0 <= i < len(stmt) and stmt[i].kind == "op" and stmt[i].value == value


def matching_paren(stmt: Sequence[Token], open_paren: int) -> int:
    depth = 0
    for i in range(open_paren, len(stmt)):
        if stmt[i].kind == "op":
            if stmt[i].value in "([":
                depth += 1
            elif stmt[i].value in ")]":
                depth -= 1
                if depth == 0:
                    return i
    return len(stmt)


def top_level_sequence(stmt: Sequence[Token], words: Sequence[str]) -> bool:
    """Does the statement contain the keywords `words` in a row, outside parentheses?"""
    depth = 0
    for i, tok in enumerate(stmt):
        if tok.kind == "op":
            depth += tok.value == "("
            depth -= tok.value == ")"
        elif depth == 0 and all(word(stmt, i + k) == w for k, w in enumerate(words)):
            return True
    return False
