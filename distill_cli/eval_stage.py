"""The eval and export stages: what a practitioner decides from, and a deployable student.

    distill-cli eval run=demo                                   # every checkpoint, two tables
    distill-cli eval run=m2u stage.datasets=[mnist,usps] dataset.root=../shared/data
    distill-cli export run=demo tag=distill format=onnx

``eval`` writes ``<run>/eval/metrics.json`` (quality, calibration, cost, and for each student
its teacher's numbers) and PNG plots; ``export`` writes ``<run>/export/<tag>.<ext>`` with a JSON
card holding everything needed to use it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distill_cli import checkpoint as ck
from distill_cli import console, rundir, runtime
from distill_cli.config import inherit_dataset
from distill_cli.data import BatchLoader, DataError, ImageFiles, Normalise, StreamLoader, convert
from distill_cli.evaluation import metrics, plots
from distill_cli.evaluation.aggregate import choose_baselines, collect_jobs, group, weak_teachers
from distill_cli.models import display_name
from distill_cli.stagefolder import Stage, StageError, running

log = logging.getLogger("distill_cli")

QUALITY_COLUMNS = [
    ("tag", "tag", ""), ("model", "model", ""), ("dataset", "dataset", ""),
    ("labels", "labels", ""), ("val_acc", "val", ".1f"), ("top1", "top1", ".1f"),
    ("top5", "top5", ".1f"), ("nll", "nll", ".3f"), ("ece", "ece", ".1f"),
    ("agreement", "agree", ".1f"), ("kept", "kept", ".1f"), ("best_epoch", "epoch", "d"),
]  # fmt: skip
COST_COLUMNS = [
    ("tag", "tag", ""), ("params", "params", ","), ("size_mb", "MiB", ".2f"),
    ("macs", "MACs", ",.0f"), ("latency_ms_p50", "ms p50", ".2f"),
    ("latency_ms_p95", "ms p95", ".2f"), ("throughput", "img/s", ",.0f"),
    ("params_ratio", "params/T", ".2f"), ("macs_ratio", "MACs/T", ".2f"),
    ("latency_ms_p50_ratio", "ms/T", ".2f"),
]  # fmt: skip


def evaluate_run(cfg: DictConfig, job_subdir: str | None = None) -> None:
    """Evaluate every checkpoint of the run (or ``stage.from``) on the test split(s)."""
    with running(cfg, job_subdir) as st:
        s = cfg.stage
        sources = [Path(s["from"])] if s["from"] else ck.stage_folders(st.run_dir)
        if not sources:
            raise StageError(
                f"run '{st.run_dir.name}' holds no checkpoints yet; train one first, e.g. "
                f"`distill-cli pretrain run={st.run_dir.name}`"
            )
        cache: dict[str, Any] = {}
        results = {}
        for source in sources:
            path = ck.find_checkpoint(source)
            results[_tag_of(path, st.run_dir)] = _evaluate(st, path, cache)
        _relate_students(results, cache)
        _flag_weak_teachers(st.run_dir, results)
        rundir.write_json(st.folder / "metrics.json", results, sort_keys=False)  # run order
        rows = [{"tag": tag, **r} for tag, r in results.items()]
        title = f"eval · run {st.run_dir.name}"
        console.print_table(f"{title} · quality on each checkpoint's test split", QUALITY_COLUMNS,
                            rows)  # fmt: skip
        console.print_table(f"{title} · cost on {st.device}, batch 1 latency", COST_COLUMNS, rows)
        if s.datasets:
            _print_matrix(title, results)
        if s.plots:
            _plots(st, results, cache)
        st.manifest.update(status="completed", finished=rundir.now(),
                           evaluated={k: r["checkpoint"] for k, r in results.items()})  # fmt: skip
        st.write_manifest()
        log.info("wrote %s", st.folder / "metrics.json")


def _tag_of(path: Path, run_dir: Path) -> str:
    """A checkpoint's name in eval tables: its folder relative to the run."""
    try:
        return path.parent.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def _evaluate(st: Stage, path: Path, cache: dict) -> dict[str, Any]:
    """Quality on its own test split (and the listed datasets), and cost, of one checkpoint."""
    s = st.cfg.stage
    ckpt = ck.load_checkpoint(path)
    model = ck.model_from_checkpoint(ckpt, path).to(st.device).eval()
    own = ckpt["dataset"]
    logits, labels = _logits(st, model, ckpt, own, cache)
    quality = metrics.classification_metrics(logits, labels, n_bins=s.calibration_bins)
    shape = (ckpt["model"]["in_channels"], ckpt["model"]["image_size"], ckpt["model"]["image_size"])
    cost = metrics.compression_metrics(
        model, shape, st.device, checkpoint=path, latency_runs=s.latency_runs,
        throughput_batch=s.throughput_batch,
    )  # fmt: skip
    cache[str(path.resolve())] = {"logits": logits, "labels": labels, "ckpt": ckpt}
    result = {
        **quality, **cost, "model": display_name(ckpt["model"]), "dataset": own["name"],
        "stage": ckpt["stage"], "best_epoch": ckpt["epoch"], "val_acc": ckpt["val_acc"],
        "checkpoint": str(path), "sha256": ck.sha256(path), "parent": _parent(path),
        **_budget(ckpt),
    }  # fmt: skip
    if s.datasets:
        result["by_dataset"] = {name: _cross_domain(st, model, ckpt, name, cache)
                                for name in s.datasets}  # fmt: skip
    log.info("%s: top-1 %.2f%% on %s", _tag_of(path, st.run_dir), quality["top1"], own["name"])
    return result


def _budget(ckpt: dict) -> dict[str, Any]:
    """The labelled images per class a checkpoint trained and selected with: "10+10" in tables."""
    budget = ckpt.get("budget")
    if not budget:  # written before budgets were recorded
        return {"labels": "?"}
    return {**budget, "labels": f"{budget['train_per_class']}+{budget['val_per_class']}"}


def _parent(path: Path) -> str | None:
    """The checkpoint a stage was built from (a student's teacher), from its manifest."""
    parent = rundir.parent_path(path.parent)
    return str(Path(parent).resolve()) if parent else None


def _logits(st: Stage, model, ckpt: dict, d: dict, cache: dict, class_map=None):
    """Test-split logits of ``model`` on dataset config ``d``, converted to the model's input."""
    loader, _ = _test_loader(st, ckpt, d, cache)
    logits, labels = metrics.collect_logits(model, loader, st.amp)
    if class_map is not None:  # dataset class -> model class; -1 drops the class
        mapping = torch.tensor(class_map)
        keep = mapping[labels] >= 0
        logits, labels = logits[keep], mapping[labels[keep]]
    return logits, labels


def _test_loader(st: Stage, ckpt: dict, d: dict, cache: dict) -> tuple[BatchLoader, list[str]]:
    """The test split of ``d`` (and its class names) at the checkpoint's input shape, cached."""
    m = ckpt["model"]
    key = json.dumps([d, ckpt["mean"], ckpt["std"], m["in_channels"], m["image_size"]],
                     sort_keys=True, default=str)  # fmt: skip
    if key not in cache:
        split = st.load_dataset(d, train=False)
        x = convert(split.x, m["image_size"], m["in_channels"])
        make_loader = StreamLoader if isinstance(x, ImageFiles) else BatchLoader
        norm = Normalise(ckpt["mean"], ckpt["std"])
        loader = make_loader(x, split.y, st.cfg.stage.eval_batch_size, norm, device=st.device)
        cache[key] = (loader, split.class_names)
    return cache[key]


def _cross_domain(st: Stage, model, ckpt: dict, name: str, cache: dict) -> dict[str, Any]:
    """Quality on another dataset, where its classes match the model's (by name or a mapping)."""
    d, _ = inherit_dataset(st.cfg.dataset, ckpt["dataset"])  # e.g. dataset.root set for eval
    d.update(name=name, classes=None, image_size=None, channels=None)
    if name == ckpt["dataset"]["name"]:
        d = ckpt["dataset"]
    _, names = _test_loader(st, ckpt, d, cache)
    class_map = (st.cfg.stage.class_map or {}).get(name)
    if class_map is None:
        if [_norm(n) for n in names] != [_norm(n) for n in ckpt["class_names"]]:
            return {"skipped": "classes differ; declare stage.class_map." + name}
    elif len(class_map) != len(names):
        raise DataError(f"stage.class_map.{name} has {len(class_map)} entries; {name} has "
                        f"{len(names)} classes")  # fmt: skip
    logits, labels = _logits(st, model, ckpt, d, cache, class_map)
    return metrics.classification_metrics(logits, labels, n_bins=st.cfg.stage.calibration_bins)


def _norm(name: str) -> str:
    """Class names compared across datasets: MNIST's '7 - seven' and USPS's '7' are one class."""
    return name.split(" - ")[0].strip().lower()


def _relate_students(results: dict, cache: dict) -> None:
    """For each distilled student: its teacher's numbers, agreement, kept accuracy, ratios."""
    by_path = {str(Path(r["checkpoint"]).resolve()): tag for tag, r in results.items()}
    for r in results.values():
        teacher_tag = by_path.get(r["parent"]) if r["stage"] == "distill" else None
        if teacher_tag is None:
            continue
        t = results[teacher_tag]
        mine, theirs = cache[str(Path(r["checkpoint"]).resolve())], cache[r["parent"]]
        if len(mine["labels"]) == len(theirs["labels"]) and torch.equal(
            mine["labels"], theirs["labels"]
        ):
            r["agreement"] = metrics.agreement(mine["logits"], theirs["logits"])
        r["teacher"] = teacher_tag
        r["kept"] = metrics.kept_accuracy(r["top1"], t["top1"])
        r.update(metrics.ratios(r, t))


def _flag_weak_teachers(run_dir: Path, results: dict) -> None:
    """Warn about each student whose teacher scored below the scratch student on validation."""
    jobs = collect_jobs(run_dir)
    configs = group(jobs)
    choose_baselines(configs)
    for w in weak_teachers(configs, jobs):
        if w.student in results:
            results[w.student]["teacher_below_scratch"] = {
                "teacher_val_acc": w.teacher_val, "scratch": w.scratch,
                "scratch_val_acc": w.scratch_val,
            }  # fmt: skip
            log.warning("%s", w.note())


def _print_matrix(title: str, results: dict) -> None:
    datasets = sorted({d for r in results.values() for d in r.get("by_dataset", {})})
    rows = []
    for tag, r in results.items():
        row: dict[str, Any] = {"tag": tag}
        for d in datasets:
            cell = r["by_dataset"].get(d, {})
            row[d] = cell.get("top1", "skipped" if "skipped" in cell else None)
        rows.append(row)
    columns = [("tag", "tag", "")] + [(d, d, "") for d in datasets]
    for row in rows:
        row.update({d: f"{v:.1f}" if isinstance(v, float) else v for d, v in row.items()
                    if d != "tag"})  # fmt: skip
    console.print_table(f"{title} · cross-domain top-1", columns, rows)


def _plots(st: Stage, results: dict, cache: dict) -> None:
    """Learning curves, accuracy against MACs and latency, and each student's confusion matrix."""
    out = st.folder
    histories = {}
    for tag, r in results.items():
        rows_file = Path(r["checkpoint"]).parent / "metrics.jsonl"
        if rows_file.is_file():
            histories[tag] = [json.loads(x) for x in rows_file.read_text().splitlines() if x]
    written = [plots.learning_curves(histories, out / "learning_curves.png")]
    points = [{"tag": tag, **r} for tag, r in results.items()]
    written.append(plots.tradeoff(points, "macs", out / "accuracy_vs_macs.png",
                                  xlabel="MACs per image (one forward pass)"))  # fmt: skip
    latency = f"latency at batch 1 on {st.device} (ms, median)"
    written.append(plots.tradeoff(points, "latency_ms_p50", out / "accuracy_vs_latency.png",
                                  xlabel=latency))  # fmt: skip
    for tag, r in results.items():
        if r["stage"] != "distill":
            continue
        entry = cache[str(Path(r["checkpoint"]).resolve())]
        name = "confusion_" + tag.replace("/", "__") + ".png"
        written.append(plots.confusion_matrix(
            entry["labels"], entry["logits"].argmax(1), entry["ckpt"]["class_names"], out / name,
            title=f"{tag}: {r['model']} on {r['dataset']} (test)",
        ))  # fmt: skip
    log.info("plots: %s", ", ".join(p.name for p in written))


def export_run(cfg: DictConfig, job_subdir: str | None = None) -> None:
    """Write one checkpoint (default: the run's ``distill`` student) as ONNX or TorchScript."""
    from distill_cli.evaluation.export import card_path, export_model, write_export_card

    runtime.setup_logging(None, console.log_handler())
    run, _ = ck.resolve_run(cfg.out_dir, cfg.run, new=False)
    run_dir = Path(cfg.out_dir) / run
    source = cfg.tag or "distill"
    path = ck.find_checkpoint(cfg.stage["from"] or run_dir / source)
    ckpt = ck.load_checkpoint(path)
    model = ck.model_from_checkpoint(ckpt, path)
    fmt = cfg.stage.format
    name = _tag_of(path, run_dir).replace("/", "__")
    target = run_dir / "export" / f"{name}.{'onnx' if fmt == 'onnx' else 'pt'}"
    m = ckpt["model"]
    shape = (m["in_channels"], m["image_size"], m["image_size"])
    try:
        info = export_model(model, target, fmt, shape, overwrite=cfg.overwrite)
    except FileExistsError:
        raise StageError(f"'{target}' exists; pass overwrite=true to replace it") from None
    info.update(source=str(path), source_sha256=ck.sha256(path), versions=rundir.versions())
    names, mean, std = ckpt["class_names"], ckpt["mean"], ckpt["std"]
    write_export_card(info, card_path(target), model_config=m, class_names=names, mean=mean,
                      std=std)  # fmt: skip
    console.print_summary("export", {
        "file": str(target), "format": fmt, "model": m["name"], "input": "x".join(map(str, shape)),
        "size_bytes": info["size_bytes"], "sha256": info["sha256"][:16] + "...",
        "max |pytorch - export|": info["max_abs_diff"],
    })  # fmt: skip
    runtime.close_logging()
