"""What client text may be stored and logged: unstorable strings, control characters escaped."""

from __future__ import annotations

import re

# What PostgreSQL's text cannot hold (NUL) and what cannot be encoded as UTF-8 (a surrogate: after
# json.loads, only an unpaired one is left). Argon2 gets the UTF-8 bytes of a password, too.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

# Characters that can forge or hide a log line, or drive a terminal: C0 controls (newline,
# carriage return, escape, ...), DEL and C1 controls (\x9b is a one-byte CSI), the Unicode line and
# paragraph separators, bidirectional overrides and isolates ("Trojan Source"), and surrogates,
# which no log stream can encode.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def unstorable(text: str) -> bool:
    """True when `text` holds a NUL or an unpaired surrogate: PostgreSQL or UTF-8 cannot take it."""
    return _UNSTORABLE.search(text) is not None


def _escaped(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control_characters(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`, `\\u2028`).

    A backslash is left as it is: the escapes keep a log record on one line and a terminal inert,
    they are not meant to be decoded again.
    """
    if text.isascii() and text.isprintable():
        return text  # nearly every line: no search needed (C0 and DEL are not printable)
    return _UNSAFE.sub(lambda match: _escaped(match.group()), text)


def escape_control_characters_in_json(json_text: str) -> str:
    """JSON text with the control characters a JSON encoder leaves as they are (DEL, C1, line
    separators, bidirectional overrides, surrogates) written as `\\uXXXX` escapes: the same
    JSON, one line, inert on a terminal. The encoder has already escaped the C0 ones."""
    if json_text.isascii() and "\x7f" not in json_text:
        return json_text  # nearly every line: DEL is the one unsafe ASCII character left
    return _UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", json_text)


def storable_text(value: str, max_length: int) -> str:
    """Client text (a header such as User-Agent) as it may be stored and shown again: control
    characters escaped, cut to at most `max_length` characters without splitting an escape."""
    head = value[:max_length]
    if _UNSAFE.search(head) is None:
        return head  # what every real client sends: nothing to escape
    pieces: list[str] = []
    length = 0
    for char in head:
        piece = _escaped(char) if _UNSAFE.match(char) else char
        length += len(piece)
        if length > max_length:
            break
        pieces.append(piece)
    return "".join(pieces)
