import json
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn

from distill_cli.models import MODELS, build_model, count_params
from distill_cli.models.torchvision_models import TORCHVISION_MODELS

NUM_CLASSES = 5
# (in_channels, image_size): RGB CIFAR size, grey MNIST size, and a tiny grey input.
SHAPES = [(3, 32), (1, 28), (1, 16)]
ZOO = [name for name in MODELS if name != "timm"]  # timm needs model.arch: test_timm_models.py


def _input(in_channels: int, image_size: int) -> torch.Tensor:
    return torch.randn(2, in_channels, image_size, image_size)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("in_channels,image_size", SHAPES)
@pytest.mark.parametrize("name", ZOO)
def test_forward_backward_reaches_every_parameter(name, in_channels, image_size):
    model = build_model(name, NUM_CLASSES, in_channels, image_size)
    logits = model(_input(in_channels, image_size))
    assert logits.shape == (2, NUM_CLASSES)
    logits.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", ZOO)
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


@pytest.mark.parametrize("name", ZOO)
def test_head_is_the_only_non_backbone_part(name):
    model = build_model(name, NUM_CLASSES)
    assert isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.num_features
    head_params = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert head_params == {"head.weight", "head.bias"}


@pytest.mark.parametrize("name", ZOO)
def test_reset_classifier_keeps_backbone(name):
    model = build_model(name, NUM_CLASSES, 1, 16)
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
    with pytest.raises(ValueError, match="image_size"):  # three max-pools need 8 pixels
        build_model("vgg8", NUM_CLASSES, image_size=4)


def test_cnn_is_the_seeds_unpadded_network_and_cnn_padded_keeps_the_size():
    linear = {n: build_model(n, 10, 3, 32).stages["pooled"][1] for n in ("cnn", "cnn_padded")}
    assert linear["cnn"].in_features == 64 * 6 * 6  # 32 -conv-> 30 -pool-> 15 -conv-> 13 -pool-> 6
    assert linear["cnn_padded"].in_features == 64 * 8 * 8
    assert build_model("cnn", 10, 1, 10)(torch.zeros(2, 1, 10, 10)).shape == (2, 10)
    with pytest.raises(ValueError, match="cnn needs images of at least 10 pixels a side, got 9"):
        build_model("cnn", 10, 1, 9)
    assert build_model("cnn_padded", 10, 1, 4)(torch.zeros(2, 1, 4, 4)).shape == (2, 10)


@pytest.mark.parametrize(
    "name,low,high",
    [
        # RepDistiller/CRD report 0.28M, 0.86M, 1.7M, 1.2M, 7.4M parameters for 100 classes.
        ("resnet20", 0.25e6, 0.30e6),
        ("resnet56", 0.84e6, 0.88e6),
        ("resnet110", 1.70e6, 1.76e6),
        ("resnet8x4", 1.1e6, 1.3e6),
        ("resnet32x4", 7.3e6, 7.5e6),
        # RepDistiller's wrn_16_2, wrn_40_2, vgg8, vgg13, mobile_half, ShuffleV2 (±5%).
        ("wrn_16_2", 0.70e6 * 0.95, 0.70e6 * 1.05),
        ("wrn_40_2", 2.25e6 * 0.95, 2.25e6 * 1.05),
        ("vgg8", 3.96e6 * 0.95, 3.96e6 * 1.05),
        ("vgg13", 9.46e6 * 0.95, 9.46e6 * 1.05),
        ("mobilenetv2", 0.81e6 * 0.95, 0.81e6 * 1.05),
        ("shufflenetv2", 1.36e6 * 0.95, 1.36e6 * 1.05),
    ],
)
def test_param_counts_match_literature(name, low, high):
    assert low <= count_params(build_model(name, 100)) <= high


def test_count_params_includes_frozen():
    model = build_model("cnn", NUM_CLASSES)
    total = count_params(model)
    model.requires_grad_(False)
    assert count_params(model) == total


@pytest.mark.parametrize("name", ZOO)
def test_config_rebuilds_the_model(name):
    model = build_model(name, 3, in_channels=1, image_size=28).eval()
    json.dumps(model.config)  # plain types only
    assert model.config == {"name": name, "num_classes": 3, "in_channels": 1, "image_size": 28}
    twin = build_model(**model.config).eval()
    twin.load_state_dict(model.state_dict())
    x = _input(1, 28)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_lstm_reads_one_row_per_step():
    model = build_model("lstm_rows", NUM_CLASSES, 3, 16)
    _, feats = model.forward_with_features(_input(3, 16))
    assert feats["rows"].shape == (2, 16, 128)
    torch.testing.assert_close(feats["pooled"], feats["rows"][:, -1])


# Small torchvision models: resnet50's state_dict alone is ~100 MB on disk.
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_weights_file_loads_the_whole_backbone(name, tmp_path):
    torch.manual_seed(1)
    state = getattr(torchvision.models, name)().state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, 1, 16, weights=str(path))
    head = "fc." if name.startswith("resnet") else "classifier.3."
    expected = [v for k, v in state.items() if not k.startswith(head)]
    loaded = [v for k, v in model.state_dict().items() if not k.startswith("head.")]
    assert len(loaded) == len(expected)
    for ours, theirs in zip(loaded, expected, strict=True):
        assert torch.equal(ours, theirs)
    assert model.head.out_features == NUM_CLASSES
    assert "weights" not in model.config  # a checkpoint rebuild must never fetch weights again
    twin = build_model(**model.config)  # random init, which the checkpoint's weights overwrite
    assert not torch.equal(next(iter(twin.state_dict().values())), expected[0])


def test_missing_weights_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(ValueError) as err:
        build_model("resnet18", NUM_CLASSES, weights=str(path))
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("error", [URLError("no route to host"), RuntimeError("hash\nmismatch")])
def test_failed_imagenet_download_is_one_line(monkeypatch, error):
    def offline(**kwargs):
        raise error

    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    with pytest.raises(ValueError) as err:
        build_model("resnet18", NUM_CLASSES, weights="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert "resnet18" in message and "download" in message
    assert "model.weights=/path/to/file.pth" in message


def test_weights_only_apply_to_torchvision_models():
    with pytest.raises(ValueError, match="model.weights applies to") as err:
        build_model("wrn_16_2", NUM_CLASSES, weights="imagenet")
    for name in TORCHVISION_MODELS:
        assert name in str(err.value)


def test_torchvision_models_take_one_or_three_channels():
    with pytest.raises(ValueError, match="1 or 3"):
        build_model("resnet18", NUM_CLASSES, in_channels=2)
