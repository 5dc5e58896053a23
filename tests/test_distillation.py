"""Every kd method and every transfer set through the real distill stage, on tiny settings."""

import json

import pytest
import torch

from distill_cli import checkpoint as ck
from distill_cli.config import KD_METHODS, check
from distill_cli.models import build_model
from distill_cli.stages import StageError, run_stage
from tests.conftest import TINY

SRC = ["dataset=glyphs_source", *TINY]
TGT = ["dataset=glyphs_target", "dataset.shots=3", "model=cnn", "stage.epochs=2",
       "stage.batch_size=16"]  # fmt: skip
FEATURE = ("fitnet", "at", "sp", "rkd", "pkt", "crd")


def _run(make_cfg, *overrides, job=None):
    cfg = make_cfg(*overrides)
    check(cfg)
    return cfg, run_stage(cfg, job)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A run with a pretrained (glyphs_source) and finetuned (glyphs_target) resnet8 teacher."""
    from hydra import compose, initialize_config_dir

    from distill_cli.cli import conf_dir

    out = tmp_path_factory.mktemp("teacher") / "outputs"

    def make(*overrides):
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            return compose("config", overrides=[f"out_dir={out}", *overrides])

    _run(make, "stage=pretrain", "run=r", *SRC, "model=resnet8")
    _run(make, "stage=finetune", "run=r", *TGT)
    return out / "r"


def _distill(make_cfg, teacher_run, *overrides, tag="d"):
    run_dir = teacher_run.parent / "r"
    frm = f"stage.from={run_dir / 'finetune'}"
    cfg = make_cfg("stage=distill", "run=s", f"tag={tag}", frm, *TGT, *overrides)
    check(cfg)
    run_stage(cfg, None)
    return ck.Path(cfg.out_dir) / "s" / tag


@pytest.mark.parametrize("method", KD_METHODS)
def test_every_method_distills_and_keeps_adapters_out_of_the_student(make_cfg, teacher_run, method):
    folder = _distill(make_cfg, teacher_run, f"kd={method}")
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert {"train_ce", "train_kd", "train_loss"} <= rows[-1].keys()
    for row in rows:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k.startswith("train"))
    if method in FEATURE:
        assert "train_feat" in rows[-1]
    # best.pt holds the student alone: exactly the parameters a fresh student has
    best = ck.load_checkpoint(folder / "best.pt")
    fresh = build_model("cnn", best["model"]["num_classes"], 3, 16).state_dict()
    assert best["state_dict"].keys() == fresh.keys()
    last = ck.load_checkpoint(folder / "last.pt")
    # adapters (fitnet) and embedding heads with memory banks (crd) resume from last.pt
    # and CTKD's learned temperature
    assert bool(last["train_state"].get("extra")) == (method in ("fitnet", "crd", "ctkd"))


def test_feature_terms_combine_with_logit_kd(make_cfg, teacher_run):
    folder = _distill(make_cfg, teacher_run, "kd=fitnet", "kd.kd_weight=0.9", "kd.temperature=2")
    row = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    ce, kd, feat = row["train_ce"], row["train_kd"], row["train_feat"]
    assert row["train_loss"] == pytest.approx(1.0 * ce + 0.9 * kd + 100.0 * feat, rel=1e-4)


def _rows(folder):
    return [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]


def test_dkd_warms_up_over_a_share_of_the_stage(make_cfg, teacher_run):
    folder = _distill(make_cfg, teacher_run, "kd=dkd", "stage.epochs=4", "kd.warmup_fraction=0.5",
                      tag="warm")  # fmt: skip
    # loss = ce + ramp * kd, ramp = min(1, epoch / (0.5 * 4 epochs))
    ramps = [(r["train_loss"] - r["train_ce"]) / r["train_kd"] for r in _rows(folder)]
    assert ramps == pytest.approx([0.5, 1.0, 1.0, 1.0], rel=1e-4)


def test_logit_standardized_methods_distill(make_cfg, teacher_run):
    for method in ("kd", "dkd", "dist"):
        folder = _distill(make_cfg, teacher_run, f"kd={method}", "kd.logit_standardize=true",
                          "kd.kd_weight=9", tag=f"{method}_ls")  # fmt: skip
        config = (folder / "config.yaml").read_text()
        assert "logit_standardize: true" in config
        assert all(torch.isfinite(torch.tensor(r["train_kd"])) for r in _rows(folder))


def test_ctkd_learns_its_temperature_beside_the_student(make_cfg, teacher_run):
    folder = _distill(make_cfg, teacher_run, "kd=ctkd", "stage.epochs=3", tag="ctkd")
    temperatures = [r["train_temperature"] for r in _rows(folder)]
    assert all(1 < t < 21 for t in temperatures)
    summary = json.loads((folder / "metrics.json").read_text())
    theta = ck.load_checkpoint(folder / "last.pt")["train_state"]["extra"]["theta"]
    assert theta.item() != 1.0  # trained from CTKD's start
    assert summary["ctkd_temperature"] == pytest.approx(1 + 20 * torch.sigmoid(theta).item(),
                                                        abs=1e-4)  # fmt: skip
    # a finetuned teacher was trained with the target's statistics: no re-normalisation
    assert summary["teacher_normalisation"]["renormalised"] is False


def test_a_pretrain_teacher_sees_its_own_normalisation(make_cfg, teacher_run, monkeypatch):
    from distill_cli.kd import distillation

    out = ck.Path(make_cfg().out_dir)
    ten = "dataset.classes=[0,1,2,3,4,5,6,7,8,9]"  # the target's class count, the source's images
    _run(make_cfg, "stage=pretrain", "run=p", *SRC, ten, "model=resnet8")
    pretrained = ck.load_checkpoint(out / "p" / "pretrain" / "best.pt")
    seen = {}
    real = distillation.objective

    def spy(cfg, teacher, student, train, shape, device, cache_at, **options):
        seen.update(teacher=teacher, train=train)
        return real(cfg, teacher, student, train, shape, device, cache_at, **options)

    monkeypatch.setattr(distillation, "objective", spy)
    cfg = make_cfg("stage=distill", "run=p", f"stage.from={out / 'p' / 'pretrain'}", *TGT,
                   "stage.transfer_set=source", "stage.unlabeled_limit=20")  # fmt: skip
    check(cfg)
    run_stage(cfg, None)
    summary = json.loads((out / "p" / "distill" / "metrics.json").read_text())
    assert summary["teacher_normalisation"] == {
        "mean": pretrained["mean"], "std": pretrained["std"], "dataset": "glyphs_source",
        "renormalised": True,
    }  # fmt: skip
    student = ck.load_checkpoint(out / "p" / "distill" / "best.pt")
    assert student["mean"] != pretrained["mean"]  # the student's are the target's
    # the teacher the objective runs maps the student's batch to the raw teacher on its own
    # normalisation of the same pixels: labelled target images and unlabelled source images
    images = torch.cat([seen["train"].labeled.x[:3], seen["train"].unlabeled.x[:3]]).float() / 255

    def normalised(stats):
        mean, std = (torch.tensor(stats[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
        return (images - mean) / std

    raw = ck.model_from_checkpoint(pretrained).eval()
    with torch.no_grad():
        assert torch.allclose(seen["teacher"](normalised(student)), raw(normalised(pretrained)),
                              atol=1e-4)  # fmt: skip


def test_target_transfer_set_adds_the_unlabelled_target_images(make_cfg, teacher_run):
    folder = _distill(make_cfg, teacher_run, "stage.transfer_set=target",
                      "stage.unlabeled_limit=40", tag="t")  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    data = manifest["data"]
    assert data["transfer_set"] == "target" and data["n_unlabeled_target"] == 40
    assert data["n_train"] == 30  # the labelled subset is unchanged: 3 shots x 10 classes
    indices = json.loads((folder / "indices.json").read_text())
    labelled = set(indices["train"]) | set(indices["val"])
    assert len(indices["unlabeled_target"]) == 40
    assert not labelled & set(indices["unlabeled_target"])  # neither labelled nor validation
    rows = (folder / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["images_per_sec"]


def test_source_transfer_set_finds_the_source_through_the_lineage(make_cfg, teacher_run):
    folder = _distill(make_cfg, teacher_run, "stage.transfer_set=source+target",
                      "stage.unlabeled_limit=25", "kd=crd", tag="st")  # fmt: skip
    data = json.loads((folder / "manifest.json").read_text())["data"]
    assert data["source_dataset"] == "glyphs_source"
    assert data["n_unlabeled_source"] == 25 and data["n_unlabeled_target"] == 25
    last = ck.load_checkpoint(folder / "last.pt")
    bank = [v for k, v in last["train_state"]["extra"].items() if v.dim() == 2 and
            v.shape[0] == 30 + 50]  # fmt: skip
    assert bank, "CRD's memory bank has one row per transfer-set image"


def test_source_transfer_set_without_a_source_is_one_line(make_cfg, teacher_run, tmp_path):
    _run(make_cfg, "stage=pretrain", "run=own", *TGT)
    cfg = make_cfg("stage=distill", "run=own", *TGT, "stage.transfer_set=source",
                   f"stage.from={ck.Path(make_cfg().out_dir) / 'own' / 'pretrain'}")  # fmt: skip
    with pytest.raises(StageError, match="lineage .* has only glyphs_target"):
        run_stage(cfg, None)


def test_feature_method_refuses_models_without_feature_maps(make_cfg, teacher_run):
    with pytest.raises(StageError, match="fitnet"):
        _distill(make_cfg, teacher_run, "kd=fitnet", "model=vit_tiny", tag="vit")


def test_every_method_runs_on_mnist_to_usps(make_cfg, shared_data):
    root = [f"dataset.root={shared_data}", "dataset.download=false", "dataset.image_size=16"]
    _run(make_cfg, "stage=pretrain", "run=m", "dataset=mnist", *root, "dataset.fraction=0.02",
         "model=resnet8", "stage.epochs=1")  # fmt: skip
    usps = ["dataset=usps", *root, "dataset.shots=2", "stage.epochs=1", "stage.batch_size=16"]
    _run(make_cfg, "stage=finetune", "run=m", *usps)
    for method in KD_METHODS:
        _run(
            make_cfg,
            "stage=distill",
            "run=m",
            f"tag={method}",
            *usps,
            "model=cnn",
            f"kd={method}",
            "stage.transfer_set=source+target",
            "stage.unlabeled_limit=20",
        )
        summary = json.loads((ck.Path(make_cfg().out_dir) / "m" / method / "metrics.json")
                             .read_text())  # fmt: skip
        assert summary["stage"] == "distill" and summary["best_val_acc"] is not None


def test_interrupted_crd_resumes_to_the_same_weights_and_memory_bank(
    make_cfg, teacher_run, monkeypatch
):
    import os
    import signal

    from distill_cli.kd import distillation
    from distill_cli.training import Interrupted

    args = ("kd=crd", "stage.epochs=3", "device.deterministic=true")
    whole = _distill(make_cfg, teacher_run, *args, tag="whole")

    real = distillation.objective

    def stopping_objective(cfg, teacher, student, train, shape, device, cache_at, **options):
        goal = real(cfg, teacher, student, train, shape, device, cache_at, **options)
        calls = {"n": 0}

        def loss(model, x, y):
            calls["n"] += 1
            if train.epoch == 2 and calls["n"] == len(train) + 1:  # first step of epoch 2
                os.kill(os.getpid(), signal.SIGINT)  # handled: stop after this step
            return goal.loss_fn(model, x, y)

        return goal._replace(loss_fn=loss)

    monkeypatch.setattr(distillation, "objective", stopping_objective)
    with pytest.raises(Interrupted):
        _distill(make_cfg, teacher_run, *args, tag="cut")
    monkeypatch.setattr(distillation, "objective", real)
    cut = _distill(make_cfg, teacher_run, *args, "stage.resume=true", tag="cut")
    a, b = (ck.load_checkpoint(f / "last.pt") for f in (whole, cut))
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key in a["train_state"]["extra"]:
        assert torch.equal(a["train_state"]["extra"][key], b["train_state"]["extra"][key]), key
