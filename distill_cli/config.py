"""Validation of the composed configuration: types, ranges and names, before any work starts.

``distill-cli pretrain stage.epochs=-1`` stops here with one line naming the key. This module
imports neither torch nor Hydra's app machinery, so configuration errors come back fast.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

STAGES = ("pretrain", "finetune", "distill", "eval", "export", "report")
MODELS = (
    "cnn", "cnn_padded", "resnet8", "resnet20", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "vit_tiny", "wrn_16_2", "wrn_40_2", "vgg8", "vgg13", "mobilenetv2", "shufflenetv2", "lstm_rows",
    "resnet18", "resnet50", "mobilenet_v3_small", "timm",
)  # fmt: skip
TORCHVISION_MODELS = ("resnet18", "resnet50", "mobilenet_v3_small")  # accept model.weights
DATASETS = (
    "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "usps", "stl10", "imagefolder",
    "glyphs_source", "glyphs_target",
)  # fmt: skip
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")
# KD_METHODS, LOGIT_METHODS and STANDARDIZED come from conf/kd/ (see kd_methods): a new method
# is its YAML, its function and its test, with no list here to update.
CRD_NEGATIVES = ("other_class", "uniform")
TRANSFER_SETS = ("labeled", "target", "source", "source+target")
MIXES = ("none", "mixup", "cutmix")  # stage.mix: "none" and kd.mixing.MIXERS
SELECTS = ("val", "fidelity")  # stage.select: selection.SELECT
FINETUNE_MODES = ("full", "linear", "linear_then_full")
AMP_DTYPES = ("bfloat16", "float16")
TEACHER_PREPS = ("none", "fold", "compile", "auto")  # kd.teacher_prep.PREPS
TEACHER_PRECISIONS = ("float32", "bfloat16", "float16", "auto")  # teacher_prep.PRECISIONS, auto
REPORT_METRICS = (
    "best_val_acc", "last_val_acc", "best_epoch", "train_time_s", "params", "top1", "top5", "nll",
    "ece", "agreement", "kept", "macs", "latency_ms_p50",
)  # fmt: skip
LOGGERS = ("none", "tensorboard", "mlflow")
_LOGGER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # logger -> module it needs
RUN_NAME_FORMAT = "%Y-%m-%d_%H-%M-%S"  # runs started without run=NAME are named by their start time
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is one line naming the key."""


class StageError(Exception):
    """A stage that cannot run as asked; the message is one line."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


@functools.cache
def kd_defaults() -> dict[str, dict]:
    """Each kd method's YAML defaults by name: the files of ``conf/kd/`` are the methods.

    A method with a ``feat_weight`` is a feature method; one with ``logit_standardize`` takes
    logit standardization.
    """
    folder = Path(conf_dir()) / "kd"
    files = sorted(folder.glob("*.yaml"))
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in files}


def kd_methods(kind: str = "all") -> tuple[str, ...]:
    """Method names: ``all``, ``logit`` (no feature term) or ``standardized``."""
    keep = {"all": lambda d: True, "logit": lambda d: "feat_weight" not in d,
            "standardized": lambda d: "logit_standardize" in d}[kind]  # fmt: skip
    return tuple(name for name, d in kd_defaults().items() if keep(d))


_KD_LISTS = {"KD_METHODS": "all", "LOGIT_METHODS": "logit", "STANDARDIZED": "standardized"}


def __getattr__(name: str) -> tuple[str, ...]:
    """``KD_METHODS``, ``LOGIT_METHODS``, ``STANDARDIZED``: read from conf/kd/ when first asked."""
    if name in _KD_LISTS:
        return kd_methods(_KD_LISTS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _KdChoices:
    """The ``kd.name`` rule's text, listing conf/kd/ only when an error is worded."""

    def __str__(self) -> str:
        return "one of " + ", ".join(kd_methods())

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _kd_option(key: str, value: Any, method: str | None) -> str | None:
    """An error for a ``kd.*`` key without a rule of its own, or None when it fits.

    Such a key must be an option of the method's YAML, with a value of its default's kind.
    """
    defaults = kd_defaults().get(method or "", {})
    option = key.split(".", 1)[1]
    if option not in defaults:
        return f"unknown key '{key}'; kd={method} has the options {', '.join(defaults)}"
    default = defaults[option]
    if default is None or value is None or type(value) is type(default):
        return None
    if _is_num(default) and _is_num(value):
        return None
    return f"{key}={value!r} is invalid: expected a {type(default).__name__} like the default"


def _int(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}"


def _num(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def ok(v: Any) -> bool:
        return _is_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok, f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _optional(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    check, text = rule
    return (lambda v: v is None or check(v)), f"{text} or null"


_BOOL = (lambda v: isinstance(v, bool)), "true or false"
_STR = (lambda v: isinstance(v, str) and v != ""), "a non-empty string"
_RUN = (
    (lambda v: isinstance(v, str) and bool(_NAME.match(v)) and ".." not in v),
    ("a folder name (letters, digits and . _ - = , +)"),
)
_PATTERN = re.compile(r"^[A-Za-z0-9._=,+*?\[\]-]+$")


def _is_run_pattern(v: object) -> bool:
    return isinstance(v, str) and bool(_PATTERN.match(v)) and ".." not in v


_CLASSES = (
    (
        lambda v: (
            isinstance(v, list) and len(v) > 0 and all(_is_int(c) or isinstance(c, str) for c in v)
        )
    ),
    "a non-empty list of class indices or names",
)
_POSITIVE = _num(0, float("inf"), lo_open=True)
_NONNEG = _num(0, float("inf"))

# Every key a configuration may hold, with its rule. Keys not listed here are refused.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "run": _optional(_RUN),
    "tag": _optional(_RUN),
    "seed": _int(0),
    "out_dir": _STR,
    "overwrite": _BOOL,
    "stage.name": _one_of(STAGES),
    "stage.epochs": _int(0),
    "stage.batch_size": _int(1),
    "stage.eval_batch_size": _int(1),
    "stage.label_smoothing": _num(0, 1, hi_open=True),
    "stage.from": _optional(_STR),
    "stage.resume": _BOOL,
    "stage.val_every": _int(1),
    "stage.save_every_s": _NONNEG,
    "stage.mode": _one_of(FINETUNE_MODES),
    "stage.probe_epochs": _int(0),
    "stage.backbone_lr_mult": _NONNEG,
    "stage.datasets": _optional(
        (lambda v: isinstance(v, list) and all(d in DATASETS for d in v), "a list of dataset names")
    ),  # fmt: skip
    "stage.class_map": _optional(
        (
            (
                lambda v: (
                    isinstance(v, dict)
                    and all(isinstance(m, list) and all(_is_int(i) for i in m) for m in v.values())
                )
            ),
            "a mapping of dataset name to a list of class indices",
        )
    ),  # fmt: skip
    "stage.calibration_bins": _int(1),
    "stage.latency_runs": _int(1),
    "stage.throughput_batch": _int(1),
    "stage.plots": _BOOL,
    "stage.format": _one_of(("onnx", "torchscript")),
    "stage.metrics": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(m in REPORT_METRICS for m in v),
        "a non-empty list drawn from " + ", ".join(REPORT_METRICS),
    ),
    "stage.runs": (
        lambda v: isinstance(v, list) and all(_RUN[0](r) or _is_run_pattern(r) for r in v),
        "a list of run names or shell-style patterns (e.g. [seed1,cs_k*])",
    ),  # fmt: skip
    "model.name": _one_of(MODELS),
    # torchvision: imagenet or a path to a state_dict; timm: pretrained or a path to a checkpoint
    "model.weights": _optional(_STR),
    "model.arch": (_STR[0], "a timm architecture name, e.g. resnet18d"),  # model=timm
    "model.kwargs": _optional(
        (
            lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
            "a mapping of timm.create_model arguments, e.g. {drop_path_rate: 0.1}",
        )
    ),  # model=timm: one value, handed to timm whole
    "dataset.name": _one_of(DATASETS),
    "dataset.root": _optional(_STR),
    "dataset.download": _BOOL,
    "dataset.shots": _optional(_int(1)),
    "dataset.fraction": _optional(_num(0, 1, lo_open=True)),
    "dataset.classes": _optional(_CLASSES),
    "dataset.val_fraction": _num(0, 1, hi_open=True),
    "dataset.val_per_class": _optional(_int(0)),
    "dataset.subset_seed": _int(0),
    "dataset.image_size": _optional(_int(4)),
    "dataset.channels": _optional(((lambda v: v in (1, 3)), "1 or 3")),
    "dataset.crop_padding": _int(0),
    "dataset.flip": _BOOL,
    "dataset.bad_images": _one_of(("error", "skip")),
    "dataset.cache": _BOOL,
    "dataset.stream": _optional(_BOOL),
    "dataset.max_memory_gb": _POSITIVE,
    "dataset.workers": _int(0),
    "optimizer.name": _one_of(OPTIMIZERS),
    "optimizer.lr": _POSITIVE,
    "optimizer.momentum": _num(0, 1, hi_open=True),
    "optimizer.nesterov": _BOOL,
    "optimizer.betas": (
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1)",
    ),
    "optimizer.weight_decay": _NONNEG,
    "optimizer.schedule": _one_of(SCHEDULES),
    "optimizer.warmup_epochs": _int(0),
    "optimizer.milestones": (
        lambda v: isinstance(v, list) and all(_is_num(m) and 0 < m < 1 for m in v),
        "a list of fractions in (0, 1)",
    ),
    "optimizer.gamma": _num(0, 1, lo_open=True),
    "optimizer.clip_grad_norm": _optional(_POSITIVE),
    "device.name": _one_of(DEVICES),
    "device.amp": _optional(_BOOL),
    "device.amp_dtype": _one_of(AMP_DTYPES),
    "device.channels_last": _BOOL,
    "device.compile": _BOOL,
    "device.deterministic": _BOOL,
    "device.threads": _optional(_int(1)),
    "kd.name": ((lambda v: v in kd_methods()), _KdChoices()),
    "kd.temperature": _POSITIVE,
    "kd.ce_weight": _NONNEG,
    "kd.kd_weight": _NONNEG,
    "kd.feat_weight": _NONNEG,
    "kd.warmup_fraction": _num(0, 1),
    "kd.logit_standardize": _BOOL,
    "kd.alpha": _NONNEG,  # dkd
    "kd.beta": _NONNEG,
    "kd.t_min": _POSITIVE,  # ctkd
    "kd.t_range": _POSITIVE,
    "kd.grl_max": _NONNEG,
    "kd.grl_fraction": _num(0, 1),
    "kd.inter_weight": _NONNEG,  # dist
    "kd.intra_weight": _NONNEG,
    "kd.student_layer": _optional(_STR),  # fitnet
    "kd.teacher_layer": _optional(_STR),
    "kd.p": _POSITIVE,  # at
    "kd.distance_weight": _NONNEG,  # rkd
    "kd.angle_weight": _NONNEG,
    "kd.feat_dim": _int(1),  # crd
    "kd.nce_k": _int(1),
    "kd.nce_t": _POSITIVE,
    "kd.nce_m": _num(0, 1, hi_open=True),
    "kd.nce_negatives": _one_of(CRD_NEGATIVES),
    "stage.transfer_set": _one_of(TRANSFER_SETS),
    "stage.unlabeled_limit": _optional(_int(0)),
    "stage.unlabeled_ratio": _int(1),
    "stage.teacher_cache": _BOOL,
    "stage.aug_views": _optional(_int(1)),
    "stage.teacher_prep": _optional(_one_of(TEACHER_PREPS)),
    "stage.teacher_precision": _optional(_one_of(TEACHER_PRECISIONS)),
    "stage.teacher_compile_after_s": _NONNEG,
    "stage.transfer_epochs": _optional(_int(1)),
    "stage.mix": _one_of(MIXES),
    "stage.mix_alpha": _POSITIVE,
    "stage.select": _one_of(SELECTS),
    "stage.fidelity_images": _optional(_int(0)),
    "logger.name": _one_of(LOGGERS),
    "logger.dir": _RUN,
    "logger.tracking_uri": _STR,
    "logger.experiment": _optional(_STR),
}


def _leaves(node: Any, prefix: str = "", inherited: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, plain value) for every leaf; lists are leaves.

    ``???`` keys under ``inherited`` (``"dataset."`` for dataset=upstream) are skipped: the stage
    takes them from its parent checkpoint. Elsewhere a ``???`` key is an error.
    """
    if isinstance(node, DictConfig) and prefix[:-1] not in RULES:
        for key in node:
            if prefix == "" and key == "hydra":
                continue
            path = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                if inherited and path.startswith(inherited):
                    continue
                raise ConfigError(f"{path} is required (it is ??? in the config); set {path}=VALUE")
            yield from _leaves(node[key], path + ".", inherited)
    elif isinstance(node, (ListConfig, DictConfig)):  # lists and mappings that are one value
        yield prefix[:-1], OmegaConf.to_container(node, resolve=True)
    else:
        yield prefix[:-1], node


def check(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot work."""
    kd = cfg.get("kd") or {}
    for key, value in _leaves(cfg, inherited="dataset." if inherits_dataset(cfg) else ""):
        if key not in RULES and key.startswith("kd."):
            error = _kd_option(key, value, kd.get("name"))
            if error:
                raise ConfigError(error)
            continue
        if key not in RULES:
            raise ConfigError(f"unknown key '{key}'; see `distill-cli --help` for the valid keys")
        ok, expected = RULES[key]
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")
    _check_weights(cfg.model)
    logit, standardized = kd_methods("logit"), kd_methods("standardized")
    if kd.get("name") in logit and kd.get("feat_weight"):
        raise ConfigError(
            f"kd.feat_weight={kd.feat_weight} needs a feature method; kd={kd.name} has no feature "
            f"term (feature methods: {', '.join(m for m in kd_methods() if m not in logit)})"
        )
    if kd.get("logit_standardize") and kd.get("name") not in standardized:
        raise ConfigError(
            f"kd.logit_standardize=true does not apply to kd={kd.name}; methods it applies to: "
            f"{', '.join(standardized)}"
        )
    logger = cfg.get("logger", {}).get("name")
    if logger in _LOGGER_PACKAGES and importlib.util.find_spec(_LOGGER_PACKAGES[logger]) is None:
        raise ConfigError(
            f"logger={logger} needs the {_LOGGER_PACKAGES[logger]} package: "
            "pip install 'distill-cli[track]'"
        )
    if cfg.stage.name == "pretrain" and inherits_dataset(cfg):
        raise ConfigError(
            "pretrain trains from scratch and has no parent checkpoint to take its data from: "
            f"set dataset=NAME; valid: {', '.join(DATASETS)}"
        )
    if _given(cfg.dataset, "shots") is not None and _given(cfg.dataset, "fraction") is not None:
        raise ConfigError("set only one of dataset.shots and dataset.fraction")
    if cfg.stage.name == "finetune" and cfg.stage.mode == "linear_then_full":
        if cfg.stage.probe_epochs > cfg.stage.epochs:
            raise ConfigError(
                f"stage.probe_epochs={cfg.stage.probe_epochs} exceeds stage.epochs="
                f"{cfg.stage.epochs}: the probe is part of the epochs"
            )


def _check_weights(model: DictConfig) -> None:
    """``model.weights`` names the published weights of its own library."""
    weights = model.get("weights")
    published = {"timm": "pretrained"}.get(model.get("name"), "imagenet")
    other = {"pretrained", "imagenet"} - {published}
    if weights in other:
        raise ConfigError(
            f"model.weights={weights} does not apply to model={model.name}: its published "
            f"weights are model.weights={published} (or a path to a local file)"
        )


def _given(node: DictConfig, key: str) -> Any:
    """The value of ``key``, or None where it is ??? (to be inherited)."""
    return None if OmegaConf.is_missing(node, key) else node[key]


# --- the dataset a stage inherits ---------------------------------------------------------------

UPSTREAM_DATASET = "upstream"  # the dataset choice whose ??? keys come from the parent checkpoint


def conf_dir() -> str:
    """The ``conf/`` folder: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"distill-cli's conf/ folder is missing next to {here}")


def inherits_dataset(cfg: DictConfig) -> bool:
    """Whether ``cfg.dataset`` is ``dataset=upstream``: its keys wait for the parent's values."""
    return OmegaConf.is_missing(cfg.dataset, "name")


def inherit_dataset(requested: DictConfig, upstream: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """A dataset config: ``requested``'s ??? keys filled from ``upstream``, the others kept.

    ``upstream`` is a parent checkpoint's dataset config; a key it lacks (written by an older
    version) takes ``conf/dataset/_base.yaml``'s default.

    Returns:
        (the dataset config, the keys ``requested`` set itself: the command line's).
    """
    missing = {str(k) for k in requested if OmegaConf.is_missing(requested, k)}
    base = OmegaConf.load(Path(conf_dir()) / "dataset" / "_base.yaml")
    given = OmegaConf.to_container(requested, resolve=True)
    own = [str(k) for k in given if k not in missing]
    merged = {k: upstream.get(k, base.get(k)) if k in missing else v for k, v in given.items()}
    return merged, own
