"""Webdataset readers and writers: raw samples from tars, decoding with limits, the filtered-tar writer.

Typical use (one row per sample, never an exception on bad data)::

    limits = ReaderLimits(max_images=10)
    for raw in iter_raw_samples("sources/datacomp/00000000.tar", limits=limits):
        sample = decode_caption(raw, limits)      # CaptionSample | SampleFailure
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from unifilter_core.data.caption import CAPTION_FIELD_TYPES, CaptionSample, decode_caption
from unifilter_core.data.fingerprint import TarStat, tar_fingerprint, tar_stat
from unifilter_core.data.images import ALLOWED_FORMATS, decode_image, to_rgb
from unifilter_core.data.interleaved import DocumentSample, decode_document
from unifilter_core.data.limits import DEFAULT_MAX_PIXELS, ReaderLimits
from unifilter_core.data.tars import IMAGE_EXTS, RawSample, is_unsafe_member_name, iter_raw_samples, split_key
from unifilter_core.data.writer import (
    FilteredTarSummary,
    atomic_output,
    atomic_write_bytes,
    write_filtered_tar,
    write_manifest_json,
)
from unifilter_core.records import SAMPLE_KINDS, SampleFailure, SampleKind


def decode_sample(
    raw: RawSample, kind: SampleKind, limits: ReaderLimits | None = None
) -> CaptionSample | DocumentSample | SampleFailure:
    """Decode ``raw`` as a caption sample or an interleaved document.

    Raises:
        ValueError: for an unknown ``kind`` (a caller bug, not bad data).
    """
    if kind == "caption":
        return decode_caption(raw, limits)
    if kind == "interleaved":
        return decode_document(raw, limits)
    raise ValueError(f"unknown sample kind {kind!r}; expected 'caption' or 'interleaved'")


def iter_samples(
    tar_path: str | os.PathLike[str],
    kind: SampleKind,
    *,
    limits: ReaderLimits | None = None,
    source: str | None = None,
) -> Iterator[tuple[str, CaptionSample | DocumentSample | SampleFailure]]:
    """``(key, decoded sample or failure)`` for every row of a tar, decoding in this process.

    Raises:
        ValueError: at call time, for an unknown ``kind``.
    """
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; expected 'caption' or 'interleaved'")
    rows = iter_raw_samples(tar_path, source=source, limits=limits)
    return ((raw.key, decode_sample(raw, kind, limits)) for raw in rows)


__all__ = [
    "ALLOWED_FORMATS",
    "CAPTION_FIELD_TYPES",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTS",
    "CaptionSample",
    "DocumentSample",
    "FilteredTarSummary",
    "RawSample",
    "ReaderLimits",
    "SampleKind",
    "TarStat",
    "atomic_output",
    "atomic_write_bytes",
    "decode_caption",
    "decode_document",
    "decode_image",
    "decode_sample",
    "is_unsafe_member_name",
    "iter_raw_samples",
    "iter_samples",
    "split_key",
    "tar_fingerprint",
    "tar_stat",
    "to_rgb",
    "write_filtered_tar",
    "write_manifest_json",
]
