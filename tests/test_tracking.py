"""Training tracked by MLflow (a real local store, read back with MlflowClient) and W&B (offline run files read back),
the optional extras' error messages, and secrets in the environment never landing in any file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_prepare, run_train

from finetune.config.hardware import Hardware
from finetune.config.params import load_params, parse_params
from finetune.config.schema import ParamsError
from finetune.tracking import Tracking
from finetune.tracking.history import read_series
from finetune.tracking.trackers import MlflowTracker, WandbTracker, redact, repository_root
from finetune.training.checkpoints import FINISHED

CANARIES = {"WANDB_API_KEY": "canary-wandb-0123456789abcdef0123456789abcdef01234567",
            "MLFLOW_TRACKING_TOKEN": "canary-mlflow-token-5f1e", "MLFLOW_TRACKING_PASSWORD": "canary-mlflow-pass-77c2",
            "HF_TOKEN": "hf_canaryTokenThatMustNeverBeWritten"}


def enable(workdir: Path, tracker: str, **settings) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["tracking"][tracker].update(enabled=True, **settings)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def files_containing(root: Path, secrets) -> list[str]:
    return [f"{path}: {name}" for path in root.rglob("*") if path.is_file()
            for name, value in secrets.items() if value.encode() in path.read_bytes()]


@pytest.fixture
def secrets(monkeypatch):
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    return CANARIES


def test_mlflow_run_holds_params_step_series_final_metrics_and_adapter(workdir, secrets, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a local store in ./mlruns
    enable(workdir, "mlflow", experiment_name="toy", run_name="first")
    params = load_params()
    run_prepare(params)
    metrics = run_train(params)

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.005" and run.data.params["lora.r"] == str(params.lora.r)
    live = workdir / "metrics/live"
    for series in ("train/loss", "eval/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"):
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, series)]
        assert history == read_series(live, series), series  # the same points DVCLive wrote
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [3, 6]
    assert run.data.metrics["final/best_eval_loss"] == metrics["best_eval_loss"]
    assert run.data.metrics["final/steps"] == 6
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(workdir / "dl")))
    assert local.read_bytes() == (workdir / "models/finetuned/adapter_model.safetensors").read_bytes()
    assert files_containing(workdir, secrets) == []


def test_mlflow_honours_the_tracking_uri_in_the_environment(workdir, tmp_path_factory, monkeypatch):
    from mlflow import MlflowClient

    elsewhere = tmp_path_factory.mktemp("server") / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    monkeypatch.setenv("DVC_EXP_NAME", "bright-lamp")  # as dvc exp run sets it: the default run name
    enable(workdir, "mlflow")
    params = load_params()
    run_prepare(params)
    run_train(params)
    assert not (workdir / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{elsewhere}")
    (run,) = client.search_runs([client.get_experiment_by_name("dvc-finetune").experiment_id])
    assert run.info.run_name == "bright-lamp" and run.data.tags["dvc_finetune.dvc_experiment"] == "bright-lamp"
    # artifacts beside that store, not under the current directory (a temporary experiment's copy is deleted)
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(elsewhere.parent)
    assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}

    enable(workdir, "mlflow", log_model=False, run_name="second")
    run_train(load_params())
    (second,) = client.search_runs([client.get_experiment_by_name("dvc-finetune").experiment_id],
                                   "attributes.run_name = 'second'")
    assert list(client.list_artifacts(second.info.run_id)) == []  # log_model: false


def test_a_failing_tracker_is_reported_and_training_goes_on(workdir, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    enable(workdir, "mlflow")
    params = load_params()
    run_prepare(params)
    calls = []

    def flaky(self, step, record):
        calls.append(step)
        if len(calls) == 2:
            raise ConnectionError("tracking server went away")

    log = MlflowTracker.log
    monkeypatch.setattr(MlflowTracker, "log", flaky)
    metrics = run_train(params)  # completes
    assert "warning: mlflow: logging failed (ConnectionError: tracking server went away); training goes on " \
           "without mlflow" in capsys.readouterr().err
    assert calls == [2, 3] and metrics["steps"] == 6  # no further calls after the failure
    assert [s for s, _ in read_series(workdir / "metrics/live", "train/loss")] == [2, 4, 6]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dvc-finetune").experiment_id])
    assert run.info.status == "FAILED"

    # a tracker that cannot finish: reported; the training's outputs stand and it counts as finished
    monkeypatch.setattr(MlflowTracker, "log", log)
    monkeypatch.setattr(MlflowTracker, "finish", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    assert run_train(load_params())["steps"] == 6
    assert "warning: mlflow: could not finish its run (OSError: disk full)" in capsys.readouterr().err
    assert (workdir / params.train.output_dir / FINISHED).exists()


def test_a_tracker_that_cannot_start_stops_training_and_closes_the_others(workdir, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    enable(workdir, "mlflow")
    enable(workdir, "wandb")
    params = load_params()
    run_prepare(params)

    def unreachable(self, *args):
        raise RuntimeError("wandb-core did not start")

    monkeypatch.setattr(WandbTracker, "__init__", unreachable)
    with pytest.raises(RuntimeError, match="wandb-core did not start"):
        run_train(params)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dvc-finetune").experiment_id])
    assert run.info.status == "FAILED"  # not left RUNNING
    assert not (workdir / params.train.finetuned_dir).exists()


def wandb_records(path: Path):
    """The records of a W&B run file: a LevelDB-style log (7-byte file header, 32 KiB blocks, each record chunk
    with a 7-byte header: checksum, length, type) of wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left in a block for a header: zero padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_history_without_a_login(workdir, secrets, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # W&B's own files, inside the scan
        monkeypatch.setenv(name, str(workdir / ".wandb-home" / name.lower()))
    enable(workdir, "wandb", project="toy", run_name="offline-run")
    params = load_params()
    run_prepare(params)
    metrics = run_train(params)

    (run_file,) = (workdir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, artifacts, summary = [], {}, [], {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            assert record.run.display_name == "offline-run" and record.run.project == "toy"
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
    live = workdir / "metrics/live"
    for series in ("train/loss", "eval/loss", "train/learning_rate"):
        logged = [(row["_step"], row[series]) for row in history if series in row]
        assert logged == read_series(live, series), series
    assert config["train.learning_rate"] == 0.005 and config["lora.r"] == params.lora.r
    assert summary["final/best_eval_loss"] == metrics["best_eval_loss"]
    assert [a.type for a in artifacts] == ["model"]
    assert files_containing(workdir, secrets) == []


def params_text(**tracking_settings) -> str:
    return yaml.safe_dump({"tracking": tracking_settings}, sort_keys=False)


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_an_enabled_tracker_that_is_not_installed_names_the_extra(name):
    hardware = Hardware(cuda=False, cuda_bf16=False, bitsandbytes=True, **{name: False})
    with pytest.raises(ParamsError) as err:
        parse_params(params_text(**{name: {"enabled": True}}), hardware=hardware, training=True)
    assert f'params.yaml:3: tracking.{name}.enabled: true, but {name} is not installed; ' \
           f'install the extra with pip install -e ".[{name}]"' in str(err.value)
    parse_params(params_text(**{name: {"enabled": False}}), hardware=hardware, training=True)  # off: no need
    parse_params(params_text(**{name: {"enabled": True}}), hardware=hardware)  # the stages that do not train


def test_wandb_online_without_a_key_is_refused_before_training():
    no_key = Hardware(cuda=False, cuda_bf16=False, bitsandbytes=True, wandb_key=False)
    with pytest.raises(ParamsError, match="needs a W&B API key .* use mode offline"):
        parse_params(params_text(wandb={"enabled": True, "mode": "online"}), hardware=no_key, training=True)
    with pytest.raises(ParamsError, match="WANDB_MODE=online needs a W&B API key"):
        parse_params(params_text(wandb={"enabled": True}), training=True, hardware=Hardware(
            cuda=False, cuda_bf16=False, bitsandbytes=True, wandb_key=False, wandb_online_mode="online"))
    parse_params(params_text(wandb={"enabled": True}), hardware=no_key, training=True)  # offline needs no key


def test_local_stores_belong_to_the_repository_not_to_a_temporary_experiment_copy(tmp_path, monkeypatch):
    copy = tmp_path / "repo/.dvc/tmp/exps/tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert repository_root() == (tmp_path / "repo").resolve()
    monkeypatch.chdir(tmp_path)
    assert repository_root() == tmp_path.resolve()


def test_credentials_in_a_tracking_uri_are_not_printed():
    assert redact("https://alice:s3cret@mlflow.example.com:5000/") == "https://***@mlflow.example.com:5000/"
    assert redact("sqlite:////tmp/mlruns/mlflow.db") == "sqlite:////tmp/mlruns/mlflow.db"


def test_a_resumed_run_sends_each_series_step_once_even_when_a_kill_split_a_step(workdir, monkeypatch):
    """The training and validation losses of one step are two logs: a kill between them leaves a tracker with one
    and not the other. After the resume it gets exactly the one it lacks; MLflow is asked what it holds."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    enable(workdir, "mlflow")
    params = load_params()
    output_dir, live = workdir / "models/checkpoints", workdir / "models/checkpoints/live"
    first = Tracking(params, output_dir, None, live)
    for step in (5, 10):
        first.log(step, {"train/loss": 2.0 / step})
        first.log(step, {"eval/loss": 3.0 / step})
    first.log(15, {"train/loss": 0.1})  # killed here: step 15's validation loss never reached any tracker
    run_id = first.runs["mlflow"]

    resumed = Tracking(params, output_dir, 10, live)  # from the checkpoint at step 10
    assert resumed.runs["mlflow"] == run_id
    assert resumed.held["mlflow"] == {"train/loss": 15, "eval/loss": 10}  # read back from MLflow
    sent = []
    log = MlflowTracker.log
    monkeypatch.setattr(MlflowTracker, "log", lambda self, step, record: sent.append((step, record))
                        or log(self, step, record))
    resumed.log(15, {"train/loss": 0.1})  # replayed: MLflow has it
    resumed.log(15, {"eval/loss": 0.2})  # it does not
    resumed.log(20, {"train/loss": 0.05, "eval/loss": 0.1})
    assert sent == [(15, {"eval/loss": 0.2}), (20, {"train/loss": 0.05, "eval/loss": 0.1})]
    resumed.finish({}, Path(), "finished")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns/mlflow.db'}")
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [5, 10, 15, 20]
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/loss")) == [5, 10, 15, 20]
    # DVCLive: the resumed history holds the steps up to the checkpoint and the replayed ones, each once
    assert [s for s, _ in read_series(live, "train/loss")] == [5, 10, 15, 20]


def test_a_tracker_dropped_before_a_kill_gets_the_steps_it_missed_on_resume(workdir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    enable(workdir, "mlflow")
    params = load_params()
    output_dir, live = workdir / "models/checkpoints", workdir / "models/checkpoints/live"
    first = Tracking(params, output_dir, None, live)
    first.log(5, {"train/loss": 0.5})
    first.log(10, {"train/loss": 0.4})
    log = MlflowTracker.log
    monkeypatch.setattr(MlflowTracker, "log", lambda *args: (_ for _ in ()).throw(OSError("server down")))
    first.log(15, {"train/loss": 0.3})  # MLflow dropped here; DVCLive goes on
    first.log(20, {"train/loss": 0.2})
    monkeypatch.setattr(MlflowTracker, "log", log)
    run_id = first.runs["mlflow"]

    resumed = Tracking(params, output_dir, 20, live)  # killed after the checkpoint at step 20
    resumed.log(25, {"train/loss": 0.1})
    resumed.finish({}, Path(), "finished")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns/mlflow.db'}")
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")) == \
        [(5, 0.5), (10, 0.4), (15, 0.3), (20, 0.2), (25, 0.1)]
