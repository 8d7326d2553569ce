"""Readers of unifilter_core.data: raw streaming, truncation, caption and document decoding, image limits."""

from __future__ import annotations

import inspect
import io
import pickle
import tarfile
import warnings
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from tests import tarfixtures as tf
from unifilter_core.data import (
    CaptionSample,
    DocumentSample,
    RawSample,
    ReaderLimits,
    decode_caption,
    decode_document,
    decode_image,
    decode_sample,
    is_unsafe_member_name,
    iter_raw_samples,
    iter_samples,
    tar_fingerprint,
    tar_stat,
)
from unifilter_core.data import interleaved as interleaved_mod
from unifilter_core.records import Reason, SampleFailure, Status


def _outcomes(tar: Path, kind: str, limits: ReaderLimits | None = None) -> list[tuple[str, Reason | None]]:
    rows = []
    for key, sample in iter_samples(str(tar), kind, limits=limits):
        rows.append((key, sample.reason if isinstance(sample, SampleFailure) else None))
    return rows


# ------------------------------------------------------------------------------------------- hostile tars


def test_hostile_caption_tar_gives_one_expected_row_per_sample(tmp_path: Path) -> None:
    expected = tf.write_hostile_caption_tar(tmp_path / "c.tar")
    assert _outcomes(tmp_path / "c.tar", "caption") == expected


@pytest.mark.parametrize("style", ["base64", "members"])
def test_hostile_interleaved_tar_gives_one_expected_row_per_sample(tmp_path: Path, style: str) -> None:
    expected = tf.write_hostile_interleaved_tar(tmp_path / "i.tar", style)
    assert _outcomes(tmp_path / "i.tar", "interleaved") == expected


def test_counts_reconcile_with_member_groups(tmp_path: Path) -> None:
    members, expected = tf.hostile_caption_members()
    tf.write_tar(tmp_path / "c.tar", members)
    rows = list(iter_raw_samples(tmp_path / "c.tar"))
    assert len(rows) == len(expected)
    # every member name of the tar lands in exactly one row
    assert sorted(n for r in rows for n in r.member_names) == sorted(n for n, _ in members)


def test_status_of_limits_is_skipped_and_of_damage_is_error(tmp_path: Path) -> None:
    bomb = decode_image(tf.bomb_png())
    broken = decode_image(tf.corrupt_jpeg())
    assert isinstance(bomb, SampleFailure) and bomb.status == Status.SKIPPED
    assert isinstance(broken, SampleFailure) and broken.status == Status.ERROR


# ------------------------------------------------------------------------------------------- raw streaming


def test_grouping_matches_stock_webdataset(tmp_path: Path) -> None:
    members = tf.caption_members("a/000001") + tf.document_members("a/000002", ["x", None], style="members")
    members += [("a/000003.JPG", tf.jpeg_bytes()), ("a/000003.txt", b"t")]
    tar = tf.write_tar(tmp_path / "g.tar", members)
    ours = {r.key: sorted(r.members) for r in iter_raw_samples(tar)}
    stock = {
        s["__key__"]: sorted(k for k in s if not k.startswith("__"))
        for s in wds.WebDataset(str(tar), shardshuffle=False)
    }
    assert ours == stock
    assert ours["a/000002"] == ["1.png", "json"]


def test_reader_is_a_lazy_generator(tmp_path: Path) -> None:
    tar = tf.write_caption_tar(tmp_path / "c.tar", 3)
    rows = iter_raw_samples(tar)
    assert inspect.isgenerator(rows)
    tar.unlink()  # the file is opened on the first next(), not before
    assert next(rows).failure.reason == Reason.TAR_READ_ERROR


def test_memory_does_not_grow_with_tar_size(tmp_path: Path) -> None:
    import tracemalloc

    def peak(n: int) -> int:
        members = [(f"{i:06d}.{ext}", bytes([i % 251]) * 20_000) for i in range(n) for ext in ("jpg", "txt")]
        tar = tf.write_tar(tmp_path / f"m{n}.tar", members)
        tracemalloc.start()
        count = sum(1 for _ in iter_raw_samples(tar))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == n
        return top

    small, large = peak(20), peak(400)  # 0.8 MB vs 16 MB of member data
    assert large < small + 1_000_000, (small, large)


def test_directories_links_and_meta_members_are_not_samples(tmp_path: Path) -> None:
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w") as tar:
        d = tarfile.TarInfo("somedir.x")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("000001.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        for name, data in [("__meta__", b"m"), ("000001.txt", b"caption")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = list(iter_raw_samples(path))
    assert [(r.key, list(r.members)) for r in rows] == [("000001", ["txt"])]
    assert decode_caption(rows[0]).reason == Reason.MISSING_IMAGE


def test_oversized_member_is_never_read(tmp_path: Path) -> None:
    tar = tf.write_tar(tmp_path / "big.tar", tf.caption_members("k", image=tf.jpeg_bytes((256, 256))))
    limits = ReaderLimits(max_member_bytes=200)
    (raw,) = list(iter_raw_samples(tar, limits=limits))
    assert raw.failure.reason == Reason.IMAGE_TOO_LARGE and raw.members == {}
    assert len(raw.member_names) == 3


def test_raw_and_decoded_samples_pickle(tmp_path: Path) -> None:
    tar = tf.write_caption_tar(tmp_path / "c.tar", 1)
    (raw,) = list(iter_raw_samples(tar))
    again = pickle.loads(pickle.dumps(raw))
    assert again == raw
    sample = decode_caption(again)
    assert isinstance(sample, CaptionSample)
    assert pickle.loads(pickle.dumps(sample)).image.tobytes() == sample.image.tobytes()


# ------------------------------------------------------------------------------------------- broken tars


def _keys(tar: Path) -> list[str]:
    return [r.key for r in iter_raw_samples(tar)]


def test_every_cut_of_a_tar_ends_with_exactly_one_truncation_row(tmp_path: Path) -> None:
    src = tf.write_caption_tar(tmp_path / "full.tar", 3)
    full_keys = _keys(src)
    data = src.read_bytes()
    end = data.rstrip(b"\x00")
    for cut in range(0, len(end), 97):
        path = tmp_path / "cut.tar"
        path.write_bytes(data[:cut])
        rows = list(iter_raw_samples(path))
        failures = [r.failure.reason for r in rows if r.failure is not None]
        assert len(failures) == 1, (cut, rows)
        assert rows[-1].failure is not None
        assert failures[0] in (Reason.TAR_TRUNCATED, Reason.TAR_READ_ERROR)
        keys = [r.key for r in rows if not r.key.endswith(("#truncated", "#read_error"))]
        assert keys == full_keys[: len(keys)]


def test_cut_inside_member_marks_that_sample(tmp_path: Path) -> None:
    src = tf.write_caption_tar(tmp_path / "c.tar", 3)
    data = src.read_bytes()
    second = data.index(b"000000001.jpg")  # header of the second sample's image
    src.write_bytes(data[: second + 512 + 100])  # header + 100 bytes of the JPEG
    rows = list(iter_raw_samples(src))
    assert [(r.key, r.failure and r.failure.reason) for r in rows] == [
        ("000000000", None),
        ("000000001", Reason.TAR_TRUNCATED),
    ]


def test_cut_between_samples_blames_last_sample(tmp_path: Path) -> None:
    src = tf.write_caption_tar(tmp_path / "c.tar", 2)
    data = src.read_bytes()
    src.write_bytes(data[: data.index(b"000000001.jpg")])  # stops right before the second sample's header
    rows = list(iter_raw_samples(src))
    assert [(r.key, r.failure and r.failure.reason) for r in rows] == [("000000000", Reason.TAR_TRUNCATED)]


def test_synthetic_row_when_no_sample_can_carry_the_truncation(tmp_path: Path) -> None:
    src = tf.write_tar(tmp_path / "c.tar", [("x.jpg", b"1"), ("y.jpg", b"2"), ("x.txt", b"dup")])
    data = src.read_bytes()
    src.write_bytes(data[: data.rstrip(b"\x00").rindex(b"dup") + 3])  # x.txt (a duplicate key row) is intact
    rows = list(iter_raw_samples(src))
    assert [(r.key, r.failure and r.failure.reason) for r in rows] == [
        ("x", None),
        ("y", None),
        ("x", Reason.DUPLICATE_KEY),
        ("c.tar#truncated", Reason.TAR_TRUNCATED),
    ]


def test_corrupt_header_mid_archive_is_not_silently_the_end(tmp_path: Path) -> None:
    src = tf.write_caption_tar(tmp_path / "c.tar", 3)
    data = bytearray(src.read_bytes())
    header = data.index(b"000000002.jpg")
    data[header + 148 : header + 156] = b"garbage!"  # checksum field
    src.write_bytes(bytes(data))
    rows = list(iter_raw_samples(src))
    assert [r.key for r in rows] == ["000000000", "000000001"]
    assert rows[-1].failure.reason == Reason.TAR_READ_ERROR
    assert "not read" in rows[-1].failure.detail


@pytest.mark.parametrize("content", [b"", b"this is not a tar file at all" * 40, b"\x1f\x8b\x08garbage"])
def test_unreadable_tar_is_one_read_error_row(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    rows = list(iter_raw_samples(path))
    assert [(r.key, r.failure.reason) for r in rows] == [("bad.tar#read_error", Reason.TAR_READ_ERROR)]


def test_missing_tar_and_empty_tar(tmp_path: Path) -> None:
    (row,) = list(iter_raw_samples(tmp_path / "nope.tar"))
    assert row.failure.reason == Reason.TAR_READ_ERROR
    assert list(iter_raw_samples(tf.write_tar(tmp_path / "empty.tar", []))) == []


@pytest.mark.parametrize(
    ("name", "unsafe"),
    [
        ("../../x.jpg", True),
        ("/etc/x.txt", True),
        ("a/../b.jpg", True),
        ("..\\x.jpg", True),
        ("C:x.jpg", True),
    ]
    + [("a/b.jpg", False), ("a..b.jpg", False), ("./a.jpg", False)],
)
def test_unsafe_member_names(name: str, unsafe: bool) -> None:
    assert is_unsafe_member_name(name) is unsafe


# ------------------------------------------------------------------------------------------- captions


def _caption(tmp_path: Path, limits: ReaderLimits | None = None, **kw) -> CaptionSample | SampleFailure:
    tar = tf.write_tar(tmp_path / "one.tar", tf.caption_members("k", **kw))
    (raw,) = list(iter_raw_samples(tar, limits=limits))
    return decode_caption(raw, limits)


def test_caption_sample_fields(tmp_path: Path) -> None:
    sample = _caption(tmp_path, text="a cat")
    assert isinstance(sample, CaptionSample)
    assert (sample.text, sample.uid, sample.url, sample.image.mode) == (
        "a cat",
        "uidk",
        "https://example.com/k.jpg",
        "RGB",
    )
    assert sample.image.size == (32, 24) and not sample.text_truncated


def test_json_caption_is_used_when_txt_is_missing(tmp_path: Path) -> None:
    sample = _caption(tmp_path, text=None, meta={"caption": "from json", "uid": 7})
    assert isinstance(sample, CaptionSample) and sample.text == "from json" and sample.uid == "7"


def test_failures_keep_uid_and_url(tmp_path: Path) -> None:
    failure = _caption(tmp_path, image=tf.corrupt_jpeg())
    assert failure.reason == Reason.IMAGE_DECODE_ERROR
    assert failure.extra == {"uid": "uidk", "url": "https://example.com/k.jpg"}


def test_long_caption_is_cut_and_flagged(tmp_path: Path) -> None:
    sample = _caption(tmp_path, ReaderLimits(max_text_chars=50), text="x" * 1_000_000)
    assert isinstance(sample, CaptionSample) and sample.text_truncated and sample.text == "x" * 50


@pytest.mark.parametrize("meta", [{"caption": 5}, {"uid": ["a"]}, {"width": "32"}, {"url": True}, b"[1, 2]"])
def test_wrong_json_types_are_invalid_fields(tmp_path: Path, meta) -> None:
    assert _caption(tmp_path, meta=meta).reason == Reason.INVALID_FIELDS


def test_non_utf8_json_is_a_json_error(tmp_path: Path) -> None:
    assert _caption(tmp_path, meta=b'{"caption": "\xe9t\xe9"}').reason == Reason.JSON_DECODE_ERROR


# ------------------------------------------------------------------------------------------- images


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    limits = ReaderLimits(max_pixels=1000)
    failure = decode_image(tf.jpeg_bytes((64, 48)), limits)
    assert failure.reason == Reason.IMAGE_TOO_LARGE and failure.status == Status.SKIPPED
    assert isinstance(decode_image(tf.jpeg_bytes((20, 20)), limits), Image.Image)
    # between PIL's warning and error thresholds: our own check refuses it
    assert decode_image(tf.bomb_png(10_000, 10_000)).reason == Reason.IMAGE_TOO_LARGE


def test_uniform_large_jpeg_is_not_taken_for_a_lying_header() -> None:
    buf = io.BytesIO()
    Image.new("L", (2048, 2048), 128).save(buf, "JPEG", quality=1, optimize=True, progressive=True)
    img = decode_image(buf.getvalue())
    assert isinstance(img, Image.Image) and img.size == (2048, 2048)


def test_decompression_bomb_warning_as_error_becomes_too_large() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert decode_image(tf.bomb_png(10_000, 10_000)).reason == Reason.IMAGE_TOO_LARGE


@pytest.mark.parametrize(
    ("data", "alpha", "pixel"),
    [
        (tf.cmyk_jpeg(), "white", (0, 255, 255)),
        (tf.png_16bit(value=65535), "white", (255, 255, 255)),
        (tf.png_16bit(value=257 * 100), "white", (100, 100, 100)),
        (tf.palette_png(), "white", (255, 0, 0)),
        (tf.palette_png(transparent=True), "white", (255, 255, 255)),
        (tf.palette_png(transparent=True), "drop", (255, 0, 0)),
        (tf.rgba_png(), "white", (255, 255, 255)),
        (tf.rgba_png(), "drop", (0, 0, 0)),
        (tf.rgba_png(rgba=(0, 0, 255, 255)), "white", (0, 0, 255)),
        (tf.la_png(), "white", (255, 255, 255)),
        (tf.la_png(), "drop", (0, 0, 0)),
        (tf.animated_gif(), "white", (255, 0, 0)),
    ],
)
def test_modes_become_rgb(data: bytes, alpha: str, pixel: tuple[int, int, int]) -> None:
    img = decode_image(data, ReaderLimits(alpha=alpha))
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(img.getpixel((8, 8)), pixel, strict=True)), img.getpixel(
        (8, 8)
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.EMPTY_MEMBER),
        (b"\x00" * 100, Reason.IMAGE_DECODE_ERROR),
        (tf.corrupt_jpeg(), Reason.IMAGE_DECODE_ERROR),
        (tf.truncated_jpeg(), Reason.IMAGE_TRUNCATED),
        (tf.lying_header_jpeg(), Reason.IMAGE_TRUNCATED),
        (tf.truncated_png(), Reason.IMAGE_TRUNCATED),
        (tf.bomb_png(), Reason.IMAGE_TOO_LARGE),
    ],
)
def test_broken_images(data: bytes, reason: Reason) -> None:
    result = decode_image(data)
    assert isinstance(result, SampleFailure) and result.reason == reason, result


# ------------------------------------------------------------------------------------------- documents


def _document(
    tmp_path: Path, texts, images=None, *, style="base64", limits=None
) -> DocumentSample | SampleFailure:
    tar = tf.write_tar(tmp_path / "doc.tar", tf.document_members("d", texts, images, style=style))
    (raw,) = list(iter_raw_samples(tar))
    return decode_document(raw, limits)


@pytest.mark.parametrize("style", ["base64", "members"])
def test_document_slots_line_up(tmp_path: Path, style: str) -> None:
    doc = _document(tmp_path, ["a", None, "b", None], [tf.png_bytes((5, 6)), tf.corrupt_jpeg()], style=style)
    assert isinstance(doc, DocumentSample)
    assert doc.texts == ["a", None, "b", None]
    assert doc.images[0] is None and doc.images[1].size == (5, 6) and doc.images[3] is None
    assert doc.dropped == [(3, Reason.IMAGE_DECODE_ERROR)] and doc.n_images == 1


def test_too_many_images_is_decided_before_decoding(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(interleaved_mod, "decode_image", lambda *a: calls.append(1))
    failure = _document(tmp_path, [None] * 50, [tf.png_bytes()] * 50, limits=ReaderLimits(max_images=10))
    assert failure.reason == Reason.TOO_MANY_IMAGES and failure.n_images == 50 and calls == []
    monkeypatch.undo()
    assert isinstance(
        _document(tmp_path, [None] * 50, [tf.png_bytes((2, 2))] * 50, limits=ReaderLimits(max_images=None)),
        DocumentSample,
    )


def test_document_text_limit_skips(tmp_path: Path) -> None:
    failure = _document(tmp_path, ["x" * 600, None], limits=ReaderLimits(max_text_chars=500))
    assert failure.reason == Reason.TOO_MANY_TOKENS and failure.status == Status.SKIPPED


def test_data_uri_and_orphan_members(tmp_path: Path) -> None:
    import base64
    import json

    doc = {
        "texts": ["t", None],
        "image_info": [
            None,
            {"image_base64": "data:image/png;base64," + base64.b64encode(tf.png_bytes()).decode()},
        ],
    }
    members = [
        ("d.json", json.dumps(doc).encode()),
        ("d.0.png", tf.png_bytes()),
        ("d.7.jpg", tf.jpeg_bytes()),
    ]
    (raw,) = list(iter_raw_samples(tf.write_tar(tmp_path / "o.tar", members)))
    sample = decode_document(raw)
    assert sample.n_images == 1
    assert sample.dropped == [(0, Reason.IMAGE_COUNT_MISMATCH), (7, Reason.IMAGE_COUNT_MISMATCH)]


def test_bad_base64_drops_the_slot(tmp_path: Path) -> None:
    import json

    doc = {"texts": ["t", None], "image_info": [None, {"image_base64": "abc"}]}
    (raw,) = list(iter_raw_samples(tf.write_tar(tmp_path / "b.tar", [("d.json", json.dumps(doc).encode())])))
    assert decode_document(raw).dropped == [(1, Reason.IMAGE_DECODE_ERROR)]


# ------------------------------------------------------------------------------------------- misc API


def test_reader_limits_validate() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        ReaderLimits(max_pixels=0)
    with pytest.raises(ValueError, match="max_images"):
        ReaderLimits(max_images=-1)
    with pytest.raises(ValueError, match="alpha"):
        ReaderLimits(alpha="black")
    with pytest.raises(ValueError, match="kind"):
        decode_sample(RawSample(key="k"), "video")


def test_fingerprint_and_stat(tmp_path: Path) -> None:
    a = tf.write_caption_tar(tmp_path / "a.tar", 2)
    b = tmp_path / "b.tar"
    b.write_bytes(a.read_bytes())
    assert tar_fingerprint(a) == tar_fingerprint(b) and len(tar_fingerprint(a)) == 64
    data = bytearray(b.read_bytes())
    data[600] ^= 1
    b.write_bytes(bytes(data))
    assert tar_fingerprint(a) != tar_fingerprint(b)
    assert tar_stat(a).size == a.stat().st_size and tar_stat(a).mtime_ns == a.stat().st_mtime_ns
    with pytest.raises(ValueError, match="not a file"):
        tar_fingerprint(tmp_path)
