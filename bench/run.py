"""The benchmark: the pipeline against its baselines, measured side by side in one run on the default model and data.

    python -m bench                       # all measurements, ~12 minutes on 2 CPU cores
    python -m bench --only train,generate --out /tmp/bench.json

Prints one table and writes JSON (bench/results.json) and Markdown (bench/results.md). Every ratio compares two
measurements taken in this run, on this machine, so the figures travel between machines as ratios, not seconds.

  train      our train stage (Trainer + callbacks) vs a plain PyTorch loop: same model, data, batch, precision
  packing    packed vs padded rows (padded to the batch's longest, and to prepare.max_length): tokens/s and loss
  generate   batched generation (evaluate.batch_size) vs one prompt at a time: time and identical outputs
  checkpoint gradient checkpointing on vs off: activation memory kept for backward, and throughput
  flops      achieved training FLOP/s (4·N per token for LoRA, 6·N for full) vs this machine's matmul FLOP/s
  compile    torch.compile on vs off: compile time and steady-state throughput
  dvc        a full `dvc repro` of a copy of this repository, then a no-op `dvc repro` and `dvc status`
  prepare    the prepare stage on 100k generated examples vs `datasets` batched tokenization of the same texts alone:
             time, peak memory, bytes per example on disk, and a train start on the result (bench/prepare.py;
             `python -m bench.prepare --examples 1000000` for a million)
  queue      two experiments through `dvc queue start -j 2` vs one after the other: wall time and identical
             metrics, the cores shared among the running stages (bench/queue.py)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("dvc", "train", "packing", "generate", "checkpoint", "flops", "compile", "prepare", "queue")
TARGETS = {  # what each headline ratio is held to
    "train_vs_plain_loop": 0.9,
    "packed_vs_padded": 1.5,
    "batched_vs_single_generation": 10.0,
}
PREPARE_AT_MOST = 1.3  # prepare's time over tokenizing alone


class StepClock(TrainerCallback):
    """Wall time and real tokens at the end of every optimizer step: data loading, forward, backward, optimizer
    and callbacks all count, as they do for a user."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))


def window(marks: list[tuple[float, int]], skip: int) -> dict:
    """Throughput over the steps after the first `skip` (warm-up: allocator, kernels, first batches), from the median
    step time: on a shared machine a burst of background load slows a few steps, not the median."""
    if len(marks) < skip + 2:
        raise SystemExit(f"--steps: {len(marks)} steps leave fewer than 2 after {skip} warm-up steps; use more")
    (t0, n0), (t1, n1) = marks[skip - 1], marks[-1]
    steps = len(marks) - skip
    median = statistics.median(b[0] - a[0] for a, b in zip(marks[skip - 1:-1], marks[skip:], strict=True))
    return {"steps": steps, "seconds": round(t1 - t0, 3), "tokens": n1 - n0,
            "tokens_per_second": round((n1 - n0) / steps / median, 1), "ms_per_step": round(1000 * median, 2),
            "mean_tokens_per_second": round((n1 - n0) / (t1 - t0), 1)}


def bench_params(params, steps: int, out_dir: Path, **train_overrides):
    """Default params for a timed run of `steps` optimizer steps: no evaluation, checkpoints or logging inside."""
    from finetune.config.params import Params

    p: Params = copy.deepcopy(params)
    p.train.max_steps, p.train.warmup_steps = steps, min(p.train.warmup_steps, steps // 2)
    p.train.eval_steps = p.train.save_steps = steps + 1
    p.train.output_dir = str(out_dir / "checkpoints")
    for key, value in train_overrides.items():
        setattr(p.train, key, value)
    return p


def trainer_run(params, prepared: Path, steps: int, skip: int, out_dir: Path, collator=None, log_every_step=False,
                **overrides) -> dict:
    """Our train stage's Trainer for `steps` steps, logging as params say (or every step, for the loss curve);
    throughput after `skip`."""
    from finetune.batching import padding_fraction
    from finetune.training.run import trainer_for

    if log_every_step:
        overrides["logging_steps"] = 1
    p = bench_params(params, steps, out_dir, **overrides)
    trainer, _, _ = trainer_for(p, prepared, run_fingerprint="bench")
    if collator is not None:
        trainer.data_collator = collator(trainer)
    for callback in (PrinterCallback, ProgressCallback):  # one line per step would bury the table
        trainer.remove_callback(callback)
    clock = StepClock()
    trainer.add_callback(clock)
    started = time.perf_counter()
    trainer.train()
    result = window(clock.marks, skip)
    result["total_seconds"] = round(time.perf_counter() - started, 2)
    result["losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result["padding_fraction"] = padding_fraction(trainer.tokens_real, trainer.tokens_computed)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return result


def plain_loop(params, prepared: Path, steps: int, skip: int) -> dict:
    """The baseline: a textbook PyTorch loop over the same model (base + the same LoRA), data, collator, batch size,
    optimizer (AdamW), schedule, gradient clipping and precision."""
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup, set_seed

    from finetune.batching import PackedCollator, real_tokens
    from finetune.data.prepared import training_split
    from finetune.models import load_base_model, load_tokenizer, lora_config

    set_seed(params.train.seed)
    rows = training_split(prepared, "train")
    tokenizer = load_tokenizer(params.model)
    model = load_base_model(params.model)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(params.lora, "CAUSAL_LM")) if params.train.method == "lora" else model
    model.train()
    loader = torch.utils.data.DataLoader(rows, batch_size=params.train.per_device_train_batch_size, shuffle=True,
                                         collate_fn=PackedCollator(tokenizer.pad_token_id, params.prepare.max_length))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.train.learning_rate,
                                  weight_decay=params.train.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, min(params.train.warmup_steps, steps // 2), steps)
    marks, tokens, step = [], 0, 0
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += real_tokens(batch)
            step += 1
            marks.append((time.perf_counter(), tokens))
            if step == steps:
                break
    return window(marks, skip)


def bench_train(params, prepared: Path, tmp: Path, steps: int, rounds: int) -> dict:
    skip = max(3, steps // 6)
    runs = {"ours": [], "plain": []}
    for _ in range(rounds):  # interleaved, the median run of each: background load hits both alike
        runs["plain"].append(plain_loop(params, prepared, steps, skip))
        runs["ours"].append(trainer_run(params, prepared, steps, skip, tmp))
    ours = sorted(runs["ours"], key=lambda r: r["tokens_per_second"])[rounds // 2]
    plain = sorted(runs["plain"], key=lambda r: r["tokens_per_second"])[rounds // 2]
    ours.pop("losses")
    return {"ours": ours, "plain_loop": plain, "all_runs_tokens_per_second": {
                k: [r["tokens_per_second"] for r in v] for k, v in runs.items()},
            "ratio": round(ours["tokens_per_second"] / plain["tokens_per_second"], 3),
            "target": TARGETS["train_vs_plain_loop"]}


def bench_packing(params, prepared: Path, tmp: Path, steps: int, rounds: int) -> dict:
    from transformers import DataCollatorForSeq2Seq

    from finetune.batching import IGNORE_INDEX

    skip = max(3, steps // 6)

    def to_max_length(trainer):
        return DataCollatorForSeq2Seq(trainer.processing_class, padding="max_length",
                                      max_length=params.prepare.max_length, label_pad_token_id=IGNORE_INDEX)

    runs = {"packed": [], "padded": []}
    for _ in range(rounds):  # interleaved, the median run of each: background load hits both alike
        runs["packed"].append(trainer_run(params, prepared, steps, skip, tmp, packing=True))
        runs["padded"].append(trainer_run(params, prepared, steps, skip, tmp, packing=False))
    packed, padded = (sorted(runs[k], key=lambda r: r["tokens_per_second"])[rounds // 2]
                      for k in ("packed", "padded"))
    fixed = trainer_run(params, prepared, steps, skip, tmp, collator=to_max_length, packing=False)
    # Equal loss: the same examples each step, so the same loss curve, once dropout (whose random mask depends on
    # the tensor layout) is off.
    no_dropout = copy.deepcopy(params)
    no_dropout.lora.lora_dropout = 0.0
    curves = [trainer_run(no_dropout, prepared, 12, 3, tmp, log_every_step=True, packing=on)["losses"]
              for on in (True, False)]
    deltas = [abs(a - b) / abs(b) for a, b in zip(*curves, strict=True)]
    return {
        "packed": packed, "padded_to_longest": padded, "padded_to_max_length": fixed,
        "all_runs_tokens_per_second": {k: [r["tokens_per_second"] for r in v] for k, v in runs.items()},
        "ratio": round(packed["tokens_per_second"] / padded["tokens_per_second"], 3),
        "ratio_vs_max_length": round(packed["tokens_per_second"] / fixed["tokens_per_second"], 3),
        # the most packing can gain over padding to the longest: the tokens padding computes for nothing
        "ratio_bound": round((1 - packed["padding_fraction"]) / (1 - padded["padding_fraction"]), 3),
        "max_relative_loss_difference": float(f"{max(deltas):.3g}"),  # over 12 steps, lora_dropout 0
        "target": TARGETS["packed_vs_padded"],
    }


def bench_generate(params, prepared: Path, prompts: int, repo: Path | None) -> dict:
    """On the fine-tuned model when the dvc section trained one in `repo` (answers of realistic length), else on
    the base."""
    from finetune.config.evaluate import EvaluateParams
    from finetune.data.prepared import open_split, split_file
    from finetune.generation import generate
    from finetune.models import load_base_model, load_finetuned, load_tokenizer

    test = open_split(split_file(prepared, "test"))
    texts = list(test.select(range(min(prompts, len(test))))["prompt"])
    tokenizer = load_tokenizer(params.model)
    finetuned = repo is not None
    if finetuned:
        with contextlib.chdir(repo):  # its train_config names the base relative to the repository
            model = load_finetuned(Path(params.train.finetuned_dir)).eval()
    else:
        model = load_base_model(params.model).eval()
    greedy = EvaluateParams(batch_size=params.evaluate.batch_size, max_new_tokens=params.evaluate.max_new_tokens)
    generate(model, tokenizer, texts[:4], greedy)  # warm-up
    started = time.perf_counter()
    batched = generate(model, tokenizer, texts, greedy)
    batched_s = time.perf_counter() - started
    started = time.perf_counter()
    single_params = dataclasses.replace(greedy, batch_size=1)
    single = [generate(model, tokenizer, [t], single_params)[0] for t in texts]
    single_s = time.perf_counter() - started
    return {"model": "finetuned" if finetuned else "base", "prompts": len(texts),
            "new_tokens": sum(len(tokenizer(t)["input_ids"]) for t in batched), "batch_size": greedy.batch_size,
            "max_new_tokens": greedy.max_new_tokens,
            "batched_s": round(batched_s, 2), "single_s": round(single_s, 2),
            "ratio": round(single_s / batched_s, 2), "identical_outputs": sum(a == b for a, b in zip(batched, single)),
            "target": TARGETS["batched_vs_single_generation"]}


def saved_activation_bytes(model, batch) -> int:
    """Bytes of tensors autograd keeps from the forward pass for the backward pass (what gradient checkpointing
    trades for recomputation); measured with saved-tensor hooks, so it is exact on CPU too."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def on_off(params, prepared: Path, tmp: Path, steps: int, setting: str) -> dict:
    """Our train stage with a boolean train param off, then on: {"off": result, "on": result}."""
    skip = max(3, steps // 6)
    out = {}
    for on in (False, True):
        result = trainer_run(params, prepared, steps, skip, tmp, **{setting: on})
        result.pop("losses")
        out["on" if on else "off"] = result
    return out


def bench_checkpointing(params, prepared: Path, tmp: Path, steps: int) -> dict:
    from finetune.training.run import trainer_for

    out = on_off(params, prepared, tmp, steps, "gradient_checkpointing")
    for on in (False, True):
        p = bench_params(params, 1, tmp, gradient_checkpointing=on)
        trainer, _, _ = trainer_for(p, prepared, run_fingerprint="bench")
        trainer.model.train()
        if on:  # the Trainer turns it on when training starts; do the same for the measured pass
            trainer.model.gradient_checkpointing_enable({"use_reentrant": False})
        batch = next(iter(trainer.get_train_dataloader()))
        out["on" if on else "off"]["activation_mb"] = round(saved_activation_bytes(trainer.model, batch) / 2**20, 2)
    out["memory_ratio"] = round(out["on"]["activation_mb"] / out["off"]["activation_mb"], 3)
    out["throughput_ratio"] = round(out["on"]["tokens_per_second"] / out["off"]["tokens_per_second"], 3)
    return out


def matmul_flops(seconds: float = 3.0) -> dict:
    """This machine's fp32 matmul FLOP/s: the best of a few square sizes, each timed for about seconds/3."""
    best = {}
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            a @ b
            count += 1
        best[n] = 2 * n**3 * count / (time.perf_counter() - started)
    n = max(best, key=best.get)
    return {"flops": best[n], "size": n, "threads": torch.get_num_threads()}


def bench_flops(params, train_result: dict) -> dict:
    from transformers import AutoConfig

    from finetune.models import load_base_model

    model = load_base_model(params.model)
    config = AutoConfig.from_pretrained(params.model.model_name)
    n = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:  # an untied input embedding is a lookup, not a matmul
        n -= model.get_input_embeddings().weight.numel()
    per_token = 6 if params.train.method == "full" else 4  # frozen weights: no weight gradients
    achieved = per_token * n * train_result["ours"]["tokens_per_second"]
    peak = matmul_flops()
    return {"matmul_params": n, "flops_per_token": per_token * n, "achieved_flops": round(achieved),
            "machine_matmul_flops": round(peak["flops"]), "matmul_size": peak["size"], "threads": peak["threads"],
            "fraction": round(achieved / peak["flops"], 3),
            "note": f"{per_token}·N per non-padding token; attention scores and padding are not counted"}


def bench_compile(params, prepared: Path, tmp: Path, steps: int) -> dict:
    out = on_off(params, prepared, tmp, steps, "torch_compile")
    for result in out.values():  # the first steps hold the compilation: total time minus the steady-state steps
        result["startup_seconds"] = round(result["total_seconds"] - result["seconds"], 2)
    out["ratio"] = round(out["on"]["tokens_per_second"] / out["off"]["tokens_per_second"], 3)
    return out


def timed(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started


def copy_repository(dest: Path) -> None:
    """This working tree (tracked and untracked files git does not ignore) as a new git + DVC repository."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file() and not name.startswith((".dvc/cache", "metrics/", "outputs/", "models/finetuned",
                                                  "models/merged", "dvc.lock", "bench/results")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)


def bench_dvc(tmp: Path) -> tuple[dict, Path]:
    repo = tmp / "repo"
    repo.mkdir()
    copy_repository(repo)
    full = timed(["dvc", "repro"], repo)
    noop = timed(["dvc", "repro"], repo)
    status = timed(["dvc", "status"], repo)
    return {"full_repro_s": round(full, 1), "noop_repro_s": round(noop, 2), "status_s": round(status, 2),
            "noop_share_of_run": round(noop / full, 4), "status_share_of_run": round(status / full, 4)}, repo


def table(results: dict) -> str:
    rows = [("measurement", "result", "target", "met")]

    def add(name, value, target=None, at_most=False):
        met = "" if target is None else ("yes" if (value <= target if at_most else value >= target) else "no")
        rows.append((name, value if isinstance(value, str) else f"{value:g}×", "" if target is None else
                     f"{'≤' if at_most else '≥'} {target:g}×", met))

    if "train" in results:
        r = results["train"]
        add(f"train stage vs plain loop ({r['ours']['tokens_per_second']:.0f} vs "
            f"{r['plain_loop']['tokens_per_second']:.0f} tok/s)", r["ratio"], r["target"])
    if "packing" in results:
        r = results["packing"]
        add(f"packed vs padded to longest ({r['packed']['tokens_per_second']:.0f} vs "
            f"{r['padded_to_longest']['tokens_per_second']:.0f} tok/s; padding "
            f"{r['padded_to_longest']['padding_fraction']:.0%} vs filler {r['packed']['padding_fraction']:.0%}, "
            f"bound {r['ratio_bound']:g}×)", r["ratio"], r["target"])
        add(f"packed vs padded to max_length ({r['padded_to_max_length']['tokens_per_second']:.0f} tok/s)",
            r["ratio_vs_max_length"])
        rows.append(("packed vs padded: max relative loss difference", f"{r['max_relative_loss_difference']:.2g}",
                     "equal loss", "yes" if r["max_relative_loss_difference"] < 1e-4 else "no"))
    if "generate" in results:
        r = results["generate"]
        add(f"batched vs one-at-a-time generation ({r['prompts']} prompts: {r['batched_s']} s vs "
            f"{r['single_s']} s; identical {r['identical_outputs']}/{r['prompts']})", r["ratio"], r["target"])
    if "checkpoint" in results:
        r = results["checkpoint"]
        rows.append(((f"gradient checkpointing: activations {r['off']['activation_mb']} → "
                      f"{r['on']['activation_mb']} MB, throughput {r['off']['tokens_per_second']:.0f} → "
                      f"{r['on']['tokens_per_second']:.0f} tok/s"),
                     f"memory {r['memory_ratio']:g}×, speed {r['throughput_ratio']:g}×", "", ""))
    if "flops" in results:
        r = results["flops"]
        rows.append(((f"achieved {r['achieved_flops'] / 1e9:.1f} GFLOP/s of "
                      f"{r['machine_matmul_flops'] / 1e9:.1f} (matmul, {r['threads']} threads)"),
                     f"{r['fraction']:.1%} of peak", "", ""))
    if "compile" in results:
        r = results["compile"]
        rows.append(((f"torch.compile: {r['off']['tokens_per_second']:.0f} → {r['on']['tokens_per_second']:.0f} "
                      f"tok/s, startup {r['off']['startup_seconds']} → {r['on']['startup_seconds']} s"),
                     f"{r['ratio']:g}×",
                     "", ""))
    if "dvc" in results:
        r = results["dvc"]
        rows.append(((f"DVC: no-op repro {r['noop_repro_s']} s, status {r['status_s']} s, full repro "
                      f"{r['full_repro_s']} s"), f"{r['noop_share_of_run']:.1%} of a run", "", ""))
    if "prepare" in results:
        r = results["prepare"]
        add(f"prepare {r['examples']:,} examples vs tokenizing alone ({r['prepare_s']} vs {r['tokenize_only_s']} s; "
            f"peak {r['prepare_peak_mb']:.0f} MB; {r['bytes_per_example']:.0f} bytes/example on disk)",
            r["prepare_vs_tokenize_only"], PREPARE_AT_MOST, at_most=True)
        t = r["train_start"]
        rows.append((f"train start on {t['train_examples']:,} prepared examples ({t['train_split_mb']} MB split)",
                     f"peak {t['peak_mb']:.0f} MB", "", ""))
    if "queue" in results:
        r = results["queue"]
        add(f"dvc queue start -j 2 vs one after the other (2 experiments of {r['steps']} steps: {r['queue_j2_s']} vs "
            f"{r['sequential_s']} s; identical metrics: {'yes' if r['identical_metrics'] else 'NO'}; without "
            f"sharing the cores {r['queue_j2_unshared_s']} s, {r['unshared_ratio']:g}×)", r["ratio"], r["target"],
            at_most=True)
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from finetune.config.params import load_params
    from finetune.config.task import TaskParams

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per timed training run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per side of a throughput ratio")
    parser.add_argument("--prompts", type=int, default=128, help="test prompts for the generation benchmark")
    parser.add_argument("--prepare-examples", type=int, default=100_000, help="examples for the prepare benchmark")
    parser.add_argument("--prepare-rounds", type=int, default=2, help="runs per side of the prepare benchmark")
    parser.add_argument("--queue-steps", type=int, default=100, help="training steps of each queued experiment")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results.json")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if unknown := only - set(SECTIONS):
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if "flops" in only and "train" not in only:
        parser.error("--only: flops is computed from the train section's throughput; add train")

    # what is measured is the generator's training, whatever task params.yaml names
    params = dataclasses.replace(load_params(ROOT / "params.yaml"), task=TaskParams())
    results: dict = {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "cuda": torch.cuda.is_available()}}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_name:
        tmp = Path(tmp_name)
        prepared, repo = tmp / "prepared", None
        if "dvc" in only:  # a full pipeline run in a copy; its prepared data feeds the rest
            print("dvc: full repro of a copy of this repository, then no-op repro and status", file=sys.stderr)
            results["dvc"], repo = bench_dvc(tmp)
            shutil.copytree(repo / "data/prepared", prepared)
        else:
            from finetune.data.prepare import prepare

            prepare(params, prepared)
        os.chdir(tmp)  # relative model paths in params resolve against the repository root
        params.model.model_name = str(ROOT / params.model.model_name) \
            if (ROOT / params.model.model_name).exists() else params.model.model_name
        steps = args.steps
        for name, run in (("train", lambda: bench_train(params, prepared, tmp, steps, args.rounds)),
                          ("packing", lambda: bench_packing(params, prepared, tmp, steps, args.rounds)),
                          ("generate", lambda: bench_generate(params, prepared, args.prompts, repo)),
                          ("checkpoint", lambda: bench_checkpointing(params, prepared, tmp, steps)),
                          ("compile", lambda: bench_compile(params, prepared, tmp, steps))):
            if name in only:
                print(f"{name}...", file=sys.stderr)
                started = time.perf_counter()
                results[name] = run()
                results[name]["bench_seconds"] = round(time.perf_counter() - started, 1)
        if "prepare" in only:
            from bench.prepare import bench_prepare

            print("prepare...", file=sys.stderr)
            started = time.perf_counter()
            results["prepare"] = bench_prepare(args.prepare_examples, rounds=args.prepare_rounds)
            results["prepare"]["bench_seconds"] = round(time.perf_counter() - started, 1)
        if "queue" in only:
            from bench.queue import bench_queue

            print("queue...", file=sys.stderr)
            started = time.perf_counter()
            results["queue"] = bench_queue(tmp, args.queue_steps)
            results["queue"]["bench_seconds"] = round(time.perf_counter() - started, 1)
        if "flops" in only and "train" in results:
            results["flops"] = bench_flops(params, results["train"])
        os.chdir(ROOT)
    text = table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
