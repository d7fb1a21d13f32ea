"""Quoting user input inside error messages, bounded: an error lands in /history, the log and the
UI, so a megabyte-long input must not travel with it."""
from __future__ import annotations

ECHO_LIMIT = 80


def echo(value, limit: int = ECHO_LIMIT) -> str:
    """`value` quoted for a message: a string in quotes, anything else as its repr; cut to `limit`
    characters with the full length stated."""
    text = f"'{value}'" if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, (str, list, tuple, dict)) else len(text)
    return f"{text[:limit]}… ({size} {'characters' if isinstance(value, str) else 'items'} in all)"
