"""predict, run for real on a toy fine-tuned and merged model: the answers evaluate gave, from every kind of input,
and the prompt template and generation settings saved with the model, for predict and for plain transformers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, stage_argv, stage_main, toy_params_dict, write_toy_data
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from finetune.config.data import PrepareParams
from finetune.entrypoint import run_main
from finetune.errors import StageError
from finetune.io import read_jsonl
from finetune.tasks.causal_lm import chat_template
from tools import predict
from tools.predict import read_prompts

TEMPLATE = PrepareParams().template  # the toy params keep params.yaml's template


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_model_dir) -> Path:
    """A toy working directory after prepare, train, `evaluate --model finetuned` and merge."""
    root = tmp_path_factory.mktemp("predict")
    write_toy_data(root / "data/raw/toy.jsonl")
    (root / "params.yaml").write_text(yaml.safe_dump(toy_params_dict(toy_model_dir), sort_keys=False))
    argv = sys.argv
    try:
        with contextlib.chdir(root):
            for stage in ("prepare", "train", "evaluate", "merge"):
                sys.argv = stage_argv(stage)
                run_main(stage_main(stage))
    finally:
        sys.argv = argv
    return root


@pytest.fixture
def done(trained, monkeypatch) -> Path:
    monkeypatch.chdir(trained)
    return trained


def evaluated(root: Path) -> tuple[list[str], list[str]]:
    """The test prompts as in the raw data (no template), and evaluate's answers to them, in the test split's order."""
    raw = (root / "data/raw/toy.jsonl").read_text().splitlines()
    rows = read_jsonl(root / "outputs/predictions_finetuned.jsonl")
    prompts = [json.loads(raw[int(row["source"].rsplit(":", 1)[1]) - 1])["prompt"] for row in rows]
    assert [TEMPLATE.format(prompt=p) for p in prompts] == [row["prompt"] for row in rows]
    return prompts, [row["prediction"] for row in rows]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def predicted(capsys, *argv: str) -> tuple[list[str], str]:
    """predict's answers (from its --jsonl lines) and what it said on stderr."""
    capsys.readouterr()
    predict.main([*argv, "--jsonl"])
    out, err = capsys.readouterr()
    return [json.loads(line)["prediction"] for line in out.splitlines()], err


def test_predict_answers_as_evaluate_did_from_arguments_file_and_stdin(done, capsys, tmp_path):
    prompts, expected = evaluated(done)
    assert len(set(expected)) > 1  # the toy model says different things to different prompts
    before = snapshot(done)

    predict.main(prompts)  # plain text: one answer a line
    assert capsys.readouterr().out == "".join(answer + "\n" for answer in expected)

    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    predict.main(["--file", str(tmp_path / "prompts.txt"), "--jsonl"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"prompt": p, "prediction": a} for p, a in zip(prompts, expected, strict=True)]

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                                                    for i, p in enumerate(prompts)))
    answers, err = predicted(capsys, "--file", str(tmp_path / "prompts.jsonl"))
    assert answers == expected
    assert "prompt template: the one saved with the model (models/finetuned)" in err
    assert "generation: max_new_tokens=8, do_sample=False (the rest from params evaluate)" in err

    out = subprocess.run([sys.executable, "-m", "tools.predict", "-"], input="\n".join(prompts), cwd=done,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(answer + "\n" for answer in expected)
    assert snapshot(done) == before  # predict wrote nothing


def test_merged_model_carries_the_template_and_the_generation_settings(done, capsys):
    prompts, expected = evaluated(done)
    for folder in ("models/merged", "models/finetuned"):  # the export, and the adapter's tokenizer
        tokenizer = AutoTokenizer.from_pretrained(done / folder)  # plain transformers
        assert [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts] == \
            [TEMPLATE.format(prompt=p) for p in prompts]
    generation = GenerationConfig.from_pretrained(done / "models/merged")
    assert (generation.max_new_tokens, generation.do_sample) == (8, False)  # the toy params' evaluate section
    assert (generation.eos_token_id, generation.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert GenerationConfig.from_pretrained(done / "models/finetuned").eos_token_id == tokenizer.eos_token_id

    # plain transformers, no generation arguments: the template and settings come from the folder
    model = AutoModelForCausalLM.from_pretrained(done / "models/merged")
    for prompt, answer in list(zip(prompts, expected, strict=True))[:4]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt")
        new = model.generate(**inputs)[0, inputs["input_ids"].shape[1]:]
        assert tokenizer.decode(new, skip_special_tokens=True).strip() == answer

    answers, err = predicted(capsys, "--model", "merged", *prompts)
    assert answers == expected
    assert "max_new_tokens, do_sample from models/merged/generation_config.json" in err


def test_saved_template_and_settings_win_over_changed_params(done, tmp_path, monkeypatch, capsys):
    prompts, expected = evaluated(done)
    copy = tmp_path / "copy"
    shutil.copytree(done, copy)
    monkeypatch.chdir(copy)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["prepare"]["template"] = "Q: {prompt}\nA:"
    params["evaluate"]["max_new_tokens"] = 2
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    answers, err = predicted(capsys, "--model", "merged", *prompts)
    assert answers == expected and "the one saved with the model (models/merged)" in err
    answers, err = predicted(capsys, "--model-dir", "models/merged", "--max-new-tokens", "2", *prompts)
    assert answers != expected and all(a.startswith(b) for a, b in zip(expected, answers, strict=True))
    assert "max_new_tokens from the command line" in err

    # a model saved before templates were: params.yaml's template, said so
    (copy / "models/finetuned/chat_template.jinja").unlink()  # where transformers saves it
    assert AutoTokenizer.from_pretrained(copy / "models/finetuned").chat_template is None
    _, err = predicted(capsys, *prompts)
    assert "prompt template: params.yaml prepare.template" in err and "retrain" in err
    params["prepare"]["template"], params["evaluate"]["max_new_tokens"] = TEMPLATE, 8
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert predicted(capsys, *prompts)[0] == expected


@pytest.mark.parametrize("template", [
    "### Instruction:\n{prompt}\n\n### Response:\n",
    '  {{{{ x }}}} {{% if %}}{{# c #}} "q" \'s\' \\ \\n \t{prompt}\r\n üñ 😀 \x1b {{%- endraw %}}\n  ',
    "{prompt}",
    "Q: {prompt}\nQ again: {prompt}\nA:",
])
def test_chat_template_renders_exactly_the_training_template(template, toy_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    tokenizer.chat_template = chat_template(template)
    for prompt in ["Spell out 5.", "{{ not jinja }} {% raw %}\n  indented", ""]:
        user = [{"role": "user", "content": prompt}]
        assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == \
            template.format(prompt=prompt)
        assert template.format(prompt=prompt).startswith(tokenizer.apply_chat_template(user, tokenize=False))
    for messages in ([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]):
        with pytest.raises(Exception, match="fine-tuned on single prompts"):
            tokenizer.apply_chat_template(messages, tokenize=False)


def test_read_prompts_takes_lines_or_jsonl():
    assert read_prompts("a b\r\n\n  \n c \n", "f") == ["a b", " c "]
    assert read_prompts('{"prompt": "x\\ny", "id": 1}\n\n{"prompt": "z"}', "f") == ["x\ny", "z"]
    assert read_prompts("[1, 2]\n", "f") == ["[1, 2]"]  # JSON, but not an object: a text prompt
    with pytest.raises(StageError, match='f:3: no "prompt" string'):
        read_prompts('{"prompt": "x"}\n\n{"text": "y"}\n', "f")
    with pytest.raises(StageError, match="f:2: no"):
        read_prompts('{"prompt": "x"}\nplain\n', "f")
    chat = '{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]}\n{"prompt": "p"}'
    assert read_prompts(chat, "f") == [[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "p"]
    with pytest.raises(StageError, match="f:1: the last turn of 'messages' is the assistant's"):
        read_prompts('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}', "f")


def test_a_conversation_is_refused_by_a_model_trained_on_single_prompts(done, capsys, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "Spell out the number 5."}]}\n')
    with pytest.raises(StageError, match="was trained on single prompts, not conversations: give prompts"):
        predict.main(["--file", str(chats)])


@pytest.mark.parametrize("argv, message", [
    ([], 'no prompts: give them as arguments, with --file FILE, or "-"'),
    (["--file", "missing.txt"], "missing.txt: no such file (--file)"),
    (["--file", "empty.txt"], "empty.txt: no prompts (empty, or blank lines only)"),
    (["a", " "], "prompt 2 on the command line is empty"),
    (["a"], "models/finetuned: no fine-tuned model found; run the train stage first"),
    (["--model", "merged", "a"], "models/merged: no merged model; run the merge stage first"),
    (["--model-dir", "nowhere", "a"], "--model-dir nowhere: no such folder"),
    (["--model-dir", "data", "a"], "--model-dir data: no model there"),
    (["--temperature", "0.5", "a"], "--temperature and --top-p apply to sampling only: add --do-sample"),
    (["--max-new-tokens", "0", "a"], "max_new_tokens: 0 must be at least 1"),
])
def test_bad_input_exits_2_with_one_line(workdir, capsys, argv, message):
    (workdir / "empty.txt").write_text("\n \n")
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: predict.main(argv))
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
