"""Shots curves and weak teachers: hand-written job folders, then a real sweep over shots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_report import write_eval, write_job

from distill_cli.evaluation.aggregate import choose_baselines, collect_jobs, group, weak_teachers
from distill_cli.evaluation.curves import curve_name, moving_keys, moving_note, shots_curves
from distill_cli.evaluation.plots import curve_groups, learning_curves, marker
from distill_cli.evaluation.report import other_runs, report_run

CLI = str(Path(sys.executable).parent / "distill-cli")
# (shots, seed) -> validation accuracy of the scratch student and of the distilled one
SCRATCH = {(5, 0): 40.0, (5, 1): 44.0, (10, 0): 50.0, (10, 1): 56.0}
DISTILLED = {(5, 0): 46.0, (5, 1): 48.0, (10, 0): 51.0, (10, 1): 53.0}


def shots_run(tmp_path: Path, teacher_val: float = 60.0) -> Path:
    """Per shots and seed: a finetuned teacher, a scratch student and a distilled student."""
    r = tmp_path / "outputs" / "r"
    for (k, seed), best in SCRATCH.items():
        common = {"seed": seed, "shots": k, "budget": (k, k)}
        write_job(r, f"finetune/k={k},seed={seed}", stage="finetune", best=teacher_val,
                  trained_model="resnet8x4", **common)  # fmt: skip
        write_job(r, f"scratch/k={k},seed={seed}", best=best, **common)
        write_job(r, f"distill/k={k},seed={seed}", stage="distill", best=DISTILLED[k, seed],
                  parent=f"finetune/k={k},seed={seed}", kd={"name": "kd"}, **common)  # fmt: skip
    return r


def configs_of(r: Path):
    jobs = collect_jobs(r)
    configs = group(jobs)
    choose_baselines(configs)
    return jobs, configs


def test_configurations_that_differ_only_in_shots_form_curves(tmp_path):
    _, configs = configs_of(shots_run(tmp_path))
    curves = {c.name: c for c in shots_curves(configs)}
    assert set(curves) == {"finetune", "scratch", "distill"}
    distill = curves["distill"]
    assert distill.shots == [5, 10]
    assert [s.mean for s in distill.stats("best_val_acc")] == [47.0, 52.0]
    assert distill.stats("best_val_acc")[0].std == pytest.approx(2**0.5)  # 46, 48
    # paired gains by hand: 5 shots (46-40, 48-44) = 6, 4; 10 shots (51-50, 53-56) = 1, -3
    gains = distill.gains("best_val_acc")
    assert [g.mean for g in gains] == [5.0, -1.0] and [g.n for g in gains] == [2, 2]
    assert curves["scratch"].gains("best_val_acc")[0].mean is None  # no baseline of its own


def test_a_curve_needs_two_shots_values_and_names_drop_the_shots(tmp_path):
    r = tmp_path / "outputs" / "r"
    write_job(r, "scratch", best=40.0)
    assert shots_curves(configs_of(r)[1]) == []
    assert curve_name("distill dataset.shots=5 kd.name=dkd") == "distill kd.name=dkd"
    assert curve_name("distill dataset.val_per_class=1 dataset.shots=5") == "distill"


def test_report_draws_both_shots_plots_and_tables(tmp_path, make_cfg):
    r = shots_run(tmp_path)
    write_eval(r, {f"distill/k={k},seed={s}": 70.0 + k + s for k, s in SCRATCH}
               | {f"scratch/k={k},seed={s}": 60.0 + k for k, s in SCRATCH})  # fmt: skip
    cfg = make_cfg("stage=report", "run=r", "stage.metrics=[best_val_acc,top1]")
    cfg.out_dir = str(r.parent)
    report_run(cfg)
    for png in ("report_shots.png", "report_gain_shots.png"):
        assert (r / png).read_bytes()[:4] == b"\x89PNG"
    text = (r / "report.md").read_text()
    assert "## Shots curves" in text and "![report_shots.png](report_shots.png)" in text
    shots_table = text.split("### top1")[1]
    # distill top1 at 5 shots: 75, 76 -> 75.5 ± 0.7; gain over scratch (65, 65): +10.5 ± 0.7
    assert "| distill | 75.5 ± 0.7 (n=2) | 80.5 ± 0.7 (n=2) |" in shots_table
    assert "| distill | +10.5 ± 0.7 (n=2) | +10.5 ± 0.7 (n=2) |" in text.split("### Δ top1")[1]


def test_a_teacher_below_the_scratch_student_is_flagged(tmp_path, make_cfg):
    r = shots_run(tmp_path, teacher_val=45.0)  # above scratch at 5 shots (40, 44), below at 10
    jobs, configs = configs_of(r)
    weak = weak_teachers(configs, jobs)
    assert sorted(w.student for w in weak) == ["distill/k=10,seed=0", "distill/k=10,seed=1"]
    assert (weak[0].teacher_val, weak[0].scratch_val) == (45.0, 50.0)
    assert "scored 45.0 on validation, below the scratch student" in weak[0].note()
    cfg = make_cfg("stage=report", "run=r")
    cfg.out_dir = str(r.parent)
    report_run(cfg)
    text = (r / "report.md").read_text()
    assert "| 2 of 2 (!) |" in text and "| 0 of 2 |" in text
    assert "distill/k=10,seed=1: its teacher finetune/k=10,seed=1 scored 45.0" in text


def test_a_key_that_changes_with_the_shots_stays_on_one_curve(tmp_path):
    r = tmp_path / "outputs" / "r"
    for k, epochs in ((5, 300), (50, 100)):  # epochs scaled to the data: one value per shots
        for t in ("labeled", "target"):
            write_job(r, f"distill/k={k},t={t}", stage="distill", best=50.0 + k, shots=k,
                      epochs=epochs, kd={"name": "kd", "transfer": t})  # fmt: skip
    _, configs = configs_of(r)
    curves = {c.name: c.shots for c in shots_curves(configs)}
    assert curves == {"distill kd.transfer=labeled": [5, 50], "distill kd.transfer=target": [5, 50]}
    moving = moving_keys(configs)
    assert moving == {"distill": {"stage.epochs": {5: 300, 50: 100}}}
    assert moving_note(moving) == ["distill: stage.epochs changes with the shots (5: 300, 50: 100)"]


def test_stage_runs_takes_patterns(tmp_path):
    out = tmp_path / "outputs"
    for name in ("cs_k5_seed0", "cs_k5_seed1", "cs", "other"):
        (out / name).mkdir(parents=True)
    assert other_runs(out, ["cs_k*", "other"], "cs") == ["cs_k5_seed0", "cs_k5_seed1", "other"]
    with pytest.raises(Exception, match="pattern 'nope_\\*' matches no run"):
        other_runs(out, ["nope_*"], "cs")


def test_learning_curves_one_row_per_tag_and_markers_only_on_short_lines(tmp_path):
    rows = [{"epoch": e, "train_loss": 1 / e, "train_grad_norm": 2.0, "val_acc": e} for e in
            range(1, 60)]  # fmt: skip
    histories = {"pretrain": rows[:5], "distill/optimizer.lr=0.02": rows,
                 "distill/optimizer.lr=0.05": rows}  # fmt: skip
    assert curve_groups(histories) == {
        "pretrain": {"pretrain": rows[:5]},
        "distill": {"optimizer.lr=0.02": rows, "optimizer.lr=0.05": rows},
    }
    assert marker(5) == "." and marker(59) is None
    path = learning_curves(histories, tmp_path / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_a_real_multirun_over_shots_gives_curves(tmp_path):
    sweep = [CLI, "pretrain", "-m", "run=s", "dataset=glyphs_target", "dataset.shots=2,4",
             "seed=0,1", "model=cnn", "stage.epochs=1", "stage.batch_size=32"]  # fmt: skip
    done = subprocess.run(sweep, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([CLI, "report", "run=s"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "outputs" / "s"
    assert (run / "report_shots.png").is_file() and not (run / "report_gain_shots.png").exists()
    table = (run / "report.md").read_text().split("### val@best")[1]
    assert "| 2/class | 4/class |" in table and table.count("(n=2)") == 2
