"""Each stage in-process on the built-in data with tiny settings, chained through a run folder."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from distill_cli import checkpoint as ck
from distill_cli.config import ConfigError, check, conf_dir, inherit_dataset
from distill_cli.stages import StageError, run_stage
from tests.conftest import TINY

SRC = ["dataset=glyphs_source", *TINY]
TGT = ["dataset=glyphs_target", "dataset.shots=3", "model=cnn", "stage.epochs=2",
       "stage.batch_size=16"]  # fmt: skip


def _run(make_cfg, *overrides, job=None):
    cfg = make_cfg(*overrides)
    check(cfg)
    return cfg, run_stage(cfg, job)


@pytest.fixture
def pretrained(make_cfg):
    cfg, _ = _run(make_cfg, "stage=pretrain", "run=r", *SRC)
    return ck.Path(cfg.out_dir) / "r"


def test_pretrain_writes_a_complete_stage_folder(pretrained):
    folder = pretrained / "pretrain"
    for name in ("config.yaml", "best.pt", "last.pt", "metrics.jsonl", "metrics.json",
                 "stage.log", "manifest.json", "indices.json"):  # fmt: skip
        assert (folder / name).is_file(), name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 0
    assert manifest["data"]["indices_sha256"] == ck.sha256(folder / "indices.json")
    assert manifest["checkpoints"]["last"]["sha256"] == ck.sha256(folder / "last.pt")
    assert {"torch", "torchvision", "python"} <= manifest["versions"].keys()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"train_loss", "val_acc", "lr", "images_per_sec"} <= rows[0].keys()
    indices = json.loads((folder / "indices.json").read_text())
    assert not set(indices["train"]) & set(indices["val"])


def test_finetune_resets_the_head_and_records_its_parent(make_cfg, pretrained):
    _run(make_cfg, "stage=finetune", "run=r", *TGT, "dataset.classes=[0,1,2]")
    ckpt = ck.load_checkpoint(pretrained / "finetune" / "best.pt")
    assert ckpt["model"]["num_classes"] == 3 and ckpt["model"]["name"] == "cnn"
    manifest = json.loads((pretrained / "finetune" / "manifest.json").read_text())
    assert manifest["parent"]["sha256"] == ck.sha256(pretrained / "pretrain" / "best.pt")
    assert json.loads((pretrained / "finetune" / "indices.json").read_text())["train"]
    assert manifest["data"]["n_train"] == 9  # 3 shots x 3 classes


def test_linear_probe_leaves_the_backbone_untouched(make_cfg, pretrained):
    _run(make_cfg, "stage=finetune", "run=r", *TGT, "stage.mode=linear")
    before = ck.load_checkpoint(pretrained / "pretrain" / "best.pt")["state_dict"]
    after = ck.load_checkpoint(pretrained / "finetune" / "last.pt")["state_dict"]
    for key, value in before.items():
        if not key.startswith("head."):
            assert torch.equal(value, after[key]), key
    assert not torch.equal(before["head.weight"][:10], after["head.weight"])


def test_linear_then_full_numbers_epochs_across_phases(make_cfg, pretrained):
    _run(make_cfg, "stage=finetune", "run=r", *TGT, "stage.mode=linear_then_full",
         "stage.probe_epochs=1", "stage.backbone_lr_mult=0.1")  # fmt: skip
    rows = (pretrained / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def _dataset_of(folder) -> dict:
    return dict(OmegaConf.load(folder / "config.yaml").dataset)


def test_stages_inherit_the_parents_data_unless_the_command_line_names_it(make_cfg, pretrained):
    # finetune names a new target: a group choice, nothing inherited
    _run(make_cfg, "stage=finetune", "run=r", *TGT, "dataset.subset_seed=4")
    target = _dataset_of(pretrained / "finetune")
    assert (target["name"], target["shots"], target["subset_seed"]) == ("glyphs_target", 3, 4)
    log = (pretrained / "finetune" / "stage.log").read_text()
    assert "dataset: glyphs_target 3 shots/class subset_seed 4, as configured" in log

    # distill with no dataset key: the teacher's data, its yaml's augmentation included
    _run(make_cfg, "stage=distill", "run=r", "model=cnn", "stage.epochs=1")
    student = _dataset_of(pretrained / "distill")
    assert student == target
    log = (pretrained / "distill" / "stage.log").read_text()
    assert "dataset: glyphs_target 3 shots/class subset_seed 4, from the parent checkpoint" in log
    assert "set here" not in log
    indices = [json.loads((pretrained / f / "indices.json").read_text()) for f in
               ("finetune", "distill")]  # fmt: skip
    assert indices[0] == indices[1]  # the same labelled images and validation split

    # one key set on the command line wins; the rest still comes from the parent
    _run(make_cfg, "stage=distill", "run=r", "model=cnn", "stage.epochs=1", "tag=two",
         "dataset.shots=2")  # fmt: skip
    two = _dataset_of(pretrained / "two")
    assert two == {**target, "shots": 2}
    assert "set here: dataset.shots" in (pretrained / "two" / "stage.log").read_text()


def test_inheriting_needs_a_parent_and_pretrain_needs_a_dataset(make_cfg):
    with pytest.raises(ck.CheckpointError, match="run `distill-cli finetune run=x"):
        _run(make_cfg, "stage=distill", "run=x")
    with pytest.raises(ConfigError, match="pretrain .* set dataset=NAME; valid: cifar10"):
        check(make_cfg("stage=pretrain", "dataset=upstream"))


def test_upstream_dataset_inherits_every_key_of_the_base():
    base = OmegaConf.load(ck.Path(conf_dir()) / "dataset" / "_base.yaml")
    upstream = OmegaConf.load(ck.Path(conf_dir()) / "dataset" / "upstream.yaml")
    assert set(upstream) == set(base) - {"defaults"}
    assert all(OmegaConf.is_missing(upstream, k) for k in upstream)


def test_inherit_dataset_fills_what_the_parent_lacks_from_the_base():
    requested = OmegaConf.create({"name": "???", "shots": 7, "flip": "???", "workers": "???"})
    merged, own = inherit_dataset(requested, {"name": "usps", "flip": False})
    assert merged == {"name": "usps", "shots": 7, "flip": False, "workers": 2} and own == ["shots"]


def test_distill_keeps_the_teacher_frozen_and_evaluates(make_cfg, pretrained):
    _run(make_cfg, "stage=finetune", "run=r", *TGT)
    teacher_before = ck.sha256(pretrained / "finetune" / "best.pt")
    _run(make_cfg, "stage=distill", "run=r", *TGT, "model=resnet8", "kd.temperature=2")
    assert ck.sha256(pretrained / "finetune" / "best.pt") == teacher_before
    parts = json.loads((pretrained / "distill" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_ce", "train_kd", "train_loss"} <= parts.keys()
    _run(make_cfg, "stage=eval", "run=r")
    results = json.loads((pretrained / "eval" / "metrics.json").read_text())
    assert list(results) == ["pretrain", "finetune", "distill"]
    for r in results.values():
        assert {"top1", "top5", "nll", "params", "dataset"} <= r.keys()
        assert 0 <= r["top1"] <= r["top5"] <= 100
    assert results["pretrain"]["dataset"] == "glyphs_source"
    assert results["distill"]["dataset"] == "glyphs_target"
    assert results["distill"]["model"] == "resnet8"
    # the labelled budget of each checkpoint: 3 shots and 3 held out per class
    assert results["distill"]["labels"] == "3+3" and results["distill"]["selection"] == "best_val"
    assert results["finetune"]["train_per_class"] == results["finetune"]["val_per_class"] == 3


def test_distill_refuses_a_teacher_with_other_classes(make_cfg, pretrained):
    _run(make_cfg, "stage=finetune", "run=r", *TGT, "dataset.classes=[0,1,2]")
    with pytest.raises(StageError, match="teacher predicts 3 classes but glyphs_target has 10"):
        _run(make_cfg, "stage=distill", "run=r", *TGT)


def test_input_shape_mismatch_says_which_option_fixes_it(make_cfg, pretrained):
    with pytest.raises(StageError, match="dataset.image_size=16 dataset.channels=3"):
        _run(make_cfg, "stage=finetune", "run=r", *TGT, "dataset.image_size=20")


def test_rerun_is_refused_and_overwrite_moves_the_old_folder(make_cfg, pretrained):
    old = ck.sha256(pretrained / "pretrain" / "best.pt")
    with pytest.raises(StageError, match="already holds results"):
        _run(make_cfg, "stage=pretrain", "run=r", *SRC)
    assert ck.sha256(pretrained / "pretrain" / "best.pt") == old
    _run(make_cfg, "stage=pretrain", "run=r", *SRC, "overwrite=true")
    moved = list((pretrained / ck.REPLACED).glob("pretrain-*"))
    assert len(moved) == 1 and ck.sha256(moved[0] / "best.pt") == old


def test_stages_without_run_continue_the_latest(make_cfg, pretrained):
    cfg, _ = _run(make_cfg, "stage=finetune", *TGT)  # no run=: the latest run is "r"
    assert (pretrained / "finetune" / "best.pt").is_file()
    assert json.loads((pretrained / "finetune" / "manifest.json").read_text())["run"] == "r"


def test_missing_upstream_names_the_command(make_cfg):
    with pytest.raises(ck.CheckpointError, match="run `distill-cli finetune run=empty"):
        _run(make_cfg, "stage=distill", "run=empty", *TGT)


def test_multirun_jobs_get_their_own_folders(make_cfg, pretrained):
    _run(make_cfg, "stage=finetune", "run=r", *TGT)
    for t in (1, 4):
        _run(make_cfg, "stage=distill", "run=r", *TGT, f"kd.temperature={t}",
             job=f"kd.temperature={t}")  # fmt: skip
    assert (pretrained / "distill" / "kd.temperature=1" / "best.pt").is_file()
    assert (pretrained / "distill" / "kd.temperature=4" / "best.pt").is_file()
    assert len(ck.stage_folders(pretrained)) == 4


def test_mnist_to_usps_on_the_real_files(make_cfg, shared_data):
    real = [f"dataset.root={shared_data}", "dataset.download=false"]
    _run(make_cfg, "stage=pretrain", "run=m2u", "dataset=mnist", "dataset.image_size=16",
         "dataset.fraction=0.01", "model=cnn", "stage.epochs=1", *real)  # fmt: skip
    _run(make_cfg, "stage=finetune", "run=m2u", "dataset=usps", "dataset.shots=3",
         "stage.epochs=1", *real)  # fmt: skip
    cfg, _ = _run(make_cfg, "stage=eval", "run=m2u")
    results = json.loads((ck.Path(cfg.out_dir) / "m2u" / "eval" / "metrics.json").read_text())
    assert results["pretrain"]["dataset"] == "mnist" and results["pretrain"]["n"] == 10000
    assert results["finetune"]["dataset"] == "usps" and results["finetune"]["n"] == 2007


def test_a_failed_attempt_does_not_block_the_next_run(make_cfg):
    with pytest.raises(ck.CheckpointError):
        _run(make_cfg, "stage=finetune", "run=f", *TGT, "stage.from=nowhere.pt")
    cfg, _ = _run(make_cfg, "stage=pretrain", "run=f", "tag=finetune", *TGT)
    run_dir = ck.Path(cfg.out_dir) / "f"
    assert (run_dir / "finetune" / "best.pt").is_file()
    kept = list((run_dir / ck.REPLACED).glob("finetune-*"))
    assert (
        len(kept) == 1 and json.loads((kept[0] / "manifest.json").read_text())["status"] == "failed"
    )


def test_compiled_training_saves_the_plain_module(make_cfg, monkeypatch):
    compile_ = torch.compile
    calls = []

    def eager_compile(model):  # the plumbing, without waiting for a C++ build of the kernels
        calls.append(type(model).__name__)
        return compile_(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    cfg, _ = _run(make_cfg, "stage=pretrain", "run=c", *TGT, "device.compile=true")
    ckpt = ck.load_checkpoint(ck.Path(cfg.out_dir) / "c" / "pretrain" / "best.pt")
    assert calls == ["SmallCNN"]
    assert not any(k.startswith("_orig_mod") for k in ckpt["state_dict"])
    ck.model_from_checkpoint(ckpt)


def test_few_shot_protocol_holds_out_the_shots_and_states_the_budget(make_cfg):
    cfg, best = _run(make_cfg, "stage=pretrain", "run=v", *TGT, "stage.epochs=1")  # 3 shots
    folder = ck.Path(cfg.out_dir) / "v" / "pretrain"
    indices = json.loads((folder / "indices.json").read_text())
    assert len(indices["train"]) == len(indices["val"]) == 30  # 3 per class, 10 classes
    assert not set(indices["train"]) & set(indices["val"])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["train_per_class"], metrics["val_per_class"]) == (3, 3)
    assert metrics["selection"] == "best_val" and best == metrics["best_val_acc"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["data"]["train_per_class"] == 3 and manifest["data"]["val_per_class"] == 3
    assert ck.load_checkpoint(folder / "best.pt")["budget"]["val_per_class"] == 3
    log = (folder / "stage.log").read_text()
    assert "labelled budget: 3 per class for training, 3 for validation" in log
    assert "validation split holds" not in log


def test_nothing_held_out_keeps_the_last_epoch(make_cfg):
    cfg, _ = _run(make_cfg, "stage=pretrain", "run=n", *TGT, "stage.epochs=3",
                  "dataset.val_per_class=0")  # fmt: skip
    folder = ck.Path(cfg.out_dir) / "n" / "pretrain"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["selection"] == "last" and metrics["val_per_class"] == 0
    assert metrics["best_epoch"] == 3 and metrics["best_val_acc"] is None
    assert ck.load_checkpoint(folder / "best.pt")["epoch"] == 3
    assert json.loads((folder / "indices.json").read_text())["val"] == []


def test_a_larger_validation_split_on_request_is_said(make_cfg):
    cfg, _ = _run(make_cfg, "stage=pretrain", "run=w", *TGT, "stage.epochs=1",
                  "dataset.val_per_class=20")  # fmt: skip
    folder = ck.Path(cfg.out_dir) / "w" / "pretrain"
    log = (folder / "stage.log").read_text()
    assert "30 training and 200 validation" in log
    assert "WARNING the validation split holds 200 labelled images, more than the 30" in log
    assert json.loads((folder / "metrics.json").read_text())["val_per_class"] == 20


def test_validation_every_n_epochs_and_after_the_last(make_cfg):
    cfg, _ = _run(make_cfg, "stage=pretrain", "run=e", *TGT, "stage.epochs=5",
                  "stage.val_every=2")  # fmt: skip
    rows = _rows(ck.Path(cfg.out_dir) / "e" / "pretrain" / "metrics.jsonl")
    assert [r["epoch"] for r in rows if "val_acc" in r] == [2, 4, 5]
    best = json.loads((ck.Path(cfg.out_dir) / "e" / "pretrain" / "metrics.json").read_text())
    assert best["best_epoch"] in (2, 4, 5)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]
