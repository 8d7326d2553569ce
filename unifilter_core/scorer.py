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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from unifilter_core.fileio import sha256_file
from unifilter_core.head_scores import label_scores
from unifilter_core.hub_cache import resolve_reference
from unifilter_core.prepare import right_pad
from unifilter_core.processing import (
    IMAGE_TOKEN_INDEX,
    PreparedSample,
    ProcessingConfig,
    UniFilterProcessor,
)
from unifilter_core.records import SampleFailure, ScoreResult
from unifilter_core.scoring.batching import BatchRunner
from unifilter_core.scoring.settings import ScoringSettings

logger = logging.getLogger(__name__)

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


# the options of load_scorer and Scorer are the run's resolved ScoringSettings (older name kept)
ScorerOptions = ScoringSettings


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
    from unifilter_core.modeling.configuration_unifilter import read_config_json

    model_type = read_config_json(config_file).get("model_type")
    if model_type not in ("llava_qwen", "llava_qwen3"):
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; expected 'llava_qwen' or 'llava_qwen3'"
        )
    return folder.resolve()


# ---------------------------------------------------------------------------------------------------- fingerprint
_LOADS = 0  # models this process has loaded (load_scorer calls that reached the weights)


def models_loaded() -> int:
    """How many models :func:`load_scorer` has loaded in this process (a Ray actor records it per tar)."""
    return _LOADS


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
        self, model: Any, processor: UniFilterProcessor, options: ScoringSettings, checkpoint: Path
    ) -> None:
        self.model = model
        self.processor = processor
        self.options = options = options.resolve()
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
            else:  # the last decoder layer on the last tokens only, where the body supports it
                logits = self.model(**batch, last_token_only=True).logits
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

    def with_settings(self, settings: ScoringSettings) -> Scorer:
        """This scorer with other settings, sharing the loaded model.

        Raises:
            ValueError: ``settings`` change the loaded model (device, dtype, tower, attention, compile): load
                another scorer instead.
        """
        settings = _resolved(settings)
        if settings == self.options:
            return self
        if settings.load_key() != self.options.load_key():
            raise ValueError(
                f"settings {dict(settings.load_key())} need another model load than {dict(self.options.load_key())}"
            )
        processing = _processing_config(self.model.config, settings)
        scorer = Scorer(
            self.model, UniFilterProcessor(self.processor.tokenizer, processing), settings, self.checkpoint
        )
        scorer._fingerprint = self._fingerprint
        return scorer

    # ------------------------------------------------------------------------------------------------ scoring
    def score_prepared(self, items: Sequence[PreparedSample | SampleFailure]) -> list[ScoreResult]:
        """Score already-prepared items (failures pass through as rows), batching by length; input order kept.

        A batch that fails is retried one sample at a time; a sample that still fails gets a ``model_error`` row.
        """
        results: list[ScoreResult | None] = [None] * len(items)
        ready = []
        for index, item in enumerate(items):
            if isinstance(item, SampleFailure):
                results[index] = item.to_result()
            else:
                ready.append(index)
        scored = BatchRunner(self).run_window([items[i] for i in ready], self.options.batch_size, None)
        for index, result in zip(ready, scored, strict=True):
            results[index] = result
        return [r for r in results if r is not None]

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


def _resolved(settings: ScoringSettings) -> ScoringSettings:
    """``settings`` resolved for this machine, with a hub-id vision tower replaced by its cached folder."""
    settings = settings.resolve()
    if settings.vision_tower is None:
        return settings
    return replace(settings, vision_tower=str(resolve_reference(settings.vision_tower, what="vision tower")))


def _processing_config(config: Any, settings: ScoringSettings) -> ProcessingConfig:
    """The processor's options for ``settings`` (validates the limits against the model config)."""
    return ProcessingConfig.from_model_config(
        config,
        vision_tower=settings.vision_tower,
        image_aspect_ratio=settings.image_aspect_ratio,
        max_length=settings.max_length,
        caption_max_tokens=settings.caption_max_tokens,
        max_images=settings.max_images,
        max_text_tokens=settings.max_text_tokens,
    )


def _tokenizer_ids(tokenizer: Any) -> dict[str, int]:
    """The ids the processor writes into every sequence (bos, eos) and the padding id."""
    return {f"tokenizer {name}": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}


def load_scorer(
    path: str | os.PathLike[str],
    device: str = "cpu",
    dtype: str = "float32",
    *,
    settings: ScoringSettings | None = None,
    **options: Any,
) -> Scorer:
    """Load a UniFilter checkpoint (released layout or our own saves) for scoring.

    Args:
        path: the checkpoint folder (``config.json``, ``model.safetensors``, tokenizer files), or the hub id of a
            model in the local Hugging Face cache (``weizhiwang/UniFilter-Qwen2.5-1.5B``; never downloaded).
        device: torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``.
        settings: a whole :class:`~unifilter_core.scoring.settings.ScoringSettings` (then ``device``, ``dtype``
            and ``options`` are ignored).
        options: any other field of :class:`~unifilter_core.scoring.settings.ScoringSettings` (``batch_size``,
            ``image_aspect_ratio``, ``vision_tower``, ``packing``, ...), where each is documented.

    Raises:
        ValueError: an option is invalid or the checkpoint folder is not usable (raised before loading weights).
    """
    if settings is None:
        settings = ScoringSettings(device=device, dtype=dtype, **options)
    folder = resolve_checkpoint(path)
    settings = _resolved(settings)
    vision_tower = settings.vision_tower

    from unifilter_core.modeling import UniFilterForQualityScoring, check_special_ids, load_checkpoint_config
    from unifilter_core.tokenization import load_tokenizer

    tokenizer = load_tokenizer(folder)
    config = load_checkpoint_config(folder, vision_tower=vision_tower)
    check_special_ids(config, source=f"tokenizer in {folder}", ids=_tokenizer_ids(tokenizer))
    processing = _processing_config(
        config, settings
    )  # validates the limits against the config, before weights
    model = UniFilterForQualityScoring.from_pretrained(
        folder,
        vision_tower=vision_tower,
        torch_dtype=settings.torch_dtype,
        attn_implementation=settings.attn_implementation,
    )
    model.to(settings.device).eval()
    global _LOADS
    _LOADS += 1
    if settings.compile_vision not in (None, "none"):
        from unifilter_core.modeling.packing import compile_vision_tower

        compile_vision_tower(model, settings.compile_vision)
    logger.info("loaded %s (%s, %s) with %s", folder, settings.device, settings.dtype, processing)
    return Scorer(model, UniFilterProcessor(tokenizer, processing), settings, folder)
