"""Input formatting and image preprocessing (reference-model.md "Input format", with its bugs fixed)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from unifilter_core.processing import (
    IMAGE_TOKEN_INDEX as IMG,
)
from unifilter_core.processing import (
    PreparedSample,
    ProcessingConfig,
    UniFilterProcessor,
)
from unifilter_core.records import Reason, SampleFailure, Status

NIT = 4  # image tokens per image in these tests


def _proc(tokenizer, **kw) -> UniFilterProcessor:
    base = {"image_size": 32, "num_image_tokens": NIT, "max_length": 256}
    return UniFilterProcessor(tokenizer, ProcessingConfig(**{**base, **kw}))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _expected_pixels(image: Image.Image, size: int, pad: bool) -> torch.Tensor:
    """Direct PIL computation: (pad to a grey square) -> bicubic -> /255 -> (x - .5) / .5, as [3, H, W]."""
    img = image.convert("RGB")
    if pad:
        w, h = img.size
        side = max(w, h)
        square = Image.new("RGB", (side, side), (127, 127, 127))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    arr = np.asarray(img.resize((size, size), Image.BICUBIC)).astype(np.float64) / 255.0
    return torch.tensor((arr - 0.5) / 0.5, dtype=torch.float32).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------ captions
def test_caption_ids(tiny_tokenizer, make_image) -> None:
    tok, proc = tiny_tokenizer, _proc(tiny_tokenizer)
    bos, eos = tok.bos_token_id, tok.eos_token_id

    def t(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    out = proc.prepare_caption(make_image(20, 30), "A red cube.")
    assert isinstance(out, PreparedSample)
    assert out.input_ids == [bos, IMG, *t("\nA red cube."), eos]
    assert out.n_images == 1 and out.pixel_values.shape == (1, 3, 32, 32)
    assert out.pixel_values.dtype == torch.float32
    assert out.n_tokens == len(out.input_ids) - 1 + NIT and not out.truncated
    # a literal <image> inside a caption becomes the word "image"
    out = proc.prepare_caption(make_image(8, 8), "see <image> here")
    assert out.input_ids == [bos, IMG, *t("\nsee image here"), eos]
    # empty caption, bytes image
    out = proc.prepare_caption(_png(make_image(8, 8)), "")
    assert out.input_ids == [bos, IMG, *t("\n"), eos]


def test_caption_limit_keeps_eos(tiny_tokenizer, make_image) -> None:
    tok = tiny_tokenizer
    text = " ".join(["red cube on a table"] * 40)
    full = [tok.bos_token_id, IMG, *tok("\n" + text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert len(full) > 75
    out = _proc(tok).prepare_caption(make_image(8, 8), text)
    assert len(out.input_ids) == 75 and out.truncated
    assert out.input_ids == full[:74] + [tok.eos_token_id]
    out = _proc(tok, caption_max_tokens=10).prepare_caption(make_image(8, 8), text)
    assert out.input_ids == full[:9] + [tok.eos_token_id]
    out = _proc(tok, caption_max_tokens=None).prepare_caption(make_image(8, 8), text)
    assert out.input_ids == full and not out.truncated
    # the spliced length must fit max_length as well (EOS kept)
    out = _proc(tok, caption_max_tokens=None, max_length=20).prepare_caption(make_image(8, 8), text)
    assert out.n_tokens == 20 and out.input_ids == full[: 20 - NIT] + [tok.eos_token_id] and out.truncated


def test_caption_failures(tiny_tokenizer, make_image) -> None:
    proc = _proc(tiny_tokenizer)
    bad = proc.prepare_caption(b"not an image", "text")
    assert isinstance(bad, SampleFailure) and bad.reason == Reason.IMAGE_DECODE_ERROR
    cut = proc.prepare_caption(_png(make_image(64, 64))[:200], "text")
    assert isinstance(cut, SampleFailure) and cut.reason in (
        Reason.IMAGE_TRUNCATED,
        Reason.IMAGE_DECODE_ERROR,
    )
    assert proc.prepare_caption(None, "text").reason == Reason.MISSING_IMAGE
    assert proc.prepare_caption(make_image(8, 8), None).reason == Reason.MISSING_TEXT


# ------------------------------------------------------------------------------------------------ documents
def test_document_ids(tiny_tokenizer, make_image) -> None:
    tok, proc = tiny_tokenizer, _proc(tiny_tokenizer)
    bos, eos = tok.bos_token_id, tok.eos_token_id

    def t(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    a, b = make_image(20, 10, seed=1), make_image(9, 9, seed=2)
    out = proc.prepare_document(
        ["Intro", None, "more <image> text", None, None], [None, a, None, _png(b), None]
    )
    assert isinstance(out, PreparedSample)
    # "Intro\n\n<image>\n\nmore <image-placeholder> text\n\n<image>" split on <image>, chunks tokenized apart
    assert out.input_ids == [bos, *t("Intro\n\n"), IMG, *t("\n\nmore <image-placeholder> text\n\n"), IMG, eos]
    assert out.n_images == 2 and out.pixel_values.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out.pixel_values[0], proc.preprocess_image(a), rtol=0, atol=0)
    torch.testing.assert_close(out.pixel_values[1], proc.preprocess_image(b), rtol=0, atol=0)
    assert out.n_tokens == len(out.input_ids) + 2 * (NIT - 1) and not out.truncated
    assert "slot 4" in out.detail  # the empty slot is reported
    # adjacent images, image first
    out = proc.prepare_document([None, None, "end"], [a, b, None])
    assert out.input_ids == [bos, IMG, *t("\n\n"), IMG, *t("\n\nend"), eos]
    # text-only documents are scored
    out = proc.prepare_document(["just text"], [None])
    assert out.input_ids == [bos, *t("just text"), eos] and out.pixel_values is None and out.n_images == 0


def test_document_drops_thin_and_broken_images(tiny_tokenizer, make_image) -> None:
    proc = _proc(tiny_tokenizer)
    texts = ["a", None, None, None, "b"]
    images = [None, make_image(1, 30), b"\x89PNG garbage", make_image(12, 12), None]
    out = proc.prepare_document(texts, images)
    assert isinstance(out, PreparedSample) and out.n_images == 1
    expected = proc.prepare_document(["a", None, "b"], [None, make_image(12, 12), None])
    assert out.input_ids == expected.input_ids and torch.equal(out.pixel_values, expected.pixel_values)
    assert (
        "slot 1: 1x30 image dropped" in out.detail
        and "slot 2: image dropped (image_decode_error" in out.detail
    )
    assert expected.detail is None
    # nothing left at all -> a row saying so
    empty = proc.prepare_document(["  ", None], [None, make_image(1, 1)])
    assert isinstance(empty, SampleFailure) and empty.reason == Reason.EMPTY_DOCUMENT
    assert proc.prepare_document([], []).reason == Reason.EMPTY_DOCUMENT


def test_document_limits_are_rows(tiny_tokenizer, make_image) -> None:
    texts, images = [None] * 11 + ["text"], [make_image(8, 8, seed=i) for i in range(11)] + [None]
    out = _proc(tiny_tokenizer).prepare_document(texts, images)
    assert isinstance(out, SampleFailure) and out.reason == Reason.TOO_MANY_IMAGES
    assert out.status == Status.SKIPPED and out.n_images == 11 and "11 images" in out.detail
    assert out.to_result().status == "skipped" and out.to_result().reason == "too_many_images"
    assert isinstance(_proc(tiny_tokenizer, max_images=None).prepare_document(texts, images), PreparedSample)
    assert isinstance(_proc(tiny_tokenizer, max_images=11).prepare_document(texts, images), PreparedSample)

    long_text = " ".join(["garden"] * 50)
    n_ids = 2 + len(tiny_tokenizer(long_text, add_special_tokens=False)["input_ids"])
    out = _proc(tiny_tokenizer, max_text_tokens=n_ids - 1).prepare_document([long_text], [None])
    assert (
        isinstance(out, SampleFailure)
        and out.reason == Reason.TOO_MANY_TOKENS
        and out.status == Status.SKIPPED
    )
    assert isinstance(
        _proc(tiny_tokenizer, max_text_tokens=n_ids).prepare_document([long_text], [None]), PreparedSample
    )
    assert isinstance(
        _proc(tiny_tokenizer, max_text_tokens=None).prepare_document([long_text], [None]), PreparedSample
    )


def test_document_truncation_keeps_eos_and_whole_images(tiny_tokenizer, make_image) -> None:
    tok = tiny_tokenizer
    texts, images = (
        ["one two three four five six", None, "tail words here", None],
        [
            None,
            make_image(8, 8, 1),
            None,
            make_image(8, 8, 2),
        ],
    )
    full = _proc(tok).prepare_document(texts, images)
    assert full.n_images == 2 and not full.truncated
    sep_at = full.input_ids.index(IMG)
    # room for BOS + the text before the image + 2 more ids + EOS: the image (4 tokens) does not fit -> dropped
    limit = 1 + sep_at - 1 + 2 + 1
    out = _proc(tok, max_length=max(limit, NIT + 2)).prepare_document(texts, images)
    assert out.truncated and out.input_ids[-1] == tok.eos_token_id and out.input_ids[0] == tok.bos_token_id
    assert out.n_tokens <= max(limit, NIT + 2)
    assert IMG not in out.input_ids and out.n_images == 0 and out.pixel_values is None
    assert out.input_ids[1:-1] == full.input_ids[1 : len(out.input_ids) - 1]
    # a limit that holds the first image but not the second keeps exactly one image, whole
    limit = full.n_tokens - 1
    out = _proc(tok, max_length=limit).prepare_document(texts, images)
    assert out.truncated and out.n_images == 1 and out.input_ids.count(IMG) == 1
    assert out.pixel_values.shape[0] == 1 and out.n_tokens <= limit and out.input_ids[-1] == tok.eos_token_id


def test_document_caller_errors(tiny_tokenizer, make_image) -> None:
    proc = _proc(tiny_tokenizer)
    with pytest.raises(ValueError, match="texts has 2 slots but images has 1"):
        proc.prepare_document(["a", None], [None])
    with pytest.raises(ValueError, match="slot 0 holds both"):
        proc.prepare_document(["a"], [make_image(4, 4)])


# ------------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("size", [(40, 20), (13, 31), (16, 16)])
def test_pad_and_resize_pixels_match_direct_pil(tiny_tokenizer, make_image, size) -> None:
    image = make_image(*size, seed=3)
    for mode, pad in (("pad", True), ("resize", False)):
        got = _proc(tiny_tokenizer, image_aspect_ratio=mode).preprocess_image(image)
        assert got.shape == (3, 32, 32) and got.dtype == torch.float32
        torch.testing.assert_close(got, _expected_pixels(image, 32, pad), rtol=0, atol=1e-6)
    if size[0] != size[1]:
        pad = _proc(tiny_tokenizer, image_aspect_ratio="pad").preprocess_image(image)
        stretch = _proc(tiny_tokenizer, image_aspect_ratio="resize").preprocess_image(image)
        assert not torch.allclose(pad, stretch)
        # 40x20 padded: the top rows are the grey (127/255 - .5)/.5 border
        if size == (40, 20):
            torch.testing.assert_close(
                pad[:, 0, :], torch.full((3, 32), (127 / 255 - 0.5) / 0.5), rtol=0, atol=1e-6
            )


def test_image_modes(tiny_tokenizer) -> None:
    proc = _proc(tiny_tokenizer, image_aspect_ratio="resize")
    white = torch.ones(3, 32, 32)
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black -> white background
    torch.testing.assert_close(proc.preprocess_image(rgba), white)
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([255, 0, 0] + [0] * 765)
    torch.testing.assert_close(proc.preprocess_image(pal)[0], torch.ones(32, 32))
    cmyk = Image.new("CMYK", (10, 10), (0, 0, 0, 0))
    torch.testing.assert_close(proc.preprocess_image(cmyk), white)
    deep = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))  # 16-bit grey: scaled, not clipped
    torch.testing.assert_close(proc.preprocess_image(deep), white)
    mid = Image.fromarray(np.full((10, 10), 32896, dtype=np.uint16))
    torch.testing.assert_close(proc.preprocess_image(mid), torch.full((3, 32, 32), (128 / 255 - 0.5) / 0.5))
    gray = Image.new("L", (10, 10), 0)
    torch.testing.assert_close(proc.preprocess_image(gray), -white)


# ------------------------------------------------------------------------------------------------ config / pickling
def test_processor_pickles(tiny_tokenizer, make_image) -> None:
    proc = _proc(tiny_tokenizer)
    clone = pickle.loads(pickle.dumps(proc))
    texts, images = ["hello", None], [None, make_image(10, 7)]
    a, b = proc.prepare_document(texts, images), clone.prepare_document(texts, images)
    assert a.input_ids == b.input_ids and torch.equal(a.pixel_values, b.pixel_values)
    assert pickle.loads(pickle.dumps(a)).input_ids == a.input_ids


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"image_aspect_ratio": "crop"}, "image_aspect_ratio"),
        ({"max_length": 5}, "max_length"),
        ({"caption_max_tokens": 2}, "caption_max_tokens"),
        ({"max_images": -1}, "max_images"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_bad_config_raises(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        ProcessingConfig(**{"image_size": 32, "num_image_tokens": NIT, "max_length": 256, **kw})


# ------------------------------------------------------------------------------------------------ bounded image cost
_THIN_CHILD = """
import io, json, sys, time
from PIL import Image
from unifilter_core.processing import ProcessingConfig, UniFilterProcessor
from unifilter_core.tokenization import load_tokenizer

tokenizer_dir, n_captions, unbounded = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "unbounded"

def png(size):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()

def peak_kb():
    # VmHWM belongs to this address space; ru_maxrss survives execve and would report the forking pytest's peak
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

thin, thinner, normal = png((2, 40_000)), png((1, 60_000)), png((20, 20))
extra = {"max_pixels": None} if unbounded else {}
proc = UniFilterProcessor(load_tokenizer(tokenizer_dir), ProcessingConfig(image_size=32, num_image_tokens=4,
                                                                          max_length=256, **extra))
before = peak_kb()
start = time.perf_counter()
captions = [proc.prepare_caption(thin, f"thin {i}") for i in range(n_captions)]
captions.append(proc.prepare_caption(thinner, "thinner"))
document = proc.prepare_document(["intro", None, None, None], [None, thin, thinner, normal])
print(json.dumps({
    "png_bytes": len(thin),
    "reasons": [getattr(getattr(c, "reason", None), "value", None) for c in captions],
    "document_images": getattr(document, "n_images", None),
    "document_detail": getattr(document, "detail", None),
    "before_kb": before,
    "peak_kb": peak_kb(),
    "seconds": time.perf_counter() - start,
}))
"""


def _run_thin_child(tokenizer_dir, n_captions: int, mode: str = "bounded") -> dict:
    """Run :data:`_THIN_CHILD`; ``mode="unbounded"`` sets ``max_pixels=None`` (the old, unbounded padding)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _THIN_CHILD, str(tokenizer_dir), str(n_captions), mode],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_thin_pngs_are_refused_before_padding_with_bounded_memory(tiny_tokenizer_dir) -> None:
    """Ten 2x40000 PNG captions (a few hundred bytes each; padding one to a square once took 6.67 GB and 25 s),
    a 1x60000 caption (once a ``MemoryError`` in a decode worker) and a document holding both: the captions are
    ``image_too_large``, the document keeps only its normal image, and the child's whole peak RSS stays < 1 GB."""
    report = _run_thin_child(tiny_tokenizer_dir, 10)
    assert report["png_bytes"] < 2000, report
    assert report["reasons"] == ["image_too_large"] * 11, report
    assert report["document_images"] == 1, report
    detail = report["document_detail"]
    assert "slot 1: image dropped (image_too_large: 2x40000" in detail, report
    assert "slot 2: 1x60000 image dropped" in detail, (
        report
    )  # 1-pixel images are dropped first, like the original
    assert report["peak_kb"] < 1024 * 1024, report  # the whole child: interpreter, torch, tokenizer
    assert report["peak_kb"] - report["before_kb"] < 50 * 1024, report  # preparing adds < 50 MB
    assert report["seconds"] < 5, report
