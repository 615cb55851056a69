"""How much of what a client sends the platform repeats and keeps.

- Repeated: input shown in an error message goes through ``shown`` (quoted, cut to ``SHOWN_CHARS``).
- Kept: strings written to the store are cut to their column's length with ``clip`` (names and other
  identifiers are validated before that, in ``functions.names``).
"""

from __future__ import annotations

SHOWN_CHARS = 64
MAX_MESSAGE_CHARS = 1000


def clip(text: str, limit: int) -> str:
    """TEXT cut to at most LIMIT characters, ending in '…' when it was cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """VALUE quoted for an error message, cut to about LIMIT characters (saying how long it was)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return text[:limit] + "…" + length
