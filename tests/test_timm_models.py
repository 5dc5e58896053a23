"""timm models behind the shared interface: a BatchNormAct convnet, a ResNet and a ViT.

Tiny inputs throughout (16 or 32 pixels, batches of 2-4). The pretrained weights are read from
a Hugging Face cache built here in the hub's on-disk layout, since this machine has neither a
cache nor a network.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402  (timm brings safetensors)
from timm.layers import BatchNormAct2d  # noqa: E402

from distill_cli.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from distill_cli.cli import conf_dir  # noqa: E402
from distill_cli.config import ConfigError, check  # noqa: E402
from distill_cli.evaluation.export import export_model  # noqa: E402
from distill_cli.kd.features import FeatureDistiller, feature_shapes  # noqa: E402
from distill_cli.kd.teacher_cache import cache_key  # noqa: E402
from distill_cli.kd.teacher_prep import PreparedTeacher  # noqa: E402
from distill_cli.models import build_model  # noqa: E402
from distill_cli.models.fold import fold_batchnorm  # noqa: E402
from distill_cli.stages import run_stage  # noqa: E402
from tests.conftest import ONNX  # noqa: E402

# name -> (arch, kwargs, in_channels, image size)
ARCHS = {
    "bnact": ("mobilenetv3_small_100", None, 3, 32),  # BatchNormAct2d, SE, hard-swish
    "resnet": ("resnet10t", None, 3, 16),  # the glyphs' 16x16 pixels
    "vit": ("vit_tiny_patch16_224", {"img_size": 32}, 1, 32),  # a 2x2 grid of tokens
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        key: build_model("timm", 5, c, size, arch=arch, kwargs=kw)
        for key, (arch, kw, c, size) in ARCHS.items()
    }


def _x(key, batch=2):
    _, _, c, size = ARCHS[key]
    return torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(1))


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


@pytest.mark.parametrize("key", list(ARCHS))
def test_features_come_from_feature_info_and_every_parameter_learns(models, key):
    model = models[key]
    body = model.stages["body"]
    names = [f["module"] for f in body.feature_info]
    assert model.feature_names == (*names, "pooled")
    model.eval()
    x = _x(key)
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
        torch.testing.assert_close(model(x), logits)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
    assert tuple(feats) == model.feature_names and logits.shape == (2, 5)
    for name, info in zip(names, body.feature_info, strict=True):
        assert feats[name].dim() == 4 and feats[name].shape[1] == info["num_chs"], name
    assert feats["pooled"].shape == (2, model.num_features)
    model.train()
    model.forward_with_features(x)[0].sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.zero_grad(set_to_none=True)
    model.eval()


def test_the_vit_gives_token_grids_at_32_pixels(models):
    _, feats = models["vit"].forward_with_features(_x("vit"))
    assert len(feats) == 13 and feats["blocks.11"].shape == (2, 192, 2, 2)


def test_the_config_rebuilds_the_model_and_records_timm(models):
    import timm

    model = models["vit"]
    json.dumps(model.config)  # plain types: a checkpoint loads with weights_only=True
    assert model.config["arch"] == "vit_tiny_patch16_224"
    assert model.config["kwargs"] == {"img_size": 32}
    assert model.config["origin"] == {"timm": timm.__version__, "weights": None, "source": None,
                                      "sha256": None}  # fmt: skip
    twin = build_model(**model.config).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(_x("vit")), model(_x("vit")))
    assert twin.config == model.config
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert head == {"head.weight", "head.bias"}  # linear probes freeze all the rest


def test_reset_classifier_keeps_the_backbone():
    model = build_model("timm", 5, 3, 16, arch="resnet10t").eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    model.reset_classifier(7)
    assert model(_x("resnet")).shape == (2, 7) and model.config["num_classes"] == 7
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def _random_statistics(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.3, 3.0),
                              (m.weight.data, 0.5, 1.5), (m.bias.data, -0.3, 0.3)):  # fmt: skip
                t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return model.eval()


@pytest.mark.parametrize("key", ["bnact", "resnet"])
def test_folding_is_exact_and_covers_batchnormact(models, key):
    model = _random_statistics(models[key])
    count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    fused = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert count > 0 and (fused > 0) == (key == "bnact")
    folded, report = fold_batchnorm(model)
    assert report.folded == count and report.left == 0 and not report.untraced
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = _x(key, 3)
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
        logits_f, feats_f = folded.forward_with_features(x)
    assert _relative(logits_f, logits) < 1e-4
    for name in feats:
        assert _relative(feats_f[name], feats[name]) < 1e-4, name
    prepared = PreparedTeacher(model, names=model.feature_names[1:3], prep="fold")
    prepared(x)  # the exactness check against the plain teacher
    assert prepared.checked and prepared.info["folded"] == count
    assert prepared.info["max_error"] <= prepared.info["tolerance"]


@ONNX
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # timm's shape asserts, traced
def test_onnx_and_torchscript_exports_match_pytorch(models, tmp_path):
    onnx = export_model(models["bnact"], tmp_path / "m.onnx", "onnx", (3, 32, 32))
    script = export_model(models["vit"], tmp_path / "v.pt", "torchscript", (1, 32, 32))
    assert onnx["max_abs_diff"] < 1e-4 and script["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("method", ["fitnet", "at"])
def test_feature_methods_pair_a_cnn_student_with_timm_teachers(models, method):
    student = build_model("cnn_padded", 5, 1, 32)
    s_shapes = feature_shapes(student, 1, 32)
    t_shapes = feature_shapes(models["vit"], 1, 32)
    distiller = FeatureDistiller(method, s_shapes, t_shapes, num_samples=8)
    x = _x("vit")
    _, s_feats = student.forward_with_features(x)
    with torch.no_grad():
        _, t_feats = models["vit"].eval().forward_with_features(x)
    loss = distiller(s_feats, t_feats)
    loss.backward()
    assert torch.isfinite(loss) and student.stages["layer1"][0].weight.grad is not None


# --- weights: published (from the Hugging Face cache), a local file, and the refusals --------


def _fake_hub(root, arch, in_channels=3):
    """``root`` as a Hugging Face cache holding ``arch``'s published weights (random here)."""
    import timm

    torch.manual_seed(3)
    net = timm.create_model(arch, in_chans=in_channels)  # as published: with its classifier
    repo = net.pretrained_cfg["hf_hub_id"]
    folder = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, snapshot / "model.safetensors")
    return state, snapshot / "model.safetensors"


def test_pretrained_weights_load_offline_from_the_hugging_face_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state, file = _fake_hub(tmp_path / "hub", "mobilenetv3_small_100")
    model = build_model("timm", 5, 3, 32, arch="mobilenetv3_small_100", weights="pretrained")
    body = model.stages["body"].state_dict()
    assert body.keys() == {k for k in state if not k.startswith("classifier.")}
    for k, v in body.items():
        assert torch.equal(v, state[k]), k
    origin = model.config["origin"]
    assert origin["weights"] == "pretrained" and origin["source"] == str(file.resolve())
    assert len(origin["sha256"]) == 64 and "weights" not in model.config  # never fetched again
    grey = build_model("timm", 5, 1, 32, arch="mobilenetv3_small_100", weights="pretrained")
    stem = grey.stages["body"].conv_stem.weight  # timm sums the RGB filters for one channel
    torch.testing.assert_close(stem, state["conv_stem.weight"].sum(1, keepdim=True))


def _one_line_error(**kwargs):
    with pytest.raises(ValueError) as err:
        build_model("timm", 5, **kwargs)
    message = str(err.value)
    assert "\n" not in message and err.value.__cause__ is None
    return message


def test_pretrained_without_cache_or_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line_error(arch="resnet10t", weights="pretrained")
    assert "timm/resnet10t" in message and "not in the Hugging Face cache" in message
    assert "model.weights=/path/to/file" in message


def test_a_local_file_loads_and_a_wrong_one_is_refused(tmp_path):
    import timm

    net = timm.create_model("resnet10t", num_classes=1000)
    state = net.state_dict()
    torch.save({"state_dict": state}, tmp_path / "ok.pth")  # a training checkpoint's wrapper
    model = build_model("timm", 5, 3, 16, arch="resnet10t", weights=str(tmp_path / "ok.pth"))
    assert torch.equal(model.stages["body"].conv1[0].weight, state["conv1.0.weight"])
    assert model.config["origin"]["weights"] == "file"
    other = timm.create_model("resnet14t").state_dict()  # same keys, other widths
    torch.save(other, tmp_path / "other.pth")
    message = _one_line_error(arch="resnet10t", weights=str(tmp_path / "other.pth"))
    assert "shapes do not match" in message and "size mismatch" in message
    del state["layer1.0.conv1.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "missing.safetensors")
    message = _one_line_error(arch="resnet10t", weights=str(tmp_path / "missing.safetensors"))
    assert "keys do not match" in message and "layer1.0.conv1.weight" in message
    assert "not found" in _one_line_error(arch="resnet10t", weights=str(tmp_path / "no.pth"))


def test_refusals_are_one_line_naming_the_fix():
    assert "did you mean resnet18, resnet18d" in _one_line_error(arch="resnet18x")
    assert "needs model.arch" in _one_line_error()
    small = _one_line_error(arch="convnext_atto", image_size=16)
    assert "16x16" in small and "dataset.image_size=32" in small
    vit = _one_line_error(arch="vit_tiny_patch16_224", image_size=32)
    assert "+model.kwargs.img_size=32" in vit
    assert "do not fit" in _one_line_error(arch="resnet10t", kwargs={"no_such": 1})
    assert "set by distill-cli" in _one_line_error(arch="resnet10t", kwargs={"num_classes": 3})
    assert "weights=pretrained" in _one_line_error(arch="resnet10t", weights="imagenet")
    with pytest.raises(ValueError, match="model.arch applies to model=timm"):
        build_model("resnet8", 5, arch="resnet10t")


def test_the_config_group_and_its_rules():
    def cfg(*overrides):
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            return compose("config", overrides=["model=timm", *overrides])

    with pytest.raises(ConfigError, match="model.arch is required"):
        check(cfg())
    ok = cfg("model.arch=resnet10t", "+model.kwargs.drop_path_rate=0.1")
    check(ok)
    assert ok.model.kwargs == {"drop_path_rate": 0.1}
    check(cfg("model.arch=vit_tiny_patch16_224", "model.kwargs={img_size: 32}"))
    with pytest.raises(ConfigError, match="model.weights=pretrained"):
        check(cfg("model.arch=resnet10t", "model.weights=imagenet"))


def test_the_cache_key_holds_the_timm_version(monkeypatch):
    from importlib import metadata

    key = cache_key({"teacher_sha256": "x"})
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1")
    assert cache_key({"teacher_sha256": "x"}) != key


# --- a timm teacher through the stages: finetune (LP-FT), distill with feature KD, eval -------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A resnet10t teacher for the 30 glyph classes, finetuned, distilled into the seed's CNN."""
    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    teacher = build_model("timm", 30, 3, 16, arch="resnet10t")
    source = root / "teacher.pt"
    save_checkpoint(source, teacher, stage="pretrain", dataset={"name": "glyphs_source"},
                    mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
    common = [f"out_dir={root / 'outputs'}", "run=t", "device.threads=1"]
    target = ["dataset=glyphs_target", "dataset.shots=5", "stage.batch_size=16"]

    def stage(*overrides):
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            cfg = compose("config", overrides=[*common, *overrides])
        check(cfg)
        return run_stage(cfg)

    stage("stage=finetune", *target, f"stage.from={source}", "stage.mode=linear_then_full",
          "stage.epochs=2", "stage.probe_epochs=1")  # fmt: skip
    stage("stage=finetune", *target, f"stage.from={source}", "stage.mode=linear",
          "stage.epochs=1", "tag=probe")  # fmt: skip
    stage("stage=distill", *target, "model=cnn_padded", "kd=fitnet", "stage.epochs=1")
    stage("stage=eval", "stage.latency_runs=2", "stage.throughput_batch=4", "stage.plots=false")
    return root / "outputs" / "t", teacher


def test_finetune_swaps_the_head_and_keeps_the_lineage(pipeline):
    run, teacher = pipeline
    ckpt = load_checkpoint(run / "finetune" / "best.pt")
    assert ckpt["model"]["arch"] == "resnet10t" and ckpt["model"]["num_classes"] == 10
    assert ckpt["model"]["origin"] == teacher.config["origin"]
    model = model_from_checkpoint(ckpt)
    assert model.head.out_features == 10
    start = teacher.stages.state_dict()
    moved = [k for k, v in model.stages.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, start[k])]  # fmt: skip
    assert moved  # the full phase trained the backbone after the probe


def test_a_linear_probe_freezes_the_whole_timm_backbone(pipeline):
    run, teacher = pipeline
    model = model_from_checkpoint(load_checkpoint(run / "probe" / "best.pt"))
    start = teacher.stages.state_dict()
    for k, v in model.stages.state_dict().items():  # BatchNorm statistics too
        assert torch.equal(v, start[k]), k
    assert model.head.out_features == 10


def test_distill_folds_the_timm_teacher_and_eval_measures_it(pipeline):
    run, teacher = pipeline
    manifest = json.loads((run / "distill" / "manifest.json").read_text())
    prep = manifest["teacher_prep"]
    count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    assert prep["prep"] == "fold" and prep["folded"] == count and prep["left"] == 0
    assert prep["max_error"] <= prep["tolerance"]
    assert (run / "distill" / "best.pt").exists()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "macs" in text and "latency_ms_p50" in text
    assert metrics["finetune"]["model"] == "timm:resnet10t"  # the arch, in tables too
    finetune = json.loads((run / "finetune" / "metrics.json").read_text())
    assert finetune["model"] == "timm:resnet10t"
    versions = json.loads((run / "finetune" / "manifest.json").read_text())["versions"]
    assert versions["timm"] == timm.__version__ == manifest["versions"]["timm"]  # the teacher


def test_a_checkpoint_from_an_unknown_timm_arch_is_one_line_in_the_cli(pipeline, tmp_path):
    run, _ = pipeline
    ckpt = load_checkpoint(run / "finetune" / "best.pt")
    ckpt["model"]["arch"] = "resnet10x"  # e.g. from a newer timm
    torch.save(ckpt, tmp_path / "new.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "distill_cli", "distill", f"out_dir={tmp_path}", "run=x",
         "dataset=glyphs_target", f"stage.from={tmp_path / 'new.pt'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "resnet10x" in line]
    assert len(lines) == 1 and "did you mean" in lines[0], proc.stderr
