"""The second release (UniFilter-Qwen3-0.6B): its tokenizer recipe scores right, its filter is on the record.

At the original's Qwen3-era recipe the tokenizer gains ``<s>`` as bos while ``config.bos_token_id`` keeps Qwen's
``<|endoftext|>``, which is also the pad token, and the embeddings are not resized (vocab_size is larger than the
tokenizer). Scores must still equal the independent computation: ids start with the TOKENIZER's bos, padding uses
the pad id but the mask comes from lengths, so a literal ``<|endoftext|>`` inside a caption is still attended.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_scorer import CAPTIONS, SENTINEL, Reference, pixels_by_hand
from unifilter_core import load_scorer
from unifilter_core.modeling import init_checkpoint, load_preset
from unifilter_core.scoring.config import ScoringConfig, canonical_config
from unifilter_core.scoring.table import config_hash
from unifilter_core.tokenization import TOKENIZER_FILES, load_tokenizer

BOS_S = "<s>"
ENDOFTEXT = "<|endoftext|>"


def _qwen3_era_tokenizer(source: Path, out: Path) -> int:
    """Copy a tiny tokenizer and apply the Qwen3-era recipe: ``<s>`` added as bos, pad = ``<|endoftext|>``."""
    out.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, out / name)
    added = json.loads((out / "added_tokens.json").read_text())
    bos_id = max(added.values()) + 1
    added[BOS_S] = bos_id
    (out / "added_tokens.json").write_text(json.dumps(added))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(bos_id)] = {
        "content": BOS_S, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": True,
    }  # fmt: skip
    for file, data in (("tokenizer_config.json", config), ("special_tokens_map.json", None)):
        data = data if data is not None else json.loads((out / file).read_text())
        data.update(bos_token=BOS_S, pad_token=ENDOFTEXT)
        (out / file).write_text(json.dumps(data))
    return bos_id


@pytest.fixture(scope="module")
def qwen3_recipe_checkpoint(tmp_path_factory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny llava_qwen3 checkpoint with the release's token layout (config pad == config bos != tokenizer bos)."""
    root = tmp_path_factory.mktemp("qwen3_recipe")
    _qwen3_era_tokenizer(tiny_tokenizer_dir, root / "tokenizer")
    endoftext = json.loads((tiny_tokenizer_dir / "added_tokens.json").read_text())[ENDOFTEXT]
    eos = load_tokenizer(tiny_tokenizer_dir).eos_token_id
    ids = {"bos_token_id": endoftext, "pad_token_id": endoftext, "eos_token_id": eos}
    out = Path(init_checkpoint("tiny-qwen3", root / "ckpt", seed=7, overrides={"vocab_size": 600, **ids}))
    for name in TOKENIZER_FILES:
        shutil.copyfile(root / "tokenizer" / name, out / name)
    return out


def test_released_qwen3_preset_token_ids() -> None:
    preset = load_preset("released-qwen3-0.6b")
    assert preset["vocab_size"] == 151936  # embeddings not resized
    assert (preset["bos_token_id"], preset["eos_token_id"], preset["pad_token_id"]) == (
        151643,
        151645,
        151643,
    )
    # the added <s> (151669 on the real vocabulary) fits the embedding table without resizing
    assert preset["vocab_size"] > 151669


def test_qwen3_recipe_scores_equal_the_independent_computation(
    qwen3_recipe_checkpoint: Path, make_image
) -> None:
    ckpt = qwen3_recipe_checkpoint
    config = json.loads((ckpt / "config.json").read_text())
    assert config["pad_token_id"] == config["bos_token_id"]
    scorer = load_scorer(ckpt, dtype="float32", batch_size=4)
    tok = scorer.processor.tokenizer
    s_id, endoftext = tok.convert_tokens_to_ids(BOS_S), tok.convert_tokens_to_ids(ENDOFTEXT)
    assert scorer.processor.bos_id == s_id != config["bos_token_id"]  # the tokenizer's bos starts each row
    assert scorer.pad_id == endoftext == config["pad_token_id"]

    captions = [*CAPTIONS, f"a cube {ENDOFTEXT} on a table"]  # the pad token inside real text
    images = [make_image(30 + 5 * i, 22, seed=i) for i in range(len(captions))]
    prepared = [scorer.prepare_caption(im, c) for im, c in zip(images, captions, strict=True)]
    assert all(p.input_ids[0] == s_id for p in prepared)
    assert endoftext in prepared[-1].input_ids[1:-1]

    ref = Reference(ckpt)
    size = ref.cfg["vision_config"]["image_size"]
    expected = []
    for image, caption in zip(images, captions, strict=True):
        ids = [s_id, SENTINEL, *tok("\n" + caption, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        expected.append(ref.score(ids, pixels_by_hand(image, size)[None]))
    batched = [r.score for r in scorer.score_captions(list(zip(images, captions, strict=True)))]
    alone = [scorer.forward([p])[0] for p in prepared]
    np.testing.assert_allclose(batched, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(alone, expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 1e-4


def test_scoring_config_records_the_resample_filter(qwen3_recipe_checkpoint: Path, tmp_path: Path) -> None:
    """A change of the tower's filter changes the manifest's config hash, so existing tables are rescored."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_recipe_checkpoint, ckpt)
    bicubic = canonical_config("caption", ScoringConfig(), load_scorer(ckpt))
    assert bicubic["processing"]["resample"] == 3
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    bilinear = canonical_config("caption", ScoringConfig(), load_scorer(ckpt))
    assert bilinear["processing"]["resample"] == 2
    assert config_hash(bicubic) != config_hash(bilinear)
