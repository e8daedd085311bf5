"""Chat templates by name, for `prepare.chat_template` on a model whose tokenizer has none (or the wrong one).

Each is the Jinja text a tokenizer's `chat_template` holds, written after the format it is named for, with the
special tokens it needs: those a tokenizer lacks are added to it (and the model's embeddings grow to match, their
new rows trained). None of the loss masking depends on a template's markup: the trained spans are found in the
rendered text (finetune.data.chat), so `{% generation %}` markers are neither needed nor read.
"""

from __future__ import annotations

# ChatML as Qwen2/2.5 write it (roles verbatim, tool results as their own turns), with `{% generation %}` markers
# around what an assistant says, as TRL's training templates carry them.
CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3: the BOS token first, a header per turn, contents trimmed, <|eot_id|> ending every turn; tool results
# are the `ipython` role.
LLAMA3 = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral's [INST] format: the system prompt joins the first user message, an answer follows [/INST] after a
# space and ends with EOS, tool results sit in [TOOL_RESULTS]; there is no generation prompt of its own.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system %}{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'tool' %}{{- '[TOOL_RESULTS] ' + message['content'] + '[/TOOL_RESULTS]' }}"
    "{%- else %}{{- raise_exception('the mistral template has no place for a ' + message['role'] + ' turn') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Zephyr: plain-text role tags, each turn closed by EOS; no special tokens beyond EOS, no generation markers.
ZEPHYR = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "zephyr": ZEPHYR}

# The special tokens each template's markup needs as single tokens (added to a tokenizer that lacks them).
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),
    "zephyr": (),
}
