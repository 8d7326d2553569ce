"""A small byte-level BPE tokenizer in the released UniFilter (slow Qwen2) file layout.

The released checkpoint ships a slow Qwen2 tokenizer: ``vocab.json`` + ``merges.txt`` and the special tokens in
``added_tokens.json`` / ``tokenizer_config.json`` (no ``tokenizer.json``). :func:`train_bpe_tokenizer` trains a
tiny tokenizer with exactly Qwen2's normalisation (NFC), pre-tokenisation (Qwen2's split regex, then byte-level
without a prefix space) and byte-level decoding, and writes the same file set, so that transformers'
``Qwen2Tokenizer`` loaded from those files reproduces the trained tokenisation id for id.

Special tokens are appended after the learned vocabulary in the released order
(``<|endoftext|>`` = bos, ``<|im_start|>``, ``<|im_end|>`` = eos, ``[PAD]`` = pad), mirroring the released ids
151643 / 151644 / 151645 / 151665 relative to the end of the vocabulary.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenisation regex (the same pattern transformers' Qwen2Tokenizer uses).
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

BOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "[PAD]"
# Appended after the learned vocabulary, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, IM_START_TOKEN, EOS_TOKEN, PAD_TOKEN)

TOKENIZER_FILES: tuple[str, ...] = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _qwen2_style_tokenizer() -> Any:
    """An untrained ``tokenizers.Tokenizer`` with Qwen2's normaliser, pre-tokeniser and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike[str], vocab_size: int = 1024
) -> Path:
    """Train a byte-level BPE tokenizer with Qwen2's pre-tokenisation and write the slow-Qwen2 file set.

    Args:
        texts: training corpus (any iterable of strings; consumed once).
        out_dir: folder to write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
            ``special_tokens_map.json`` and ``added_tokens.json`` into (created if missing).
        vocab_size: total vocabulary size including the 4 special tokens. The learned part has at most
            ``vocab_size - 4`` entries (fewer when the corpus runs out of merges); it always holds the 256 bytes.

    Returns:
        ``out_dir`` as a :class:`Path`.

    Raises:
        ValueError: if ``vocab_size`` cannot hold the byte alphabet plus the special tokens.
    """
    out = Path(out_dir)
    tok = build_bpe_tokenizer(texts, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))  # vocab.json + merges.txt
    n_learned = tok.get_vocab_size()
    _write_special_token_files(out, n_learned)
    logger.info(
        "trained BPE tokenizer: %d learned tokens + %d specials -> %s", n_learned, len(SPECIAL_TOKENS), out
    )
    return out


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """Train the learned part of the tokenizer in memory (no special tokens); deterministic for a given corpus.

    Args:
        texts: training corpus.
        vocab_size: total size including the 4 special tokens that :func:`train_bpe_tokenizer` appends.

    Returns:
        A trained ``tokenizers.Tokenizer`` with Qwen2's normaliser, pre-tokeniser and decoder.
    """
    from tokenizers import pre_tokenizers, trainers

    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least {256 + n_special} (256 bytes + specials)"
        )
    tok = _qwen2_style_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _write_special_token_files(out: Path, n_learned: int) -> None:
    """Write ``added_tokens.json``, ``special_tokens_map.json`` and ``tokenizer_config.json`` (slow Qwen2 style)."""
    ids = {token: n_learned + i for i, token in enumerate(SPECIAL_TOKENS)}
    added_tokens_decoder = {
        str(idx): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, idx in ids.items()
    }
    special_map = {
        "additional_special_tokens": [IM_START_TOKEN, EOS_TOKEN],
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [IM_START_TOKEN, EOS_TOKEN],
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 4096,
        "padding_side": "right",
        "split_special_tokens": False,
    }
    _write_json(out / "added_tokens.json", ids)
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "tokenizer_config.json", config)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load the tokenizer of a checkpoint folder (local files only, never remote code).

    Args:
        path: a folder with the slow-Qwen2 file set (released checkpoint or :func:`train_bpe_tokenizer` output).

    Returns:
        A transformers tokenizer with ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` set and distinct.

    Raises:
        ValueError: if the folder has no tokenizer files or bos/eos/pad are missing or not distinct.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} holds no tokenizer (expected vocab.json + merges.txt or tokenizer.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    missing = [name for name, idx in ids.items() if idx is None]
    if missing:
        raise ValueError(
            f"tokenizer in {folder} has no {', '.join(missing)} token; set bos/eos/pad in tokenizer_config.json "
            f"(the released model uses {BOS_TOKEN} / {EOS_TOKEN} / {PAD_TOKEN})"
        )
    if len(set(ids.values())) != 3:
        raise ValueError(
            f"tokenizer in {folder} has bos/eos/pad ids {ids}; they must be distinct "
            f"(the released model uses {BOS_TOKEN} / {EOS_TOKEN} / {PAD_TOKEN})"
        )
    return tokenizer
