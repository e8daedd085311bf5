"""Generate the bundled dataset: instruction -> response pairs of deterministic text transformations.

    python scripts/make_dataset.py                       # writes data/raw/transforms.jsonl (3000 pairs)
    python scripts/make_dataset.py --n 500 --seed 1 --out /tmp/small.jsonl
    python scripts/make_dataset.py --conversations --n 1500 --out data/raw/conversations.jsonl

The conversations (OpenAI-style `messages`) hold a system prompt and two tasks: one of the tasks above, then a
follow-up that refers back to it ("Now back to ISO format."), whose answer is in the first user turn, so the model
must read the conversation, not just the last message.

Every answer is a pure function of its question (dates, numbers, units, clock times, word order), so exact match,
BLEU and ROUGE measure something real. The same task functions also write the *related text* that the bundled base
model is pretrained on (`related_sentences`, used by scripts/pretrain_base.py): statements of the same facts in prose,
never in the instruction format, so the base model knows the facts but not the task.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
# (unit, target unit name, target symbol, factor)
UNITS = [("km", "meters", "m", 1000), ("m", "centimeters", "cm", 100), ("cm", "millimeters", "mm", 10),
         ("kg", "grams", "g", 1000), ("l", "milliliters", "ml", 1000)]
NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "horse": "horses", "king": "kings", "queen": "queens",
         "farmer": "farmers", "teacher": "teachers", "student": "students", "train": "trains", "ship": "ships",
         "child": "children", "mouse": "mice", "man": "men", "woman": "women", "person": "people", "goose": "geese",
         "box": "boxes", "fox": "foxes", "bus": "buses", "city": "cities", "baby": "babies", "lady": "ladies",
         "wolf": "wolves", "leaf": "leaves", "knife": "knives", "hero": "heroes"}
# (third person singular, plural form)
VERBS = [("sleeps", "sleep"), ("runs", "run"), ("waits", "wait"), ("sings", "sing"), ("eats", "eat"),
         ("plays", "play"), ("watches", "watch"), ("tries", "try"), ("goes home", "go home"),
         ("has a map", "have a map"), ("is here", "are here"), ("was late", "were late")]


def number_words(n: int) -> str:
    """0..999 in English words: 347 -> 'three hundred forty-seven'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def random_date(rng: random.Random) -> tuple[str, str]:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    return f"{year:04d}-{month:02d}-{day:02d}", f"{MONTHS[month - 1]} {day}, {year}"


def random_clock(rng: random.Random) -> tuple[str, str]:
    hour, minute = rng.randint(0, 23), rng.choice(range(0, 60, 5))
    suffix = "AM" if hour < 12 else "PM"
    return f"{hour:02d}:{minute:02d}", f"{(hour % 12) or 12}:{minute:02d} {suffix}"


def random_quantity(rng: random.Random) -> tuple[str, str, str]:
    unit, target_name, target_symbol, factor = rng.choice(UNITS)
    value = rng.randint(1, 99)
    return f"{value} {unit}", target_name, f"{value * factor} {target_symbol}"


def random_sentence(rng: random.Random) -> tuple[str, str]:
    """'The mouse sleeps.' and its plural 'The mice sleep.'"""
    noun = rng.choice(sorted(NOUNS))
    singular_verb, plural_verb = rng.choice(VERBS)
    return f"The {noun} {singular_verb}.", f"The {NOUNS[noun]} {plural_verb}."


def instruction_pair(rng: random.Random) -> dict[str, str]:
    """One task example in the instruction format the fine-tuned model learns, with the kind of transformation it
    asks for as its `label` (the bundled classification task: task.type classification reads prompt and label)."""
    task = rng.randrange(7)
    if task == 0:
        iso, long = random_date(rng)
        return {"prompt": f"Write the date {iso} in words.", "response": long, "label": "date_to_words"}
    if task == 1:
        iso, long = random_date(rng)
        return {"prompt": f"Convert {long} to ISO format.", "response": iso, "label": "date_to_iso"}
    if task == 2:
        n = rng.randint(0, 999)
        return {"prompt": f"Spell out the number {n}.", "response": number_words(n), "label": "number_to_words"}
    if task == 3:
        n = rng.randint(0, 999)
        return {"prompt": f"Write {number_words(n)} in digits.", "response": str(n), "label": "number_to_digits"}
    if task == 4:
        quantity, target_name, converted = random_quantity(rng)
        return {"prompt": f"Convert {quantity} to {target_name}.", "response": converted, "label": "unit_conversion"}
    if task == 5:
        clock, twelve = random_clock(rng)
        return {"prompt": f"Convert {clock} to 12-hour time.", "response": twelve, "label": "clock_12h"}
    singular, plural = random_sentence(rng)
    return {"prompt": f"Rewrite in the plural: {singular}", "response": plural, "label": "plural"}


SYSTEM = "You convert dates, numbers, units, clock times and sentences. Answer with the result only."


def conversation(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """A system prompt, a task, and a follow-up that undoes it: its answer is the first task's input."""
    task = rng.randrange(7)
    if task == 0:
        iso, long = random_date(rng)
        turns = (f"Write the date {iso} in words.", long, "Now back to ISO format.", iso)
    elif task == 1:
        iso, long = random_date(rng)
        turns = (f"Convert {long} to ISO format.", iso, "Now write it in words.", long)
    elif task == 2:
        n = rng.randint(0, 999)
        turns = (f"Spell out the number {n}.", number_words(n), "Now in digits.", str(n))
    elif task == 3:
        n = rng.randint(0, 999)
        turns = (f"Write {number_words(n)} in digits.", str(n), "Now spell it out.", number_words(n))
    elif task == 4:
        quantity, target_name, converted = random_quantity(rng)
        turns = (f"Convert {quantity} to {target_name}.", converted, "Now convert it back.", quantity)
    elif task == 5:
        clock, twelve = random_clock(rng)
        turns = (f"Convert {clock} to 12-hour time.", twelve, "Now back to 24-hour time.", clock)
    else:
        singular, plural = random_sentence(rng)
        turns = (f"Rewrite in the plural: {singular}", plural, "Now back to the singular.", singular)
    first, answer, follow_up, final = turns
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first},
                         {"role": "assistant", "content": answer}, {"role": "user", "content": follow_up},
                         {"role": "assistant", "content": final}]}


def related_sentence(rng: random.Random) -> str:
    """One statement of the same facts in prose, for pretraining the base model."""
    task = rng.randrange(6)
    if task == 0:
        iso, long = random_date(rng)
        return rng.choice([f"{iso} is {long}.", f"{long} is {iso}.", f"The day {long} ({iso}) was chosen."])
    if task == 1:
        n = rng.randint(0, 999)
        return rng.choice([f"{n} is {number_words(n)}.", f"{number_words(n)} is {n}.",
                           f"There were {number_words(n)} ({n}) of them."])
    if task == 2:
        quantity, _, converted = random_quantity(rng)
        return rng.choice([f"{quantity} is {converted}.", f"{converted} is {quantity}."])
    if task == 3:
        clock, twelve = random_clock(rng)
        return rng.choice([f"{clock} is {twelve}.", f"{twelve} is {clock}.", f"We met at {twelve} ({clock})."])
    singular, plural = random_sentence(rng)
    noun = rng.choice(sorted(NOUNS))
    return rng.choice([f"{singular} {plural}", f"{plural} {singular}", f"One {noun}, two {NOUNS[noun]}."])


def instruction_pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [instruction_pair(rng) for _ in range(n)]


def related_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [related_sentence(rng) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="number of pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/raw/transforms.jsonl"))
    parser.add_argument("--conversations", action="store_true", help="write conversations instead of pairs")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    records = (conversation(rng) for _ in range(args.n)) if args.conversations else \
        instruction_pairs(args.n, args.seed)
    with args.out.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {args.n} {'conversations' if args.conversations else 'pairs'} to {args.out}")


if __name__ == "__main__":
    main()
