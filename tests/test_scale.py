"""Sweeps and scale: an Optuna search, the local and SLURM launchers, TensorBoard and MLflow."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from distill_cli import cli
from distill_cli.cli import conf_dir, preflight
from distill_cli.config import LOGGERS, RULES, ConfigError, check
from distill_cli.stages import run_stage
from distill_cli.trackers import Tracker
from tests.conftest import needs_extra

OPTUNA = needs_extra("optuna", extra="sweep")  # the sweeper itself ships in hydra_plugins/
JOBLIB = needs_extra("hydra_plugins.hydra_joblib_launcher", extra="sweep")

CLI = str(Path(sys.executable).parent / "distill-cli")
TINY = ["dataset=glyphs_target", "dataset.shots=3", "model=cnn", "stage.batch_size=32"]


def cli_ok(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --- hyper-parameter search -------------------------------------------------------------------


@OPTUNA
def test_optuna_search_returns_each_trials_validation_accuracy(make_cfg, tmp_path):
    run_stage(make_cfg("stage=pretrain", "run=r", *TINY, "stage.epochs=1"))  # the teacher
    cli_ok("distill", "-m", "hydra/sweeper=distill_optuna", "hydra.sweeper.n_trials=2", "run=r",
           "stage.from=outputs/r/pretrain", *TINY, "stage.epochs=1", cwd=tmp_path)  # fmt: skip
    trials = sorted((tmp_path / "outputs" / "r" / "distill").glob("trial=*"))
    assert [t.name for t in trials] == ["trial=0", "trial=1"]
    assert (tmp_path / "outputs" / "r" / "optuna.journal").is_file()  # the study persists
    scores = [json.loads((t / "metrics.json").read_text())["best_val_acc"] for t in trials]
    (results,) = (tmp_path / "outputs" / ".multirun").glob("*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert best["best_value"] == max(scores)
    assert set(best["best_params"]) == {"kd.temperature", "kd.kd_weight", "kd.ce_weight",
                                        "optimizer.lr"}  # fmt: skip
    winner = OmegaConf.load(trials[scores.index(max(scores))] / "config.yaml")
    for key, value in best["best_params"].items():
        assert OmegaConf.select(winner, key) == pytest.approx(value)
    assert 1.0 <= winner.kd.temperature <= 8.0 and winner.stage.epochs == 1


@OPTUNA
def test_preflight_checks_a_search_space_at_its_ends():
    base = ["stage=distill", "hydra/sweeper=distill_optuna"]
    preflight([*base, "kd.temperature=interval(1.0, 8.0)", "model=choice(cnn,resnet8)"])
    with pytest.raises(ConfigError, match="kd.temperature=-1.0 is invalid"):
        preflight([*base, "kd.temperature=interval(-1.0, 8.0)"])
    with pytest.raises(ConfigError, match="unknown model 'resnet9000'"):
        preflight([*base, "model=choice(cnn,resnet9000)"])
    with pytest.raises(ConfigError, match="stage.epochs=-2 is invalid"):  # a fixed value
        preflight([*base, "stage.epochs=-2"])


@OPTUNA
def test_preflight_checks_the_yaml_search_space(monkeypatch, tmp_path):
    shutil.copytree(conf_dir(), tmp_path / "conf")
    sweeper = tmp_path / "conf" / "hydra" / "sweeper" / "distill_optuna.yaml"
    space = yaml.safe_load(sweeper.read_text())
    space["params"]["optimizer.lr"] = "tag(log, interval(0.0, 0.1))"  # lr 0 cannot train
    sweeper.write_text(yaml.safe_dump(space))
    monkeypatch.setattr(cli, "conf_dir", lambda: str(tmp_path / "conf"))
    with pytest.raises(ConfigError, match="optimizer.lr=0.0 is invalid"):
        preflight(["stage=distill", "hydra/sweeper=distill_optuna"])
    preflight(["stage=distill", "hydra/sweeper=distill_optuna", "optimizer.lr=0.05"])  # fixed


@OPTUNA
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["stage=eval"], "eval returns no validation accuracy"),
        (["stage=distill", "dataset=usps", "dataset.val_fraction=0"], "dataset.val_fraction > 0"),
        (["stage=distill", "dataset.shots=5", "dataset.val_per_class=0"], "val_per_class > 0"),
    ],
)
def test_a_search_needs_a_validation_accuracy(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preflight(["hydra/sweeper=distill_optuna", *overrides])


@OPTUNA
def test_a_named_search_is_checked_like_the_sweeper(monkeypatch):
    with pytest.raises(ConfigError, match="hparams_search=kd_logit searches a training stage"):
        preflight(["stage=eval", "hparams_search=kd_logit"])
    preflight(["stage=distill", "hparams_search=kd_logit"])
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs the optuna package: pip install"):
        preflight(["stage=distill", "hparams_search=kd_logit"])


def test_a_missing_plugin_names_the_extra(monkeypatch):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"hydra-submitit-launcher package: pip install"):
        preflight(["hydra/launcher=slurm", "seed=0,1"])


# --- launchers --------------------------------------------------------------------------------


@JOBLIB
def test_local_launcher_runs_a_multirun_in_worker_processes(tmp_path):
    cli_ok("pretrain", "-m", "hydra/launcher=local", "run=r", *TINY, "stage.epochs=1", "seed=0,1",
           cwd=tmp_path)  # fmt: skip
    pretrain = tmp_path / "outputs" / "r" / "pretrain"
    assert sorted(p.name for p in pretrain.iterdir()) == ["seed=0", "seed=1"]
    for job in pretrain.iterdir():
        assert (job / "best.pt").is_file() and (job / "metrics.json").is_file()
        assert json.loads((job / "manifest.json").read_text())["status"] == "completed"


@JOBLIB
def test_killing_a_local_sweep_stops_its_workers_resumably(tmp_path):
    proc = subprocess.Popen(
        [CLI, "pretrain", "-m", "hydra/launcher=local", "run=r", *TINY, "stage.epochs=2000",
         "seed=0,1", "stage.save_every_s=0"], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    jobs = [tmp_path / "outputs" / "r" / "pretrain" / f"seed={s}" for s in (0, 1)]
    deadline = time.monotonic() + 120
    while not all((j / "last.pt").is_file() for j in jobs):  # both workers are training
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    proc.kill()  # SIGKILL: the sweep's process cannot pass anything on to its workers
    proc.wait()
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pids and not any(_alive(p) for p in pids)
    for job in jobs:
        manifest = json.loads((job / "manifest.json").read_text())
        assert manifest["status"] == "interrupted", manifest["status"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return status != "Z"  # a zombie has exited


def test_slurm_launcher_config_builds_an_sbatch_script(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)  # fmt: skip
    GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)  # the launcher's params interpolate hydra.*
    try:
        launcher = instantiate(cfg.hydra.launcher)
    finally:
        HydraConfig.instance().cfg = None
    assert type(launcher).__name__ == "SlurmLauncher"
    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit looks for srun before it submits
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    # The launcher's own translation of its params into executor parameters, as in launch().
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{
        k if k in base else f"slurm_{k}": v for k, v in launcher.params.items()
        if k not in ("submitit_folder", "max_num_timeout")
    })  # fmt: skip
    script = executor._executor._make_submission_file_text("distill-cli", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=240", "--job-name=distill-cli"):
        assert f"#SBATCH {line}\n" in script


# --- experiment trackers ----------------------------------------------------------------------


TRACKER_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # the rest need none


@pytest.mark.parametrize(
    "logger",
    [pytest.param(name, marks=needs_extra(TRACKER_PACKAGE[name], extra="track"))
     if name in TRACKER_PACKAGE else name for name in LOGGERS],
)  # fmt: skip
def test_every_logger_option_composes_and_checks(make_cfg, logger):
    from distill_cli.config import _leaves

    cfg = make_cfg(f"logger={logger}")
    check(cfg)
    assert all(key in RULES for key, _ in _leaves(cfg))


def test_a_missing_tracker_package_is_one_line(make_cfg, monkeypatch):
    import distill_cli.config as config

    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"logger=mlflow needs the mlflow package: pip install"):
        check(make_cfg("logger=mlflow"))


@needs_extra("tensorboard", extra="track")
def test_tensorboard_holds_the_metrics_jsonl_values(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg("stage=pretrain", "run=r", *TINY, "stage.epochs=2", "logger=tensorboard")
    run_stage(cfg)
    folder = Path(cfg.out_dir) / "r" / "pretrain"
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    expected = rows(folder)
    assert len(expected) == 2
    for key in ("train_loss", "train_acc", "val_acc", "val_nll", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in expected]
    assert "config/text_summary" in events.Tags()["tensors"]


@needs_extra("mlflow", extra="track")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, inside MLflow
def test_mlflow_holds_the_metrics_and_the_resolved_config(make_cfg):
    from mlflow import MlflowClient

    cfg = make_cfg("stage=pretrain", "run=r", *TINY, "stage.epochs=2", "logger=mlflow",
                   "optimizer.lr=0.04")  # fmt: skip
    run_stage(cfg)
    folder = Path(cfg.out_dir) / "r" / "pretrain"
    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    assert run.info.run_name == "pretrain" and run.info.status == "FINISHED"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tracker"] == {"name": "mlflow", "run_id": run.info.run_id}
    params = run.data.params
    assert params["optimizer.lr"] == "0.04" and params["model.name"] == "cnn"
    assert params["dataset.shots"] == "3" and params["stage.name"] == "pretrain"
    expected = rows(folder)
    for key in ("train_loss", "val_acc", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["epoch"], pytest.approx(r[key])) for r in expected]


def test_a_failing_tracker_warns_once_and_training_goes_on(caplog):
    class Broken(Tracker):
        name = "broken"
        calls = 0

        def _log(self, step, scalars):
            self.calls += 1
            raise OSError("disk full")

    tracker = Broken()
    tracker.log_epoch({"epoch": 1, "train_loss": 1.0})
    tracker.log_epoch({"epoch": 2, "train_loss": 0.5})
    assert tracker.calls == 1
    assert "broken: disk full; it gets no more epochs" in caplog.text


@needs_extra("mlflow", extra="track")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_resumed_stage_continues_its_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    args = [CLI, "pretrain", "run=r", *TINY, "dataset.shots=10", "stage.batch_size=8",
            "stage.epochs=3", "device.threads=1", "logger=mlflow"]  # fmt: skip
    folder = tmp_path / "outputs" / "r" / "pretrain"
    proc = subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (folder / "metrics.jsonl").exists() and (folder / "metrics.jsonl").read_text().strip()
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # during epoch 2 or just after epoch 1
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    run_id = json.loads((folder / "manifest.json").read_text())["tracker"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    cli_ok(*args[1:], "stage.resume=true", cwd=tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_acc"))
    assert history == [(r["epoch"], pytest.approx(r["val_acc"])) for r in rows(folder)]
