"""Train/validation/test splits: seeded, stratified by label when the answers are labels (data.stratify), with the
warnings a small split deserves."""

from __future__ import annotations

import math
import random
from collections import Counter
from fractions import Fraction

from finetune.config.data import DataParams
from finetune.config.evaluate import EvaluateParams
from finetune.errors import StageError
from finetune.metrics import detect_labels, normalize_label

SPLITS = ("train", "validation", "test")
STEADY_TEST_EXAMPLES = 100  # fewer test examples: one more right answer moves exact match by over a point


def split_examples(examples: list, validation_ratio: float, test_ratio: float, seed: int,
                   labels: list[str] | None = None) -> dict[str, list]:
    """Seeded shuffle, then cut: the same seed and data always give the same split. With `labels` (each example's),
    each label's examples are cut on their own (`stratified_counts`), so its share of every split is within one
    example of its share of the data; the splits keep their sizes."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test, n_val = round(len(order) * test_ratio), round(len(order) * validation_ratio)
    if labels is None:
        test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    else:
        members: dict[str, list[int]] = {}  # each label's examples, in shuffled order
        for i in order:
            members.setdefault(labels[i], []).append(i)
        counts = stratified_counts({label: len(members[label]) for label in sorted(members)},
                                   (n_test, n_val, len(order) - n_test - n_val))
        test, val, train = [], [], []
        for label, (t, v, _) in counts.items():
            test += members[label][:t]
            val += members[label][t:t + v]
            train += members[label][t + v:]
        place = {i: p for p, i in enumerate(order)}
        test, val, train = (sorted(split, key=place.__getitem__) for split in (test, val, train))
    return {"train": [examples[i] for i in train], "validation": [examples[i] for i in val],
            "test": [examples[i] for i in test]}


def stratified_counts(label_counts: dict[str, int], sizes: tuple[int, int, int]) -> dict[str, list[int]]:
    """How many examples of each label go to each of three splits: its share of the split rounded down or up, so
    within one example of it, with the counts adding up to each label's total and to each split's size.

    Labels are taken in turn, each rounded up in the splits that are owed the most: what a label's share rounds
    away, plus what the labels before it left each split short (scikit-learn's stratified splits, applied twice,
    miss the one-example bound for a few percent of labels). That keeps every split's running shortfall within
    one example, so it ends at exactly zero."""
    total = sum(sizes)
    owed = [Fraction(0)] * len(sizes)  # per split: its share of the labels so far minus what it got, in (-1, 1)
    out = {}
    for label, count in label_counts.items():
        shares = [Fraction(size * count, total) for size in sizes]
        given = [math.floor(share) for share in shares]
        rounded_up = sorted((s for s in range(len(sizes)) if shares[s] > given[s]),
                            key=lambda s: shares[s] - given[s] + owed[s], reverse=True)
        for s in rounded_up[:count - sum(given)]:
            given[s] += 1
        owed = [o + share - g for o, share, g in zip(owed, shares, given, strict=True)]
        out[label] = given
    assert not any(owed), owed  # every split got exactly its size
    return out


def split_labels(responses: list[str], data: DataParams, evaluate: EvaluateParams) -> list[str] | None:
    """Each response's label, to stratify the split by, or None for the plain shuffle. data.stratify auto: when
    evaluate scores the answers as labels (evaluate.labels a list, or auto and `detect_labels` finds a small label
    set); true: also with evaluate.labels off, and the answers must be labels; false: never."""
    if data.stratify is False:
        return None
    if isinstance(evaluate.labels, list) or ((evaluate.labels == "auto" or data.stratify is True)
                                             and detect_labels(responses, evaluate.max_labels)):
        return [normalize_label(r) for r in responses]
    if data.stratify is True:
        distinct = len({normalize_label(r) for r in responses})
        raise StageError(f"data.stratify: true, but the responses are not a label set: {distinct} distinct answers "
                         f"in {len(responses)} examples (labels are 2 to evaluate.max_labels={evaluate.max_labels}, "
                         "each seen twice on average); list them in evaluate.labels, or set data.stratify: auto")
    return None


def rare_labels_warning(splits: dict[str, list[str]]) -> str | None:
    """The labels some (non-empty) split holds none of: too rare to stratify, they get their share rounded, to 0.
    `splits`: each split's labels (normalized, as split_labels gives them)."""
    have = {name: Counter(split) for name, split in splits.items() if split}
    total = sum(have.values(), Counter())
    rare = {label: [name for name in SPLITS if name in have and not have[name][label]] for label in sorted(total)}
    rare = {label: missing for label, missing in rare.items() if missing}
    if not rare:
        return None
    listed = ", ".join(f"{label!r} ({total[label]}, none in {' or '.join(missing)})"
                       for label, missing in list(rare.items())[:5]) + (", ..." if len(rare) > 5 else "")
    return (f"{len(rare)} of {len(total)} labels are too rare for every split to hold one: {listed}; each split "
            "gets its share of a label rounded, here to 0")


def small_test_warning(n_test: int) -> str | None:
    """How noisy the test metrics are when the test split is small: the points one example is worth, and the 95%
    interval of a 50% exact match (binomial, the widest)."""
    if n_test >= STEADY_TEST_EXAMPLES:
        return None
    return (f"the test split has {n_test} examples: each is {100 / n_test:.1f} points of exact match, and a 50% "
            f"exact match is +/-{196 * math.sqrt(0.25 / n_test):.0f} points (95% interval); "
            f"{STEADY_TEST_EXAMPLES}+ examples bring that to +/-10 (raise data.test_ratio or give data.test_path)")
