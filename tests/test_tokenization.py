"""The tiny BPE tokenizer: released file layout, special tokens, and exact agreement with transformers' Qwen2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unifilter_core.tokenization import (
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    build_bpe_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

PROBES = [
    "A photo of a red cube on a table.",
    "\na caption after the image marker",
    "intro text\n\n",
    "\n\nmore text",
    "Numbers 0123456789 and 2024-05-17, 3.14 or 42%.",
    "Unicode: café naïve Ünïcödé 日本語 😀 — “quotes”. Unseen: Ωμέγα ßtraße",
    "e\u0301 (decomposed e-acute is NFC-normalised)",
    "Contractions: DON'T, I'm, we'll, they've, it's.",
    "Whitespace:\ttabs  double  spaces\r\n\r\nCRLF lines\n\n\nend   ",
    "   leading spaces and <image-placeholder> text",
    "",
]


def test_files_and_special_ids(tiny_tokenizer_dir: Path, tiny_tokenizer) -> None:
    names = {p.name for p in tiny_tokenizer_dir.iterdir()}
    assert names == set(TOKENIZER_FILES)  # slow-Qwen2 layout, no tokenizer.json (like the release)
    n_learned = len(json.loads((tiny_tokenizer_dir / "vocab.json").read_text(encoding="utf-8")))
    assert 256 < n_learned <= 512 - len(SPECIAL_TOKENS)
    tok = tiny_tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer"
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == [n_learned, n_learned + 1, n_learned + 2, n_learned + 3]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|im_end|>", "[PAD]")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n_learned, n_learned + 2, n_learned + 3)
    assert len(tok) == n_learned + 4
    added = json.loads((tiny_tokenizer_dir / "added_tokens.json").read_text(encoding="utf-8"))
    assert added == dict(zip(SPECIAL_TOKENS, ids, strict=True))
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"


def test_loaded_tokenizer_reproduces_trained_tokenization(tiny_corpus: list[str], tiny_tokenizer) -> None:
    trained = build_bpe_tokenizer(tiny_corpus, vocab_size=512)  # same corpus -> same model as the fixture
    for text in PROBES + tiny_corpus[:50]:
        expected = trained.encode(text).ids
        got = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got == expected, text
        assert tiny_tokenizer.decode(got) == trained.decode(expected)
    # byte-level: every string round-trips (after NFC)
    assert tiny_tokenizer.decode(tiny_tokenizer("ßtraße 😀\n")["input_ids"]) == "ßtraße 😀\n"
    # no special tokens are added implicitly (the processor adds BOS/EOS itself)
    assert (
        tiny_tokenizer("red cube")["input_ids"]
        == tiny_tokenizer("red cube", add_special_tokens=False)["input_ids"]
    )


def test_specials_in_text_map_to_their_ids(tiny_tokenizer) -> None:
    ids = tiny_tokenizer("x<|im_end|>[PAD]", add_special_tokens=False)["input_ids"]
    assert ids[-2:] == [tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id]


def test_vocab_size_too_small_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], tmp_path, vocab_size=100)


def test_load_tokenizer_rejects_shared_bos_eos_pad(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    for name in TOKENIZER_FILES:
        (tmp_path / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["pad_token"] = config["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    smap = json.loads((tmp_path / "special_tokens_map.json").read_text(encoding="utf-8"))
    smap["pad_token"] = smap["eos_token"]
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(smap), encoding="utf-8")
    with pytest.raises(ValueError, match="distinct"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "missing")
