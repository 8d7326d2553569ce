"""Preprocessing follows the vision tower's image-processor config (SigLIP2: bilinear), presets carry the values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_scorer import CAPTIONS, SENTINEL, Reference
from unifilter_core import load_scorer
from unifilter_core.modeling import config_class_for, load_preset
from unifilter_core.processing import ProcessingConfig, UniFilterProcessor

BILINEAR, BICUBIC = 2, 3


def pixels(image: Image.Image, size: int, resample: int, mean=(0.5,) * 3, std=(0.5,) * 3) -> torch.Tensor:
    """RGB -> pad to a square of colour int(mean * 255) -> PIL ``resample`` -> /255 -> (x - mean) / std."""
    img = image.convert("RGB")
    w, h = img.size
    square = Image.new("RGB", (max(w, h),) * 2, tuple(int(m * 255) for m in mean))
    square.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    arr = np.asarray(square.resize((size, size), resample)).astype(np.float64) / 255.0
    arr = (arr - np.asarray(mean)) / np.asarray(std)
    return torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1)


@pytest.fixture(scope="module")
def siglip2_checkpoint(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny llava_qwen3 checkpoint whose tower folder's preprocessor_config.json says ``resample: 2``."""
    from unifilter_core.modeling import init_checkpoint

    out = Path(
        init_checkpoint(
            "tiny-qwen3", tmp_path_factory.mktemp("siglip2"), tokenizer_dir=tiny_tokenizer_dir, seed=4,
            vision_tower_dir="siglip2-tower",
        )
    )  # fmt: skip
    processor_file = out / "siglip2-tower" / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text())
    processor_file.write_text(json.dumps({**processor, "resample": BILINEAR}))
    return out


def test_siglip2_checkpoint_scores_like_bilinear_reference(
    siglip2_checkpoint: Path, tiny_tokenizer, make_image
):
    ref = Reference(siglip2_checkpoint)
    size = ref.cfg["vision_config"]["image_size"]
    scorer = load_scorer(siglip2_checkpoint, dtype="float32")
    assert scorer.processor.config.resample == BILINEAR
    tok = tiny_tokenizer
    images = [make_image(45 + 9 * i, 23 + 5 * i, seed=i) for i in range(len(CAPTIONS))]
    got = [r.score for r in scorer.score_captions(list(zip(images, CAPTIONS, strict=True)))]
    expected, bicubic = [], []
    for image, caption in zip(images, CAPTIONS, strict=True):
        ids = [tok.bos_token_id, SENTINEL, *tok("\n" + caption, add_special_tokens=False)["input_ids"]]
        ids.append(tok.eos_token_id)
        expected.append(ref.score(ids, pixels(image, size, BILINEAR)[None]))
        bicubic.append(ref.score(ids, pixels(image, size, BICUBIC)[None]))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.max(np.abs(np.array(bicubic) - expected)) > 1e-4, "bicubic would have passed: test cannot fail"


def test_checkpoint_folder_processor_config_wins_over_the_tower_name(
    tmp_path: Path, tiny_qwen3_checkpoint: Path
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen3_checkpoint, ckpt)
    assert load_scorer(ckpt).processor.config.resample == BICUBIC  # no processor config anywhere: SigLIP's
    processor = {"resample": BILINEAR, "image_mean": [0.4, 0.45, 0.5], "image_std": [0.2, 0.25, 0.3]}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(processor))
    config = load_scorer(ckpt).processor.config
    assert (config.resample, config.image_mean, config.image_std) == (
        BILINEAR,
        (0.4, 0.45, 0.5),
        (0.2, 0.25, 0.3),
    )
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 384, "width": 384}}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json resizes to .*384.* takes 32x32"):
        load_scorer(ckpt)


@pytest.mark.parametrize(
    ("tower", "resample"),
    [
        ("google/siglip2-so400m-patch14-384", BILINEAR),
        ("google/siglip-so400m-patch14-384", BICUBIC),
        ("some/unknown-tower", BICUBIC),
    ],
)
def test_known_tower_names_carry_their_preprocessing(tower: str, resample: int) -> None:
    flat = {**load_preset("tiny-qwen3"), "mm_vision_tower": tower}
    config = ProcessingConfig.from_model_config(config_class_for("llava_qwen3")(**flat))
    assert (config.resample, config.rescale_factor, config.image_mean) == (resample, 1 / 255, (0.5,) * 3)


def test_presets_hold_the_towers_processor_values() -> None:
    assert load_preset("siglip-so400m-patch14-384")["image_processor"]["resample"] == BICUBIC
    assert load_preset("siglip2-so400m-patch14-384")["image_processor"]["resample"] == BILINEAR
    qwen3 = load_preset("released-qwen3-0.6b")
    assert (qwen3["vocab_size"], qwen3["pad_token_id"], qwen3["bos_token_id"]) == (151936, 151643, 151643)
    assert qwen3["mm_vision_tower"] == "google/siglip2-so400m-patch14-384"


def test_processor_uses_mean_std_and_filter(tiny_tokenizer, make_image) -> None:
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    config = ProcessingConfig(
        image_size=32, num_image_tokens=4, resample=BILINEAR, image_mean=mean, image_std=std
    )
    image = make_image(40, 17, seed=3)
    got = UniFilterProcessor(tiny_tokenizer, config).preprocess_image(image)
    torch.testing.assert_close(got, pixels(image, 32, BILINEAR, mean, std), rtol=0, atol=1e-5)
    assert config.pad_color == (122, 117, 104)
    with pytest.raises(ValueError, match="resample"):
        ProcessingConfig(resample=9)
    with pytest.raises(ValueError, match="image_std"):
        ProcessingConfig(image_std=(0.5, 0.0, 0.5))
