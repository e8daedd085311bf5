"""Toy-scale fixtures: a 2-layer, 32-wide Llama with its own small BPE tokenizer, and ~120 bundled-style examples.

Nothing is downloaded: the tokenizer is trained and the model built from a config, in seconds, once per session.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from build_plots_page import template_path  # noqa: E402
from make_dataset import instruction_pairs, related_sentences  # noqa: E402
from pretrain_base import train_tokenizer  # noqa: E402

# Small enough to run each stage in seconds, big enough that LoRA has q_proj/v_proj to adapt.
TOY_PARAMS = {
    "data": {"path": "data/raw/toy.jsonl", "validation_ratio": 0.1, "test_ratio": 0.15},
    "prepare": {"max_length": 96},
    "train": {"method": "lora", "max_steps": 6, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
              "learning_rate": 5e-3, "logging_steps": 2, "eval_steps": 3, "save_steps": 3, "warmup_steps": 1},
    "evaluate": {"batch_size": 8, "max_new_tokens": 8},
}


@pytest.fixture(autouse=True)
def machine_share_given_back(monkeypatch):
    """A stage run inside the test process takes a slot and sets its threads (finetune/resources.py), as it would
    in a process of its own: both are given back after each test, so that a later test, and the experiments it
    starts, neither inherit that share nor count a slot no run holds."""
    import os

    import torch

    from finetune import resources

    for name in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS", resources.AUTO_ENV, "CUDA_VISIBLE_DEVICES"):
        # recorded either way (monkeypatch records nothing when it deletes a name that is not set), so that what a
        # stage sets is undone after the test
        was = os.environ.get(name)
        monkeypatch.setenv(name, was or "")
        if was is None:
            monkeypatch.delenv(name)
    threads = torch.get_num_threads()
    yield
    for path, handle in list(resources._held.items()):
        handle.close()
        if path.endswith(".slot"):
            Path(path).unlink(missing_ok=True)
    resources._held.clear()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("toy-model")
    texts = related_sentences(2000, seed=0) + [p["prompt"] + "\n" + p["response"]
                                               for p in instruction_pairs(500, seed=1)]
    tokenizer = train_tokenizer(texts + ["### Instruction:\n\n### Response:\n"] * 10, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         # wide init: a random model whose greedy outputs differ from prompt to prompt
                         tie_word_embeddings=True, initializer_range=0.3, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_toy_data(path: Path, n: int = 120) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in instruction_pairs(n, seed=7)))


def toy_params_dict(model_dir: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TOY_PARAMS.items():
        params[section].update(values)
    params["model"]["model_name"] = str(model_dir)
    return params


@pytest.fixture
def workdir(tmp_path, monkeypatch, toy_model_dir) -> Path:
    """A working directory holding params.yaml (toy settings) and the toy data; the stages run inside it."""
    write_toy_data(tmp_path / "data/raw/toy.jsonl")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(toy_params_dict(toy_model_dir), sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # the DAG, which names what no output may overwrite
    monkeypatch.chdir(tmp_path)
    return tmp_path


def copy_dvc_config(repo: Path) -> None:
    """This repository's .dvc/config into a test repository after `dvc init`, with the page template its
    plots.html_template names (relative to .dvc, as DVC resolves it): `dvc plots show` there writes the offline page."""
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    template_path(repo).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_path(ROOT), template_path(repo))


@pytest.fixture
def dvc_repo(tmp_path, toy_model_dir) -> Path:
    """A fresh git + DVC repository holding the real pipeline files, toy params and toy data."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for package in ("stages", "finetune", "tools"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    write_toy_data(repo / "data/raw/toy.jsonl")
    (repo / "params.yaml").write_text(yaml.safe_dump(toy_params_dict(toy_model_dir), sort_keys=False))
    return repo


def stage_arguments(stage: str) -> list[str]:
    """The arguments dvc.yaml's command gives `stage` after `python -m stages.<module>`: the paths it reads and
    writes, as the pipeline runs it."""
    import shlex

    command = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    return command[3:]


def argument(stage: str, name: str) -> Path:
    arguments = stage_arguments(stage)
    return Path(arguments[arguments.index(name) + 1])


# The library's entry points as the stages call them, with dvc.yaml's paths (run inside a workdir).
def run_prepare(params):
    from finetune.data.prepare import prepare

    return prepare(params, argument("prepare", "--out"))


def run_train(params):
    from finetune.training.run import train

    return train(params, argument("train", "--prepared"), argument("train", "--metrics"),
                 argument("train", "--history"))


def run_evaluate(params, which: str):
    from finetune.evaluation import evaluate

    metrics, records, _ = evaluate(params, which, argument("evaluate", "--test"))
    return metrics, records


def run_merge(params):
    from finetune.export import merge

    return merge(params, argument("merge", "--test"))


def stage_argv(stage: str) -> list[str]:
    """sys.argv for running `stage` through its module's main(), as dvc.yaml's command runs it."""
    return [stage, *stage_arguments(stage)]


def stage_main(stage: str):
    """The main() of the module dvc.yaml's command runs for `stage`."""
    import importlib
    import shlex

    command = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    return importlib.import_module(command[2]).main


def stage_params(stage: str) -> set[str]:
    """The params sections `stage` declares in dvc.yaml (a section, or a key of it)."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage].get("params", [])
    return {str(next(iter(p)) if isinstance(p, dict) else p).split(".")[0] for p in declared}


def prepared_rows(prepared_dir: Path, name: str) -> list[dict]:
    """A prepared split's records as a list of dicts (the stages read it memory-mapped)."""
    from finetune.data.prepared import open_split, split_file

    return open_split(split_file(prepared_dir, name)).to_list()


def setup_trainer(params):
    """(trainer, precision, base weight MB) of a run on the workdir's prepared data: nothing trained or written."""
    from finetune.training.run import trainer_for

    return trainer_for(params, argument("train", "--prepared"))
