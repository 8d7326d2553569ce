"""Classification heads (num_labels >= 2) report what the original reports, plus the class and expected level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_scorer import CAPTIONS, SENTINEL, Reference, pixels_by_hand
from unifilter_core import load_scorer
from unifilter_core.head_scores import LabelScore
from unifilter_core.scoring.batching import BatchRunner


@pytest.fixture(scope="module")
def four_class_checkpoint(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from unifilter_core.modeling import init_checkpoint

    out = tmp_path_factory.mktemp("four_class")
    return Path(
        init_checkpoint("tiny", out, tokenizer_dir=tiny_tokenizer_dir, seed=5, overrides={"num_labels": 4})
    )


def _reference_probs(ckpt: Path, tok, images) -> np.ndarray:
    """Softmax over the 4 logits of the independent computation, one row per caption."""
    ref = Reference(ckpt)
    size = ref.cfg["vision_config"]["image_size"]
    rows = []
    for image, caption in zip(images, CAPTIONS, strict=True):
        ids = [tok.bos_token_id, SENTINEL, *tok("\n" + caption, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            embeds = torch.cat(
                [ref.image_vectors(pixels_by_hand(image, size)[None])[0] if t == SENTINEL else
                 ref.text.embed_tokens.weight[t][None] for t in [*ids, tok.eos_token_id]]
            )[None]  # fmt: skip
            hidden = ref.text(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2])
            ).last_hidden_state
            rows.append(torch.softmax(hidden[0, -1].float() @ ref.head.float().T, -1).numpy())
    return np.stack(rows)


def test_four_class_head_scores_like_the_original(four_class_checkpoint: Path, tiny_tokenizer, make_image):
    images = [make_image(30 + 4 * i, 20, seed=20 + i) for i in range(len(CAPTIONS))]
    probs = _reference_probs(four_class_checkpoint, tiny_tokenizer, images)
    rows = load_scorer(four_class_checkpoint, batch_size=2).score_captions(
        list(zip(images, CAPTIONS, strict=True))
    )
    np.testing.assert_allclose([r.score for r in rows], probs[:, 1], rtol=0, atol=1e-5)  # softmax P(class 1)
    assert [r.quality_class for r in rows] == probs.argmax(1).tolist()
    np.testing.assert_allclose([r.expected_level for r in rows], probs @ np.arange(4), rtol=0, atol=1e-5)
    assert all(isinstance(r.quality_class, int) and isinstance(r.score, float) for r in rows)
    assert np.ptp(probs[:, 1]) > 1e-4


def test_batch_runner_carries_class_outputs(four_class_checkpoint: Path, tiny_checkpoint: Path, make_image):
    scorer = load_scorer(four_class_checkpoint)
    samples = [scorer.prepare_caption(make_image(25, 25, seed=i), c) for i, c in enumerate(CAPTIONS)]
    direct = scorer.forward(samples)
    assert all(isinstance(s, LabelScore) for s in direct)
    runner = BatchRunner(scorer)
    rows = runner.run_window(samples, batch_size=2, max_batch_tokens=None)
    assert [r.quality_class for r in rows] == [s.quality_class for s in direct]
    np.testing.assert_allclose(
        [r.expected_level for r in rows], [s.expected_level for s in direct], atol=1e-6
    )
    np.testing.assert_allclose([r.score for r in rows], [float(s) for s in direct], atol=1e-6)
    # regression head: plain floats, both fields None
    regression = load_scorer(tiny_checkpoint)
    plain = regression.forward(samples)
    assert all(type(s) is float for s in plain)
    rows = BatchRunner(regression).run(samples)
    assert all(r.quality_class is None and r.expected_level is None and r.score is not None for r in rows)
    assert all(r.quality_class is None for r in regression.score_prepared(samples))


def test_engine_writes_class_outputs_to_the_score_table(
    four_class_checkpoint: Path, tiny_checkpoint: Path, tmp_path
):
    """score_tar (decode, BatchRunner, table writer) stores quality_class / expected_level of a 4-class head,
    equal to the scorer's own results; a regression head leaves both columns null."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from tests.tarfixtures import jpeg_bytes, write_caption_tar
    from unifilter_core.scoring import ScoringConfig, score_tar

    tar = write_caption_tar(tmp_path / "00000000.tar", n=5)
    config = ScoringConfig(batch_size=2, num_workers=0)
    scorer = load_scorer(four_class_checkpoint)
    out = tmp_path / "four" / "00000000.parquet"
    score_tar(tar, scorer, out, kind="caption", source="s", config=config, progress=False)
    table = pq.read_table(out).to_pylist()
    assert [r["status"] for r in table] == ["ok"] * 5
    pairs = [
        (Image.open(io.BytesIO(jpeg_bytes(color=(i * 37 % 256, 80, 120)))), f"caption {i}") for i in range(5)
    ]
    expected = scorer.score_captions(pairs)
    assert [r["quality_class"] for r in table] == [e.quality_class for e in expected]
    np.testing.assert_allclose(
        [r["expected_level"] for r in table], [e.expected_level for e in expected], atol=1e-5
    )
    np.testing.assert_allclose([r["score"] for r in table], [e.score for e in expected], atol=1e-5)
    assert all(0 <= r["score"] <= 1 and 0 <= r["expected_level"] <= 3 for r in table)

    plain = tmp_path / "plain" / "00000000.parquet"
    score_tar(
        tar, load_scorer(tiny_checkpoint), plain, kind="caption", source="s", config=config, progress=False
    )
    rows = pq.read_table(plain).to_pylist()
    assert all(
        r["quality_class"] is None and r["expected_level"] is None and r["score"] is not None for r in rows
    )
