"""params.yaml, typed: one dataclass per section, checked before any stage touches a model or a dataset.

The dataclasses below *are* the schema. `load_params()` reads params.yaml, rejects unknown keys (naming the closest
valid one), wrong types and out-of-range values, collects every problem, and raises one `ParamsError` listing them all
with their line in the file. Values set with `dvc exp run -S` land in params.yaml first, so they get the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import string
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = Path("params.yaml")
INT_LIMIT = 2**31 - 1  # every count, size and seed fits a 32-bit signed integer


class ParamsError(ValueError):
    """Every problem found in params.yaml, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid parameters:\n  " + "\n  ".join(problems))


@dataclass
class DataParams:
    path: str = "data/raw/transforms.jsonl"  # JSONL/JSON, CSV, Parquet... anything `datasets` loads
    prompt_field: str | None = None  # null = recognize prompt/response or instruction/input/output
    input_field: str | None = None  # optional context appended to the prompt (Alpaca's "input")
    response_field: str | None = None
    validation_path: str | None = None  # given split files instead of the ratio split below
    test_path: str | None = None
    validation_ratio: float = 0.05  # share of examples held out to pick checkpoints
    test_ratio: float = 0.1  # share held out for the evaluate stage; never trained on
    seed: int = 42  # fixes the split
    stratify: Literal["auto"] | bool = "auto"  # auto: keep each label's share in every split if answers are labels
    on_bad_record: Literal["fail", "skip"] = "fail"  # fail at the first bad record, or skip and count them all

    def problems(self) -> list[str]:
        out = []
        for name in ("validation_ratio", "test_ratio"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                out.append(f"data.{name}: {value} is outside [0, 1)")
        if self.validation_ratio + self.test_ratio >= 1:
            out.append(f"data.validation_ratio + data.test_ratio = {self.validation_ratio + self.test_ratio}: "
                       "must be below 1 to leave training examples")
        if self.validation_path is None and self.validation_ratio == 0:
            out.append("data.validation_ratio: 0 leaves no validation split; "
                       "set it above 0 or set data.validation_path")
        if self.test_path is None and self.test_ratio == 0:
            out.append("data.test_ratio: 0 leaves no test split; set it above 0 or set data.test_path")
        if (self.prompt_field is None) != (self.response_field is None):
            out.append("data.prompt_field and data.response_field: set both, or neither to auto-detect")
        return out


@dataclass
class PrepareParams:
    template: str = "### Instruction:\n{prompt}\n\n### Response:\n"  # must contain {prompt}; the response follows it
    max_length: int = 128  # tokens per example, prompt + response; longer ones are handled per `overlong`
    overlong: Literal["truncate", "drop"] = "truncate"  # truncate the response, or drop the example

    def problems(self) -> list[str]:
        out = []
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as err:  # a lone { or }
            fields = None
            out.append(f"prepare.template: {self.template!r}: {err}; write {{{{ and }}}} for literal braces")
        if fields is not None and fields != {"prompt"}:
            unknown = sorted(fields - {"prompt"})
            out.append(f"prepare.template: {self.template!r} " + (
                f"has unknown placeholders {', '.join('{' + f + '}' for f in unknown)}; the only one is {{prompt}} "
                "(write {{ and }} for literal braces)" if unknown else "has no {prompt} placeholder"))
        if self.max_length < 2:
            out.append(f"prepare.max_length: {self.max_length} must be at least 2")
        return out


@dataclass
class ModelParams:
    model_name: str = "models/base"  # a local directory or a Hugging Face hub id, e.g. Qwen/Qwen2.5-0.5B
    revision: str | None = None  # pin a hub commit so a hub model is as reproducible as a local one
    trust_remote_code: bool = False  # run Python code shipped with the model; only after reviewing it

    def problems(self) -> list[str]:
        return [] if self.model_name.strip() else ["model.model_name: must not be empty"]


@dataclass
class TrainParams:
    method: Literal["lora", "qlora", "full"] = "lora"  # qlora: 4-bit base (see quantization); full: every weight
    output_dir: str = "models/checkpoints"  # Trainer checkpoints (every save_steps)
    finetuned_dir: str = "models/finetuned"  # the adapter (or full model), tokenizer and resolved config
    num_train_epochs: float = 4.0
    max_steps: int = -1  # > 0 overrides num_train_epochs; handy for quick experiments
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1  # effective batch = per-device batch x this x processes
    learning_rate: float = 8e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    logging_steps: int = 20
    save_steps: int = 160
    eval_steps: int = 80
    save_total_limit: int = 2
    fp16: bool = False  # CUDA only: fp16 autocast with gradient scaling
    bf16: bool = False  # bf16 autocast on CUDA (Ampere+) or CPU
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    packing: bool = True  # several examples per row, no attention across them: no compute spent on padding
    group_by_length: bool = False  # without packing: batch examples of similar length to cut padding
    torch_compile: bool = False  # torch.compile the model (see the benchmark before turning it on)
    dataloader_num_workers: int = 0
    seed: int = 42

    def problems(self) -> list[str]:
        out = []
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "eval_steps", "save_total_limit")
        for name in positive:
            if getattr(self, name) < 1:
                out.append(f"train.{name}: {getattr(self, name)} must be at least 1")
        if self.learning_rate <= 0:
            out.append(f"train.learning_rate: {self.learning_rate} must be positive")
        if self.max_steps < -1:
            out.append(f"train.max_steps: {self.max_steps} must be positive, or -1 to train num_train_epochs")
        elif self.num_train_epochs <= 0 and self.max_steps <= 0:
            out.append(f"train.num_train_epochs: {self.num_train_epochs} must be positive (or set train.max_steps)")
        for name in ("weight_decay", "warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                out.append(f"train.{name}: {getattr(self, name)} must not be negative")
        if self.fp16 and self.bf16:
            out.append("train.fp16 and train.bf16: both are true; choose one")
        if self.packing and self.group_by_length:
            out.append("train.group_by_length: only applies without packing (packed rows have no padding to cut); "
                       "set train.packing: false to use it")
        return out


WARMUP_SHARE = 0.25  # warmup longer than this share of the run leaves little of it at the full learning rate


def optimizer_steps(train: TrainParams, train_examples: int) -> tuple[int, int]:
    """(optimizer steps of the run, of one epoch) on one process, as transformers counts them: batches rounded up,
    then accumulated batches rounded up, times the epochs rounded up. Packing lays a batch's examples into fewer
    rows but keeps the examples per batch, so it leaves the count alone; more processes take fewer steps."""
    batches = math.ceil(train_examples / train.per_device_train_batch_size)
    per_epoch = max(math.ceil(batches / train.gradient_accumulation_steps), 1)
    return (train.max_steps if train.max_steps > 0 else math.ceil(train.num_train_epochs * per_epoch)), per_epoch


def schedule_warnings(train: TrainParams, train_examples: int) -> list[str]:
    """What in train's step-based schedule a run on `train_examples` examples would make pointless: warmup taking
    much of the run, no validation or checkpoint before the last step, no training loss logged. One line each, for
    the train stage to print. The step count is exact on one process and an upper bound on more, where each warning
    holds all the more."""
    steps, per_epoch = optimizer_steps(train, train_examples)
    how = ("train.max_steps" if train.max_steps > 0 else
           f"{train_examples} examples / batch {train.per_device_train_batch_size} x "
           f"{train.gradient_accumulation_steps} accumulated = {per_epoch} per epoch, "
           f"x {train.num_train_epochs:g} epochs")
    run = f"this run's optimizer steps (at most {steps}: {how})"
    every = max(steps // 4, 1)  # the suggestion: four times a run
    out = []
    if train.warmup_steps > WARMUP_SHARE * steps:
        then = ("the learning rate never reaches train.learning_rate" if train.warmup_steps >= steps else
                f"the learning rate peaks at step {train.warmup_steps} and decays to 0 over the last "
                f"{steps - train.warmup_steps}")
        out.append(f"train.warmup_steps: {train.warmup_steps} is {100 * min(train.warmup_steps / steps, 1):.0f}% or "
                   f"more of {run}: {then}; about 10% ({max(round(steps / 10), 1)}) is typical")
    if train.eval_steps >= steps:
        out.append(f"train.eval_steps: {train.eval_steps} leaves no validation before the last of {run}, so "
                   f"the validation loss is measured once, after training: no curve shows overfitting; e.g. {every}")
    if train.save_steps >= steps:
        out.append(f"train.save_steps: {train.save_steps} leaves no checkpoint before the last of {run}, so a run "
                   f"stopped before the end starts over; e.g. {every}")
    if train.logging_steps > steps:
        out.append(f"train.logging_steps: {train.logging_steps} exceeds {run}, so no training loss is logged; "
                   f"e.g. {every}")
    return out


@dataclass
class QuantizationParams:
    """bitsandbytes 4-bit loading of the base model, used when train.method is qlora."""
    load_in_4bit: bool = True
    bnb_4bit_use_double_quant: bool = True  # quantize the quantization constants too: ~0.4 bit/param less
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"  # nf4 suits normally distributed weights
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # dtype of the matmuls
    device_map: str | None = "auto"  # where the quantized layers go; auto = the GPU if there is one


@dataclass
class LoraParams:
    r: int = 8  # adapter rank: higher = more capacity, more memory
    lora_alpha: int = 32  # scale = lora_alpha / r (or / sqrt(r) with use_rslora)
    target_modules: list[str] | Literal["all-linear"] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False  # weight-decomposed LoRA: closer to full fine-tuning, ~2x slower steps
    use_rslora: bool = False  # rank-stabilized scale alpha/sqrt(r): keeps high ranks learning
    modules_to_save: list[str] | None = None  # modules trained in full beside the adapter, e.g. [lm_head]

    def problems(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"lora.r: {self.r} must be at least 1")
        if self.lora_alpha <= 0:
            out.append(f"lora.lora_alpha: {self.lora_alpha} must be positive")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora.lora_dropout: {self.lora_dropout} is outside [0, 1)")
        if not self.target_modules:
            out.append("lora.target_modules: must name at least one module")
        return out


@dataclass
class EvaluateParams:
    batch_size: int = 64  # prompts per generate() call and rows per loss batch; lower it if memory runs out
    max_new_tokens: int = 24
    do_sample: bool = False  # false = greedy, reproducible
    temperature: float = 1.0  # used only when do_sample
    top_p: float = 1.0  # used only when do_sample
    labels: Literal["auto", "off"] | list[str] = "auto"  # label-set metrics: auto-detect, off, or the label list
    max_labels: int = 20  # auto: references with at most this many distinct values are treated as labels
    seed: int = 0  # for sampling; greedy decoding does not use it

    def problems(self) -> list[str]:
        out = []
        if self.batch_size < 1:
            out.append(f"evaluate.batch_size: {self.batch_size} must be at least 1")
        if self.max_new_tokens < 1:
            out.append(f"evaluate.max_new_tokens: {self.max_new_tokens} must be at least 1")
        if self.temperature <= 0:
            out.append(f"evaluate.temperature: {self.temperature} must be positive")
        if not 0 < self.top_p <= 1:
            out.append(f"evaluate.top_p: {self.top_p} is outside (0, 1]")
        if self.max_labels < 2:
            out.append(f"evaluate.max_labels: {self.max_labels} must be at least 2")
        return out


@dataclass
class ExportParams:
    merged_dir: str = "models/merged"  # standalone model: base + adapter merged, loads without peft
    check_examples: int = 32  # test prompts on which merged and adapter greedy outputs are compared
    check_max_new_tokens: int = 16  # tokens generated per prompt for that comparison

    def problems(self) -> list[str]:
        return [f"export.{name}: {getattr(self, name)} must be at least 1"
                for name in ("check_examples", "check_max_new_tokens") if getattr(self, name) < 1]


@dataclass
class MlflowParams:
    enabled: bool = False  # needs the extra: pip install -e ".[mlflow]"
    experiment_name: str = "dvc-finetune"
    run_name: str | None = None  # null = the DVC experiment's name (dvc exp run --name), else "train"
    log_model: bool = True  # the adapter (or, for full fine-tuning, the whole model) as a run artifact


@dataclass
class WandbParams:
    enabled: bool = False  # needs the extra: pip install -e ".[wandb]"
    project: str = "dvc-finetune"
    run_name: str | None = None  # null = the DVC experiment's name (dvc exp run --name), else "train"
    mode: Literal["offline", "online"] = "offline"  # offline: a local run folder, no login; WANDB_MODE overrides
    log_model: bool = True  # the adapter (or whole model) as a model artifact


@dataclass
class TrackingParams:
    """Where the train stage sends its step metrics besides DVCLive (metrics/live, always on)."""
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    wandb: WandbParams = field(default_factory=WandbParams)


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    lora: LoraParams = field(default_factory=LoraParams)
    quantization: QuantizationParams = field(default_factory=QuantizationParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)

    def problems(self) -> list[str]:
        if self.train.method == "qlora" and not self.quantization.load_in_4bit:
            return ["quantization.load_in_4bit: false, but train.method=qlora trains on a 4-bit base; "
                    "set it true, or use train.method=lora"]
        return []


@dataclass
class Hardware:
    cuda: bool
    cuda_bf16: bool
    bitsandbytes: bool
    mlflow: bool = True  # the optional tracker packages are installed
    wandb: bool = True
    wandb_online_mode: str | None = None  # WANDB_MODE, which overrides tracking.wandb.mode
    wandb_key: bool = True  # a W&B API key in WANDB_API_KEY or ~/.netrc

    @classmethod
    def detect(cls) -> Hardware:
        import importlib.util

        import torch

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
                   bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
                   mlflow=importlib.util.find_spec("mlflow") is not None,
                   wandb=importlib.util.find_spec("wandb") is not None,
                   wandb_online_mode=os.environ.get("WANDB_MODE"), wandb_key=wandb_key_present())


def wandb_key_present() -> bool:
    """Whether W&B could log in without asking: a key or identity-token file in the environment, or a netrc entry
    (what `wandb login` writes; $NETRC or ~/.netrc) for the W&B host (WANDB_BASE_URL, else api.wandb.ai)."""
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def hardware_problems(params: Params, hw: Hardware) -> list[str]:
    """Requests this machine cannot carry out: refused up front instead of silently changed."""
    out = []
    train, quant = params.train, params.quantization
    if train.fp16 and not hw.cuda:
        out.append("train.fp16: true, but there is no CUDA device and fp16 training is CUDA-only; "
                   "set train.fp16=false (train.bf16=true gives bf16 on CPU)")
    if train.bf16 and hw.cuda and not hw.cuda_bf16:
        out.append("train.bf16: true, but this GPU has no bf16 support (it needs Ampere or newer); "
                   "use train.fp16=true instead")
    if train.method == "qlora":
        if not hw.bitsandbytes:
            out.append("train.method: qlora needs bitsandbytes; install it with pip install 'bitsandbytes>=0.47'")
        if quant.bnb_4bit_compute_dtype == "float16" and not hw.cuda:
            out.append("quantization.bnb_4bit_compute_dtype: float16 needs a CUDA device; "
                       "use float32 (fast) or bfloat16 on CPU")
        if quant.bnb_4bit_compute_dtype == "bfloat16" and hw.cuda and not hw.cuda_bf16:
            out.append("quantization.bnb_4bit_compute_dtype: bfloat16 is not supported by this GPU; use float16")
    return out


def tracking_problems(params: Params, hw: Hardware) -> list[str]:
    """Trackers enabled but unusable here: refused when training starts (other stages do not track)."""
    out = []
    for name, installed in (("mlflow", hw.mlflow), ("wandb", hw.wandb)):
        if getattr(params.tracking, name).enabled and not installed:
            out.append(f"tracking.{name}.enabled: true, but {name} is not installed; "
                       f"install the extra with pip install -e \".[{name}]\" (or set it false)")
    wandb = params.tracking.wandb
    if wandb.enabled and hw.wandb and (hw.wandb_online_mode or wandb.mode) == "online" and not hw.wandb_key:
        where = "WANDB_MODE=online" if hw.wandb_online_mode == "online" else "tracking.wandb.mode: online"
        out.append(f"tracking.wandb.mode: {where} needs a W&B API key (WANDB_API_KEY in the environment, or "
                   "`wandb login`); use mode offline to log to a local run folder and `wandb sync` it later")
    return out


# Paths. The stages write only inside the repository, never over its sources, inputs or each other's outputs, and
# read data only from the folder dvc.yaml declares as the prepare stage's input.
RAW_DATA_DIR = Path("data/raw")
DATA_PATHS = ("path", "validation_path", "test_path")  # in params.data
OUTPUT_FOLDERS = {"train.output_dir": "checkpoints", "train.finetuned_dir": "model", "export.merged_dir": "model"}
PIPELINE_PATHS = {  # what no output folder may be, hold, or lie inside
    ".git": "git's repository", ".dvc": "DVC's folder", "stages": "the pipeline's code", "dvc.yaml": "dvc.yaml",
    "dvc.lock": "dvc.lock", "params.yaml": "params.yaml", "data/raw": "the raw data",
    "data/prepared": "the prepare stage's output", "metrics": "the metrics", "outputs": "the predictions",
    "models/base_model.json": "the base model's identity (the base_model stage)",
}


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def tracked_files(root: Path) -> list[str]:
    """Files git tracks under `root` (none outside a git repository). Raises ParamsError when `root` is a git
    repository whose tracked files cannot be listed: the outputs could not be checked against them."""
    try:
        found = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=False)
    except OSError as err:
        found = subprocess.CompletedProcess([], 1, b"", str(err).encode())
    said = found.stderr.decode("utf-8", "replace").strip()
    if found.returncode == 0:
        return found.stdout.decode("utf-8", "replace").split("\0")[:-1]
    if "not a git repository" in said and not (root / ".git").exists():
        return []
    raise ParamsError([f"{root}: cannot list the files git tracks, so the output paths cannot be checked "
                       f"against them (git says: {said or 'nothing'})"])


def path_problems(params: Params, root: Path, writes: tuple[str, ...] = ()) -> list[str]:
    """Paths in params that would read stale data or write where the pipeline must not, seen from `root` (the
    repository, where the stages run): data outside data/raw, outputs outside the repository or over its sources,
    outputs overlapping each other, and, for the output folders the running stage `writes` (param names), files in
    them that the pipeline did not write."""
    from stages.outputs import TMP_INFIX, ownership_problem

    root = root.resolve()
    out = []
    raw = (root / RAW_DATA_DIR).resolve()
    for key in DATA_PATHS:
        value = getattr(params.data, key)
        if value is not None and not (root / value).resolve().is_relative_to(raw):
            out.append(f"data.{key}: {value} is outside {RAW_DATA_DIR}/, the prepare stage's declared input, so DVC "
                       f"would not rerun prepare when it changes; move it under {RAW_DATA_DIR}/ "
                       f"(or `dvc add` or `dvc import` it there)")
    protected = {(root / path).resolve(): what for path, what in PIPELINE_PATHS.items()}
    if (root / params.model.model_name).exists():
        protected[(root / params.model.model_name).resolve()] = "the base model (model.model_name)"
    tracked = tracked_files(root)
    folders: dict[str, Path] = {}
    for name, kind in OUTPUT_FOLDERS.items():
        section, key = name.split(".")
        value = getattr(getattr(params, section), key)
        path = (root / value).resolve()
        if Path(value).is_absolute() or not path.is_relative_to(root):
            out.append(f"{name}: {value} is outside the repository; give a path relative to it, like models/x")
            continue
        if path == root:
            out.append(f"{name}: {value} is the repository itself; give a folder of its own, like models/x")
            continue
        if path != Path(os.path.normpath(root / value)):
            out.append(f"{name}: {value} is a symbolic link or lies under one; give a folder of its own, "
                       "like models/x")
            continue
        if any(part.startswith(".") and TMP_INFIX in part for part in Path(value).parts):
            out.append(f"{name}: {value} is named like the stages' staging folders (.<name>{TMP_INFIX}...), "
                       "which are removed as leftovers; choose another name")
            continue
        clash = next((what for where, what in protected.items() if _overlap(path, where)), None)
        relative = path.relative_to(root).as_posix()
        clash = clash or next((f"{f}, which git tracks" for f in tracked if f == relative
                               or f.startswith(relative + "/")), None)
        if clash:
            out.append(f"{name}: {value} would overwrite {clash}; give a folder of its own, like models/x")
            continue
        other = next((n for n, p in folders.items() if _overlap(path, p)), None)
        if other:
            out.append(f"{name}: {value} overlaps {other}; each output needs a folder of its own")
            continue
        folders[name] = path
        problem = ownership_problem(Path(value), kind, name) if name in writes else None
        if problem:
            out.append(problem)
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(inner, _type_name(inner))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 (and DVC) do: `1e-4` and the `1e-07` that
    `dvc exp run -S train.learning_rate=1e-7` writes are numbers, not strings."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Map 'section.key' -> line number (1-based) from a composed YAML tree."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path + "."))
    return lines


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from `raw`, appending every problem found to `problems`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.')}: expected a mapping of keys, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
        elif dataclasses.is_dataclass(hints[key]):
            values[key] = _build(hints[key], value, f"{prefix}{key}.", problems)
        elif not _matches(value, hints[key]):
            problems.append(f"{prefix}{key}: {value!r} is not {_type_name(hints[key])}")
        elif isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf, or 1e400
            problems.append(f"{prefix}{key}: {value} is not a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value <= INT_LIMIT:
            problems.append(f"{prefix}{key}: {value} is out of range (at most {INT_LIMIT} in size)")
        elif key == "seed" and value < 0:  # every section's seed: numpy and torch take only non-negative seeds
            problems.append(f"{prefix}{key}: {value} must not be negative")
        else:
            values[key] = float(value) if hints[key] is float else value
    instance = cls(**values)
    if hasattr(instance, "problems") and len(values) == len(raw):  # range checks only on well-typed sections
        problems.extend(instance.problems())
    return instance


def parse_params(text: str, source: str = str(PARAMS_FILE), hardware: Hardware | None = None,
                 training: bool = False, root: Path | None = None, writes: tuple[str, ...] = ()) -> Params:
    """Parse and validate params YAML text; raise ParamsError with every problem, each with its line.
    With `hardware`, also refuse what that machine cannot do (with `training`, the trackers too); with `root`, the
    paths that would read or write where they must not (`path_problems`)."""
    try:
        node = yaml.compose(text)
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        raise ParamsError([f"{source}: not valid YAML: {err}"]) from err
    problems: list[str] = []
    params = _build(Params, raw, "", problems)
    if not problems:  # the values are well-formed: check them against the repository and the machine
        if root is not None:
            problems.extend(path_problems(params, root, writes))
        if hardware is not None and training:  # what this machine can do matters only to the stage that trains
            problems.extend(hardware_problems(params, hardware))
            problems.extend(tracking_problems(params, hardware))
    if problems:
        lines = _key_lines(node) if node is not None else {}

        def located(problem: str) -> str:
            key = problem.split(":", 1)[0].split(" and ")[0]
            line = lines.get(key) or lines.get(key.split(".")[0])
            return f"{source}:{line}: {problem}" if line else f"{source}: {problem}"

        raise ParamsError([located(p) for p in problems])
    return params


def load_params(path: Path | str = PARAMS_FILE, training: bool = False, writes: tuple[str, ...] = ()) -> Params:
    """params.yaml, checked against the schema, the repository's paths and this machine: what every stage calls
    first (the train stage with `training`, which also checks that the enabled trackers can run; a stage that
    replaces the output folders named by the params `writes` has them checked for files it did not write)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError([f"{path}: not found (run from the repository root)"])
    return parse_params(path.read_text(encoding="utf-8"), source=str(path), hardware=Hardware.detect(),
                        training=training, root=Path.cwd(), writes=writes)


def as_dict(section: Any) -> dict[str, Any]:
    return dataclasses.asdict(section)


def main() -> None:
    """`python -m stages.params`: the `params` stage of dvc.yaml, which depends on the whole of params.yaml, so that
    a change no other stage reads (a misspelt section added with `dvc exp run -S +trian.seed=1`) is refused too.
    Checks the schema and the paths; the hardware is checked by the stages that use it."""
    if not PARAMS_FILE.exists():
        raise ParamsError([f"{PARAMS_FILE}: not found (run from the repository root)"])
    parse_params(PARAMS_FILE.read_text(encoding="utf-8"), root=Path.cwd())
    print(f"{PARAMS_FILE}: valid")


if __name__ == "__main__":
    from stages.common import run_main

    run_main(main)
