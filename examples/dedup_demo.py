"""Render a dedup report for a synthetic fleet of apps (no store needed).

    python examples/dedup_demo.py report.html [--format html|table|json]

The apps are built from fake chunk ids so the demo runs instantly; the numbers
look like a real fleet: two chat apps sharing a base model, two image apps
sharing SDXL, a speech app, shared Python wheels and tokenizers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blobstore.dedup import compute, render_table
from blobstore.ids import hash_bytes
from blobstore.manifest import ChunkerInfo, ChunkRef, Entry, Tree
from blobstore.report_html import render_html

MIB = 1 << 20
CHUNKER = ChunkerInfo("fastcdc2020-pyfastcdc", 256 << 10, 768 << 10, 4 << 20)


def blob(name: str, size: int, chunk: int = 4 * MIB) -> tuple[ChunkRef, ...]:
    """Deterministic fake chunks for a named piece of content."""
    refs = []
    for k, off in enumerate(range(0, size, chunk)):
        refs.append(ChunkRef(hash_bytes(f"{name}/{k}".encode()), min(chunk, size - off)))
    return tuple(refs)


def file(path: str, *parts: tuple[ChunkRef, ...]) -> Entry:
    chunks = tuple(c for p in parts for c in p)
    return Entry(path, "file", 0o644, sum(c.size for c in chunks), None, chunks)


def fleet() -> dict[str, Tree]:
    llama = blob("llama-8b", 15_000 * MIB)
    tok = blob("llama-tokenizer", 9 * MIB)
    sdxl = blob("sdxl-base", 6_600 * MIB)
    vae = blob("sdxl-vae", 320 * MIB)
    wheels = blob("torch-wheels", 2_400 * MIB)
    apps = {
        "apps/llama-chat/data": [
            file("models/llama-8b/model.safetensors", llama),
            file("models/llama-8b/tokenizer.json", tok),
            file("models/llama-8b/config.json", blob("llama-config", 1 * MIB)),
            file("venv/torch.whl", wheels),
        ],
        "apps/llama-instruct/data": [
            file("weights/base.safetensors", llama),
            file("weights/tokenizer.json", tok),
            file("weights/adapter.safetensors", blob("instruct-lora", 640 * MIB)),
            file("venv/torch.whl", wheels),
            file("inductor-cache/a100.bin", blob("instruct-inductor", 480 * MIB)),
        ],
        "apps/sdxl-turbo/data": [
            file("sdxl/unet.safetensors", sdxl),
            file("sdxl/vae.safetensors", vae),
            file("venv/torch.whl", wheels),
        ],
        "apps/sdxl-lora-studio/data": [
            file("base/unet.safetensors", sdxl),
            file("base/vae.safetensors", vae),
            file("loras/pixel-art.safetensors", blob("lora-pixel", 220 * MIB)),
            file("loras/watercolor.safetensors", blob("lora-water", 220 * MIB)),
            file("venv/torch.whl", wheels),
        ],
        "apps/whisper-large/data": [
            file("whisper/model.bin", blob("whisper-large-v3", 3_100 * MIB)),
            file("venv/torch.whl", wheels[: len(wheels) * 3 // 4], blob("torch-cu118", 600 * MIB)),
        ],
        "apps/embeddings/data": [
            file("bge/model.safetensors", blob("bge-large", 1_300 * MIB)),
            file("bge/tokenizer.json", tok),
        ],
    }
    return {ref: Tree(CHUNKER, tuple(entries)) for ref, entries in apps.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--format", choices=("html", "table", "json"), default="html")
    args = ap.parse_args()
    report = compute(fleet())
    if args.format == "html":
        text = render_html(report, title="Fleet dedup report — us-east-1")
    elif args.format == "json":
        text = json.dumps(report.to_json(), indent=2) + "\n"
    else:
        text = render_table(report)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
