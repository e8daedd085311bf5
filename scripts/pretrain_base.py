"""Build the bundled base model in models/base: a byte-level BPE tokenizer and a 4-layer Llama, pretrained from scratch.

    python scripts/pretrain_base.py                     # ~10 minutes on 2 CPU cores; rewrites models/base
    python scripts/pretrain_base.py --steps 20 --out /tmp/base   # a quick smoke run

LoRA needs a model that already knows something: on random weights it learns little. This script pretrains a tiny
causal LM on *related text* -- prose statements of the facts behind the bundled tasks ("2023-04-05 is April 5, 2023.",
"347 is three hundred forty-seven.") written by scripts/make_dataset.py -- but never on the instruction format, so
fine-tuning has a real job: teach the model to answer instructions with what it knows.

Deterministic: the corpus, tokenizer and initial weights come from --seed, training runs with deterministic
algorithms on one process, so the same command on the same software gives the same weights. The result is saved with
safetensors (a few MB) and committed, the way model hubs keep tiny test models; `from_pretrained("models/base")`
loads it exactly as it would load a hub id.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dataset import instruction_pairs, related_sentences  # noqa: E402

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TEMPLATE_TEXT = "### Instruction:\n\n### Response:\n"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, never an unknown character) with digits split one by one, as Llama does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=256, padding_side="right",
                                   **SPECIAL_TOKENS)


def packed_blocks(tokenizer: PreTrainedTokenizerFast, sentences: list[str], block: int) -> list[dict]:
    """Concatenate sentences separated by EOS and cut into equal blocks: no padding, every token trains."""
    ids: list[int] = []
    for row in tokenizer(sentences, add_special_tokens=False)["input_ids"]:
        ids.extend(row + [tokenizer.eos_token_id])
    return [{"input_ids": ids[i:i + block], "labels": ids[i:i + block]}
            for i in range(0, len(ids) - block + 1, block)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/base"))
    parser.add_argument("--sentences", type=int, default=200000, help="size of the pretraining corpus (sentences)")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps; fewer = faster, weaker base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=128, help="tokens per packed training row")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128, help="width; params grow with its square")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    set_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    sentences = related_sentences(args.sentences, seed=args.seed)
    # The tokenizer also sees the instruction wording, so task words get their own tokens; the model does not.
    vocab_texts = sentences + [p["prompt"] + "\n" + p["response"] for p in instruction_pairs(5000, args.seed + 1)]
    tokenizer = train_tokenizer(vocab_texts + [TEMPLATE_TEXT] * 100, args.vocab)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, head_dim=args.hidden // 4,
        max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    print(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tokenizer)}")

    blocks = packed_blocks(tokenizer, sentences, args.block)
    random.Random(args.seed).shuffle(blocks)
    work_dir = args.out.parent / f".{args.out.name}-pretrain"
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(work_dir), max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
            weight_decay=0.1, logging_steps=max(1, args.steps // 20), save_strategy="no", report_to=[],
            seed=args.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            disable_tqdm=not sys.stderr.isatty()),
        train_dataset=blocks,
    )
    result = trainer.train()
    shutil.rmtree(work_dir, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out)  # safetensors
    tokenizer.save_pretrained(args.out)
    (args.out / "pretrain_args.json").write_text(json.dumps(
        {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "final_train_loss": round(result.training_loss, 4), "corpus_blocks": len(blocks),
         "torch": torch.__version__}, indent=2) + "\n")
    print(f"saved {args.out} (mean train loss {result.training_loss:.3f})")


if __name__ == "__main__":
    main()
