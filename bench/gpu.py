"""GPU benchmark: our train stage on a Qwen2.5-0.5B-shaped model (random weights from a config, nothing downloaded),
LoRA in bf16 with packing and QLoRA (nf4), reporting tokens/s, MFU, and peak memory beside the memory plan's
estimate, in one table.

    python -m bench.gpu                  # on a CUDA machine, ~2-3 minutes
    python -m bench.gpu --toy            # a tiny model of the same family: runs anywhere, CPU included
    python -m bench.gpu --processes 1,2,4,8   # also DDP scaling on this node (default on GPUs: powers of two)
    python -m bench.gpu --processes 1,2,4,8 --strategy fsdp   # the same with the model sharded (FSDP2)

Mixed-length synthetic examples (64 to 512 tokens, the second half supervised) go through the same code as
`dvc repro train`: finetune.training.run.trainer_for with the PackedCollator, the precision choice and
bitsandbytes loading.
MFU = 4·N·(non-padding tokens/s) / the measured bf16 matmul FLOP/s of this device (LoRA: no weight gradients for
the frozen base); the vendor's dense bf16 peak, where known, is printed beside it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.run import ROOT, StepClock, window

QWEN25_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "rope_theta": 1e6, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
TOY = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rope_theta": 1e6,
       "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
VENDOR_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}  # dense, no sparsity


def build_model(shape: dict, out: Path) -> None:
    """A randomly initialized Qwen2 of `shape`, saved as safetensors with the bundled tokenizer beside it (the
    tokenizer only supplies the pad and EOS ids; the synthetic data holds token ids directly)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models/base")
    config = Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model


def synthetic_split(prepared: Path, split: str, n: int, vocab: int, lengths: tuple[int, int], seed: int) -> None:
    """Random token ids as a prepared split (an Arrow file, as the prepare stage writes them)."""
    import pyarrow as pa

    from finetune.data.prepared import META, split_file

    rng = random.Random(seed)
    prepared.mkdir(parents=True, exist_ok=True)
    rows = {"input_ids": [], "labels": []}
    for _ in range(n):
        length = rng.randint(*lengths)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * (length // 2) + ids[length // 2:])
    table = pa.table({k: pa.array(v, pa.list_(pa.int32())) for k, v in rows.items()})
    with pa.OSFile(str(split_file(prepared, split)), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
        out.write_table(table)
    (prepared / META).write_text(json.dumps({"format": "pairs", "chat": None}) + "\n")


def matmul_peak(dtype: torch.dtype, device: str) -> float:
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < 2.0:
        a @ b
        count += 1
    sync()
    return 2 * n**3 * count / (time.perf_counter() - started)


def run_method(base_params, model_dir: Path, prepared: Path, work: Path, method: str, steps: int,
               batch: int, row_length: int, packing: bool = True) -> dict:
    from finetune.batching import padding_fraction
    from finetune.memory import plan_run
    from finetune.models import trainable_parameters
    from finetune.training.precision import peak_memory, reset_peak_memory, resident_mb
    from finetune.training.run import trainer_for

    p = copy.deepcopy(base_params)
    p.model.model_name = str(model_dir)
    p.train.method, p.train.bf16, p.train.packing = method, True, packing
    p.train.per_device_train_batch_size, p.train.per_device_eval_batch_size = batch, batch
    p.train.max_steps, p.train.warmup_steps, p.train.learning_rate = steps, 2, 2e-4
    p.train.eval_steps = p.train.save_steps = p.train.logging_steps = steps + 1
    p.train.output_dir = str(work / f"checkpoints-{method}")
    p.prepare.max_length = row_length
    p.lora.r, p.lora.lora_alpha, p.lora.target_modules = 16, 32, "all-linear"
    p.quantization.bnb_4bit_compute_dtype = "bfloat16"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    resident = resident_mb()
    trainer, precision, base_mb = trainer_for(p, prepared, run_fingerprint="bench-gpu")
    kind = reset_peak_memory(precision.device)  # as the train stage does: the peak of training, the model loaded
    plan = plan_run(p, precision.dtype)
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    result = window(clock.marks, max(2, steps // 5))
    trainable, total = trainable_parameters(trainer.model)
    result.update(method=method, precision=precision.dtype, device=precision.device,
                  base_weight_mb=round(base_mb, 3), trainable_params=trainable, total_params=total,
                  padding_fraction=padding_fraction(trainer.tokens_real, trainer.tokens_computed),
                  memory_plan_mb=round(plan.total / 2**20, 1), **peak_memory(precision.device, resident, kind))
    measured = result.get("peak_memory_above_start_mb", result["peak_memory_mb"])
    result["peak_over_plan"] = round(measured / result["memory_plan_mb"], 3)
    del trainer
    shutil.rmtree(p.train.output_dir, ignore_errors=True)
    return result


def scaling(model_dir: Path, prepared: Path, work: Path, counts: list[int], steps: int, batch: int,
            row_length: int, bf16: bool, strategy: str = "ddp") -> list[dict]:
    """Tokens/s of the train stage itself (`python -m stages.train`, which starts its own workers) on 1, 2, ... N
    processes of this node, `strategy` (ddp or fsdp), LoRA, each process `batch` examples a step (the global batch
    grows with N), and the efficiency against N times one process. On CPU the processes share the cores
    (OMP_NUM_THREADS = cores / N)."""
    import yaml

    out = []
    for n in counts:
        run = work / f"scaling-{n}"
        run.mkdir()
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["model"]["model_name"] = str(model_dir)
        params["prepare"]["max_length"] = row_length
        params["train"].update(method="lora", bf16=bf16, per_device_train_batch_size=batch, max_steps=steps,
                               warmup_steps=2, learning_rate=2e-4, eval_steps=steps + 1, save_steps=steps + 1,
                               logging_steps=steps + 1)
        params["lora"].update(r=16, lora_alpha=32, target_modules="all-linear")
        params["distributed"].update(nproc_per_node=n, strategy=strategy)
        (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        shutil.copy(ROOT / "dvc.yaml", run / "dvc.yaml")  # names the outputs the stage may replace
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the launcher shares the cores
        done = subprocess.run([sys.executable, "-m", "stages.train", "--prepared", str(prepared), "--metrics",
                               "train.json", "--history", "live"], cwd=run, capture_output=True, text=True,
                              env={**env, "PYTHONPATH": str(ROOT)}, timeout=3600)
        if done.returncode:
            raise RuntimeError(f"{n} processes: {done.stderr[-3000:]}")
        metrics = json.loads((run / "train.json").read_text())["training"]
        out.append({"processes": n, "strategy": metrics["strategy"], "tokens_per_second": metrics["tokens_per_second"],
                    "tokens_trained": metrics["tokens_trained"], "train_time_s": metrics["train_time_s"]})
        out[-1]["efficiency"] = round(out[-1]["tokens_per_second"] / (n * out[0]["tokens_per_second"]), 3)
        print(f"{n} processes: {metrics['tokens_per_second']:,.0f} tokens/s, efficiency {out[-1]['efficiency']:.0%}",
              file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    from finetune.config.params import load_params
    from finetune.config.task import TaskParams

    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="a tiny model of the same family (CPU is fine)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=None, help="examples per step (default 32; toy 8)")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--processes", help="also measure scaling on this node, e.g. 1,2,4,8 (default: 1 and "
                        "every power of two up to the GPUs; none on CPU)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="how --processes share the model")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/gpu_results.json")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.toy:
        parser.error("no CUDA device: run with --toy for a CPU-sized check of the same code")
    shape = TOY if args.toy else QWEN25_05B
    batch = args.batch or (8 if args.toy else 32)
    lengths, row_length = ((16, 96), 128) if args.toy else ((64, 512), 2048)

    # the generator's training is what is measured, whatever task params.yaml names
    base_params = dataclasses.replace(load_params(ROOT / "params.yaml"), task=TaskParams())
    device = torch.cuda.get_device_name() if cuda else "cpu"
    results: dict = {"device": device, "model": "toy Qwen2" if args.toy else "Qwen2.5-0.5B-shaped (random weights)",
                     "examples_per_step": batch, "example_lengths": lengths, "row_length": row_length}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        build_model(shape, tmp / "model")
        for split, n in (("train", batch * (args.steps + 2)), ("validation", batch)):
            synthetic_split(tmp / "prepared", split, n, shape["vocab_size"], lengths, seed=len(split))
        results["setup_seconds"] = round(time.perf_counter() - started, 1)
        peak = matmul_peak(torch.bfloat16, "cuda" if cuda else "cpu")
        results["measured_bf16_matmul_flops"] = round(peak)
        vendor = next((v for k, v in VENDOR_PEAK_BF16.items() if k in device), None)
        results["vendor_bf16_peak_flops"] = vendor
        for method in args.methods.split(","):
            print(f"{method}...", file=sys.stderr)
            r = run_method(base_params, tmp / "model", tmp / "prepared", tmp, method, args.steps, batch, row_length)
            n = r["total_params"] - (0 if shape["tie_word_embeddings"] else shape["vocab_size"] * shape["hidden_size"])
            # toy: a model this small measures Python overhead, not the hardware
            r["mfu_measured_peak"] = None if args.toy else round(4 * n * r["tokens_per_second"] / peak, 4)
            r["mfu_vendor_peak"] = round(4 * n * r["tokens_per_second"] / vendor, 4) if vendor else None
            results[method] = r
        counts = [int(n) for n in args.processes.split(",")] if args.processes else \
            [2**i for i in range(torch.cuda.device_count().bit_length())] if cuda else []
        if counts and counts != [1]:
            print(f"scaling over {counts} processes...", file=sys.stderr)
            results["scaling"] = scaling(tmp / "model", tmp / "prepared", tmp, counts, args.steps, batch,
                                         row_length, bf16=cuda, strategy=args.strategy)
    rows = [("method", "tokens/s", "MFU (measured peak)", "MFU (vendor peak)", "peak memory MB", "plan MB",
             "peak / plan", "base weights MB", "filler")]
    for method in args.methods.split(","):
        r = results[method]
        mfu = f"{r['mfu_measured_peak']:.1%}" if r["mfu_measured_peak"] else "-"
        rows.append((f"{method} ({r['precision']})", f"{r['tokens_per_second']:.0f}", mfu,
                     f"{r['mfu_vendor_peak']:.1%}" if r["mfu_vendor_peak"] else "-", f"{r['peak_memory_mb']:.0f}",
                     f"{r['memory_plan_mb']:.0f}", f"{r['peak_over_plan']:.2f}", f"{r['base_weight_mb']:.0f}",
                     f"{r['padding_fraction']:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows)
    for r in results.get("scaling", []):
        text += (f"\n{r['processes']} processes ({r['strategy']}): {r['tokens_per_second']:,.0f} tokens/s, "
                 f"{r['efficiency']:.0%} of {r['processes']} x one process")
    print(f"{results['model']} on {device}; measured bf16 matmul {peak / 1e12:.1f} TFLOP/s\n{text}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
