"""What several stages need: atomic JSON/JSONL writes, loading the tokenizer and the base model, a uniform exit."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from stages.params import ModelParams, ParamsError, QuantizationParams


IGNORE_INDEX = -100  # labels with this value are skipped by the loss (PyTorch's cross_entropy default)


class StageError(Exception):
    """A problem with the user's input (data, model, files), worded for the user: printed without a traceback."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would have
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path | str, data: Any) -> None:
    write_text(Path(path), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> None:
    write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: str = "") -> list[str]:
    """A GitHub Markdown table, as lines; `align` holds one letter per column, l, c or r (missing ones: l)."""
    marks = {"l": "---", "c": ":-:", "r": "--:"}

    def line(cells: Sequence) -> str:
        return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"

    return [line(header), "|" + "|".join(marks[a] for a in align.ljust(len(header), "l")) + "|", *map(line, rows)]


def read_jsonl(path: Path | str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress(iterable, total: int, desc: str):
    """A tqdm bar on a terminal; in a log file, a plain line at every 10% instead of thousands of redraws."""
    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc)
        return
    marks = {max(1, round(total * k / 10)) for k in range(1, 11)}
    started = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        if i in marks:
            print(f"{desc}: {i}/{total} ({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def fetching(model: ModelParams):
    """A hub model that cannot be fetched is one line naming the model, the reason and the fixes, not a traceback
    (transformers raises OSError with several lines; the hub client's own errors subclass it)."""
    try:
        yield
    except OSError as err:
        if Path(model.model_name).exists():
            raise  # a local folder: the problem is with its files, and the error names them
        text = str(err)
        if "couldn't connect" in text or "offline" in text.lower() or "Connection" in text:
            reason = "no connection to the Hugging Face hub and no copy in the local cache"
        elif "gated" in text or "401" in text or "403" in text:
            reason = "the hub refused access (a gated or private model needs a token with access)"
        elif "not a valid model identifier" in text or "404" in text:
            reason = "no such model on the hub, and no folder of that name here"
        else:
            reason = text.splitlines()[0] if text else type(err).__name__
        name = model.model_name + (f" (revision {model.revision})" if model.revision else "")
        offline = "HF_HUB_OFFLINE is set, so only the Hugging Face cache was searched" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else "or set HF_HUB_OFFLINE=1 to use the cache"
        raise StageError(
            f"model.model_name: cannot fetch {name}: {reason}. Point model.model_name at a local copy (e.g. "
            f"`huggingface-cli download {model.model_name} --local-dir models/mine`), set HF_TOKEN for a gated "
            f"model, {offline}") from None


def refuse_remote_code(model: ModelParams) -> None:
    """A model or tokenizer that ships its own Python code (`auto_map`) runs only when params opt in; reading the
    config JSON executes nothing."""
    if model.trust_remote_code:
        return
    from transformers import PretrainedConfig
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    with fetching(model):
        config, _ = PretrainedConfig.get_config_dict(model.model_name, revision=model.revision)
        tokenizer_config = get_tokenizer_config(model.model_name, revision=model.revision)
    for name, found in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if found.get("auto_map"):
            raise StageError(
                f"model.model_name: {model.model_name} ships its own code ({name} has an auto_map: "
                f"{sorted(found['auto_map'])}); review that code, then set model.trust_remote_code: true to run it")


def load_tokenizer(model: ModelParams):
    from transformers import AutoTokenizer

    refuse_remote_code(model)
    with fetching(model):
        tokenizer = AutoTokenizer.from_pretrained(model.model_name, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise StageError(f"model.model_name: the tokenizer of {model.model_name!r} has no EOS token, "
                         "so the model could not learn where a response ends")
    return tokenizer


CHAT_TEMPLATE_MARKER = "{# dvc-finetune: params prepare.template, one user message #}"  # how predict knows it


def chat_template(template: str) -> str:
    """prepare.template as the tokenizer's Jinja chat template: one user message renders to exactly
    `template.format(prompt=message)` with add_generation_prompt, and to the text up to the last {prompt} without
    it; anything else is refused, as the model only ever saw single prompts. The template's text goes in as JSON
    string literals, whose escapes Jinja reads alike, so none of it is Jinja syntax; and no text stands outside a
    tag, where the tokenizer's trim_blocks/lstrip_blocks would eat whitespace."""
    def literal(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"

    sentinel = "\x00prompt\x00"
    *parts, generation_prompt = template.format(prompt=sentinel).split(sentinel)
    content = "{{ messages[0]['content'] }}"
    refusal = json.dumps("this model was fine-tuned on single prompts (params prepare.template): give one user message")
    return (CHAT_TEMPLATE_MARKER
            + "{% if messages | length != 1 or messages[0]['role'] != 'user' %}"
            + "{{ raise_exception(" + refusal + ") }}{% endif %}"
            + "".join(literal(part) + content for part in parts)
            + "{% if add_generation_prompt %}" + literal(generation_prompt) + "{% endif %}")


def quantization_config(quant: QuantizationParams):
    """params.quantization -> transformers' BitsAndBytesConfig (4-bit)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=quant.load_in_4bit, bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=getattr(torch, quant.bnb_4bit_compute_dtype))


def load_base_model(model: ModelParams, quantization: QuantizationParams | None = None, dtype: str = "float32"):
    """The base model, from a local directory or the hub, weights through safetensors only; in 4-bit when
    `quantization` is given (QLoRA), else in `dtype`: float32 unless the weights stay frozen under mixed precision
    (LoRA with bf16/fp16), where half-size weights halve the memory and autocast computes in that dtype anyway."""
    import torch
    from transformers import AutoModelForCausalLM

    refuse_remote_code(model)
    kwargs = {}
    if quantization is not None:
        kwargs = {"quantization_config": quantization_config(quantization), "device_map": quantization.device_map}
    with fetching(model):
        loaded = AutoModelForCausalLM.from_pretrained(
            model.model_name, revision=model.revision, dtype=getattr(torch, dtype), use_safetensors=True,
            attn_implementation="sdpa", trust_remote_code=model.trust_remote_code, **kwargs)
    if quantization is not None:
        unpacked_4bit_layers(loaded, all_layers=False)
    return loaded


def unpacked_4bit_layers(model, all_layers: bool = True) -> None:
    """bitsandbytes >= 0.49 repacks a 4-bit layer's weights for AVX512-BF16 inference the first time it runs in eval
    mode on such a CPU. It cannot repack a layer whose input width is not a multiple of its block size (it fails on
    the reshape), and it keeps the repacked layout when training resumes, where the backward pass fails ("a view of
    a leaf Variable ... in-place operation"). Keep the plain layout for those layers, or, for a model being trained
    (`all_layers`), for every layer: validation runs in eval mode between training steps."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            state = getattr(module.weight, "quant_state", None)
            if all_layers or state is None or module.in_features % state.blocksize:
                module.support_avx512bf16_for_cpu = False


def read_train_config(finetuned_dir: Path) -> dict:
    path = finetuned_dir / "train_config.json"
    if not path.exists():
        raise StageError(f"{finetuned_dir}: no fine-tuned model found; run the train stage first (dvc repro train)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise StageError(f"{path}: not valid JSON ({err}); rerun the train stage (dvc repro -f train)") from err


def require_safetensors(folder: Path, *names: str) -> None:
    """Refuse a model folder whose weights are not safetensors: a pickle (.bin, .pt) can run code when loaded."""
    if not any((folder / name).exists() for name in names):
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        found = f"it holds {', '.join(pickles)} (pickle, which can run code when loaded)" if pickles else \
            "it holds no weights"
        raise StageError(f"{folder}: no {' or '.join(names)}: {found}; only safetensors weights are loaded. "
                         "Convert them with safetensors, or rerun the train stage")


def load_finetuned(finetuned_dir: Path, quantized: bool = True):
    """The fine-tuned model as the train stage left it, read from its own train_config.json: a full model, or the
    base (in 4-bit for QLoRA, unless `quantized` is false) with the adapter on top."""
    from transformers import AutoModelForCausalLM

    config = read_train_config(finetuned_dir)
    if config["train"]["method"] == "full":
        require_safetensors(finetuned_dir, "model.safetensors", "model.safetensors.index.json")
        return AutoModelForCausalLM.from_pretrained(finetuned_dir, use_safetensors=True, attn_implementation="sdpa")
    from peft import PeftModel

    require_safetensors(finetuned_dir, "adapter_model.safetensors")

    quant = QuantizationParams(**config["quantization"]) \
        if config["train"]["method"] == "qlora" and quantized else None
    base = load_base_model(ModelParams(**config["model"]), quant)
    return PeftModel.from_pretrained(base, finetuned_dir)


def quiet_library_bars() -> None:
    """In a log file (stderr not a terminal), the libraries' own progress bars (loading weights, reading datasets)
    would redraw with carriage returns; turn them off. The stages print plain progress lines instead."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers and the hub read it at import
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: its setting was read
        from transformers.utils import logging

        logging.disable_progress_bar()


def quiet_library_warnings() -> None:
    """Library warnings that are not ours to fix and say nothing about the run, each silenced by its own text (and
    bitsandbytes' import-time message in stages/__init__.py); anything else still shows."""
    import warnings

    # peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing` alias (peft 0.21, transformers 5)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def run_main(stage: Callable[[], None]) -> None:
    """Run a stage's main(): bad params or input exit 2 with the message, not a traceback; a file that cannot be
    read or written (a full disk, a read-only folder) exits 1 naming the file and the reason."""
    quiet_library_bars()
    quiet_library_warnings()
    try:
        stage()
    except (ParamsError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(1)
