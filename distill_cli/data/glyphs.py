"""Built-in offline data: procedurally drawn glyphs in a source and a target domain.

Used by the demo (``distill-cli pretrain dataset=glyphs_source``) so the whole pipeline runs with no
files and no network. Each class is a glyph composed of shared primitives (strokes between the
points of a 3x3 grid, and rings) so that what a model learns on one domain transfers to the other.
The two domains use disjoint glyph sets and differ in stroke width, palette, background texture
and noise. Horizontal flips are not label-preserving here: a mirrored glyph is another shape.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

IMAGE_SIZE = 16
SUPERSAMPLE = 2  # render at 2x and average-pool down, for anti-aliased strokes
PRIMITIVES_PER_GLYPH = 4
CLASSES = {"source": 30, "target": 10}  # many source glyphs: features that cover the primitives
DESIGN_SEED = 1234  # fixed: the glyph shapes are part of the dataset's definition
SIZES = {
    ("source", True): 6000,
    ("source", False): 1000,
    ("target", True): 2000,
    ("target", False): 1000,
}

JITTER = {"angle": 0.7, "scale": (0.75, 1.15), "shift": 0.3}  # rotation range (rad), scale, shift
CLUTTER = 2  # stray strokes per image
# Per-domain style: stroke width (fraction of the image), noise std, texture amplitude, polarity.
STYLES = {
    "source": {"width": (0.05, 0.075), "noise": 0.03, "texture": 0.05, "dark_on_light": False},
    "target": {"width": (0.08, 0.11), "noise": 0.06, "texture": 0.15, "dark_on_light": False},
}


def _primitives() -> list[tuple[str, tuple[float, ...]]]:
    """Strokes between neighbouring grid points, cell diagonals, and rings, in unit coordinates."""
    pts = [0.25, 0.5, 0.75]
    prims: list[tuple[str, tuple[float, ...]]] = []
    for i in range(3):
        for j in range(2):
            prims.append(("seg", (pts[j], pts[i], pts[j + 1], pts[i])))  # horizontal
            prims.append(("seg", (pts[i], pts[j], pts[i], pts[j + 1])))  # vertical
    for i in range(2):
        for j in range(2):
            prims.append(("seg", (pts[j], pts[i], pts[j + 1], pts[i + 1])))
            prims.append(("seg", (pts[j + 1], pts[i], pts[j], pts[i + 1])))
    for cx, cy in [(0.375, 0.375), (0.625, 0.375), (0.375, 0.625), (0.625, 0.625)]:
        prims.append(("ring", (cx, cy, 0.11)))
    prims.append(("ring", (0.5, 0.5, 0.24)))
    return prims


def glyph_designs() -> list[list[int]]:
    """Return the primitive indices of all glyphs: source classes first, then target classes.

    Glyphs differ pairwise in at least one primitive: some classes are close relatives.
    """
    gen = torch.Generator().manual_seed(DESIGN_SEED)
    n_prims = len(_primitives())
    designs: list[set[int]] = []
    while len(designs) < sum(CLASSES.values()):
        cand = set(torch.randperm(n_prims, generator=gen)[:PRIMITIVES_PER_GLYPH].tolist())
        if all(len(cand ^ d) >= 2 for d in designs):
            designs.append(cand)
    return [sorted(d) for d in designs]


def _distance_maps(coords: torch.Tensor) -> torch.Tensor:
    """Distance from each render-grid point to every primitive: (N, P, S, S)."""
    px, py = coords[..., 0].unsqueeze(1), coords[..., 1].unsqueeze(1)
    maps = []
    for kind, p in _primitives():
        if kind == "seg":
            x0, y0, x1, y1 = p
            dx, dy = x1 - x0, y1 - y0
            t = (((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
            maps.append(torch.hypot(px - (x0 + t * dx), py - (y0 + t * dy)))
        else:
            cx, cy, r = p
            maps.append((torch.hypot(px - cx, py - cy) - r).abs())
    return torch.cat(maps, dim=1)


def _sample_coords(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Per-image jittered affine maps from pixel centres back into glyph coordinates."""
    lin = (torch.arange(size) + 0.5) / size
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), dim=-1) - 0.5  # (S,S,2) x,y
    angle = (torch.rand(n, generator=gen) - 0.5) * JITTER["angle"]
    scale = JITTER["scale"][0] + (JITTER["scale"][1] - JITTER["scale"][0]) * torch.rand(
        n, generator=gen
    )
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * JITTER["shift"]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n,2,2)
    return torch.einsum("nij,hwj->nhwi", rot, grid) + 0.5 - shift[:, None, None, :]


def _clutter(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Distance to a few short stray strokes per image, (N, S, S): distractors, not glyph parts."""
    lin = (torch.arange(size) + 0.5) / size
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    start = 0.05 + 0.9 * torch.rand(n, CLUTTER, 2, generator=gen)
    angle = torch.rand(n, CLUTTER, generator=gen) * 2 * math.pi
    length = 0.12 + 0.12 * torch.rand(n, CLUTTER, generator=gen)
    d = torch.stack([torch.cos(angle), torch.sin(angle)], -1) * length[..., None]
    px, py = xx[None, None], yy[None, None]
    x0, y0 = start[..., 0, None, None], start[..., 1, None, None]
    dx, dy = d[..., 0, None, None], d[..., 1, None, None]
    t = (((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
    return torch.hypot(px - (x0 + t * dx), py - (y0 + t * dy)).amin(dim=1)


def _textures(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Oriented sinusoidal stripes with a random frequency and phase: (n, 1, S, S) in [-1, 1]."""
    lin = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    theta = torch.rand(n, 1, 1, generator=gen) * math.pi
    freq = 2 + 4 * torch.rand(n, 1, 1, generator=gen)
    phase = torch.rand(n, 1, 1, generator=gen) * 2 * math.pi
    proj = xx * torch.cos(theta) + yy * torch.sin(theta)
    return torch.sin(2 * math.pi * freq * proj + phase).unsqueeze(1)


def _render(labels: torch.Tensor, glyph_ids: list[list[int]], style: dict, gen: torch.Generator):
    """Draw one image per label as float RGB in [0, 1]: (N, 3, IMAGE_SIZE, IMAGE_SIZE)."""
    n, hi = len(labels), IMAGE_SIZE * SUPERSAMPLE
    dist = _distance_maps(_sample_coords(n, hi, gen))  # (N,P,hi,hi)
    member = torch.zeros(len(glyph_ids), dist.shape[1], dtype=torch.bool)
    for c, ids in enumerate(glyph_ids):
        member[c, ids] = True
    dist = dist.masked_fill(~member[labels][:, :, None, None], float("inf")).amin(dim=1)
    if CLUTTER:
        dist = torch.minimum(dist, _clutter(n, hi, gen))
    lo, hi_w = style["width"]
    half = (lo + (hi_w - lo) * torch.rand(n, 1, 1, generator=gen)) / 2
    ink = ((half - dist) * hi + 0.5).clamp(0, 1).unsqueeze(1)  # soft edge about one render pixel
    ink = torch.nn.functional.avg_pool2d(ink, SUPERSAMPLE)
    fg = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=gen)
    bg = 0.25 * torch.rand(n, 3, 1, 1, generator=gen)
    if style["dark_on_light"]:
        fg, bg = 1 - fg, 1 - bg
    bg = bg + style["texture"] * _textures(n, IMAGE_SIZE, gen)
    img = ink * fg + (1 - ink) * bg
    return img + style["noise"] * torch.randn(img.shape, generator=gen)


@lru_cache(maxsize=4)  # stages in one process (tests, sweeps) reuse a split; treat it as read-only
def make_glyphs(
    domain: str, train: bool, n: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Generate one split of a glyph domain, deterministic for (domain, train, n, seed).

    Args:
        domain: "source" or "target".
        train: the training split (True) or the test split (False); they use different draws.
        n: number of images; defaults to the domain's standard split size.
        seed: changes the drawn images, never the glyph shapes.

    Returns:
        uint8 images (N, 3, 16, 16), int64 labels (N,), and the class names.
    """
    if domain not in STYLES:
        raise ValueError(f"unknown glyph domain '{domain}'; valid: {', '.join(STYLES)}")
    n = SIZES[(domain, train)] if n is None else n
    offset = 0 if domain == "source" else CLASSES["source"]
    glyph_ids = glyph_designs()[offset : offset + CLASSES[domain]]
    split_code = (0 if domain == "source" else 2) + (0 if train else 1)
    gen = torch.Generator().manual_seed(seed * 4 + split_code + 1)
    labels = torch.arange(n) % CLASSES[domain]
    labels = labels[torch.randperm(n, generator=gen)]
    chunks = [
        _render(labels[i : i + 500], glyph_ids, STYLES[domain], gen) for i in range(0, n, 500)
    ]
    images = (torch.cat(chunks).clamp(0, 1) * 255).round().to(torch.uint8)
    names = [f"{domain}_glyph_{c}" for c in range(CLASSES[domain])]
    return images, labels, names
