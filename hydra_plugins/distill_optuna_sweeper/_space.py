"""The search space: Hydra's sweep syntax to Optuna distributions, and a trial back to overrides.

Examples::

    kd.temperature=interval(1.0, 8.0)          -> FloatDistribution(1.0, 8.0)
    optimizer.lr=tag(log, interval(1e-3, 0.1)) -> FloatDistribution(0.001, 0.1, log=True)
    model=choice(cnn, resnet8)                 -> CategoricalDistribution(("cnn", "resnet8"))
    stage.epochs=range(2, 8, 2)                -> IntDistribution(2, 6, step=2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer


def parse(params: Mapping[str, str], arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(search space by key, fixed overrides) from the sweeper's params and the command line.

    The command line wins: ``KEY=interval(...)`` there adds or replaces a dimension and
    ``KEY=VALUE`` fixes the key.
    """
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for o in OverridesParser.create().parse_overrides(lines):
        key = o.get_key_element()
        if o.is_sweep_override():
            space[key] = distribution(o)
            fixed.pop(key, None)
        else:
            fixed[key] = o.input_line
            space.pop(key, None)
    return space, list(fixed.values())


def distribution(o: Override) -> Any:
    """The Optuna distribution of one sweep override."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = o.value()
    if o.is_choice_sweep() or (o.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(o.sweep_iterator(transformer=Transformer.encode)))
    if o.is_range_sweep():
        values = list(o.sweep_iterator())
        if all(isinstance(v, int) for v in values) and isinstance(value.step, int):
            return IntDistribution(values[0], values[-1], step=value.step)
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    log = "log" in value.tags
    if isinstance(value.start, int) and isinstance(value.end, int):
        return IntDistribution(value.start, value.end, log=log)
    return FloatDistribution(float(value.start), float(value.end), log=log)


def signature(space: Mapping[str, Any]) -> dict[str, str]:
    """The space as JSON text per key: stored with the study and compared on a resume."""
    from optuna.distributions import distribution_to_json

    return {key: distribution_to_json(d) for key, d in sorted(space.items())}


def suggest(trial: Any, space: Mapping[str, Any]) -> list[str]:
    """Draw the trial's values (or take a retried trial's) and return them as overrides."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    out = []
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            value = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, IntDistribution):
            value = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
        else:
            value = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
        out.append(f"{key}={render(value)}")
    return out


def render(value: Any) -> str:
    """A value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def grid(space: Mapping[str, Any]) -> dict[str, list]:
    """Every value of each dimension, for the grid sampler.

    Raises:
        ValueError: a dimension is an interval (its values are not countable).
    """
    from optuna.distributions import CategoricalDistribution

    out = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = list(d.choices)
        elif getattr(d, "step", None) is not None and not d.log:
            n = int(round((d.high - d.low) / d.step)) + 1
            out[key] = [d.low + i * d.step for i in range(n)]
        else:
            raise ValueError(
                f"hydra/sweeper/sampler=grid needs choice(...) or range(...) for every "
                f"parameter; {key} is an interval"
            )
    return out
