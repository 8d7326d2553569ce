"""Sample json members: parsing that never raises, and values made safe for every writer downstream.

:func:`parse_json_member` turns broken JSON, nesting deeper than :data:`MAX_JSON_DEPTH` and non-objects into
failures. :func:`clean_fields` then escapes, in place, every string (values and object keys, at any depth) that
holds code points UTF-8 cannot store (lone surrogates: ``"\\ud800"`` is valid JSON, and ``json`` also decodes
CESU-style surrogate bytes), and reports which top-level fields it touched as
:class:`~unifilter_core.records.Flag` codes (:func:`field_flag`).

What Python's ``json`` already refuses becomes ``json_decode_error`` here: integers of more than
``sys.get_int_max_str_digits()`` digits (4300, Python 3.11+), nesting beyond the interpreter's recursion limit.
``NaN``/``Infinity``/``1e400`` parse to floats; where a field must be a string or an int they fail the
field-type checks of the decoders (``invalid_fields``); elsewhere they are kept (parquet stores them).
"""

from __future__ import annotations

import json
from typing import Any

from unifilter_core.data.text import escape_unencodable
from unifilter_core.records import Flag, Reason, SampleFailure

#: Deepest nesting a sample json may have. Real sample jsons are 1-3 levels deep; a json nested hundreds of
#: levels parses, then breaks recursive consumers later (pickling to a worker, a writer's value walk).
MAX_JSON_DEPTH = 64

_FIELD_FLAGS = {"uid": Flag.UID_ESCAPED, "url": Flag.URL_ESCAPED, "caption": Flag.TEXT_ESCAPED}


def field_flag(name: str) -> str:
    """The flag for an escaped top-level field: ``uid_escaped``, ``url_escaped``, ``text_escaped`` (caption)."""
    return str(_FIELD_FLAGS.get(name, Flag.FIELD_ESCAPED))


def _depth_exceeds(obj: Any, limit: int) -> bool:
    """True when ``obj`` nests containers deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json_member(data: bytes, what: str) -> dict[str, Any] | SampleFailure:
    """Parse a JSON object member; broken JSON, deep nesting and non-objects become failures."""
    try:
        obj = json.loads(data)
    except (
        ValueError,
        RecursionError,
    ) as exc:  # JSONDecodeError, UnicodeDecodeError, int digits: ValueErrors
        return SampleFailure(Reason.JSON_DECODE_ERROR, f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
    if not isinstance(obj, dict):
        return SampleFailure(
            Reason.INVALID_FIELDS, f"{what} is a {type(obj).__name__}, expected a JSON object"
        )
    if _depth_exceeds(obj, MAX_JSON_DEPTH):
        return SampleFailure(Reason.JSON_DECODE_ERROR, f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _clean_value(value: Any) -> tuple[Any, bool]:
    """``value`` with every string escaped (containers are changed in place); whether anything changed."""
    if isinstance(value, str):
        return escape_unencodable(value)
    changed = False
    stack = [value] if isinstance(value, (dict, list)) else []
    while stack:
        node = stack.pop()
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for index, child in items:
            if isinstance(child, str):
                child, hit = escape_unencodable(child)
                if hit:
                    node[index], changed = child, True
            elif isinstance(child, (dict, list)):
                stack.append(child)
            if isinstance(node, dict):
                key, hit = escape_unencodable(index)
                if hit:
                    node[key], changed = node.pop(index), True
    return value, changed


def clean_fields(obj: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """Escape unstorable strings in ``obj`` in place (fields in ``skip`` untouched); the flags that applies.

    An escaped field NAME flags ``field_escaped``; an escaped value flags :func:`field_flag` of its field.
    """
    flags: list[str] = []
    for name in list(obj):
        if name in skip:
            continue
        value, changed = _clean_value(obj[name])
        key, key_changed = escape_unencodable(name)
        if key_changed:
            del obj[name]
            flags.append(str(Flag.FIELD_ESCAPED))
        obj[key] = value
        if changed:
            flags.append(field_flag(key))
    return sorted(set(flags))
