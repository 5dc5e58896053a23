"""Data-parallel training: torchrun with 2 CPU processes on the gloo backend, tiny settings.

Each torchrun test starts three Python processes (agent and two workers); ``device.threads=1``
lets the two workers share two cores.
"""

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from distill_cli import checkpoint as ck
from distill_cli import cli, distributed
from distill_cli.config import check
from distill_cli.models import build_model
from distill_cli.stages import run_stage

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
# 80 training images in two full batches of 40: each process trains on 20 per step.
TINY = ["dataset=glyphs_target", "dataset.shots=8", "model=cnn", "stage.epochs=2",
        "stage.batch_size=40", "device=cpu", "device.threads=1"]  # fmt: skip
STAGE_FILES = {"config.yaml", "best.pt", "last.pt", "metrics.jsonl", "metrics.json", "stage.log",
               "manifest.json", "indices.json"}  # fmt: skip


def torchrun(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "distill_cli", *args], cwd=cwd,
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "160"}, **kw,
    )  # fmt: skip


def rows(folder: Path) -> list[dict]:
    return [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def parallel(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-process pretrain in a fresh working directory: (that directory, the process)."""
    cwd = tmp_path_factory.mktemp("ddp")
    return cwd, torchrun(cwd, "pretrain", "run=r", *TINY)


def test_torchrun_pretrain_writes_one_stage_folder_from_process_0(parallel):
    cwd, proc = parallel
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]  # Hydra wrote nothing either
    assert [p.name for p in (cwd / "outputs" / "r").iterdir()] == ["pretrain"]
    folder = cwd / "outputs" / "r" / "pretrain"
    assert {p.name for p in folder.iterdir()} == STAGE_FILES
    path = folder / "best.pt"
    model = ck.model_from_checkpoint(ck.load_checkpoint(path), path)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["processes"] == 2
    history = rows(folder)
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(r["images"] == manifest["data"]["n_train"] == 80 for r in history)
    log = (folder / "stage.log").read_text()  # one writer: each line once
    assert log.count("epoch 1:") == 1 and log.count("epoch 2:") == 1
    assert proc.stderr.count("epoch 2:") == 1 and proc.stdout.count("best_val_acc") == 1


def test_two_processes_train_the_weights_one_process_trains(parallel, make_cfg):
    cwd, proc = parallel
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = make_cfg("stage=pretrain", "run=single", *TINY)
    check(cfg)
    run_stage(cfg)
    one, two = Path(cfg.out_dir) / "single" / "pretrain", cwd / "outputs" / "r" / "pretrain"
    a, b = (ck.load_checkpoint(f / "last.pt")["state_dict"] for f in (one, two))
    for key in a:  # the same global batches, gradients averaged: equal up to rounding
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    for r1, r2 in zip(rows(one), rows(two), strict=True):  # sums and validation reduced
        assert r1["images"] == r2["images"] and r1["val_acc"] == r2["val_acc"]
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-5)


def test_torchrun_distill_with_a_feature_method_and_transfer_set(parallel):
    cwd, proc = parallel
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = cwd / "outputs" / "r" / "pretrain"
    done = torchrun(cwd, "distill", "run=r", *TINY, f"stage.from={teacher}", "kd=fitnet",
                    "stage.transfer_set=target", "stage.unlabeled_limit=80",
                    "stage.unlabeled_ratio=1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    folder = cwd / "outputs" / "r" / "distill"
    path = folder / "best.pt"
    assert ck.model_from_checkpoint(ck.load_checkpoint(path), path).config["name"] == "cnn"
    history = rows(folder)
    assert len(history) == 2 and all(r["images"] == 160 for r in history)  # 80 + 80 unlabelled
    assert {"train_ce", "train_kd", "train_feat"} <= history[0].keys()
    assert len(list((cwd / "outputs" / "r" / ".teacher_cache").iterdir())) == 1


def test_torchrun_distill_mixes_each_process_rows_and_selects_on_fidelity(parallel):
    cwd, proc = parallel
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = cwd / "outputs" / "r" / "pretrain"
    done = torchrun(cwd, "distill", "run=r", "tag=mixed", *TINY, f"stage.from={teacher}",
                    "stage.transfer_set=target", "stage.unlabeled_limit=80",
                    "stage.unlabeled_ratio=1", "stage.mix=mixup", "stage.transfer_epochs=2",
                    "stage.select=fidelity", "stage.fidelity_images=20")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    folder = cwd / "outputs" / "r" / "mixed"
    history = rows(folder)
    # a pass over 80 labelled + 80 unlabelled images is ceil(160 / 80) = 2 steps of 40 + 40
    assert len(history) == 2 and all(r["images"] == 160 for r in history)
    assert all("fid_agree" in r and "val_acc" in r for r in history)
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["select"] == "fidelity" and summary["steps"] == 4


def test_interrupted_torchrun_resumes_under_torchrun(tmp_path):
    args = ["pretrain", "run=r", *TINY[:3], "stage.epochs=30", *TINY[4:]]
    folder = tmp_path / "outputs" / "r" / "pretrain"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "distill_cli", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (folder / "metrics.jsonl").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, err = proc.communicate(timeout=120)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "interrupted", err[-3000:]
    stopped = manifest["checkpoints"]["last"]["epoch"]
    assert stopped < 30
    resumed = torchrun(tmp_path, *args, "stage.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in rows(folder)] == list(range(1, 31))
    assert all(r["images"] == 80 for r in rows(folder))
    assert json.loads((folder / "manifest.json").read_text())["status"] == "completed"


def _replica_step(rank: int, init_file: str, out: str) -> None:
    """One backward through the replica on this process's half of a batch; save the grads."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model, extra, x, y = _problem()
    runner = distributed.replicate(model, extra)
    logits, feats = runner.forward_with_features(x[rank::2])
    _loss(logits, feats, y[rank::2], extra).backward()
    grads = {n: p.grad for n, p in [*model.named_parameters(), *extra.named_parameters(prefix="x")]}
    torch.save(grads, f"{out}/{rank}.pt")
    del runner  # the DDP reducer holds the process group: it goes first, then the group
    gc.collect()
    # as distributed.leave does: no process tears gloo down while the other still talks
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # the results are on disk: skip exit-time destructors, where gloo once aborted


def _problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    model, extra = build_model("cnn_padded", 4, 1, 8), nn.Linear(128, 3)
    return model, extra, torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))


def _loss(logits, feats, y, extra) -> torch.Tensor:
    return F.cross_entropy(logits, y) + extra(feats["pooled"]).pow(2).mean()


def test_replica_averages_student_and_adapter_gradients(tmp_path):
    mp.spawn(_replica_step, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    model, extra, x, y = _problem()
    logits, feats = model.forward_with_features(x)
    _loss(logits, feats, y, extra).backward()
    want = {n: p.grad for n, p in [*model.named_parameters(), *extra.named_parameters(prefix="x")]}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for name, grad in want.items():  # the feature path and the adapter both averaged
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)


def test_single_process_stages_refuse_torchrun(make_cfg, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for stage in ("eval", "export", "report"):
        with pytest.raises(SystemExit) as stop:
            cli._task(make_cfg(f"stage={stage}"))
        assert stop.value.code == cli.EXIT_USAGE
        assert f"{stage} runs in a single process" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["distill-cli", "pretrain", "-m", "seed=0,1"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "do not run under torchrun" in capsys.readouterr().err


def test_one_process_loaders_and_models_are_left_alone():
    loader, model = [(torch.zeros(2), torch.zeros(2))], nn.Linear(2, 2)
    assert distributed.shard(loader) is loader and distributed.shard(None) is None
    assert distributed.replicate(model) is model and distributed.any_rank(True)
