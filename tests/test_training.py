"""Training: metrics, loss masking, freezing, resume, checkpoints that load with load_scorer, configs, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unifilter_core.processing import IMAGE_TOKEN_INDEX, ProcessingConfig, UniFilterProcessor
from unifilter_core.training import (
    Stage2Config,
    classification_report,
    load_config,
    train_stage1,
    train_stage2,
)
from unifilter_core.training.data import IGNORE_INDEX, CaptionPretrainDataset, Collator, QualityDataset
from unifilter_core.training.evaluate import shuffle_dataset_images
from unifilter_core.training.stage1 import splice_token_labels

WORDS = [
    "a",
    "red",
    "cube",
    "on",
    "the",
    "table",
    "small",
    "blue",
    "sphere",
    "green",
    "cone",
    "garden",
    "kitchen",
    "photo",
    "of",
    "large",
]


def _caption(rng: np.random.Generator, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-Pretrain JSON + UniFilter train/val JSON over 8 tiny images (images/ next to the JSON)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("train_data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        colour = np.zeros((32, 32, 3), dtype=np.uint8)
        colour[..., i % 3] = 40 + 25 * i
        Image.fromarray(colour).save(root / "images" / f"{i}.png")
    pretrain = [
        {"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": _caption(rng)}]}
        for i in range(8)
    ]  # fmt: skip
    pairs = [
        {"image": f"{i}.png", "text": "<image>\n" + _caption(rng, 3 + level), "label": level}
        for i in range(8)
        for level in range(4)
    ]
    pairs.append({"image": ["0.png", "1.png"], "text": "intro\n\n<image>\n\nmiddle\n\n<image>", "label": 2})
    pairs.append({"image": "missing.png", "text": "<image>\nno file", "label": 1})  # becomes a failure record
    (root / "pretrain.json").write_text(json.dumps(pretrain))
    (root / "train.json").write_text(json.dumps(pairs))
    (root / "val.json").write_text(json.dumps(pairs[:16]))
    return root


@pytest.fixture
def processor(tiny_tokenizer, tiny_checkpoint: Path) -> UniFilterProcessor:
    from unifilter_core.modeling import load_checkpoint_config

    return UniFilterProcessor(
        tiny_tokenizer, ProcessingConfig.from_model_config(load_checkpoint_config(tiny_checkpoint))
    )


def _stage2_config(ckpt: Path, data: Path, out: Path, **kw) -> Stage2Config:
    values = {
        "model_path": str(ckpt), "output_dir": str(out), "data_path": str(data / "train.json"),
        "eval_data_path": str(data / "val.json"), "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
        "learning_rate": 1e-2, "max_steps": 2, "warmup_ratio": 0.0, "logging_steps": 1, "freeze_vision_tower": False,
    }  # fmt: skip
    values.update(kw)
    return load_config(None, "stage2", values)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- metrics
def test_metrics_on_crafted_predictions() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    scores = np.array([-0.7, 0.6, 1.2, 2.6, 2.4, 1.9, 3.8, 2.2])  # -> levels 0 1 1 3 2 2 3 2
    report = classification_report(scores[:, None], labels)
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 2, 0], [0, 0, 1, 1]]
    # precision 1, 1/2, 2/3, 1/2; recall 1/2, 1/2, 1, 1/2
    f1 = [2 / 3, 1 / 2, 4 / 5, 1 / 2]
    assert report["macro_f1"] == pytest.approx(sum(f1) / 4)
    assert report["macro_precision"] == pytest.approx((1 + 0.5 + 2 / 3 + 0.5) / 4)
    # Spearman on the raw scores: ranks of scores vs average ranks of labels
    score_ranks = np.array([1, 2, 3, 7, 6, 4, 8, 5], dtype=float)
    label_ranks = np.array([1.5, 1.5, 3.5, 3.5, 5.5, 5.5, 7.5, 7.5])
    expected = np.corrcoef(score_ranks, label_ranks)[0, 1]
    assert report["spearman"] == pytest.approx(expected)
    assert report["mean_score_by_level"][3] == pytest.approx(3.0)


def test_metrics_class_head_uses_argmax_and_expected_level() -> None:
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.8, 0.1]]))
    report = classification_report(logits, np.array([3, 0, 1]))
    assert report["accuracy"] == pytest.approx(2 / 3)  # argmax 3, 0, 2
    assert report["mean_score_by_level"][3] == pytest.approx(0.2 + 0.6 + 1.2)
    assert report["spearman"] == pytest.approx(1.0)  # expected levels 2.0, 0.6, 1.95 rank like 3, 0, 1


# ------------------------------------------------------------------------------------------------- data
def test_loss_masking_on_bos_and_image_positions(processor, tiny_data: Path) -> None:
    dataset = CaptionPretrainDataset(processor, tiny_data / "pretrain.json", caption_max_tokens=None)
    item = dataset[0]
    ids, labels = item["input_ids"], item["token_labels"]
    assert ids[0] == processor.bos_id and ids[1] == IMAGE_TOKEN_INDEX and ids[-1] == processor.eos_id
    masked = [i for i, t in enumerate(labels) if t == IGNORE_INDEX]
    assert masked == [0, 1]
    assert labels[2:] == ids[2:]  # caption tokens and EOS are targets

    batch = Collator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    k = 3
    spliced = splice_token_labels(
        batch["input_ids"], batch["attention_mask"], batch["token_labels"], k, IMAGE_TOKEN_INDEX
    )
    for row in range(2):
        n = int(batch["attention_mask"][row].sum())
        expected = [IGNORE_INDEX] * (1 + k) + batch["token_labels"][row, 2:n].tolist()
        assert spliced[row, : len(expected)].tolist() == expected
        assert (spliced[row, len(expected) :] == IGNORE_INDEX).all()


def test_quality_dataset_records_failures_and_swaps(processor, tiny_data: Path) -> None:
    dataset = QualityDataset(
        processor, tiny_data / "train.json", swap_negative_fraction=1.0, cache_images=True
    )
    assert len(dataset) == 33
    assert [f.reason.value for _, f in dataset.failures] == ["missing_image"]
    level3 = next(i for i, e in enumerate(dataset.entries) if e.label == 3)
    item = dataset[level3]
    assert item["labels"] == 1
    own = dataset.images.load(dataset.entries[level3].images[0])
    assert not torch.equal(item["pixel_values"][0], own)
    doc = next(e for e in dataset.entries if len(e.images) == 2)
    assert doc.input_ids.count(IMAGE_TOKEN_INDEX) == 2

    plain = QualityDataset(processor, tiny_data / "train.json", cache_images=True)
    before = [e.images for e in plain.entries]
    shuffle_dataset_images(plain, seed=1)
    after = [e.images for e in plain.entries]
    singles = [i for i, e in enumerate(plain.entries) if len(e.images) == 1]
    assert all(after[i] != before[i] for i in singles)
    assert sorted(after) == sorted(before)


def test_quality_dataset_serves_captions_text_first(processor, tiny_data: Path) -> None:
    dataset = QualityDataset(processor, tiny_data / "train.json", text_first_fraction=1.0, cache_images=True)
    caption = dataset.entries[0]
    record = json.loads((tiny_data / "train.json").read_text())[0]
    words = record["text"].removeprefix("<image>\n")
    want = processor.document_ids(f"{words}\n\n<image>", None)[0]
    assert caption.input_ids[1] == IMAGE_TOKEN_INDEX  # the record's own layout is kept
    assert caption.text_first_ids == want and want[-2:] == [IMAGE_TOKEN_INDEX, processor.eos_id]
    item = dataset[0]
    assert item["input_ids"] == want and item["labels"] == record["label"]
    doc = next(e for e in dataset.entries if len(e.images) == 2)
    assert doc.text_first_ids is None  # documents keep their layout
    half = QualityDataset(processor, tiny_data / "train.json", text_first_fraction=0.5, seed=3)
    served = [half[i]["input_ids"] == half.entries[i].text_first_ids for i in range(32)]
    assert 4 <= sum(served) <= 28  # a fresh draw per access
    plain = QualityDataset(processor, tiny_data / "train.json")
    assert all(e.text_first_ids is None for e in plain.entries)
    with pytest.raises(ValueError, match="text_first_fraction"):
        QualityDataset(processor, tiny_data / "train.json", text_first_fraction=1.5)


# ------------------------------------------------------------------------------------------------- configs
def test_presets_and_overrides() -> None:
    released = load_config("released", "stage2", ["model_path=m", "learning_rate=1e-4", "deepspeed=null"])
    assert released.learning_rate == 1e-4 and released.deepspeed is None and released.num_train_epochs == 10
    assert load_config("released", "stage1").accumulation_steps(8) == 2  # 512 = 32 x 2 x 8
    with pytest.raises(ValueError, match="not a multiple"):
        load_config("released", "stage1").accumulation_steps(3)
    with pytest.raises(ValueError, match="unknown stage2 option"):
        load_config("world", "stage2", {"learning_rat": 1.0})
    with pytest.raises(ValueError, match="unknown training preset"):
        load_config("nope", "stage1")
    bad = {"model_path": "m", "output_dir": "o", "data_path": "d", "eval_data_path": "v"}
    with pytest.raises(ValueError, match="text_first_fraction"):
        load_config("world", "stage2", {**bad, "text_first_fraction": -0.1}).validate()


# ------------------------------------------------------------------------------------------------- training
def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stage2_freezing_keeps_frozen_weights(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    from unifilter_core.modeling import UniFilterForQualityScoring

    config = _stage2_config(
        tiny_checkpoint, tiny_data, tmp_path / "out", freeze_vision_tower=True, freeze_llm=True
    )
    before = _tensors(UniFilterForQualityScoring.from_pretrained(tiny_checkpoint))
    out = train_stage2(config)
    after = _tensors(UniFilterForQualityScoring.from_pretrained(out))
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        trainable = key.startswith(("model.mm_projector.", "score."))
        if key.startswith(("model.vision_tower.", "model.language_model.")):
            assert not changed, key
        elif trainable and key.endswith("weight"):
            assert changed, key


def test_stage2_resume_and_load_scorer(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    from unifilter_core.scorer import load_scorer
    from unifilter_core.training.evaluate import evaluate_checkpoint

    out = tmp_path / "out"
    train_stage2(_stage2_config(tiny_checkpoint, tiny_data, out, max_steps=2))
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    resumed = train_stage2(_stage2_config(tiny_checkpoint, tiny_data, out, max_steps=4), resume=True)
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["global_steps"] == 4
    assert [h["step"] for h in metrics["history"]] == [2, 4]  # the history of the first run is kept
    assert {"accuracy", "spearman", "macro_f1", "confusion_matrix"} <= set(metrics["best"])
    assert not (resumed / "training_args.bin").exists()

    scorer = load_scorer(resumed)
    report = evaluate_checkpoint(resumed, tiny_data / "val.json")
    from PIL import Image

    image = Image.open(tiny_data / "images" / "0.png")
    records = json.loads((tiny_data / "val.json").read_text())
    text = records[0]["text"].removeprefix("<image>\n")
    [result] = scorer.score_captions([(image, text)])
    assert result.status == "ok"
    assert report["n"] == 16


def test_stage1_saves_projector_with_released_keys(
    tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from unifilter_core.modeling import UniFilterForQualityScoring

    config = load_config(None, "stage1", {
        "model_path": str(tiny_checkpoint), "output_dir": str(tmp_path / "s1"),
        "data_path": str(tiny_data / "pretrain.json"), "per_device_train_batch_size": 4, "max_steps": 3,
        "learning_rate": 1e-2, "warmup_ratio": 0.0, "logging_steps": 1,
    })  # fmt: skip
    out = train_stage1(config)
    state = load_file(str(out / "mm_projector.safetensors"))
    assert sorted(state) == [
        f"model.mm_projector.mlp_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")
    ]
    assert not (out / "model.safetensors").exists()  # only the projector trained
    init = UniFilterForQualityScoring.from_pretrained(tiny_checkpoint).state_dict()
    assert not torch.equal(
        state["model.mm_projector.mlp_projector.0.weight"], init["model.mm_projector.mlp_projector.0.weight"]
    )

    s2 = _stage2_config(tiny_checkpoint, tiny_data, tmp_path / "s2", projector_path=str(out / "mm_projector.safetensors"),
                        learning_rate=1e-9, freeze_projector=True, max_steps=1)  # fmt: skip
    trained = UniFilterForQualityScoring.from_pretrained(train_stage2(s2)).state_dict()
    assert torch.equal(
        trained["model.mm_projector.mlp_projector.0.weight"],
        state["model.mm_projector.mlp_projector.0.weight"],
    )


def test_stage1_full_checkpoint_has_no_lm_head(
    tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from unifilter_core.cli import main

    out = tmp_path / "s1"
    code = main([
        "train", "stage1", "--config", "world", "--set", f"model_path={tiny_checkpoint}", "--set", f"output_dir={out}",
        "--set", f"data_path={tiny_data / 'pretrain.json'}", "--set", "max_steps=2",
        "--set", "per_device_train_batch_size=4", "--set", "torch_threads=null",
    ])  # fmt: skip
    assert code == 0
    keys = load_file(str(out / "model.safetensors")).keys()
    assert not any("lm_head" in k for k in keys)
    assert "model.embed_tokens.weight" in keys
    assert (out / "vocab.json").is_file() and (out / "stage1_metrics.json").is_file()
