import json

import pytest
import torch
from torch import nn

from distill_cli.models import MODELS, build_model, count_params

NUM_CLASSES = 5
# (in_channels, image_size): RGB CIFAR size, grey MNIST size, and a tiny grey input.
SHAPES = [(3, 32), (1, 28), (1, 16)]


def _input(in_channels: int, image_size: int) -> torch.Tensor:
    return torch.randn(2, in_channels, image_size, image_size)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("in_channels,image_size", SHAPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward_reaches_every_parameter(name, in_channels, image_size):
    model = build_model(name, NUM_CLASSES, in_channels, image_size)
    logits = model(_input(in_channels, image_size))
    assert logits.shape == (2, NUM_CLASSES)
    logits.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", list(MODELS))
def test_interface_pieces_agree(name):
    model = build_model(name, NUM_CLASSES, 3, 32).eval()
    x = _input(3, 32)
    with torch.no_grad():
        logits = model(x)
        pooled = model.forward_features(x)
        split = model.forward_head(pooled)
        with_feats, feats = model.forward_with_features(x)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(split, logits)
    torch.testing.assert_close(with_feats, logits)
    assert tuple(feats) == model.feature_names
    assert feats["pooled"].shape == (2, model.num_features)
    assert model.num_classes == NUM_CLASSES


@pytest.mark.parametrize("name", list(MODELS))
def test_head_is_the_only_non_backbone_part(name):
    model = build_model(name, NUM_CLASSES)
    assert isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.num_features
    head_params = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert head_params == {"head.weight", "head.bias"}


def test_reset_classifier_keeps_backbone():
    model = build_model("resnet8", NUM_CLASSES, 1, 16)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    model.reset_classifier(7)
    model.eval()  # a train-mode forward would update BatchNorm running stats
    assert model(_input(1, 16)).shape == (2, 7)
    assert model.num_classes == 7
    assert model.config["num_classes"] == 7
    assert model.head.out_features == 7
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="nope") as err:
        build_model("nope", NUM_CLASSES)
    for name in MODELS:
        assert name in str(err.value)


def test_too_small_image_is_rejected():
    with pytest.raises(ValueError, match="image_size"):
        build_model("cnn", NUM_CLASSES, image_size=2)


@pytest.mark.parametrize(
    "name,low,high",
    [
        # RepDistiller/CRD report 0.28M, 0.86M, 1.7M, 1.2M, 7.4M parameters for 100 classes.
        ("resnet20", 0.25e6, 0.30e6),
        ("resnet56", 0.84e6, 0.88e6),
        ("resnet110", 1.70e6, 1.76e6),
        ("resnet8x4", 1.1e6, 1.3e6),
        ("resnet32x4", 7.3e6, 7.5e6),
    ],
)
def test_param_counts_match_literature(name, low, high):
    assert low <= count_params(build_model(name, 100)) <= high


def test_count_params_includes_frozen():
    model = build_model("cnn", NUM_CLASSES)
    total = count_params(model)
    model.requires_grad_(False)
    assert count_params(model) == total


@pytest.mark.parametrize("name", list(MODELS))
def test_config_rebuilds_the_model(name):
    model = build_model(name, 3, in_channels=1, image_size=28).eval()
    json.dumps(model.config)  # plain types only
    assert model.config == {"name": name, "num_classes": 3, "in_channels": 1, "image_size": 28}
    twin = build_model(**model.config).eval()
    twin.load_state_dict(model.state_dict())
    x = _input(1, 28)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
