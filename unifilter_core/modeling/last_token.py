"""Scoring forward that computes only what the score head reads.

The head reads one vector per sequence: the final-normed hidden state of its last real token. In the last decoder
layer only that token's row matters, so :func:`last_token_hidden` runs the first ``n - 1`` layers on every token
and the last layer on the last token alone (its keys and values still come from every token): the last layer's
query projection, attention output, output projection and MLP shrink from ``L`` rows to one. On the ``world``
preset (3 layers) that is about 30% of the LLM's work; on the released 28-layer model about 3%.

Padding costs nothing in correctness here: batches are right padded, so a causal mask alone never lets a real
token see a padding token (padding only follows the real tokens). The first layers therefore run with
``is_causal`` attention and no padding mask (SDPA's fastest path on CPU); padding rows carry finite values that no
real token reads.

Used through ``UniFilterForQualityScoring.forward(..., last_token_only=True)``: by the scorer, and by stage-2
training (the loss reads the same vectors; gradients equal the full forward's to float rounding). Supported: Qwen2
and Qwen3 bodies without sliding-window layers, attention ``sdpa``, ``eager`` or ``flash_attention_2``, in
training only without attention dropout. Anything else takes the full forward (:func:`supports_last_token`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.qwen2.modeling_qwen2 import rotate_half  # Qwen3's is the same function

_BODIES = ("Qwen2Model", "Qwen3Model")
_ATTENTIONS = ("sdpa", "eager", "flash_attention_2")


def supports_last_token(model: Any) -> bool:
    """Whether :func:`last_token_hidden` can run ``model``'s LLM (else use the full forward)."""
    lm = model.model.language_model
    config = lm.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return (
        type(lm).__name__ in _BODIES
        and getattr(config, "_attn_implementation", None) in _ATTENTIONS
        and all(t == "full_attention" for t in layer_types)
        and len(lm.layers) == config.num_hidden_layers
        and config.num_hidden_layers >= 1
        # in training the first layers keep their attention dropout and the last layer has none: equal only at 0
        and (not model.training or float(getattr(config, "attention_dropout", 0.0) or 0.0) == 0.0)
    )


def _causal_mask(length: int, implementation: str, like: torch.Tensor) -> torch.Tensor | None:
    if implementation != "eager":
        return None  # sdpa and flash-attn run causally when no mask is given
    blocked = torch.ones(length, length, dtype=torch.bool, device=like.device).triu(1)
    mask = torch.zeros(length, length, dtype=like.dtype, device=like.device)
    return mask.masked_fill(blocked, torch.finfo(like.dtype).min)[None, None]


def _layer(layer: Any, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _last_layer_at(
    layer: Any, hidden: torch.Tensor, last: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The last decoder layer's output at each row's ``last`` token: ``[B, H]`` (before the final norm)."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    rows = torch.arange(batch, device=hidden.device)
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)  # (B, L, H): keys and values need every token
    x_last = x[rows, last]  # (B, H)
    q = attn.q_proj(x_last).view(batch, 1, -1, head_dim)
    k = attn.k_proj(x).view(batch, length, -1, head_dim)
    v = attn.v_proj(x).view(batch, length, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's vector
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, len, D)
    cos_q, sin_q = cos[rows, last][:, None, None, :], sin[rows, last][:, None, None, :]
    q = q * cos_q + rotate_half(q) * sin_q
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    keys = torch.arange(length, device=hidden.device)
    visible = (keys[None, :] <= last[:, None])[:, None, None, :]  # (B, 1, 1, L): the real tokens
    scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, heads, 1, L): one query, a plain softmax
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    out = weights @ v  # (B, heads, 1, D)
    h = hidden[rows, last] + attn.o_proj(out.transpose(1, 2).reshape(batch, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def last_token_hidden(
    lm: Any, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """``[B, H]`` final-normed hidden states at each row's ``last`` token, equal to the body's full forward (to
    float rounding), with the last decoder layer run on those tokens only. Works under autograd (stage-2
    training) and ``inference_mode``.

    Args:
        lm: the language model body of a model for which :func:`supports_last_token` holds.
        inputs_embeds: ``[B, L, H]`` spliced embeddings, right padded.
        position_ids: ``[B, L]``.
        last: ``[B]`` index of each row's last real token.
    """
    hidden = inputs_embeds
    cos, sin = lm.rotary_emb(hidden, position_ids)
    causal = _causal_mask(hidden.shape[1], lm.config._attn_implementation, hidden)
    for layer in lm.layers[:-1]:
        hidden = _layer(
            layer, hidden, attention_mask=causal, position_ids=position_ids, position_embeddings=(cos, sin)
        )
    return lm.norm(_last_layer_at(lm.layers[-1], hidden, last, cos, sin))
