"""Cheap text checks that let most SQL skip the tokenizer.

Tokenizing costs about a microsecond per character in pure Python, and an application that
writes values into its SQL text sends a new text every time. These checks use only C-speed
string operations and answer, before any tokenizing, for the two common cases:

- :func:`clears` a short statement that cannot leave session state: one plain statement
  (SELECT, INSERT, UPDATE...) with no comment, no backslash, none of the words the rules look
  for, and no call to a function outside the trusted list. Any doubt means "tokenize it".
- :func:`long_needs_tokens` says whether a long text starts a statement (first, or after a
  semicolon) with a keyword whose statement the guard reports (SET, LISTEN, CREATE...). Long
  texts without one are not tokenized at all; the pool resets their connection instead.

Both may send harmless SQL to the slow path; neither may clear SQL the rules would flag or
doubt. tests/test_guard.py checks that on every case of its tables and on generated SQL.
"""

from __future__ import annotations

import re
from typing import Final

from ._sqlnames import PLAIN_STATEMENTS, TRUSTED_CALLS

__all__ = ["LONG_STATEMENT", "clears", "long_needs_tokens"]

#: Texts longer than this are never tokenized unless a statement in them starts with a
#: keyword the guard reports; the pool resets a connection that ran one (docs/settings.md).
LONG_STATEMENT: Final = 4096

_HEAD = re.compile(r"\s*([^\W\d][\w$]*)")
# Whitespace and comments (not nested ones) before a statement's first keyword.
_LONG_HEAD = re.compile(r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*(?:[^*/]|\*(?!/)|/(?!\*))*\*/)*")
# SELECT ... INTO TEMP (comments between the words send the text to the tokenizer anyway).
_INTO_TEMP = re.compile(r"\binto\s+temp")
# Substrings whose presence sends a text to the tokenizer, whatever the context.
_SLOW_MARKERS: Final = ("--", "/*", "\\", "set_config", "advisory")
# A "(" after one of these opens a column list or an alias list, not a call.
_NOT_A_CALL_AFTER: Final = frozenset(
    {"into", "table", "references", "exists", "only", "view", "type", "copy", "as"}
)
_CLEARED_HEADS: Final = PLAIN_STATEMENTS - {"create"}
# Statement kinds the guard reports by their first keyword alone.
_REPORTED = ("set", "reset", "listen", "unlisten", "prepare", "execute", "deallocate", "declare")
_REPORTED_HEADS: Final = frozenset({*_REPORTED, "create"})
# A semicolon followed by one of those, or by a comment that could hide one. The regex engine
# finds semicolons at C speed; only these matches reach Python code.
_SUSPICIOUS_END = re.compile(
    r";\s*(?:/\*|--|(?:" + "|".join(sorted(_REPORTED_HEADS)) + r")\b)", re.IGNORECASE
)


def clears(text: str) -> bool:
    """True if `text` certainly leaves no session state and nothing to report."""
    head = _HEAD.match(text)
    if head is None or head.group(1).lower() not in _CLEARED_HEADS:
        return False
    semicolon = text.find(";")
    if semicolon >= 0 and text[semicolon + 1 :].strip():
        return False  # more than one statement
    lowered = text.lower()
    if any(marker in lowered for marker in _SLOW_MARKERS) or _INTO_TEMP.search(lowered):
        return False
    # Names are read from `text` itself: lower() may change a string's length.
    paren = text.find("(")
    while paren >= 0:
        if not _harmless_paren(text, paren):
            return False
        paren = text.find("(", paren + 1)
    return True


def _harmless_paren(text: str, paren: int) -> bool:
    """Does the "(" at `paren` open something other than a call to an untrusted function?"""
    end = _skip_space_back(text, paren)
    if end < 0 or (not _is_name_char(text[end]) and text[end] != '"'):
        return True  # "((", ", (", "= (": no name before it
    start, quoted = _name_start(text, end)
    if start < 0:
        return False
    name = text[start : end + 1].lower()
    before_name = _skip_space_back(text, start)
    qualified = before_name >= 0 and text[before_name] == "."
    while before_name >= 0 and text[before_name] == ".":  # schema.table, "s"."t"
        prev_end = _skip_space_back(text, before_name)
        if prev_end < 0:
            return False
        start, _ = _name_start(text, prev_end)
        if start < 0:
            return False
        before_name = _skip_space_back(text, start)
    before = _word_ending_at(text, before_name).lower()
    if before in _NOT_A_CALL_AFTER and not (qualified and before == "as"):
        return True
    return not qualified and not quoted and name in TRUSTED_CALLS


def _skip_space_back(text: str, pos: int) -> int:
    """Index of the last non-space character before `pos`, or -1."""
    pos -= 1
    while pos >= 0 and text[pos].isspace():
        pos -= 1
    return pos


def _is_name_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_$"


def _name_start(text: str, end: int) -> tuple[int, bool]:
    """Start of the (quoted or bare) name that ends at `end`; -1 when it cannot be read."""
    if text[end] == '"':
        start = text.rfind('"', 0, end)
        return (start, True) if start >= 0 else (-1, True)
    start = end
    while start > 0 and _is_name_char(text[start - 1]):
        start -= 1
    return start, False


def _word_ending_at(text: str, end: int) -> str:
    if end < 0 or not _is_name_char(text[end]):
        return ""
    start, _ = _name_start(text, end)
    return text[start : end + 1]


def long_needs_tokens(text: str) -> bool:
    """Does a statement in the long `text` start with a keyword the guard reports?

    Every semicolon counts as a possible statement end. One followed by such a keyword is
    looked at more closely only then: inside a string literal (an odd number of quotes before
    it, in a text where nothing else can hold a quote) it ends nothing.
    """
    pos = _LONG_HEAD.match(text).end()  # type: ignore[union-attr]
    if text.startswith(("/*", "--"), pos):
        return True  # a nested comment the pattern above does not read
    head = _HEAD.match(text, pos)
    if head is not None and head.group(1).lower() in _REPORTED_HEADS:
        return True
    plain: bool | None = None
    quotes = counted = 0  # single quotes before `counted`
    first = text.find(";")  # memchr: most long texts have none
    if first < 0:
        return False
    for found in _SUSPICIOUS_END.finditer(text, first):
        if plain is None:
            plain = _plain_quotes(text)
        if not plain:
            return True
        quotes += text.count("'", counted, found.start())
        counted = found.start()
        if quotes % 2 == 0:
            return True
    return False


def _plain_quotes(text: str) -> bool:
    """Is every single quote in `text` part of a standard string literal ('' included)?
    Not when a quoted identifier, dollar quote, comment or backslash escape could hold one."""
    return not any(marker in text for marker in ('"', "$", "--", "/*", "\\"))
