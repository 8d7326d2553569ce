"""How the classifier scores: one settings object for ``load_scorer``, the CLI and the Dagster resource.

:class:`ScoringSettings` holds every option of a scoring run with its default and its check. The CLI and the
``scoring_model`` resource only build one (field by field, by name: :meth:`ScoringSettings.from_values`);
:meth:`ScoringSettings.resolve` turns ``auto`` into this machine's device, dtype, batch size and worker count;
the resolved object is what :func:`~unifilter_core.scorer.load_scorer` uses, what the engine's
:class:`~unifilter_core.scoring.config.ScoringConfig` comes from, what the request key hashes and what the model
cache keys on (only the fields that change the loaded weights).

A new option is therefore written in three places: a field here (default, docstring line, check), the CLI flag
and the resource field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from unifilter_core.processing import AspectMode, normalize_aspect

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# samples per model call when batch_size is not given: documents are long (many images and tokens)
DEFAULT_BATCH_SIZE = {"caption": 16, "interleaved": 4}
# on CPU long documents run best in small batches: a batch's attention scores stay in the cache (measured with
# benchmarks/score_throughput.py on the world model: 2 documents a call 1.5x the original loop, 8 a call 1.1x)
CPU_BATCH_SIZE = {"caption": 16, "interleaved": 2}
PACKING = {"off": False, "on": True, "auto": "auto", False: False, True: True}
COMPILE_MODES = (None, "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# field roles (metadata["role"]): "load" fields change the loaded model (the model cache keys on them); "speed"
# fields change only speed and memory (left out of the request key); the others change how inputs become ids
_LOAD, _SPEED = {"role": "load"}, {"role": "speed"}


class SettingsError(ValueError):
    """A scoring setting is invalid. ``field`` names it; ``rule`` says what it must be (e.g. ``an int >= 1``).

    The message reads ``<field> must be <rule>, got <value>``; the CLI words it with its flag instead. ``low`` is
    the least value of an integer setting.
    """

    def __init__(self, name: str, value: Any, rule: str, hint: str = "", low: int | None = None) -> None:
        self.field, self.value, self.rule, self.hint, self.low = name, value, rule, hint, low
        super().__init__(f"{name} must be {rule}, got {value!r}{hint}")


def _int_at_least(name: str, value: Any, low: int, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SettingsError(name, value, f"an int >= {low}", low=low)


@dataclass(frozen=True)
class ScoringSettings:
    """Every option of a scoring run; ``auto`` / None values are filled in by :meth:`resolve`.

    Attributes:
        device: ``auto`` (a GPU when CUDA is present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``float32``, ``bfloat16`` or ``float16`` for the tower
            and the LLM (the score head runs in fp32).
        batch_size: samples per model call; None = 16 for captions, 4 for documents (2 on CPU).
        num_workers: decode worker processes (0 = in the calling process); None = CPU cores - 1, at least 1, and
            on a CPU device with 2 cores or fewer one per core (workers block once they are ahead of the model,
            so they only take the model's core while the model waits for samples).
        max_batch_tokens: padded-token budget per model call; None = no budget.
        image_aspect_ratio: ``pad`` or ``resize`` (``square``, LLaVA's name, means resize); None follows the
            checkpoint.
        caption_max_tokens: caption id limit (EOS kept when cutting); None disables it.
        max_images: documents with more images become ``skipped``/``too_many_images`` rows; None disables it.
        max_text_tokens: documents with longer id sequences become ``skipped``/``too_many_tokens`` rows.
        max_length: spliced sequence limit; None uses the checkpoint's ``tokenizer_model_max_length``.
        vision_tower: a local SigLIP folder (or the hub id of a cached one) for checkpoints without tower weights.
        attn_implementation: transformers attention implementation (``sdpa``, ``eager``, ...).
        packing: ``on`` runs the LLM padding-free (a batch in one row); ``auto`` packs only where a fast varlen
            attention kernel works (CUDA with flash-attn or torch's varlen kernel); ``off``. True/False also work.
        packed_attention: attention for packed rows: ``varlen`` (kernel registry), ``varlen:<kernel>``,
            ``flash_attention_2``, ``sdpa`` or ``eager`` (the last two are O(T^2) references).
        vision_batch_size: images per vision-tower call (None = all images of a batch at once).
        compile_vision: ``torch.compile`` mode for the vision tower (e.g. ``default``, ``max-autotune``); None =
            not compiled. Dropped on CPU by :meth:`resolve`.
        pin_memory: pinned host buffers + non-blocking copies; None = on for CUDA devices.
    """

    device: str = field(default="auto", metadata=_LOAD)
    dtype: str = field(default="auto", metadata=_LOAD)
    batch_size: int | None = field(default=None, metadata=_SPEED)
    num_workers: int | None = field(default=None, metadata=_SPEED)
    max_batch_tokens: int | None = field(default=None, metadata=_SPEED)
    image_aspect_ratio: str | None = None
    caption_max_tokens: int | None = 75
    max_images: int | None = 10
    max_text_tokens: int | None = 6000
    max_length: int | None = None
    vision_tower: str | None = field(default=None, metadata=_LOAD)
    attn_implementation: str = field(default="sdpa", metadata=_LOAD)
    packing: bool | str = "auto"
    packed_attention: str = "varlen"
    vision_batch_size: int | None = field(default=None, metadata=_SPEED)
    compile_vision: str | None = field(default=None, metadata=_LOAD)
    pin_memory: bool | None = field(default=None, metadata=_SPEED)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise SettingsError("dtype", self.dtype, f"auto or one of {sorted(DTYPES)}")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)
        ):
            raise SettingsError(
                "device", self.device, "auto, cpu, cuda or cuda:N (a valid torch device string)"
            )
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("num_workers", self.num_workers, 0)
        for name, low in (
            ("max_batch_tokens", 1),
            ("caption_max_tokens", 3),
            ("max_images", 0),
            ("max_text_tokens", 2),
            ("max_length", 3),
            ("vision_batch_size", 1),
        ):
            _int_at_least(name, getattr(self, name), low)
        aspects = [m.value for m in AspectMode]
        object.__setattr__(self, "image_aspect_ratio", normalize_aspect(self.image_aspect_ratio))
        if self.image_aspect_ratio is not None and self.image_aspect_ratio not in aspects:
            raise SettingsError(
                "image_aspect_ratio",
                self.image_aspect_ratio,
                f"None (follow the checkpoint) or one of {aspects} (or 'square', LLaVA's name for resize)",
            )
        if self.packing not in PACKING:
            raise SettingsError("packing", self.packing, "on, off or auto (or True/False)")
        object.__setattr__(self, "packing", PACKING[self.packing])
        from unifilter_core.modeling.packing import PACKED_ATTENTIONS

        if self.packed_attention.partition(":")[0] not in PACKED_ATTENTIONS:
            raise SettingsError(
                "packed_attention",
                self.packed_attention,
                f"one of {PACKED_ATTENTIONS} (or 'varlen:<kernel>')",
            )
        if self.compile_vision not in COMPILE_MODES:
            raise SettingsError("compile_vision", self.compile_vision, f"one of {COMPILE_MODES}")
        if self.pin_memory not in (None, True, False):
            raise SettingsError("pin_memory", self.pin_memory, "None (auto: on for CUDA), True or False")

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_values(cls, values: Mapping[str, Any] | Any) -> ScoringSettings:
        """Settings from a mapping or an object (argparse namespace, Dagster resource): each field whose name it
        has and whose value is not None; the rest keep their defaults."""
        get = values.get if isinstance(values, Mapping) else (lambda name: getattr(values, name, None))
        given = {f.name: get(f.name) for f in fields(cls)}
        return cls(**{name: value for name, value in given.items() if value is not None})

    def resolve(self, kind: str | None = None, gpu_index: int | None = None) -> ScoringSettings:
        """These settings for this machine: a concrete device and dtype, batch size and worker count.

        Args:
            kind: ``caption`` or ``interleaved`` (the default batch size depends on it; None = caption's).
            gpu_index: the GPU a run was given (``auto``/``cuda`` pick ``cuda:<index mod visible GPUs>``).

        Raises:
            SettingsError: a CUDA device was asked for and is not here.
        """
        device = _resolve_device(self.device, gpu_index)
        dtype = self.dtype if self.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
        defaults = CPU_BATCH_SIZE if device == "cpu" else DEFAULT_BATCH_SIZE
        batch = self.batch_size or defaults.get(str(kind or "caption"), defaults["caption"])
        workers = self.num_workers if self.num_workers is not None else default_workers(device)
        compile_vision = self.compile_vision if device != "cpu" else None
        return replace(
            self,
            device=device,
            dtype=dtype,
            batch_size=batch,
            num_workers=workers,
            compile_vision=compile_vision,
        )

    # ------------------------------------------------------------------------------------------ views
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES["float32" if self.dtype == "auto" else self.dtype]

    def load_key(self) -> tuple[tuple[str, Any], ...]:
        """The fields that change the loaded model (what a model cache keys on)."""
        return tuple(
            (f.name, getattr(self, f.name)) for f in fields(self) if f.metadata.get("role") == "load"
        )

    def score_settings(self) -> dict[str, Any]:
        """The fields that can change a score (JSON-ready), for the request key."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("role") != "speed"}

    def scoring_config(self, **engine: Any) -> Any:
        """The engine's :class:`~unifilter_core.scoring.config.ScoringConfig` (resolve first); ``engine`` adds
        its other options."""
        from unifilter_core.scoring.config import ScoringConfig

        if self.batch_size is None or self.num_workers is None:
            raise ValueError("scoring_config() needs resolved settings: call resolve() first")
        return ScoringConfig(
            batch_size=self.batch_size,
            max_batch_tokens=self.max_batch_tokens,
            num_workers=self.num_workers,
            **engine,
        )


def default_workers(device: str) -> int:
    """Decode workers when none are given: one per core on a CPU device with <= 2 cores, else cores - 1."""
    from unifilter_core.cpus import available_cpus

    cores = available_cpus()
    return cores if device == "cpu" and cores <= 2 else max(1, cores - 1)


def _resolve_device(device: str, gpu_index: int | None) -> str:
    if device == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if device in ("auto", "cuda"):
        if not available:
            if device == "cuda":
                raise SettingsError(
                    "device", device, "a device this machine has", "; CUDA is not available here"
                )
            return "cpu"
        return "cuda" if gpu_index is None else f"cuda:{int(gpu_index) % torch.cuda.device_count()}"
    if not available or int(device[5:]) >= torch.cuda.device_count():
        count = torch.cuda.device_count() if available else 0
        raise SettingsError("device", device, f"a visible GPU (this machine has {count})")
    return device
