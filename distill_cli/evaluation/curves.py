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


def shots_curves(configs: list[Configuration]) -> list[Curve]:
    """The configurations that differ only in their shots, as curves of two or more points.

    Configurations without an integer ``dataset.shots`` (trained on every label) are not on a
    curve. Curves keep the order in which their configurations first appear.
    """
    series: dict[tuple[str, str], dict[int, Configuration]] = {}
    for c in configs:
        shots = c.setting.get(SHOTS)
        if not isinstance(shots, int) or isinstance(shots, bool):
            continue
        rest = {k: v for k, v in c.setting.items() if k not in MOVES_WITH_SHOTS}
        key = (c.first.tag, json.dumps(rest, sort_keys=True))
        series.setdefault(key, {}).setdefault(shots, c)
    curves = []
    for points in series.values():
        if len(points) >= 2:
            first = next(iter(points.values()))
            curves.append(Curve(curve_name(first.name), sorted(points.items())))
    return curves


def curve_name(config_name: str) -> str:
    """A name less its shots: ``distill dataset.shots=5 kd=dkd`` -> ``distill kd=dkd``."""
    words = config_name.split(" ")
    kept = [w for w in words if w.split("=", 1)[0] not in MOVES_WITH_SHOTS]
    return " ".join(kept)


def metric_for(curves: list[Curve], wanted: list[str]) -> str | None:
    """The first metric of ``wanted`` that some point of some curve holds, e.g. top1 after eval."""
    for metric in wanted:
        if any(s.mean is not None for curve in curves for s in curve.stats(metric)):
            return metric
    return None
