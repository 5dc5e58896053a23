"""BatchNorm folded into convolutions: exact on every model of the zoo that has BatchNorm."""

import pytest
import torch

from distill_cli.models import MODELS, build_model
from distill_cli.models.fold import fold_batchnorm


def random_statistics(model, seed=0):
    """``model`` in eval mode with random BatchNorm statistics and affine weights."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.3, 3.0),
                              (m.weight.data, 0.5, 1.5), (m.bias.data, -0.3, 0.3)):  # fmt: skip
                t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return model.eval().requires_grad_(False)


def _has_batchnorm(name):
    return any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model(name, 4).modules())


WITH_BN = [name for name in MODELS if name != "timm" and _has_batchnorm(name)]  # timm: own test
# BatchNorms that read no convolution's output: a Wide ResNet's pre-activation ones (one per
# block, plus the last before pooling), whose input is a residual sum.
LEFT = {"wrn_16_2": 7, "wrn_40_2": 19}


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def test_the_zoo_has_batchnorm_where_expected():
    assert set(WITH_BN) == set(MODELS) - {"cnn", "cnn_padded", "vit_tiny", "lstm_rows", "timm"}


@pytest.mark.parametrize("name", WITH_BN)
def test_folding_keeps_logits_and_every_feature(name):
    torch.manual_seed(0)
    model = random_statistics(build_model(name, 10, 3, 32))
    folded, report = fold_batchnorm(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
        logits_f, feats_f = folded.forward_with_features(x)
        assert _relative(folded(x), logits) < 1e-4
    assert _relative(logits_f, logits) < 1e-4
    assert feats_f.keys() == feats.keys()
    for key in feats:
        assert _relative(feats_f[key], feats[key]) < 1e-4, key
    remaining = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert report.folded > 0 and report.left == remaining == LEFT.get(name, 0)
    assert not report.untraced
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original intact
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())


def test_folding_refuses_a_model_in_train_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_model("resnet8", 4))
