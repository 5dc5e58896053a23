"""Checkpoint round trip, safe loading, and run-directory resolution."""

import os
import pickle

import pytest
import torch

from distill_cli import checkpoint as ck
from distill_cli.models import build_model


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = build_model("resnet8", num_classes=4, in_channels=1, image_size=16)
    digest = ck.save_checkpoint(tmp_path / "best.pt", model, epoch=3, mean=[0.5], std=[0.25])
    ckpt = ck.load_checkpoint(tmp_path / "best.pt")
    assert ckpt["epoch"] == 3 and ckpt["model"]["name"] == "resnet8"
    assert digest == ck.sha256(tmp_path / "best.pt")
    twin = ck.model_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(twin(x), model.eval()(x))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left behind


def test_a_checkpoint_of_the_old_padded_cnn_still_loads(tmp_path):
    padded = build_model("cnn_padded", num_classes=3, in_channels=1, image_size=16).eval()
    ck.save_checkpoint(tmp_path / "old.pt", padded)
    ckpt = ck.load_checkpoint(tmp_path / "old.pt")
    ckpt["model"]["name"] = "cnn"  # what versions before the cnn / cnn_padded split wrote
    twin = ck.model_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 1, 16, 16)
    assert twin.config["name"] == "cnn_padded" and torch.equal(twin(x), padded(x))
    unpadded = build_model("cnn", num_classes=3, in_channels=1, image_size=16)
    ck.save_checkpoint(tmp_path / "new.pt", unpadded)  # a checkpoint of today's cnn stays one
    assert ck.model_from_checkpoint(ck.load_checkpoint(tmp_path / "new.pt")).config["name"] == "cnn"


def test_compiled_prefix_is_not_saved(tmp_path):
    model = build_model("cnn", num_classes=2, in_channels=1, image_size=16)
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model  # what torch.compile's wrapper exposes
    ck.save_checkpoint(tmp_path / "c.pt", wrapper)
    keys = ck.load_checkpoint(tmp_path / "c.pt")["state_dict"].keys()
    assert not any(k.startswith("_orig_mod") for k in keys)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"format": ck.FORMAT, "x": _Boom()}, f)
    with pytest.raises(ck.CheckpointError, match="other than tensors and plain types"):
        ck.load_checkpoint("evil.pt")
    assert not (tmp_path / "pwned.txt").exists()


def test_truncated_checkpoint_names_the_file(tmp_path):
    model = build_model("cnn", num_classes=2, in_channels=1, image_size=16)
    ck.save_checkpoint(tmp_path / "last.pt", model)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(tmp_path / "last.pt")
    assert "last.pt" in str(err.value) and "\n" not in str(err.value)


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ck.CheckpointError, match="not a distill-cli checkpoint"):
        ck.load_checkpoint(tmp_path / "other.pt")


def test_find_checkpoint_prefers_best(tmp_path):
    model = build_model("cnn", num_classes=2, in_channels=1, image_size=16)
    ck.save_checkpoint(tmp_path / "last.pt", model)
    assert ck.find_checkpoint(tmp_path).name == "last.pt"
    ck.save_checkpoint(tmp_path / "best.pt", model)
    assert ck.find_checkpoint(tmp_path).name == "best.pt"
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.find_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ck.CheckpointError, match="holds no checkpoint"):
        ck.find_checkpoint(tmp_path / "empty")


def test_missing_upstream_says_which_command_to_run(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"run `distill-cli pretrain run=r1 \.\.\.` first"):
        ck.stage_input(tmp_path / "r1", "finetune", None)


def test_resolve_run_new_latest_and_explicit(tmp_path):
    assert ck.resolve_run(tmp_path, "mine", new=False) == ("mine", False)
    name, inferred = ck.resolve_run(tmp_path, None, new=True)
    assert inferred and len(name) == len("2026-01-01_00-00-00")
    with pytest.raises(ck.CheckpointError, match="no earlier run"):
        ck.resolve_run(tmp_path, None, new=False)
    (tmp_path / "r7").mkdir()
    ck.mark_latest(tmp_path, "r7")
    assert ck.resolve_run(tmp_path, None, new=False) == ("r7", True)


def test_move_aside_keeps_old_results(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "pretrain").mkdir(parents=True)
    (run_dir / "pretrain" / "metrics.json").write_text("{}")
    assert ck.has_results(run_dir / "pretrain")
    moved = ck.move_aside(run_dir / "pretrain", run_dir)
    assert (moved / "metrics.json").read_text() == "{}"
    assert moved.parent.name == ck.REPLACED and not (run_dir / "pretrain").exists()
