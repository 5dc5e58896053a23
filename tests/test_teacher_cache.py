"""The teacher-output cache: per-image augmentation views, hits, verification, sweep reuse."""

# The loaders take Normalise / Order / Augment objects since issue 21 (at most 8 parameters);
# the constructor calls below changed with them, their assertions did not.

import json
import logging

import pytest
import torch

from distill_cli import checkpoint as ck
from distill_cli.config import check
from distill_cli.data import Augment, BatchLoader, Normalise, Order, TransferLoader
from distill_cli.kd.teacher_cache import TeacherCache, cache_key
from distill_cli.stages import run_stage
from tests.conftest import TINY

TGT = ["dataset=glyphs_target", "dataset.shots=3", "model=cnn", "stage.epochs=3",
       "stage.batch_size=16"]  # fmt: skip
NORM = Normalise([0.5], [0.25])


def _images(n=40):
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)


def _loader(x, seed=0, **kw):
    y = torch.arange(len(x)) % 3
    augment = Augment(2, flip=True, per_image_seed=7, views=kw.pop("aug_views", None))
    return BatchLoader(x, y, 8, NORM, order=Order(shuffle=True, seed=seed), augment=augment, **kw)


def _by_index(loader):
    out = {}
    for images, _ in loader:
        for i, img in zip(loader.last_index.tolist(), images, strict=True):
            out[i] = img
    return out


def test_per_image_views_do_not_depend_on_batch_order():
    x = _images()
    a, b = _loader(x, seed=0), _loader(x, seed=1)  # another student seed: another order
    for loader in (a, b):
        loader.set_epoch(3)
    ia, ib = _by_index(a), _by_index(b)
    assert ia.keys() == ib.keys() == set(range(40))
    assert all(torch.equal(ia[i], ib[i]) for i in ia)
    a.set_epoch(4)
    assert not all(torch.equal(ia[i], img) for i, img in _by_index(a).items())  # a new view


def test_views_cycle_and_batches_can_start_inside_an_epoch():
    x = _images()
    loader = _loader(x, aug_views=2)
    loader.set_epoch(1)
    one = _by_index(loader)
    loader.set_epoch(3)  # 3 % 2 == 1: the same view again, in another order
    assert all(torch.equal(one[i], img) for i, img in _by_index(loader).items())
    assert loader.view(3) == 1 and loader.last_view.eq(1).all()
    full = [b[0] for b in loader.batches()]
    tail = [b[0] for b in loader.batches(2)]
    assert all(torch.equal(p, q) for p, q in zip(full[2:], tail, strict=True))


def test_no_augmentation_means_one_view():
    loader = BatchLoader(_images(), torch.zeros(40), 8, NORM, augment=Augment(per_image_seed=0))
    assert {loader.view(e) for e in range(1, 5)} == {0}


def test_transfer_loader_epochs_repeat_exactly():
    lab, unl = _loader(_images(16)), _loader(_images(30), aug_views=None)
    loader = TransferLoader(lab, unl)
    runs = []
    for epochs in ([1, 2, 3], [3]):  # epoch 3 alone (a resume) equals epoch 3 after 1 and 2
        for e in epochs:
            loader.set_epoch(e)
            batches = [(x.clone(), y.clone(), loader.last_index.clone()) for x, y in loader]
        runs.append(batches)
    for (xa, ya, ia), (xb, yb, ib) in zip(*runs, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    assert (runs[0][0][2] >= 16).sum() == 8  # each step: 8 labelled + 8 unlabelled images


class _Teacher:
    def __init__(self):
        self.calls = 0
        self.weight = torch.randn(64, 5)

    def __call__(self, x):
        self.calls += 1
        return {"logits": x.flatten(1) @ self.weight}


def _epoch(cache, loader, epoch):
    loader.set_epoch(epoch)
    return [cache(x, loader.last_index, loader.last_view)["logits"] for x, _ in loader]


def test_cache_serves_a_repeated_view_without_the_teacher(tmp_path):
    teacher, loader = _Teacher(), _loader(_images(), aug_views=2)
    cache = TeacherCache(teacher, 40, tmp_path / "c.pt", "k")
    first = _epoch(cache, loader, 1)
    calls = teacher.calls
    _epoch(cache, loader, 2)  # view 0: new
    assert teacher.calls == 2 * calls and cache.misses == 80 and cache.hits == 0
    third = _epoch(cache, loader, 3)  # view 1 again: one live batch to verify, then all cached
    assert teacher.calls == 2 * calls + 1 and cache.hits == 40 and cache.verified
    loader.set_epoch(3)
    live = [teacher(x)["logits"] for x, _ in loader]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(third, live, strict=True))
    assert len(first) == len(third)


def test_cache_file_is_reused_by_the_next_job_and_checked(tmp_path):
    teacher, loader = _Teacher(), _loader(_images())
    path = tmp_path / "c.pt"
    cache = TeacherCache(teacher, 40, path, "k")
    _epoch(cache, loader, 1)
    cache.save(ck.atomic_write)
    again = TeacherCache(teacher, 40, path, "k")  # a later job of the sweep
    assert again.loaded == 40
    calls = teacher.calls
    _epoch(again, loader, 1)
    assert teacher.calls == calls + 1 and again.hits == 40 and again.verified  # 1 = the check


def test_a_wrong_cache_is_discarded_and_a_stale_key_ignored(tmp_path, caplog):
    teacher, loader = _Teacher(), _loader(_images())
    path = tmp_path / "c.pt"
    cache = TeacherCache(teacher, 40, path, "k")
    _epoch(cache, loader, 1)
    cache.save(ck.atomic_write)
    payload = torch.load(path, weights_only=True)
    next(iter(payload["views"].values()))["logits"] += 1.0  # not what the teacher says
    torch.save(payload, path)
    with caplog.at_level(logging.WARNING, logger="distill_cli"):
        bad = TeacherCache(teacher, 40, path, "k")
        out = _epoch(bad, loader, 1)
    assert bad.verified is False and "disagrees" in caplog.text
    loader.set_epoch(1)
    live = [teacher(x)["logits"] for x, _ in loader]
    assert all(torch.allclose(a, b) for a, b in zip(out, live, strict=True))
    assert TeacherCache(teacher, 40, path, "other-key").loaded == 0
    path.write_bytes(b"not a checkpoint")
    assert TeacherCache(teacher, 40, path, "k").loaded == 0
    assert cache_key({"a": 1}) == cache_key({"a": 1}) != cache_key({"a": 2})


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from distill_cli.cli import conf_dir

    out = tmp_path_factory.mktemp("cache") / "outputs"

    def make(*overrides):
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            cfg = compose("config", overrides=[f"out_dir={out}", *overrides])
        check(cfg)
        run_stage(cfg, None)

    make("stage=pretrain", "run=r", "dataset=glyphs_source", *TINY, "model=resnet8")
    make("stage=finetune", "run=r", *TGT, "stage.epochs=1")
    return out / "r", make


def _job(teacher_run, tag, *overrides):
    run_dir, make = teacher_run
    # one batch holds all 30 images: every job sees every (view, image) pair
    make("stage=distill", "run=r", f"tag={tag}", *TGT, "dataset.crop_padding=2",
         "stage.batch_size=32", *overrides)  # fmt: skip
    folder = run_dir / tag
    return folder, json.loads((folder / "manifest.json").read_text())


def test_jobs_of_a_sweep_share_the_teacher_cache(teacher_run):
    _, first = _job(teacher_run, "t1", "kd.temperature=1")
    folder, second = _job(teacher_run, "t2", "kd.temperature=8", "seed=3", "model=resnet8")
    assert first["teacher_cache"]["hit_rate"] == 0.0  # a fresh view each epoch: all new
    assert second["teacher_cache"]["hit_rate"] == 1.0  # another student, seed and T: all reused
    assert second["teacher_cache"]["verified"] is True
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["teacher_cache_hit_rate"] == 1.0


def test_cached_entries_equal_the_live_teacher(teacher_run):
    # float32: compared with the eval-mode teacher below (auto is bfloat16 on some CPUs)
    folder, manifest = _job(teacher_run, "v", "stage.aug_views=2", "kd=crd",
                            "stage.teacher_precision=float32")  # fmt: skip
    assert manifest["teacher_cache"]["hit_rate"] == pytest.approx(1 / 3, abs=0.01)  # epoch 3
    path = manifest["teacher_cache"]["file"]
    payload = torch.load(path, weights_only=True)
    teacher = ck.model_from_checkpoint(ck.load_checkpoint(folder.parent / "finetune" / "best.pt"))
    teacher.eval()
    ckpt = ck.load_checkpoint(folder.parent / "finetune" / "best.pt")
    indices = json.loads((folder / "indices.json").read_text())["train"]
    from distill_cli.data import convert, load_split

    split = load_split("glyphs_target", "data", True, False)
    x = convert(split.x, None, None)[indices]
    loader = BatchLoader(
        x,
        split.y[indices],
        32,
        Normalise(ckpt["mean"], ckpt["std"]),
        order=Order(shuffle=True),
        augment=Augment(2, per_image_seed=0, views=2),
    )
    loader.set_epoch(1)
    for images, _ in loader:
        with torch.no_grad():
            logits, feats = teacher.forward_with_features(images)
        entry = payload["views"][loader.view(1)]
        rows = torch.searchsorted(entry["index"], loader.last_index)
        assert torch.allclose(entry["logits"][rows], logits, atol=1e-4)
        assert torch.allclose(entry["pooled"][rows], feats["pooled"], atol=1e-4)


def test_the_switch_turns_the_cache_off(teacher_run):
    folder, manifest = _job(teacher_run, "off", "stage.teacher_cache=false")
    assert "teacher_cache" not in manifest
    assert "teacher_cache_hit_rate" not in json.loads((folder / "metrics.json").read_text())


def test_the_cache_key_records_the_teacher_preparation(teacher_run):
    exact = "stage.teacher_precision=float32"  # the tolerance below is float32's
    _, plain = _job(teacher_run, "prep_none", "stage.teacher_prep=none", exact)
    _, folded = _job(teacher_run, "prep_fold", "stage.teacher_prep=fold", exact)
    _, again = _job(teacher_run, "prep_none2", "stage.teacher_prep=none", "kd.temperature=2", exact)
    assert plain["teacher_prep"]["prep"] == "none" and folded["teacher_prep"]["prep"] == "fold"
    assert folded["teacher_prep"]["folded"] == 9 and folded["teacher_prep"]["max_error"] < 1e-3
    assert plain["teacher_cache"]["key"] != folded["teacher_cache"]["key"]
    assert plain["teacher_cache"]["hit_rate"] == 0.0  # no cached output of another preparation
    assert again["teacher_cache"]["key"] == plain["teacher_cache"]["key"]
    assert again["teacher_cache"]["hit_rate"] == 1.0


def test_auto_keeps_the_preparation_a_sweep_already_cached(teacher_run, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # compile's bookkeeping, not inductor
    views = ["stage.aug_views=3"]  # a key of its own: no other test cached these outputs
    _, first = _job(teacher_run, "auto_c1", *views, "stage.teacher_prep=compile")
    _, second = _job(teacher_run, "auto_c2", *views, "kd.temperature=2")  # the default, auto
    assert first["teacher_prep"]["prep"] == "compile" and "auto" not in first["teacher_prep"]
    auto = second["teacher_prep"]["auto"]
    assert auto["decision"] == "compile: the teacher cache holds its outputs"
    assert auto["estimated_teacher_s"] < auto["compile_after_s"]  # a short job, yet compiled
    assert second["teacher_prep"]["prep"] == "compile"
    assert second["teacher_cache"]["key"] == first["teacher_cache"]["key"]
    assert second["teacher_cache"]["hit_rate"] == 1.0
    _, third = _job(teacher_run, "auto_f", "stage.aug_views=4")  # nothing cached: a short job
    assert third["teacher_prep"]["prep"] == "fold"
    assert third["teacher_prep"]["auto"]["decision"] == "fold: too short a job to pay for a compile"
    assert third["teacher_prep"]["auto"]["forwards"] == 3  # min(3 epochs, 4 views) x 1 batch


@pytest.mark.parametrize("flag", ["amx_bf16", None])
def test_the_default_precision_follows_the_cpu_and_keys_the_cache(teacher_run, monkeypatch, flag):
    monkeypatch.setattr("distill_cli.kd.distillation.native_bf16_cpu", lambda: flag)
    _, auto = _job(teacher_run, f"auto_{flag}", "kd.temperature=3")
    _, exact = _job(teacher_run, f"exact_{flag}", "kd.temperature=3",
                    "stage.teacher_precision=float32")  # fmt: skip
    prep = auto["teacher_prep"]
    assert prep["precision"] == ("bfloat16" if flag else None)
    assert prep["precision_auto"].startswith("bfloat16" if flag else "as the student")
    assert exact["teacher_prep"]["precision"] == "float32"
    assert "precision_auto" not in exact["teacher_prep"]
    if flag:  # within the half-precision tolerance; its outputs cached under their own key
        assert prep["max_error"] <= prep["tolerance"] == 5e-2
        assert auto["teacher_cache"]["key"] != exact["teacher_cache"]["key"]
