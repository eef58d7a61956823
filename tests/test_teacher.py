"""Tests for kdjax.teacher: a frozen teacher prepared for inference, and its agreement check."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import EXP, randomize_batchnorms
from kdjax import augment, cli, models, teacher as teacher_lib
from kdjax.models import ModelSpec
from kdjax.step import freeze, pad_batch

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

SPEC = ModelSpec("cnn_tiny", 10, (28, 28, 1), compute_dtype="float32")


def _trained_like(seed=0):
    return randomize_batchnorms(SPEC.build(seed), seed)


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def _host(model):
    return jax.tree.map(np.asarray, nnx.state(model))


def test_prepare_folds_and_casts_a_copy_and_leaves_the_reference_alone():
    reference = _trained_like()
    before = _host(reference)
    x = jnp.asarray(_images(16), jnp.float32) / 255.0
    ref_logits = np.asarray(reference(x))

    prepared, prep = teacher_lib.prepare(reference, SPEC, dtype=jnp.bfloat16)
    assert prep == teacher_lib.Preparation(folded=2, batchnorms=2, dtype="bfloat16")
    assert prep.changed
    assert prep.describe() == ("2 of 2 BatchNorms folded into its convolutions, bfloat16 "
                               "weights and compute")
    # Every stored weight in the compute dtype, so the step reads half the bytes and casts none.
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(prepared))} == {jnp.dtype("bfloat16")}
    assert models.count_batchnorms(prepared) == 0 and models.count_batchnorms(reference) == 2
    jax.tree.map(np.testing.assert_array_equal, _host(reference), before)
    out = prepared(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_logits,
                               atol=0.05 * np.abs(ref_logits).max())

    folded, prep32 = teacher_lib.prepare(reference, SPEC, dtype=jnp.float32)
    assert prep32.changed and prep32.dtype == "float32"
    np.testing.assert_allclose(np.asarray(folded(x)), ref_logits, rtol=1e-4,
                               atol=1e-5 * np.abs(ref_logits).max())

    same, unchanged = teacher_lib.prepare(reference, SPEC, dtype=jnp.float32, fold_batchnorm=False)
    assert unchanged == teacher_lib.Preparation(folded=0, batchnorms=2, dtype="float32")
    assert not unchanged.changed
    np.testing.assert_array_equal(np.asarray(same(x)), ref_logits)


def _batches(images, batch_size):
    for i in range(0, len(images), batch_size):
        chunk = {"image": images[i:i + batch_size],
                 "label": np.zeros(len(images[i:i + batch_size]), np.int32)}
        yield pad_batch(chunk, batch_size)


def test_agreement_counts_real_examples_against_an_independent_count():
    reference = _trained_like(0)
    other = _trained_like(1)  # another network: agreement well below 1
    images = _images(50, seed=3)
    pre = augment.Preprocess(mean=(0.3,), std=(0.35,))
    x = (jnp.asarray(images, jnp.float32) / 255.0 - 0.3) / 0.35
    ref_logits, other_logits = np.asarray(reference(x)), np.asarray(other(x))
    expected = np.mean(ref_logits.argmax(-1) == other_logits.argmax(-1))
    assert 0.0 < expected < 1.0

    # 50 examples in batches of 16: the last batch has 14 padding rows, never counted
    got = teacher_lib.agreement(freeze(reference), freeze(other), _batches(images, 16), pre,
                                max_examples=1000)
    assert got.examples == 50
    assert got.top1 == pytest.approx(expected, abs=1e-9)
    assert got.max_abs_logit_diff == pytest.approx(np.abs(ref_logits - other_logits).max(),
                                                   rel=1e-5)
    # it stops after the batch that reaches max_examples
    first = teacher_lib.agreement(freeze(reference), freeze(other), _batches(images, 16), pre,
                                  max_examples=20)
    assert first.examples == 32
    assert first.top1 == pytest.approx(np.mean(ref_logits[:32].argmax(-1)
                                               == other_logits[:32].argmax(-1)), abs=1e-9)
    assert first.describe().startswith(f"top-1 agreement with its float32 self "
                                       f"{100 * first.top1:.2f}% on 32 eval examples")
    with pytest.raises(ValueError, match=r"max_examples \(config teacher.agreement_examples\) "
                                         r"must be >= 1 to compare, got 0"):
        teacher_lib.agreement(freeze(reference), freeze(other), _batches(images, 16), pre,
                              max_examples=0)


TINY = ["--config.train.steps=12", "--config.train.batch_size=32", "--config.eval.every_steps=12",
        "--config.train.log_every_steps=6", "--config.checkpoint.every_steps=12",
        "--config.eval.batch_size=64", "--no-progress"]


def _run(command, experiment, workdir, data_dir, *extra):
    return cli.main([command, "--config", f"{EXP}/{experiment}", "--workdir", str(workdir),
                     f"--config.data.data_dir={data_dir}", *TINY, *extra])


@pytest.fixture(scope="module")
def cnn_teacher(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher") / "cnn"
    assert _run("train", "teacher.py", workdir, data_dir, "--config.model.name=cnn_tiny") == 0
    return str(workdir)


def test_distill_reports_the_prepared_teacher_and_its_agreement(cnn_teacher, data_dir, tmp_path,
                                                                capsys):
    workdir = tmp_path / "kd"
    assert _run("distill", "kd.py", workdir, data_dir, f"--config.teacher.workdir={cnn_teacher}",
                "--config.teacher.agreement_examples=100") == 0
    out = capsys.readouterr().out
    # 150 eval examples in batches of 64: the check stops after the batch that reaches 100.
    assert (f"kdjax: teacher {cnn_teacher}: 2 of 2 BatchNorms folded into its convolutions, "
            f"float32 weights and compute; top-1 agreement with its float32 self 100.00% on "
            f"128 eval examples (max |logit difference| ") in out
    with open(os.path.join(workdir, "summary.json")) as f:
        [record] = json.load(f)["teacher_preparation"]
    assert record["workdir"] == cnn_teacher
    assert (record["folded"], record["batchnorms"], record["dtype"]) == (2, 2, "float32")
    assert (record["examples"], record["top1"]) == (128, 1.0)
    assert 0.0 <= record["max_abs_logit_diff"] < 1e-3


def test_a_preparation_that_changes_the_teacher_is_refused_before_training(
        cnn_teacher, data_dir, tmp_path, monkeypatch):
    # A defective fold that loses the scaled kernel of the second convolution (only its bias
    # written back: every image gets the same logits) must be caught, not distilled from.
    fold = models.fold_batchnorm

    def fold_losing_a_kernel(model):
        n = fold(model)
        model.conv2.conv.kernel[...] = jnp.zeros_like(model.conv2.conv.kernel[...])
        return n

    monkeypatch.setattr(models, "fold_batchnorm", fold_losing_a_kernel)
    workdir = tmp_path / "kd"
    with pytest.raises(ValueError) as err:
        _run("distill", "kd.py", workdir, data_dir, f"--config.teacher.workdir={cnn_teacher}",
             "--config.teacher.min_agreement=1.0")
    msg = str(err.value)
    assert msg.startswith(f"the teacher in {cnn_teacher!r}, prepared for inference (2 of 2 "
                          f"BatchNorms folded into its convolutions, float32 weights and "
                          f"compute), agrees with its float32 self on only ")
    assert ("below teacher.min_agreement=1.0; run it as trained with "
            "--config.teacher.compute_dtype=float32 --config.teacher.fold_batchnorm=False, or "
            "lower teacher.min_agreement") in msg
    assert not os.path.exists(workdir / "metrics.jsonl")


def test_unprepared_teacher_skips_the_check(cnn_teacher, data_dir, tmp_path, capsys):
    workdir = tmp_path / "kd"
    assert _run("distill", "kd.py", workdir, data_dir, f"--config.teacher.workdir={cnn_teacher}",
                "--config.teacher.fold_batchnorm=False",
                "--config.teacher.compute_dtype=float32") == 0
    out = capsys.readouterr().out
    assert (f"kdjax: teacher {cnn_teacher}: 0 of 2 BatchNorms folded into its convolutions, "
            f"float32 weights and compute\n") in out
    with open(os.path.join(workdir, "summary.json")) as f:
        [record] = json.load(f)["teacher_preparation"]
    assert "top1" not in record


@pytest.mark.parametrize("override, message", [
    ("--config.teacher.compute_dtype=float16",
     r"teacher.compute_dtype must be 'auto', 'float32' or 'bfloat16', got 'float16'"),
    ("--config.teacher.min_agreement=1.5",
     r"teacher.min_agreement is a fraction of examples, in \[0, 1\]; got 1.5"),
])
def test_bad_teacher_settings_are_named(cnn_teacher, data_dir, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _run("distill", "kd.py", tmp_path / "kd", data_dir,
             f"--config.teacher.workdir={cnn_teacher}", override)


def test_a_bfloat16_teacher_distils_end_to_end(cnn_teacher, data_dir, tmp_path, capsys):
    # bfloat16 is what "auto" gives on GPU/TPU; on this CPU it is asked for explicitly.
    workdir = tmp_path / "kd"
    assert _run("distill", "kd.py", workdir, data_dir, f"--config.teacher.workdir={cnn_teacher}",
                "--config.teacher.compute_dtype=bfloat16") == 0
    assert (f"kdjax: teacher {cnn_teacher}: 2 of 2 BatchNorms folded into its convolutions, "
            f"bfloat16 weights and compute; top-1 agreement with its float32 self "
            in capsys.readouterr().out)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    [record] = summary["teacher_preparation"]
    assert record["dtype"] == "bfloat16" and record["examples"] == 150
    assert record["top1"] >= 0.99 and 0.0 < record["max_abs_logit_diff"] < 1.0
    assert 0.0 <= summary["eval/teacher_agreement"] <= 1.0 and summary["steps"] == 12
