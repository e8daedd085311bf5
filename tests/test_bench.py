"""The benchmark commands run, and what they measure holds: equal loss packed and padded, identical generations."""

import json
import os

import pytest

from bench import gpu, run


def test_window_skips_warmup_steps():
    marks = [(0.0, 0), (5.0, 100), (6.0, 300), (7.0, 500), (7.5, 700), (11.5, 900)]  # slow first and last steps
    result = run.window(marks, skip=2)
    assert result["steps"] == 4 and result["tokens"] == 800 and result["seconds"] == 6.5
    assert result["ms_per_step"] == 1000.0  # the median step, not the one hit by a burst of load
    assert result["tokens_per_second"] == 200.0 and result["mean_tokens_per_second"] == round(800 / 6.5, 1)


def test_bench_packing_and_generation_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    run.main(["--only", "packing,generate", "--steps", "8", "--rounds", "1", "--prompts", "8", "--out", str(out)])
    results = json.loads(out.read_text())
    packing, generate = results["packing"], results["generate"]
    assert packing["max_relative_loss_difference"] < 1e-4  # same examples, same loss
    assert packing["packed"]["padding_fraction"] < packing["padded_to_longest"]["padding_fraction"]
    assert packing["padded_to_longest"]["padding_fraction"] < packing["padded_to_max_length"]["padding_fraction"]
    assert packing["packed"]["tokens"] == packing["padded_to_longest"]["tokens"] > 0  # the same real tokens
    assert generate["identical_outputs"] == generate["prompts"] == 8
    table = (tmp_path / "bench.md").read_text()
    assert "packed vs padded to longest" in table and "batched vs one-at-a-time generation" in table
    assert table in capsys.readouterr().out


def test_bench_rejects_unknown_sections():
    with pytest.raises(SystemExit):
        run.main(["--only", "trian"])


def test_gpu_benchmark_runs_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main(["--toy", "--steps", "4", "--batch", "4", "--out", str(out)])
    results = json.loads(out.read_text())
    for method in ("lora", "qlora"):
        assert results[method]["tokens_per_second"] > 0 and results[method]["method"] == method
        assert 0 < results[method]["trainable_params"] < results[method]["total_params"]
    fp32_mb = results["qlora"]["total_params"] * 4 / 2**20
    assert results["qlora"]["base_weight_mb"] < 0.5 * fp32_mb  # 4-bit linear layers (the toy's embedding stays fp32)


def test_bench_prepare_compares_with_tokenizing_alone(tmp_path):
    out = tmp_path / "bench.json"
    run.main(["--only", "prepare", "--prepare-examples", "3000", "--prepare-rounds", "1", "--out", str(out)])
    r = json.loads(out.read_text())["prepare"]
    assert r["examples"] == 3000 and r["prepare_s"] > 0 and r["tokenize_only_s"] > 0
    assert r["prepare_vs_tokenize_only"] == round(r["prepare_s"] / r["tokenize_only_s"], 3)
    assert 0 < r["bytes_per_example"] < r["raw_jsonl_bytes_per_example"] * 4
    assert r["train_start"]["train_examples"] == 2550 and r["train_start"]["peak_mb"] > 0
    assert "prepare 3,000 examples vs tokenizing alone" in (tmp_path / "bench.md").read_text()


@pytest.mark.skipif(os.environ.get("RUN_MULTIPROCESS") != "1", reason="starts training processes; RUN_MULTIPROCESS=1")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gpu_benchmark_measures_scaling_over_processes_at_toy_size(tmp_path, strategy):
    out = tmp_path / "gpu.json"
    gpu.main(["--toy", "--steps", "4", "--batch", "4", "--methods", "lora", "--processes", "1,2",
              "--strategy", strategy, "--out", str(out)])
    scaling = json.loads(out.read_text())["scaling"]
    assert [r["processes"] for r in scaling] == [1, 2] and scaling[0]["efficiency"] == 1.0
    assert [r["strategy"] for r in scaling] == ["single", strategy]
    assert scaling[1]["tokens_trained"] > scaling[0]["tokens_trained"]  # twice the examples a step
    assert 0 < scaling[1]["efficiency"] and scaling[1]["tokens_per_second"] > 0


@pytest.mark.skipif(os.environ.get("RUN_MULTIPROCESS") != "1", reason="runs experiments at once; RUN_MULTIPROCESS=1")
def test_queue_benchmark_runs_two_experiments_at_once_with_the_metrics_of_one_after_the_other(tmp_path):
    """The measurement itself, short: a copy of this repository, two experiments one after the other, then the
    same two through `dvc queue start -j 2` (with the cores shared, and without): every metric equal."""
    out = tmp_path / "bench.json"
    run.main(["--only", "queue", "--queue-steps", "10", "--out", str(out)])
    r = json.loads(out.read_text())["queue"]
    assert r["identical_metrics"], r["metrics"]
    assert all(side["training.tokens_trained"] for pair in r["metrics"].values() for side in pair.values())
    assert r["ratio"] == pytest.approx(r["queue_j2_s"] / r["sequential_s"], abs=0.005)  # of the unrounded times
    assert r["queue_j2_unshared_s"] > 0
    speeds = [t["training.tokens_per_second"] for t in r["timings"].values()]
    assert len(speeds) == 6 and len(set(speeds)) == 6  # six trainings, none restored from another's outputs
    assert "dvc queue start -j 2 vs one after the other" in (tmp_path / "bench.md").read_text()
