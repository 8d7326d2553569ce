"""Text that can always be stored: escaping what UTF-8 cannot hold, and telling blank text from real text.

Python strings may hold code points that no UTF-8 writer (parquet, DuckDB, the tokenizer's Rust side) accepts:
lone surrogates, from valid JSON such as ``"\\ud800"`` (an emoji cut in half by a crawler), and the
``\\udc80``-``\\udcff`` stand-ins that ``surrogateescape`` decoding leaves for non-UTF-8 bytes (``tarfile`` decodes
member names that way). :func:`escape_unencodable` replaces each such code point by a visible ASCII escape, so the
sample keeps a row and the value stays recognisable; callers record a :class:`~unifilter_core.records.Flag`.
"""

from __future__ import annotations

import re
import unicodedata

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the raw byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def escape_unencodable(text: str) -> tuple[str, bool]:
    """``text`` with every lone surrogate written as an escape, and whether anything was escaped.

    ``"a\\ud800b"`` becomes ``"a\\\\ud800b"`` (the six characters ``\\ud800``); a non-UTF-8 byte 0xff that was
    decoded with ``surrogateescape`` (``"\\udcff"``) becomes ``"\\\\xff"``. Valid text is returned unchanged (and
    fast: one regex search).

    Args:
        text: any Python string.

    Returns:
        ``(escaped, changed)``; ``escaped.encode("utf-8")`` never raises.
    """
    if _SURROGATE.search(text) is None:
        return text, False
    return _SURROGATE.sub(_escape, text), True


def is_blank_text(text: str) -> bool:
    """True when ``text`` holds nothing a reader could read: only whitespace, NUL and other control characters.

    Unicode categories ``Cc`` (controls, NUL included), ``Cf`` (format characters such as zero-width spaces and
    BOMs) and ``Zs``/``Zl``/``Zp`` (separators) count as blank.
    """
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)
