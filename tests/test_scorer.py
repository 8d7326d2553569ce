"""The public scoring API against an independent re-computation from plain torch + transformers parts.

The reference below reads ``config.json`` and ``model.safetensors`` directly, builds a ``SiglipVisionModel`` and a
``Qwen2Model``/``Qwen3Model`` itself, formats ids and pixels by hand from reference-model.md, and scores one sample at
a time with no padding. ``load_scorer`` must agree with it to 1e-5 in float32.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    Qwen2Config,
    Qwen2Model,
    Qwen3Config,
    Qwen3Model,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from unifilter_core import ScoreResult, load_scorer
from unifilter_core.processing import PreparedSample
from unifilter_core.tokenization import TOKENIZER_FILES

SENTINEL = -200
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJ_PREFIX = "model.mm_projector.mlp_projector."
TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
)


class Reference:
    """UniFilter re-built from its parts: SigLIP hidden_states[-1] -> aapool -> MLP -> LLM on embeds -> last -> linear."""

    def __init__(self, folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        state = load_file(folder / "model.safetensors")
        self.cfg, self.n_tokens = cfg, cfg["mm_num_image_tokens"]
        self.tokenizer_dir = folder
        self.vision = SiglipVisionModel(SiglipVisionConfig(**cfg["vision_config"])).eval()
        vision_state = {k[len(VISION_PREFIX) :]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
        self.vision.load_state_dict(vision_state, strict=True)
        qwen3 = cfg["model_type"] == "llava_qwen3"
        text_kwargs = {k: cfg[k] for k in TEXT_KEYS}
        if qwen3:
            self.text = Qwen3Model(Qwen3Config(**text_kwargs, head_dim=cfg["head_dim"], attention_bias=False))
        else:
            self.text = Qwen2Model(Qwen2Config(**text_kwargs))
        self.text.config._attn_implementation = "eager"
        text_state = {
            k[len("model.") :]: v
            for k, v in state.items()
            if k.startswith("model.") and not k.startswith((VISION_PREFIX, PROJ_PREFIX))
        }
        self.text.load_state_dict(text_state, strict=True)
        self.text.eval()
        self.w0, self.b0 = state[PROJ_PREFIX + "0.weight"], state[PROJ_PREFIX + "0.bias"]
        self.w2, self.b2 = state[PROJ_PREFIX + "2.weight"], state[PROJ_PREFIX + "2.bias"]
        self.head = state["score.weight"]  # (num_labels, hidden)
        assert not any(k.startswith("lm_head") for k in state)

    def image_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_image_tokens, hidden)."""
        feats = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # (N, P, C)
        n, p, c = feats.shape
        side, out = math.isqrt(p), math.isqrt(self.n_tokens)
        grid = feats.transpose(1, 2).reshape(n, c, side, side)  # row-major patches
        pooled = F.adaptive_avg_pool2d(grid, out).flatten(2).transpose(1, 2)  # (N, tokens, C)
        return F.linear(F.gelu(F.linear(pooled, self.w0, self.b0), approximate="none"), self.w2, self.b2)

    @torch.no_grad()
    def score(self, ids: list[int], pixels: torch.Tensor | None) -> float:
        vectors = self.image_vectors(pixels) if pixels is not None else None
        table = self.text.embed_tokens.weight
        parts, k = [], 0
        for token in ids:
            if token == SENTINEL:
                parts.append(vectors[k])
                k += 1
            else:
                parts.append(table[token][None])
        embeds = torch.cat(parts)[None]  # (1, T, hidden)
        hidden = self.text(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2])
        ).last_hidden_state
        logits = hidden[0, -1].float() @ self.head.float().T  # (num_labels,)
        if logits.numel() == 1:
            return float(logits[0])
        return float((torch.softmax(logits, -1) * torch.arange(logits.numel())).sum())


def pixels_by_hand(image: Image.Image, size: int) -> torch.Tensor:
    """reference-model.md: RGB -> grey-pad to square -> PIL bicubic -> /255 -> (x - .5)/.5, as (3, H, W)."""
    img = image.convert("RGB")
    w, h = img.size
    square = Image.new("RGB", (max(w, h),) * 2, (127, 127, 127))
    square.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    arr = np.asarray(square.resize((size, size), Image.BICUBIC)).astype(np.float64) / 255.0
    return torch.tensor((arr - 0.5) / 0.5, dtype=torch.float32).permute(2, 0, 1)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


CAPTIONS = [
    "A red cube on a table.",
    "dog",
    "Two large green spheres next to a small blue cone in the garden!",
]
DOCS = [  # (texts, image sizes at image slots)
    (["Introduction", None, "This page shows a garden."], [None, (20, 12), None]),
    ([None, "a photo of two things", None], [(9, 9), None, (12, 30)]),
    (["Chapter one", None, None, "text <image> in text", None], [None, (16, 16), (40, 8), None, (7, 13)]),
]


def _docs(make_image, as_bytes: bool = False) -> list[dict]:
    docs = []
    for d, (texts, sizes) in enumerate(DOCS):
        images = [None if s is None else make_image(*s, seed=10 * d + i) for i, s in enumerate(sizes)]
        if as_bytes:
            images = [None if im is None else png(im) for im in images]
        docs.append({"texts": texts, "images": images})
    return docs


def _ref_doc_scores(ref: Reference, tok, docs: list[dict], size: int) -> list[float]:
    out = []
    for doc in docs:
        slots, pix = [], []
        for text, image in zip(doc["texts"], doc["images"], strict=True):
            if text is not None:
                slots.append(text.replace("<image>", "<image-placeholder>"))
            else:
                slots.append("<image>")
                pix.append(pixels_by_hand(image, size))
        ids = [tok.bos_token_id]
        for i, chunk in enumerate("\n\n".join(slots).split("<image>")):
            ids += ([SENTINEL] if i else []) + tok(chunk, add_special_tokens=False)["input_ids"]
        ids.append(tok.eos_token_id)
        out.append(ref.score(ids, torch.stack(pix) if pix else None))
    return out


@pytest.fixture(scope="module", params=["tiny_checkpoint", "tiny_qwen3_checkpoint", "uneven_pool_checkpoint"])
def checkpoint(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def uneven_pool_checkpoint(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """4x4 patches pooled to 3x3: true adaptive pooling with uneven, overlapping windows."""
    from unifilter_core.modeling import init_checkpoint

    out = tmp_path_factory.mktemp("ckpt_uneven")
    return Path(
        init_checkpoint(
            "tiny", out, tokenizer_dir=tiny_tokenizer_dir, seed=1, overrides={"mm_num_image_tokens": 9}
        )
    )


def test_scores_match_independent_computation(checkpoint: Path, tiny_tokenizer, make_image) -> None:
    ref = Reference(checkpoint)
    size = ref.cfg["vision_config"]["image_size"]
    scorer = load_scorer(checkpoint, device="cpu", dtype="float32", batch_size=2)
    tok = tiny_tokenizer

    images = [make_image(30 + 7 * i, 20 + 3 * i, seed=i) for i in range(len(CAPTIONS))]
    got = scorer.score_captions(list(zip(images, CAPTIONS, strict=True)))
    for image, caption, result in zip(images, CAPTIONS, got, strict=True):
        ids = [tok.bos_token_id, SENTINEL, *tok("\n" + caption, add_special_tokens=False)["input_ids"]]
        expected = ref.score([*ids, tok.eos_token_id], pixels_by_hand(image, size)[None])
        assert result.status == "ok" and result.reason is None and result.n_images == 1
        assert isinstance(result.score, float)
        assert abs(result.score - expected) < 1e-5, (caption, result.score, expected)

    docs = _docs(make_image)
    expected = _ref_doc_scores(ref, tok, docs, size)
    got = scorer.score_documents(docs)
    assert [r.n_images for r in got] == [1, 2, 3]
    np.testing.assert_allclose([r.score for r in got], expected, rtol=0, atol=1e-5)
    # images as encoded bytes give the same scores
    got_bytes = scorer.score_documents(_docs(make_image, as_bytes=True))
    np.testing.assert_allclose([r.score for r in got_bytes], expected, rtol=0, atol=1e-5)
    # scores are not all the same number (the comparison above could not pass by accident)
    assert np.ptp(expected) > 1e-4


def test_score_does_not_depend_on_batch(tiny_checkpoint: Path, make_image) -> None:
    scorer = load_scorer(tiny_checkpoint, batch_size=8)
    prepared = [
        scorer.prepare_caption(make_image(25, 40, seed=i), caption) for i, caption in enumerate(CAPTIONS)
    ] + [scorer.prepare_document(d["texts"], d["images"]) for d in _docs(make_image)]
    alone = [scorer.forward([p])[0] for p in prepared]
    mixed = scorer.forward(prepared)
    reversed_ = scorer.forward(prepared[::-1])[::-1]
    np.testing.assert_allclose(mixed, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(reversed_, alone, rtol=0, atol=1e-5)
    # the score API batches by length (batch_size 2) and still returns input order
    small = load_scorer(tiny_checkpoint, batch_size=2)
    pairs = [(make_image(25, 40, seed=i), caption) for i, caption in enumerate(CAPTIONS)]
    np.testing.assert_allclose([r.score for r in small.score_captions(pairs)], alone[:3], rtol=0, atol=1e-5)


def test_save_pretrained_round_trip(tiny_checkpoint: Path, tmp_path: Path, make_image) -> None:
    from unifilter_core.modeling import UniFilterForQualityScoring

    model = UniFilterForQualityScoring.from_pretrained(tiny_checkpoint)
    model.save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    original = load_file(tiny_checkpoint / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)  # released key names
    a, b = load_scorer(tiny_checkpoint), load_scorer(tmp_path)
    pairs = [(make_image(30, 20, seed=i), c) for i, c in enumerate(CAPTIONS)]
    assert [r.score for r in a.score_captions(pairs)] == [r.score for r in b.score_captions(pairs)]
    docs = _docs(make_image)
    assert [r.score for r in a.score_documents(docs)] == [r.score for r in b.score_documents(docs)]
    assert a.model_fingerprint == load_scorer(tiny_checkpoint).model_fingerprint
    assert len(a.model_fingerprint) == 64


def test_limits_and_failures_are_rows_in_order(tiny_checkpoint: Path, make_image) -> None:
    scorer = load_scorer(tiny_checkpoint, max_images=2, caption_max_tokens=8)
    three = _docs(make_image)[2]
    docs = [_docs(make_image)[0], three, {"texts": [None], "images": [b"broken"]}, _docs(make_image)[1]]
    rows = scorer.score_documents(docs)
    assert [r.status for r in rows] == ["ok", "skipped", "skipped", "ok"]
    assert [r.reason for r in rows] == [None, "too_many_images", "empty_document", None]
    assert rows[1].score is None and rows[1].n_images == 3 and "max_images=2" in rows[1].detail
    assert all(isinstance(r, ScoreResult) for r in rows)
    rows = scorer.score_captions(
        [(make_image(9, 9), " ".join(["red cube"] * 20)), (b"nope", "x"), (None, "x")]
    )
    assert (
        rows[0].status == "ok"
        and rows[0].truncated
        and rows[0].n_tokens == 8 - 1 + scorer.processor.config.num_image_tokens
    )
    assert (rows[1].status, rows[1].reason) == ("error", "image_decode_error")
    assert (rows[2].status, rows[2].reason) == ("error", "missing_image")


def test_mismatched_image_counts_raise(tiny_checkpoint: Path, make_image) -> None:
    scorer = load_scorer(tiny_checkpoint)
    with pytest.raises(ValueError, match="texts has 2 slots but images has 3"):
        scorer.score_documents([{"texts": ["a", None], "images": [None, make_image(8, 8), None]}])
    good = scorer.prepare_caption(make_image(8, 8), "a cube")
    bad = PreparedSample(good.input_ids + [SENTINEL], good.pixel_values, 1, good.n_tokens)
    with pytest.raises(ValueError, match="2 image sentinels in input_ids, n_images=1 and 1 images"):
        scorer.forward([good, bad])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"dtype": "fp32"}, "dtype"),
        ({"device": "gpu0"}, "device"),
        ({"image_aspect_ratio": "crop"}, "image_aspect_ratio"),
        ({"caption_max_tokens": 1}, "caption_max_tokens"),
        ({"max_length": 3}, "max_length"),
    ],
)
def test_bad_options_raise(tiny_checkpoint: Path, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        load_scorer(tiny_checkpoint, **kw)


def test_bad_paths_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_scorer(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_scorer(tmp_path)
    with pytest.raises(ValueError, match="dtype"):  # options are checked before the path
        load_scorer(tmp_path / "nope", dtype="int8")


def test_aspect_override_and_bfloat16(tiny_checkpoint: Path, make_image) -> None:
    pairs = [(make_image(40, 10, seed=i), c) for i, c in enumerate(CAPTIONS)]
    fp32 = load_scorer(tiny_checkpoint)
    assert fp32.processor.config.image_aspect_ratio == "pad"  # from the checkpoint
    stretch = load_scorer(tiny_checkpoint, image_aspect_ratio="resize")
    assert stretch.processor.config.image_aspect_ratio == "resize"
    a = [r.score for r in fp32.score_captions(pairs)]
    assert a != [r.score for r in stretch.score_captions(pairs)]
    bf16 = [r.score for r in load_scorer(tiny_checkpoint, dtype="bfloat16").score_captions(pairs)]
    assert all(isinstance(x, float) for x in bf16)
    np.testing.assert_allclose(bf16, a, rtol=0, atol=0.1)


def test_square_aspect_of_original_checkpoints_reads_as_resize(
    tiny_checkpoint: Path, tmp_path: Path, make_image
):
    """LLaVA's default ``image_aspect_ratio: "square"`` (original training without ``pad``) stretches."""
    ckpt = tmp_path / "square"
    shutil.copytree(tiny_checkpoint, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "image_aspect_ratio": "square"}))
    square = load_scorer(ckpt)
    assert square.processor.config.image_aspect_ratio == "resize"
    assert square.model.config.image_aspect_ratio == "resize"
    pairs = [(make_image(40, 10, seed=i), c) for i, c in enumerate(CAPTIONS)]
    stretched = [
        r.score for r in load_scorer(tiny_checkpoint, image_aspect_ratio="resize").score_captions(pairs)
    ]
    assert [r.score for r in square.score_captions(pairs)] == stretched
    # the override takes LLaVA's name too, and wins over the checkpoint
    assert (
        load_scorer(tiny_checkpoint, image_aspect_ratio="square").processor.config.image_aspect_ratio
        == "resize"
    )
    assert load_scorer(ckpt, image_aspect_ratio="pad").processor.config.image_aspect_ratio == "pad"
