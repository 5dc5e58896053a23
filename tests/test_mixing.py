"""Input mixing for distillation: the mixing arithmetic by hand, and what the teacher sees."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill_cli.kd.losses import UNLABELLED, masked_cross_entropy, mixed_cross_entropy
from distill_cli.kd.mixing import MIXERS, cutmix, draw, mixup
from distill_cli.kd.step import DistillStep, LiveTeacher, Mixing, refuse_mixing
from distill_cli.kd.terms import Context, LabelTerm, LogitTerm, build_terms


def test_mixup_is_the_convex_combination_by_hand():
    a, b = torch.full((1, 1, 2, 2), 10.0), torch.full((1, 1, 2, 2), 20.0)
    images = torch.cat([a, b])
    mixed, lam = mixup(images, torch.tensor([0.3, 0.75]), torch.tensor([1, 0]))
    assert torch.allclose(mixed[0], torch.full((1, 2, 2), 0.3 * 10 + 0.7 * 20))
    assert torch.allclose(mixed[1], torch.full((1, 2, 2), 0.75 * 20 + 0.25 * 10))
    assert lam.tolist() == pytest.approx([0.3, 0.75])


def test_draw_mixes_with_the_drawn_weights_and_pairing():
    images = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    mix = draw(images, "mixup", 1.0)
    assert ((mix.lam >= 0) & (mix.lam <= 1)).all()
    assert sorted(mix.partner.tolist()) == list(range(8))  # a permutation of the batch
    w = mix.lam.view(-1, 1, 1, 1)
    assert torch.allclose(mix.images, w * images + (1 - w) * images[mix.partner], atol=1e-6)
    torch.manual_seed(0)
    again = draw(images, "mixup", 1.0)  # the global generator: a resume draws the same
    assert torch.equal(again.images, mix.images)


def test_cutmix_pastes_a_box_of_the_partner_and_reports_the_kept_share():
    torch.manual_seed(1)
    own = torch.zeros(6, 1, 10, 10)
    own += torch.arange(6.0).view(-1, 1, 1, 1)  # image i is all i
    lam = torch.tensor([0.5, 0.9, 0.2, 1.0, 0.0, 0.64])
    partner = torch.tensor([1, 2, 3, 4, 5, 0])
    mixed, kept = cutmix(own, lam, partner)
    for i in range(6):
        mine = (mixed[i] == i).float().mean().item()
        theirs = (mixed[i] == partner[i]).float().mean().item()
        assert mine + theirs == pytest.approx(1.0)  # every pixel is one of the two images
        assert kept[i].item() == pytest.approx(mine)
    assert kept[3] == 1.0  # lam 1: nothing pasted


def test_unknown_mixing_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: none, mixup, cutmix"):
        draw(torch.zeros(2, 1, 2, 2), "mosaic", 1.0)
    assert list(MIXERS) == ["mixup", "cutmix"]


def test_mixed_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, UNLABELLED])
    lam, partner = torch.tensor([0.7, 0.4, 0.5]), torch.tensor([1, 2, 0])
    ce = lambda row, c: -F.log_softmax(logits[row], 0)[c].item()  # noqa: E731
    # image 0: 0.7 of label 0, 0.3 of label 1; image 1: 0.4 of label 1 (its partner has none);
    # image 2: unlabelled itself, 0.5 of its partner's label 0
    num = 0.7 * ce(0, 0) + 0.3 * ce(0, 1) + 0.4 * ce(1, 1) + 0.5 * ce(2, 0)
    expected = num / (0.7 + 0.3 + 0.4 + 0.5)
    assert mixed_cross_entropy(logits, labels, lam, partner).item() == pytest.approx(expected)
    # unmixed (lam 1) it is the masked cross-entropy
    ones = torch.ones(3)
    assert mixed_cross_entropy(logits, labels, ones, partner).item() == pytest.approx(
        masked_cross_entropy(logits, labels).item()
    )


class _Spy(torch.nn.Module):
    """A model that records its inputs and answers with fixed logits."""

    def __init__(self, classes=3):
        super().__init__()
        self.seen, self.w = [], torch.nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        self.seen.append(x.clone())
        return x.flatten(1)[:, : len(self.w)] + self.w


def test_the_teacher_sees_exactly_the_students_mixed_batch():
    torch.manual_seed(0)
    teacher, student = _Spy(), _Spy()
    loader = type("Loader", (), {"epoch": 1, "last_index": None, "last_view": None})()
    terms = [LabelTerm(0.5), LogitTerm(1.0, "kd", {"temperature": 2.0})]
    step = DistillStep(loader, LiveTeacher(lambda x: {"logits": teacher(x)}), terms,
                       Mixing("mixup", 1.0))  # fmt: skip
    x = torch.randn(4, 1, 2, 2)
    y = torch.tensor([0, 1, UNLABELLED, UNLABELLED])
    logits, parts = step(student, x, y)
    assert torch.equal(teacher.seen[0], student.seen[0])  # the same mixed images
    assert not torch.equal(student.seen[0], x)  # and they are mixed
    assert set(parts) == {"loss", "ce", "kd"}
    assert parts["loss"].item() == pytest.approx(0.5 * parts["ce"].item() + parts["kd"].item())


def test_a_method_that_reads_image_rows_refuses_mixing():
    ctx = Context(epochs=2, feature_distiller=lambda m, o: _FakeDistiller(), device="cpu")
    kd = {"name": "crd", "ce_weight": 1.0, "kd_weight": 0.0, "temperature": 4.0,
          "feat_weight": 0.8}  # fmt: skip
    terms = build_terms(kd, ctx)
    with pytest.raises(ValueError, match="kd=crd cannot distill mixed images"):
        refuse_mixing(terms, "crd")
    refuse_mixing(build_terms({"name": "kd", "ce_weight": 0.1, "kd_weight": 0.9,
                               "temperature": 4.0}, ctx), "kd")  # fmt: skip


class _FakeDistiller(torch.nn.Module):
    method, teacher_layers, student_layers, record = "crd", ["pooled"], ["pooled"], {}


def test_warmup_wraps_every_term_but_the_labels():
    ctx = Context(epochs=10, feature_distiller=None, device="cpu")
    terms = build_terms({"name": "kd", "ce_weight": 1.0, "kd_weight": 2.0, "temperature": 4.0,
                         "warmup_fraction": 0.5}, ctx)  # fmt: skip
    batch = type("B", (), {"epoch": 2})()
    assert [t.weight_at(batch) for t in terms] == [1.0, pytest.approx(2.0 * 2 / 5)]
    assert not math.isnan(terms[1].weight)
