"""One bad sample never costs its tar: hostile names, text, json and archive layouts through the readers."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests import tarfixtures as tf
from unifilter_core.data import (
    CaptionSample,
    DocumentSample,
    decode_caption,
    decode_document,
    decode_image,
    iter_raw_samples,
    write_filtered_tar,
)
from unifilter_core.data.jsonmember import MAX_JSON_DEPTH
from unifilter_core.data.listing import list_tar_samples
from unifilter_core.records import Reason, SampleFailure

SYNTHETIC = ("#truncated", "#read_error")


def _rows(tar: Path) -> list[tuple[str, str | None]]:
    return [(r.key, r.failure and r.failure.reason.value) for r in iter_raw_samples(tar)]


def _caption_from(tmp_path: Path, members: list[tf.Member]) -> CaptionSample | SampleFailure:
    (raw,) = list(iter_raw_samples(tf.write_tar(tmp_path / "one.tar", members)))
    return decode_caption(raw)


def _document_from(
    tmp_path: Path, doc: dict | bytes, extra: list[tf.Member] = ()
) -> DocumentSample | SampleFailure:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    (raw,) = list(iter_raw_samples(tf.write_tar(tmp_path / "doc.tar", [("d.json", data), *extra])))
    return decode_document(raw)


def _storable(*texts: str) -> None:
    for text in texts:
        text.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate


# ------------------------------------------------------------------------------------------- member names


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_non_utf8_member_name_gives_an_escaped_flagged_key(tmp_path: Path, fmt: int) -> None:
    key = tf.non_utf8_name(b"caf\xe9/0001")
    members = tf.caption_members(key, meta={"uid": "u1"})
    tar = tmp_path / "n.tar"
    tar.write_bytes(tf.tar_bytes(members, fmt))
    (raw,) = list(iter_raw_samples(tar))
    assert raw.key == "caf\\xe9/0001" and raw.flags == ["key_escaped"]
    assert raw.member_names == [name for name, _ in members]  # the raw names, for writers
    sample = decode_caption(raw)
    assert isinstance(sample, CaptionSample) and sample.flags == ["key_escaped"]


def test_escaped_key_flag_reaches_failures(tmp_path: Path) -> None:
    key = tf.non_utf8_name(b"\xff\xfe")
    sample = _caption_from(tmp_path, tf.caption_members(key, image=None, meta={"uid": "u"}))
    assert isinstance(sample, SampleFailure) and sample.reason == Reason.MISSING_IMAGE
    assert sample.to_result().flags == ["key_escaped"]
    dup = tf.write_tar(tmp_path / "d.tar", [(f"{key}.txt", b"a"), ("x.txt", b"b"), (f"{key}.txt", b"c")])
    rows = list(iter_raw_samples(dup))
    assert [(r.key, r.flags) for r in rows] == [
        ("\\xff\\xfe", ["key_escaped"]),
        ("x", []),
        ("\\xff\\xfe", ["key_escaped"]),
    ]
    assert decode_caption(rows[2]).flags == ["key_escaped"]


def test_unsafe_non_utf8_name_row_is_escaped(tmp_path: Path) -> None:
    name = tf.non_utf8_name(b"../\xff.jpg")
    (raw,) = list(iter_raw_samples(tf.write_tar(tmp_path / "u.tar", [(name, b"x")])))
    assert (raw.key, raw.failure.reason, raw.flags) == (
        "../\\xff",
        Reason.UNSAFE_MEMBER_NAME,
        ["key_escaped"],
    )


def test_filtered_writer_keeps_a_sample_by_its_escaped_key(tmp_path: Path) -> None:
    key = tf.non_utf8_name(b"shard/\xe9t\xe9")
    members = tf.caption_members(key) + tf.caption_members("plain")
    src = tf.write_tar(tmp_path / "src.tar", members)
    summary = write_filtered_tar(src, {"shard/\\xe9t\\xe9"}, tmp_path / "out.tar")
    assert (summary.kept, summary.dropped, summary.missing) == (1, 1, 0)
    with tarfile.open(tmp_path / "out.tar", encoding="utf-8", errors="surrogateescape") as out:
        names = out.getnames()
        assert out.extractfile(names[0]).read() == members[0][1]
    assert names == [name for name, _ in members[:3]]  # the original bytes are written back
    assert [r.key for r in iter_raw_samples(tmp_path / "out.tar")] == ["shard/\\xe9t\\xe9"]


@pytest.mark.parametrize("mtime", ["inf", "-inf", "nan", "1e400"])
def test_hostile_pax_mtime_never_raises(tmp_path: Path, mtime: str) -> None:
    tar = tf.write_tar_pax(
        tmp_path / "m.tar", [("k.txt", b"a", {"mtime": mtime}), ("k.jpg", tf.jpeg_bytes(), {})]
    )
    (raw,) = list(iter_raw_samples(tar))
    assert raw.failure is None and raw.member_mtimes[0] == 0
    assert isinstance(decode_caption(raw), CaptionSample)


# ------------------------------------------------------------------------------------------- concatenated tars


def _part(p: int, n: int = 2) -> bytes:
    return tf.tar_bytes([m for s in range(n) for m in tf.caption_members(f"p{p}s{s}")])


@pytest.mark.parametrize(("n_parts", "padding"), [(2, 0), (3, 0), (3, 5)])
def test_every_sample_of_every_concatenated_part_gets_a_row(
    tmp_path: Path, n_parts: int, padding: int
) -> None:
    tar = tf.concatenate_tars(
        tmp_path / "cat.tar", [_part(p) for p in range(n_parts)], padding_blocks=padding
    )
    expected = [(f"p{p}s{s}", None) for p in range(n_parts) for s in range(2)]
    assert _rows(tar) == expected
    assert list_tar_samples(tar).keys == {key for key, _ in expected}


@pytest.mark.parametrize(
    "compress",
    [
        lambda parts: gzip.compress(b"".join(parts)),
        lambda parts: b"".join(gzip.compress(p) for p in parts),  # cat a.tar.gz b.tar.gz
        lambda parts: bz2.compress(b"".join(parts)),
        lambda parts: b"".join(lzma.compress(p) for p in parts),
    ],
    ids=["gz", "gz-members", "bz2", "xz-streams"],
)
def test_compressed_concatenated_tars_read_to_the_end(tmp_path: Path, compress) -> None:
    tar = tmp_path / "cat.tar.z"
    tar.write_bytes(compress([_part(0), _part(1)]))
    assert _rows(tar) == [("p0s0", None), ("p0s1", None), ("p1s0", None), ("p1s1", None)]


def test_keys_repeated_in_a_later_part_are_duplicates(tmp_path: Path) -> None:
    tar = tf.concatenate_tars(tmp_path / "dup.tar", [_part(0), _part(0, n=1), _part(1, n=1)])
    assert _rows(tar) == [("p0s0", None), ("p0s1", None), ("p0s0", "duplicate_key"), ("p1s0", None)]


def test_garbage_after_the_end_of_archive_is_a_read_error_with_offsets(tmp_path: Path) -> None:
    first = _part(0)
    tar = tf.concatenate_tars(tmp_path / "g.tar", [first], tail=b"\x00" * 1024 + b"not a tar header " * 40)
    rows = list(iter_raw_samples(tar))
    assert [r.key for r in rows] == ["p0s0", "p0s1"]
    failure = rows[-1].failure
    assert failure.reason == Reason.TAR_READ_ERROR
    assert f"bytes at {len(first) + 1024}" in failure.detail and "680 bytes were not read" in failure.detail


def test_garbage_inside_a_gzip_tar_after_the_end_is_a_read_error(tmp_path: Path) -> None:
    tar = tmp_path / "g.tar.gz"
    tar.write_bytes(gzip.compress(_part(0) + b"garbage!" * 200))
    rows = list(iter_raw_samples(tar))
    assert [r.key for r in rows] == ["p0s0", "p0s1"]
    assert (
        rows[-1].failure.reason == Reason.TAR_READ_ERROR
        and "1600 bytes were not read" in rows[-1].failure.detail
    )


def test_cut_inside_a_later_part_marks_the_sample_that_was_cut(tmp_path: Path) -> None:
    first, second = _part(0), _part(1)
    cut = first + second[: second.index(b"p1s1.jpg") + 512 + 100]
    tar = tmp_path / "cut.tar"
    tar.write_bytes(cut)
    assert _rows(tar) == [("p0s0", None), ("p0s1", None), ("p1s0", None), ("p1s1", "tar_truncated")]
    gz = tmp_path / "cut.tar.gz"
    gz.write_bytes(gzip.compress(cut))
    assert _rows(gz)[:3] == [("p0s0", None), ("p0s1", None), ("p1s0", None)]
    assert _rows(gz)[-1] == ("p1s1", "tar_truncated")


def test_half_a_header_after_the_end_of_archive_is_truncation(tmp_path: Path) -> None:
    tar = tf.concatenate_tars(tmp_path / "h.tar", [_part(0), _part(1)[:200]])
    assert _rows(tar)[-1] == ("p0s1", "tar_truncated")


def test_corrupt_xz_stream_never_raises(tmp_path: Path) -> None:
    members = [m for i in range(20) for m in tf.caption_members(f"{i:04d}", image=tf.noise_png(seed=i))]
    data = bytearray(lzma.compress(tf.tar_bytes(members)))
    data[len(data) // 2 : len(data) // 2 + 50] = b"\xff" * 50
    tar = tmp_path / "bad.tar.xz"
    tar.write_bytes(bytes(data))
    assert list_tar_samples(tar).error is not None
    rows = list(iter_raw_samples(tar))
    assert rows[-1].failure.reason == Reason.TAR_READ_ERROR and "LZMAError" in rows[-1].failure.detail
    assert all(r.failure is None for r in rows[:-1]) and len(rows) >= 2


# ------------------------------------------------------------------------------------------- listing vs reader


def _random_sample(rng: random.Random, index: int, keys: list[str]) -> list[tf.Member]:
    kind = rng.choice(
        ["caption", "caption", "again", "non_utf8", "unsafe", "unsafe_bare", "meta", "noext", "dir"]
    )
    if kind == "again" and keys:
        return tf.caption_members(rng.choice(keys), image=tf.png_bytes((4, 4)), image_ext="png")
    if kind == "non_utf8":
        return tf.caption_members(tf.non_utf8_name(b"k\xff%d" % index))
    if kind == "unsafe":
        return [(f"../up{index}.jpg", b"x")]
    if kind == "unsafe_bare":
        return [(f"/abs/bare{index}", b"x")]
    if kind == "meta":
        return [(f"__meta{index}__", b"m"), (f"s/__x__/k{index}.txt", b"t")]
    if kind == "noext":
        return [(f"noext{index}", b"x")]
    keys.append(f"k{index:04d}")
    return tf.caption_members(keys[-1], image=tf.png_bytes((4, 4)), image_ext="png")


def _random_tar(rng: random.Random, path: Path) -> bool:
    """A random tar of 1-3 parts; returns whether it was cut."""
    keys: list[str] = []
    parts = []
    for _ in range(rng.randint(1, 3)):
        members = [
            m for _ in range(rng.randint(0, 4)) for m in _random_sample(rng, rng.randrange(10_000), keys)
        ]
        parts.append(tf.tar_bytes(members, rng.choice([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])))
    tf.concatenate_tars(path, parts, padding_blocks=rng.choice([0, 0, 1, 7]))
    cut = rng.random() < 0.35
    if cut:
        tf.truncate_file(path, rng.randrange(path.stat().st_size))
    if rng.random() < 0.25:
        path.write_bytes(gzip.compress(path.read_bytes()))
    return cut


def test_listing_and_reader_agree_on_random_tars(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    for case in range(120):
        path = tmp_path / f"r{case}.tar"
        cut = _random_tar(rng, path)
        rows = list(iter_raw_samples(path))
        reader_keys = {r.key for r in rows if not r.key.endswith(SYNTHETIC)}
        listing = list_tar_samples(path)
        for key in reader_keys:
            key.encode("utf-8")
        if cut:
            assert listing.keys <= reader_keys, case
        else:
            assert listing.error is None and listing.keys == reader_keys, case
            assert not [r for r in rows if r.failure and r.failure.reason.value.startswith("tar_")], case


# ------------------------------------------------------------------------------------------- escaped text


def test_lone_surrogates_in_uid_url_and_caption_are_escaped_and_flagged(tmp_path: Path) -> None:
    meta = b'{"uid": "u\\ud800", "url": "https://x/\\udfff", "caption": "cap\\ud83d", "key": "k"}'
    sample = _caption_from(tmp_path, tf.caption_members("k", text=None, meta=meta))
    assert isinstance(sample, CaptionSample)
    assert (sample.uid, sample.url, sample.text) == ("u\\ud800", "https://x/\\udfff", "cap\\ud83d")
    assert sample.flags == ["text_escaped", "uid_escaped", "url_escaped"]


def test_failures_carry_escaped_ids_and_flags(tmp_path: Path) -> None:
    meta = b'{"uid": "u\\ud800", "url": "https://x/\\udfff"}'
    failure = _caption_from(tmp_path, tf.caption_members("k", image=tf.corrupt_jpeg(), meta=meta))
    assert isinstance(failure, SampleFailure) and failure.reason == Reason.IMAGE_DECODE_ERROR
    assert failure.extra == {"uid": "u\\ud800", "url": "https://x/\\udfff"}
    assert failure.to_result().flags == ["uid_escaped", "url_escaped"]


def test_other_json_fields_are_escaped_in_meta(tmp_path: Path) -> None:
    meta = b'{"uid": "u", "exif": {"Make": ["\\udc80"]}, "\\ud800name": 1, "caption": "ok"}'
    sample = _caption_from(tmp_path, tf.caption_members("k", meta=meta))
    assert isinstance(sample, CaptionSample) and sample.flags == ["field_escaped"]
    assert sample.meta["exif"] == {"Make": ["\\x80"]} and sample.meta["\\ud800name"] == 1
    json.dumps(sample.meta, ensure_ascii=False).encode("utf-8")


def test_cesu_surrogate_bytes_in_json_are_escaped(tmp_path: Path) -> None:
    sample = _caption_from(tmp_path, tf.caption_members("k", meta=b'{"uid": "a\xed\xa0\x80"}'))
    assert isinstance(sample, CaptionSample) and sample.uid == "a\\ud800" and sample.flags == ["uid_escaped"]


def test_document_texts_and_fields_are_escaped_and_flagged(tmp_path: Path) -> None:
    doc = b'{"texts": ["intro \\ud800", null], "image_info": [null, null], "url": "u\\udfff", "x": "\\ud801"}'
    sample = _document_from(tmp_path, doc, [("d.1.png", tf.png_bytes((8, 8)))])
    assert isinstance(sample, DocumentSample)
    assert sample.texts == ["intro \\ud800", None] and sample.meta == {"url": "u\\udfff", "x": "\\ud801"}
    assert sample.flags == ["field_escaped", "text_escaped", "url_escaped"]
    _storable(sample.texts[0], sample.meta["url"], sample.meta["x"])


def test_document_failures_carry_escaped_ids_and_flags(tmp_path: Path) -> None:
    failure = _document_from(tmp_path, b'{"texts": "not a list", "uid": "d\\ud800"}')
    assert isinstance(failure, SampleFailure) and failure.reason == Reason.INVALID_FIELDS
    assert failure.extra == {"uid": "d\\ud800"} and failure.to_result().flags == ["uid_escaped"]
    skipped = _document_from(tmp_path, {"texts": ["t"] + [None] * 20, "url": "x\ud800"})
    assert skipped.reason == Reason.TOO_MANY_IMAGES and skipped.extra == {"url": "x\\ud800"}


# ------------------------------------------------------------------------------------------- blank text


@pytest.mark.parametrize(
    "text", [b"\x00\x00\x00", b"\x01\x02\x1f\x7f", "\u200b\ufeff\u00a0".encode(), b"\t\x00 \n"]
)
def test_control_character_captions_are_missing_text(tmp_path: Path, text: bytes) -> None:
    from_txt = _caption_from(tmp_path, tf.caption_members("k", text=text, meta={"uid": "u"}))
    assert isinstance(from_txt, SampleFailure) and from_txt.reason == Reason.MISSING_TEXT
    meta = {"uid": "u", "caption": text.decode()}
    from_json = _caption_from(tmp_path, tf.caption_members("k", text=None, meta=meta))
    assert isinstance(from_json, SampleFailure) and from_json.reason == Reason.MISSING_TEXT
    fallback = _caption_from(tmp_path, tf.caption_members("k", text=text, meta={"caption": "a real caption"}))
    assert isinstance(fallback, CaptionSample) and fallback.text == "a real caption"


def test_blank_document_slots_count_as_no_text(tmp_path: Path) -> None:
    blank = _document_from(tmp_path, {"texts": ["\x00\x00", "\u200b", "\x01"]})
    assert isinstance(blank, SampleFailure) and blank.reason == Reason.EMPTY_DOCUMENT
    info = [None, {"image_base64": ""}]
    only_bad_image = _document_from(tmp_path, {"texts": ["\x00", None], "image_info": info})
    assert (
        isinstance(only_bad_image, SampleFailure) and only_bad_image.reason == Reason.IMAGE_SLOT_WITHOUT_DATA
    )


# ------------------------------------------------------------------------------------------- hostile json


def _nested(depth: int) -> bytes:
    return b'{"uid": "u", "deep": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        (
            _nested(MAX_JSON_DEPTH + 10),
            Reason.JSON_DECODE_ERROR,
        ),  # parses, but would break recursive consumers
        (_nested(200_000), Reason.JSON_DECODE_ERROR),  # RecursionError inside json
        (b'{"uid": 1e400}', Reason.INVALID_FIELDS),
        (b'{"uid": NaN}', Reason.INVALID_FIELDS),
        (b'{"uid": -Infinity}', Reason.INVALID_FIELDS),
        (b'{"uid": ' + b"9" * 5000 + b"}", Reason.JSON_DECODE_ERROR),  # int-string conversion limit
        (b'{"width": ' + b"1" * 5000 + b"}", Reason.JSON_DECODE_ERROR),
        (b"[1, 2]", Reason.INVALID_FIELDS),
        (b'"just a string"', Reason.INVALID_FIELDS),
        (b"\xff\xfe{", Reason.JSON_DECODE_ERROR),
    ],
)
def test_hostile_caption_json_is_a_reason_never_an_exception(
    tmp_path: Path, meta: bytes, reason: Reason
) -> None:
    result = _caption_from(tmp_path, tf.caption_members("k", meta=meta))
    assert isinstance(result, SampleFailure) and result.reason == reason


@pytest.mark.parametrize(
    "meta",
    [
        b'{"uid": 123456789012345678901234567890, "key": 99999999999999999999999}',
        b'{"uid": "u", "width": NaN, "height": Infinity, "extra": -1e400}',
        b'{"uid": "u", "": 1, "1": {"2": null}}',
        _nested(MAX_JSON_DEPTH - 2),
    ],
)
def test_odd_but_valid_caption_json_decodes(tmp_path: Path, meta: bytes) -> None:
    sample = _caption_from(tmp_path, tf.caption_members("k", meta=meta))
    assert isinstance(sample, CaptionSample), sample
    assert sample.uid in ("u", "123456789012345678901234567890")


def test_hostile_document_json_is_a_reason(tmp_path: Path) -> None:
    deep = b'{"texts": ["t"], "meta": ' + b"{" * 1 + b'"a": ' + b"[" * 100 + b"]" * 100 + b"}}"
    assert _document_from(tmp_path, deep).reason == Reason.JSON_DECODE_ERROR
    assert _document_from(tmp_path, b'{"texts": [' + b"7" * 5000 + b"]}").reason == Reason.JSON_DECODE_ERROR


def test_image_member_index_too_long_for_int_is_ignored(tmp_path: Path) -> None:
    doc = {"texts": ["text", None]}
    members = [(f"d.{'9' * 5000}.png", tf.png_bytes()), ("d.1.png", tf.png_bytes((8, 8)))]
    sample = _document_from(tmp_path, doc, members)
    assert isinstance(sample, DocumentSample) and sample.n_images == 1 and sample.dropped == []


# ------------------------------------------------------------------------------------------- thin images

_THIN_CHILD = """
import sys
sys.path.insert(0, {root!r})
from tests import tarfixtures as tf
from unifilter_core.data import decode_image
def peak_kb():
    # VmHWM belongs to this address space; ru_maxrss survives execve and would report the forking pytest's peak
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
data = tf.png_bytes(({w}, {h}))
before = peak_kb()
image = decode_image(data)
after = peak_kb()
print(image.size, after - before)
"""


@pytest.mark.parametrize("size", [(1, 60_000), (2, 40_000), (60_000, 1)])
def test_thin_images_decode_without_a_large_allocation(size: tuple[int, int]) -> None:
    root = str(Path(__file__).resolve().parents[1])
    code = _THIN_CHILD.format(root=root, w=size[0], h=size[1])
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    shape, grown_kib = out.stdout.split(")")
    assert shape.strip("( ") == f"{size[0]}, {size[1]}"
    assert int(grown_kib) < 20 * 1024, f"decoding {size} grew the peak RSS by {grown_kib} KiB"


@pytest.mark.parametrize("size", [(1, 60_000), (2, 40_000)])
def test_thin_images_pass_through_the_caption_reader(tmp_path: Path, size: tuple[int, int]) -> None:
    sample = _caption_from(tmp_path, tf.caption_members("k", image=tf.png_bytes(size), image_ext="png"))
    assert isinstance(sample, CaptionSample) and sample.image.size == size
    assert isinstance(decode_image(tf.png_bytes(size)), type(sample.image))
