"""The real console script in subprocesses: the four-stage chain, a multirun, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "distill-cli")
FAST = ["model=cnn", "stage.epochs=1", "stage.batch_size=32"]
TARGET = ["dataset=glyphs_target", "dataset.shots=3"]


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "160", **(env or {})},
    )  # fmt: skip


def ok(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = cli(*args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_four_stages_and_a_multirun_through_the_console_script(tmp_path):
    ok(
        "pretrain", "dataset=glyphs_source", "dataset.fraction=0.05", *FAST, cwd=tmp_path
    )  # no run=: a new timestamped run
    runs = [p for p in (tmp_path / "outputs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1
    finetune = ok("finetune", *TARGET, *FAST, cwd=tmp_path)  # continues the latest run
    assert f"continuing the most recent run '{runs[0].name}'" in finetune.stderr
    ok("distill", *TARGET, *FAST, f"run={runs[0].name}", cwd=tmp_path)
    ok("distill", "-m", *TARGET, *FAST, "kd.temperature=1,4", cwd=tmp_path)
    for t in (1, 4):
        assert (runs[0] / "distill" / f"kd.temperature={t}" / "best.pt").is_file()
    assert (runs[0] / "distill" / "best.pt").is_file()  # the single run is untouched
    out = ok("eval", cwd=tmp_path)
    assert "top1" in out.stdout and "kd.temperature=4" in out.stdout
    results = json.loads((runs[0] / "eval" / "metrics.json").read_text())
    assert set(results) == {"pretrain", "finetune", "distill", "distill/kd.temperature=1",
                            "distill/kd.temperature=4"}  # fmt: skip


@pytest.mark.parametrize(
    "args,message",
    [
        (["pretrain", "stage.epochs=-1"], "stage.epochs=-1 is invalid: expected an integer >= 0"),
        (["pretrain", "model=resnet9000"], "unknown model 'resnet9000'; valid: cnn"),
        (["pretrain", "dataset.shotz=3"], "shotz"),
        (["pretrain", "dataset.shots=3", "dataset.fraction=0.5"], "set only one of dataset.shots"),
        (["train"], "unknown command 'train'; valid: pretrain, finetune, distill, eval, export"),
        (["distill", "--help", "model=resnet9000"], "unknown model 'resnet9000'; valid: cnn"),
        (["finetune", "run=nothing-here"], "run `distill-cli pretrain run=nothing-here ...` first"),
        (["pretrain", "run=x", "dataset=glyphs_target", "dataset.shots=500"], "dataset.shots"),
        (
            [
                "pretrain",
                "run=x",
                "dataset=mnist",
                "dataset.download=false",
                "dataset.root=nowhere",
            ],
            "expected in nowhere",
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, args, message):
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = cli("finetune", "run=nothing-here", "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_lists_groups_without_importing_torch(tmp_path):
    proc = ok("--help", cwd=tmp_path)
    for group in ("model:", "dataset:", "stage:", "optimizer:", "device:", "kd:"):
        assert group in proc.stdout
    probe = "import sys, distill_cli.cli, distill_cli.config; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "False"
    )


HEAVY = ("torch", "torchvision", "numpy", "matplotlib", "rich.table", "rich.progress")
LOADED = """
import contextlib, io, sys
from distill_cli.cli import main
sys.argv = ["distill-cli", *sys.argv[1:]]
with contextlib.redirect_stdout(io.StringIO()):
    main()
print(",".join(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.parametrize("args", [[], ["--help"], ["distill", "--cfg", "job"]])
def test_help_and_cfg_job_load_no_torch_plots_or_tables(tmp_path, args):
    """Start-up time: what printing the help or the config needs is Hydra and the config."""
    code = LOADED.format(heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize("args", [["--help"], ["distill", "-h", "--resolve", "experiment=demo"]])
def test_help_reads_as_hydras_own(tmp_path, args):
    """--help composes the config once; another flag (-cn) leaves it to Hydra: same text."""
    assert ok(*args, cwd=tmp_path).stdout == ok(*args, "-cn", "config", cwd=tmp_path).stdout


def test_startup_benchmark_smoke(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "bench" / "startup.py"
    out = tmp_path / "startup.json"
    proc = subprocess.run([sys.executable, str(bench), "--runs", "1", "--warmup", "0", "--out",
                           str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())["startup"]
    assert set(report) == {"help", "cfg_job"}
    assert all(len(r["runs_s"]) == 1 and r["min_s"] <= r["median_s"] for r in report.values())


def test_cfg_job_prints_the_resolved_config(tmp_path):
    proc = ok("pretrain", "--cfg", "job", "model=resnet8x4", cwd=tmp_path)
    assert "name: resnet8x4" in proc.stdout and "name: pretrain" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_pretrain_sweep_without_run_makes_one_run(tmp_path):
    ok("pretrain", "-m", *TARGET, *FAST, "seed=0,1", cwd=tmp_path)
    runs = [p for p in (tmp_path / "outputs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1
    assert sorted(p.name for p in (runs[0] / "pretrain").iterdir()) == ["seed=0", "seed=1"]


def test_a_failed_job_does_not_stop_the_sweep(tmp_path):
    proc = subprocess.run(
        [CLI, "pretrain", "-m", "run=r", "dataset=glyphs_target", "model=cnn", "stage.epochs=1",
         "dataset.shots=5000,2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1 job(s) of the sweep failed (the others finished): dataset.shots=5000" in proc.stderr
    assert "Traceback" not in proc.stderr
    jobs = tmp_path / "outputs" / "r" / "pretrain"
    assert (jobs / "dataset.shots=2" / "best.pt").is_file()
    failed = json.loads((jobs / "dataset.shots=5000" / "manifest.json").read_text())
    assert failed["status"] == "failed"


def test_basic_sweep_jobs():
    """Guards the one use of Hydra internals (BasicSweeper.split_arguments) against upgrades."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from distill_cli.cli import basic_sweep_jobs

    parsed = OverridesParser.create().parse_overrides(["a=1,2", "b=3"])
    assert basic_sweep_jobs(parsed) == [["a=1", "b=3"], ["a=2", "b=3"]]
