"""Shared pytest fixtures (names are stable: other test modules rely on them).

Session-scoped, built once per test run under pytest's temporary folder:

* ``tiny_corpus`` -> ``list[str]``: a deterministic English-ish corpus (captions, document text, digits, unicode).
* ``tiny_tokenizer_dir`` -> ``Path``: a byte-level BPE tokenizer trained on ``tiny_corpus`` (vocab_size 512) in
  the released slow-Qwen2 file layout; bos ``<|endoftext|>``, eos ``<|im_end|>``, pad ``[PAD]``.
* ``tiny_tokenizer``: that folder loaded with ``unifilter_core.tokenization.load_tokenizer``.
* ``tiny_checkpoint`` -> ``Path``: ``init_checkpoint("tiny", ...)`` (model_type ``llava_qwen``, Qwen2 body) with
  the tiny tokenizer copied in, seed 0, released layout.
* ``tiny_qwen3_checkpoint`` -> ``Path``: the same for preset ``"tiny-qwen3"`` (model_type ``llava_qwen3``).

Function-scoped helper:

* ``make_image`` -> ``Callable[[int, int, int], PIL.Image.Image]``: ``make_image(width, height, seed=0)`` gives a
  deterministic random RGB image.

The checkpoint fixtures are read-only by convention: copy the folder before changing anything in it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_WORDS_TEXT = (
    "a the photo of red green blue yellow small large cube sphere cone on table in front next to dog cat "
    "running sleeping quickly garden kitchen street picture shows image document page chapter introduction "
    "conclusion and with without this is an example quality high low good bad text about two three"
)
_WORDS = _WORDS_TEXT.split()
_EXTRA = [
    "A photo of a red cube on a table.",
    "Introduction\n\nThis page shows two images of a garden.",
    "Numbers 0123456789 and 2024-05-17, 3.14 or 42%.",
    "Unicode: café naïve Ünïcödé 日本語 😀 — “quotes”.",
    "Contractions: don't, I'm, we'll, they've, it's.",
    "Whitespace:\ttabs  double  spaces\r\n\r\nCRLF lines\n\n\nend",
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24))) for _ in range(400)]
    sentences = [line[:1].upper() + line[1:] + rng.choice([".", "!", "?", "\n\n", ", "]) for line in lines]
    return sentences + _EXTRA * 5


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    return _corpus()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: list[str]) -> Path:
    from unifilter_core.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(tiny_corpus, tmp_path_factory.mktemp("tiny_tokenizer"), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    from unifilter_core.tokenization import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def _init(preset: str, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from unifilter_core.modeling import init_checkpoint

    out = tmp_path_factory.mktemp(f"ckpt_{preset.replace('-', '_')}")
    return Path(init_checkpoint(preset, out, tokenizer_dir=tokenizer_dir, seed=0))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return _init("tiny", tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return _init("tiny-qwen3", tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture
def make_image() -> Callable[..., Image.Image]:
    def _make(width: int, height: int, seed: int = 0) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")

    return _make


@pytest.fixture
def api_key() -> str:
    """A sentinel Anthropic key: tests assert it never reaches a file, a log or the catalog."""
    import secrets

    return "sk-ant-sentinel-" + secrets.token_hex(16)


@pytest.fixture
def fake(api_key: str, monkeypatch: pytest.MonkeyPatch):
    """The local Messages / Message Batches server (tests/fake_anthropic.py), wired in through the environment."""
    from tests.fake_anthropic import FakeAnthropic

    server = FakeAnthropic(api_key)
    url = server.start()
    monkeypatch.setenv("ANTHROPIC_API_KEY", api_key)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
    yield server
    server.stop()
