"""Interleaved documents (OBELICS layout) from raw tar samples.

A document is ``<key>.json`` holding ``texts`` (a list; a string at text slots, null at image slots) and,
optionally, ``image_info`` (a list of the same length; null at text slots, ``{"image_base64": "..."}`` at image
slots; a ``data:image/...;base64,`` prefix is accepted). Images may instead be separate members of the same key,
``<key>.<n>.<ext>`` with ``ext`` in :data:`~unifilter_core.data.tars.IMAGE_EXTS` and ``n`` the slot's index in
``texts`` (so the member ``doc7.2.jpg`` fills ``texts[2]``); inline base64 wins when a slot has both. An index
of more than 18 digits names no slot: such a member is ignored like any other unknown extension.

Text slots and json fields holding code points UTF-8 cannot store (lone surrogates) are escaped and flagged
(``text_escaped`` for ``texts``; ``uid_escaped`` / ``url_escaped`` / ``field_escaped`` for other fields), on the
document or on the failure; the raw row's flags (``key_escaped``) are carried over. A text slot that is blank
(only whitespace, NUL and other control or format characters) counts as no text.

Outcomes:
- ``json_decode_error`` / ``invalid_fields`` / ``empty_member``: the json is broken, of the wrong shape
  (``texts`` not a list of str|null, ``image_info`` not a list of the same length, a slot with both text and
  image) or zero bytes; ``missing_text`` when the sample has no json member at all.
- ``too_many_images`` (skipped): more image slots than ``max_images``, decided before any image is decoded.
- ``too_many_tokens`` (skipped): text slots longer than ``max_text_chars`` in total.
- ``empty_document`` (skipped): no text with content (blank slots do not count) and no image slot.
- A slot whose image has no data or cannot be decoded is dropped and listed in ``DocumentSample.dropped``
  (``image_slot_without_data``, ``image_decode_error``, ...); an image member whose index is not an image slot
  is listed as ``image_count_mismatch``. When every slot of a non-empty document is dropped, the document fails
  with the first dropped slot's reason.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from unifilter_core.data.images import decode_image
from unifilter_core.data.jsonmember import clean_fields, parse_json_member
from unifilter_core.data.limits import ReaderLimits
from unifilter_core.data.tars import IMAGE_EXTS, RawSample, with_flags
from unifilter_core.data.text import escape_unencodable, is_blank_text
from unifilter_core.records import Flag, Reason, SampleFailure

logger = logging.getLogger(__name__)

# at most 18 digits: int() of a longer run could exceed Python's int-string limit, and no slot is that far
_MEMBER_IMAGE_RE = re.compile(r"^(\d{1,18})\.(" + "|".join(IMAGE_EXTS) + r")$")
_DOC_FIELDS = ("texts", "image_info")


@dataclass(slots=True)
class DocumentSample:
    """A decoded interleaved document; ``texts`` and ``images`` have one entry per slot.

    Attributes:
        key: the sample's ``__key__``.
        texts: the text of each text slot, None at image slots.
        images: the decoded ``RGB`` image of each image slot; None at text slots and at dropped image slots.
        meta: the json's other fields (``image_info`` and ``texts`` removed).
        dropped: (slot index, reason) for every image slot that was dropped, in slot order, then image members
            that matched no image slot (``image_count_mismatch``).
        flags: :class:`~unifilter_core.records.Flag` codes (escaped key, text slots or json fields).
    """

    key: str
    texts: list[str | None]
    images: list[Image.Image | None]
    meta: dict[str, Any] = field(default_factory=dict)
    dropped: list[tuple[int, Reason]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return sum(image is not None for image in self.images)


def _validate(doc: dict[str, Any]) -> tuple[list[str | None], list[Any]] | SampleFailure:
    texts = doc.get("texts")
    if not isinstance(texts, list) or not all(t is None or isinstance(t, str) for t in texts):
        return SampleFailure(Reason.INVALID_FIELDS, "'texts' must be a list of strings and nulls")
    info = doc.get("image_info")
    if info is None:
        info = [None] * len(texts)
    if not isinstance(info, list) or len(info) != len(texts):
        return SampleFailure(Reason.INVALID_FIELDS, "'image_info' must be a list as long as 'texts'")
    for slot, (text, entry) in enumerate(zip(texts, info, strict=True)):
        if entry is None:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("image_base64", ""), (str, type(None))):
            return SampleFailure(Reason.INVALID_FIELDS, f"image_info[{slot}] must be null or an object")
        if text is not None:
            return SampleFailure(Reason.INVALID_FIELDS, f"slot {slot} has both a text and an image")
    return texts, info


def _member_images(raw: RawSample) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    for ext, data in raw.members.items():
        match = _MEMBER_IMAGE_RE.match(ext)
        if match and int(match.group(1)) not in found:  # IMAGE_EXTS order breaks ties (jpg before png)
            found[int(match.group(1))] = data
    return found


def _slot_image(entry: Any, member: bytes | None, limits: ReaderLimits) -> Image.Image | SampleFailure:
    encoded = entry.get("image_base64") if isinstance(entry, dict) else None
    if encoded:
        if encoded.startswith("data:"):
            encoded = encoded.partition(",")[2]
        try:
            data = base64.b64decode(encoded, validate=False)
        except (binascii.Error, ValueError) as exc:
            return SampleFailure(Reason.IMAGE_DECODE_ERROR, f"bad base64: {exc}")
    elif member is not None:
        data = member
    else:
        return SampleFailure(Reason.IMAGE_SLOT_WITHOUT_DATA, "image slot has no image_base64 and no member")
    return decode_image(data, limits)


def _has_text(texts: list[str | None]) -> bool:
    return any(not is_blank_text(t) for t in texts if t is not None)


def _escape_texts(texts: list[str | None], flags: list[str]) -> list[str | None]:
    """``texts`` with unstorable code points escaped; ``text_escaped`` added to ``flags`` when any was."""
    out: list[str | None] = []
    for text in texts:
        if text is not None:
            text, changed = escape_unencodable(text)
            if changed and str(Flag.TEXT_ESCAPED) not in flags:
                flags.append(str(Flag.TEXT_ESCAPED))
        out.append(text)
    return out


def _read_document(
    raw: RawSample, flags: list[str]
) -> tuple[dict[str, Any], list[str | None], list[Any]] | SampleFailure:
    """Parse, clean and validate the document json; escaped fields are added to ``flags``."""
    if "json" not in raw.members:
        return SampleFailure(Reason.MISSING_TEXT, "document has no json member")
    if not raw.members["json"]:
        return SampleFailure(Reason.EMPTY_MEMBER, "json member has 0 bytes")
    doc = parse_json_member(raw.members["json"], "document json")
    if isinstance(doc, SampleFailure):
        return doc
    flags.extend(flag for flag in clean_fields(doc, skip=_DOC_FIELDS) if flag not in flags)
    checked = _validate(doc)
    if isinstance(checked, SampleFailure):
        return _with_ids(checked, doc)
    texts, info = checked
    return doc, _escape_texts(texts, flags), info


def _with_ids(failure: SampleFailure, doc: dict[str, Any]) -> SampleFailure:
    failure.extra.update({name: doc[name] for name in ("uid", "url") if isinstance(doc.get(name), str)})
    return failure


def _precheck(texts: list[str | None], limits: ReaderLimits) -> SampleFailure | None:
    n_slots = sum(t is None for t in texts)
    if limits.max_images is not None and n_slots > limits.max_images:
        return SampleFailure(
            Reason.TOO_MANY_IMAGES,
            f"{n_slots} image slots > max_images={limits.max_images}",
            n_images=n_slots,
        )
    n_chars = sum(len(t) for t in texts if t is not None)
    if n_chars > limits.max_text_chars:
        return SampleFailure(Reason.TOO_MANY_TOKENS, f"{n_chars} text characters > max_text_chars")
    if n_slots == 0 and not _has_text(texts):
        return SampleFailure(Reason.EMPTY_DOCUMENT, f"document has {len(texts)} slots and no text or image")
    return None


def decode_document(raw: RawSample, limits: ReaderLimits | None = None) -> DocumentSample | SampleFailure:
    """One raw interleaved document (a row of :func:`~unifilter_core.data.tars.iter_raw_samples`) as a
    :class:`DocumentSample`, or why not (``raw.failure`` or a new :class:`SampleFailure`); never raises on bad
    data. ``limits`` defaults to :class:`ReaderLimits`."""
    limits = limits or ReaderLimits()
    flags = list(raw.flags)
    if raw.failure is not None:
        return with_flags(raw.failure, flags)
    read = _read_document(raw, flags)
    if isinstance(read, SampleFailure):
        return with_flags(read, flags)
    doc, texts, info = read
    early = _precheck(texts, limits)
    if early is not None:
        return with_flags(_with_ids(early, doc), flags)
    members = _member_images(raw)
    images: list[Image.Image | None] = [None] * len(texts)
    dropped: list[tuple[int, Reason]] = []
    details: list[str] = []
    for slot, text in enumerate(texts):
        if text is not None:
            continue
        result = _slot_image(info[slot], members.get(slot), limits)
        if isinstance(result, SampleFailure):
            dropped.append((slot, result.reason))
            details.append(f"slot {slot}: {result.detail}")
        else:
            images[slot] = result
    for index in sorted(members):
        if index >= len(texts) or texts[index] is not None:
            dropped.append((index, Reason.IMAGE_COUNT_MISMATCH))
    if not _has_text(texts) and not any(image is not None for image in images):
        failure = SampleFailure(dropped[0][1], "every image slot was dropped: " + "; ".join(details))
        return with_flags(_with_ids(failure, doc), flags)
    meta = {k: v for k, v in doc.items() if k not in _DOC_FIELDS}
    return DocumentSample(raw.key, texts, images, meta=meta, dropped=dropped, flags=sorted(flags))
