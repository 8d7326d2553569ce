"""Training records as the original reads them: float labels for regression, image paths relative to image_folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from unifilter_core.processing import ProcessingConfig, UniFilterProcessor
from unifilter_core.training.data import Collator, QualityDataset, resolve_image_folder


@pytest.fixture
def processor(tiny_tokenizer) -> UniFilterProcessor:
    return UniFilterProcessor(
        tiny_tokenizer, ProcessingConfig(image_size=32, num_image_tokens=4, max_length=256)
    )


def _write(folder: Path, names: list[str], records: list[dict]) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (200, 30, 30)).save(folder / name)
    (folder / "train.json").write_text(json.dumps(records))
    return folder / "train.json"


def test_float_labels_train_the_regression_head(tmp_path: Path, processor) -> None:
    records = [
        {"image": f"{i}.png", "text": "<image>\na cube", "label": label}
        for i, label in enumerate([2.5, 0, 3.0])
    ]
    data = QualityDataset(processor, _write(tmp_path, ["0.png", "1.png", "2.png"], records))
    assert data.labels() == [2.5, 0, 3.0] and not data.failures
    batch = Collator(processor.tokenizer.pad_token_id, float_labels=True)([data[i] for i in range(3)])
    assert batch["labels"].tolist() == [2.5, 0.0, 3.0]
    with pytest.raises(ValueError, match=r"labels \[2\.5\] are not integers: a classification head"):
        Collator(processor.tokenizer.pad_token_id, float_labels=False)([data[i] for i in range(3)])
    integral = Collator(processor.tokenizer.pad_token_id, float_labels=False)([data[1], data[2]])
    assert integral["labels"].tolist() == [0, 3]


@pytest.mark.parametrize("bad", [-0.5, 3.5, float("nan"), "2", True])
def test_labels_out_of_range_are_failures(tmp_path: Path, processor, bad) -> None:
    records = [
        {"image": "0.png", "text": "<image>\nok", "label": 1},
        {"image": "0.png", "text": "<image>\nx", "label": bad},
    ]
    data = QualityDataset(processor, _write(tmp_path, ["0.png"], records))
    assert len(data) == 1 and "is not a number in 0..3" in json.dumps(data.failure_summary())


def test_paths_follow_image_folder_and_an_unrelated_images_dir_changes_nothing(
    tmp_path: Path, processor
) -> None:
    records = [{"image": "pics/0.png", "text": "<image>\na", "label": 1}]
    path = _write(tmp_path, ["pics/0.png"], records)
    (tmp_path / "images").mkdir()  # an unrelated folder: used to redirect every path (and fail every sample)
    data = QualityDataset(processor, path)
    assert data.entries[0].images == (str(tmp_path / "pics/0.png"),)
    assert data[0] is not None and not data.failures
    other = tmp_path / "elsewhere"
    _write(other, ["0.png"], [])
    (tmp_path / "train.json").write_text(json.dumps([{"image": "0.png", "text": "<image>\na", "label": 1}]))
    assert QualityDataset(processor, path, image_folder=other).entries[0].images == (str(other / "0.png"),)


def test_missing_first_image_is_a_clear_error(tmp_path: Path, processor) -> None:
    path = _write(tmp_path, [], [{"image": "gone.png", "text": "<image>\na", "label": 1}])
    with pytest.raises(
        ValueError, match=r"first record's image 'gone.png' is not at .*gone.png.*pass the folder"
    ):
        QualityDataset(processor, path)
    with pytest.raises(ValueError, match=r"is not at .*/nowhere/gone.png"):
        QualityDataset(processor, path, image_folder=tmp_path / "nowhere")


def test_synthetic_layout_under_images_still_resolves(tmp_path: Path) -> None:
    _write(tmp_path / "images", ["a.png"], [])
    assert resolve_image_folder(tmp_path / "train.json", None, "a.png") == tmp_path / "images"
    assert resolve_image_folder(tmp_path / "train.json", None, None) == tmp_path
