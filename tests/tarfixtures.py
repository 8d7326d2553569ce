"""Tiny webdataset tars crafted on the fly, good and hostile, for tests across the project.

Three layers, use whichever fits:

- Image bytes: :func:`jpeg_bytes`, :func:`png_bytes`, :func:`image_bytes` and the hostile ones
  (:func:`corrupt_jpeg`, :func:`truncated_jpeg`, :func:`truncated_png`, :func:`lying_header_jpeg`,
  :func:`bomb_png`) and the awkward
  modes (:func:`cmyk_jpeg`, :func:`png_16bit`, :func:`palette_png`, :func:`rgba_png`, :func:`la_png`,
  :func:`animated_gif`).
- Members and tars: :func:`caption_members`, :func:`document_members` (``style="base64"`` puts images in
  ``image_info[*].image_base64``; ``style="members"`` writes ``<key>.<slot>.png``), :func:`write_tar` (any names,
  including ``../../x`` and absolute ones, written with :mod:`tarfile` directly), :func:`write_caption_tar`,
  :func:`write_interleaved_tar`, :func:`truncate_file`.
- Ready-made hostile tars with the expected reader outcome of every row, in row order:
  :func:`write_hostile_caption_tar` and :func:`write_hostile_interleaved_tar` return ``list[ExpectedRow]``
  (``(key, Reason | None)``, None meaning the reader yields a decoded sample). Note that readers decode with
  :class:`~unifilter_core.data.ReaderLimits` defaults (``max_images=10``); processing may fail some of the
  "ok" rows later (e.g. the 1x1 image) for its own reasons.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unifilter_core.records import Reason

Member = tuple[str, bytes]
ExpectedRow = tuple[str, "Reason | None"]

# ---------------------------------------------------------------------------------------------- image bytes


def image_bytes(
    fmt: str = "JPEG", size: tuple[int, int] = (32, 24), mode: str = "RGB", color: Any = None
) -> bytes:
    """An encoded solid-colour image (a gradient stripe is added so decoders have real work)."""
    img = Image.new(mode, size, color if color is not None else _default_color(mode))
    if mode in ("RGB", "L"):
        arr = np.array(img)
        arr[: max(1, size[1] // 4)] = 255
        img = Image.fromarray(arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _default_color(mode: str) -> Any:
    return {
        "RGB": (200, 40, 40),
        "L": 100,
        "RGBA": (10, 200, 10, 128),
        "LA": (90, 128),
        "CMYK": (0, 255, 255, 0),
    }.get(mode, 0)


def jpeg_bytes(size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    return image_bytes("JPEG", size, "RGB", color)


def png_bytes(size: tuple[int, int] = (32, 24), mode: str = "RGB") -> bytes:
    return image_bytes("PNG", size, mode)


def noise_jpeg(side: int = 256, seed: int = 0, quality: int = 90) -> bytes:
    """A square JPEG of random pixels (about 30 KB at 256 px): realistic decode cost for benchmarks."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB").save(
        buf, "JPEG", quality=quality
    )
    return buf.getvalue()


def noise_png(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    """A PNG of random pixels (it does not compress, so cutting it really removes pixel data)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def truncated_png(size: tuple[int, int] = (64, 64)) -> bytes:
    """The first half of a noise PNG (``image_truncated``)."""
    data = noise_png(size)
    return data[: len(data) // 2]


def corrupt_jpeg() -> bytes:
    """A real JPEG whose SOF header claims 2 colour components: PIL refuses it (``image_decode_error``)."""
    data = bytearray(jpeg_bytes((64, 48)))
    sof = data.find(b"\xff\xc0")
    data[sof + 9] = 2
    return bytes(data)


def truncated_jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    """The first half of a real JPEG (``image_truncated``)."""
    data = jpeg_bytes(size)
    return data[: len(data) // 2]


def lying_header_jpeg(declared: tuple[int, int] = (4000, 4000)) -> bytes:
    """A complete small JPEG whose SOF header declares ``declared`` (``image_truncated``)."""
    data = bytearray(jpeg_bytes((64, 48)))
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "baseline JPEG without SOF0?"
    data[sof + 5 : sof + 9] = struct.pack(">HH", declared[1], declared[0])
    return bytes(data)


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + tag
        + payload
        + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
    )


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few hundred bytes declaring ``width x height`` RGB pixels (``image_too_large``, never decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )


def cmyk_jpeg(size: tuple[int, int] = (16, 16)) -> bytes:
    """A CMYK JPEG, pure cyan (RGB 0, 255, 255 after conversion)."""
    return image_bytes("JPEG", size, "CMYK", (255, 0, 0, 0))


def png_16bit(size: tuple[int, int] = (16, 16), value: int = 65535) -> bytes:
    """A 16-bit greyscale PNG (mode ``I;16``) of constant ``value``."""
    arr = np.full((size[1], size[0]), value, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def palette_png(size: tuple[int, int] = (16, 16), transparent: bool = False) -> bytes:
    """A palette (``P``) PNG, red; with ``transparent`` the whole image is transparent."""
    img = Image.new("P", size, 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    buf = io.BytesIO()
    img.save(buf, "PNG", **({"transparency": 1} if transparent else {}))
    return buf.getvalue()


def rgba_png(size: tuple[int, int] = (16, 16), rgba: tuple[int, int, int, int] = (0, 0, 0, 0)) -> bytes:
    """An RGBA PNG (default fully transparent black: white when composited, black when alpha is dropped)."""
    return image_bytes("PNG", size, "RGBA", rgba)


def la_png(size: tuple[int, int] = (16, 16)) -> bytes:
    return image_bytes("PNG", size, "LA", (0, 0))


def animated_gif(n_frames: int = 3, size: tuple[int, int] = (16, 16)) -> bytes:
    """An animated GIF whose first frame is red and later frames blue."""
    frames = [Image.new("RGB", size, (255, 0, 0) if i == 0 else (0, 0, 255)) for i in range(n_frames)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- members / tars


def write_tar(path: str | os.PathLike[str], members: Iterable[Member]) -> Path:
    """Write ``members`` (name, bytes) in order with :mod:`tarfile`, names used verbatim (even unsafe ones)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out


def caption_members(
    key: str,
    *,
    image: bytes | None = b"",
    image_ext: str = "jpg",
    text: str | bytes | None = "a red square on a white background",
    meta: dict[str, Any] | bytes | None = None,
) -> list[Member]:
    """Members of one DataComp-style sample; ``image=b""`` (default) means a fresh valid JPEG, None omits it.

    ``meta`` None writes the usual img2dataset json (uid, url, caption, key, status, width, height); pass bytes
    for a broken json, or a dict to write exactly that.
    """
    members: list[Member] = []
    if image is not None:
        members.append((f"{key}.{image_ext}", image if image else jpeg_bytes()))
    if text is not None:
        members.append((f"{key}.txt", text.encode("utf-8") if isinstance(text, str) else text))
    if meta is None:
        caption = text if isinstance(text, str) else None
        meta = {"uid": f"uid{key}", "url": f"https://example.com/{key}.jpg", "caption": caption, "key": key}
        meta.update({"status": "success", "width": 32, "height": 24})
    members.append((f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode("utf-8")))
    return members


def write_caption_tar(path: str | os.PathLike[str], n: int = 5, *, start: int = 0) -> Path:
    """``n`` valid caption samples keyed ``%09d`` from ``start``."""
    members: list[Member] = []
    for i in range(start, start + n):
        members += caption_members(
            f"{i:09d}", image=jpeg_bytes(color=(i * 37 % 256, 80, 120)), text=f"caption {i}"
        )
    return write_tar(path, members)


def document_members(
    key: str,
    texts: Sequence[str | None],
    images: Sequence[bytes | None] | None = None,
    *,
    style: str = "base64",
    extra: dict[str, Any] | None = None,
) -> list[Member]:
    """Members of one OBELICS-style document.

    Args:
        key: the sample key.
        texts: one entry per slot, None at image slots.
        images: image bytes per IMAGE slot in slot order (None: a slot without data); default a PNG per slot.
        style: ``"base64"`` (``image_info[i].image_base64``) or ``"members"`` (``<key>.<i>.png`` members).
        extra: more json fields (e.g. ``{"url": ...}``).
    """
    slots = [i for i, t in enumerate(texts) if t is None]
    if images is None:
        images = [png_bytes((12, 12)) for _ in slots]
    if len(images) != len(slots):
        raise ValueError(f"{len(slots)} image slots but {len(images)} images")
    doc: dict[str, Any] = {"texts": list(texts), **(extra or {})}
    members: list[Member] = []
    if style == "base64":
        info: list[Any] = [None] * len(texts)
        for slot, data in zip(slots, images, strict=True):
            info[slot] = {"image_base64": base64.b64encode(data).decode("ascii")} if data is not None else {}
        doc["image_info"] = info
    elif style == "members":
        members += [
            (f"{key}.{slot}.png", data) for slot, data in zip(slots, images, strict=True) if data is not None
        ]
    else:
        raise ValueError(f"style must be 'base64' or 'members', got {style!r}")
    return [(f"{key}.json", json.dumps(doc).encode("utf-8")), *members]


def write_interleaved_tar(path: str | os.PathLike[str], n: int = 4, *, style: str = "base64") -> Path:
    """``n`` valid documents (text, image, text, image) keyed ``doc%05d``."""
    members: list[Member] = []
    for i in range(n):
        members += document_members(f"doc{i:05d}", [f"intro {i}", None, f"body {i}", None], style=style)
    return write_tar(path, members)


def truncate_file(path: str | os.PathLike[str], at: int | float) -> Path:
    """Cut a file to ``at`` bytes (an int) or to that fraction of its size (a float in (0, 1))."""
    p = Path(path)
    size = p.stat().st_size
    keep = int(size * at) if isinstance(at, float) else at
    with open(p, "r+b") as handle:
        handle.truncate(keep)
    return p


# ---------------------------------------------------------------------------------------------- hostile tars


def hostile_caption_members() -> tuple[list[Member], list[ExpectedRow]]:
    """Members of a caption tar with every caption-level problem, and the expected rows in order."""
    rows: list[tuple[list[Member], list[ExpectedRow]]] = [
        (caption_members("ok_jpeg"), [("ok_jpeg", None)]),
        (caption_members("ok_png", image=png_bytes(), image_ext="png"), [("ok_png", None)]),
        (caption_members("corrupt", image=corrupt_jpeg()), [("corrupt", Reason.IMAGE_DECODE_ERROR)]),
        (caption_members("truncimg", image=truncated_jpeg()), [("truncimg", Reason.IMAGE_TRUNCATED)]),
        (caption_members("lying", image=lying_header_jpeg()), [("lying", Reason.IMAGE_TRUNCATED)]),
        (caption_members("bomb", image=bomb_png(), image_ext="png"), [("bomb", Reason.IMAGE_TOO_LARGE)]),
        (caption_members("cmyk", image=cmyk_jpeg()), [("cmyk", None)]),
        (caption_members("sixteen", image=png_16bit(), image_ext="png"), [("sixteen", None)]),
        (
            caption_members("palette", image=palette_png(transparent=True), image_ext="png"),
            [("palette", None)],
        ),
        (caption_members("rgba", image=rgba_png(), image_ext="png"), [("rgba", None)]),
        (caption_members("la", image=la_png(), image_ext="png"), [("la", None)]),
        (caption_members("gif", image=animated_gif(), image_ext="gif"), [("gif", None)]),
        (caption_members("tiny", image=png_bytes((1, 1)), image_ext="png"), [("tiny", None)]),
        (caption_members("zeroimg", image=None) + [("zeroimg.jpg", b"")], [("zeroimg", Reason.EMPTY_MEMBER)]),
        (caption_members("zerotxt", text=b"", meta={"uid": "z"}), [("zerotxt", Reason.EMPTY_MEMBER)]),
        (caption_members("noimage", image=None), [("noimage", Reason.MISSING_IMAGE)]),
        (caption_members("notext", text=None, meta={"uid": "n"}), [("notext", Reason.MISSING_TEXT)]),
        (
            caption_members("latin1", text="café".encode("latin-1"), meta={}),
            [("latin1", Reason.TEXT_DECODE_ERROR)],
        ),
        (caption_members("badjson", meta=b"{not json"), [("badjson", Reason.JSON_DECODE_ERROR)]),
        (caption_members("deepjson", meta=b"[" * 100_000), [("deepjson", Reason.JSON_DECODE_ERROR)]),
        (
            caption_members("wrongtype", meta={"uid": ["a"], "caption": 5}),
            [("wrongtype", Reason.INVALID_FIELDS)],
        ),
        (caption_members("longcap", text="word " * 220_000), [("longcap", None)]),
        ([("../../evil.jpg", jpeg_bytes())], [("../../evil", Reason.UNSAFE_MEMBER_NAME)]),
        ([("/abs/evil.txt", b"absolute")], [("/abs/evil", Reason.UNSAFE_MEMBER_NAME)]),
        (
            caption_members("dupmember") + [("dupmember.jpg", jpeg_bytes())],
            [("dupmember", None), ("dupmember", Reason.DUPLICATE_KEY)],
        ),
        (caption_members("ok_jpeg", text="second copy"), [("ok_jpeg", Reason.DUPLICATE_KEY)]),
    ]
    members = [m for ms, _ in rows for m in ms]
    expected = [e for _, es in rows for e in es]
    return members, expected


def write_hostile_caption_tar(path: str | os.PathLike[str]) -> list[ExpectedRow]:
    """Write the hostile caption tar; returns the expected ``(key, reason)`` of every row, in row order."""
    members, expected = hostile_caption_members()
    write_tar(path, members)
    return expected


def hostile_interleaved_members(style: str = "base64") -> tuple[list[Member], list[ExpectedRow]]:
    """Members of an interleaved tar with every document-level problem, and the expected rows in order."""
    good = png_bytes((12, 12))
    slot_without_data = document_members("noslotdata", ["text", None, "more"], [None], style=style)
    rows: list[tuple[list[Member], list[ExpectedRow]]] = [
        (document_members("ok", ["hello", None, "world", None], style=style), [("ok", None)]),
        (document_members("textonly", ["just text"], [], style=style), [("textonly", None)]),
        (document_members("empty", [], [], style=style), [("empty", Reason.EMPTY_DOCUMENT)]),
        (document_members("blank", ["  ", ""], [], style=style), [("blank", Reason.EMPTY_DOCUMENT)]),
        (
            document_members("fifty", ["t"] + [None] * 50, [good] * 50, style=style),
            [("fifty", Reason.TOO_MANY_IMAGES)],
        ),
        (slot_without_data, [("noslotdata", None)]),
        (
            document_members("onlybad", [None], [corrupt_jpeg()], style=style),
            [("onlybad", Reason.IMAGE_DECODE_ERROR)],
        ),
        (document_members("bomb", ["t", None], [bomb_png()], style=style), [("bomb", None)]),
        ([("badjson.json", b'{"texts": [')], [("badjson", Reason.JSON_DECODE_ERROR)]),
        ([("wrongtype.json", b'{"texts": "abc"}')], [("wrongtype", Reason.INVALID_FIELDS)]),
        (
            [("mismatch.json", json.dumps({"texts": ["a", None], "image_info": [None]}).encode())],
            [("mismatch", Reason.INVALID_FIELDS)],
        ),
        ([("zerojson.json", b"")], [("zerojson", Reason.EMPTY_MEMBER)]),
        ([("nojson.txt", b"stray text")], [("nojson", Reason.MISSING_TEXT)]),
        ([("../../evil.json", b"{}")], [("../../evil", Reason.UNSAFE_MEMBER_NAME)]),
        (document_members("ok", ["again"], [], style=style), [("ok", Reason.DUPLICATE_KEY)]),
    ]
    members = [m for ms, _ in rows for m in ms]
    expected = [e for _, es in rows for e in es]
    return members, expected


def write_hostile_interleaved_tar(path: str | os.PathLike[str], style: str = "base64") -> list[ExpectedRow]:
    """Write the hostile interleaved tar; returns the expected ``(key, reason)`` of every row, in row order."""
    members, expected = hostile_interleaved_members(style)
    write_tar(path, members)
    return expected


# ---------------------------------------------------------------------------------------------- odd archives


def non_utf8_name(raw: bytes) -> str:
    """A member name holding bytes that are not UTF-8, as :mod:`tarfile` decodes it (``surrogateescape``)."""
    return raw.decode("utf-8", "surrogateescape")


def write_tar_pax(path: str | os.PathLike[str], members: Iterable[tuple[str, bytes, dict[str, str]]]) -> Path:
    """Like :func:`write_tar`, with extra pax header records per member (e.g. ``{"mtime": "inf"}``)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            info.pax_headers = dict(pax)
            tar.addfile(info, io.BytesIO(data))
    return out


def tar_bytes(members: Iterable[Member], tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    """A whole tar (end-of-archive blocks and record padding included) as bytes, in ``tar_format``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def concatenate_tars(
    path: str | os.PathLike[str], parts: Sequence[bytes], *, padding_blocks: int = 0, tail: bytes = b""
) -> Path:
    """``cat part1 part2 ...`` with ``padding_blocks`` zero blocks between parts and ``tail`` after the last."""
    gap = b"\x00" * (512 * padding_blocks)
    out = Path(path)
    out.write_bytes(gap.join(parts) + tail)
    return out
