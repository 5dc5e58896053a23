"""Nothing lost, nothing unsafe: resume after SIGKILL and Ctrl-C, locks, verified checkpoints."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_cli import checkpoint as ck
from distill_cli import rundir
from distill_cli.config import check
from distill_cli.stages import StageError, run_stage
from distill_cli.training import TrainingError
from tests.conftest import signal_mid_epoch_2

CLI = str(Path(sys.executable).parent / "distill-cli")
# Deterministic, and long enough per epoch (about 1 s) for a kill to land inside one.
RUN = ["pretrain", "run=r", "dataset=glyphs_target", "model=cnn", "stage.epochs=3",
       "stage.batch_size=16", "device.deterministic=true", "device.threads=1"]  # fmt: skip
TIMING = {"epoch_time_s", "images_per_sec", "train_time_s"}


def _cli(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def _rows(folder: Path) -> list[dict]:
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = (ck.load_checkpoint(f / "last.pt")["state_dict"] for f in (a, b))
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert _rows(a) == _rows(b)
    ma, mb = (json.loads((f / "metrics.json").read_text()) for f in (a, b))
    assert {k: v for k, v in ma.items() if k not in TIMING} == {
        k: v for k, v in mb.items() if k not in TIMING
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run to compare every interrupted one with."""
    cwd = tmp_path_factory.mktemp("ref")
    proc = _cli(cwd, *RUN, "tag=whole")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd / "outputs" / "r" / "whole"


def _interrupt(cwd: Path, sig: int, tag: str, *extra: str) -> subprocess.CompletedProcess:
    """Start the run, wait until epoch 1 is done, then send ``sig`` in the middle of epoch 2."""
    folder = cwd / "outputs" / "r" / tag
    args = [CLI, *RUN, f"tag={tag}", *extra]
    proc = subprocess.Popen(args, cwd=cwd, stderr=subprocess.PIPE, text=True)
    signal_mid_epoch_2(proc, folder, sig)  # shared with test_function_matching (issue 20)
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    # checkpoints after every epoch: a kill -9 loses only the epoch in progress
    killed = _interrupt(tmp_path, signal.SIGKILL, "killed", "stage.save_every_s=0")
    assert killed.returncode == -signal.SIGKILL
    folder = tmp_path / "outputs" / "r" / "killed"
    assert len(_rows(folder)) < 3  # it really stopped before the end

    again = _cli(tmp_path, *RUN, "tag=killed")  # an unfinished run is offered a resume
    assert again.returncode == 2 and "stage.resume=true" in again.stderr

    resumed = _cli(tmp_path, *RUN, "tag=killed", "stage.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    _assert_same_run(reference, folder)


def test_ctrl_c_saves_a_checkpoint_and_resume_equals_an_uninterrupted_run(tmp_path, reference):
    stopped = _interrupt(tmp_path, signal.SIGINT, "ctrlc")
    assert stopped.returncode == 130
    assert "stage.resume=true" in stopped.stderr and "Traceback" not in stopped.stderr
    folder = tmp_path / "outputs" / "r" / "ctrlc"
    state = ck.load_checkpoint(folder / "last.pt")["train_state"]
    assert state["epoch"] == 2 and state["step"] > 0  # saved in the middle of epoch 2
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"

    resumed = _cli(tmp_path, *RUN, "tag=ctrlc", "stage.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(reference, folder)


def test_sigterm_between_timed_checkpoints_saves_that_step_and_resumes_exactly(tmp_path, reference):
    # An hour between checkpoint writes: nothing reaches the disk before the signal does.
    stopped = _interrupt(tmp_path, signal.SIGTERM, "term", "stage.save_every_s=3600")
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    folder = tmp_path / "outputs" / "r" / "term"
    state = ck.load_checkpoint(folder / "last.pt")["train_state"]
    assert state["epoch"] == 2 and state["step"] > 0
    best = ck.load_checkpoint(folder / "best.pt")  # the pending best epoch was written with it
    assert best["epoch"] == state["best_epoch"] == 1
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["checkpoints"]["best"]["previous_sha256"] is None  # written once, at the stop

    resumed = _cli(tmp_path, *RUN, "tag=term", "stage.resume=true", "stage.save_every_s=0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(reference, folder)


def test_timed_checkpoints_write_once_per_interval_and_at_the_end(make_cfg):
    cfg = make_cfg(*RUN[1:], "stage.epochs=4", "tag=t", "stage.save_every_s=3600")
    run_stage(cfg)
    folder = Path(cfg.out_dir) / "r" / "t"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["checkpoints"]["last"]["previous_sha256"] is None  # one write: the end
    assert manifest["checkpoints"]["last"]["epoch"] == 4
    final = json.loads((folder / "metrics.json").read_text())
    assert ck.load_checkpoint(folder / "best.pt")["epoch"] == final["best_epoch"]
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    best_row = max(rows, key=lambda r: r["val_acc"])  # the first of equals, as fit keeps it
    assert final["best_epoch"] == best_row["epoch"]


def test_resume_of_a_finished_run_is_refused(tmp_path, reference):
    proc = _cli(reference.parents[2], *RUN, "tag=whole", "stage.resume=true")
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr


def test_resume_with_another_config_is_refused(tmp_path, make_cfg):
    cfg = make_cfg(*RUN[1:], "stage.epochs=1", "tag=t")
    run_stage(cfg)
    manifest = Path(cfg.out_dir) / "r" / "t" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["status"] = "interrupted"  # pretend it stopped early
    manifest.write_text(json.dumps(data))
    with pytest.raises(StageError, match="model.name"):
        run_stage(make_cfg(*RUN[1:], "stage.epochs=1", "tag=t", "stage.resume=true",
                           "model=resnet8"))  # fmt: skip


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path, make_cfg):
    folder = tmp_path / "outputs" / "r" / "pretrain"
    folder.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from distill_cli.rundir import lock_folder; "
         f"lock_folder(__import__('pathlib').Path({str(folder)!r})); print('locked', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    try:
        with pytest.raises(rundir.FolderLocked, match=r"another distill-cli process \(pid \d+\)"):
            run_stage(make_cfg(*RUN[1:], "overwrite=true"))
        assert folder.exists()  # overwrite=true did not move a folder in use
    finally:
        holder.kill()
        holder.wait()
    rundir.lock_folder(folder)  # the kernel freed the lock when its owner died
    rundir.unlock_folder(folder)


def test_checkpoint_changed_after_writing_fails_its_sha256(tmp_path, make_cfg):
    cfg = make_cfg(*RUN[1:], "stage.epochs=1")
    run_stage(cfg)
    best = Path(cfg.out_dir) / "r" / "pretrain" / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    ckpt["state_dict"]["head.bias"] += 1  # still a valid file, but not the one the run wrote
    torch.save(ckpt, best)
    with pytest.raises(ck.CheckpointError, match="does not match the sha256"):
        run_stage(make_cfg("stage=finetune", "run=r", "dataset=glyphs_target", "stage.epochs=1"))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from distill_cli.models import build_model

    model = build_model("cnn", num_classes=2, in_channels=1, image_size=16)
    ck.save_checkpoint(tmp_path / "last.pt", model, epoch=1)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path / "last.pt", model, epoch=2)
    assert ck.load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(make_cfg):
    cfg = make_cfg(*RUN[1:], "stage.epochs=1")
    run_stage(cfg)
    folder = Path(cfg.out_dir) / "r" / "finetune"
    with pytest.raises(TrainingError, match=r"epoch \d+, step \d+.*optimizer\.lr"):
        run_stage(make_cfg("stage=finetune", "run=r", "dataset=glyphs_target", "stage.epochs=2",
                           "optimizer.lr=1e30", "optimizer.schedule=constant"))  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "loss became" in manifest["error"]
    assert ck.load_checkpoint(Path(cfg.out_dir) / "r" / "pretrain" / "best.pt")


def test_checkpoint_of_another_architecture_is_refused(tmp_path, make_cfg):
    from distill_cli.models import build_model

    model = build_model("cnn", num_classes=10, in_channels=3, image_size=16)
    path = ck.save_checkpoint(tmp_path / "odd.pt", model) and tmp_path / "odd.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["name"] = "resnet8"  # weights of a cnn, labelled as a resnet8
    torch.save(ckpt, path)
    with pytest.raises(ck.CheckpointError, match="do not fit a resnet8"):
        run_stage(make_cfg("stage=finetune", "run=r", f"stage.from={path}",
                           "dataset=glyphs_target", "stage.epochs=1"))  # fmt: skip


def test_unwritable_output_folder_gives_one_line(tmp_path, make_cfg):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = make_cfg(*RUN[1:], f"out_dir={blocker}/outputs")
    check(cfg)
    with pytest.raises(StageError, match="cannot write"):
        run_stage(cfg)
    assert blocker.read_text() == "not a folder"


def test_image_folder_with_unreadable_images(tmp_path, make_cfg):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(d / f"{i}.png")
    (tmp_path / "imgs" / "train" / "a" / "broken.png").write_bytes(b"not an image")
    args = ["stage=pretrain", "run=r", "dataset=imagefolder", f"dataset.root={tmp_path}/imgs",
            "model=cnn_padded", "stage.epochs=1", "dataset.val_per_class=1"]  # fmt: skip
    with pytest.raises(Exception, match="broken.png"):
        run_stage(make_cfg(*args))
    run_stage(make_cfg(*args, "dataset.bad_images=skip", "overwrite=true"))
    log = (tmp_path / "outputs" / "r" / "pretrain" / "stage.log").read_text()
    assert "skipped 1 unreadable image" in log


@pytest.mark.parametrize(
    "args,message",
    [
        (["pretrain", "optimizer=lamb"], "unknown optimizer 'lamb'; valid: adam, adamw, sgd"),
        (["stage=warmup"], "unknown stage 'warmup'; valid: distill, eval, export, finetune"),
        (["pretrain", "kd=fancy"], "unknown kd 'fancy'; valid: at, crd, ctkd, dist, dkd, fitnet,"),
        (["pretrain", "dataset=glyphs_target", "dataset.classes=[0,99]"], "99"),
        (["eval", "run=x", "stage.from=missing.pt"], "'missing.pt' does not exist"),
    ],
)
def test_more_bad_input_one_line(tmp_path, args, message):
    proc = _cli(tmp_path, *args, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
