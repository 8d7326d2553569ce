"""Bounded cost per image: thin images are refused before padding allocates ``max(w, h)^2`` pixels."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from tests.tarfixtures import png_bytes
from unifilter_core.data.limits import DEFAULT_MAX_PIXELS
from unifilter_core.processing import PreparedSample, ProcessingConfig, UniFilterProcessor, pixel_cost
from unifilter_core.records import Reason, SampleFailure


def _proc(tokenizer, **kw) -> UniFilterProcessor:
    base = {"image_size": 32, "num_image_tokens": 4, "max_length": 256}
    return UniFilterProcessor(tokenizer, ProcessingConfig(**{**base, **kw}))


def test_pixel_cost_counts_the_padded_square() -> None:
    assert pixel_cost(2, 40_000, "pad") == 1_600_000_000
    assert pixel_cost(2, 40_000, "resize") == 80_000
    assert ProcessingConfig().max_pixels == DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_pixels_raise(bad) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        ProcessingConfig(max_pixels=bad)


def test_thin_caption_image_is_too_large_in_pad_mode_only(tiny_tokenizer, make_image) -> None:
    thin = make_image(2, 600)
    padded = _proc(tiny_tokenizer, max_pixels=1000).prepare_caption(thin, "a cube")
    assert isinstance(padded, SampleFailure) and padded.reason is Reason.IMAGE_TOO_LARGE
    assert "2x600" in padded.detail and "360000" in padded.detail and "max_pixels=1000" in padded.detail
    assert padded.status.value == "skipped" and padded.n_images == 1
    stretched = _proc(tiny_tokenizer, max_pixels=1200, image_aspect_ratio="resize").prepare_caption(thin, "a")
    assert isinstance(stretched, PreparedSample)
    over = _proc(tiny_tokenizer, max_pixels=1199, image_aspect_ratio="resize").prepare_caption(thin, "a")
    assert isinstance(over, SampleFailure) and over.reason is Reason.IMAGE_TOO_LARGE
    unlimited = _proc(tiny_tokenizer, max_pixels=None).prepare_caption(thin, "a cube")
    assert isinstance(unlimited, PreparedSample)


def test_thin_document_image_is_dropped_with_a_note(tiny_tokenizer, make_image) -> None:
    proc = _proc(tiny_tokenizer, max_pixels=1000)
    out = proc.prepare_document(["intro", None, None], [None, make_image(2, 600), make_image(20, 20)])
    assert isinstance(out, PreparedSample) and out.n_images == 1
    assert "slot 1: image dropped (image_too_large" in out.detail
    with pytest.raises(ValueError, match="max_pixels=1000"):
        proc.preprocess_image(make_image(2, 600))


def test_caption_image_at_the_default_limit(tiny_tokenizer) -> None:
    image = Image.frombytes("RGB", (2, 40_000), bytes(2 * 40_000 * 3))  # header-sized cost only
    out = _proc(tiny_tokenizer).prepare_caption(image, "x")
    assert isinstance(out, SampleFailure) and out.reason is Reason.IMAGE_TOO_LARGE


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from unifilter_core import load_scorer

    def peak_kb():
        # VmHWM belongs to this address space; ru_maxrss survives execve (it would be the forking pytest's peak)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    scorer = load_scorer(sys.argv[1])
    data = open(sys.argv[2], "rb").read()
    before = peak_kb()
    start = time.perf_counter()
    rows = scorer.score_captions([(data, "a thin image")] * 4)
    print(json.dumps({
        "reasons": [r.reason for r in rows],
        "before_kb": before,
        "peak_kb": peak_kb(),
        "seconds": time.perf_counter() - start,
    }))
    """
)


def test_thin_pngs_score_with_bounded_memory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A 2x40000 PNG (a few hundred bytes) once cost 6.67 GB while being padded; now a few MB."""
    data = png_bytes((2, 40_000))
    assert len(data) < 2000
    (tmp_path / "thin.png").write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tiny_checkpoint), str(tmp_path / "thin.png")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["reasons"] == ["image_too_large"] * 4
    assert report["peak_kb"] - report["before_kb"] < 100 * 1024, report  # scoring itself adds < 100 MB
    assert report["seconds"] < 5, report
