"""The jobs of a run as configurations: means and sample stds over seeds, and paired gains.

    distill-cli report run=demo      # the stage in report.py that prints and writes these

A job is a stage folder (config.yaml, manifest.json, and metrics.json once finished). Jobs of one
tag that differ only in their replicate (``seed`` and ``dataset.subset_seed``: initialisation,
batch order and the draw of the few labelled images) and in bookkeeping keys form one
configuration. A distilled student (or finetuned model) is compared, replicate by replicate, with
the model of its architecture trained from scratch on the same images. Everything here takes
plain arguments and reads only JSON and YAML: no torch, no Hydra.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill_cli.rundir import MANIFEST, flatten, read_json, read_manifest

NOT_JOBS = ("eval", "export", "report")  # stages whose folders hold no trained model
REPLICATE_KEYS = ("seed", "dataset.subset_seed")
BOOKKEEPING_KEYS = (
    "run",
    "tag",
    "out_dir",
    "overwrite",
    "stage.resume",
    "dataset.root",
    "dataset.download",
    "device.threads",
)
# Dataset keys that do not change which images are trained on (augmentation is part of the
# recipe, like the learning rate: scratch runs that differ there are all baseline candidates).
NOT_DATA_KEYS = ("subset_seed", "root", "download", "bad_images", "crop_padding", "flip")
FROM_TRAINING = ("best_val_acc", "last_val_acc", "best_epoch", "train_time_s", "params")
FROM_EVAL = ("top1", "top5", "nll", "ece", "agreement", "kept", "macs", "latency_ms_p50")
COMPARED_STAGES = ("distill", "finetune")  # each gets a paired gain over a scratch pretrain
SELECT_BY = "best_val_acc"  # picks the scratch baseline among several; never a test metric


@dataclass
class Stat:
    """Mean and sample standard deviation (None for fewer than two values) of n values."""

    mean: float | None
    std: float | None
    n: int


def summarize(values: Iterable[float | None]) -> Stat:
    """Mean and sample std (ddof=1) of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def paired_gain(ours: dict[Any, float | None], theirs: dict[Any, float | None]) -> Stat:
    """Mean ± std of ``ours[k] - theirs[k]`` over the keys both hold a value for."""
    both = [k for k in ours if ours[k] is not None and theirs.get(k) is not None]
    return summarize(ours[k] - theirs[k] for k in both)


@dataclass
class Job:
    """One stage folder of a run, finished or not."""

    folder: str  # the tag, then a multirun job's subfolder; "RUN:" first for an added run
    tag: str
    stage: str | None
    status: str  # the manifest's: completed, failed, interrupted, pruned (by a search), running
    config: dict[str, Any]  # the resolved config, flattened to dotted keys
    values: dict[str, float | None] = field(default_factory=dict)
    model: str | None = None
    parent: str | None = None  # the stage folder it started from (a student's teacher)
    error: str | None = None
    epochs: str | None = None  # "done/planned", for a job that did not finish
    finished: bool = False
    note: str | None = None
    started: str = "~"  # the manifest's ISO 8601 start time: sorts in time order
    labels: str = "?"  # labelled images per class, training + validation: "10+10"

    @property
    def failed(self) -> bool:
        """Failed or unfinished; a trial its search pruned is neither (it ended as asked)."""
        return not self.finished and self.status != "pruned"

    @property
    def replicate(self) -> tuple:
        """What repeats a configuration: (seed, dataset.subset_seed)."""
        return tuple(self.config.get(k) for k in REPLICATE_KEYS)

    @property
    def data(self) -> dict[str, Any]:
        """The dataset keys that decide which images it trains on, up to the replicate's draw."""
        return {
            k: v
            for k, v in self.config.items()
            if k.startswith("dataset.") and k.split(".", 1)[1] not in NOT_DATA_KEYS
        }


@dataclass
class Configuration:
    """The jobs of one tag and setting; they differ only in their replicate."""

    name: str
    setting: dict[str, Any]  # the config keys the jobs share, less replicate and bookkeeping
    jobs: list[Job]
    baseline: Configuration | None = None
    candidates: int = 0  # scratch configurations the baseline was chosen from

    @property
    def finished(self) -> list[Job]:
        """The jobs that completed and wrote metrics.json."""
        return [j for j in self.jobs if j.finished]

    @property
    def labels(self) -> str:
        """The labelled budgets of its finished jobs ("10+10"), joined where they differ."""
        return ", ".join(dict.fromkeys(j.labels for j in self.finished or self.jobs))

    @property
    def first(self) -> Job:
        """The job whose tag, stage, model and data stand for the configuration."""
        return (self.finished or self.jobs)[0]

    def stat(self, metric: str) -> Stat:
        """Mean ± std of one metric over the finished jobs."""
        return summarize(j.values.get(metric) for j in self.finished)

    def by_replicate(self, metric: str) -> dict[tuple, float | None]:
        """One metric of each finished job, keyed by its replicate."""
        return {j.replicate: j.values.get(metric) for j in self.finished}

    def pairs(self) -> int:
        """How many finished replicates this configuration shares with its baseline."""
        if self.baseline is None:
            return 0
        return len(set(self.by_replicate(SELECT_BY)) & set(self.baseline.by_replicate(SELECT_BY)))

    def gain(self, metric: str) -> Stat:
        """The paired gain over the baseline (an empty Stat without one)."""
        if self.baseline is None:
            return Stat(None, None, 0)
        return paired_gain(self.by_replicate(metric), self.baseline.by_replicate(metric))


# --- reading a run ------------------------------------------------------------------------------


def collect_jobs(run_dir: Path, prefix: str = "") -> list[Job]:
    """Every stage folder and multirun job of a run (hidden folders skipped), oldest first.

    ``prefix`` goes before each job's folder name (a run's name, for runs reported together).
    """
    evaluated = read_json(run_dir / "eval" / "metrics.json") or {}
    folders = {p.parent for name in ("config.yaml", MANIFEST) for p in run_dir.rglob(name)}
    folders = {
        f
        for f in folders
        if f != run_dir and not any(part.startswith(".") for part in f.relative_to(run_dir).parts)
    }
    jobs = [read_job(f, run_dir, evaluated, prefix) for f in sorted(folders)]
    return sorted((j for j in jobs if j is not None), key=lambda j: (j.started, j.folder))


def read_job(folder: Path, run_dir: Path, evaluated: dict, prefix: str = "") -> Job | None:
    """One job's config, status and metrics; test metrics from eval's entry when it is current.

    Returns None for the folders of eval, export and report, which hold no trained model.
    """
    rel = folder.relative_to(run_dir).as_posix()
    manifest = read_manifest(folder) or {}
    config = flatten(_read_yaml(folder / "config.yaml") or {})
    stage = manifest.get("stage") or config.get("stage.name")
    if stage in NOT_JOBS or rel.split("/")[0] in NOT_JOBS:
        return None
    final = read_json(folder / "metrics.json")
    history = _history(folder / "metrics.jsonl")
    status = manifest.get("status") or "no manifest"
    job = Job(
        prefix + rel,
        rel.split("/")[0],
        stage,
        status,
        config,
        finished=status == "completed" and isinstance(final, dict),
        started=str(manifest.get("started") or "~"),
    )
    job.values = {k: (final or {}).get(k) for k in FROM_TRAINING}
    job.labels = budget_text((final or {}) or (manifest.get("data") or {}))
    if job.values["last_val_acc"] is None and history:
        job.values["last_val_acc"] = history[-1].get("val_acc")
    entry = evaluated.get(rel)
    if entry and _current(entry, manifest):
        job.values.update({k: entry.get(k) for k in FROM_EVAL})
    elif entry:
        job.note = "eval/metrics.json measured an older checkpoint: re-run eval for test metrics"
    job.model = (final or {}).get("model") or (entry or {}).get("model")
    if job.model is None and stage != "finetune":  # a finetune's model comes from its parent
        job.model = config.get("model.name")
    raw = (manifest.get("parent") or {}).get("path")
    parent = _relative(raw, run_dir)
    job.parent = prefix + parent if parent and _inside(raw, run_dir) else parent
    if not job.finished:
        job.error = manifest.get("error") or ("no metrics.json" if status == "completed" else None)
        done = history[-1].get("epoch", len(history)) if history else 0
        job.epochs = f"{done}/{config.get('stage.epochs', '?')}"
    return job


def budget_text(record: dict) -> str:
    """The labelled images per class a job trained on (K) and selected with (V): "K+V"."""
    if record.get("train_per_class") is None:
        return "?"  # written before budgets were recorded
    return f"{record['train_per_class']}+{record['val_per_class']}"


def _current(entry: dict, manifest: dict) -> bool:
    """Whether eval measured the checkpoint the folder holds now (the sha256 it recorded)."""
    name = Path(str(entry.get("checkpoint", "best.pt"))).stem
    recorded = (manifest.get("checkpoints") or {}).get(name, {}).get("sha256")
    return recorded is None or entry.get("sha256") in (None, recorded)


def _relative(path: str | None, run_dir: Path) -> str | None:
    """A checkpoint's stage folder, relative to the run when it lies inside it."""
    if not path:
        return None
    folder = Path(path).parent
    try:
        return folder.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(folder)


def _inside(path: str | None, run_dir: Path) -> bool:
    """Whether a checkpoint path lies in the run folder."""
    return bool(path) and Path(path).resolve().is_relative_to(run_dir.resolve())


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _history(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


# --- configurations and baselines ---------------------------------------------------------------


def family(job: Job) -> tuple:
    """The config group choices of ``job`` (``kd.name``, ``model.name``, ...).

    Jobs of one family have the same config keys unless another version of distill-cli wrote
    some of them; a method's own keys (``kd.alpha`` of dkd) belong to its family.
    """
    return tuple(sorted((k, v) for k, v in job.config.items() if _chooses(k)))


def _chooses(key: str) -> bool:
    """Whether ``key`` names a config group's choice: ``kd.name``, ``model.name``, ..."""
    return key.count(".") == 1 and key.endswith(".name")


def partial_keys(jobs: list[Job]) -> dict[str, list[str]]:
    """Per tag, the config keys that only some jobs of one family have (another version's)."""
    out = {}
    for tag in dict.fromkeys(j.tag for j in jobs):
        families: dict[tuple, list[set[str]]] = {}
        for j in jobs:
            if j.tag == tag and j.config:
                families.setdefault(family(j), []).append(set(j.config))
        partial = sorted({k for keys in families.values()
                          for k in set.union(*keys) - set.intersection(*keys)})  # fmt: skip
        if partial:
            out[tag] = partial
    return out


def group(jobs: list[Job]) -> list[Configuration]:
    """Jobs grouped by tag and setting, each named by the keys that differ within its tag.

    Keys that only some jobs of one family have (:func:`partial_keys`) are left out. A key that
    only some families have (a method's own) counts where it is set: a configuration's name shows
    it when the jobs that have it differ in it. Names put the group choices first. Tags keep the
    order in which they first ran; a tag's configurations are sorted by the differing values
    (numbers as numbers).
    """
    drop = set(REPLICATE_KEYS + BOOKKEEPING_KEYS)
    partial = partial_keys(jobs)
    by_setting: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        ignore = drop | set(partial.get(job.tag, ()))
        setting = {k: v for k, v in job.config.items() if k not in ignore}
        by_setting.setdefault((job.tag, json.dumps(setting, sort_keys=True)), []).append(job)
    configs = []
    for tag in dict.fromkeys(j.tag for j in jobs):
        members = [(json.loads(s), js) for (t, s), js in by_setting.items() if t == tag]
        keys = sorted({k for s, _ in members for k in s}, key=lambda k: (not _chooses(k), k))
        differ = [k for k in keys if len({json.dumps(s[k]) for s, _ in members if k in s}) > 1]
        members.sort(key=lambda m: [_order(m[0].get(k)) for k in differ])
        for setting, js in members:
            shown = [f"{k}={_show(setting[k])}" for k in differ if k in setting]
            configs.append(Configuration(" ".join([tag, *shown]), setting, js))
    return configs


def choose_baselines(configs: list[Configuration]) -> None:
    """Give each distilled student and finetuned model its scratch baseline, in place.

    A candidate is a pretrain configuration with the same model, the same images and the same
    labelled budget (training + validation) that shares at least one finished replicate; among
    several, the best mean validation accuracy wins.
    """
    for c in configs:
        if c.first.stage not in COMPARED_STAGES:
            continue
        mine = set(c.by_replicate(SELECT_BY))
        candidates = [
            b
            for b in configs
            if b.first.stage == "pretrain"
            and b.first.model == c.first.model
            and _same(b.first.data, c.first.data)
            and _same_budget(b.labels, c.labels)
            and mine & set(b.by_replicate(SELECT_BY))
        ]
        if candidates:
            c.baseline = max(candidates, key=lambda b: _or(b.stat(SELECT_BY).mean, float("-inf")))
            c.candidates = len(candidates)


def _same_budget(a: str, b: str) -> bool:
    """Equal labelled budgets, or one unknown (a job of a version that did not record it)."""
    return a == b or "?" in (a, b)


def _same(a: dict, b: dict) -> bool:
    """Equal on the keys both have (configs of another version may lack newer keys)."""
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def _order(value: Any) -> tuple:
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if is_num else (1, 0, json.dumps(value))


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value).replace(" ", "")


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# --- teachers worth distilling from -------------------------------------------------------------


@dataclass
class WeakTeacher:
    """A distilled student's replicate whose teacher scored below the scratch student."""

    student: str  # the distill job's folder
    teacher: str  # its parent's folder
    scratch: str  # the scratch job of the same replicate
    teacher_val: float
    scratch_val: float

    def note(self) -> str:
        """One line telling a user that this teacher was not worth distilling from."""
        return (
            f"{self.student}: its teacher {self.teacher} scored {self.teacher_val:.1f} on "
            f"validation, below the scratch student {self.scratch} ({self.scratch_val:.1f}); "
            "a teacher weaker than the student alone rarely helps it and can pull it down"
        )


def weak_teachers(configs: list[Configuration], jobs: list[Job]) -> list[WeakTeacher]:
    """Distill jobs whose teacher's validation accuracy is below the paired scratch student's.

    A teacher that scores lower than the student trained alone, on the same validation images,
    rarely teaches it anything; often it pulls the student down. Only validation is compared
    (never test), and only where teacher and student trained on the same images and budget.
    """
    by_folder = {j.folder: j for j in jobs}
    found = []
    for c in configs:
        if c.first.stage != "distill" or c.baseline is None:
            continue
        scratch = {j.replicate: j for j in c.baseline.finished}
        for job in c.finished:
            teacher, alone = by_folder.get(job.parent or ""), scratch.get(job.replicate)
            if teacher is None or alone is None or not _same(teacher.data, job.data):
                continue
            t_val, s_val = teacher.values.get(SELECT_BY), alone.values.get(SELECT_BY)
            if teacher.labels == job.labels and _below(t_val, s_val):
                found.append(WeakTeacher(job.folder, teacher.folder, alone.folder, t_val, s_val))
    return found


def _below(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a < b
