"""The ``distill-cli`` command: a subcommand is sugar for ``stage=<name>`` on one Hydra app.

    distill-cli pretrain dataset=glyphs_source model=resnet8x4 run=demo
    distill-cli distill -m run=demo kd.temperature=1,4 seed=0,1
    distill-cli report run=demo
    distill-cli pretrain --cfg job
    torchrun --nproc_per_node=4 -m distill_cli pretrain run=demo   # data parallel, 4 processes

Before Hydra runs a stage, every configuration the command line names (each job of a sweep
too) is composed and checked, so a bad value fails in one line, before torch is imported.
"""

from __future__ import annotations

import difflib
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distill_cli.config import (
    RULES,
    RUN_NAME_FORMAT,
    STAGES,
    TORCHVISION_MODELS,
    ConfigError,
    check,
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C
_SWEEP_ENV = "DISTILL_CLI_SWEEP_KEYS"  # tells multirun jobs (also in launcher processes) their keys
# Flags after which Hydra reads a value; their values are not overrides.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}  # fmt: skip
_PARALLEL_STAGES = ("pretrain", "finetune", "distill")  # the stages torchrun may run
# Flags that only print something: no stage runs, so no preflight.
_PRINT_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--version",
                "--shell-completion", "-sc", "--resolve"}  # fmt: skip


def conf_dir() -> str:
    """The ``conf/`` folder: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"distill-cli's conf/ folder is missing next to {here}")


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
        near = difflib.get_close_matches(key, list(RULES), n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        return f"unknown key '{key}'; {hint}`distill-cli --help` lists every key"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type=",
                                                            "reference_type="))]  # fmt: skip
    return "; ".join(lines) or type(exc).__name__


def preflight(overrides: list[str], max_jobs: int = 256) -> None:
    """Compose and check the configuration of every job the overrides describe.

    Raises:
        ConfigError: naming the first bad key or value, in one line.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            for job in jobs[:max_jobs]:
                check(compose(config_name="config", overrides=job))
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf composition errors
        raise ConfigError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def _sweep_keys(overrides: list[str]) -> list[str]:
    """The keys a multirun sweeps over (``kd.temperature=1,4`` -> ``kd.temperature``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def _job_subdir() -> str | None:
    """In a multirun, the job's own folder, named by its swept values: ``kd.temperature=4,seed=1``.

    Jobs never share files; the keys every job shares are left out of the name.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    swept = set(filter(None, os.environ.get(_SWEEP_ENV, "").split(";")))
    parts = [o for o in hc.overrides.task if o.split("=", 1)[0] in swept]
    name = ",".join(parts) if parts else hc.job.override_dirname
    return name.replace("/", "_") or f"job{hc.job.num}"


def _launched() -> bool:
    """Whether torchrun started this process as one of several (read without importing torch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _first_process() -> bool:
    """Process 0 of a torchrun, or a single process: the one that prints errors."""
    return os.environ.get("RANK", "0") == "0"


def _task(cfg: DictConfig) -> float | None:
    """The Hydra task: run one stage; user errors end in one line and exit code 2.

    Under torchrun every process runs the stage in one process group; process 0 prints.
    """
    from distill_cli.console import print_error

    if _launched() and cfg.stage.name not in _PARALLEL_STAGES:
        if _first_process():
            print_error(f"{cfg.stage.name} runs in a single process: run it without torchrun")
        sys.exit(EXIT_USAGE)
    if cfg.stage.name == "report":  # reads JSON and YAML only: this path never imports torch
        from distill_cli.report import ReportError, report_run

        try:
            return report_run(cfg, _job_subdir())
        except ReportError as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print_error(str(exc))
            sys.exit(EXIT_USAGE)
    from distill_cli import distributed, runtime
    from distill_cli.stagefolder import USER_ERRORS
    from distill_cli.stages import run_stage
    from distill_cli.training import Interrupted

    try:
        distributed.init(runtime.pick_device(cfg.device.name))
        return run_stage(cfg, _job_subdir())
    except USER_ERRORS as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if distributed.is_main():  # the others met the same error, or stopped because of it
            print_error(str(exc))
        sys.exit(EXIT_USAGE)
    except (Interrupted, KeyboardInterrupt) as exc:
        where = f"{exc}; " if str(exc) else ""
        if distributed.is_main():
            print_error(f"interrupted: {where}run the same command with stage.resume=true to "
                        "continue")  # fmt: skip
        sys.exit(EXIT_INTERRUPTED)
    finally:
        distributed.shutdown()


def main() -> None:
    """Console entry point: ``distill-cli <stage> [overrides] [Hydra flags]``."""
    from distill_cli.console import print_error

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
        print_error(f"unknown command '{args[0]}'; valid: {', '.join(STAGES)}")
        sys.exit(EXIT_USAGE)
    flags, overrides = _split(args)
    if not _PRINT_FLAGS.intersection(flags):
        try:
            preflight(overrides)
        except ConfigError as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if _first_process():  # under torchrun every process finds the same error
                print_error(str(exc))
            sys.exit(EXIT_USAGE)
    if "-m" in flags or "--multirun" in flags:
        if _launched():
            if _first_process():
                print_error("sweeps (-m) do not run under torchrun: start one torchrun per job")
            sys.exit(EXIT_USAGE)
        os.environ[_SWEEP_ENV] = ";".join(_sweep_keys(overrides))
        stage = next((o[6:] for o in overrides if o.startswith("stage=")), "pretrain")
        if stage == "pretrain" and not any(o.startswith("run=") for o in overrides):
            overrides.append(f"run={time.strftime(RUN_NAME_FORMAT)}")  # one new run for all jobs
    sys.argv = [sys.argv[0], *flags, *overrides]  # argparse wants the overrides together
    hydra.main(config_path=conf_dir(), config_name="config", version_base=None)(_task)()


if __name__ == "__main__":
    main()
