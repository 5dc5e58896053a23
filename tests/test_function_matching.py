"""Patient, consistent distillation: the transfer-set budget, fidelity selection, mixed resume."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_cli import checkpoint as ck
from distill_cli.config import KD_METHODS, check
from distill_cli.data import BatchLoader, Normalise
from distill_cli.kd.features import METHODS
from distill_cli.kd.losses import LOGIT_METHODS
from distill_cli.selection import Fidelity, Validation
from distill_cli.stages import StageError, _transfer_steps, run_stage
from distill_cli.training import Checkpointing, Reporting, Schedule, Step, build_scheduler, fit
from tests.conftest import TINY, signal_mid_epoch_2

CLI = str(Path(sys.executable).parent / "distill-cli")
SRC = ["dataset=glyphs_source", *TINY]
TGT = ["dataset=glyphs_target", "dataset.shots=3", "model=cnn", "stage.epochs=2",
       "stage.batch_size=16"]  # fmt: skip
POOL = ["stage.transfer_set=target", "stage.unlabeled_limit=60"]


def _run(make_cfg, *overrides):
    cfg = make_cfg(*overrides)
    check(cfg)
    run_stage(cfg, None)
    return cfg


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finetuned resnet8 teacher's stage folder."""
    from hydra import compose, initialize_config_dir

    from distill_cli.cli import conf_dir

    out = tmp_path_factory.mktemp("fm") / "outputs"

    def make(*overrides):
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            return compose("config", overrides=[f"out_dir={out}", *overrides])

    _run(make, "stage=pretrain", "run=r", *SRC, "model=resnet8")
    _run(make, "stage=finetune", "run=r", *TGT)
    return out / "r" / "finetune"


def _distill(make_cfg, teacher, *overrides, tag="d") -> Path:
    cfg = _run(make_cfg, "stage=distill", "run=s", f"tag={tag}", f"stage.from={teacher}", *TGT,
               *overrides)  # fmt: skip
    return Path(cfg.out_dir) / "s" / tag


def _rows(folder: Path) -> list[dict]:
    return [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]


def test_transfer_steps_by_hand():
    assert _transfer_steps(None, 90, 64) is None
    assert _transfer_steps(3, 90, 64) == 2  # ceil(90 / 64) steps make one pass
    assert _transfer_steps(1, 20_020, 128) == 157


def test_transfer_epochs_count_passes_over_the_whole_transfer_set(make_cfg, teacher):
    # 30 labelled + 60 unlabelled images, 16 + 48 a step: a pass is ceil(90 / 64) = 2 steps
    folder = _distill(make_cfg, teacher, *POOL, "stage.transfer_epochs=3", tag="te")
    rows = _rows(folder)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["images"] == 2 * 64 for r in rows)
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["transfer_epochs"] == 3 and summary["steps"] == 6
    state = ck.load_checkpoint(folder / "last.pt")["train_state"]
    assert state["scheduler"]["last_epoch"] == 6  # the schedule spans the 6 steps
    # without it, an epoch is one pass over the labelled subset: one step of 16 + 48
    plain = _distill(make_cfg, teacher, *POOL, tag="plain")
    assert [r["images"] for r in _rows(plain)] == [64, 64]


def test_fidelity_selection_keeps_both_picks(make_cfg, teacher):
    folder = _distill(make_cfg, teacher, *POOL, "stage.select=fidelity",
                      "stage.fidelity_images=20", "stage.epochs=3", tag="fid")  # fmt: skip
    rows = _rows(folder)
    assert all("fid_agree" in r and "fid_kl" in r and "val_acc" in r for r in rows)
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["select"] == "fidelity" and summary["selection"].keys() == {"val", "fidelity"}
    best = max(rows, key=lambda r: (r["fid_agree"], -r["fid_kl"]))
    assert summary["best_epoch"] == summary["selection"]["fidelity"]["epoch"] == best["epoch"]
    assert ck.load_checkpoint(folder / "best.pt")["epoch"] == best["epoch"]
    by_val = max(rows, key=lambda r: r["val_acc"])  # the first of equals: strictly better only
    assert summary["selection"]["val"]["epoch"] == by_val["epoch"]
    assert ck.load_checkpoint(folder / "best_val.pt")["epoch"] == by_val["epoch"]
    indices = json.loads((folder / "indices.json").read_text())
    held, pool = set(indices["fidelity_target"]), set(indices["unlabeled_target"])
    assert len(held) == 20 and not held & pool  # held out: never trained on
    assert summary["selection"]["fidelity"]["fid_agree"] == best["fid_agree"]
    assert json.loads((folder / "manifest.json").read_text())["data"]["selection"] == "fidelity"


class _Scripted(torch.nn.Module):
    """Predicts class ``plan[k]`` for every image after its k-th training step."""

    def __init__(self, plan):
        super().__init__()
        self.plan, self.steps = plan, 0
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logits = torch.zeros(len(x), 2)
        logits[:, self.plan[self.steps]] = 3.0
        return logits + self.w


def test_fidelity_picks_the_epoch_that_agrees_with_the_teacher_in_a_crafted_case(tmp_path):
    # labels say class 0, the teacher says class 1: validation keeps epoch 1, fidelity epoch 2
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    norm = Normalise([0.0], [1.0])
    val = BatchLoader(x, torch.zeros(4, dtype=torch.int64), 4, norm)
    held = BatchLoader(x, torch.full((4,), -1), 4, norm)
    teacher = lambda images: {"logits": torch.tensor([[0.0, 2.0]]).expand(len(images), -1)}  # noqa: E731
    model = _Scripted([0, 0, 1, 0])

    def loss_fn(m, images, y):
        m.steps += 1
        out = m(images)
        return out, {"loss": out.sum() * 0}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = []
    summary = fit(
        Step(model, loss_fn, opt, build_scheduler(opt, 3, "constant", 0, [], 0.1)),
        [(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.int64))],
        Validation(val, Fidelity(held, teacher), "fidelity"),
        Schedule(3),
        Checkpointing(lambda name, epoch, *a: saved.append((name, epoch))),
        Reporting(tmp_path / "m.jsonl"),
    )
    assert summary["best_epoch"] == 2 and summary["selection"]["val"]["epoch"] == 1
    assert summary["selection"]["fidelity"]["fid_agree"] == 100.0
    assert ("best", 2) in saved and ("best_val", 1) in saved


def test_only_crd_reads_image_rows_so_every_other_method_can_mix():
    assert sorted(m for m, spec in METHODS.items() if spec.needs_index) == ["crd"]
    assert set(KD_METHODS) == set(LOGIT_METHODS) | set(METHODS)  # logit terms read no rows


# one logit method, one with a warm-up, the learned temperature, a feature method with adapters
@pytest.mark.parametrize("method", ["kd", "dkd", "ctkd", "fitnet"])
def test_methods_distill_mixed_images(make_cfg, teacher, method):
    folder = _distill(make_cfg, teacher, *POOL, f"kd={method}", "stage.mix=cutmix",
                      "stage.epochs=1", tag=f"mix_{method}")  # fmt: skip
    row = _rows(folder)[0]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k.startswith("train_"))


def test_fidelity_without_unlabelled_images_is_one_line(make_cfg, teacher):
    with pytest.raises(StageError, match="stage.select=fidelity needs unlabelled images"):
        _distill(make_cfg, teacher, "stage.select=fidelity", tag="nofid")


def test_crd_with_mixing_is_refused_in_one_line(tmp_path, teacher):
    proc = subprocess.run(
        [CLI, "distill", f"out_dir={tmp_path}", "run=x", f"stage.from={teacher}", *TGT,
         "kd=crd", "stage.mix=mixup"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "cannot distill mixed images" in ln]
    assert len(lines) == 1 and "stage.mix=none" in lines[0]


MIXED = ["distill", "run=s", "stage.transfer_set=target", "stage.unlabeled_limit=300",
         "stage.mix=mixup", "stage.transfer_epochs=3", "stage.unlabeled_ratio=3",
         "dataset.shots=3", "stage.batch_size=16", "model=cnn", "device.deterministic=true",
         "device.threads=1", "stage.save_every_s=0"]  # fmt: skip


def _mixed_cli(cwd, teacher, *extra, wait=True):
    args = [CLI, *MIXED, f"stage.from={teacher}", *extra]
    if not wait:
        return subprocess.Popen(args, cwd=cwd, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_sigkill_in_a_mixed_run_then_resume_equals_an_uninterrupted_run(tmp_path, teacher):
    whole = _mixed_cli(tmp_path, teacher, "tag=whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    folder = tmp_path / "outputs" / "s" / "cut"
    proc = _mixed_cli(tmp_path, teacher, "tag=cut", wait=False)
    signal_mid_epoch_2(proc, folder, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert len(_rows(folder)) < 3  # it stopped before the end
    resumed = _mixed_cli(tmp_path, teacher, "tag=cut", "stage.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (
        ck.load_checkpoint(tmp_path / "outputs" / "s" / t / "last.pt") for t in ("whole", "cut")
    )
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    timing = {"epoch_time_s", "images_per_sec"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "outputs" / "s" / "whole")) == strip(_rows(folder))


def test_the_source_of_a_class_split_is_found_by_its_classes(make_cfg):
    # one dataset, two sets of classes (as the CIFAR-10 split): the source is the other classes
    data = ["dataset=glyphs_target", "model=resnet8", "stage.epochs=1", "stage.batch_size=16"]
    _run(make_cfg, "stage=pretrain", "run=split", *data, "dataset.classes=[0,1,2,3,4]")
    _run(make_cfg, "stage=finetune", "run=split", *data, "dataset.classes=[5,6,7,8,9]",
         "dataset.shots=3")  # fmt: skip
    cfg = _run(make_cfg, "stage=distill", "run=split", "model=cnn", "stage.epochs=1",
               "stage.transfer_set=source", "stage.unlabeled_limit=30")  # fmt: skip
    folder = Path(cfg.out_dir) / "split" / "distill"
    data = json.loads((folder / "manifest.json").read_text())["data"]
    assert data["source_dataset"] == "glyphs_target" and data["n_unlabeled_source"] == 30
