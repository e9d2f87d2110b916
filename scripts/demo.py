"""Make a small model-like directory for the demo: config, tokenizer, weights.

Two "apps" share the same base weights (dedup), one has its own adapter.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path


def write_random(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(rng.randbytes(n))
            left -= n


def main(root: Path, mib: int) -> None:
    model = root / "llama-chat" / "models" / "llama-mini"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"hidden_size": 4096, "layers": 32}, indent=2))
    (model / "tokenizer.json").write_text(json.dumps({"vocab": [f"tok{i}" for i in range(5000)]}))
    write_random(model / "model-00001-of-00002.safetensors", mib * (1 << 20) // 2, seed=1)
    write_random(model / "model-00002-of-00002.safetensors", mib * (1 << 20) // 2, seed=2)
    (model / "weights-latest").unlink(missing_ok=True)
    os.symlink("model-00001-of-00002.safetensors", model / "weights-latest")
    (root / "llama-chat" / "inductor-cache").mkdir(exist_ok=True)
    print(f"made {model} ({mib} MiB of weights)")


def describe(doc: dict[str, object]) -> str:
    """One line for a pull/push --json document."""
    mib = 1 << 20
    if "from" in doc:
        f = doc["from"]
        assert isinstance(f, dict)
        return (
            f"  {doc['files']} files, {int(doc['bytes']) / mib:.1f} MiB "  # type: ignore[call-overload]
            f"in {doc['seconds']}s  <- local {f['local'] / mib:.1f} MiB | "
            f"peer {f['peer'] / mib:.1f} MiB | origin {f['origin'] / mib:.1f} MiB"
        )
    return f"  uploaded {doc['new_bytes']} new bytes of {doc['bytes']}"


if __name__ == "__main__":
    if sys.argv[1] == "describe":
        print(describe(json.load(sys.stdin)))
    else:
        main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 256)
