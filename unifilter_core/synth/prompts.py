"""Prompts, tool schema and output validation for Claude-written quality-level pairs.

One request shows Claude one image (``caption``) or an ordered image set (``interleaved``) and asks, through a
forced tool call, for one text at each of the four quality levels. The level definitions are ours (the original
UniFilter prompts were never published); changing any text here changes what Claude writes, so bump
:data:`PROMPT_VERSION` with it: the version is part of every request id, and a new version is a new request.
"""

from __future__ import annotations

import base64
import io
import math
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from unifilter_core.records import SAMPLE_KINDS

PROMPT_VERSION = "unifilter-levels-v1"
TOOL_NAME = "record_quality_levels"
IMAGE_MARKER = "<image>"
LEVELS = (3, 2, 1, 0)
KINDS = SAMPLE_KINDS

LEVEL_RUBRIC = """\
Quality levels (integers; higher is better):

Level 3 - accurate, specific, fluent, fully grounded.
  Every statement is true of the image(s): objects, their number, colours, sizes, positions, text that is
  visible, the setting and the action. It is specific (names what is actually there rather than a generic
  category), written in fluent, well-formed English, and contains nothing that cannot be verified by looking.

Level 2 - accurate but vague, incomplete or slightly wrong.
  Mostly true of the image(s) but weaker than level 3 in one way: generic wording ("some objects on a
  background"), only part of the content described, or one small inaccuracy (a slightly wrong shade, an
  approximate count). A reader would still recognise the image from it.

Level 1 - mostly wrong about the image, or web noise.
  Either fluent text of the same style and length as level 3 whose main facts are wrong for this image
  (wrong objects, colours, counts or positions), or the debris found in crawled data: alt-text fragments,
  file names, camera metadata, boilerplate ("click to enlarge", "image may contain"), a caption that belongs
  to a different photo. For documents: a readable text whose images do not match the paragraphs they sit in.

Level 0 - unrelated, spam or gibberish.
  Nothing to do with the image(s): advertising, keyword stuffing, SEO spam, random characters, broken
  markup, or text in the wrong context entirely.

Writing rules:
  - The four texts must be clearly different from each other and each must fit exactly one level.
  - About half of the time, write level 1 in the same wording style, tone and length as level 3 so that
    the two differ only in facts about the image: a reader without the image could not tell them apart.
  - Do not mention the level, the rubric, quality, or that the text was written on purpose.
  - Write plain text: no Markdown, no lists, no surrounding quotes.
"""

SYSTEM_PROMPT = (
    """\
You write training data for a multimodal data-quality classifier. The classifier learns to grade how well a
text fits its image(s), the way web-crawled image-text pairs and interleaved web documents vary in quality.
For each input you are shown real images and you write the same kind of text four times, once per quality
level defined below, then return all four by calling the provided tool exactly once. Never answer in prose.

Caption inputs: one image. Each text is a caption of one to three sentences (at most about 60 words), the
kind found in alt text or under a photo on a web page.

Interleaved-document inputs: an ordered set of images. Each text is a short web document (two to six short
paragraphs) that contains the literal marker <image> exactly once per image, in image order, at the place the
image would appear; the paragraph next to each marker should concern that image (except where the level says
the images do not match). Never write <image> for anything other than an image position.

"""
    + LEVEL_RUBRIC
    + """
Examples for one photo (a brown dog catching a red frisbee on a beach, two people and a pier behind it):
  level 3: "A brown dog leaps to catch a red frisbee on a sandy beach while two people walk by the wooden pier
           behind it."
  level 2: "A dog playing outside on a sunny day."
  level 1 (same style as level 3, wrong facts): "A black cat leaps to catch a blue ball on a snowy lawn while
           three children watch from the porch behind it."
  level 1 (web noise): "IMG_4471.JPG | uploaded by admin | click to enlarge"
  level 0: "Best casino bonus 2024!!! free spins no deposit win big casino casino bonus"

Examples for a document with two images (a bakery counter with bread, then a close-up of a croissant):
  level 3: a short post about a neighbourhood bakery: a paragraph introducing the shop, <image>, a paragraph
           about the loaves on the counter, <image>, a paragraph about the croissant shown close up.
  level 2: the same kind of post, but vague ("we went to a place and had some food") or describing only one
           of the images.
  level 1: a fluent post about car maintenance or a hiking trip with the two <image> markers placed between
           its paragraphs, so that the images do not match the text around them; or a scraped page of
           navigation links, cookie notices and share buttons with the markers in between.
  level 0: keyword spam or random characters around the two <image> markers.

Length and variety: vary sentence structure, vocabulary and openings across inputs; do not start every
caption with "A" or "This image"; do not reuse the example wording above. Keep level 3 and style-matched
level 1 captions within a few words of the same length. Never refuse: every image, including diagrams,
screenshots, text-only images and abstract patterns, can be described at all four levels.
"""
)


@dataclass(frozen=True, slots=True)
class ValidatedTexts:
    """The four texts of one request, validated. ``texts[level]`` for level in 0..3."""

    texts: dict[int, str]


def level_key(level: int) -> str:
    """The tool-schema property for a level: ``level_3`` ... ``level_0``."""
    return f"level_{level}"


def tool_definition(kind: str) -> dict[str, Any]:
    """The tool Claude must call, with a JSON schema requiring all four levels as non-empty strings."""
    _check_kind(kind)
    what = "caption" if kind == "caption" else "document text with one <image> marker per image, in order"
    properties = {
        level_key(lv): {"type": "string", "minLength": 1, "description": f"The level-{lv} {what}."}
        for lv in LEVELS
    }
    return {
        "name": TOOL_NAME,
        "description": "Record the four texts, one per quality level (3, 2, 1, 0), for the images shown.",
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": [level_key(lv) for lv in LEVELS],
            "additionalProperties": False,
        },
    }


def user_instruction(kind: str, n_images: int) -> str:
    """The text block that follows the image(s) in the user turn."""
    _check_kind(kind)
    if kind == "caption":
        return "Write the four captions (levels 3, 2, 1, 0) for this image and record them with the tool."
    return (
        f"These {n_images} images belong to one web document, in this order. Write the four document texts "
        f"(levels 3, 2, 1, 0); each must contain exactly {n_images} {IMAGE_MARKER} markers, one per image in "
        "order. Record them with the tool."
    )


def reask_note(problem: str) -> str:
    """Appended to the user turn when an earlier answer to the same request was invalid."""
    return f"A previous answer was rejected ({problem}). Follow the format exactly this time."


def validate_tool_input(kind: str, n_images: int, data: Any) -> ValidatedTexts | str:
    """Check a tool call's input.

    Args:
        kind: ``caption`` or ``interleaved``.
        n_images: images attached to the request (the ``<image>`` markers a document text must hold).
        data: the ``input`` of the tool_use block (parsed JSON).

    Returns:
        :class:`ValidatedTexts` when valid, else a short machine-readable problem string.
    """
    if not isinstance(data, dict):
        return "tool input is not an object"
    texts: dict[int, str] = {}
    for lv in LEVELS:
        value = data.get(level_key(lv))
        if not isinstance(value, str) or not value.strip():
            return f"{level_key(lv)} missing or empty"
        markers = len(re.findall(re.escape(IMAGE_MARKER), value))
        expected = 0 if kind == "caption" else n_images
        if markers != expected:
            return f"{level_key(lv)} has {markers} {IMAGE_MARKER} markers, expected {expected}"
        texts[lv] = value.strip()
    if len(set(texts.values())) < len(LEVELS):
        return "levels are not all different"
    return ValidatedTexts(texts=texts)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# ---- images as request content ---------------------------------------------------------------------------------
_API_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
_API_MAX_BYTES = (
    5 * 1024 * 1024
)  # the API's per-image limit (base64 inflates by 4/3; we re-encode above 3.5 MB)


class ImageError(ValueError):
    """An image that cannot be decoded (the request is recorded as failed, never sent)."""


@dataclass(frozen=True, slots=True)
class ApiImage:
    """One image ready to attach: media type, bytes (original or re-encoded) and size after any downscale."""

    media_type: str
    data: bytes
    width: int
    height: int

    @property
    def token_estimate(self) -> int:
        """Image tokens the API bills, about width * height / 750."""
        return math.ceil(self.width * self.height / 750)

    def source_block(self) -> dict[str, str]:
        return {"type": "base64", "media_type": self.media_type, "data": base64.b64encode(self.data).decode()}


def prepare_image(data: bytes, max_side: int) -> ApiImage:
    """Decode ``data`` fully; keep it as is when the API accepts it, else re-encode as JPEG (RGB, longest side
    at most ``max_side``).

    Raises:
        ImageError: the bytes are not a decodable image (truncated, unknown format, decompression bomb).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, (width, height) = im.format, im.size
            if fmt in _API_FORMATS and max(width, height) <= max_side and len(data) <= _API_MAX_BYTES * 0.7:
                return ApiImage(_API_FORMATS[fmt], data, width, height)
            rgb = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from exc
    rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=90)
    return ApiImage("image/jpeg", buf.getvalue(), rgb.width, rgb.height)


def build_params(
    kind: str,
    images: list[ApiImage],
    *,
    model: str,
    max_tokens: int,
    force_tool: bool = True,
    thinking: dict[str, Any] | None = None,
    reask: str | None = None,
) -> dict[str, Any]:
    """Messages API parameters of one request. The system prompt (with the rubric) carries ``cache_control``,
    so tools + system form one cached prefix shared by every request of a kind."""
    content: list[dict[str, Any]] = []
    for i, image in enumerate(images, start=1):
        if kind == "interleaved":
            content.append({"type": "text", "text": f"Image {i}:"})
        content.append({"type": "image", "source": image.source_block()})
    content.append({"type": "text", "text": user_instruction(kind, len(images))})
    if reask:
        content.append({"type": "text", "text": reask_note(reask)})
    params: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "system": [{"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}}],
        "tools": [tool_definition(kind)],
        "tool_choice": {"type": "tool", "name": TOOL_NAME} if force_tool else {"type": "auto"},
        "messages": [{"role": "user", "content": content}],
    }
    if thinking is not None:
        params["thinking"] = thinking
    return params


def parse_response(kind: str, n_images: int, message: Any) -> ValidatedTexts | str:
    """The validated texts of an API Message (SDK object), or a short reason why it is invalid."""
    if getattr(message, "stop_reason", None) == "max_tokens":
        return "output cut at max_tokens"
    for block in getattr(message, "content", None) or []:
        if getattr(block, "type", None) == "tool_use" and getattr(block, "name", None) == TOOL_NAME:
            return validate_tool_input(kind, n_images, block.input)
    return "no tool call in the response"
