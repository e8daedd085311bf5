"""memory_plan: will a training run fit in memory? The train stage's memory plan for any model config and memory
size, on any machine (no GPU needed): the model is built on the meta device from its config.json, no weight is
downloaded or loaded.

    python -m tools.memory_plan                      # params.yaml's run, against this machine's GPU (or RAM)
    python -m tools.memory_plan -S model.model_name=Qwen/Qwen2.5-7B -S train.method=qlora -S lora.r=16 \
        -S train.max_tokens_per_batch=2048 --memory-gib 24   # will Qwen2.5-7B QLoRA r=16 fit in 24 GB?
    python -m tools.memory_plan --config path/to/config.json -S train.method=full -S train.fp16=true --memory-gib 80
    python -m tools.memory_plan -S model.model_name=meta-llama/Llama-3.1-70B -S train.method=qlora \
        -S distributed.strategy=fsdp -S distributed.nproc_per_node=8 --memory-gib 80   # each of 8 GPUs' share
    python -m tools.memory_plan --json ...           # the components as JSON, as metrics/train.json records them

`-S section.key=value` overrides params.yaml as `dvc exp run -S` does (the value is YAML), and is validated like
it. A hub id in model.model_name fetches its config.json only (or reads the Hugging Face cache); `--config` reads a
local config.json or model folder instead. The precision is the run's: train.bf16 or train.fp16, else fp32.
Exit 0 when the run fits, 1 when it does not (the train stage would refuse it on that GPU), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from finetune.config.params import PARAMS_FILE, parse_params
from finetune.config.schema import ParamsError
from finetune.entrypoint import run_main
from finetune.memory import (
    advice,
    available_memory,
    estimate,
    for_processes,
    micro_batch_tokens,
    plan_run,
    size,
    skeleton,
)
from finetune.tasks import task_for

SECTIONS = ["task", "model", "train", "lora", "quantization", "prepare", "distributed"]


def overridden(text: str, overrides: list[str]) -> str:
    """params.yaml's text with `section.key=value` overrides applied (values read as YAML)."""
    raw = yaml.safe_load(text) or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        path = key.split(".")
        if not sep or len(path) != 2:
            raise ParamsError([f"-S {override}: expected section.key=value, e.g. -S train.method=qlora"])
        raw.setdefault(path[0], {})[path[1]] = yaml.safe_load(value)
    return yaml.safe_dump(raw, sort_keys=False)


def main() -> None:
    parser = argparse.ArgumentParser(description="Estimate a training run's peak memory from the model config.")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--config", type=Path, help="a config.json (or a model folder) instead of model.model_name")
    parser.add_argument("--memory-gib", type=float,
                        help="the memory to plan for, in GiB as GPUs are sized (a 24 GB card: 24); "
                        "default: this machine's free GPU memory, or its available RAM")
    parser.add_argument("--nodes", type=int, default=1,
                        help="nodes of distributed.nproc_per_node processes each (FSDP shards over all of them)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args()
    if args.nodes < 1:
        raise ParamsError([f"--nodes {args.nodes}: must be at least 1"])
    if not args.params.exists():
        raise ParamsError([f"{args.params}: not found (run from the repository root, or give --params)"])
    params = parse_params(overridden(args.params.read_text(encoding="utf-8"), args.overrides),
                          source=str(args.params), sections=SECTIONS)
    train = params.train
    precision = "fp16" if train.fp16 else "bf16" if train.bf16 else "fp32"
    processes = args.nodes * params.distributed.nproc_per_node  # FSDP shards over all of them
    model_class = task_for(params.task.type).model_class()  # a classifier: a head of a few logits, no LM head
    if args.config:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.config.parent if args.config.name == "config.json" else args.config)
        plan = for_processes(estimate(skeleton(config, model_class), train, params.lora, params.quantization,
                                      micro_batch_tokens(train, params.prepare),
                                      train.per_device_eval_batch_size * params.prepare.max_length, precision),
                             params, processes, config)
    else:
        plan = plan_run(params, precision, model_class, processes=processes)
    if args.memory_gib is not None:
        available, where = args.memory_gib * 2**30, f" ({args.memory_gib:g} GiB)"
    else:
        available, where = available_memory()
    model = str(args.config or params.model.model_name)
    if args.json:
        print(json.dumps({"model": model, "method": train.method, "precision": precision, **plan.summary_mb(),
                          "available_mb": round(available / 2**20, 1), "fits": plan.fits(available)}, indent=2))
    else:
        print(f"{model}: {train.method}, {precision}" + (f", lora r={params.lora.r}" if train.method != "full" else ""))
        print(plan.table(available, where))
        if not plan.fits(available):
            print(f"to fit {size(available)}: {advice(plan, train)}")
    sys.exit(0 if plan.fits(available) else 1)


if __name__ == "__main__":
    run_main(main)
