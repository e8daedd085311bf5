"""Safe loading: safetensors only, no pickles, no model code unless params opt in."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import ROOT

from finetune.config.model import ModelParams
from finetune.errors import StageError
from finetune.models import load_base_model, load_tokenizer


@pytest.fixture
def custom_code_model(tmp_path, toy_model_dir):
    model_dir = tmp_path / "custom"
    shutil.copytree(toy_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    return model_dir


@pytest.mark.parametrize("load", [load_tokenizer, load_base_model])
def test_model_with_custom_code_is_refused_with_how_to_opt_in(custom_code_model, load):
    with pytest.raises(StageError, match="ships its own code .*set model.trust_remote_code: true"):
        load(ModelParams(model_name=str(custom_code_model)))


def test_opting_in_hands_the_choice_to_transformers(custom_code_model):
    with pytest.raises(SystemExit, match="custom code ran"):  # the shipped code does run once trusted
        load_base_model(ModelParams(model_name=str(custom_code_model), trust_remote_code=True))


def test_pickle_weights_are_not_loaded(tmp_path, toy_model_dir):
    import torch
    from safetensors.torch import load_file

    model_dir = tmp_path / "pickled"
    shutil.copytree(toy_model_dir, model_dir)
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(OSError):
        load_base_model(ModelParams(model_name=str(model_dir)))


def test_our_code_never_unpickles_or_trusts_remote_code_by_itself():
    sources = list((ROOT / "stages").glob("*.py")) + list((ROOT / "scripts").glob("*.py"))
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "trust_remote_code=True" not in text, path.name
