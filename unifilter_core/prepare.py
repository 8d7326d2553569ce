"""Model-input building shared by scoring and training, so that the two cannot drift apart.

:class:`~unifilter_core.processing.UniFilterProcessor` (the scorer's input path) and the training datasets
(:mod:`unifilter_core.training.data`) both build ids, cut them and preprocess images through the functions here:

* :func:`caption_ids`: the caption layout ``[BOS, -200, tokens("\\n" + caption)..., EOS]``;
* :func:`cap_ids` / :func:`fit_ids` (:func:`cap_and_fit`): the caption limit and the ``max_length`` fit, EOS kept,
  images never cut;
* :func:`prepare_image`: untrusted bytes -> the hardened decoder (:func:`unifilter_core.data.images.decode_image`,
  format allow-list and pixel limit) -> the processor's cost check and preprocessing, what the scoring readers do;
* :func:`right_pad`: ``[B, T]`` right-padded ids and the mask from lengths (scorer and training collators).

The image sentinel constants live here: :mod:`unifilter_core.processing` imports this module (and re-exports
them). The functions take any object with the processor's interface (:class:`InputProcessor`), so this module
imports nothing of the processor's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from unifilter_core.data.images import decode_image as decode_untrusted
from unifilter_core.data.limits import ReaderLimits
from unifilter_core.records import SampleFailure

IMAGE_TOKEN_INDEX = -200  # sentinel id replaced by an image's projected vectors
IMAGE_TOKEN = "<image>"


class InputProcessor(Protocol):
    """What input building needs of :class:`~unifilter_core.processing.UniFilterProcessor`."""

    bos_id: int
    eos_id: int
    config: Any  # ``max_length`` and ``num_image_tokens``

    def tokenize(self, text: str) -> list[int]: ...

    def too_large(self, image: Any) -> SampleFailure | None: ...

    def preprocess_image(self, image: Any) -> torch.Tensor: ...


def caption_ids(processor: InputProcessor, caption: str, cap: int | None) -> tuple[list[int], bool]:
    """``[BOS, -200, tokens("\\n" + caption)..., EOS]`` (a literal ``<image>`` in the caption -> ``image``), cut to
    ``cap`` ids then to ``max_length`` (:func:`cap_and_fit`): the scorer's captions and stage-1 training records.

    Returns:
        (ids, truncated)
    """
    text = "\n" + caption.replace(IMAGE_TOKEN, "image")
    ids = [processor.bos_id, IMAGE_TOKEN_INDEX, *processor.tokenize(text), processor.eos_id]
    return cap_and_fit(processor, ids, cap)


def cap_and_fit(processor: InputProcessor, ids: list[int], cap: int | None) -> tuple[list[int], bool]:
    """:func:`cap_ids` with ``cap`` (None: no limit), then :func:`fit_ids` to the processor's ``max_length``.

    Returns:
        (ids, truncated)
    """
    capped, cut = cap_ids(ids, cap, processor.eos_id)
    fitted, _ = fit_ids(capped, processor.config.max_length, processor.config.num_image_tokens)
    return fitted, cut or len(fitted) < len(capped)


def cap_ids(ids: list[int], cap: int | None, eos_id: int) -> tuple[list[int], bool]:
    """Cut ``ids`` to ``cap`` ids keeping the final EOS (None: no limit).

    Returns:
        (ids, truncated)
    """
    if cap is not None and len(ids) > cap:
        return ids[: cap - 1] + [eos_id], True
    return ids, False


def fit_ids(ids: list[int], max_length: int, num_image_tokens: int) -> tuple[list[int], int]:
    """Cut ``[BOS, body..., EOS]`` so its spliced length (each sentinel ``num_image_tokens``) fits ``max_length``,
    keeping BOS and EOS and never cutting an image's tokens in half (the body stops at the first token that does
    not fit).

    Returns:
        The ids and the number of images (sentinels) kept.
    """
    budget = max_length - 2  # BOS and EOS
    body, used, n_images = [], 0, 0
    for token in ids[1:-1]:
        cost = num_image_tokens if token == IMAGE_TOKEN_INDEX else 1
        if used + cost > budget:
            break
        body.append(token)
        used += cost
        n_images += token == IMAGE_TOKEN_INDEX
    return [ids[0], *body, ids[-1]], n_images


def prepare_image(
    processor: InputProcessor, data: bytes, limits: ReaderLimits | None = None
) -> torch.Tensor | SampleFailure:
    """Untrusted encoded image -> ``[3, H, W]`` float32 model input, or why not (never raises on bad data).

    Decodes with the readers' hardened decoder (allowed formats, ``limits.max_pixels`` before decoding, lying
    JPEG headers, alpha composited per ``limits.alpha``), then refuses what the processor's cost check refuses
    (``image_too_large``, :meth:`~unifilter_core.processing.UniFilterProcessor.too_large`) and preprocesses with
    :meth:`~unifilter_core.processing.UniFilterProcessor.preprocess_image`: the path a scored image takes.
    """
    image = decode_untrusted(data, limits or ReaderLimits())
    if isinstance(image, SampleFailure):
        return image
    too_large = processor.too_large(image)
    if too_large is not None:
        return too_large
    return processor.preprocess_image(image)


def right_pad(
    rows: Sequence[Sequence[int]], pad_value: int, *, length: int | None = None, pin_memory: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id rows into ``[B, T]`` long tensors.

    Args:
        rows: the id sequences (at least one).
        pad_value: value after each row's end (a pad id, or ``-100`` for label rows).
        length: ``T``; the longest row when None.
        pin_memory: allocate in pinned host memory (for non-blocking copies to a GPU).

    Returns:
        (values, mask): ``mask`` is 1 on each row's first ``len(row)`` positions, 0 after (from lengths, never
        from the pad value).
    """
    length = max(len(r) for r in rows) if length is None else length
    values = torch.full((len(rows), length), pad_value, dtype=torch.long, pin_memory=pin_memory)
    mask = torch.zeros((len(rows), length), dtype=torch.long, pin_memory=pin_memory)
    for row, ids in enumerate(rows):
        values[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, : len(ids)] = 1
    return values, mask
