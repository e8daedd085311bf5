"""Bayesian vs random search with the same budget, over several seeds, on a cheap stand-in stage.

    python -m bench.search                     # 3 seeds x 12 trials per strategy, ~4 minutes
    python -m bench.search --seeds 5 --trials 16

Each trial is a real DVC experiment (`python -m tools.search`) in a temporary git + DVC repository whose one
stage computes a known function of three params (a float, a log-scale float and a categorical) in milliseconds, so
the comparison measures the strategies, not training noise. Prints the best value each strategy found per seed and
writes bench/search_results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

OBJECTIVE = """
import json, math, pathlib, sys, yaml
p = yaml.safe_load(open("params.yaml"))
if p["x"] > 4.5:
    sys.exit("x too large: the stand-in stage fails here")
score = -((p["x"] - 1.3) ** 2) - (math.log10(p["lr"]) + 3) ** 2 + {"a": 0.0, "b": 0.5, "c": 0.2}[p["kind"]]
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump({"score": score, "nested": {"score": score}}, open("metrics/score.json", "w"))
"""
BEST = 0.5  # x = 1.3, lr = 1e-3, kind = b

DVC_YAML = {"stages": {"objective": {"cmd": "python objective.py", "deps": ["objective.py"],
                                     "params": ["x", "lr", "kind"],
                                     "metrics": [{"metrics/score.json": {"cache": False}}]}}}

SPACE = {"x": {"type": "float", "low": -4.0, "high": 4.0, "values": [0.0, 2.0]},
         "lr": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True, "values": [1e-3, 1e-2]},
         "kind": {"type": "categorical", "choices": ["a", "b", "c"]}}


def stand_in_repo(repo: Path) -> Path:
    """A git + DVC repository whose one stage scores params.yaml with the function above."""
    repo.mkdir(parents=True)
    (repo / "objective.py").write_text(OBJECTIVE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (repo / "params.yaml").write_text("x: 0.0\nlr: 0.01\nkind: a\n")
    (repo / ".gitignore").write_text("/search/\n")
    run = {"cwd": repo, "check": True, "capture_output": True}
    subprocess.run(["git", "init", "-q"], **run)
    subprocess.run(["git", "config", "user.email", "bench@localhost"], **run)
    subprocess.run(["git", "config", "user.name", "bench"], **run)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], **run)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], **run)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], **run)
    subprocess.run(["git", "add", "-A"], **run)
    subprocess.run(["git", "commit", "-qm", "stand-in"], **run)
    return repo


def search_config(repo: Path, **overrides) -> Path:
    config = {"strategy": "random", "trials": 4, "seed": 0, "study_name": "s", "startup_trials": 4,
              "objective": {"metric": "metrics/score.json:score", "direction": "maximize"}, "space": SPACE}
    config.update(overrides)
    path = repo / "search.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def best_found(repo: Path, strategy: str, seed: int, trials: int) -> float:
    from tools import search

    path = search_config(repo, strategy=strategy, seed=seed, trials=trials,
                         study_name=f"{strategy}-{seed}", storage=f"search/{strategy}-{seed}.db",
                         out_dir=f"search/{strategy}-{seed}")
    with contextlib.chdir(repo), contextlib.redirect_stdout(sys.stderr):
        board = search.search(search.load_config(path))
    return board["best"]["value"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/search_results.json")
    args = parser.parse_args(argv)
    results = {"trials": args.trials, "optimum": BEST, "random": [], "bayes": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        repo = stand_in_repo(Path(tmp) / "repo")
        for seed in range(args.seeds):
            for strategy in ("random", "bayes"):
                results[strategy].append(round(best_found(repo, strategy, seed, args.trials), 4))
                print(f"seed {seed} {strategy}: best {results[strategy][-1]}", file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["bayes_wins"] = sum(b > r for b, r in zip(results["bayes"], results["random"], strict=True))
    for strategy in ("random", "bayes"):
        results[f"{strategy}_mean_gap_to_optimum"] = round(BEST - statistics.mean(results[strategy]), 4)
    print(f"best score after {args.trials} trials (optimum {BEST}), per seed:")
    print(f"  random: {results['random']}  mean gap {results['random_mean_gap_to_optimum']}")
    print(f"  bayes:  {results['bayes']}  mean gap {results['bayes_mean_gap_to_optimum']}")
    print(f"bayes better on {results['bayes_wins']} of {args.seeds} seeds ({results['seconds']} s)")
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
