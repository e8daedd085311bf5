"""prepare at scale: the prepare stage on N generated examples against `datasets`' batched tokenization of the same
texts alone, each side in its own process (time and peak memory), and a train start on the result.

    python -m bench.prepare --examples 1000000          # the issue's size: ~3 minutes on 2 cores
    python -m bench --only prepare                      # 100k examples, as part of the benchmark

The baseline is what any prepare must at least do: `Dataset.map(tokenizer, batched=True)` over the templated texts
(prompt in prepare.template, then the response), already in memory; its reading, templating and the Dataset built
from them are not timed. The prepare side is timed whole: loading the tokenizer, reading the JSONL, checking every
record, tokenizing, masking, splitting and writing the Arrow splits. Both sides import their libraries first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(n: int, path: Path, seed: int = 7) -> None:
    """The bundled dataset's generator, written a pair at a time (this process stays small: its children's
    memory is what is measured)."""
    import random

    spec = importlib.util.spec_from_file_location("make_dataset", ROOT / "scripts/make_dataset.py")
    make_dataset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_dataset)
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(make_dataset.instruction_pair(rng), ensure_ascii=False) + "\n")


def peak_mb() -> float:
    """Peak resident memory of this process (its VmHWM: getrusage's maxrss would also count the memory of the
    process that started it, carried across exec) or of the worker processes it waited for, whichever is larger."""
    status = Path("/proc/self/status")
    own = next((int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")),
               None) if status.exists() else None
    if own is None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def child(mode: str, data: Path, out: Path, num_proc: int) -> dict:
    from finetune.config.params import load_params

    # no task section: the generator's data is what is measured (prepare reads causal_lm then)
    params = load_params(ROOT / "params.yaml", sections=("data", "prepare", "model", "evaluate", "train", "lora",
                                                        "quantization"))
    params.model.model_name = str(ROOT / params.model.model_name)
    params.prepare.num_proc = num_proc
    params.data.path = str(data)
    if mode == "baseline":
        import datasets
        import pyarrow.json as pj

        from finetune.models import load_tokenizer

        table = pj.read_json(str(data))
        template = params.prepare.template
        texts = [template.format(prompt=p) + r for p, r in zip(table["prompt"].to_pylist(),
                                                                 table["response"].to_pylist(), strict=True)]
        del table
        dataset = datasets.Dataset.from_dict({"text": texts})
        del texts
        tokenizer = load_tokenizer(params.model)
        started = time.perf_counter()
        dataset.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"],
                    num_proc=num_proc if num_proc > 1 else None, cache_file_name=str(out / "baseline.arrow"),
                    load_from_cache_file=False)
        return {"seconds": round(time.perf_counter() - started, 2), "peak_mb": peak_mb()}
    if mode == "prepare":
        from finetune.data.prepare import prepare
        from finetune.models import load_tokenizer

        load_tokenizer(params.model)  # the imports it needs, as the baseline's were, outside the timing
        started = time.perf_counter()
        stats = prepare(params, out / "prepared")
        seconds = time.perf_counter() - started
        examples = sum(stats[f"{name}_examples"] for name in ("train", "validation", "test"))
        size = sum(p.stat().st_size for p in (out / "prepared").iterdir())
        return {"seconds": round(seconds, 2), "peak_mb": peak_mb(), "examples": examples,
                "bytes_per_example": round(size / examples, 1), "prepared_mb": round(size / 2**20, 1)}
    # train: set up the Trainer on the prepared splits and draw two batches, memory before and after
    import torch

    from finetune.training.run import trainer_for

    torch.set_num_threads(1)
    before = peak_mb()
    params.train.output_dir = str(out / "checkpoints")
    trainer, _, _ = trainer_for(params, out / "prepared")
    loader = iter(trainer.get_train_dataloader())
    for _ in range(2):
        next(loader)
    train_file = out / "prepared/train.arrow"
    return {"peak_mb": peak_mb(), "peak_mb_before_setup": before,
            "train_split_mb": round(train_file.stat().st_size / 2**20, 1),
            "train_examples": len(trainer.train_dataset)}


def run_child(mode: str, data: Path, out: Path, num_proc: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "bench.prepare", "--child", mode, "--data", str(data),
                           "--out", str(out), "--num-proc", str(num_proc)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench.prepare {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_prepare(examples: int, num_proc: int = 1, rounds: int = 1) -> dict:
    """Baseline and prepare alternately, `rounds` times each; the medians and their ratio; then a train start."""
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "examples.jsonl"
        generate(examples, data)
        baseline, ours = [], []
        for _ in range(rounds):
            baseline.append(run_child("baseline", data, tmp, num_proc))
            ours.append(run_child("prepare", data, tmp, num_proc))
        train = run_child("train", data, tmp, num_proc)
        raw_bytes = data.stat().st_size / examples
    base_s = round(statistics.median(r["seconds"] for r in baseline), 2)
    ours_s = round(statistics.median(r["seconds"] for r in ours), 2)
    return {"examples": examples, "num_proc": num_proc, "rounds": rounds,
            "raw_jsonl_bytes_per_example": round(raw_bytes, 1),
            "tokenize_only_s": base_s, "tokenize_only_peak_mb": max(r["peak_mb"] for r in baseline),
            "prepare_s": ours_s, "prepare_peak_mb": max(r["peak_mb"] for r in ours),
            "prepare_vs_tokenize_only": round(ours_s / base_s, 3),
            "bytes_per_example": ours[-1]["bytes_per_example"], "prepared_mb": ours[-1]["prepared_mb"],
            "train_start": train}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=1, help="tokenizing processes, the same for both sides")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", choices=("baseline", "prepare", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.data, args.out, args.num_proc)))
        return
    print(json.dumps(bench_prepare(args.examples, args.num_proc, args.rounds), indent=2))


if __name__ == "__main__":
    main()
