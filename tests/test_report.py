"""distill-cli report: arithmetic on hand-written job folders, and a real 2x2 multirun."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill_cli.config import REPORT_METRICS, ConfigError, check
from distill_cli.evaluation.aggregate import (
    Stat,
    choose_baselines,
    collect_jobs,
    group,
    paired_gain,
    partial_keys,
    summarize,
)
from distill_cli.evaluation.report import METRICS, ReportError, report_run

CLI = str(Path(sys.executable).parent / "distill-cli")


def write_job(
    run_dir: Path,
    folder: str,
    *,
    stage="pretrain",
    seed=0,
    model="cnn",
    lr=0.01,
    dataset="glyphs_target",
    best=None,
    last=None,
    status="completed",
    error=None,
    history=(),
    parent=None,
    trained_model=None,
    kd=None,
    budget=(5, 5),
    shots=5,
    epochs=3,
) -> None:
    """A stage folder as the stages leave it: config.yaml, manifest.json, metrics.json(l)."""
    d = run_dir / folder
    d.mkdir(parents=True)
    config = {
        "stage": {"name": stage, "epochs": epochs, "resume": False},
        "model": {"name": model},
        "dataset": {"name": dataset, "shots": shots, "subset_seed": seed, "crop_padding": 2},
        "optimizer": {"name": "sgd", "lr": lr},
        "run": run_dir.name,
        "tag": folder.split("/")[0],
        "seed": seed,
        "out_dir": "outputs",
        "overwrite": False,
    }
    if kd is not None:
        config["kd"] = kd
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    manifest = {
        "stage": stage,
        "seed": seed,
        "status": status,
        "started": f"2026-01-01T00:00:{len(list(run_dir.rglob('config.yaml'))):02d}",
        "checkpoints": {"best": {"sha256": f"sha-{folder}"}},
        "parent": {"path": str(run_dir / parent / "best.pt")} if parent else None,
    }
    if error:
        manifest["error"] = error
    (d / "manifest.json").write_text(json.dumps(manifest))
    if best is not None:
        final = {"best_val_acc": best, "best_epoch": 2, "model": trained_model or model}
        if budget is not None:
            final.update(train_per_class=budget[0], val_per_class=budget[1])
        if last is not None:
            final["last_val_acc"] = last
        (d / "metrics.json").write_text(json.dumps(final))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


def write_eval(run_dir: Path, top1: dict[str, float]) -> None:
    entries = {
        f: {"top1": v, "checkpoint": f"{run_dir}/{f}/best.pt", "sha256": f"sha-{f}"}
        for f, v in top1.items()
    }
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(entries))
    (run_dir / "eval" / "config.yaml").write_text(yaml.safe_dump({"stage": {"name": "eval"}}))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run with a source teacher, a finetuned teacher, an lr sweep of scratch students over
    three seeds, a distilled student over three seeds plus one that failed."""
    r = tmp_path / "outputs" / "r"
    write_job(r, "pretrain", model="resnet8x4", dataset="glyphs_source", best=99.0, last=98.0)
    write_job(
        r,
        "finetune",
        stage="finetune",
        best=80.0,
        last=79.0,
        parent="pretrain",
        trained_model="resnet8x4",
    )
    write_job(r, "scratch_teacher", model="resnet8x4", best=30.0, last=30.0)
    for s, (a, b) in enumerate([(50.0, 40.0), (54.0, 41.0), (58.0, 42.0)]):
        write_job(
            r, f"scratch_student/optimizer.lr=0.01,seed={s}", seed=s, lr=0.01, best=a, last=a - 1
        )
        write_job(
            r,
            f"scratch_student/optimizer.lr=0.05,seed={s}",
            seed=s,
            lr=0.05,
            best=b,
            last=None if s == 2 else b,
            history=[{"epoch": 3, "val_acc": 39.5}],
        )
    for s, v in enumerate([60.0, 61.0, 65.0]):
        write_job(
            r, f"distill/seed={s}", stage="distill", seed=s, best=v, last=v - 2, parent="finetune"
        )
    write_job(
        r,
        "distill/seed=3",
        stage="distill",
        seed=3,
        status="failed",
        parent="finetune",
        error="loss is nan at epoch 3, step 4",
        history=[{"epoch": 1}, {"epoch": 2}],
    )
    write_eval(
        r,
        {
            "finetune": 81.0,
            "scratch_teacher": 31.0,
            **{
                f"scratch_student/optimizer.lr=0.01,seed={s}": v for s, v in enumerate([45, 47, 52])
            },
            # the lr=0.05 students test far better: the baseline must still be chosen on validation
            **{f"scratch_student/optimizer.lr=0.05,seed={s}": 90.0 for s in range(3)},
            **{f"distill/seed={s}": v for s, v in enumerate([50.0, 55.0, 59.0])},
        },
    )
    return r


def report(make_cfg, *overrides: str):
    cfg = make_cfg("stage=report", "run=r", *overrides)
    check(cfg)
    report_run(cfg)


def test_summarize_is_mean_and_sample_std():
    s = summarize([1.0, 2.0, 3.0, 4.0, None])
    assert (s.mean, s.n) == (2.5, 4)
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # squared deviations 5, over n - 1 = 3
    assert summarize([7.0]) == Stat(7.0, None, 1)
    assert summarize([]) == Stat(None, None, 0)


def test_paired_gain_pairs_by_replicate_only():
    ours = {(0, 0): 60.0, (1, 1): 61.0, (2, 2): 65.0, (3, 3): 70.0, (4, 4): None}
    theirs = {(0, 0): 50.0, (1, 1): 54.0, (2, 2): 58.0, (3, 0): 10.0, (4, 4): 1.0}
    g = paired_gain(ours, theirs)  # (3, 3) has no partner: same seed, other images
    assert (g.mean, g.n) == (8.0, 3)
    assert g.std == pytest.approx(math.sqrt(3))  # gains 10, 7, 7: deviations 2, -1, -1


def test_jobs_group_into_configurations_named_by_what_differs(run_dir):
    configs = group(collect_jobs(run_dir))
    names = [c.name for c in configs]
    assert names == [
        "pretrain",
        "finetune",
        "scratch_teacher",
        "scratch_student optimizer.lr=0.01",
        "scratch_student optimizer.lr=0.05",
        "distill",
    ]
    distill = configs[-1]
    assert [len(distill.jobs), len(distill.finished)] == [4, 3]
    assert distill.stat("best_val_acc").mean == pytest.approx(62.0)
    assert distill.stat("best_val_acc").std == pytest.approx(math.sqrt(7))  # 4 + 1 + 9 over 2
    fallback = configs[4].stat("last_val_acc")  # seed 2 has it from metrics.jsonl only
    assert fallback.mean == pytest.approx((40.0 + 41.0 + 39.5) / 3) and fallback.n == 3


def test_a_methods_own_keys_separate_configurations_and_old_configs_still_join(tmp_path):
    r = tmp_path / "outputs" / "m"
    for s in (0, 1):
        write_job(r, f"d/kd=kd,seed={s}", stage="distill", seed=s, best=60.0 + s,
                  kd={"name": "kd", "temperature": 4.0, "ce_weight": 0.1})  # fmt: skip
        for beta in (1.0, 8.0):  # dkd's own key, swept: two configurations, not one
            dkd = {"name": "dkd", "temperature": 4.0, "beta": beta}
            write_job(r, f"d/kd=dkd,kd.beta={beta},seed={s}", stage="distill", seed=s,
                      best=70.0 + beta + s, kd=dkd)  # fmt: skip
    # a kd job from an older version, without kd.ce_weight: same configuration as the others
    write_job(r, "d/kd=kd,seed=2", stage="distill", seed=2, best=62.0,
              kd={"name": "kd", "temperature": 4.0})  # fmt: skip
    configs = group(collect_jobs(r))
    assert [c.name for c in configs] == [
        "d kd.name=dkd kd.beta=1.0",
        "d kd.name=dkd kd.beta=8.0",
        "d kd.name=kd",
    ]
    assert [len(c.jobs) for c in configs] == [2, 2, 3]
    assert configs[1].stat("best_val_acc").mean == pytest.approx(78.5)
    assert partial_keys(collect_jobs(r)) == {"d": ["kd.ce_weight"]}


def test_report_files_hold_means_stds_gains_and_failures(make_cfg, run_dir):
    report(make_cfg)
    md = (run_dir / "report.md").read_text()
    rows = {r["configuration"]: r for r in csv.DictReader(open(run_dir / "report.csv"))}
    d = rows["distill"]
    assert (d["n"], d["failed"], d["seeds"]) == ("3", "1", "0,1,2")
    assert float(d["best_val_acc_mean"]) == pytest.approx(62.0)
    assert float(d["best_val_acc_std"]) == pytest.approx(math.sqrt(7), abs=1e-6)
    assert float(d["top1_mean"]) == pytest.approx(164 / 3, abs=1e-6)
    # baseline: lr=0.01 has the better validation mean (54 > 41), though lr=0.05 tests better
    assert d["baseline"] == "scratch_student optimizer.lr=0.01" and d["pairs"] == "3"
    assert float(d["gain_best_val_acc_mean"]) == pytest.approx(8.0)  # 10, 7, 7
    assert float(d["gain_best_val_acc_std"]) == pytest.approx(math.sqrt(3), abs=1e-6)
    assert float(d["gain_top1_mean"]) == pytest.approx(20 / 3, abs=1e-6)  # 5, 8, 7
    assert float(d["gain_top1_std"]) == pytest.approx(math.sqrt(7 / 3), abs=1e-6)
    # the finetuned teacher against the scratch teacher, not the source-domain pretrain
    f = rows["finetune"]
    assert (f["model"], f["baseline"], f["gain_top1_mean"], f["gain_top1_std"]) == (
        "resnet8x4",
        "scratch_teacher",
        "50.0",
        "",
    )
    assert rows["pretrain"]["baseline"] == "" and rows["pretrain"]["n"] == "1"
    assert "| distill | cnn | glyphs_target | 5+5 | 3 | 0,1,2 | 1 | 62.0 ± 2.6 |" in md
    assert (
        "| distill | finetune | scratch_student optimizer.lr=0.01 (best val of 2) | 3 | 0 of 3 | "
        "+8.0 ± 1.7 | +6.7 ± 1.5 |" in md  # the finetuned teacher (80.0) beats every scratch
    )
    assert "## Failed or unfinished jobs" in md
    assert "| distill/seed=3 | distill | failed | 2/3 | loss is nan at epoch 3, step 4 |" in md


def test_stale_eval_and_missing_metrics_are_said(make_cfg, run_dir):
    entries = json.loads((run_dir / "eval" / "metrics.json").read_text())
    entries["distill/seed=0"]["sha256"] = "an older checkpoint"
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(entries))
    (run_dir / "scratch_teacher" / "metrics.json").unlink()  # says completed, has no metrics
    report(make_cfg, "stage.metrics=[top1]")
    md = (run_dir / "report.md").read_text()
    assert "| distill | cnn | glyphs_target | 5+5 | 3 | 0,1,2 | 1 | 57.0 ± 2.8 (n=2) |" in md
    assert "distill/seed=0: eval/metrics.json measured an older checkpoint" in md
    assert "| scratch_teacher | pretrain | completed | 0/3 | no metrics.json |" in md


def test_a_second_report_replaces_the_first_atomically(make_cfg, run_dir):
    report(make_cfg)
    (run_dir / "report.md").write_text("old")
    report(make_cfg)
    assert (run_dir / "report.md").read_text().startswith("# Report · run r")
    assert sorted(p.name for p in run_dir.iterdir() if p.is_file()) == ["report.csv", "report.md"]


def test_other_runs_join_as_more_seeds(make_cfg, tmp_path):
    for run, seed, best in (("r", 0, 50.0), ("r1", 1, 60.0)):
        write_job(tmp_path / "outputs" / run, "pretrain", seed=seed, best=best)
    report(make_cfg, "stage.runs=[r1]")
    row = next(csv.DictReader(open(tmp_path / "outputs" / "r" / "report.csv")))
    assert (row["n"], row["best_val_acc_mean"], row["jobs"]) == (
        "2",
        "55.0",
        "pretrain;r1:pretrain",
    )


def test_bad_input_is_one_line(make_cfg, tmp_path):
    (tmp_path / "outputs" / "a").mkdir(parents=True)
    with pytest.raises(ReportError, match=r"run 'missing' does not exist in .*; runs there: a$"):
        report(make_cfg, "run=missing")
    with pytest.raises(ReportError, match="run 'a' holds no stage folders yet"):
        report(make_cfg, "run=a")
    with pytest.raises(ConfigError, match=r"^stage.metrics=\['top9'\] is invalid"):
        report(make_cfg, "stage.metrics=[top9]")
    assert tuple(METRICS) == REPORT_METRICS


def test_report_never_imports_torch(run_dir):
    cfg = {"out_dir": str(run_dir.parent), "run": "r", "stage": {"metrics": ["top1"], "runs": []}}
    code = (
        "import sys; from omegaconf import OmegaConf; "
        "from distill_cli.evaluation.report import report_run; "
        f"report_run(OmegaConf.create({cfg!r})); print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("False")


def test_multirun_then_report_through_the_console_script(tmp_path):
    env = {**os.environ, "COLUMNS": "160"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CLI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
        )

    sweep = cli(
        "pretrain",
        "-m",
        "run=r",
        "dataset=glyphs_target",
        "dataset.shots=2",
        "model=cnn",
        "stage.epochs=1",
        "stage.batch_size=32",
        "device=cpu",
        "optimizer.lr=0.01,0.02",
        "seed=0,1",
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    proc = cli("report", "run=r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 of 4 jobs failed or unfinished" in proc.stderr
    assert "pretrain optimizer.lr=0.01" in proc.stdout
    md = (tmp_path / "outputs" / "r" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| pretrain optimizer.lr=")]
    assert len(rows) == 2 and all("| cnn | glyphs_target | 2+2 | 2 | 0,1 |" in row for row in rows)
    missing = cli("report", "run=missing")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "run 'missing' does not exist in 'outputs'; runs there: r" in missing.stderr


def test_a_baseline_is_only_paired_with_the_same_labelled_budget(tmp_path):
    r = tmp_path / "outputs" / "r"
    for s in range(2):
        write_job(r, f"distill/seed={s}", stage="distill", seed=s, best=60.0 + s)
        # more labels for validation: the same images trained on, a different budget
        write_job(r, f"scratch/seed={s}", seed=s, best=70.0, budget=(5, 50))
    configs = group(collect_jobs(r))
    choose_baselines(configs)
    distill = next(c for c in configs if c.name == "distill")
    assert distill.labels == "5+5" and distill.baseline is None
    write_job(r, "scratch_same/seed=0", seed=0, best=50.0)
    write_job(r, "legacy/seed=1", seed=1, best=40.0, budget=None)  # an older version's: unknown
    configs = group(collect_jobs(r))
    choose_baselines(configs)
    distill = next(c for c in configs if c.name == "distill")
    assert distill.baseline is not None and distill.baseline.name == "scratch_same"
    assert next(c for c in configs if c.name == "legacy").labels == "?"


def test_a_trial_its_search_pruned_is_not_a_failure(make_cfg, tmp_path, monkeypatch):
    from distill_cli import search
    from distill_cli.search import TrialPruned
    from distill_cli.stages import run_stage
    from tests.conftest import TINY

    def pruning_hook(on_epoch):
        def hook(row):
            on_epoch(row)
            raise TrialPruned(f"pruned by Optuna after epoch {row['epoch']} (val_acc 1.00)")

        return hook

    monkeypatch.setattr(search, "epoch_hook", pruning_hook)  # what a search's pruner does
    cfg = make_cfg("stage=pretrain", "run=r", "tag=trial", *TINY)
    check(cfg)
    with pytest.raises(TrialPruned):
        run_stage(cfg, None)
    run_dir = tmp_path / "outputs" / "r"
    manifest = json.loads((run_dir / "trial" / "manifest.json").read_text())
    assert manifest["status"] == "pruned" and "after epoch 1" in manifest["error"]
    write_job(run_dir, "other", status="failed", error="diverged")
    report(make_cfg)
    md = (run_dir / "report.md").read_text()
    assert "1 failed or unfinished, 1 pruned by a search." in md
    failed = md.split("## Failed or unfinished jobs")[1]
    assert "| other |" in failed and "trial" not in failed
