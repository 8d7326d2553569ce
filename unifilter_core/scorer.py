"""The public scoring API: ``load_scorer(path) -> Scorer``; ``Scorer.score_captions`` / ``score_documents``.

Example::

    from unifilter_core import load_scorer
    scorer = load_scorer("path/to/checkpoint", device="cpu", dtype="float32")
    results = scorer.score_captions([(pil_image, "a caption")])
    results = scorer.score_documents([{"texts": ["intro", None], "images": [None, png_bytes]}])
    results[0].score, results[0].status, results[0].reason

Scores are independent of batching: sequences are right padded, the attention mask comes from the lengths (never
from ``ids != pad``) and the score is read at the last real position. Inputs that cannot be scored come back as
rows with a reason code (``ScoreResult.status`` ``skipped`` or ``error``), in input order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from unifilter_core.fileio import sha256_file
from unifilter_core.head_scores import LabelScore, label_scores
from unifilter_core.hub_cache import resolve_reference
from unifilter_core.prepare import right_pad
from unifilter_core.processing import (
    IMAGE_TOKEN_INDEX,
    AspectMode,
    PreparedSample,
    ProcessingConfig,
    UniFilterProcessor,
    normalize_aspect,
)
from unifilter_core.records import Reason, SampleFailure, ScoreResult

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# samples prepared ahead of the model per window (window = batch_size * this); bounds host memory for images
_WINDOW_BATCHES = 8


@dataclass(frozen=True)
class ScorerOptions:
    """Validated options of :func:`load_scorer` (see there for their meaning)."""

    device: str = "cpu"
    dtype: str = "float32"
    image_aspect_ratio: str | None = None
    batch_size: int = 16
    caption_max_tokens: int | None = 75
    max_images: int | None = 10
    max_text_tokens: int | None = 6000
    max_length: int | None = None
    vision_tower: str | None = None
    attn_implementation: str = "sdpa"
    packing: bool | str = False
    packed_attention: str = "varlen"
    vision_batch_size: int | None = None
    compile_vision: str | None = None
    pin_memory: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device {self.device!r} is not a valid torch device string (e.g. 'cpu', 'cuda:0')"
            ) from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r} requested but CUDA is not available here; use device='cpu'"
            )
        aspects = [m.value for m in AspectMode]
        object.__setattr__(self, "image_aspect_ratio", normalize_aspect(self.image_aspect_ratio))
        if self.image_aspect_ratio is not None and self.image_aspect_ratio not in aspects:
            raise ValueError(
                f"image_aspect_ratio must be None (follow the checkpoint) or one of {aspects} "
                f"(or 'square', LLaVA's name for resize), got {self.image_aspect_ratio!r}"
            )
        for name, low in (
            ("caption_max_tokens", 3),
            ("max_images", 0),
            ("max_text_tokens", 2),
            ("max_length", 3),
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"{name} must be None or an int >= {low}, got {value!r}")
        _check_gpu_options(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _check_gpu_options(options: ScorerOptions) -> None:
    """Validate the performance options (packing, vision batching/compilation, pinned memory)."""
    from unifilter_core.modeling.packing import PACKED_ATTENTIONS

    if options.packing not in (True, False, "auto"):
        raise ValueError(f"packing must be True, False or 'auto', got {options.packing!r}")
    if options.packed_attention.partition(":")[0] not in PACKED_ATTENTIONS:
        raise ValueError(
            f"packed_attention must be one of {PACKED_ATTENTIONS} (or 'varlen:<kernel>'), got {options.packed_attention!r}"
        )
    vbs = options.vision_batch_size
    if vbs is not None and (not isinstance(vbs, int) or isinstance(vbs, bool) or vbs < 1):
        raise ValueError(f"vision_batch_size must be None or an int >= 1, got {vbs!r}")
    modes = (None, "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if options.compile_vision not in modes:
        raise ValueError(f"compile_vision must be one of {modes}, got {options.compile_vision!r}")
    if options.pin_memory not in (None, True, False):
        raise ValueError(
            f"pin_memory must be None (auto: on for CUDA), True or False, got {options.pin_memory!r}"
        )


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a checkpoint folder (released layout or ours: both hold ``config.json``).

    ``path`` may be a hub id (``owner/name``, the original README's form) of a model in the local Hugging Face
    cache (``HF_HUB_CACHE`` / ``HF_HOME``); nothing is downloaded (see :mod:`unifilter_core.hub_cache`).

    Raises:
        ValueError: the folder or its ``config.json`` is missing, or ``config.json`` is not a UniFilter config;
            a hub id that is not cached (the message gives the download command).
    """
    folder = resolve_reference(path, what="checkpoint")
    if folder.is_file() and folder.name == "config.json":
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(
            f"checkpoint folder {str(folder)!r} does not exist (give the folder holding config.json)"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json; is it a UniFilter checkpoint folder?")
    from unifilter_core.modeling.checkpoint import read_config_json

    model_type = read_config_json(config_file).get("model_type")
    if model_type not in ("llava_qwen", "llava_qwen3"):
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; expected 'llava_qwen' or 'llava_qwen3'"
        )
    return folder.resolve()


# ---------------------------------------------------------------------------------------------------- fingerprint
_DIGEST_CACHE: dict[tuple[str, int, int], str] = {}
_DIGEST_LOCK = threading.Lock()


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed; cached in memory per (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _DIGEST_LOCK:
        if key in _DIGEST_CACHE:
            return _DIGEST_CACHE[key]
    digest = sha256_file(path, chunk_size)
    with _DIGEST_LOCK:
        _DIGEST_CACHE[key] = digest
    return _DIGEST_CACHE[key]


def checkpoint_fingerprint(folder: Path, extra_dirs: Iterable[Path] = ()) -> str:
    """sha256 over ``config.json``, the safetensors weight files and the tokenizer files of a checkpoint.

    Args:
        folder: the checkpoint folder.
        extra_dirs: more folders whose config.json + safetensors count (e.g. a separately given vision tower).

    Returns:
        A hex digest that changes whenever any byte of those files changes.
    """
    total = hashlib.sha256()
    for index, directory in enumerate([folder, *extra_dirs]):
        names = ["config.json", *sorted(p.name for p in directory.glob("*.safetensors"))]
        names += [n for n in _TOKENIZER_FILES if index == 0]
        for name in names:
            file = directory / name
            if file.is_file():
                total.update(f"{index}/{name}\0{file_sha256(file)}\n".encode())
    return total.hexdigest()


# ---------------------------------------------------------------------------------------------------- scorer
class Scorer:
    """A loaded UniFilter model plus its processor.

    Attributes:
        model: the ``UniFilterForQualityScoring`` (eval mode, on ``device``, in ``dtype``).
        processor: the CPU-side, picklable :class:`UniFilterProcessor`.
        options: the validated :class:`ScorerOptions`.
        checkpoint: the checkpoint folder.
    """

    def __init__(
        self, model: Any, processor: UniFilterProcessor, options: ScorerOptions, checkpoint: Path
    ) -> None:
        self.model = model
        self.processor = processor
        self.options = options
        self.checkpoint = checkpoint
        self.device = torch.device(options.device)
        self.pad_id = int(processor.tokenizer.pad_token_id)
        self._fingerprint: str | None = None
        self._packing: bool | None = None  # resolved on first forward ("auto" probes the device's kernels)
        pin = options.pin_memory
        self._pin = (self.device.type == "cuda") if pin is None else bool(pin) and torch.cuda.is_available()

    @property
    def uses_packing(self) -> bool:
        """Whether :meth:`forward` packs the batch into one row (``packing="auto"``: when a fast varlen attention
        kernel works on this device, i.e. flash-attn or torch's varlen kernel on CUDA)."""
        if self._packing is None:
            if self.options.packing == "auto":
                from unifilter_core.modeling.packing import fast_varlen_available

                self._packing = fast_varlen_available(self.device)
                logger.info("packing=auto -> %s on %s", self._packing, self.device)
            else:
                self._packing = bool(self.options.packing)
        return self._packing

    @property
    def model_fingerprint(self) -> str:
        """sha256 of the checkpoint's config, weights and tokenizer (computed once, on first use)."""
        if self._fingerprint is None:
            extra = [Path(self.options.vision_tower)] if self.options.vision_tower else []
            self._fingerprint = checkpoint_fingerprint(self.checkpoint, [d for d in extra if d.is_dir()])
        return self._fingerprint

    # ------------------------------------------------------------------------------------------------ preparation
    def prepare_caption(self, image: Any, text: str | None) -> PreparedSample | SampleFailure:
        return self.processor.prepare_caption(image, text)

    def prepare_document(self, texts: list[str | None], images: list[Any]) -> PreparedSample | SampleFailure:
        return self.processor.prepare_document(texts, images)

    # ------------------------------------------------------------------------------------------------ model
    def _collate(self, samples: Sequence[PreparedSample]) -> dict[str, torch.Tensor | None]:
        """Right-pad ids to ``[B, T]``, mask ``[B, T]`` from lengths, pixel values ``[N, 3, H, W]`` in order."""
        pixels = []
        for row, sample in enumerate(samples):
            n_sentinels = sum(1 for t in sample.input_ids if t == IMAGE_TOKEN_INDEX)
            n_pixels = 0 if sample.pixel_values is None else int(sample.pixel_values.shape[0])
            if n_sentinels != n_pixels or sample.n_images != n_pixels:
                raise ValueError(
                    f"sample {row} has {n_sentinels} image sentinels in input_ids, n_images={sample.n_images} and "
                    f"{n_pixels} images in pixel_values; these must be equal"
                )
            if n_pixels:
                pixels.append(sample.pixel_values)
        rows = [s.input_ids for s in samples]
        input_ids, attention_mask = right_pad(rows, self.pad_id, pin_memory=self._pin)
        pixel_values = None
        if pixels:
            n_rows = sum(int(p.shape[0]) for p in pixels)
            host = torch.empty((n_rows, *pixels[0].shape[1:]), dtype=pixels[0].dtype, pin_memory=self._pin)
            torch.cat(pixels, out=host)
            pixel_values = host.to(self.device, non_blocking=self._pin).to(self.options.torch_dtype)
        return {
            "input_ids": input_ids.to(self.device, non_blocking=self._pin),
            "attention_mask": attention_mask.to(self.device, non_blocking=self._pin),
            "pixel_values": pixel_values,
        }

    def forward_head(self, samples: Sequence[PreparedSample]) -> torch.Tensor:
        """Launch one batch and return what the head reports, float32 on the model's device.

        Does not wait for the device: call this for batch ``i + 1`` before reading batch ``i``'s scores
        (``.tolist()``) and the host-side collation of the next batch overlaps the GPU's work on this one.

        Returns:
            ``[B]`` raw outputs for a regression head; ``[B, 3]`` rows ``(P(class 1), argmax class, expected
            level)`` for a classification head (``num_labels >= 2``).

        Raises:
            ValueError: a sample's image sentinels, ``n_images`` and ``pixel_values`` rows disagree.
        """
        batch = self._collate(samples)
        with torch.inference_mode():
            if self.uses_packing:
                from unifilter_core.modeling.packing import packed_forward

                logits = packed_forward(
                    self.model,
                    **batch,
                    attention=self.options.packed_attention,
                    vision_batch_size=self.options.vision_batch_size,
                )
            else:
                logits = self.model(**batch).logits
            logits = logits.float()
            if logits.shape[-1] == 1:
                return logits[:, 0]
            from unifilter_core.modeling.modeling_unifilter import class_outputs

            score, quality_class, level = class_outputs(logits)
            return torch.stack([score, quality_class.float(), level], dim=1)

    def forward_scores(self, samples: Sequence[PreparedSample]) -> torch.Tensor:
        """``[B]`` float32 scores on the model's device (the raw output, or P(class 1)); see :meth:`forward_head`."""
        head = self.forward_head(samples)
        return head if head.ndim == 1 else head[:, 0]

    def forward(self, samples: Sequence[PreparedSample]) -> list[float]:
        """Score prepared samples in one batch.

        Args:
            samples: prepared samples (any lengths; padded here, or packed with ``packing``).

        Returns:
            One float per sample, in order: the regression output, or for a classification head a
            :class:`~unifilter_core.head_scores.LabelScore` (P(class 1), with ``quality_class`` and
            ``expected_level``).

        Raises:
            ValueError: a sample's image sentinels, ``n_images`` and ``pixel_values`` rows disagree.
        """
        if not samples:
            return []
        head = self.forward_head(samples).cpu()
        if head.ndim == 1:
            return head.tolist()
        return label_scores(head.tolist())

    # ------------------------------------------------------------------------------------------------ scoring
    def score_prepared(self, items: Sequence[PreparedSample | SampleFailure]) -> list[ScoreResult]:
        """Score already-prepared items (failures pass through as rows), batching by length; input order kept."""
        results: list[ScoreResult | None] = [None] * len(items)
        ready = []
        for index, item in enumerate(items):
            if isinstance(item, SampleFailure):
                results[index] = item.to_result()
            else:
                ready.append(index)
        ready.sort(key=lambda i: items[i].n_tokens)
        size = self.options.batch_size
        for start in range(0, len(ready), size):
            chunk = ready[start : start + size]
            for index, score in zip(chunk, self._forward_or_rows([items[i] for i in chunk]), strict=True):
                results[index] = _result(items[index], score)
        return [r for r in results if r is not None]

    def _forward_or_rows(self, samples: list[PreparedSample]) -> list[float | ScoreResult]:
        """``forward``; a batch that fails with a runtime error is retried one by one, failures become rows."""
        try:
            return list(self.forward(samples))
        except RuntimeError as exc:
            if len(samples) == 1:
                logger.warning("model error on one sample: %s", exc)
                return [ScoreResult.failed(Reason.MODEL_ERROR, f"{type(exc).__name__}: {exc}")]
            logger.warning("model error on a batch of %d, retrying one by one: %s", len(samples), exc)
            return [row for sample in samples for row in self._forward_or_rows([sample])]

    def _score_stream(self, prepare: Any, inputs: Sequence[Any]) -> list[ScoreResult]:
        window = self.options.batch_size * _WINDOW_BATCHES
        results: list[ScoreResult] = []
        for start in range(0, len(inputs), window):
            results += self.score_prepared([prepare(x) for x in inputs[start : start + window]])
        return results

    def score_captions(self, pairs: Sequence[tuple[Any, str | None]]) -> list[ScoreResult]:
        """Score ``(image, caption)`` pairs (image: PIL or encoded bytes). One result per pair, in input order."""
        return self._score_stream(lambda pair: self.processor.prepare_caption(*_pair(pair)), pairs)

    def score_documents(self, documents: Sequence[dict[str, list[Any]]]) -> list[ScoreResult]:
        """Score interleaved documents ``{"texts": [...], "images": [...]}`` (parallel slot lists, None at the
        other list's slots; images PIL or encoded bytes). One result per document, in input order.

        Raises:
            ValueError: a document lacks ``texts``/``images`` or their lengths differ (the message says both).
        """
        return self._score_stream(_prepare_document_with(self.processor), documents)


def _pair(pair: Any) -> tuple[Any, Any]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"score_captions expects (image, text) pairs, got {type(pair).__name__}")
    return pair[0], pair[1]


def _prepare_document_with(processor: UniFilterProcessor) -> Any:
    def prepare(doc: Any) -> PreparedSample | SampleFailure:
        if not isinstance(doc, dict) or "texts" not in doc or "images" not in doc:
            raise ValueError('score_documents expects dicts {"texts": [...], "images": [...]}')
        return processor.prepare_document(list(doc["texts"]), list(doc["images"]))

    return prepare


def _result(sample: PreparedSample, score: float | ScoreResult) -> ScoreResult:
    meta = {"n_images": sample.n_images, "n_tokens": sample.n_tokens, "truncated": sample.truncated}
    if isinstance(score, ScoreResult):
        score.n_images, score.n_tokens, score.truncated = (
            meta["n_images"],
            meta["n_tokens"],
            meta["truncated"],
        )
        return score
    result = ScoreResult(score=float(score), detail=sample.detail, **meta)
    if isinstance(score, LabelScore):
        result.quality_class, result.expected_level = score.quality_class, score.expected_level
    return result


def _tokenizer_ids(tokenizer: Any) -> dict[str, int]:
    """The ids the processor writes into every sequence (bos, eos) and the padding id."""
    return {f"tokenizer {name}": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}


def load_scorer(
    path: str | os.PathLike[str],
    device: str = "cpu",
    dtype: str = "float32",
    *,
    image_aspect_ratio: str | None = None,
    batch_size: int = 16,
    caption_max_tokens: int | None = 75,
    max_images: int | None = 10,
    max_text_tokens: int | None = 6000,
    max_length: int | None = None,
    vision_tower: str | None = None,
    attn_implementation: str = "sdpa",
    packing: bool | str = False,
    packed_attention: str = "varlen",
    vision_batch_size: int | None = None,
    compile_vision: str | None = None,
    pin_memory: bool | None = None,
) -> Scorer:
    """Load a UniFilter checkpoint (released layout or our own saves) for scoring.

    Args:
        path: the checkpoint folder (``config.json``, ``model.safetensors``, tokenizer files), or the hub id of a
            model in the local Hugging Face cache (``weizhiwang/UniFilter-Qwen2.5-1.5B``; never downloaded).
        device: torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the tower and LLM (the score head runs in fp32).
        image_aspect_ratio: ``"pad"`` or ``"resize"`` (``"square"``, LLaVA's name, means resize); None follows the
            checkpoint's ``image_aspect_ratio`` (where ``"square"`` also reads as resize).
        batch_size: samples per forward pass.
        caption_max_tokens: caption id limit (EOS kept when cutting); None disables it.
        max_images: documents with more images become ``skipped``/``too_many_images`` rows; None disables it.
        max_text_tokens: documents with longer id sequences become ``skipped``/``too_many_tokens`` rows.
        max_length: spliced sequence limit; None uses the checkpoint's ``tokenizer_model_max_length``.
        vision_tower: a local SigLIP folder (or the hub id of a cached one) for checkpoints without tower weights.
        attn_implementation: transformers attention implementation (``"sdpa"``, ``"eager"``, ...).
        packing: True runs the LLM padding-free (all sequences of a batch in one row, see
            ``unifilter_core.modeling.packing``); ``"auto"`` packs only where a fast varlen attention kernel works
            (CUDA with flash-attn or torch's varlen kernel). Scores equal the padded path to dtype tolerance.
        packed_attention: attention for packed rows: ``"varlen"`` (kernel registry), ``"varlen:<kernel>"``,
            ``"flash_attention_2"``, ``"sdpa"`` or ``"eager"`` (the last two are O(T^2) references).
        vision_batch_size: images per vision-tower call (None = all images of a batch at once).
        compile_vision: ``torch.compile`` mode for the vision tower (e.g. ``"default"``, ``"max-autotune"``);
            None = not compiled (the CPU default).
        pin_memory: pinned host buffers + non-blocking copies; None = on for CUDA devices.

    Raises:
        ValueError: an option is invalid or the checkpoint folder is not usable (raised before loading weights).
    """
    options = ScorerOptions(
        device=device,
        dtype=dtype,
        image_aspect_ratio=image_aspect_ratio,
        batch_size=batch_size,
        caption_max_tokens=caption_max_tokens,
        max_images=max_images,
        max_text_tokens=max_text_tokens,
        max_length=max_length,
        vision_tower=vision_tower,
        attn_implementation=attn_implementation,
        packing=packing,
        packed_attention=packed_attention,
        vision_batch_size=vision_batch_size,
        compile_vision=compile_vision,
        pin_memory=pin_memory,
    )
    folder = resolve_checkpoint(path)
    if vision_tower is not None:
        vision_tower = str(resolve_reference(vision_tower, what="vision tower"))
        options = replace(options, vision_tower=vision_tower)

    from unifilter_core.modeling import UniFilterForQualityScoring, load_config
    from unifilter_core.modeling.checkpoint import check_special_ids
    from unifilter_core.tokenization import load_tokenizer

    tokenizer = load_tokenizer(folder)
    config = load_config(folder, vision_tower=vision_tower)
    check_special_ids(config, source=f"tokenizer in {folder}", ids=_tokenizer_ids(tokenizer))
    processing = (
        ProcessingConfig.from_model_config(  # validates the limits against the config, before weights
            config,
            vision_tower=vision_tower,
            image_aspect_ratio=options.image_aspect_ratio,
            max_length=options.max_length,
            caption_max_tokens=options.caption_max_tokens,
            max_images=options.max_images,
            max_text_tokens=options.max_text_tokens,
        )
    )
    model = UniFilterForQualityScoring.from_pretrained(
        folder,
        vision_tower=vision_tower,
        torch_dtype=options.torch_dtype,
        attn_implementation=attn_implementation,
    )
    model.to(options.device).eval()
    if options.compile_vision not in (None, "none"):
        from unifilter_core.modeling.packing import compile_vision_tower

        compile_vision_tower(model, options.compile_vision)
    logger.info("loaded %s (%s, %s) with %s", folder, options.device, options.dtype, processing)
    return Scorer(model, UniFilterProcessor(tokenizer, processing), options, folder)
