"""The eval stage's decision numbers and plots, the cross-domain matrix, and export."""

import json
from pathlib import Path

import pytest

from distill_cli import checkpoint as ck
from distill_cli.config import check
from distill_cli.stages import StageError, run_stage
from tests.conftest import ONNX

TGT = ["dataset=glyphs_target", "dataset.shots=3", "stage.epochs=1", "stage.batch_size=16"]
FAST_EVAL = ["stage.latency_runs=3", "stage.throughput_batch=8"]


def _run(make_cfg, *overrides):
    cfg = make_cfg(*overrides)
    check(cfg)
    run_stage(cfg)
    return Path(cfg.out_dir)


@pytest.fixture
def run_dir(make_cfg):
    out = _run(make_cfg, "stage=pretrain", "run=e", "model=resnet8", *TGT)
    _run(make_cfg, "stage=finetune", "run=e", *TGT)
    _run(make_cfg, "stage=distill", "run=e", "model=cnn", *TGT)
    return out / "e"


def test_eval_reports_quality_cost_and_student_vs_teacher(make_cfg, run_dir):
    _run(make_cfg, "stage=eval", "run=e", *FAST_EVAL)
    results = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for r in results.values():
        for key in ("top1", "top5", "nll", "ece", "params", "size_mb", "macs", "flops",
                    "latency_ms_p50", "latency_ms_p95", "throughput", "dataset"):  # fmt: skip
            assert key in r, key
        assert r["macs"] > 0 and r["latency_ms_p95"] >= r["latency_ms_p50"] > 0
    student, teacher = results["distill"], results["finetune"]
    assert student["teacher"] == "finetune"
    assert 0 <= student["agreement"] <= 100
    assert student["kept"] == pytest.approx(100 * student["top1"] / teacher["top1"])
    assert student["params_ratio"] == pytest.approx(student["params"] / teacher["params"])
    assert student["macs_ratio"] < 1  # the cnn is cheaper than resnet8 here
    for name in ("learning_curves.png", "accuracy_vs_macs.png", "accuracy_vs_latency.png",
                 "confusion_distill.png"):  # fmt: skip
        png = run_dir / "eval" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cross_domain_skips_datasets_whose_classes_differ(make_cfg, run_dir):
    _run(make_cfg, "stage=eval", "run=e", *FAST_EVAL, "stage.plots=false",
         "stage.datasets=[glyphs_source,glyphs_target]")  # fmt: skip
    results = json.loads((run_dir / "eval" / "metrics.json").read_text())
    cells = results["distill"]["by_dataset"]
    assert cells["glyphs_target"]["top1"] == pytest.approx(results["distill"]["top1"])
    assert "classes differ" in cells["glyphs_source"]["skipped"]
    pretrain = results["pretrain"]["by_dataset"]  # trained on the target with 3 shots here
    assert "top1" in pretrain["glyphs_target"]


def test_cross_domain_by_declared_class_map(make_cfg, run_dir):
    mapping = "[" + ",".join(["0"] * 15 + ["1"] * 15) + "]"  # 30 source classes -> 2 groups
    _run(
        make_cfg,
        "stage=eval",
        "run=e",
        *FAST_EVAL,
        "stage.plots=false",
        "stage.datasets=[glyphs_source]",
        f"stage.class_map={{glyphs_source:{mapping}}}",
    )
    cell = json.loads((run_dir / "eval" / "metrics.json").read_text())["distill"]["by_dataset"]
    assert 0 <= cell["glyphs_source"]["top1"] <= 100 and cell["glyphs_source"]["n"] == 1000


def test_mnist_usps_cross_domain_matrix(make_cfg, shared_data):
    real = [f"dataset.root={shared_data}", "dataset.download=false"]
    _run(make_cfg, "stage=pretrain", "run=mu", "dataset=mnist", "dataset.image_size=16",
         "dataset.fraction=0.01", "model=cnn", "stage.epochs=1", *real)  # fmt: skip
    out = _run(make_cfg, "stage=eval", "run=mu", *FAST_EVAL, "stage.plots=false",
               "stage.datasets=[mnist,usps]", *real)  # fmt: skip
    cells = json.loads((out / "mu" / "eval" / "metrics.json").read_text())["pretrain"]["by_dataset"]
    assert cells["mnist"]["n"] == 10000 and cells["usps"]["n"] == 2007  # '7 - seven' ~ '7'


@pytest.mark.parametrize(
    "fmt,suffix", [pytest.param("onnx", ".onnx", marks=ONNX), ("torchscript", ".pt")]
)
def test_export_writes_a_checked_student_and_its_card(make_cfg, run_dir, fmt, suffix):
    _run(make_cfg, "stage=export", "run=e", f"stage.format={fmt}")
    target = run_dir / "export" / f"distill{suffix}"
    card = json.loads((run_dir / "export" / f"distill{suffix}.json").read_text())
    assert card["sha256"] == ck.sha256(target) and card["size_bytes"] == target.stat().st_size
    assert card["max_abs_diff"] < 1e-4 and card["input"]["mean"]
    with pytest.raises(StageError, match="exists; pass overwrite=true"):
        _run(make_cfg, "stage=export", "run=e", f"stage.format={fmt}")
