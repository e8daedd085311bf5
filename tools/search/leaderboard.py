"""The leaderboard: trials ranked by the objective, then by objective.secondary, with ties named and explained."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import StageError
from finetune.io import markdown_table, write_json, write_text
from tools.search import experiments
from tools.search.config import SearchConfig


def secondary_of(trial, config: SearchConfig) -> float | None:
    """A trial's tie-breaker as recorded when it finished; else (a trial settled after a stop, or recorded under
    another secondary metric) read from its experiment; None when it has none."""
    if not config.secondary:
        return None
    recorded = trial.user_attrs.get("secondary") or {}
    if recorded.get("metric") == config.secondary:
        return recorded["value"]
    files = experiments.experiment_metrics(trial.user_attrs["experiment"]) if "experiment" in trial.user_attrs else None
    try:
        return experiments.metric_value(config.secondary, files, "objective.secondary.metric") if files else None
    except StageError:
        return None


def rank_key(row: dict, config: SearchConfig) -> tuple:
    """By the objective, then the secondary metric (which orders ties), then the trial's number; no value last."""
    sign = -1 if config.direction == "maximize" else 1
    second_sign = -1 if config.secondary_direction == "maximize" else 1
    value, second = row["value"], row["secondary"]
    return (value is None, sign * value if value is not None else 0,
            second is None, second_sign * second if second is not None else 0, row["trial"])


def join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def best_tie(rows: list[dict], config: SearchConfig) -> dict | None:
    """When the best trials (rows, ranked) tie on the objective: which, and whether and how the tie was broken."""
    if not rows or rows[0]["value"] is None:
        return None
    tied = [row for row in rows if row["value"] == rows[0]["value"]]  # equal counts give equal scores exactly
    if len(tied) < 2:
        return None
    names = [row["experiment"] for row in tied]
    still = [row["experiment"] for row in tied if row["secondary"] == tied[0]["secondary"]]
    summary = f"the best trials tie on {config.metric_key} = {tied[0]['value']:g}: {join(names)}"
    if not config.secondary:
        summary += "; not broken: search.yaml names no objective.secondary to break it"
    elif tied[0]["secondary"] is None:
        summary += f"; not broken: none of them has {config.secondary}"
    elif len(still) > 1:
        summary += f"; not broken: {join(still)} also tie on {config.secondary_key} = {tied[0]['secondary']:g}"
    else:
        values = ", ".join(f"{row['experiment']} {row['secondary']:g}" if row["secondary"] is not None
                           else f"{row['experiment']} none" for row in tied)
        summary += f"; broken by {config.secondary_key} ({config.secondary_direction}): {values}"
    return {"trials": names, "value": tied[0]["value"], "broken": len(still) == 1,
            "broken_by": config.secondary if len(still) == 1 else None,
            "secondary_values": {row["experiment"]: row["secondary"] for row in tied},
            "still_tied": still if len(still) > 1 else [], "summary": summary}


def leaderboard(study, config: SearchConfig) -> dict:
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(deepcopy=False):
        if (trial.state == TrialState.FAIL and "error" not in trial.user_attrs) or trial.state == TrialState.WAITING:
            continue  # interrupted and re-run as another trial; or not started yet
        value = trial.value if trial.state == TrialState.COMPLETE else None  # a pruned trial's value is a loss
        rows.append({"trial": trial.number, "experiment": trial.user_attrs.get("experiment"),
                     "state": trial.state.name.lower(), "value": value,
                     "secondary": secondary_of(trial, config) if value is not None else None, "params": trial.params,
                     "error": trial.user_attrs.get("error"), "pruned_at_step": trial.user_attrs.get("pruned_at_step"),
                     "worker": trial.user_attrs.get("worker")})  # host:pid of the search that ran it
    rows.sort(key=lambda row: rank_key(row, config))
    best = rows[0] if rows and rows[0]["value"] is not None else None
    board = {"strategy": config.strategy, "objective": config.metric, "direction": config.direction,
             "secondary": {"metric": config.secondary, "direction": config.secondary_direction}
             if config.secondary else None,
             "overrides": config.overrides, "best": best, "tie": best_tie(rows, config), "trials": rows}
    out = Path(config.out_dir)
    write_json(out / "leaderboard.json", board)
    write_text(out / "leaderboard.md", markdown(board, config))
    return board


def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(board: dict, config: SearchConfig) -> str:
    names = [d.name for d in config.space]
    title = f"# Search: {config.strategy}, {config.direction} {config.metric}"
    if config.secondary:
        title += f", ties: {config.secondary_direction} {config.secondary}"
    lines = [title, ""]
    best, tie = board["best"], board.get("tie")
    if tie and not tie["broken"]:
        lines += [(f"No single best: {join([f'**{n}**' for n in tie['still_tied']])} tie, listed by trial number "
                  f"(`dvc exp apply {best['experiment']}` restores the first)"), ""]
    elif best:
        lines += [(f"Best: **{best['experiment']}** with {config.metric_key} = {best['value']:g} "
                   f"(`dvc exp apply {best['experiment']}`)"), ""]
    if tie:
        lines += [f"**Tie:** {tie['summary']}", ""]
    if board["overrides"]:
        lines += ["Every trial: " + ", ".join(f"`{k}={v}`" for k, v in board["overrides"].items()), ""]
    metrics = [config.metric_key] + ([config.secondary_key] if config.secondary else [])
    rows = []
    for rank, row in enumerate(board["trials"], 1):
        value = f"{row['value']:g}" if row["value"] is not None else (row["error"] or "").splitlines()[-1][:60] \
            if row["state"] == "fail" else f"running on {(row['worker'] or '?').rpartition(':')[0]}" \
            if row["state"] == "running" else f"pruned at step {row['pruned_at_step']}"
        second = [f"{row['secondary']:g}" if row["secondary"] is not None else ""] if config.secondary else []
        rows.append([rank, row["experiment"], row["state"], value, *second,
                     *(cell(row["params"].get(n, "")) for n in names)])
    lines += markdown_table(["rank", "experiment", "state", *metrics, *names], rows)
    return "\n".join(lines) + "\n"
