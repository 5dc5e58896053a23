"""The stage folder a stage writes: claiming it safely, resuming it, and closing it.

    distill-cli pretrain run=demo                      # outputs/demo/pretrain/
    distill-cli pretrain run=demo stage.resume=true    # continue an interrupted run there

A folder is claimed under a lock (a second writer is refused), never silently reused: results
are kept unless ``overwrite=true`` moves them aside, and an unfinished run is offered a resume.
Under torchrun, process 0 claims the folder and writes in it; the others only read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distill_cli import checkpoint as ck
from distill_cli import console, distributed, rundir, runtime
from distill_cli.config import ConfigError, StageError, inherit_dataset, inherits_dataset
from distill_cli.data import DataError, Split, load_dataset
from distill_cli.trackers import Tracker, TrackerError, open_tracker
from distill_cli.training import Interrupted, TrainingError

log = logging.getLogger("distill_cli")
# Keys a resumed run may change: they change neither the data nor the training (logger.* too).
_NOT_COMPARED = {"stage.resume", "stage.save_every_s", "overwrite", "dataset.cache",
                 "dataset.workers"}  # fmt: skip
_TRACKED = ("pretrain", "finetune", "distill")  # the stages whose epochs a tracker records


# Errors whose one-line message is all a user needs: no traceback for these.
USER_ERRORS = (
    StageError, ConfigError, DataError, ck.CheckpointError, runtime.DeviceError,
    rundir.FolderLocked, TrainingError, TrackerError,
)  # fmt: skip


@dataclass
class Stage:
    """What every stage holds while it runs."""

    cfg: DictConfig
    run_dir: Path
    folder: Path
    device: torch.device
    manifest: dict = field(default_factory=dict)
    resume: dict | None = None  # the last.pt checkpoint to continue from, until it is used
    tracker: Tracker = field(default_factory=Tracker)  # logger=...: gets each epoch's metrics
    main: bool = True  # False in torchrun's other processes: they write nothing
    parent: tuple[Path, dict] | None = None  # the parent checkpoint, once read for its dataset

    def amp(self):
        """The autocast context configured for this device."""
        return runtime.autocast(self.device, self.cfg.device.amp, self.cfg.device.amp_dtype)

    def load_dataset(self, d: Mapping[str, Any], train: bool) -> Split:
        """The train or test split a dataset config names (``data.load_dataset``).

        ``d`` is ``cfg.dataset``, or a checkpoint's copy of it (older ones lack newer keys).
        """
        return load_dataset(d, train, self.cfg.out_dir)

    def read_parent(self, stage: str) -> tuple[Path, dict]:
        """The checkpoint this stage builds on, recorded as the manifest's parent.

        Found from ``stage.from`` or the run folder (``rundir.stage_input``); the copy read
        before the claim to inherit its dataset is reused, not read twice.
        """
        path = rundir.stage_input(self.run_dir, stage, self.cfg.stage["from"])
        read = self.parent is not None and self.parent[0] == path
        ckpt = self.parent[1] if read else ck.load_checkpoint(path)
        self.parent = None
        self.manifest["parent"] = {"path": str(path), "sha256": ck.sha256(path)}
        self.write_manifest()
        return path, ckpt

    def write_manifest(self) -> None:
        """Persist the manifest (called after every change worth keeping)."""
        if self.main:
            rundir.write_manifest(self.folder, self.manifest)

    def write_json(self, name: str, data: Any) -> str:
        """Write ``data`` into the folder as JSON; return the file's sha256 (on every process)."""
        blob = rundir.json_bytes(data)
        if self.main:
            rundir.atomic_write(self.folder / name, lambda f: f.write(blob))
        return hashlib.sha256(blob).hexdigest()


@contextmanager
def running(cfg: DictConfig, job_subdir: str | None) -> Iterator[Stage]:
    """Open the stage folder for the duration of a stage; record how the stage ended."""
    st = open_stage(cfg, job_subdir)
    try:
        if st.main:  # torchrun: process 0 alone reports to the tracker
            st.tracker = _open_tracker(st)
        yield st
    except BaseException as exc:
        fail(st, exc)
        raise
    finally:
        close(st)


def open_stage(cfg: DictConfig, job_subdir: str | None) -> Stage:
    """Resolve run and folder, claim the folder, set up logging, device and seeds.

    Under torchrun process 0 does this and tells the others where the folder is.
    """
    if not distributed.is_main():
        return _follow(cfg, distributed.share(None))
    try:
        st = _open(cfg, job_subdir)
    except BaseException:
        distributed.share(None)  # the others stop too
        raise
    dataset = OmegaConf.to_container(cfg.dataset)
    distributed.share((st.run_dir, st.folder, st.resume is not None, dataset))
    return st


def _open(cfg: DictConfig, job_subdir: str | None) -> Stage:
    name = cfg.stage.name
    run, inferred = rundir.resolve_run(cfg.out_dir, cfg.run, new=name == "pretrain")
    run_dir = Path(cfg.out_dir) / run
    folder = run_dir / (cfg.tag or name) / (job_subdir or "")
    data_origin, parent = _resolve_dataset(cfg, run_dir)  # before the claim: resume compares
    resume, replaced = _claim(cfg, folder, run_dir)
    rundir.mark_latest(cfg.out_dir, run)
    runtime.setup_logging(folder / "stage.log", console.log_handler())
    if inferred:
        how = "new run" if name == "pretrain" else "continuing the most recent run"
        log.info("%s '%s' (pass run=NAME to choose)", how, run)
    log.info("%s -> %s", name, folder)
    log.info(data_origin)
    if replaced:
        log.info("moved the previous results to %s", replaced)
    device = distributed.device() or runtime.pick_device(cfg.device.name)
    runtime.setup_torch(cfg.seed, cfg.device.deterministic, cfg.device.threads)
    st = Stage(cfg, run_dir, folder, device, resume=resume, parent=parent)
    if distributed.world() > 1:
        log.info("data parallel: %d processes (torchrun), each trains on 1/%d of every batch",
                 distributed.world(), distributed.world())  # fmt: skip
    if resume is None:
        OmegaConf.save(cfg, folder / "config.yaml", resolve=True)
        st.manifest = rundir.new_manifest(name, cfg.tag or name, run, cfg.seed, device)
    else:
        state = resume["train_state"]
        log.info("resuming from last.pt: epoch %d, step %d", state["epoch"], state["step"])
        st.manifest = json.loads(rundir.manifest_path(folder).read_text())
        st.manifest.setdefault("resumed", []).append(
            {"at": rundir.now(), "epoch": state["epoch"], "step": state["step"]}
        )
        st.manifest.update(status="running", device=str(device))
    if distributed.world() > 1:
        st.manifest["processes"] = distributed.world()
    st.write_manifest()
    return st


def _resolve_dataset(cfg: DictConfig, run_dir: Path) -> tuple[str, tuple[Path, dict] | None]:
    """Fill ``dataset=upstream``'s keys from the parent checkpoint; say where the data comes from.

    finetune and distill read their parent's dataset config (keys set on the command line win);
    eval and export evaluate or check each checkpoint on its own dataset.

    Returns:
        (the log line, the parent checkpoint read for it, which the stage then loads no more)
    """
    name = cfg.stage.name
    if name in ("eval", "export"):
        return "dataset: each checkpoint's own, as it was trained on", None
    if not inherits_dataset(cfg):
        line = f"dataset: {_describe(cfg.dataset)}, as configured (dataset={cfg.dataset.name})"
        return line, None
    path = rundir.stage_input(run_dir, name, cfg.stage["from"])
    parent = ck.load_checkpoint(path)
    dataset, own = inherit_dataset(cfg.dataset, parent["dataset"])
    cfg.dataset = dataset
    mine = f"; set here: {', '.join('dataset.' + k for k in own)}" if own else ""
    line = f"dataset: {_describe(cfg.dataset)}, from the parent checkpoint {path}{mine}"
    return line, (path, parent)


def _describe(d: DictConfig) -> str:
    """A dataset config in a few words: name, classes, labelled images and their draw."""
    words = [str(d.name)]
    if d.classes is not None:
        words.append(f"classes {list(d.classes)}")
    if d.shots is not None:
        words.append(f"{d.shots} shots/class")
    elif d.fraction is not None:
        words.append(f"fraction {d.fraction}")
    words.append(f"subset_seed {d.subset_seed}")
    return " ".join(words)


def _open_tracker(st: Stage) -> Tracker:
    """The experiment tracker ``logger`` selects, for a training stage; its run id is kept."""
    opts = dict(st.cfg.get("logger") or {"name": "none"})
    kind = opts.pop("name")
    if kind == "none" or st.cfg.stage.name not in _TRACKED:
        return Tracker()
    if st.resume is not None:  # continue the tracker run; drop the epochs trained again
        state = st.resume["train_state"]
        done = state["epoch"] if state["step"] == 0 else state["epoch"] - 1
        opts.update(purge_step=done + 1, run_id=st.manifest.get("tracker", {}).get("run_id"))
    opts.update(experiment=opts.get("experiment") or st.run_dir.name,
                tags={"distill_cli.stage": st.cfg.stage.name})  # fmt: skip
    config = OmegaConf.to_container(st.cfg, resolve=True)
    tracker = open_tracker(kind, st.folder, st.folder.relative_to(st.run_dir).as_posix(), config,
                           **opts)  # fmt: skip
    st.manifest["tracker"] = {"name": kind, "run_id": tracker.run_id}
    st.write_manifest()
    return tracker


def _follow(cfg: DictConfig, shared: tuple | None) -> Stage:
    """Another torchrun process: the folder process 0 claimed, read only; it logs errors only."""
    if shared is None:  # process 0 failed and says why
        raise StageError("process 0 could not open the stage folder")
    run_dir, folder, resumed, dataset = shared
    cfg.dataset = dataset  # the dataset process 0 resolved
    runtime.setup_logging(None, console.log_handler())
    log.setLevel(logging.ERROR)
    device = distributed.device() or runtime.pick_device(cfg.device.name)
    runtime.setup_torch(cfg.seed, cfg.device.deterministic, cfg.device.threads)
    resume = ck.load_checkpoint(folder / "last.pt") if resumed else None
    manifest = {"parent": None, "data": None, "checkpoints": {}}  # filled in memory, never written
    return Stage(cfg, run_dir, folder, device, manifest, resume, main=False)


def _claim(cfg: DictConfig, folder: Path, run_dir: Path) -> tuple[dict | None, Path | None]:
    """Make ``folder`` ours: refuse, move aside, or prepare a resume. Returns (resume, moved)."""
    resume = moved = None
    if folder.exists():
        rundir.check_unlocked(folder)
    used = folder.exists() and (rundir.has_results(folder) or rundir.manifest_path(folder).exists())
    wants_resume = bool(cfg.stage.get("resume", False))
    if used and not wants_resume and _unfinished(folder) and _ask_resume(folder):
        wants_resume = True
    if wants_resume:
        resume = _resume_point(cfg, folder)
    elif used and (cfg.overwrite or cfg.stage.name == "eval" or not rundir.has_results(folder)):
        # eval results are derived; an attempt that failed before any checkpoint holds only its
        # log and manifest, kept in .replaced/ for reading
        moved = rundir.move_aside(folder, run_dir)
    elif used:
        hint = "pass tag=NEW_TAG to write elsewhere, or overwrite=true to move it into .replaced/"
        if _unfinished(folder):
            raise StageError(
                f"'{folder}' holds an unfinished run ({_progress(folder)}): pass "
                "stage.resume=true to continue it; or " + hint
            )
        raise StageError(f"'{folder}' already holds results; {hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        rundir.lock_folder(folder)
    except (NotADirectoryError, PermissionError, FileExistsError, OSError) as exc:
        if isinstance(exc, rundir.FolderLocked):
            raise
        raise StageError(f"cannot write the stage folder '{folder}': {exc.strerror}") from None
    if resume is not None:
        _truncate_metrics(folder / "metrics.jsonl", resume["train_state"])
    return resume, moved


def _unfinished(folder: Path) -> bool:
    """A folder whose run stopped before its last epoch and left a resumable last.pt."""
    try:
        status = json.loads(rundir.manifest_path(folder).read_text()).get("status")
    except (OSError, ValueError):
        return False
    return status != "completed" and (folder / "last.pt").is_file()


def _progress(folder: Path) -> str:
    manifest = json.loads(rundir.manifest_path(folder).read_text())
    epoch = manifest.get("checkpoints", {}).get("last", {}).get("epoch")
    return f"status {manifest.get('status')}, last checkpoint at epoch {epoch}"


def _ask_resume(folder: Path) -> bool:
    """At a terminal, offer to resume an unfinished run; elsewhere, never guess."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    from rich.prompt import Confirm

    return Confirm.ask(f"'{folder}' holds an unfinished run ({_progress(folder)}). Resume it?",
                       console=console.err, default=True)  # fmt: skip


def _resume_point(cfg: DictConfig, folder: Path) -> dict:
    """The last.pt to continue from, after checking the run is unfinished and configured alike."""
    if not (folder / "last.pt").is_file():
        raise StageError(f"nothing to resume in '{folder}': it holds no last.pt")
    if not _unfinished(folder):
        raise StageError(f"'{folder}' finished all its epochs; nothing to resume")
    old = OmegaConf.load(folder / "config.yaml")
    for key, (was, now) in _differences(old, cfg).items():
        raise StageError(
            f"cannot resume '{folder}' with a different configuration: {key} was {was!r}, now "
            f"{now!r}; use the original values, or start anew with overwrite=true"
        )
    ckpt = ck.load_checkpoint(folder / "last.pt")
    if not ckpt.get("train_state"):
        raise StageError(f"'{folder / 'last.pt'}' holds no training state to resume from")
    return ckpt


def _differences(old: DictConfig, new: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two configs, except those a resume may change."""
    flat = [rundir.flatten(OmegaConf.to_container(c, resolve=True), skip=("hydra",))
            for c in (old, new)]  # fmt: skip
    keys = {k for k in flat[0].keys() | flat[1].keys() if not k.startswith("logger.")}
    keys -= _NOT_COMPARED
    pairs = {k: (flat[0].get(k), flat[1].get(k)) for k in sorted(keys)}
    return {k: pair for k, pair in pairs.items() if pair[0] != pair[1]}


def _truncate_metrics(path: Path, state: dict) -> None:
    """Drop rows of epochs after the resume point: they will be trained again."""
    if not path.is_file():
        return
    done = state["epoch"] if state["step"] == 0 else state["epoch"] - 1
    rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["epoch"] <= done]
    rundir.atomic_write(path, lambda f: f.write("".join(r + "\n" for r in rows).encode()))


def finish(st: Stage, summary: dict) -> float | None:
    """Write the final metrics, complete the manifest, print the summary table."""
    if not st.main:
        return summary.get("best_val_acc")
    rundir.write_json(st.folder / "metrics.json", summary)
    st.manifest.update(status="completed", finished=rundir.now())
    st.write_manifest()
    title = f"{st.cfg.stage.name} · {st.folder}"
    console.print_summary(title, {k: v for k, v in summary.items() if k != "stage"})
    return summary.get("best_val_acc")


def fail(st: Stage, exc: BaseException) -> None:
    """Record a failure or an interruption in the manifest; checkpoints already written stay."""
    stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
    reason = str(exc) or type(exc).__name__
    status = getattr(exc, "status", "interrupted") if stopped else "failed"  # or "pruned"
    st.manifest.update(status=status, finished=rundir.now(), error=reason)
    st.write_manifest()
    if not (stopped or isinstance(exc, USER_ERRORS)):
        log.exception("stage failed")


def close(st: Stage) -> None:
    """End the tracker run, release the folder's lock, flush the log file (safe to call twice)."""
    st.tracker.close(st.manifest.get("status", "failed"))
    rundir.unlock_folder(st.folder)
    runtime.close_logging()
