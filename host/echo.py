"""Quoting user input inside error messages, bounded and printable: an error lands in /history, the
log and the UI, so a megabyte-long input must not travel with it, and a NUL, a newline, an escape
sequence or a right-to-left override must not reach a log line or a terminal as itself."""
from __future__ import annotations

ECHO_LIMIT = 80


def printable(text: str) -> str:
    """`text` with every character Python does not print (controls, format characters such as
    U+202E, separators other than the space) written as its escape, e.g. a NUL as \\x00."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def echo(value, limit: int = ECHO_LIMIT) -> str:
    """`value` quoted for a message: a string in quotes, anything else as its repr; non-printing
    characters escaped; cut to `limit` characters with the full length stated."""
    text = f"'{printable(value)}'" if isinstance(value, str) else printable(repr(value))
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, (str, list, tuple, dict)) else len(text)
    return f"{text[:limit]}… ({size} {'characters' if isinstance(value, str) else 'items'} in all)"
