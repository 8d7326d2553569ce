"""Shared helpers of the modeling tests: tiny checkpoints, batches with image sentinels, a reference forward."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from unifilter_core.modeling import (
    IMAGE_TOKEN_INDEX,
    UniFilterForQualityScoring,
    init_checkpoint,
)

VISION = "model.vision_tower.vision_tower.vision_model."
PRESETS = {"llava_qwen": "tiny", "llava_qwen3": "tiny-qwen3"}
IMG = IMAGE_TOKEN_INDEX


def make_ckpt(tmp_path: Path, preset: str = "tiny", name: str = "ckpt", **kw) -> Path:
    return init_checkpoint(preset, tmp_path / name, seed=kw.pop("seed", 0), **kw)


def edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (path / "config.json").write_text(json.dumps(raw))


def random_pixels(n: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def sample_rows() -> list[list[int]]:
    """Mixed lengths, 1-3 images per row, sentinels at start/middle/end positions."""
    return [
        [597, IMG, 10, 11, 12, 598],
        [597, IMG, 5, IMG, 7, 8, 9, 10, 11, 12, 13, 598],
        [597, 3, IMG, IMG, 4, IMG, 598],
        [597, IMG, 598],
    ]


def pad_batch(rows: list[list[int]], pad: int = 599) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def reference_logits(model: UniFilterForQualityScoring, row: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """One unpadded sample, computed from plain parts: SigLIP hidden_states[-1] -> adaptive pool -> MLP ->
    Qwen body on inputs_embeds -> last position -> linear."""
    tower, mlp = model.model.vision_tower, model.model.mm_projector.mlp_projector
    lm, k = model.model.language_model, model.config.num_image_tokens
    feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # (N, P, C)
    n, p, c = feats.shape
    g = int(p**0.5)
    grid = feats.permute(0, 2, 1).reshape(n, c, g, g)
    pooled = F.adaptive_avg_pool2d(grid, int(k**0.5)).reshape(n, c, k).permute(0, 2, 1)
    hidden_in = F.gelu(F.linear(pooled, mlp[0].weight, mlp[0].bias))  # exact (erf) GELU
    images = iter(F.linear(hidden_in, mlp[2].weight, mlp[2].bias))
    pieces = [next(images) if t == IMG else lm.embed_tokens(torch.tensor([t])) for t in row]
    embeds = torch.cat(pieces)[None]  # (1, L, H)
    hidden = lm(inputs_embeds=embeds).last_hidden_state[0, -1]
    return (hidden.float() @ model.score.weight.float().T)[None]


def per_row_pixels(rows: list[list[int]], pixels: torch.Tensor) -> list[torch.Tensor]:
    out, start = [], 0
    for row in rows:
        n = row.count(IMG)
        out.append(pixels[start : start + n])
        start += n
    return out


def load_and_score(path: Path, **kw) -> torch.Tensor:
    model = UniFilterForQualityScoring.from_pretrained(path, **kw)
    ids, mask = pad_batch(sample_rows()[:1])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(1)).logits
