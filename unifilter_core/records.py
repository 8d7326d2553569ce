"""Shared record types and reason codes.

Every sample that enters the system leaves as exactly one row: scored (``ok``), ``skipped`` (valid input that
a configured limit excludes) or ``error`` (input that could not be read). The reason codes below are
machine-readable and part of the public interface (they land in score tables and the catalog).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class SampleKind(str, Enum):
    """The tar layout: DataComp-style image-caption pairs or OBELICS-style interleaved documents.

    The one sample-kind type of the project (a ``str``: ``SampleKind.CAPTION == "caption"``)."""

    CAPTION = "caption"
    INTERLEAVED = "interleaved"

    def __str__(self) -> str:
        return self.value


#: the kinds' names, in order
SAMPLE_KINDS: tuple[str, ...] = tuple(k.value for k in SampleKind)


class Status(str, Enum):
    OK = "ok"
    SKIPPED = "skipped"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


class Reason(str, Enum):
    """Why a sample was not scored. ``status_of`` maps each code to skipped/error."""

    # read / decode errors
    TAR_TRUNCATED = "tar_truncated"
    TAR_READ_ERROR = "tar_read_error"
    UNSAFE_MEMBER_NAME = "unsafe_member_name"
    DUPLICATE_KEY = "duplicate_key"
    IMAGE_DECODE_ERROR = "image_decode_error"
    IMAGE_TRUNCATED = "image_truncated"
    EMPTY_MEMBER = "empty_member"
    JSON_DECODE_ERROR = "json_decode_error"
    INVALID_FIELDS = "invalid_fields"
    TEXT_DECODE_ERROR = "text_decode_error"
    MISSING_IMAGE = "missing_image"
    MISSING_TEXT = "missing_text"
    IMAGE_SLOT_WITHOUT_DATA = "image_slot_without_data"
    IMAGE_COUNT_MISMATCH = "image_count_mismatch"
    # limits (valid input, excluded by configuration)
    IMAGE_TOO_LARGE = "image_too_large"
    TOO_MANY_IMAGES = "too_many_images"
    TOO_MANY_TOKENS = "too_many_tokens"
    EMPTY_DOCUMENT = "empty_document"
    NO_IMAGES = "no_images"
    # model
    MODEL_ERROR = "model_error"
    # the sample broke the software, not a limit: a decode worker died on it even when retried alone, or an
    # unexpected exception was raised while reading, decoding, tokenizing or writing it (detail has the error)
    WORKER_CRASH = "worker_crash"
    INTERNAL_ERROR = "internal_error"

    def __str__(self) -> str:
        return self.value


_SKIPPED = {
    Reason.IMAGE_TOO_LARGE,
    Reason.TOO_MANY_IMAGES,
    Reason.TOO_MANY_TOKENS,
    Reason.EMPTY_DOCUMENT,
    Reason.NO_IMAGES,
}


class Flag(str, Enum):
    """Facts about a row that did not stop it from being scored (the ``flags`` column, comma-separated).

    Text that cannot be stored as UTF-8 (lone surrogates such as an emoji cut in half, member names with
    non-UTF-8 bytes) is kept with the offending code points written as ``\\uXXXX`` / ``\\xNN`` escapes; the flag
    says which field was escaped.
    """

    KEY_ESCAPED = "key_escaped"
    UID_ESCAPED = "uid_escaped"
    URL_ESCAPED = "url_escaped"
    TEXT_ESCAPED = "text_escaped"
    FIELD_ESCAPED = "field_escaped"  # another json field (only the original output format stores those)

    def __str__(self) -> str:
        return self.value


def status_of(reason: Reason) -> Status:
    """The status a reason code implies: limits are ``skipped``, everything else ``error``."""
    return Status.SKIPPED if reason in _SKIPPED else Status.ERROR


@dataclass(slots=True)
class ScoreResult:
    """The outcome of scoring one sample (one row of a score table).

    Attributes:
        score: the classifier output (about 0..3 for the released regression head); None unless status is ok.
        status: ``"ok"``, ``"skipped"`` or ``"error"``.
        reason: a :class:`Reason` code when status is not ok, else None.
        n_images: images the model saw (after dropping 1-pixel images).
        n_tokens: length of the spliced sequence (text tokens + image tokens).
        truncated: True when the sequence was cut to the token limit (EOS is always kept).
        detail: a human-readable message for errors (never parsed).
        flags: :class:`Flag` codes (e.g. ``text_escaped``), sorted, no duplicates.
        quality_class: argmax class of a multi-label head (None for the regression head).
        expected_level: sum over classes of P(class) x class index, for multi-label heads (None otherwise).
    """

    score: float | None
    status: str = "ok"
    reason: str | None = None
    n_images: int = 0
    n_tokens: int = 0
    truncated: bool = False
    detail: str | None = None
    flags: list[str] = field(default_factory=list)
    quality_class: int | None = None
    expected_level: float | None = None

    @classmethod
    def failed(cls, reason: Reason, detail: str | None = None, **kw: Any) -> ScoreResult:
        return cls(score=None, status=str(status_of(reason)), reason=str(reason), detail=detail, **kw)


@dataclass(slots=True)
class SampleFailure:
    """A sample a reader or processor could not turn into model input."""

    reason: Reason
    detail: str | None = None
    n_images: int = 0
    n_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    @property
    def status(self) -> Status:
        return status_of(self.reason)

    def to_result(self) -> ScoreResult:
        return ScoreResult.failed(
            self.reason,
            self.detail,
            n_images=self.n_images,
            n_tokens=self.n_tokens,
            flags=sorted(set(self.flags)),
        )
