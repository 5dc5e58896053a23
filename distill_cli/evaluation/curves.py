"""Shots curves: a run's configurations that differ only in ``dataset.shots``, as lines.

    distill-cli report run=cs stage.runs=[cs_*]   # report_shots.png, report_gain_shots.png

A curve is one tag and setting swept over the labelled images per class (``dataset.shots``; the
validation split that follows it, ``dataset.val_per_class``, goes with it). Each point is a
configuration: mean ± std over its seeds, and its paired gain over the scratch baseline of the
same budget. Everything here takes plain arguments and reads no files: no torch, no Hydra.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from distill_cli.evaluation.aggregate import Configuration, Stat

SHOTS = "dataset.shots"
MOVES_WITH_SHOTS = (SHOTS, "dataset.val_per_class")  # the split follows the shots


@dataclass
class Curve:
    """One configuration swept over shots: its name without the shots, points in shots order."""

    name: str
    points: list[tuple[int, Configuration]]

    @property
    def shots(self) -> list[int]:
        """The shots values, ascending."""
        return [k for k, _ in self.points]

    def stats(self, metric: str) -> list[Stat]:
        """Mean ± std of ``metric`` at each shots value."""
        return [c.stat(metric) for _, c in self.points]

    def gains(self, metric: str) -> list[Stat]:
        """The paired gain over scratch at each shots value (empty Stats where none)."""
        return [c.gain(metric) for _, c in self.points]


def shots_curves(
    configs: list[Configuration], moving: dict[str, dict[str, dict[int, Any]]] | None = None
) -> list[Curve]:
    """The configurations that differ only in their shots, as curves of two or more points.

    Keys that change with the shots within a tag, one value per shots value (epochs scaled to
    the data, say), go with the shots too: :func:`moving_keys` names them. Configurations
    without an integer ``dataset.shots`` (trained on every label) are not on a curve. Curves
    keep the order in which their configurations first appear. ``moving`` is
    :func:`moving_keys` of the same configurations, when the caller has it already.
    """
    moving = moving_keys(configs) if moving is None else moving
    series: dict[tuple[str, str], dict[int, Configuration]] = {}
    for c in configs:
        shots = _shots(c)
        if shots is None:
            continue
        drop = set(MOVES_WITH_SHOTS) | set(moving.get(c.first.tag, {}))
        rest = {k: v for k, v in c.setting.items() if k not in drop}
        key = (c.first.tag, json.dumps(rest, sort_keys=True))
        series.setdefault(key, {}).setdefault(shots, c)
    curves = []
    for points in series.values():
        if len(points) >= 2:
            first = next(iter(points.values()))
            name = curve_name(first.name, moving.get(first.first.tag, {}))
            curves.append(Curve(name, sorted(points.items())))
    return curves


def moving_keys(configs: list[Configuration]) -> dict[str, dict[str, dict[int, Any]]]:
    """Per tag, the keys that differ between shots values but never at one shots value.

    Returns:
        Tag -> key -> {shots: the key's value there}, e.g. ``{"distill": {"stage.epochs":
        {5: 300, 250: 30}}}``.
    """
    by_tag: dict[str, list[tuple[int, dict]]] = {}
    for c in configs:
        shots = _shots(c)
        if shots is not None:
            by_tag.setdefault(c.first.tag, []).append((shots, c.setting))
    out: dict[str, dict[str, dict[int, Any]]] = {}
    for tag, members in by_tag.items():
        keys = {k for _, setting in members for k in setting} - set(MOVES_WITH_SHOTS)
        for key in sorted(keys):
            at: dict[int, set[str]] = {}
            for shots, setting in members:
                at.setdefault(shots, set()).add(json.dumps(setting.get(key)))
            one_each = all(len(v) == 1 for v in at.values())
            if one_each and len({next(iter(v)) for v in at.values()}) > 1:
                values = {k: json.loads(next(iter(v))) for k, v in sorted(at.items())}
                out.setdefault(tag, {})[key] = values
    return out


def _shots(c: Configuration) -> int | None:
    shots = c.setting.get(SHOTS)
    return shots if isinstance(shots, int) and not isinstance(shots, bool) else None


def curve_name(config_name: str, moving: dict | None = None) -> str:
    """A name less its shots: ``distill dataset.shots=5 kd=dkd`` -> ``distill kd=dkd``.

    ``moving`` (from :func:`moving_keys`) names keys that go with the shots and leave too.
    """
    gone = set(MOVES_WITH_SHOTS) | set(moving or {})
    return " ".join(w for w in config_name.split(" ") if w.split("=", 1)[0] not in gone)


def moving_note(moving: dict[str, dict[str, dict[int, Any]]]) -> list[str]:
    """One line per tag whose settings change with the shots, e.g. its epochs."""
    return [
        f"{tag}: "
        + "; ".join(
            f"{key} changes with the shots ("
            + ", ".join(f"{k}: {json.dumps(v)}" for k, v in values.items())
            + ")"
            for key, values in keys.items()
        )
        for tag, keys in moving.items()
    ]


def metric_for(curves: list[Curve], wanted: list[str]) -> str | None:
    """The first metric of ``wanted`` that some point of some curve holds, e.g. top1 after eval."""
    for metric in wanted:
        if any(s.mean is not None for curve in curves for s in curve.stats(metric)):
            return metric
    return None
