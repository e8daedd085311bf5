"""Conversations: the trained tokens are exactly the assistant turns' tokens and their end-of-turn tokens, under real
chat templates, checked against a rendering written out here by hand, segment by segment."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from finetune.batching import IGNORE_INDEX
from finetune.data.chat import setup_chat, tokenize_conversations, turns
from finetune.data.chat_templates import TEMPLATES
from finetune.errors import StageError
from finetune.tasks.causal_lm import encode

ROOT = Path(__file__).resolve().parent.parent

CONVERSATION = [
    {"role": "system", "content": "You rewrite and convert things. Answer with the result only."},
    {"role": "user", "content": "Write nine hundred forty in digits."},
    {"role": "assistant", "content": "940"},
    {"role": "tool", "content": "lookup: 940 = nine hundred forty"},
    {"role": "user", "content": "Now rewrite in the plural: The horse watches."},
    {"role": "assistant", "content": "The horses watch."},
]


def bundled_tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "models/base")


def segments(name: str, messages: list[dict], bos: str, eos: str) -> list[tuple[str, bool]]:
    """The rendering of `messages` under template `name`, written out by hand: (text, trained) pieces, trained the
    assistant contents and their end-of-turn tokens."""
    out: list[tuple[str, bool]] = []
    if name == "chatml":
        for m in messages:
            if m["role"] == "assistant":
                out += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
            else:
                out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    elif name == "llama3":
        out.append((bos, False))
        for m in messages:
            role = "ipython" if m["role"] == "tool" else m["role"]
            out.append((f"<|start_header_id|>{role}<|end_header_id|>\n\n", False))
            out.append((m["content"].strip() + "<|eot_id|>", m["role"] == "assistant"))
    elif name == "mistral":
        out.append((bos, False))
        system = messages[0]["content"]
        first = True
        for m in messages[1:]:
            if m["role"] == "user":
                text = f"{system}\n\n{m['content']}" if first else m["content"]
                out.append((f"[INST] {text} [/INST]", False))
                first = False
            elif m["role"] == "assistant":
                out += [(" ", False), (m["content"] + eos, True)]
            else:
                out.append((f"[TOOL_RESULTS] {m['content']}[/TOOL_RESULTS]", False))
    elif name == "zephyr":
        for m in messages:
            out.append((f"<|{m['role']}|>\n", False))
            out += [(m["content"] + eos, m["role"] == "assistant"), ("\n", False)]
    return out


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[str, list[int]]:
    """The hand-rendered text and, for each of its tokens, whether it lies in a trained piece (any overlap)."""
    text, trained, at = "", [], 0
    for piece, train in pieces:
        if train:
            trained.append((at, at + len(piece)))
        text += piece
        at += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    marks = [any(s < b and e > a for a, b in trained) and e > s for s, e in enc["offset_mapping"]]
    return text, [t if m else IGNORE_INDEX for t, m in zip(enc["input_ids"], marks, strict=True)]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_only_assistant_turns_and_their_end_of_turn_tokens_are_trained(name):
    tokenizer = bundled_tokenizer()
    chat = setup_chat(tokenizer, name, "models/base")
    pieces = segments(name, CONVERSATION, tokenizer.bos_token, "</s>")
    text, labels = expected(tokenizer, pieces)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == text  # the template renders as written
    [(ids, got)] = tokenize_conversations([CONVERSATION], tokenizer, ["assistant"], "all")
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert got == labels, [(tokenizer.convert_ids_to_tokens(t), a, b) for t, a, b in zip(ids, got, labels,
                                                                                          strict=True) if a != b]
    trained = tokenizer.decode([t for t in got if t != IGNORE_INDEX])
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(name, "</s>")
    assert trained.replace(" ", "") == f"940{end}Thehorseswatch.{end}"
    assert chat.eos_token == end  # generation stops at the end of an answer
    if name != "mistral":  # no merges across a piece boundary: the pieces tokenized alone give the same tokens
        alone = [t for piece, _ in pieces if piece for t in tokenizer(piece, add_special_tokens=False)["input_ids"]]
        assert alone == ids


def test_nothing_of_the_system_prompt_or_tool_results_is_trained():
    tokenizer = bundled_tokenizer()
    setup_chat(tokenizer, "chatml", "models/base")
    [(ids, labels)] = tokenize_conversations([CONVERSATION], tokenizer, ["assistant"], "all")
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for message in CONVERSATION:
        if message["role"] in ("system", "tool", "user"):
            start = text.index(message["content"])
            inside = [k for k, (s, e) in enumerate(offsets) if s < start + len(message["content"]) and e > start]
            assert inside and all(labels[k] == IGNORE_INDEX for k in inside), message["role"]


def test_the_mask_matches_transformers_generation_markers():
    """ChatML here carries {% generation %} markers; transformers' own assistant mask from them is an independent
    implementation to agree with (the spans found here never read the markers)."""
    tokenizer = bundled_tokenizer()
    setup_chat(tokenizer, "chatml", "models/base")
    out = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    [(ids, labels)] = tokenize_conversations([CONVERSATION], tokenizer, ["assistant"], "all")
    assert out["input_ids"] == ids
    assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in out["assistant_masks"]]


def test_last_turn_only_and_chosen_roles():
    tokenizer = bundled_tokenizer()
    setup_chat(tokenizer, "chatml", "models/base")
    [(_, last)] = tokenize_conversations([CONVERSATION], tokenizer, ["assistant"], "last")
    assert tokenizer.decode([t for t in last if t != IGNORE_INDEX]) == "The horses watch.<|im_end|>"
    [(_, users)] = tokenize_conversations([CONVERSATION], tokenizer, ["user", "assistant"], "all")
    trained = tokenizer.decode([t for t in users if t != IGNORE_INDEX])
    assert "Write nine hundred forty in digits.<|im_end|>" in trained and "You rewrite" not in trained


def test_a_template_without_a_matching_content_is_refused_by_record():
    tokenizer = bundled_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: [redacted]{{ eos_token }}{% endfor %}"
    [result] = tokenize_conversations([CONVERSATION[1:3]], tokenizer, ["assistant"], "all")
    assert result == "the chat template does not render turn 2 (assistant) verbatim, so its tokens cannot be found"


def test_a_model_without_a_template_is_told_how_to_name_one():
    tokenizer = bundled_tokenizer()
    with pytest.raises(StageError, match=r"has no chat template.*chatml, llama3, mistral, zephyr"):
        setup_chat(tokenizer, None, "models/base")


def test_sharegpt_turns_become_messages_and_bad_ones_say_why():
    value = [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    assert turns(value, "conversations") == ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                              {"role": "assistant", "content": "A"}], None)
    assert turns(json.dumps(value), "conversations")[0][2]["content"] == "A"  # a JSON string, as in a CSV cell
    assert "expected one of system, human" in turns([{"from": "bot", "value": "A"}], "conversations")[1][1]
    assert "ends with the assistant's answer" in turns(value[:2], "conversations")[1][1]
    assert turns([], "messages")[1] == ("invalid_conversation", "field 'messages' holds no turns")
    assert "content is int" in turns([{"role": "user", "content": 1}], "messages")[1][1]
    assert turns([{"role": "user", "content": "a\ud800"}], "messages")[1][0] == "invalid_utf8"
    # Arrow gives every turn of a file all the keys any turn has: a null "from" beside a "role"
    mixed = [{"from": None, "value": None, "role": "user", "content": "Q"},
             {"from": "gpt", "value": "A", "role": None, "content": None}]
    assert turns(mixed, "conversations")[0] == [{"role": "user", "content": "Q"}, {"role": "assistant",
                                                                                  "content": "A"}]


def test_batched_token_ids_equal_the_tokenizers_own():
    """encode() reads ids straight from the Rust tokenizer; with a BOS-adding post-processor as Llama's has."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = bundled_tokenizer()
    texts = ["Write 940 in words.", "The horses watch.\n", ""]
    for add in (True, False):
        assert encode(tokenizer, texts, add) == tokenizer(texts, add_special_tokens=add)["input_ids"]
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert encode(tokenizer, texts, True) == tokenizer(texts)["input_ids"]
    assert encode(tokenizer, texts, True)[0][0] == bos


def test_a_misspelt_template_name_or_broken_jinja_is_a_params_error(tmp_path):
    import yaml

    from finetune.config.params import load_params
    from finetune.config.schema import ParamsError

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for value, message in (("chatlm", "did you mean 'chatml'?"), ("{{ messages[0]['content'] }", "does not parse"),
                           ("zephyr", None), ("{% for m in messages %}{{ m['content'] }}{% endfor %}", None)):
        params["prepare"]["chat_template"] = value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if message is None:
            assert load_params(tmp_path / "params.yaml").prepare.chat_template == value
            continue
        with pytest.raises(ParamsError, match=rf"params.yaml:\d+: prepare.chat_template: .*{re.escape(message)}"):
            load_params(tmp_path / "params.yaml")


def test_an_inline_template_goes_through_dvc_set_param_in_double_quotes(tmp_path):
    """The README's command: dvc exp run -S 'prepare.chat_template="{% ... %}"' (DVC's override grammar takes a
    double-quoted value whole); the template it sets trains each answer and its EOS."""
    import shlex

    import yaml
    from dvc.utils.hydra import apply_overrides

    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("dvc exp run -S 'prepare.chat_template="))
    override = shlex.split(command)[-1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"chat_template": None}}))
    apply_overrides(str(tmp_path / "params.yaml"), [override])
    template = yaml.safe_load((tmp_path / "params.yaml").read_text())["prepare"]["chat_template"]
    assert template.startswith("{% for m in messages %}<|{{ m.role }}|>")
    tokenizer = bundled_tokenizer()
    setup_chat(tokenizer, template, "models/base")
    [(_, labels)] = tokenize_conversations([CONVERSATION], tokenizer, ["assistant"], "all")
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "940</s>The horses watch.</s>"


@pytest.mark.parametrize("answer", ["a", "ant", "s", "id", "user", "im"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_short_answer_is_found_in_its_slot_not_in_a_header(name, answer):
    """An answer whose letters also appear in the role header or the end-of-turn token is trained where the
    template put it, with its end-of-turn token, and nothing of the header."""
    tokenizer = bundled_tokenizer()
    chat = setup_chat(tokenizer, name, "models/base")
    conversation = [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": answer}]
    [(_, labels)] = tokenize_conversations([conversation], tokenizer, ["assistant"], "all")
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained.strip() == answer + chat.eos_token


def test_an_empty_turn_after_an_answer_leaves_its_end_of_turn_token_trained():
    tokenizer = bundled_tokenizer()
    setup_chat(tokenizer, "chatml", "models/base")
    conversation = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": ""}, {"role": "assistant", "content": "bye"}]
    [(_, labels)] = tokenize_conversations([conversation], tokenizer, ["assistant"], "all")
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "hello<|im_end|>bye<|im_end|>"


def test_added_tokens_train_in_an_untied_output_layer_too():
    """A model whose output layer is not tied to its embeddings gets the new rows trained in both."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.config.model import LoraParams
    from finetune.models import embedding_layers, fit_embeddings, lora_config

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    fit_embeddings(model, 52, [50, 51])
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 52
    layers = embedding_layers(model)
    assert layers == ["embed_tokens", "lm_head"]
    peft_model = get_peft_model(model, lora_config(LoraParams(), "CAUSAL_LM", dict.fromkeys(layers, [50, 51])))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad and "token" in n]
    assert len(trained) == 2 and any("lm_head" in n for n in trained)
