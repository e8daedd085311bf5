"""The memory plan against measured peak memory: a Qwen2.5-0.5B-shaped model (random weights from its config,
nothing downloaded) trained a few steps by the train stage's Trainer, LoRA in bf16 and QLoRA, each in its own
process; the plan's estimate beside the measured peak, and their ratio.

    python -m bench.memory               # CPU: ~3 minutes on 2 cores; the resident set's rise during the run
    python -m bench.memory --steps 20    # on a GPU: CUDA memory allocated (bench.gpu reports it too, with speed)

On CPU the measured peak is the process's resident high-water mark, reset once the model has loaded, minus its
resident memory before the model loaded. glibc keeps freed blocks for reuse, which the resident set would count as
used (measured once here: about 1.5 GB more for QLoRA), so each run sets MALLOC_MMAP_THRESHOLD_=65536:
big blocks then go back to the system when freed and the resident set follows the live tensors. The rows are
padded (4 examples of 64 to 256 tokens: at most the 1,024 tokens the plan counts), not packed: packing's check
compares a random bf16 model's tiny logits at a tolerance made for trained ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import ROOT


def one(method: str, steps: int, batch: int, row_length: int) -> dict:
    from bench.gpu import QWEN25_05B, build_model, run_method, synthetic_split
    from finetune.config.params import load_params

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        build_model(QWEN25_05B, tmp / "model")
        for split, n in (("train", batch * (steps + 2)), ("validation", batch)):
            synthetic_split(tmp / "prepared", split, n, QWEN25_05B["vocab_size"], (64, row_length), seed=len(split))
        r = run_method(load_params(ROOT / "params.yaml"), tmp / "model", tmp / "prepared", tmp, method, steps, batch,
                       row_length, packing=False)
    keys = ("method", "precision", "device", "memory_plan_mb", "peak_memory_mb", "peak_memory_kind",
            "peak_memory_above_start_mb", "peak_over_plan", "base_weight_mb")
    return {k: r[k] for k in keys if k in r}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--row-length", type=int, default=256)
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a method, measured in this process
    parser.add_argument("--out", type=Path, default=ROOT / "bench/memory_results.json")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.batch, args.row_length)))
        return
    results = []
    for method in args.methods.split(","):  # each in a fresh process: its own peak
        done = subprocess.run([sys.executable, "-m", "bench.memory", "--one", method, "--steps", str(args.steps),
                               "--batch", str(args.batch), "--row-length", str(args.row_length)],
                              cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        measured = r.get("peak_memory_above_start_mb", r["peak_memory_mb"])
        print(f"{method} ({r['precision']}, {r['device']}): plan {r['memory_plan_mb']:.0f} MB, measured "
              f"{measured:.0f} MB ({r['peak_memory_kind']}), measured / plan {r['peak_over_plan']:.2f}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
