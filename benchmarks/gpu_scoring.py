"""GPU scoring benchmark: our scoring path vs an original-style loop, same GPU, same weights, one run.

Builds the RELEASED architecture at full size with random weights (``--preset released-qwen2.5-1.5b``: SigLIP
so400m + Qwen2.5-1.5B), directly on the device in bf16, and synthetic prepared samples (random token ids, a pool of
random images): captions (~176 spliced tokens, as reference-model.md) and OBELICS-like documents (1-10 images, a few
hundred to a few thousand tokens). Decoding is not part of this figure (see reader_throughput.py): both paths get
the same prepared samples.

* ours: ``Scorer.forward`` with bf16, length-bucketed batches sized from free memory, padding-free packing
  (varlen attention kernel from ``unifilter_core.kernels``), the vision tower in large chunks, pinned memory +
  non-blocking copies; optionally the vision tower compiled (separate stage).
* original: batch 4 (captions) / 1 (documents) in input order, padded to the batch's max length, fp16, the model's
  padded forward (vision tower per batch), SDPA with a padding mask.

Every stage runs in try/except with its own time limit; errors land in the JSON and the run goes on. Import chain:
torch, transformers, numpy and ``unifilter_core.{kernels,modeling,processing,records,scorer}`` only.

    PYTHONPATH=. python benchmarks/gpu_scoring.py                       # on a GPU machine (~4 min)
    PYTHONPATH=. python benchmarks/gpu_scoring.py --device cpu --preset tiny --quick   # smoke test on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring, most specific first
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
]
RESULTS: dict[str, Any] = {"stages": {}, "errors": {}}


def log(message: str) -> None:
    print(f"[gpu_scoring {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (POSIX alarm; no-op elsewhere)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise TimeoutError(f"stage exceeded {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def stage(name: str, seconds: float, fn: Callable[[], Any]) -> Any:
    """Run one stage; record its result or error and its wall time; never raise."""
    log(f"stage {name} (limit {seconds:.0f} s)")
    start = time.perf_counter()
    try:
        with time_limit(seconds):
            result = fn()
        RESULTS["stages"][name] = {"ok": True, "wall_s": round(time.perf_counter() - start, 2)}
        return result
    except BaseException as exc:  # noqa: BLE001 - a stage must never end the run (KeyboardInterrupt aside)
        if isinstance(exc, KeyboardInterrupt):
            raise
        RESULTS["stages"][name] = {"ok": False, "wall_s": round(time.perf_counter() - start, 2)}
        RESULTS["errors"][name] = f"{type(exc).__name__}: {exc}"
        log(f"stage {name} FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=4)
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        write_json()  # after every stage: a run killed from outside still leaves its figures


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ model + data
def build_model(preset: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The preset's architecture with random weights, created on ``device`` in ``dtype`` (head in fp32)."""
    from unifilter_core.modeling import load_preset
    from unifilter_core.modeling.configuration_unifilter import config_class_for
    from unifilter_core.modeling.modeling_unifilter import MODEL_CLASSES

    flat = load_preset(preset)
    config = config_class_for(flat["model_type"])(**flat)
    config._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = MODEL_CLASSES[config.model_type](config)
    finally:
        torch.set_default_dtype(old)
    model.score.float()
    return model.eval()


def make_samples(config: Any, kind: str, n: int, seed: int = 0) -> list[Any]:
    """Synthetic ``PreparedSample``s shaped like real captions / OBELICS documents (shared image pool)."""
    from unifilter_core.processing import PreparedSample

    rng = np.random.default_rng(seed)
    size = config.vision_config.image_size
    pool = [torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    vocab = config.text_config.vocab_size
    bos, eos = config.bos_token_id or 0, config.eos_token_id or 1
    k = config.num_image_tokens
    max_len = int(getattr(config, "tokenizer_model_max_length", 4096) or 4096)
    samples = []
    for _ in range(n):
        if kind == "caption":
            n_text = int(np.clip(rng.lognormal(3.2, 0.5), 3, 73))
            ids = [bos, -200, *rng.integers(0, vocab - 2, n_text).tolist(), eos]
            pixels = pool[int(rng.integers(len(pool)))]
        else:
            n_img = int(np.clip(rng.geometric(0.4), 1, 10))
            n_text = int(np.clip(rng.lognormal(6.3, 0.8), 20, max_len - n_img * k - 2))
            text = rng.integers(0, vocab - 2, n_text).tolist()
            cuts = sorted(rng.integers(0, n_text, n_img).tolist())
            ids = [bos]
            prev = 0
            for cut in cuts:
                ids += [*text[prev:cut], -200]
                prev = cut
            ids += [*text[prev:], eos]
            pixels = torch.cat([pool[int(j)] for j in rng.integers(len(pool), size=n_img)])
        n_img = int(pixels.shape[0])
        n_tokens = len(ids) - n_img + n_img * k
        samples.append(PreparedSample(input_ids=ids, pixel_values=pixels, n_images=n_img, n_tokens=n_tokens))
    return samples


def sample_flops(config: Any, params: dict[str, int], sample: Any) -> float:
    """Forward FLOPs of one sample: 2 x params x tokens for the matmuls + attention score/value products."""
    text, vision = config.text_config, config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    t = sample.n_tokens
    llm = (
        2 * params["llm"] * t + 2 * text.num_hidden_layers * t * t * text.hidden_size
    )  # causal: half of 4*t^2*d
    tower = (
        2 * params["vision"] * patches + 4 * vision.num_hidden_layers * patches * patches * vision.hidden_size
    )
    return llm + sample.n_images * (tower + 2 * params["projector"] * k_tokens(config))


def k_tokens(config: Any) -> int:
    return int(config.num_image_tokens)


def count_params(model: Any) -> dict[str, int]:
    lm = model.model.language_model
    embed = lm.get_input_embeddings().weight.numel()
    return {
        "llm": sum(p.numel() for p in lm.parameters()) - embed,
        "vision": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.model.mm_projector.parameters()),
    }


# ------------------------------------------------------------------------------------------------ runners
def make_scorer(model: Any, config: Any, device: torch.device, dtype: str, **options: Any) -> Any:
    from unifilter_core.scorer import Scorer, ScorerOptions

    processor = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=int(config.pad_token_id or 0)))
    return Scorer(model, processor, ScorerOptions(device=str(device), dtype=dtype, **options), Path("."))


def bucket_batches(
    samples: list[Any], batch_size: int, max_tokens: int | None, window: int = 32
) -> list[list[Any]]:
    """The engine's batching: sort by length within windows of ``window x batch_size``, cut by count and tokens."""
    batches = []
    step = window * batch_size
    for start in range(0, len(samples), step):
        chunk = sorted(samples[start : start + step], key=lambda s: s.n_tokens)
        current: list[Any] = []
        tokens = 0
        for sample in chunk:
            if current and (
                len(current) >= batch_size or (max_tokens and tokens + sample.n_tokens > max_tokens)
            ):
                batches.append(current)
                current, tokens = [], 0
            current.append(sample)
            tokens += sample.n_tokens
        if current:
            batches.append(current)
    return batches


def _as_list(scores: Any) -> list[float]:
    return scores.cpu().tolist() if isinstance(scores, torch.Tensor) else list(scores)


def _check_finite(scores: list[float]) -> None:
    if any(not math.isfinite(s) for s in scores) and "non-finite scores" not in RESULTS.setdefault(
        "warnings", []
    ):
        RESULTS["warnings"].append("non-finite scores")


def timed_run(
    forward: Callable[[list[Any]], list[float]],
    batches: list[list[Any]],
    device: torch.device,
    *,
    budget_s: float,
    warmup: int,
    flops_of: Callable[[Any], float],
) -> dict[str, Any]:
    """Warm up on the first batches, then time batches until done or ``budget_s`` is spent.

    ``forward`` returns either a list of floats (synchronous) or a device tensor; tensors are read one batch
    later, so the host prepares batch i+1 while the device computes batch i.
    """
    for batch in batches[:warmup]:
        _as_list(forward(batch))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done = flops = 0.0
    n_batches = 0
    start = time.perf_counter()
    pending: Any = None
    for batch in batches[warmup:] or batches:
        launched = forward(batch)
        if pending is not None:
            _check_finite(_as_list(pending))
        pending = launched
        done += len(batch)
        flops += sum(flops_of(s) for s in batch)
        n_batches += 1
        if time.perf_counter() - start > budget_s:
            break
    if pending is not None:
        _check_finite(_as_list(pending))
    sync(device)
    elapsed = time.perf_counter() - start
    out = {
        "samples": int(done),
        "batches": n_batches,
        "seconds": round(elapsed, 3),
        "samples_per_s": round(done / elapsed, 3),
        "tflops_per_s": round(flops / elapsed / 1e12, 3),
        "tflop_per_sample": round(flops / max(done, 1) / 1e12, 4),
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def run_ours(
    model: Any, config: Any, samples: list[Any], kind: str, args: argparse.Namespace, **extra: Any
) -> dict:
    from unifilter_core.modeling.packing import auto_batch_size

    device = torch.device(args.device)
    mean_tokens = int(np.mean([s.n_tokens for s in samples]))
    mean_images = float(np.mean([s.n_images for s in samples]))
    batch = auto_batch_size(
        config, device, tokens_per_sample=mean_tokens, images_per_sample=mean_images, max_batch=args.max_batch
    )
    if kind == "document":
        batch = max(1, min(batch, args.doc_tokens // mean_tokens))
    packing = "auto" if args.packing == "auto" else args.packing == "on"
    scorer = make_scorer(
        model,
        config,
        device,
        args.dtype,
        batch_size=batch,
        packing=packing,
        vision_batch_size=args.vision_batch,
        **extra,
    )
    max_tokens = args.doc_tokens if kind == "document" else None
    batches = bucket_batches(samples, batch, max_tokens)
    params = count_params(model)
    result = timed_run(
        scorer.forward_scores,
        batches,
        device,
        budget_s=args.budget,
        warmup=args.warmup,
        flops_of=lambda s: sample_flops(config, params, s),
    )
    result.update(batch_size=batch, packing=scorer.uses_packing, vision_batch_size=args.vision_batch)
    return result


def run_original(model: Any, config: Any, samples: list[Any], kind: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    batch = 4 if kind == "caption" else 1
    scorer = make_scorer(model, config, device, "float16", batch_size=batch, packing=False, pin_memory=False)
    batches = [samples[i : i + batch] for i in range(0, len(samples), batch)]  # input order, no bucketing
    params = count_params(model)
    result = timed_run(
        scorer.forward,
        batches,
        device,
        budget_s=args.budget,
        warmup=args.warmup,
        flops_of=lambda s: sample_flops(config, params, s),
    )
    result.update(batch_size=batch, packing=False, dtype="float16")
    return result


# ------------------------------------------------------------------------------------------------ stages
def parity(model: Any, config: Any, args: argparse.Namespace) -> dict:
    """Packed (ours) vs padded scores on the same bf16 model, captions and documents."""
    device = torch.device(args.device)
    samples = make_samples(config, "caption", 8, seed=7) + make_samples(config, "document", 3, seed=8)
    padded = make_scorer(model, config, device, args.dtype, packing=False).forward(samples)
    packed = make_scorer(model, config, device, args.dtype, packing=True, vision_batch_size=4).forward(
        samples
    )
    diff = float(np.max(np.abs(np.array(padded) - np.array(packed))))
    scale = float(np.max(np.abs(padded))) or 1.0
    return {"max_abs_diff": diff, "max_abs_score": scale, "ok": diff <= 0.05 * max(scale, 1.0)}


def kernel_bench(args: argparse.Namespace) -> dict:
    """Registry status on the device and the image-normalisation kernels' throughput."""
    from unifilter_core.kernels import get_kernel, list_kernels

    device = torch.device(args.device)
    out: dict[str, Any] = {"kernels": list_kernels(device)}
    images = torch.randint(0, 256, (64, 384, 384, 3), dtype=torch.uint8, device=device)
    for name in ("reference", "triton"):
        kernel = get_kernel("image_normalize", name, device)
        if kernel.name != name:
            continue
        kernel(images, [0.5] * 3, [0.5] * 3, torch.bfloat16)
        sync(device)
        start = time.perf_counter()
        for _ in range(5 if device.type == "cuda" else 1):
            kernel(images, [0.5] * 3, [0.5] * 3, torch.bfloat16)
        sync(device)
        per = (time.perf_counter() - start) / (5 if device.type == "cuda" else 1)
        out[f"image_normalize_{name}_images_per_s"] = round(64 / per, 1)
    return out


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    peak = (
        next((p for key, p in PEAK_TFLOPS if key in env["device_name"]), None)
        if device.type == "cuda"
        else None
    )
    env["peak_bf16_tflops"] = peak
    return env


def summarize() -> None:
    peak = RESULTS.get("environment", {}).get("peak_bf16_tflops")
    summary: dict[str, Any] = {}
    for kind in ("caption", "document"):
        ours = RESULTS.get(f"ours_{kind}") or {}
        orig = RESULTS.get(f"original_{kind}") or {}
        best = max(
            [ours, RESULTS.get(f"ours_compiled_{kind}") or {}], key=lambda r: r.get("samples_per_s", 0)
        )
        row: dict[str, Any] = {
            "ours_per_s": best.get("samples_per_s"),
            "original_per_s": orig.get("samples_per_s"),
            "ours_tflops": best.get("tflops_per_s"),
            "original_tflops": orig.get("tflops_per_s"),
        }
        if row["ours_per_s"] and row["original_per_s"]:
            row["ratio"] = round(row["ours_per_s"] / row["original_per_s"], 2)
        if peak and row["ours_tflops"]:
            row["ours_share_of_peak"] = round(row["ours_tflops"] / peak, 3)
        if peak and row["original_tflops"]:
            row["original_share_of_peak"] = round(row["original_tflops"] / peak, 3)
        summary[kind] = row
    RESULTS["summary"] = summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="released-qwen2.5-1.5b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="fewer samples and shorter time budgets")
    parser.add_argument("--captions", type=int, default=None)
    parser.add_argument("--documents", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--vision-batch", type=int, default=64)
    parser.add_argument(
        "--doc-tokens", type=int, default=32768, help="token budget per document batch (ours)"
    )
    parser.add_argument("--packing", default="auto", choices=["on", "off", "auto"])
    parser.add_argument(
        "--compile",
        default=None,
        help="torch.compile mode of the compiled stage (default: default on CUDA, none on CPU)",
    )
    parser.add_argument(
        "--total-limit", type=float, default=420.0, help="stop starting stages after this many s"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default $OUT/gpu_check.json or benchmarks/results/)"
    )
    args = parser.parse_args(argv)
    args.captions = args.captions or (64 if args.quick else 3072)
    args.documents = args.documents or (8 if args.quick else 256)
    args.budget = args.budget or (5.0 if args.quick else 25.0)
    if args.compile is None:
        args.compile = "default" if args.device.startswith("cuda") else "none"
    if args.quick:
        args.warmup = min(args.warmup, 1)
    return args


def output_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return Path(__file__).resolve().parent / "results" / "gpu_check.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    RESULTS["args"] = vars(args)
    RESULTS["_path"] = str(output_path(args))
    RESULTS["environment"] = stage("environment", 30, lambda: environment(device)) or {}
    model = stage("build_model", 180, lambda: build_model(args.preset, device, getattr(torch, args.dtype)))
    if model is None:
        return finish(args)
    config = model.config
    RESULTS["params"] = count_params(model)
    captions = make_samples(config, "caption", args.captions)
    documents = make_samples(config, "document", args.documents, seed=1)
    RESULTS["data"] = {
        "captions": len(captions),
        "caption_mean_tokens": float(np.mean([s.n_tokens for s in captions])),
        "documents": len(documents),
        "document_mean_tokens": float(np.mean([s.n_tokens for s in documents])),
        "document_mean_images": float(np.mean([s.n_images for s in documents])),
    }

    def left() -> float:
        return args.total_limit - (time.perf_counter() - started)

    limit = args.budget * 4 + 60
    plan: list[tuple[str, Callable[[], Any]]] = [
        ("parity", lambda: parity(model, config, args)),
        ("kernels", lambda: kernel_bench(args)),
        ("ours_caption", lambda: run_ours(model, config, captions, "caption", args)),
        ("ours_document", lambda: run_ours(model, config, documents, "document", args)),
    ]
    for name, fn in plan:
        if left() < 20:
            RESULTS["errors"][name] = "skipped: total time limit"
            continue
        RESULTS[name] = stage(name, min(limit, left()), fn)
    if args.compile not in ("none", "") and left() > 90:
        from unifilter_core.modeling.packing import compile_vision_tower

        def compiled(kind: str, samples: list[Any]) -> dict:
            if not getattr(model, "_unifilter_vision_compiled", False):
                compile_vision_tower(model, args.compile)
            return run_ours(model, config, samples, kind, args)

        RESULTS["ours_compiled_caption"] = stage(
            "ours_compiled_caption", min(240, left() - 60), lambda: compiled("caption", captions)
        )
    # the original loop: fp16 weights (converted in place: ours is done with bf16)
    if left() > 20:
        from unifilter_core.modeling.packing import uncompile_vision_tower

        uncompile_vision_tower(model)
        stage("to_float16", 60, lambda: model.half().score.float())
        for name, samples, kind in (
            ("original_caption", captions, "caption"),
            ("original_document", documents, "document"),
        ):
            if left() < 15:
                RESULTS["errors"][name] = "skipped: total time limit"
                continue
            RESULTS[name] = stage(
                name, min(limit, left()), lambda s=samples, k=kind: run_original(model, config, s, k, args)
            )
    return finish(args)


def write_json() -> None:
    path = RESULTS.get("_path")
    if path is None:
        return
    try:
        summarize()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(
            json.dumps({k: v for k, v in RESULTS.items() if k != "_path"}, indent=2, default=str) + "\n"
        )
    except (OSError, TypeError, ValueError) as exc:
        log(f"could not write {path}: {exc}")


def finish(args: argparse.Namespace) -> int:
    write_json()
    log(f"wrote {RESULTS['_path']}")
    print(json.dumps({"summary": RESULTS["summary"], "errors": RESULTS["errors"]}, indent=2), flush=True)
    for kind, row in RESULTS["summary"].items():
        print(
            f"{kind}s: ours {row.get('ours_per_s')}/s, original {row.get('original_per_s')}/s, "
            f"ratio {row.get('ratio')}, ours {row.get('ours_tflops')} TFLOP/s "
            f"({row.get('ours_share_of_peak')} of peak)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
