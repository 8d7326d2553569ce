"""CPU side: decode + preprocess throughput per core vs how fast the model consumes samples.

Builds realistic encoded inputs (JPEG captions of DataComp-like sizes; OBELICS-like documents with base64-free
image bytes and a few hundred words), then measures ``UniFilterProcessor.prepare_caption`` /
``prepare_document`` (JPEG decode, RGB, pad to square, PIL bicubic to 384, normalise, tokenize, splice ids) in ONE
process with one torch thread: samples/s per core. Compares with

* the model's consumption rate on this CPU (``Scorer.forward`` on the ``--cpu-preset`` model, float32), and
* the GPU consumption of the released model: ``benchmarks/results/gpu_check.json`` when present, else the issue's
  target (300 captions/s per H100) -> the number of cores needed to keep one GPU fed.

    python benchmarks/reader_throughput.py [--captions 200] [--documents 40]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unifilter_core.processing import ProcessingConfig, UniFilterProcessor  # noqa: E402
from unifilter_core.tokenization import load_tokenizer, train_bpe_tokenizer  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORDS = [
    "a",
    "the",
    "photo",
    "of",
    "red",
    "green",
    "blue",
    "small",
    "large",
    "dog",
    "cat",
    "running",
    "garden",
    "kitchen",
    "street",
    "picture",
    "shows",
    "image",
    "page",
    "chapter",
    "introduction",
    "and",
    "with",
    "without",
    "this",
    "is",
    "an",
    "example",
    "quality",
    "high",
    "low",
    "good",
    "bad",
    "text",
    "about",
    "two",
    "three",
]
TARGET_GPU_CAPTIONS_PER_S = 300.0


def jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth random image (compresses like a photo, unlike white noise) as JPEG bytes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_inputs(n_captions: int, n_documents: int) -> tuple[list, list]:
    rng = random.Random(0)
    # DataComp images are resized to at most 512 px on the short side by img2dataset; typical ~ 400-512 px
    captions = [
        (jpeg(rng.randint(300, 640), rng.randint(250, 512), i), sentence(rng, rng.randint(5, 30)))
        for i in range(n_captions)
    ]
    documents = []
    for i in range(n_documents):
        n_img = rng.randint(1, 4)
        texts, images = [], []
        for j in range(n_img):
            texts += [sentence(rng, rng.randint(40, 200)), None]
            images += [None, jpeg(rng.randint(400, 1024), rng.randint(300, 768), 10_000 + 10 * i + j)]
        documents.append({"texts": texts, "images": images})
    return captions, documents


def rate(fn, items) -> tuple[float, int]:
    start = time.perf_counter()
    ok = sum(1 for item in items if not hasattr(fn(item), "reason"))
    return len(items) / (time.perf_counter() - start), ok


def model_rate_cpu(preset: str, tokenizer_dir: Path, samples: list, batch: int) -> dict:
    from unifilter_core import load_scorer
    from unifilter_core.modeling import init_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint(preset, Path(tmp) / "ckpt", tokenizer_dir=tokenizer_dir)
        scorer = load_scorer(ckpt, batch_size=batch)
        prepared = [scorer.processor.prepare_caption(*s) for s in samples]
        scorer.forward(prepared[:batch])
        start = time.perf_counter()
        for i in range(0, len(prepared), batch):
            scorer.forward(prepared[i : i + batch])
        per_s = len(prepared) / (time.perf_counter() - start)
        return {"preset": preset, "captions_per_s": round(per_s, 2), "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--cpu-preset", default="world", help="model preset timed on this CPU ('none' skips)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "reader_throughput.json")
    args = parser.parse_args(argv)

    captions, documents = make_inputs(args.captions, args.documents)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = [sentence(random.Random(i), 12) for i in range(300)]
        tok_dir = train_bpe_tokenizer(corpus, Path(tmp) / "tok", vocab_size=1024)
        processor = UniFilterProcessor(
            load_tokenizer(tok_dir), ProcessingConfig(image_size=384, num_image_tokens=144)
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core, as in a decode worker
        cap_rate, cap_ok = rate(lambda s: processor.prepare_caption(*s), captions)
        doc_rate, doc_ok = rate(lambda d: processor.prepare_document(d["texts"], d["images"]), documents)
        torch.set_num_threads(threads)
        images_per_doc = float(np.mean([sum(x is not None for x in d["images"]) for d in documents]))
        result = {
            "caption_samples_per_s_per_core": round(cap_rate, 1),
            "document_samples_per_s_per_core": round(doc_rate, 1),
            "document_images_per_s_per_core": round(doc_rate * images_per_doc, 1),
            "mean_images_per_document": images_per_doc,
            "ok": {"captions": cap_ok, "documents": doc_ok},
        }
        if args.cpu_preset != "none":
            result["model_on_this_cpu"] = model_rate_cpu(args.cpu_preset, tok_dir, captions[:64], batch=16)
    gpu_file = RESULTS_DIR / "gpu_check.json"
    gpu_rate, source = TARGET_GPU_CAPTIONS_PER_S, "issue target (300 captions/s per H100)"
    if gpu_file.is_file():
        try:
            measured = json.loads(gpu_file.read_text())["summary"]["caption"]["ours_per_s"]
            if measured:
                gpu_rate, source = float(measured), f"measured in {gpu_file.name}"
        except (KeyError, TypeError, ValueError):
            pass
    result["gpu_captions_per_s"] = {"value": gpu_rate, "source": source}
    result["cores_to_feed_one_gpu_captions"] = round(gpu_rate / cap_rate, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
