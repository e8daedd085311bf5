"""predict: answer new prompts with the fine-tuned or merged model, templated and generated as in evaluate.

    python -m tools.predict "Spell out the number 970."               # the fine-tuned model (train.finetuned_dir)
    python -m tools.predict "Spell out 5." "Convert 3 km to meters."  # several prompts, batched
    python -m tools.predict --file prompts.txt                         # one prompt a line, or JSONL with "prompt"
    python -m tools.predict - < prompts.txt                            # the same from stdin
    python -m tools.predict --model merged --jsonl --file prompts.jsonl > answers.jsonl
    python -m tools.predict --file chats.jsonl    # {"messages": [...]} a line: a model trained on conversations
    python -m tools.predict --model-dir path/to/model --do-sample --temperature 0.7 --max-new-tokens 64 "..."

Give each prompt as in the training data, without the template. Predict wraps it in the template the model was
trained with: train saves params prepare.template with the model as its tokenizer's chat template, and merge copies
it, so predict uses the saved one even after params.yaml has changed (a model saved before templates were saved gets
params.yaml's, with a note). Generation is the evaluate stage's batched `generate` with evaluate's settings: those the
merged export saved in its generation_config.json (merge writes them), else params `evaluate` (as the evaluate stage
reads them; train does not save them, as a generation change must not retrain), then the options below. So by
default the fine-tuned model answers the test prompts exactly as in outputs/predictions_finetuned.jsonl.

A classifier (params task.type: classification) gives each text's class instead, its text as it is (no template),
and with --jsonl every class's probability ({"prompt", "prediction", "probabilities"}).

Prints one answer a line to stdout (--jsonl: {"prompt", "prediction"} lines, for answers that span lines); what it
chose and why goes to stderr. Writes no file. Bad input exits 2 with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from finetune.config.evaluate import EvaluateParams
from finetune.config.model import ModelParams
from finetune.config.params import PARAMS_FILE, Params, load_params
from finetune.data.chat import turns
from finetune.entrypoint import run_main
from finetune.errors import StageError
from finetune.evaluation import load_model
from finetune.generation import generate
from finetune.models import load_tokenizer
from finetune.tasks import task_of, task_of_export
from finetune.tasks.causal_lm import CHAT_TEMPLATE_MARKER, CONVERSATION_MARKER

GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p")  # what merge saves; options override them


def read_prompts(text: str, source: str) -> list[str | list[dict]]:
    """One prompt a line (blank lines skipped), or JSONL when the first line is a JSON object: one object a line,
    each with a "prompt" string (which may span lines) or a conversation to answer ("messages", ending with the
    turn to answer)."""
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise StageError(f"{source}: no prompts (empty, or blank lines only)")
    if json_object(lines[0][1]) is None:
        return [line for _, line in lines]
    prompts: list[str | list[dict]] = []
    for n, line in lines:
        record = json_object(line)
        if record is not None and "messages" in record:
            messages, problem = turns(record["messages"], "messages", answered=False)
            if problem:
                raise StageError(f"{source}:{n}: {problem[1]}")
            prompts.append(messages)
            continue
        if record is None or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise StageError(f'{source}:{n}: no "prompt" string; JSONL input (its first line is a JSON object) '
                             'needs one object a line, each with a non-empty "prompt" (or "messages")')
        prompts.append(record["prompt"])
    return prompts


def json_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def collect_prompts(arguments: list[str], file: str | None, stdin) -> list[str]:
    """The prompts in the order given: command-line arguments ("-" reads stdin in its place), then --file."""
    prompts = []
    for i, argument in enumerate(arguments, 1):
        if argument == "-":
            prompts += read_prompts(stdin.read(), "stdin")
        elif not argument.strip():
            raise StageError(f"prompt {i} on the command line is empty")
        else:
            prompts.append(argument)
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise StageError(f"{file}: no such file (--file)")
        try:
            prompts += read_prompts(path.read_text(encoding="utf-8"), file)
        except UnicodeDecodeError as err:
            raise StageError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not prompts:
        raise StageError('no prompts: give them as arguments, with --file FILE, or "-" to read them from stdin')
    return prompts


def model_source(params: Params, which: str, model_dir: str | None) -> tuple[str, Params, Path]:
    """What evaluate's load_model should load ('finetuned' or 'merged'), params pointing it at the folder, and the
    folder: a --model-dir is a fine-tuned model if the train stage wrote it (train_config.json), else a plain one."""
    if model_dir is None:
        return which, params, Path(params.train.finetuned_dir if which == "finetuned" else params.export.merged_dir)
    folder = Path(model_dir)
    if (folder / "train_config.json").exists():
        return "finetuned", replace(params, train=replace(params.train, finetuned_dir=model_dir)), folder
    if (folder / "config.json").exists():
        return "merged", replace(params, export=replace(params.export, merged_dir=model_dir)), folder
    raise StageError(f"--model-dir {model_dir}: " + (
        "no model there: neither train_config.json (the train stage's) nor config.json (a transformers model)"
        if folder.is_dir() else "no such folder"))


def generation_settings(params: Params, which: str, folder: Path, options: dict) -> tuple[EvaluateParams, str]:
    """evaluate's settings: params `evaluate`, then what a merged (or plain) model saved in its
    generation_config.json, then the command-line options; and a line saying where each came from."""
    saved = {}
    if which == "merged" and (folder / "generation_config.json").exists():
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(folder)
        saved = {key: getattr(config, key) for key in GENERATION_KEYS if getattr(config, key, None) is not None}
    given = {key: value for key, value in options.items() if value is not None}
    settings = replace(params.evaluate, **{**saved, **given})
    if not settings.do_sample and {"temperature", "top_p"} & given.keys():
        raise StageError("--temperature and --top-p apply to sampling only: add --do-sample")
    if problems := settings.problems():
        raise StageError("; ".join(problems))
    shown = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
    if settings.do_sample:
        shown.update(temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)
    origin = []
    if from_model := [key for key in saved if key not in given]:
        origin.append(f"{', '.join(from_model)} from {folder}/generation_config.json")
    if given:
        origin.append(f"{', '.join(given)} from the command line")
    origin.append("the rest from params evaluate")
    return settings, f"generation: {', '.join(f'{k}={v}' for k, v in shown.items())} ({'; '.join(origin)})"


def prompt_template(tokenizer, params: Params, folder: Path):
    """A function from a prompt to the model's input text, and a line saying whose template it is: the one saved
    with the model (the tokenizer's chat template, written by train), else params prepare.template."""

    saved = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if CHAT_TEMPLATE_MARKER in saved or CONVERSATION_MARKER in saved:
        def render(prompt: str) -> str:
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        kind = "prompt template" if CHAT_TEMPLATE_MARKER in saved else "chat template (a one-message conversation)"
        return render, f"{kind}: the one saved with the model ({folder}), which wins over params.yaml's"

    def render_from_params(prompt: str) -> str:
        return params.prepare.template.format(prompt=prompt)
    why = "its chat template is not one train wrote" if saved else "it has no chat template"
    return render_from_params, (f"prompt template: params.yaml prepare.template, as {folder} was saved without "
                                f"its own ({why}); retrain (dvc repro train) to save it with the model")


def run(params: Params, prompts: list[str | list[dict]], which: str = "finetuned", model_dir: str | None = None,
        options: dict | None = None) -> list[str]:
    """The model's answers to `prompts`, in order: templated as in training, generated as in evaluate; a
    classifier's: the class of each text."""
    return [answer["prediction"] for answer in predictions(params, prompts, which, model_dir, options)]


def predictions(params: Params, prompts: list[str | list[dict]], which: str = "finetuned",
                model_dir: str | None = None, options: dict | None = None) -> list[dict]:
    """{"prediction"} of each prompt, in order; a classifier's also {"probabilities"} of every class."""
    from transformers import set_seed

    which, params, folder = model_source(params, which, model_dir)
    options = options or {}
    task = task_of(folder) if which == "finetuned" and (folder / "train_config.json").exists() else \
        task_of_export(folder)
    if task.name == "classification":
        return classify(params, which, folder, task, prompts, options)
    settings, generation_note = generation_settings(params, which, folder, options)
    model = load_model(params, which, task)  # says what to run first when the folder is missing or incomplete
    tokenizer = load_tokenizer(ModelParams(model_name=str(folder)))
    render, template_note = prompt_template(tokenizer, params, folder)
    print(f"predict: {len(prompts)} prompts, {which} model {folder} ({next(model.parameters()).device})\n"
          f"{template_note}\n{generation_note}", file=sys.stderr)
    chat = CONVERSATION_MARKER in (tokenizer.chat_template or "")  # the template writes any BOS itself
    if not chat and any(isinstance(prompt, list) for prompt in prompts):
        raise StageError(f"{folder} was trained on single prompts, not conversations: give prompts")
    texts = [render(prompt) if isinstance(prompt, str) else
             tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) for prompt in prompts]
    head = render("\x00").split("\x00")[0]  # the template's text before the prompt
    singles = [prompt for prompt in prompts if isinstance(prompt, str)]
    if head.strip() and (templated := sum(prompt.startswith(head) for prompt in singles)):
        print(f"warning: {templated} prompts already start with the template's text {head!r}; give each prompt "
              "alone, as in the training data: predict adds the template", file=sys.stderr)
    set_seed(settings.seed)
    return [{"prediction": answer} for answer in generate(model, tokenizer, texts, settings,
                                                           add_special_tokens=not chat)]


def classify(params: Params, which: str, folder: Path, task, texts: list, options: dict) -> list[dict]:
    """A classifier's class of each text, as the evaluate stage scores it (the text as it is, no template), with
    every class's probability."""
    from datasets import Dataset

    from finetune.data.text import encode
    from finetune.tasks.classification import probabilities

    if given := [key for key in GENERATION_KEYS + ("seed",) if options.get(key) is not None]:
        raise StageError(f"--{given[0].replace('_', '-')}: {folder} is a classifier, which generates nothing")
    if any(not isinstance(text, str) for text in texts):
        raise StageError(f"{folder} is a classifier of texts: give texts, not conversations")
    model = load_model(params, which, task)
    tokenizer = load_tokenizer(ModelParams(model_name=str(folder)))
    classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    print(f"predict: {len(texts)} texts, {which} classifier {folder} ({next(model.parameters()).device}), "
          f"{len(classes)} classes", file=sys.stderr)
    rows = Dataset.from_dict({"input_ids": encode(tokenizer, texts, add_special_tokens=True)})
    probs = probabilities(model, rows, tokenizer.pad_token_id, options.get("batch_size") or params.evaluate.batch_size)
    return [{"prediction": classes[int(row.argmax())],
             "probabilities": {label: round(float(p), 6) for label, p in zip(classes, row, strict=True)}}
            for row in probs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Answer prompts with the fine-tuned or merged model (template and generation as in training "
                    "and evaluate). Writes no file.")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT",
                        help='a prompt as in the training data, without the template; "-" reads prompts from stdin')
    parser.add_argument("--file", help='prompts, one a line, or JSONL with a "prompt" field')
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=["finetuned", "merged"], default="finetuned",
                        help="finetuned: train.finetuned_dir (default); merged: export.merged_dir")
    source.add_argument("--model-dir", help="a model folder: the train stage's, the merge stage's or any causal LM")
    parser.add_argument("--jsonl", action="store_true", help='print {"prompt", "prediction"} lines')
    generation = parser.add_argument_group("generation (default: saved with the model, else params evaluate)")
    generation.add_argument("--max-new-tokens", type=int)
    generation.add_argument("--do-sample", action=argparse.BooleanOptionalAction, help="sample instead of greedy")
    generation.add_argument("--temperature", type=float, help="with --do-sample")
    generation.add_argument("--top-p", type=float, help="with --do-sample")
    generation.add_argument("--batch-size", type=int, help="prompts per generate() call")
    generation.add_argument("--seed", type=int, help="the sampling seed")
    args = parser.parse_args(argv)

    prompts = collect_prompts(args.prompts, args.file, sys.stdin)
    # outside the repository, a --model-dir still runs: what the model did not save comes from the defaults
    params = load_params() if PARAMS_FILE.exists() or args.model_dir is None else Params.defaults()
    options = {key: getattr(args, key) for key in (*GENERATION_KEYS, "batch_size", "seed")}
    answers = predictions(params, prompts, args.model, args.model_dir, options)
    for prompt, answer in zip(prompts, answers, strict=True):
        given = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
        print(json.dumps({**given, **answer}, ensure_ascii=False) if args.jsonl else answer["prediction"])


if __name__ == "__main__":
    run_main(main)
