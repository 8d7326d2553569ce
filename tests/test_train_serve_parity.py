"""Train/serve parity: what training feeds the model is exactly what the scorer prepares for the same sample.

Training builds its datasets with the functions of ``training.stage1`` / ``training.stage2`` (processor and dataset
from a config), the scorer is ``load_scorer`` on the same checkpoint; images reach the scorer decoded by the
readers' decoder (what ``score_tar`` does) and reach training as files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from unifilter_core.data.images import decode_image
from unifilter_core.modeling import load_checkpoint_config
from unifilter_core.prepare import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from unifilter_core.processing import DOC_SLOT_SEPARATOR, PreparedSample, ProcessingConfig, UniFilterProcessor
from unifilter_core.records import Reason
from unifilter_core.scorer import load_scorer
from unifilter_core.training.config import load_config
from unifilter_core.training.data import CaptionPretrainDataset, Collator, QualityDataset, token_labels
from unifilter_core.training.stage1 import _processor as stage1_processor
from unifilter_core.training.stage2 import make_dataset, make_processor

WORDS = [
    "red",
    "green",
    "blue",
    "square",
    "circle",
    "triangle",
    "small",
    "large",
    "left",
    "right",
    "above",
    "below",
    "the",
    "a",
    "of",
]
CAPTION = " ".join(WORDS[i % len(WORDS)] for i in range(120))  # well over the 75-id caption limit
DOC_TEXTS = [" ".join(WORDS[(i + k) % len(WORDS)] for i in range(n)) for k, n in ((0, 9), (3, 14), (5, 7))]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def images(make_image, tmp_path: Path) -> dict[str, bytes]:
    """Three PNG files (non-square: the pad to a square matters) written to ``tmp_path``."""
    out = {}
    for i, (w, h) in enumerate([(40, 24), (17, 33), (32, 32)]):
        data = _png(make_image(w, h, seed=i))
        (tmp_path / f"{i}.png").write_bytes(data)
        out[f"{i}.png"] = data
    return out


def _stage2(ckpt: Path, data: Path, **kw):
    values = {"model_path": str(ckpt), "output_dir": str(data.parent / "out"), "data_path": str(data)}
    values.update(kw)
    config = load_config(None, "stage2", values)
    processor = make_processor(SimpleNamespace(config=load_checkpoint_config(ckpt)), str(ckpt), config)
    return make_dataset(processor, config, train=True, cache_images=False)


def _document(images: dict[str, bytes]) -> tuple[list[str | None], list[bytes | None], list[str]]:
    """Slots text, image, text, image, text: the scorer's parallel lists and training's image paths."""
    texts = [DOC_TEXTS[0], None, DOC_TEXTS[1], None, DOC_TEXTS[2]]
    slot_images = [None, images["1.png"], None, images["2.png"], None]
    return texts, slot_images, ["1.png", "2.png"]


def _assert_same(item: dict, prepared: PreparedSample | object) -> None:
    assert isinstance(prepared, PreparedSample), prepared
    assert item["input_ids"] == prepared.input_ids
    assert item["pixel_values"].dtype == prepared.pixel_values.dtype
    assert torch.equal(item["pixel_values"], prepared.pixel_values)


@pytest.mark.parametrize("max_length", [None, 40])
def test_caption_and_document_inputs_equal_the_scorers(
    tiny_checkpoint: Path, images: dict[str, bytes], tmp_path: Path, max_length: int | None
) -> None:
    texts, slot_images, paths = _document(images)
    doc_text = DOC_SLOT_SEPARATOR.join(IMAGE_TOKEN if t is None else t for t in texts)
    records = [
        {"image": "0.png", "text": IMAGE_TOKEN + "\n" + CAPTION, "label": 3},
        {"image": paths, "text": doc_text, "label": 1},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    dataset = _stage2(tiny_checkpoint, tmp_path / "train.json", max_length=max_length)
    scorer = load_scorer(tiny_checkpoint, max_length=max_length)
    assert not dataset.failures and len(dataset) == 2

    caption = scorer.prepare_caption(decode_image(images["0.png"]), CAPTION)
    assert caption.truncated and len(caption.input_ids) == (75 if max_length is None else 40 - 4 + 1)
    _assert_same(dataset[0], caption)
    assert dataset[0]["labels"] == 3

    document = scorer.prepare_document(texts, [None if b is None else decode_image(b) for b in slot_images])
    assert document.input_ids.count(IMAGE_TOKEN_INDEX) == (
        2 if max_length is None else 1
    )  # the fit bites at 40
    _assert_same(dataset[1], document)
    assert dataset[1]["labels"] == 1

    # the batch: the training collator and the scorer's collate pad the same way
    batch = Collator(scorer.pad_id)([dataset[0], dataset[1]])
    served = scorer._collate([caption, document])
    assert torch.equal(batch["input_ids"], served["input_ids"])
    assert torch.equal(batch["attention_mask"], served["attention_mask"])
    assert torch.equal(batch["pixel_values"], served["pixel_values"])


def test_stage1_caption_inputs_equal_the_scorers(
    tiny_checkpoint: Path, images: dict[str, bytes], tmp_path: Path
) -> None:
    caption = "<<image>> " + CAPTION  # "<image>" -> "image" leaves "<image>": still one image, as the scorer
    record = {"id": "0", "image": "0.png", "conversations": [{"from": "human", "value": IMAGE_TOKEN}]}
    record["conversations"].append({"from": "gpt", "value": caption})
    (tmp_path / "pretrain.json").write_text(json.dumps([record]))
    config = load_config(
        None,
        "stage1",
        {"model_path": str(tiny_checkpoint), "output_dir": str(tmp_path / "o"), "data_path": "x"},
    )
    model = SimpleNamespace(config=load_checkpoint_config(tiny_checkpoint))
    processor = stage1_processor(model, str(tiny_checkpoint), config)
    dataset = CaptionPretrainDataset(
        processor, tmp_path / "pretrain.json", caption_max_tokens=config.caption_max_tokens
    )
    scorer = load_scorer(tiny_checkpoint)
    prepared = scorer.prepare_caption(decode_image(images["0.png"]), caption)
    item = dataset[0]
    _assert_same(item, prepared)
    assert prepared.input_ids.count(IMAGE_TOKEN_INDEX) == 1 and len(prepared.input_ids) == 75
    assert item["token_labels"] == token_labels(prepared.input_ids)
    assert item["token_labels"][:2] == [-100, -100] and item["token_labels"][2:] == prepared.input_ids[2:]


def test_training_images_go_through_the_hardened_decoder(tiny_tokenizer, make_image, tmp_path: Path) -> None:
    """Formats outside the allow-list, images over the pixel cost and empty files are per-record failures."""
    config = ProcessingConfig(image_size=32, num_image_tokens=4, max_length=256, max_pixels=2000)
    processor = UniFilterProcessor(tiny_tokenizer, config)
    make_image(20, 20).save(tmp_path / "ok.png")
    make_image(20, 20).save(tmp_path / "not_allowed.ppm")  # PIL reads PPM, the readers' allow-list does not
    make_image(60, 20).save(tmp_path / "wide.png")  # 1200 pixels, 3600 once padded to a square: > 2000
    (tmp_path / "empty.png").write_bytes(b"")
    names = ["ok.png", "not_allowed.ppm", "wide.png", "missing.png", "empty.png"]
    records = [{"image": name, "text": "<image>\na cube", "label": 1} for name in names]
    (tmp_path / "train.json").write_text(json.dumps(records))
    data = QualityDataset(processor, tmp_path / "train.json", cache_images=True)
    assert len(data) == 1
    assert {i: f.reason for i, f in data.failures} == {
        1: Reason.IMAGE_DECODE_ERROR,
        2: Reason.IMAGE_TOO_LARGE,
        3: Reason.MISSING_IMAGE,
        4: Reason.EMPTY_MEMBER,
    }
    assert all(f.detail.startswith(str(tmp_path / names[i])) for i, f in data.failures)
    lazy = QualityDataset(processor, tmp_path / "train.json", cache_images=False)  # checked on first use
    assert len(lazy) == 5 and lazy[0] is not None and all(lazy[i] is None for i in range(1, 5))
