"""Feature distillation losses against values computed by hand; FeatureDistiller on real models."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_cli.kd.crd import NCE
from distill_cli.kd.features import (
    CRD,
    FEATURE_METHODS,
    FeatureDistiller,
    at_loss,
    feature_shapes,
    fitnet_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
)
from distill_cli.models import build_model

# --- pure losses -------------------------------------------------------------------------------


def test_fitnet_loss_by_hand_and_zero_when_equal():
    s = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]]]])
    t = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    assert fitnet_loss(s, t).item() == pytest.approx((1 + 4 + 1 + 4) / 4)
    assert fitnet_loss(s, s.clone()).item() == 0.0


def _avg_pool_2x(f):  # (C, 2H, 2W) nested lists -> (C, H, W), mean of each 2x2 block
    half = len(f[0]) // 2
    return [
        [
            [sum(c[2 * i + a][2 * j + b] for a in (0, 1) for b in (0, 1)) / 4 for j in range(half)]
            for i in range(half)
        ]
        for c in f
    ]


def _attention_by_hand(f, p):  # (C, H, W) nested lists -> normalised flat map
    channels = len(f)
    flat = [
        sum(abs(f[c][i][j]) ** p for c in range(channels)) / channels
        for i in range(len(f[0]))
        for j in range(len(f[0][0]))
    ]
    norm = math.sqrt(sum(v * v for v in flat))
    return [v / norm for v in flat]


def test_at_loss_matches_hand_computation_with_resizing():
    torch.manual_seed(0)
    same_s, same_t = torch.randn(2, 2, 2, 2), torch.randn(2, 3, 2, 2)
    big_s, small_t = torch.randn(2, 1, 4, 4), torch.randn(2, 3, 2, 2)
    p = 2.0
    expected = 0.0
    for s, t, pool in ((same_s, same_t, False), (big_s, small_t, True)):
        total = count = 0
        for b in range(2):
            fs = _avg_pool_2x(s[b].tolist()) if pool else s[b].tolist()
            a_s, a_t = _attention_by_hand(fs, p), _attention_by_hand(t[b].tolist(), p)
            total += sum((x - y) ** 2 for x, y in zip(a_s, a_t, strict=True))
            count += len(a_s)
        expected += total / count
    got = at_loss([same_s, big_s], [same_t, small_t], p=p)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_at_loss_zero_for_identical_features():
    f = torch.randn(3, 4, 5, 5)
    assert at_loss([f, f[:, :2]], [f.clone(), f[:, :2].clone()]).item() == pytest.approx(
        0, abs=1e-9
    )


def test_sp_loss_matches_numpy():
    torch.manual_seed(1)
    s, t = torch.randn(3, 2, 2, 2), torch.randn(3, 5)
    fs, ft = s.reshape(3, -1).double().numpy(), t.double().numpy()
    gs, gt = fs @ fs.T, ft @ ft.T
    gs = gs / np.linalg.norm(gs, axis=1, keepdims=True)
    gt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
    expected = ((gs - gt) ** 2).sum() / 9
    assert sp_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert sp_loss(s, s.clone()).item() == pytest.approx(0, abs=1e-10)


def _smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _rkd_by_hand(s, t, w_d, w_a):
    n = len(s)

    def distances(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        off = [d[i][j] for i in range(n) for j in range(n) if i != j]
        mean = sum(off) / len(off)
        return [[v / mean for v in row] for row in d]

    def angles(e):
        def unit(i, j):  # e_j - e_i, normalised; the zero vector stays zero
            v = [a - b for a, b in zip(e[j], e[i], strict=True)]
            norm = math.sqrt(sum(x * x for x in v))
            return [x / norm for x in v] if norm > 0 else v

        return [
            sum(a * b for a, b in zip(unit(i, j), unit(i, k), strict=True))
            for i in range(n)
            for j in range(n)
            for k in range(n)
        ]

    ds, dt = distances(s), distances(t)
    loss_d = sum(_smooth_l1(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    a_s, a_t = angles(s), angles(t)
    loss_a = sum(_smooth_l1(x - y) for x, y in zip(a_s, a_t, strict=True)) / n**3
    return w_d * loss_d + w_a * loss_a


def test_rkd_loss_matches_hand_computation():
    s = [[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]]
    t = [[1.0, 1.0], [2.0, 0.0], [5.0, 4.0]]
    expected = _rkd_by_hand(s, t, 25.0, 50.0)
    assert rkd_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(expected, rel=1e-5)
    expected = _rkd_by_hand(s, t, 2.0, 0.5)
    got = rkd_loss(torch.tensor(s), torch.tensor(t), distance_weight=2.0, angle_weight=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_rkd_loss_zero_for_identical_embeddings():
    e = torch.randn(4, 6)
    assert rkd_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_pkt_loss_matches_numpy():
    s = np.array([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0], [-1.0, 2.0, 1.0]])
    t = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])

    def conditional(e):
        u = e / np.linalg.norm(e, axis=1, keepdims=True)
        k = (u @ u.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    p_s, p_t = conditional(s), conditional(t)
    expected = np.mean(p_t * np.log(p_t / p_s))
    got = pkt_loss(torch.tensor(s), torch.tensor(t))
    assert got.item() == pytest.approx(expected, rel=1e-4)
    assert pkt_loss(torch.tensor(s), torch.tensor(s)).item() == pytest.approx(0.0, abs=1e-9)


# --- CRD ---------------------------------------------------------------------------------------


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_crd_matches_the_nce_formula_by_hand():
    torch.manual_seed(0)
    n, k, temp = 5, 2, 0.5
    crd = CRD(student_dim=3, teacher_dim=4, num_samples=n, feat_dim=2, nce=NCE(k=k, t=temp))
    s, t, index = torch.randn(2, 3), torch.randn(2, 4), torch.tensor([4, 1])
    bank_s, bank_t = crd.memory_student.double().numpy(), crd.memory_teacher.double().numpy()
    params = {name: p.detach().double().numpy() for name, p in crd.named_parameters()}
    rng = torch.get_rng_state()
    got = crd(s, t, index).item()
    torch.set_rng_state(rng)
    # without labels every anchor draws uniformly from the other n - 1 rows, skipping its own
    r = (torch.rand(2, k) * (n - 1)).long()
    negatives = (r + (r >= index[:, None]).long()).numpy()

    e_s = _unit(s.double().numpy() @ params["embed_student.linear.weight"].T
                + params["embed_student.linear.bias"])  # fmt: skip
    e_t = _unit(t.double().numpy() @ params["embed_teacher.linear.weight"].T
                + params["embed_teacher.linear.bias"])  # fmt: skip
    expected = 0.0
    for anchor, bank in ((e_s, bank_t), (e_t, bank_s)):
        rows = [[int(index[b])] + list(negatives[b]) for b in range(2)]
        scores = np.array(
            [[math.exp(bank[r] @ anchor[b] / temp) for r in rows[b]] for b in range(2)]
        )
        probs = scores / (scores.mean() * n)  # Z estimated on the first batch
        noise = k / n
        for b in range(2):
            expected -= math.log(probs[b, 0] / (probs[b, 0] + noise + 1e-7)) / 2
            for j in range(1, k + 1):
                expected -= math.log(noise / (probs[b, j] + noise + 1e-7)) / 2
    assert got == pytest.approx(expected, rel=1e-5)


def test_crd_memory_follows_the_momentum_rule_and_z_is_set_once():
    torch.manual_seed(0)
    crd = CRD(student_dim=3, teacher_dim=4, num_samples=6, feat_dim=5, nce=NCE(k=3, m=0.25))
    old_s, old_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    s, t, index = torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 3])
    crd(s, t, index)
    with torch.no_grad():
        e_s, e_t = crd.embed_student(s), crd.embed_teacher(t)
    for bank, old, emb in ((crd.memory_student, old_s, e_s), (crd.memory_teacher, old_t, e_t)):
        assert torch.allclose(bank[index], F.normalize(0.25 * old[index] + 0.75 * emb), atol=1e-6)
        others = torch.tensor([1, 2, 4, 5])
        assert torch.equal(bank[others], old[others])
    z = (crd.z_student.item(), crd.z_teacher.item())
    assert min(z) > 0
    crd(torch.randn(2, 3) * 5, torch.randn(2, 4), torch.tensor([1, 2]))
    assert (crd.z_student.item(), crd.z_teacher.item()) == z
    assert {"memory_student", "memory_teacher", "z_student", "z_teacher"} <= set(crd.state_dict())


def test_crd_ignores_autocast():  # exp(score / 0.07) overflows float16
    torch.manual_seed(0)
    crd = CRD(student_dim=3, teacher_dim=3, num_samples=6, feat_dim=4, nce=NCE(k=3))
    s, t = torch.randn(2, 3).bfloat16(), torch.randn(2, 3).bfloat16()
    index = torch.tensor([0, 1])
    state, rng = {k: v.clone() for k, v in crd.state_dict().items()}, torch.get_rng_state()
    plain = crd(s.float(), t.float(), index).item()
    crd.load_state_dict(state)
    torch.set_rng_state(rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 matmuls would be off by ~1e-2
        assert crd(s, t, index).item() == pytest.approx(plain, rel=1e-6)


def test_crd_negatives_come_from_the_global_rng_and_are_capped():
    crd = CRD(student_dim=3, teacher_dim=3, num_samples=4, feat_dim=2)
    assert crd.k == 3  # nce_k=16384 capped at num_samples - 1
    s, t, index = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    state, rng = {k: v.clone() for k, v in crd.state_dict().items()}, torch.get_rng_state()
    first = crd(s, t, index)
    crd.load_state_dict(state)
    torch.set_rng_state(rng)  # what a resume restores
    assert torch.equal(crd(s, t, index), first)


def test_crd_negatives_never_share_a_known_class():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, -1, -1, -1])  # 7 labelled rows, 3 unlabelled
    crd = CRD(3, 3, num_samples=10, feat_dim=2, nce=NCE(k=64), labels=labels)
    assert crd.negative_draws == {"other_class": 7, "uniform": 3}
    index = torch.arange(10).repeat(20)
    negatives = crd.sample_negatives(index)
    assert negatives.shape == (200, 9)  # nce_k capped at num_samples - 1
    for row, drawn in zip(index.tolist(), negatives.tolist(), strict=True):
        if labels[row] >= 0:  # only labelled rows of the other classes
            assert all(labels[n] >= 0 and labels[n] != labels[row] for n in drawn), row
        else:  # an unlabelled row: any row but its own
            assert row not in drawn and all(0 <= n < 10 for n in drawn)
    # every candidate is drawn: class 2's anchors (rows 2, 5, 6) reach all of rows 0, 1, 3, 4
    assert set(negatives[index == 2].flatten().tolist()) == {0, 1, 3, 4}
    assert set(negatives[index == 7].flatten().tolist()) == set(range(10)) - {7}


def test_crd_uniform_negatives_and_a_single_class_fall_back_to_any_other_row():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1])
    uniform = CRD(3, 3, num_samples=4, feat_dim=2, nce=NCE(k=3, negatives="uniform"), labels=labels)
    assert uniform.negative_draws == {"other_class": 0, "uniform": 4}
    drawn = uniform.sample_negatives(torch.arange(4).repeat(50))
    assert set(drawn[::4].flatten().tolist()) == {1, 2, 3}  # row 0: its own class's row 2 too
    one_class = CRD(3, 3, num_samples=3, feat_dim=2, nce=NCE(k=2), labels=torch.tensor([0, 0, 0]))
    assert one_class.negative_draws == {"other_class": 0, "uniform": 3}
    with pytest.raises(ValueError, match="kd.nce_negatives='exact' is invalid; valid: other_cl"):
        CRD(3, 3, num_samples=3, nce=NCE(negatives="exact"))


def test_feature_distiller_records_the_crd_negatives():
    labels = torch.tensor([0, 1, 0, 1, -1, -1])
    d = FeatureDistiller("crd", SHAPES_S, SHAPES_T, num_samples=6, labels=labels, nce_k=4)
    assert d.record == {"crd_negatives": {"other_class": 4, "uniform": 2}}
    assert "class_order" not in d.state_dict()  # derived from the labels, not saved


def _crd_losses(lr, steps=40):
    torch.manual_seed(0)
    crd = CRD(student_dim=6, teacher_dim=6, num_samples=16, feat_dim=8, nce=NCE(k=8))
    student = torch.randn(4, 6, requires_grad=True)
    teacher, index = torch.randn(4, 6), torch.tensor([0, 5, 9, 13])
    params, losses = [student, *crd.parameters()], []
    for _ in range(steps):
        loss = crd(student, teacher, index)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param -= lr * grad
        losses.append(loss.item())
    return losses


def test_crd_loss_decreases_on_a_fixed_batch():
    trained, frozen = _crd_losses(lr=0.1), _crd_losses(lr=0.0)
    assert trained[0] == frozen[0]
    # the memory update alone does not lower the loss; gradient steps do
    assert sum(trained[-5:]) / 5 < 0.5 * trained[0]
    assert sum(trained[-5:]) < sum(frozen[-5:])


# --- FeatureDistiller on synthetic features ----------------------------------------------------

SHAPES_S = {"a": (2, 4, 4), "b": (3, 2, 2), "pooled": (5,)}
SHAPES_T = {"x": (3, 8, 8), "y": (4, 4, 4), "z": (6, 2, 2), "pooled": (7,)}


def _feats(shapes, batch=4, requires_grad=False):
    return {
        name: torch.randn(batch, *shape, requires_grad=requires_grad)
        for name, shape in shapes.items()
    }


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_feature_distiller_grads_reach_student_and_adapters_never_teacher(method):
    torch.manual_seed(0)
    distiller = (
        FeatureDistiller(method, SHAPES_S, SHAPES_T, num_samples=10, nce_k=4)
        if (method == "crd")
        else FeatureDistiller(method, SHAPES_S, SHAPES_T, num_samples=10)
    )
    s, t = _feats(SHAPES_S, requires_grad=True), _feats(SHAPES_T, requires_grad=True)
    loss = distiller(s, t, index=torch.tensor([0, 3, 5, 9]))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(f.grad is None for f in t.values()), "a teacher feature received a gradient"
    used = [s[name] for name in distiller.student_layers]
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in used)
    for name, param in distiller.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_feature_distiller_picks_the_documented_layers():
    def layers(method, **options):
        d = FeatureDistiller(method, SHAPES_S, SHAPES_T, num_samples=2, **options)
        return d.student_layers, d.teacher_layers

    assert layers("fitnet") == (["b"], ["y"])
    assert layers("fitnet", student_layer="a", teacher_layer="x") == (["a"], ["x"])
    assert layers("at") == (["a", "b"], ["y", "z"])
    assert layers("sp") == (["b"], ["z"])
    assert layers("rkd") == layers("pkt") == layers("crd") == (["pooled"], ["pooled"])
    tokens = {"tokens": (5, 8), "pooled": (8,)}
    assert FeatureDistiller("sp", tokens, SHAPES_T, 2).student_layers == ["pooled"]


@pytest.mark.parametrize(
    "student,teacher,conv",
    [
        ((3, 8, 8), (5, 4, 4), ("Conv2d", (3, 3), (2, 2))),  # student twice the teacher
        ((3, 4, 4), (5, 8, 8), ("ConvTranspose2d", (4, 4), (2, 2))),  # student half
        ((3, 4, 4), (5, 4, 4), ("Conv2d", (1, 1), (1, 1))),
        ((3, 7, 7), (5, 4, 4), ("Conv2d", (4, 4), (1, 1))),  # kernel 1 + 7 - 4
    ],
)
def test_fitnet_adapter_is_repdistillers_convreg(student, teacher, conv):
    d = FeatureDistiller("fitnet", {"a": student, "pooled": (2,)},
                         {"b": teacher, "pooled": (2,)}, num_samples=1)  # fmt: skip
    layer, bn, relu = d.adapter
    assert (type(layer).__name__, layer.kernel_size, layer.stride) == conv
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert layer.padding == ((1, 1) if layer.stride == (2, 2) else (0, 0))
    s, t = torch.randn(2, *student), torch.randn(2, *teacher)
    assert d.adapter(s).shape == t.shape
    d.eval()
    with torch.no_grad():  # the hint loss is the MSE of the adapted student map, no pooling
        expected = F.mse_loss(d.adapter(s), t)
    assert d({"a": s}, {"b": t}).item() == pytest.approx(expected.item(), rel=1e-6)


def test_fitnet_default_teacher_layer_is_one_the_adapter_reaches():
    student = {"a": (4, 8, 8), "b": (8, 2, 2), "pooled": (8,)}
    teacher = {"stem": (4, 16, 16), "x": (4, 16, 16), "y": (8, 8, 8), "z": (16, 4, 4),
               "pooled": (16,)}  # fmt: skip
    # the middle teacher map y (8x8) is out of reach from 2x2; z (4x4, twice) is the nearest
    d = FeatureDistiller("fitnet", student, teacher, num_samples=1)
    assert (d.student_layers, d.teacher_layers) == (["b"], ["z"])
    with pytest.raises(ValueError) as err:
        FeatureDistiller("fitnet", student, teacher, num_samples=1, teacher_layer="y")
    assert str(err.value) == (
        "kd=fitnet: the student's b map is 2x2 and the teacher's y map 8x8; the adapter needs a "
        "student map at least as large as the teacher's or half its size: teacher_layer "
        "fitting b: z (student layers: a, b)"
    )


def test_feature_distiller_errors_are_one_line_and_list_the_choices():
    tokens = {"tokens": (17, 64), "block1": (17, 64), "pooled": (64,)}
    with pytest.raises(ValueError) as err:
        FeatureDistiller("fitnet", tokens, SHAPES_T, num_samples=1)
    assert str(err.value).startswith(
        "kd=fitnet needs convolutional feature maps but the student gives none; use kd=sp, rkd, "
        "pkt, crd or a logit method"
    )
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="but the teacher gives none"):
        FeatureDistiller("at", SHAPES_S, tokens, num_samples=1)
    with pytest.raises(ValueError, match="but the student and the teacher give none"):
        FeatureDistiller("at", tokens, tokens, num_samples=1)
    with pytest.raises(ValueError, match="unknown feature kd method 'hint'; valid: fitnet, at, "):
        FeatureDistiller("hint", SHAPES_S, SHAPES_T, num_samples=1)
    with pytest.raises(ValueError, match="unknown option 'beta' for kd=rkd; valid: distance_w"):
        FeatureDistiller("rkd", SHAPES_S, SHAPES_T, num_samples=1, beta=1.0)
    with pytest.raises(ValueError, match="unknown option 'p' for kd=sp; valid: none"):
        FeatureDistiller("sp", SHAPES_S, SHAPES_T, num_samples=1, p=2)
    with pytest.raises(ValueError, match="student_layer 'pooled' is not a convolutional stage"):
        FeatureDistiller("fitnet", SHAPES_S, SHAPES_T, num_samples=1, student_layer="pooled")
    crd = FeatureDistiller("crd", SHAPES_S, SHAPES_T, num_samples=4)
    with pytest.raises(ValueError, match="kd=crd needs each sample's index"):
        crd(_feats(SHAPES_S), _feats(SHAPES_T))


# --- real models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    student = build_model("cnn", num_classes=3, in_channels=1, image_size=16)
    teacher = build_model("resnet8", num_classes=3, in_channels=1, image_size=16)
    return student, teacher.eval()


def test_feature_shapes_are_per_sample_and_modes_are_restored(pair):
    student, teacher = pair
    assert feature_shapes(student, 1, 16) == {
        "layer1": (32, 7, 7), "layer2": (64, 2, 2), "pooled": (128,),  # unpadded: 14/2, 5/2
    }  # fmt: skip
    assert student.training and not teacher.training
    assert feature_shapes(teacher, 1, 16)["layer3"] == (64, 4, 4) and not teacher.training
    vit = build_model("vit_tiny", num_classes=3, in_channels=1, image_size=16)
    with pytest.raises(ValueError, match="kd=fitnet needs convolutional feature maps but the stu"):
        FeatureDistiller("fitnet", feature_shapes(vit, 1, 16), feature_shapes(teacher, 1, 16), 8)


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_feature_distiller_smoke_on_real_models(pair, method):
    student, teacher = pair
    options = {"nce_k": 4, "feat_dim": 16} if method == "crd" else {}
    distiller = FeatureDistiller(
        method, feature_shapes(student, 1, 16), feature_shapes(teacher, 1, 16), 8, **options
    )
    student.zero_grad(set_to_none=True)
    x = torch.randn(4, 1, 16, 16)
    _, s_feats = student.forward_with_features(x)
    _, t_feats = teacher.forward_with_features(x)  # with grad: the distiller must detach
    loss = distiller(s_feats, t_feats, index=torch.tensor([0, 2, 4, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for name, param in distiller.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# --- which maps AT reads, per model family (RepDistiller's feat[1:-1]: no stem, no pooling) ----

AT_MAPS = {
    "resnet8": ["layer1", "layer2", "layer3"],
    "wrn_16_2": ["layer1", "layer2", "layer3"],
    "vgg8": ["layer1", "layer2", "layer3", "layer4"],
    "mobilenetv2": ["layer1", "layer2", "layer3", "layer4"],
    "shufflenetv2": ["layer1", "layer2", "layer3"],
    "cnn": ["layer1", "layer2"],  # no stem: both of its conv stages
}


@pytest.mark.parametrize("name", AT_MAPS)
def test_at_reads_every_map_after_the_stem(name):
    model = build_model(name, num_classes=5, in_channels=3, image_size=32)
    shapes = feature_shapes(model, 3, 32)
    d = FeatureDistiller("at", shapes, shapes, num_samples=1)
    assert d.student_layers == d.teacher_layers == AT_MAPS[name]


def test_at_pairs_the_last_maps_when_the_counts_differ():
    vgg = feature_shapes(build_model("vgg8", 5, 3, 32), 3, 32)
    resnet = feature_shapes(build_model("resnet8", 5, 3, 32), 3, 32)
    d = FeatureDistiller("at", vgg, resnet, num_samples=1)
    assert d.student_layers == ["layer2", "layer3", "layer4"]
    assert d.teacher_layers == ["layer1", "layer2", "layer3"]
    with pytest.raises(ValueError, match="kd=at needs convolutional feature maps but the student"):
        FeatureDistiller("at", {"stem": (3, 8, 8), "pooled": (3,)}, resnet, num_samples=1)
