"""The ``distill-cli`` command: a subcommand is sugar for ``stage=<name>`` on one Hydra app.

    distill-cli pretrain dataset=glyphs_source model=resnet8x4 run=demo
    distill-cli distill -m run=demo kd.temperature=1,4 seed=0,1
    distill-cli report run=demo
    distill-cli distill -m run=demo hydra/sweeper=distill_optuna hydra/launcher=local
    distill-cli distill -m run=demo hparams_search=kd_logit     # rerun to continue the study
    distill-cli pretrain --cfg job
    torchrun --nproc_per_node=4 -m distill_cli pretrain run=demo   # data parallel, 4 processes

Before Hydra runs a stage, every configuration the command line names (each job of a sweep
too) is composed and checked, so a bad value fails in one line, before torch is imported.
``--help`` composes the configuration once and fills Hydra's help template itself.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import string
import sys
import time
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from distill_cli.config import (
    RULES,
    RUN_NAME_FORMAT,
    STAGES,
    TORCHVISION_MODELS,
    ConfigError,
    check,
    conf_dir,
)

EXIT_USAGE = 2
_FAILED_ENV = "DISTILL_CLI_FAILED_JOBS"  # a multirun's jobs append their failures to this file
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C
_OWNER_ENV = "DISTILL_CLI_SWEEP_PID"  # the process that runs a multirun (its launcher's parent)
_SWEEP_ENV = "DISTILL_CLI_SWEEP_KEYS"  # tells multirun jobs (also in launcher processes) their keys
# Flags after which Hydra reads a value; their values are not overrides.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}  # fmt: skip
_PARALLEL_STAGES = ("pretrain", "finetune", "distill")  # the stages torchrun may run
# Flags that only print something: no stage runs, so no preflight.
_PRINT_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--version",
                "--shell-completion", "-sc", "--resolve"}  # fmt: skip
# Sweeper and launcher configs that need an optional package: (group, name) -> module, package.
# The Optuna sweeper itself ships with distill-cli (hydra_plugins/distill_optuna_sweeper).
_OPTUNA = ("optuna", "optuna")
_JOBLIB = ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher")
_SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
_PLUGINS = {
    ("hydra/sweeper", "distill_optuna"): _OPTUNA, ("hydra/sweeper", "optuna"): _OPTUNA,
    ("hparams_search", "*"): _OPTUNA,
    ("hydra/launcher", "local"): _JOBLIB, ("hydra/launcher", "joblib"): _JOBLIB,
    ("hydra/launcher", "slurm"): _SUBMITIT, ("hydra/launcher", "submitit_local"): _SUBMITIT,
    ("hydra/launcher", "submitit_slurm"): _SUBMITIT,
}  # fmt: skip
SEARCH_STAGES = ("pretrain", "finetune", "distill")  # the stages that return a validation accuracy


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra flags (with their values) from KEY=VALUE overrides."""
    flags, overrides, takes_value = [], [], False
    for arg in args:
        if takes_value or arg.startswith("-"):
            flags.append(arg)
            takes_value = not takes_value and arg in _VALUE_FLAGS and arg not in ("--info", "-i")
        else:
            overrides.append(arg)
    return flags, overrides


def _one_line(exc: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages, folded into one line."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        options = sorted(o for o in exc.options if not o.startswith("_"))  # _base: shared keys
        return f"unknown {group} '{name}'; valid: {', '.join(options)}"
    text = str(exc)
    if text.startswith("Could not override '"):  # a key that is not in the config
        key = text.split("'")[1]
        if key == "model.weights":
            return "model.weights applies to " + ", ".join(TORCHVISION_MODELS)
        if key.startswith("kd.") and key in RULES:  # another method's option
            return f"{key} is not an option of the chosen kd method; methods that have it: " + (
                ", ".join(_kd_methods_with(key[3:])) or "none"
            )
        near = difflib.get_close_matches(key, list(RULES), n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        return f"unknown key '{key}'; {hint}`distill-cli --help` lists every key"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type=",
                                                            "reference_type="))]  # fmt: skip
    return "; ".join(lines) or type(exc).__name__


def _kd_methods_with(option: str) -> list[str]:
    """The kd methods whose ``conf/kd/<name>.yaml`` has ``option``."""
    folder = Path(conf_dir()) / "kd"
    return sorted(p.stem for p in folder.glob("*.yaml") if option in OmegaConf.load(p))


def basic_sweep_jobs(parsed: list) -> list[list[str]]:
    """The overrides of each job the basic sweeper would launch, in its order.

    Hydra has no public API for this: it is the one use of Hydra's internals, kept here, and
    tests/test_cli.py::test_basic_sweep_jobs fails loudly if a Hydra upgrade moves or changes it.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper.split_arguments(parsed, None)[0]


def preflight(overrides: list[str], max_jobs: int = 256) -> None:
    """Compose and check the configuration of every job the overrides describe.

    A search sweeper (``hydra/sweeper=distill_optuna``) draws its trials while it runs; for it
    the fixed overrides are checked with every choice and both ends of every interval of the
    search space, one dimension at a time.

    Raises:
        ConfigError: naming the first bad key or value, in one line.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        choices = {o.key_or_group: o.get_value_element_as_str() for o in parsed
                   if not o.is_sweep_override()}  # fmt: skip
        _require_plugins(choices)
        search = _search_label(choices)
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            jobs = _search_jobs(parsed) if search else basic_sweep_jobs(parsed)
            for i, job in enumerate(jobs[:max_jobs]):
                cfg = compose(config_name="config", overrides=job)
                check(cfg)
                if search and i == 0:
                    _check_search(cfg, search)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf composition errors
        raise ConfigError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def _require_plugins(choices: dict[str, str]) -> None:
    """Refuse a sweeper or launcher whose package is not installed, naming the extra."""
    for group, name in choices.items():
        needs = _PLUGINS.get((group, name)) or (
            _PLUGINS.get((group, "*")) if name not in ("null", "None") else None
        )
        if needs and importlib.util.find_spec(needs[0]) is None:
            raise ConfigError(
                f"{group}={name} needs the {needs[1]} package: pip install 'distill-cli[sweep]'"
            )


def _search_label(choices: dict[str, str]) -> str | None:
    """How the command chose a search sweeper (``hparams_search=kd_logit``), or None."""
    if choices.get("hparams_search") not in (None, "null", "None"):
        return f"hparams_search={choices['hparams_search']}"
    sweeper = choices.get("hydra/sweeper", "basic")
    return None if sweeper == "basic" else f"hydra/sweeper={sweeper}"


def _search_jobs(parsed: list) -> list[list[str]]:
    """Jobs that probe a search space: the fixed overrides, then each dimension's extremes.

    The space is the sweeper's ``params`` from its YAML, updated by the command line: there
    ``KEY=interval(...)`` adds or replaces a dimension and ``KEY=VALUE`` fixes the key.
    """
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeper = compose(config_name="config", overrides=fixed, return_hydra_config=True).hydra.sweeper
    space = {str(k): f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()}
    for o in parsed:
        space[o.key_or_group] = o.input_line
        if not o.is_sweep_override():
            del space[o.key_or_group]
    dims = [(o.key_or_group, _extremes(o))
            for o in OverridesParser.create().parse_overrides(list(space.values()))]  # fmt: skip
    first = [f"{key}={values[0]}" for key, values in dims]
    jobs = [fixed + first]
    for i, (key, values) in enumerate(dims):
        jobs += [fixed + first[:i] + [f"{key}={v}"] + first[i + 1 :] for v in values[1:]]
    return jobs


def _extremes(override) -> list[str]:
    """Every value of a choice; the two ends of a range or an interval."""
    if override.is_interval_sweep():
        interval = override.value()
        return [str(interval.start), str(interval.end)]
    values = list(override.sweep_string_iterator())
    return values if override.is_choice_sweep() else [values[0], values[-1]]


def _check_search(cfg: DictConfig, search: str) -> None:
    """A search maximises the validation accuracy a training stage returns: both must exist."""
    if cfg.stage.name not in SEARCH_STAGES:
        raise ConfigError(
            f"{search} searches a training stage ({', '.join(SEARCH_STAGES)}); "
            f"{cfg.stage.name} returns no validation accuracy"
        )
    d = OmegaConf.to_container(cfg.dataset)  # ??? keys (dataset=upstream) come back as "???"
    held_out = d["val_per_class"] if d["val_per_class"] is not None else d["shots"]
    if held_out == 0 or (held_out is None and d["val_fraction"] == 0):
        raise ConfigError(
            f"{search} maximises validation accuracy: keep "
            "dataset.val_per_class > 0 (or, without dataset.shots, dataset.val_fraction > 0)"
        )


def _sweep_keys(overrides: list[str]) -> list[str]:
    """The keys a multirun sweeps over (``kd.temperature=1,4`` -> ``kd.temperature``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def _job_subdir() -> str | None:
    """In a multirun, the job's own folder, named by its swept values: ``kd.temperature=4,seed=1``.

    Jobs never share files; the keys every job shares are left out of the name. The trials of a
    search (any sweeper but Hydra's basic one) are numbered instead, ``trial=3``: their values
    are many-digit draws, and a draw may repeat. Each trial's config.yaml holds its values.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from distill_cli.evaluation.study import TrialRef, trial_folder

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    trial = TrialRef.from_env()  # the Optuna sweeper's trials: numbered by the shared study
    if trial is not None:
        return trial_folder(trial.number)
    if not str(hc.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return f"trial={hc.job.num}"
    swept = set(filter(None, os.environ.get(_SWEEP_ENV, "").split(";")))
    parts = [o for o in hc.overrides.task if o.split("=", 1)[0] in swept]
    name = ",".join(parts) if parts else hc.job.override_dirname
    return name.replace("/", "_") or f"job{hc.job.num}"


_job_ended = None  # threading.Event of a launcher's worker process: set while no job runs in it


def _stop_with_the_sweep() -> None:
    """In a launcher's worker process, stop the job and the worker once the sweep's owner is gone.

    A killed multirun would otherwise leave its joblib workers training on. The worker sends
    itself SIGTERM: the job saves ``last.pt`` and ends as interrupted, resumable like any other;
    then the worker process exits. The watch starts with the worker's first job and serves all
    of them; each job marks itself running here and ended in :func:`_task`.
    """
    global _job_ended
    if _job_ended is None:
        owner = int(os.environ.get(_OWNER_ENV, "0"))
        if owner in (0, os.getpid()) or os.getppid() != owner:
            return
        import signal
        import threading

        ended = _job_ended = threading.Event()

        def watch() -> None:
            while os.getppid() == owner:
                time.sleep(1.0)
            if not ended.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                ended.wait()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)

        threading.Thread(target=watch, name="sweep-owner", daemon=True).start()
    _job_ended.clear()


def _launched() -> bool:
    """Whether torchrun started this process as one of several (read without importing torch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _first_process() -> bool:
    """Process 0 of a torchrun, or a single process: the one that prints errors."""
    return os.environ.get("RANK", "0") == "0"


def _task(cfg: DictConfig) -> float | str | None:
    """The Hydra task: run one stage; user errors end in one line and exit code 2.

    In a multirun a failed job does not stop the sweep: its error is printed and recorded, the
    sweeper gets NaN, the other jobs run, and the command exits 1 at the end. Under torchrun
    every process runs the stage in one process group; process 0 prints.
    """
    if _launched() and cfg.stage.name not in _PARALLEL_STAGES:
        _exit_usage(f"{cfg.stage.name} runs in a single process: run it without torchrun")
    if cfg.stage.name == "report":  # reads JSON and YAML only: this path never imports torch
        from distill_cli.evaluation.report import ReportError, report_run

        try:
            return report_run(cfg, _job_subdir())
        except ReportError as exc:
            return _user_error(exc)
    _stop_with_the_sweep()
    from distill_cli import distributed, runtime
    from distill_cli.console import print_error
    from distill_cli.evaluation.study import PRUNED
    from distill_cli.search import TrialPruned
    from distill_cli.stagefolder import USER_ERRORS
    from distill_cli.stages import run_stage
    from distill_cli.training import Interrupted

    try:
        distributed.init(runtime.pick_device(cfg.device.name))
        result = run_stage(cfg, _job_subdir())
        distributed.shutdown(together=True)
        return result
    except TrialPruned as exc:  # the search's pruner stopped this trial: not a failure
        logging.getLogger("distill_cli").info("%s: %s", _job_subdir(), exc)
        return PRUNED
    except USER_ERRORS as exc:
        return _user_error(exc)
    except (Interrupted, KeyboardInterrupt) as exc:
        where = f"{exc}; " if str(exc) else ""
        if distributed.is_main():
            print_error(f"interrupted: {where}run the same command with stage.resume=true to "
                        "continue")  # fmt: skip
        sys.exit(EXIT_INTERRUPTED)
    finally:
        distributed.shutdown()
        if _job_ended is not None:
            _job_ended.set()


def _user_error(exc: Exception) -> float:
    """Print one line; exit 2, or in a multirun record the failed job and return NaN."""
    from distill_cli.console import print_error

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    job = _job_subdir()
    failed = os.environ.get(_FAILED_ENV)
    if _first_process():  # under torchrun the others met the same error, or stopped because of it
        print_error(f"{job}: {exc}" if job and failed else str(exc))
    if not failed:
        sys.exit(EXIT_USAGE)
    with open(failed, "a", encoding="utf-8") as f:  # jobs may run in other processes
        f.write(f"{job}: {exc}\n")
    return float("nan")


def _report_failures(path: str) -> None:
    """After a multirun: name the jobs that failed and exit 1 if any did."""
    from distill_cli.console import print_error

    lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).exists() else []
    Path(path).unlink(missing_ok=True)
    if lines:
        print_error(f"{len(lines)} job(s) of the sweep failed (the others finished): "
                    + "; ".join(line.split(":")[0] for line in lines))  # fmt: skip
        sys.exit(1)


def main() -> None:
    """Console entry point: ``distill-cli <stage> [overrides] [Hydra flags]``."""
    args = sys.argv[1:]
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if not args:
        args = ["--help"]
    if args[0] == "export":  # `export ... format=onnx` is short for stage.format=onnx
        args = [f"stage.{a}" if a.startswith("format=") else a for a in args]
    if args[0] in STAGES:
        args = [f"stage={args[0]}", *args[1:]]
    elif not (args[0].startswith("-") or "=" in args[0]):
        _exit_usage(f"unknown command '{args[0]}'; valid: {', '.join(STAGES)}")
    flags, overrides = _split(args)
    if _print_help(flags, overrides):
        return
    if not _PRINT_FLAGS.intersection(flags):
        try:
            preflight(overrides)
        except ConfigError as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _exit_usage(str(exc))  # under torchrun every process finds the same error
    if "-m" in flags or "--multirun" in flags:
        if _launched():
            _exit_usage("sweeps (-m) do not run under torchrun: start one torchrun per job")
        os.environ[_SWEEP_ENV] = ";".join(_sweep_keys(overrides))
        os.environ[_OWNER_ENV] = str(os.getpid())
        stage = next((o[6:] for o in overrides if o.startswith("stage=")), "pretrain")
        if stage == "pretrain" and not any(o.startswith("run=") for o in overrides):
            overrides.append(f"run={time.strftime(RUN_NAME_FORMAT)}")  # one new run for all jobs
    sys.argv = [sys.argv[0], *flags, *overrides]  # argparse wants the overrides together
    multirun = "-m" in flags or "--multirun" in flags
    if multirun:
        import tempfile

        fd, failed = tempfile.mkstemp(prefix="distill-cli-failed-", suffix=".txt")
        os.close(fd)
        os.environ[_FAILED_ENV] = failed
    hydra.main(config_path=conf_dir(), config_name="config", version_base=None)(_task)()
    if multirun:
        _report_failures(failed)


def _exit_usage(message: str) -> NoReturn:
    """Print one error line (from process 0 alone under torchrun) and exit 2."""
    from distill_cli.console import print_error

    if _first_process():
        print_error(message)
    sys.exit(EXIT_USAGE)


def _print_help(flags: list[str], overrides: list[str]) -> bool:
    """``--help``: print conf/hydra/help's template as Hydra would, composing the config once.

    Hydra lists the groups by copying its config repository about a hundred times: most of the
    0.7 s its ``--help`` took. Where more than conf/ could change the text (other flags, another
    search path or ConfigStore group, Hydra's other template fields), this returns False and
    Hydra prints the help; tests/test_cli.py holds the two texts equal.
    """
    if not {"--help", "-h"} & set(flags) or not set(flags) <= {"--help", "-h", "--resolve"}:
        return False
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import flag_override

    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            search_path = GlobalHydra.instance().config_loader().get_search_path()
            paths = {p.path for p in search_path.get_path()}
    except Exception as exc:  # a bad override: one line, as for any other command
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return False
        _exit_usage(_one_line(exc))
    finally:
        GlobalHydra.instance().clear()
    known = {"pkg://hydra.conf", "structured://", conf_dir(), f"file://{conf_dir()}"}
    stored = [k for k in ConfigStore.instance().list("") if k != "hydra" and "." not in k]
    if cfg.hydra.searchpath or stored or paths - known:
        return False
    template = cfg.hydra.help.template
    with flag_override(cfg, ["struct", "readonly"], [False, False]):
        del cfg["hydra"]
    try:
        text = string.Template(template).substitute(
            APP_CONFIG_GROUPS=_config_groups(),
            CONFIG=OmegaConf.to_yaml(cfg, resolve="--resolve" in flags),
        )
    except (KeyError, ValueError):  # $FLAGS_HELP, $HYDRA_CONFIG_GROUPS: Hydra's to fill
        return False
    print(text)
    return True


def _config_groups() -> str:
    """Hydra's ``$APP_CONFIG_GROUPS`` for conf/: each folder of YAML files outside hydra/."""
    root = Path(conf_dir())
    groups: dict[str, list[str]] = {}
    for path in root.rglob("*.yaml"):
        group = path.parent.relative_to(root).as_posix()
        if group != "." and group.split("/")[0] != "hydra" and path.is_file():
            groups.setdefault(group, []).append(path.stem)
    return "".join(f"{g}: {', '.join(sorted(o))}\n" for g, o in sorted(groups.items()))


if __name__ == "__main__":
    main()
