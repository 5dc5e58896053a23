"""Schedules, evaluation and the fit loop on tiny data."""

import json
import math

import pytest
import torch

from distill_cli.data import BatchLoader, Normalise, Order
from distill_cli.models import build_model

# fit takes grouped objects since issue 21 (Step, Schedule, Checkpointing, Reporting); the
# calls below changed with it, their assertions did not.
from distill_cli.training import (
    Checkpointing,
    Reporting,
    Saver,
    Schedule,
    Step,
    TrainingError,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    evaluate,
    fit,
    lr_factor,
)


def test_lr_factor_schedules_by_hand():
    assert lr_factor(0, 100, "cosine", 10, [], 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, "cosine", 10, [], 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, "cosine", 10, [], 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, "cosine", 10, [], 0.1) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.5))
    )
    assert lr_factor(49, 100, "step", 0, [0.5, 0.75], 0.1) == pytest.approx(1.0)
    assert lr_factor(50, 100, "step", 0, [0.5, 0.75], 0.1) == pytest.approx(0.1)
    assert lr_factor(80, 100, "step", 0, [0.5, 0.75], 0.1) == pytest.approx(0.01)
    assert lr_factor(80, 100, "constant", 0, [], 0.1) == 1.0


class _Constant(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_evaluate_constant_model_by_hand():
    # always predicts class 0 (then 1, 2): top-1 = share of class 0, top-5 covers all 3 classes
    model = _Constant([2.0, 1.0, 0.0])
    y = torch.tensor([0, 0, 1, 2])
    batches = [(torch.zeros(2, 1), y[:2]), (torch.zeros(2, 1), y[2:])]
    scores = evaluate(model, batches)
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    nll = -(2 * p[0].log() + p[1].log() + p[2].log()).item() / 4
    assert scores["top1"] == pytest.approx(50.0)
    assert scores["top5"] == pytest.approx(100.0)
    assert scores["nll"] == pytest.approx(nll, rel=1e-5)


def _tiny_loaders():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = (torch.rand(64, 1, 8, 8, generator=gen) * 60).to(torch.uint8)
    x[y == 1, :, :4] += 150  # class 1 is bright at the top: learnable in a few steps
    norm = Normalise([0.3], [0.3])
    return BatchLoader(x, y, 16, norm, order=Order(shuffle=True)), BatchLoader(x, y, 64, norm)


def _ce(model, x, y):
    logits = model(x)
    return logits, {"loss": torch.nn.functional.cross_entropy(logits, y)}


def test_fit_learns_writes_metrics_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    train, val = _tiny_loaders()
    model = build_model("cnn_padded", num_classes=2, in_channels=1, image_size=8)
    opt = build_optimizer([{"params": list(model.parameters())}], "sgd", 0.05, momentum=0.9)
    sched = build_scheduler(opt, len(train) * 8, "cosine", 0, [], 0.1)
    saved = []
    summary = fit(
        Step(model, _ce, opt, sched),
        train,
        val,
        Schedule(8),
        Checkpointing(lambda name, epoch, acc, state, weights: saved.append((name, epoch, acc))),
        Reporting(tmp_path / "metrics.jsonl"),
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert {"train_loss", "train_acc", "val_acc", "lr", "images_per_sec"} <= rows[0].keys()
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (
        summary["best_val_acc"] == max(r["val_acc"] for r in rows) and summary["best_val_acc"] > 90
    )
    assert [s for s in saved if s[0] == "last"] == [
        ("last", r["epoch"], r["val_acc"]) for r in rows
    ]
    assert saved[-1][0] in ("best", "last")


def test_timed_checkpoints_hold_the_best_weights_until_the_next_write(tmp_path):
    torch.manual_seed(0)
    train, val = _tiny_loaders()
    model = build_model("cnn_padded", num_classes=2, in_channels=1, image_size=8)
    opt = build_optimizer([{"params": list(model.parameters())}], "sgd", 0.05, momentum=0.9)
    sched = build_scheduler(opt, len(train) * 6, "cosine", 0, [], 0.1)
    saved, snapshots = [], {}

    def save(name, epoch, acc, state, weights):
        saved.append((name, epoch))
        snapshots[name] = {k: v.clone() for k, v in (weights or model.state_dict()).items()}

    def remember(row):  # each epoch's weights, to compare the best snapshot with
        snapshots[row["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    summary = fit(
        Step(model, _ce, opt, sched),
        train,
        val,
        Schedule(6),
        Checkpointing(save, every_s=3600),
        Reporting(tmp_path / "m.jsonl", remember),
    )
    assert saved == [("best", summary["best_epoch"]), ("last", 6)]  # one write each, at the end
    best = snapshots[summary["best_epoch"]]
    assert all(torch.equal(best[k], snapshots["best"][k]) for k in best)


def test_saver_writes_when_its_interval_has_passed(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("distill_cli.training.time.monotonic", lambda: clock[0])
    writes = []
    saver = Saver(lambda *a: writes.append(a[:2]), interval_s=60)
    model = torch.nn.Linear(2, 2)
    saver.best(model, 1, 50.0)
    assert not saver.due() and writes == []
    clock[0] += 60
    assert saver.due()
    saver.flush(2, 40.0, {"epoch": 2})
    assert writes == [("best", 1), ("last", 2)] and not saver.due()
    Saver(None, 0).flush(3, None, {})  # torchrun's other processes write nothing


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path):
    train, _ = _tiny_loaders()
    model = build_model("cnn_padded", num_classes=2, in_channels=1, image_size=8)
    opt = build_optimizer([{"params": list(model.parameters())}], "sgd", 0.1)

    def nan_loss(model, x, y):
        logits = model(x)
        return logits, {"loss": logits.sum() * float("nan")}

    with pytest.raises(TrainingError, match="epoch 1, step 1"):
        fit(
            Step(model, nan_loss, opt, build_scheduler(opt, 4, "constant", 0, [], 0.1)),
            train,
            None,
            Schedule(1),
            Checkpointing(lambda *a: None),
            Reporting(tmp_path / "m.jsonl"),
        )


def test_clip_gradients_scales_the_joint_norm_by_hand():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    frozen = torch.nn.Parameter(torch.zeros(1))  # no gradient: left out
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])  # joint norm 5
    opt = build_optimizer([{"params": [a]}, {"params": [b, frozen]}], "sgd", 0.1)
    assert clip_gradients(opt, 1.0).item() == pytest.approx(5.0)
    assert (a.grad.item(), b.grad.item()) == pytest.approx((0.6, 0.8))  # 3/5, 4/5
    assert clip_gradients(opt, 10.0).item() == pytest.approx(1.0)  # under the cap: unchanged
    assert (a.grad.item(), b.grad.item()) == pytest.approx((0.6, 0.8))


def test_fit_with_clipping_caps_every_step_and_logs_the_norm(tmp_path):
    torch.manual_seed(0)
    train, _ = _tiny_loaders()
    model = build_model("cnn_padded", num_classes=2, in_channels=1, image_size=8)
    opt = build_optimizer([{"params": list(model.parameters())}], "sgd", 0.05)
    norms = []

    def seen(*_) -> None:  # the gradients each optimizer step gets
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    opt.register_step_pre_hook(seen)
    sched = build_scheduler(opt, len(train) * 2, "constant", 0, [], 0.1)
    fit(
        Step(model, _ce, opt, sched, clip_grad_norm=1e-3),
        train,
        None,
        Schedule(2),
        Checkpointing(lambda *a: None),
        Reporting(tmp_path / "m.jsonl"),
    )
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(norms) == 2 * len(train) and max(norms) <= 1e-3 * (1 + 1e-5)
    assert all(r["train_grad_norm"] > 1e-3 for r in rows)  # the norms before clipping


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimizer_takes_the_per_parameter_loops_steps(name):
    """build_optimizer's fused update is the textbook loop's arithmetic, up to float rounding."""
    torch.manual_seed(0)
    fast = build_model("cnn_padded", 3, 3, 8)
    slow = build_model("cnn_padded", 3, 3, 8)
    slow.load_state_dict(fast.state_dict())
    opt = build_optimizer([{"params": list(fast.parameters())}], name, 0.05, weight_decay=5e-4,
                          momentum=0.9, nesterov=True)  # fmt: skip
    assert opt.defaults["fused"] or opt.defaults["foreach"]
    kwargs = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    ref = cls(slow.parameters(), lr=0.05, weight_decay=5e-4, foreach=False, **kwargs)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    start = [p.detach().clone() for p in fast.parameters()]
    for _ in range(4):
        for model, o in ((fast, opt), (slow, ref)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # steps of 0.05: 1e-5 is rounding
    assert all(not torch.equal(a, b) for a, b in zip(fast.parameters(), start, strict=True))
