"""Feature distillation: losses on intermediate features, e.g. ``distill-cli distill kd=crd``.

The pure functions take feature tensors; :class:`FeatureDistiller` picks a method's features
from ``DistillModel.forward_with_features`` and owns its trainable adapters and state::

    shapes_s = feature_shapes(student, in_channels=3, image_size=32)
    shapes_t = feature_shapes(teacher, in_channels=3, image_size=32)
    distiller = FeatureDistiller("fitnet", shapes_s, shapes_t, num_samples=len(train_set))
    logits, feats = student.forward_with_features(x)
    with torch.no_grad():
        _, teacher_feats = teacher.forward_with_features(x)
    loss = distiller(feats, teacher_feats, index)  # index: dataset positions, CRD only

The distiller is trained with the student (its parameters join the optimizer) and is never
exported. Losses are computed in float32 with autocast off: Gram matrices and CRD's
``exp(score / 0.07)`` overflow float16. CRD's heads and memory banks live in ``crd``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_cli.kd.crd import CRD, NCE

_WITHOUT_MAPS = "use kd=sp, rkd, pkt, crd or a logit method (e.g. kd, dkd, dist)"


def fitnet_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets (Romero et al., ICLR 2015): mean squared error, adapted student hint vs. teacher."""
    return F.mse_loss(student_feat.float(), teacher_feat.float())


def _attention(feat: Tensor, p: float) -> Tensor:
    """Spatial attention map: mean over channels of ``|f|^p``, flattened and L2-normalised."""
    return F.normalize(feat.float().abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feats: list[Tensor], teacher_feats: list[Tensor], p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), as in RepDistiller.

    Sums, over the (student, teacher) pairs, the mean squared difference of their attention
    maps. Where the spatial sizes differ, the larger feature is average-pooled
    (``adaptive_avg_pool2d``) to the smaller size before its map is taken, as RepDistiller does.
    ``|f|^p`` equals RepDistiller's ``f^p`` for even ``p``.
    """
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for f_s, f_t in zip(student_feats, teacher_feats, strict=True):
        size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
        f_s, f_t = F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)
        total = total + (_attention(f_s, p) - _attention(f_t, p)).pow(2).mean()
    return total


def _similarity(feat: Tensor) -> Tensor:
    flat = feat.float().flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): ``||G_s - G_t||_F^2 / B^2``.

    G is the batch's Gram matrix of flattened features with L2-normalised rows.
    """
    batch = student_feat.shape[0]
    return (_similarity(student_feat) - _similarity(teacher_feat)).pow(2).sum() / batch**2


def _pairwise_distance(emb: Tensor) -> Tensor:
    """Euclidean distances between rows, zero on the diagonal, divided by their mean off it."""
    squared = emb.pow(2).sum(1)
    dist = (squared[:, None] + squared[None, :] - 2 * emb @ emb.T).clamp(min=1e-12).sqrt()
    dist = dist * (1 - torch.eye(len(emb), device=emb.device))
    return dist / (dist.sum() / (dist > 0).sum())  # mean of the nonzero entries, without a sync


def _angles(emb: Tensor) -> Tensor:
    """Cosines of the angles e_i - e_j, e_k - e_j for every triplet, flattened."""
    diff = F.normalize(emb[None, :, :] - emb[:, None, :], dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """Relational KD (Park et al., CVPR 2019), as RepDistiller's RKDLoss.

    Smooth-L1 between the student's and the teacher's mean-normalised pairwise distances, and
    between their triplet angles. The teacher side carries no gradient.
    """
    student, teacher = student_emb.float().flatten(1), teacher_emb.float().flatten(1)
    with torch.no_grad():
        t_dist, t_angle = _pairwise_distance(teacher), _angles(teacher)
    loss_d = F.smooth_l1_loss(_pairwise_distance(student), t_dist)
    loss_a = F.smooth_l1_loss(_angles(student), t_angle)
    return distance_weight * loss_d + angle_weight * loss_a


def _cosine_kernel(emb: Tensor, eps: float) -> Tensor:
    """Row-stochastic matrix of cosine similarities rescaled to [0, 1]."""
    unit = torch.nan_to_num(emb / (emb.norm(dim=1, keepdim=True) + eps))
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(1, keepdim=True)


def pkt_loss(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as RepDistiller's PKT.

    KL between the teacher's and the student's conditional distributions of a cosine kernel,
    averaged over all B x B entries.
    """
    p_s = _cosine_kernel(student_emb.float().flatten(1), eps)
    p_t = _cosine_kernel(teacher_emb.float().flatten(1), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _spatial(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names of the (C, H, W) stages, in forward order."""
    return [name for name, shape in shapes.items() if len(shape) == 3]


def _body_maps(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The (C, H, W) stages after the stem: what RepDistiller's ``feat[1:-1]`` holds."""
    return [name for name in _spatial(shapes) if name != "stem"]


def _require_maps(method: str, student: list[str], teacher: list[str]) -> None:
    lacking = [side for side, maps in (("student", student), ("teacher", teacher)) if not maps]
    if lacking:
        raise ValueError(
            f"kd={method} needs convolutional feature maps but the {' and the '.join(lacking)} "
            f"{'gives' if len(lacking) == 1 else 'give'} none; {_WITHOUT_MAPS}"
        )


def _hint_layer(side: str, shapes: dict[str, tuple[int, ...]], name: object) -> str:
    """FitNet's layer on one side: the named stage, or the middle convolutional one."""
    spatial = _spatial(shapes)
    if name is None:
        return spatial[len(spatial) // 2]
    if name not in spatial:
        raise ValueError(
            f"kd=fitnet: {side}_layer '{name}' is not a convolutional stage of the {side}; "
            f"choose one of: {', '.join(spatial)}"
        )
    return str(name)


def _regressor_fits(student: tuple[int, ...], teacher: tuple[int, ...]) -> bool:
    """Whether :func:`hint_regressor` maps a student map of this size onto the teacher's."""
    (_, sh, sw), (_, th, tw) = student, teacher
    return (2 * sh == th and 2 * sw == tw) or (sh >= th and sw >= tw)


def hint_regressor(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Sequential:
    """FitNet's adapter, RepDistiller's ``ConvReg``: conv, BatchNorm, ReLU, to the teacher's shape.

    The conv is 3x3 with stride 2 (padding 1) when the student map is twice the teacher's, a
    4x4 transposed conv with stride 2 (padding 1) when it is half, and otherwise a conv of
    kernel ``(1 + sH - tH, 1 + sW - tW)``: 1x1 for equal sizes.

    Args:
        student: The student map's (C, H, W).
        teacher: The teacher map's (C, H, W).

    Raises:
        ValueError: The student map is smaller than the teacher's but not half its size.
    """
    (sc, sh, sw), (tc, th, tw) = student, teacher
    if sh == 2 * th and sw == 2 * tw:
        conv: nn.Module = nn.Conv2d(sc, tc, 3, stride=2, padding=1)
    elif 2 * sh == th and 2 * sw == tw:
        conv = nn.ConvTranspose2d(sc, tc, 4, stride=2, padding=1)
    elif sh >= th and sw >= tw:
        conv = nn.Conv2d(sc, tc, (1 + sh - th, 1 + sw - tw))
    else:
        raise ValueError(f"no hint regressor maps a {sh}x{sw} student map onto {th}x{tw}")
    return nn.Sequential(conv, nn.BatchNorm2d(tc), nn.ReLU())


def _hint_pair(s_shapes, t_shapes, s_option: object, t_option: object) -> tuple[str, str]:
    """FitNet's (student, teacher) stages: the options, or the middle maps.

    A default teacher stage whose size the regressor cannot reach from the student's is
    replaced by the one nearest the middle that it can reach.
    """
    s_name = _hint_layer("student", s_shapes, s_option)
    t_name = _hint_layer("teacher", t_shapes, t_option)
    if _regressor_fits(s_shapes[s_name], t_shapes[t_name]):
        return s_name, t_name
    maps = _spatial(t_shapes)
    fits = [n for n in maps if _regressor_fits(s_shapes[s_name], t_shapes[n])]
    if t_option is None and fits:
        middle = len(maps) // 2
        return s_name, min(fits, key=lambda n: (abs(maps.index(n) - middle), -maps.index(n)))
    (_, sh, sw), (_, th, tw) = s_shapes[s_name], t_shapes[t_name]
    raise ValueError(
        f"kd=fitnet: the student's {s_name} map is {sh}x{sw} and the teacher's {t_name} map "
        f"{th}x{tw}; the adapter needs a student map at least as large as the teacher's or half "
        f"its size: teacher_layer fitting {s_name}: {', '.join(fits) or 'none'} (student "
        f"layers: {', '.join(_spatial(s_shapes))})"
    )


# --- the methods: each one's options, features, adapters and loss in one place -----------------


@dataclass(frozen=True)
class Method:
    """One feature method, registered in ``METHODS``.

    Attributes:
        options: Option -> default; None means "chosen from the shapes".
        setup: ``(distiller, student_shapes, teacher_shapes, num_samples)`` -> the student's and
            the teacher's feature names; creates the method's adapters on the distiller.
        loss: ``(distiller, student_feats, teacher_feats, index)`` -> the unweighted loss.
        needs_maps: Whether both models must have convolutional feature maps.
        needs_index: Whether the loss reads each image's row in the training set (CRD's memory
            bank): such a method cannot distill mixed images.
    """

    options: dict[str, object]
    setup: Callable[..., tuple[list[str], list[str]]]
    loss: Callable[..., Tensor]
    needs_maps: bool = False
    needs_index: bool = False


def _fitnet_setup(d, s_shapes, t_shapes, num_samples):
    opts = d.options
    s_name, t_name = _hint_pair(s_shapes, t_shapes, opts["student_layer"], opts["teacher_layer"])
    d.adapter = hint_regressor(s_shapes[s_name], t_shapes[t_name])
    return [s_name], [t_name]


def _fitnet(d, s, t, index):
    return fitnet_loss(d.adapter(s[0]), t[0])


def _last_maps(d, s_shapes, t_shapes, num_samples):
    s_maps, t_maps = _body_maps(s_shapes), _body_maps(t_shapes)
    _require_maps("at", s_maps, t_maps)  # a model whose only map is its stem
    n = min(len(s_maps), len(t_maps))
    return s_maps[-n:], t_maps[-n:]


def _last_map(d, s_shapes, t_shapes, num_samples):
    return _spatial(s_shapes)[-1:] or ["pooled"], _spatial(t_shapes)[-1:] or ["pooled"]


def _pooled(d, s_shapes, t_shapes, num_samples):
    return ["pooled"], ["pooled"]


def _crd_setup(d, s_shapes, t_shapes, num_samples):
    opts = d.options
    d.crd = CRD(
        math.prod(s_shapes["pooled"]),
        math.prod(t_shapes["pooled"]),
        num_samples,
        feat_dim=int(opts["feat_dim"]),
        nce=NCE(
            k=int(opts["nce_k"]),
            t=float(opts["nce_t"]),
            m=float(opts["nce_m"]),
            negatives=str(opts["nce_negatives"]),
        ),
        labels=d.labels,
    )
    d.record = {"crd_negatives": dict(d.crd.negative_draws)}
    return _pooled(d, s_shapes, t_shapes, num_samples)


METHODS: dict[str, Method] = {
    "fitnet": Method({"student_layer": None, "teacher_layer": None}, _fitnet_setup, _fitnet,
                     needs_maps=True),
    "at": Method({"p": 2.0}, _last_maps, lambda d, s, t, i: at_loss(s, t, p=float(d.options["p"])),
                 needs_maps=True),
    "sp": Method({}, _last_map, lambda d, s, t, i: sp_loss(s[0], t[0])),
    "rkd": Method({"distance_weight": 25.0, "angle_weight": 50.0}, _pooled,
                  lambda d, s, t, i: rkd_loss(s[0], t[0], float(d.options["distance_weight"]),
                                              float(d.options["angle_weight"]))),
    "pkt": Method({}, _pooled, lambda d, s, t, i: pkt_loss(s[0], t[0])),
    "crd": Method({"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5,
                   "nce_negatives": "other_class"}, _crd_setup,
                  lambda d, s, t, i: d.crd(s[0], t[0], i), needs_index=True),
}  # fmt: skip
FEATURE_METHODS: tuple[str, ...] = tuple(METHODS)
OPTIONS: dict[str, dict[str, object]] = {name: m.options for name, m in METHODS.items()}


class FeatureDistiller(nn.Module):
    """Adapters and state of one feature method; trained with the student, never exported.

    Features used, by method (a *map* is a (C, H, W) stage; "pooled" is the (D,) vector that
    the classifier reads):

    - ``fitnet``: one hint stage per model, the middle map (index ``len(maps) // 2``) unless
      options ``student_layer`` / ``teacher_layer`` name one; a default teacher stage the
      adapter cannot reach gives way to the reachable one nearest the middle. Adapter:
      :func:`hint_regressor` (RepDistiller's ConvReg), whose output has the teacher's shape.
    - ``at``: the last n maps after the stem of each model, paired in order, n = the smaller
      count (RepDistiller's ``feat[1:-1]``: 3 for CIFAR ResNets and WRNs, 4 for VGG and
      MobileNetV2); option ``p`` (2).
    - ``sp``: the last map of each model, or "pooled" for a model without maps.
    - ``rkd``, ``pkt``: "pooled". rkd options ``distance_weight`` (25), ``angle_weight`` (50).
    - ``crd``: "pooled", through :class:`CRD`; ``forward`` needs ``index``. Options
      ``feat_dim`` (128), ``nce_k`` (16384), ``nce_t`` (0.07), ``nce_m`` (0.5),
      ``nce_negatives`` ("other_class": a labelled row's negatives from the other classes,
      given ``labels``; "uniform").

    Teacher features are detached: no gradient reaches the teacher. ``record`` holds what the
    stage should keep about the choices made (CRD: how many rows draw negatives which way).

    Args:
        method: One of ``FEATURE_METHODS``.
        student_shapes: Per-sample shapes of the student's ``forward_with_features`` outputs.
        teacher_shapes: The same for the teacher.
        num_samples: Training-set size (CRD's memory banks).
        labels: Class of each training row (``num_samples``,), -1 where unknown (CRD).
        **options: The method's options, listed above.
    """

    def __init__(
        self,
        method: str,
        student_shapes: dict[str, tuple[int, ...]],
        teacher_shapes: dict[str, tuple[int, ...]],
        num_samples: int,
        labels: Tensor | None = None,
        **options: object,
    ):
        super().__init__()
        if method not in FEATURE_METHODS:
            raise ValueError(
                f"unknown feature kd method '{method}'; valid: {', '.join(FEATURE_METHODS)}"
            )
        for name in options:
            if name not in OPTIONS[method]:
                valid = ", ".join(OPTIONS[method]) or "none"
                raise ValueError(f"unknown option '{name}' for kd={method}; valid: {valid}")
        self.method = method
        self.options = {**OPTIONS[method], **options}
        self.labels, self.record = labels, {}
        spec = METHODS[method]
        if spec.needs_maps:
            _require_maps(method, _spatial(student_shapes), _spatial(teacher_shapes))
        self.student_layers, self.teacher_layers = spec.setup(
            self, student_shapes, teacher_shapes, num_samples
        )
        self.labels = None  # read by setup only

    def forward(
        self,
        student_feats: dict[str, Tensor],
        teacher_feats: dict[str, Tensor],
        index: Tensor | None = None,
    ) -> Tensor:
        """Returns the method's unweighted loss; ``index`` (B,) holds dataset positions (CRD)."""
        if self.method == "crd" and index is None:
            raise ValueError("kd=crd needs each sample's index in the training set; got None")
        device_type = student_feats[self.student_layers[0]].device.type
        with torch.autocast(device_type, enabled=False):
            s = [student_feats[name].float() for name in self.student_layers]
            t = [teacher_feats[name].detach().float() for name in self.teacher_layers]
            return self._loss(s, t, index)

    def _loss(self, s: list[Tensor], t: list[Tensor], index: Tensor | None) -> Tensor:
        return METHODS[self.method].loss(self, s, t, index)


def feature_shapes(
    model: nn.Module, in_channels: int, image_size: int
) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of ``model.forward_with_features`` on a zero batch of two images.

    Runs in eval mode without gradients, then restores every submodule's previous mode.
    """
    modes = {module: module.training for module in model.modules()}
    param = next(model.parameters())
    x = torch.zeros(2, in_channels, image_size, image_size, device=param.device, dtype=param.dtype)
    model.eval()
    try:
        with torch.no_grad():
            _, feats = model.forward_with_features(x)
    finally:
        for module, training in modes.items():
            module.training = training
    return {name: tuple(feat.shape[1:]) for name, feat in feats.items()}
