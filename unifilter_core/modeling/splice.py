"""Splicing image features into the text embeddings (the padded layout every forward starts from)."""

from __future__ import annotations

import torch
from torch import nn


def splice_image_features(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_features: torch.Tensor | None,
    embed_tokens: nn.Module,
    image_token_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each image sentinel by that image's feature vectors (images consumed in row-major order).

    Args:
        input_ids: ``[B, T]`` ids with ``image_token_index`` at image positions, right padded.
        attention_mask: ``[B, T]`` 1 for real tokens (a prefix of each row), 0 for padding.
        image_features: ``[N, K, H]`` projected features, N = number of sentinels in the real tokens.
        embed_tokens: the text embedding table.
        image_token_index: the sentinel id (-200).

    Returns:
        ``(inputs_embeds [B, L, H], attention_mask [B, L])``, right padded with zeros, L = longest spliced row.

    Raises:
        ValueError: when the mask is not right padding or the sentinel and image counts differ.
    """
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions[None, :] < lengths[:, None]):
        raise ValueError("attention_mask must be right padding: ones for the real tokens, then zeros")
    is_image = (input_ids == image_token_index) & mask
    n_sentinels = int(is_image.sum())
    n_images = 0 if image_features is None else image_features.shape[0]
    if n_sentinels != n_images:
        raise ValueError(
            f"input_ids hold {n_sentinels} image sentinels ({image_token_index}) but {n_images} images were "
            "given; pass exactly one image per sentinel, in the order the sentinels appear row by row"
        )
    safe_ids = torch.where(
        is_image | ~mask, torch.zeros_like(input_ids), input_ids
    )  # pad ids may be anything
    text_embeds = embed_tokens(safe_ids)  # (B, T, H)
    k = 0 if image_features is None else image_features.shape[1]
    widths = torch.where(is_image, k, 1) * mask  # tokens each position expands to
    starts = torch.cumsum(widths, dim=1) - widths  # (B, T) output position of each input token
    new_lengths = widths.sum(dim=1)
    out_len = int(new_lengths.max()) if new_lengths.numel() else 0
    batch, _, hidden = text_embeds.shape
    embeds = text_embeds.new_zeros(batch, out_len, hidden)
    text_pos = mask & ~is_image
    rows = torch.arange(batch, device=input_ids.device)[:, None].expand_as(input_ids)
    embeds[rows[text_pos], starts[text_pos]] = text_embeds[text_pos]
    if n_images:
        img_rows = rows[is_image][:, None].expand(-1, k)  # (N, K)
        img_cols = starts[is_image][:, None] + torch.arange(k, device=input_ids.device)  # (N, K)
        embeds[img_rows, img_cols] = image_features.to(embeds.dtype)
    new_mask = torch.arange(out_len, device=input_ids.device)[None, :] < new_lengths[:, None]
    return embeds, new_mask.to(attention_mask.dtype)
