"""The benchmark runs end to end on tiny sizes (its numbers are measured in `make bench`)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"
CPU_FORMATS = BENCH.parent / "cpu_formats.py"
DATA_CACHE = BENCH.parent / "data_cache.py"


def test_throughput_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--images", "256", "--epochs", "1", "--models", "cnn",
         "--workers", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    cnn = report["throughput"]["cnn"]
    assert cnn["reference_images_per_sec"] > 0 and cnn["distill_cli_images_per_sec"] > 0
    assert report["startup_help_s"] > 0 and cnn["peak_rss_mib"]["distill_cli"] > 0
    assert cnn["peak_rss_mib"]["reference_main_process"] > 0
    assert cnn["bare_step_images_per_sec"] > 0 and len(cnn["bare_step_rounds"]) == 5


def test_cpu_formats_benchmark_smoke(tmp_path):
    out = tmp_path / "formats.json"
    proc = subprocess.run(
        [sys.executable, str(CPU_FORMATS), "--models", "cnn", "--batch", "4", "--rounds", "1",
         "--steps", "1", "--acc-dataset", "glyphs_target", "--acc-fraction", "0.05",
         "--acc-epochs", "1", "--acc-seeds", "0", "--acc-settings", "bf16_channels_last",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["throughput"]["cnn"]) == 8  # fp32/bf16 x layouts x 1, 2 threads
    assert all(r["images_per_sec"] > 0 for r in report["throughput"]["cnn"].values())
    assert report["accuracy"]["cnn"]["bf16_channels_last"]["0"]["best_val_acc"] is not None


def test_data_cache_benchmark_smoke(tmp_path):
    out = tmp_path / "cache.json"
    proc = subprocess.run(
        [sys.executable, str(DATA_CACHE), "--data", "none", "--images", "32", "--reps", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = json.loads(out.read_text())["load"]["imagefolder"]
    assert folder["images"] == 32 and folder["second_load_s"] > 0


def test_distillation_cost_benchmark_smoke(tmp_path):
    out = tmp_path / "distill.json"
    bench = BENCH.parent / "distill_cost.py"
    proc = subprocess.run(
        [sys.executable, str(bench), "--fraction", "0.01", "--epochs", "2", "--views", "1",
         "--student", "cnn", "--teacher", "resnet8", "--sweep", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["epoch_s"]["pretrain"] > 0 and report["overhead"]["live"] > 0
    assert report["overhead"]["cached"] > 0 and report["sweep"]["cached_s"] > 0


def test_fewshot_cost_benchmark_smoke(tmp_path):
    out = tmp_path / "fewshot.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "fewshot_cost.py"), "--data", "glyphs", "--shots",
         "2", "--epochs", "2", "--distill-epochs", "2", "--settings", "default,val1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    for stage in ("finetune", "distill"):
        default, val1 = report[stage]["default"], report[stage]["val1"]
        assert default["n_train"] == default["n_val"] == 20  # 2 shots and 2 held out, 10 classes
        assert val1["n_val"] == 10 and val1["wall_s"] > 0
        assert report[stage]["default_over_val1"] > 0


def test_kd_loop_benchmark_smoke(tmp_path):
    from PIL import Image

    for c in ("a", "b"):  # a tiny CIFAR-shaped image folder
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(16):
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / "train" / c / f"{i}.png")
    out = tmp_path / "kd.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "kd_loop.py"), "--data", str(tmp_path / "data"),
         "--classes", "2", "--per-class", "16", "--batch", "8", "--epochs", "1",
         "--teacher-epochs", "1", "--workers", "0", "--rounds", "1", "--reps", "1",
         "--long-epochs", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rates = report["images_per_sec"]
    assert {"reference", "distill_plain", "distill_prepared", "distill_cached"} <= rates.keys()
    assert all(v > 0 for v in rates.values()) and report["cached_hit_rate"] == 1.0
    teacher = report["teacher"]
    assert teacher["prep"]["prepared"]["folded"] == 10  # resnet8x4
    assert 0 < teacher["teacher_share_of_step"]["prepared"] < 1
    assert teacher["forward_speedup_over_plain"]["prepared"] > 0
    long = report["default_long"]  # auto on a 2-epoch job of 4 batches: too short to compile
    assert long["epochs"] == 2 and len(report["epochs_images_per_sec"]["distill_default_long"]) == 2
    assert long["teacher_prep"]["auto"]["forwards"] == 8 and long["job_over_reference"] > 0
    assert long["teacher_prep"]["prep"] == "fold"


def test_aug_views_benchmark_smoke(tmp_path):
    out = tmp_path / "views.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "aug_views.py"), "--data", "glyphs", "--views",
         "1,none", "--seeds", "0", "--epochs", "2", "--teacher-epochs", "1",
         "--finetune-epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    views = json.loads(out.read_text())["views"]
    assert views["none"]["hit_rate"]["mean"] == 0.0 and views["1"]["hit_rate"]["mean"] > 0
    assert views["none"]["time_over_none"] == 1.0 and views["1"]["best_val_acc"]["mean"] >= 0


def test_teacher_precision_benchmark_smoke(tmp_path, make_cfg):
    from distill_cli.config import check
    from distill_cli.stages import run_stage
    from tests.conftest import TINY

    cfg = make_cfg("stage=pretrain", "run=p", "dataset=glyphs_target", *TINY, "model=resnet8")
    check(cfg)
    run_stage(cfg, None)
    teacher = tmp_path / "outputs" / "p" / "pretrain" / "best.pt"
    out = tmp_path / "precision.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "teacher_precision.py"), str(teacher),
         "--batch", "64", "--rounds", "1", "--out-dir", str(tmp_path / "outputs"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = json.loads(out.read_text())["teachers"]
    assert report["images"] > 0 and 0.9 <= report["top1_agreement"] <= 1
    assert 0 <= report["kl_mean"] <= report["kl_max"] < 1e-2
    assert report["max_relative_logit_error"] < 5e-2  # within the stage's half tolerance
    assert report["checks"]["float32"] < 1e-3 and report["forward_ms"]["bfloat16"] > 0
