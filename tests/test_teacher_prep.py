"""The prepared teacher: checked against the plain one, its fallback, precision and options."""

import logging

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_cli.config import ConfigError, StageError, check
from distill_cli.kd import teacher_prep
from distill_cli.kd.distillation import _prepared_teacher
from distill_cli.kd.teacher_prep import (
    TOLERANCE,
    PreparedTeacher,
    native_bf16_cpu,
    resolve,
    resolve_precision,
)
from distill_cli.models import build_model
from distill_cli.models.fold import fold_batchnorm
from tests.test_fold import random_statistics


def _teacher(name="resnet8", channels_last=False):
    torch.manual_seed(0)
    model = random_statistics(build_model(name, 10, 3, 16))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _batch(channels_last=False):
    x = torch.randn(8, 3, 16, 16)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def test_prepared_teacher_matches_the_plain_one_and_keeps_the_layout():
    teacher = _teacher(channels_last=True)
    prepared = PreparedTeacher(teacher, ["layer2", "pooled"], "fold")
    x = _batch(channels_last=True)
    out = prepared(x)  # the first call is the check
    assert prepared.checked is True and prepared.info["max_error"] <= TOLERANCE["float32"]
    assert prepared.info["channels_last"] is True and prepared.info["folded"] == 9
    with torch.no_grad():
        logits, feats = teacher.forward_with_features(x)
    assert out.keys() == {"logits", "layer2", "pooled"}
    assert torch.allclose(out["logits"], logits, atol=1e-5)
    assert torch.allclose(out["layer2"], feats["layer2"], atol=1e-5)
    # outputs made in inference mode are plain tensors again: a loss may save them for backward
    again = prepared(x)
    assert not again["logits"].is_inference()
    student = torch.randn(8, 10, requires_grad=True)
    F.mse_loss(student, again["logits"]).backward()
    assert student.grad is not None
    assert "9 BatchNorms folded, 0 left" in prepared.summary()


def _broken_fold(model):
    folded, report = fold_batchnorm(model)
    with torch.no_grad():
        folded.head.weight.add_(1.0)  # a preparation that changes the outputs
    return folded, report


def test_a_preparation_that_breaks_the_outputs_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(teacher_prep, "fold_batchnorm", _broken_fold)
    teacher = _teacher()
    prepared = PreparedTeacher(teacher, [], "fold")
    x = _batch()
    with caplog.at_level(logging.WARNING, logger="distill_cli"):
        out = prepared(x)
    assert prepared.checked is False and prepared.key()["prep"] == "none"
    assert "stage.teacher_prep=fold not used" in caplog.text
    assert "the plain teacher runs" in caplog.text
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    with torch.no_grad():
        plain = teacher(x)
    assert torch.equal(out["logits"], plain) and torch.equal(prepared(x)["logits"], plain)


def test_a_preparation_that_fails_falls_back(monkeypatch, caplog):
    def no_compiler(fn):
        def fail(x):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    prepared = PreparedTeacher(_teacher(), [], "compile")
    with caplog.at_level(logging.WARNING, logger="distill_cli"):
        prepared(_batch())
    assert prepared.checked is False and "InvalidCxxCompiler" in caplog.text
    assert "no working C++" in prepared.info["fallback"]


def test_compile_wraps_the_folded_forward(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or fn)
    prepared = PreparedTeacher(_teacher(), ["pooled"], "compile")
    prepared(_batch())
    assert len(compiled) == 1 and prepared.checked is True
    assert prepared.key()["prep"] == "compile" and "compiled" in prepared.summary()


def test_precision_is_the_teachers_own():
    teacher, x = _teacher(), _batch()
    bf16 = PreparedTeacher(teacher, ["pooled"], "fold", precision="bfloat16")
    out = bf16(x)  # the CPU runs the autocast code path a CUDA teacher takes
    assert out["logits"].dtype == torch.bfloat16 and bf16.checked is True
    assert bf16.info["tolerance"] == TOLERANCE["half"]
    fp32 = PreparedTeacher(teacher, [], "none", precision="float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the student's autocast
        assert fp32(x)["logits"].dtype == torch.float32
    assert fp32.checked is True


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    flags = {"amx": "fpu sse avx512f avx512_bf16 amx_bf16 amx_tile",
             "avx512": "fpu sse avx512f avx512_vnni avx512_bf16",
             "none": "fpu sse avx2 avx512f avx512_vnni"}  # fmt: skip
    found = {}
    for name, line in flags.items():
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {line}\n\nprocessor\t: 1\n")
        found[name] = native_bf16_cpu.__wrapped__(str(cpuinfo))
    assert found == {"amx": "amx_bf16", "avx512": "avx512_bf16", "none": None}
    assert native_bf16_cpu.__wrapped__(str(tmp_path / "absent")) is None  # not Linux


def test_auto_precision_is_bfloat16_only_for_a_float32_student_on_a_native_bf16_cpu():
    assert resolve_precision("auto", "cpu", False, "amx_bf16")[0] == "bfloat16"
    assert resolve_precision("auto", "cpu", False, None) == (
        None,
        "as the student (float32): no native bfloat16 on this CPU",
    )
    assert resolve_precision("auto", "cpu", True, "amx_bf16")[0] is None  # the student's bf16
    assert resolve_precision("auto", "cuda", False, "amx_bf16")[0] is None
    for asked in (None, "float32", "bfloat16", "float16"):  # asked for: kept, no reason
        assert resolve_precision(asked, "cpu", False, "amx_bf16") == (asked, None)


@pytest.mark.parametrize("flag", ["avx512_bf16", None])
def test_the_default_teacher_precision_follows_the_cpu(make_cfg, monkeypatch, flag):
    monkeypatch.setattr("distill_cli.kd.distillation.native_bf16_cpu", lambda: flag)
    cfg = make_cfg("stage=distill", "device=cpu")
    assert cfg.stage.teacher_precision == "auto"
    prepared = _prepared_teacher(cfg, _teacher(), [], torch.device("cpu"))
    out = prepared(_batch())
    assert prepared.checked is True and "precision_auto" in prepared.info
    if flag:  # bfloat16, within the half-precision tolerance of the float32 teacher
        assert out["logits"].dtype == torch.bfloat16
        assert prepared.key()["precision"] == "bfloat16"
        assert prepared.info["max_error"] <= TOLERANCE["half"]
        assert "precision bfloat16 (auto)" in prepared.summary()
    else:
        assert out["logits"].dtype == torch.float32 and prepared.key()["precision"] is None
    exact = _prepared_teacher(make_cfg("stage=distill", "device=cpu",
                                       "stage.teacher_precision=float32"),
                              _teacher(), [], torch.device("cpu"))  # fmt: skip
    assert exact(_batch())["logits"].dtype == torch.float32
    assert "precision_auto" not in exact.info


def test_the_cache_key_records_the_preparation():
    teacher = _teacher()
    keys = [PreparedTeacher(teacher, [], prep, precision).key()
            for prep, precision in (("none", None), ("fold", None), ("compile", None),
                                    ("fold", "bfloat16"), ("fold", "float32"))]  # fmt: skip
    assert len({str(k) for k in keys}) == len(keys)


def test_the_options_resolve_and_are_checked(make_cfg):
    assert resolve(None, compile=False) == "auto" and resolve(None, compile=True) == "compile"
    assert resolve("none", compile=True) == "none"
    cfg = make_cfg("stage=distill", "stage.teacher_prep=fast")
    with pytest.raises(ConfigError, match=r"stage.teacher_prep='fast' is invalid: expected one "
                                          r"of none, fold, compile, auto or null"):  # fmt: skip
        check(cfg)
    with pytest.raises(ConfigError, match="stage.teacher_precision"):
        check(make_cfg("stage=distill", "stage.teacher_precision=half"))
    cfg = OmegaConf.create({"stage": {"teacher_precision": "float16", "teacher_prep": None},
                            "device": {"compile": False}})  # fmt: skip
    with pytest.raises(StageError, match="float16 runs only on CUDA"):
        _prepared_teacher(cfg, _teacher(), [], torch.device("cpu"))


def test_a_renormalising_teacher_is_folded_inside_its_wrapper():
    from distill_cli.kd.distillation import NormalisedTeacher

    inner = _teacher()
    wrapped = NormalisedTeacher(inner, ([0.5] * 3, [0.25] * 3), ([0.4] * 3, [0.2] * 3)).eval()
    prepared = PreparedTeacher(wrapped, ["pooled"], "fold")
    x = _batch()
    out = prepared(x)
    assert prepared.checked is True and prepared.info["folded"] == 9
    with torch.no_grad():  # the re-normalisation still runs in front of the folded teacher
        want = inner(x * (0.25 / 0.2) + (0.5 - 0.4) / 0.2)
    assert torch.allclose(out["logits"], want, atol=1e-5)
    assert wrapped.teacher is inner and any(  # the wrapper's own teacher is left unfolded
        isinstance(m, torch.nn.BatchNorm2d) for m in inner.modules()
    )


def _timed(monkeypatch, folded_s, compiled_s):
    """``torch.compile`` marks its forward; ``_seconds`` reports these times for fold/compile."""
    compiled = set()

    def compile(fn):
        def run(x):
            return fn(x)

        compiled.add(run)
        return run

    def seconds(run, x, reps=3):
        run(x)
        return compiled_s if run.__closure__ and any(
            c.cell_contents in compiled for c in run.__closure__) else folded_s  # fmt: skip

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(teacher_prep, "_seconds", seconds)
    return compiled


def test_auto_folds_a_short_job_without_compiling(monkeypatch):
    compiled = _timed(monkeypatch, folded_s=0.5, compiled_s=0.1)
    prepared = PreparedTeacher(_teacher(), ["pooled"], "auto", forwards=100, compile_after_s=60)
    prepared(_batch())
    auto = prepared.info["auto"]
    assert auto["estimated_teacher_s"] == 50.0 and auto["forwards"] == 100  # 0.5 s x 100
    assert auto["decision"] == "fold: too short a job to pay for a compile"
    assert not compiled and prepared.key()["prep"] == "fold" and prepared.checked is True
    assert "auto: fold: too short" in prepared.summary()


def test_auto_compiles_a_long_job_when_the_compile_is_faster(monkeypatch):
    compiled = _timed(monkeypatch, folded_s=0.5, compiled_s=0.3)
    prepared = PreparedTeacher(_teacher(), ["pooled"], "auto", forwards=120, compile_after_s=60)
    x = _batch()
    prepared(x)
    assert prepared.info["auto"]["decision"] == "compile: estimated to pay for its compile"
    assert len(compiled) == 1 and prepared.key()["prep"] == "compile"
    assert prepared.info["auto"]["compiled_max_error"] <= TOLERANCE["float32"]
    with torch.no_grad():  # the compiled teacher now runs, and gives the plain teacher's logits
        assert torch.allclose(prepared(x)["logits"], prepared.plain(x), atol=1e-5)


def test_auto_keeps_the_fold_when_the_compile_is_no_faster_or_fails(monkeypatch, caplog):
    _timed(monkeypatch, folded_s=0.5, compiled_s=0.56)  # beyond the noise allowed (x1.1)
    slow = PreparedTeacher(_teacher(), [], "auto", forwards=1000, compile_after_s=60)
    slow(_batch())
    assert slow.info["auto"]["decision"] == "fold: the compiled forward measured slower"
    assert slow.key()["prep"] == "fold"
    _timed(monkeypatch, folded_s=0.5, compiled_s=0.54)  # within one batch's timing noise
    even = PreparedTeacher(_teacher(), [], "auto", forwards=1000, compile_after_s=60)
    even(_batch())
    assert even.key()["prep"] == "compile"

    def no_compiler(fn):
        def fail(x):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    failing = PreparedTeacher(_teacher(), [], "auto", forwards=1000, compile_after_s=60)
    with caplog.at_level(logging.WARNING, logger="distill_cli"):
        failing(_batch())
    assert failing.checked is True and failing.key()["prep"] == "fold"  # folded, not plain
    assert failing.info["auto"]["decision"].startswith("fold: compile failed (RuntimeError")
    assert "stage.teacher_prep=auto: compile failed" in caplog.text


def test_auto_follows_the_cache(monkeypatch):
    compiled = _timed(monkeypatch, folded_s=0.5, compiled_s=0.9)
    cached = PreparedTeacher(_teacher(), [], "auto", forwards=1000, compile_after_s=60)
    cached.cached = "fold"  # a long job, but its outputs are cached under fold: no compile
    cached(_batch())
    assert not compiled and cached.key()["prep"] == "fold"
    again = PreparedTeacher(_teacher(), [], "auto", forwards=1, compile_after_s=60)
    again.cached = "compile"  # compiled even for a short job, even if no faster: the key's
    again(_batch())
    assert again.key()["prep"] == "compile" and again.key("fold")["prep"] == "fold"
