"""The built-in offline glyph domains."""

import torch

from distill_cli.data.glyphs import CLASSES, glyph_designs, make_glyphs


def test_shapes_types_and_determinism():
    x, y, names = make_glyphs("target", train=False, n=64, seed=3)
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and int(y.max()) < CLASSES["target"] and len(names) == 10
    x2, y2, _ = make_glyphs("target", train=False, n=64, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _, _ = make_glyphs("target", train=False, n=64, seed=4)
    assert not torch.equal(x, x3)


def test_train_and_test_draws_differ():
    a, _, _ = make_glyphs("source", train=True, n=32)
    b, _, _ = make_glyphs("source", train=False, n=32)
    assert not torch.equal(a, b)


def test_domains_use_disjoint_distinct_glyphs():
    designs = [tuple(d) for d in glyph_designs()]
    assert len(set(designs)) == len(designs) == sum(CLASSES.values())
    source, target = set(designs[: CLASSES["source"]]), set(designs[CLASSES["source"] :])
    assert not source & target


def test_domains_differ_in_style():
    xs, _, _ = make_glyphs("source", train=True, n=200)
    xt, _, _ = make_glyphs("target", train=True, n=200)
    # thicker strokes and a textured background: the target's images are brighter on average
    assert xt.float().mean() > xs.float().mean() + 5
