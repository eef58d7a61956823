"""Language-model runs end to end through `kdjax` (kdjax.trainer with kdjax.lm.task, kdjax.lm.step): a tiny
teacher, its distilled student, exact resume after SIGKILL, the vocabulary check, eval, export,
and the step's token accounting."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import _float32
from conftest import ROOT
from kdjax import checkpoint, cli, export, losses, models, sharding
from kdjax.lm import packing, tokenizer as tokenizer_lib
from kdjax.lm.step import TokenObjective, make_lm_step
from kdjax.step import DeviceData, freeze, init_train_state

EXP = os.path.join(ROOT, "experiments", "lm")
pytestmark = pytest.mark.usefixtures("quick_compiles")
TINY = ["--config.data.name=tiny", "--config.train.batch_size=4", "--config.eval.batch_size=8",
        "--config.lm.eval_rows=16", "--config.lm.generate_tokens=6", "--config.lm.chunk_size=8",
        "--config.optimizer.warmup_steps=0", "--no-progress"]


def _args(command, experiment, workdir, text_dir, *extra, steps=8):
    return [command, "--config", f"{EXP}/{experiment}", "--workdir", str(workdir),
            f"--config.data.data_dir={text_dir}", f"--config.train.steps={steps}",
            f"--config.eval.every_steps={steps}", f"--config.checkpoint.every_steps={steps}",
            f"--config.train.log_every_steps={steps // 2}", *TINY, *extra]


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def teacher(text_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm") / "teacher"
    assert cli.main(_args("train", "teacher.py", workdir, text_dir, *NO_PROMPTS,
                          "--config.model.name=lm_tiny")) == 0
    return str(workdir)


NO_PROMPTS = ["--config.lm.prompts=()"]  # no generations: one compile less
# a student 2x narrower than lm_tiny
STUDENT = ["--config.model.name=lm_tiny", "--config.model.kwargs={'d_model': 16, 'd_ff': 32}"]


def _distill_args(workdir, text_dir, teacher, *extra, steps=8):
    return _args("distill", "distill.py", workdir, text_dir, f"--config.teacher.workdir={teacher}",
                 *STUDENT, *extra, steps=steps)


# checkpoints every 4 steps (the killed run resumes from one), logs every 3
KD = ["--config.checkpoint.every_steps=4", "--config.train.log_every_steps=3"]
KD_STEPS = 24


@pytest.fixture(scope="module")
def kd(teacher, text_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm") / "kd"
    assert cli.main(_distill_args(workdir, text_dir, teacher, *KD, steps=KD_STEPS)) == 0
    return workdir


def test_distill_summary_eval_and_export(kd, tmp_path):
    work = kd
    s = _summary(work)
    assert s["loss"] == "forward_kl" and s["steps"] == KD_STEPS and s["vocab_size"] == 259
    assert 1.0 < s["eval/perplexity"] < 259 and 0 <= s["eval/accuracy"] <= 1
    np.testing.assert_allclose(s["eval/perplexity"], np.exp(s["eval/loss"]))
    assert 0 <= s["eval/teacher_agreement"] <= 1 and s["eval/teacher_perplexity"] > 1
    assert [g["prompt"] for g in s["generations"]] == ["def __init__(self", "import os\nimport ",
                                                        "    for i in range(", "class "]
    [record] = s["teacher_preparation"]  # one record per teacher, as for images
    assert record["model"] == "lm_tiny"
    with open(work / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert {"train/ce", "train/kd", "train/accuracy", "train/agreement"} <= set(logged[0])
    # kdjax eval recomputes the same numbers from the checkpoint
    assert cli.main(["eval", "--workdir", str(work), "--no-progress"]) == 0
    with open(work / "eval.json") as f:
        again = json.load(f)
    for key in ("eval/loss", "eval/accuracy", "eval/teacher_agreement"):
        np.testing.assert_allclose(again[key], s[key], rtol=1e-6)
    assert again["generations"] == s["generations"]
    # the export is the student and its tokenizer
    out = tmp_path / "export"
    assert cli.main(["export", "--workdir", str(work), "--out", str(out)]) == 0
    model, _ = export.load(str(out))
    tok = tokenizer_lib.from_directory(str(out))
    assert isinstance(tok, tokenizer_lib.ByteTokenizer) and model.d_model == 16
    reader = checkpoint.RunReader(str(work))
    saved = reader.load_model(KD_STEPS, reader.model_spec(KD_STEPS))
    reader.close()
    for x, y in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(saved))):
        np.testing.assert_array_equal(x, y)


def test_vocabularies_that_differ_are_refused_before_training(teacher, text_dir, tmp_path):
    with pytest.raises(ValueError, match=r"the teacher in .* has a vocabulary of 259 tokens but "
                                         r"the student's has 300"):
        cli.main(_distill_args(tmp_path / "kd", text_dir, teacher,
                               "--config.model.num_classes=300"))
    assert not (tmp_path / "kd").exists()  # refused before its workdir was made


def _steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def test_sigkill_then_resume_is_bit_identical(kd, teacher, text_dir, tmp_path):
    baseline, work = kd, tmp_path / "run"
    args = _distill_args(work, text_dir, teacher, *KD, *NO_PROMPTS, steps=KD_STEPS)
    # the same XLA options as this process's (quick_compiles), or the last bits could differ
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdjax", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT,
                                  "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"})
    while proc.poll() is None and not _steps(work):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    killed_at = _steps(work)[-1]
    assert proc.returncode == -signal.SIGKILL and killed_at < KD_STEPS
    assert cli.main(args) == 0

    def saved(workdir):
        reader = checkpoint.RunReader(str(workdir))
        items = reader.manager.restore(KD_STEPS, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
        reader.close()
        return jax.tree.leaves({k: items[k] for k in ("model", "train")})

    a, b = saved(baseline), saved(work)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # parameters, optimizer state, PRNG key, data order: bit for bit
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def records(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items() if k != "train/tokens_per_s"}
                    for line in f]

    assert records(work) == records(baseline)
    assert _summary(work)["eval/loss"] == _summary(baseline)["eval/loss"]


def test_the_step_counts_only_same_document_targets():
    """The step's loss is the mean over exactly the positions whose target is the next token of
    the same document: padding and cross-document positions are neither summed nor counted."""
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(3, 40, n)) for n in (5, 9, 3, 7, 4)]
    tokens, segments = packing.pack(docs, 8)
    tokens, segments = tokens[:4], segments[:4]
    segments[3, 5:] = 0  # and some padding
    inputs = packing.model_inputs(tokens, segments)
    student = models.ModelSpec("lm_tiny", 40, (8,)).build(0)
    tx = optax.sgd(0.0)
    graphdef, state = init_train_state(student, tx, seed=0, num_examples=4)
    data = DeviceData({"tokens": jax.numpy.asarray(tokens),
                       "segments": jax.numpy.asarray(segments)}, batch_size=4)
    logits = jax.jit(lambda t, s: student(t, segment_ids=s))(inputs["tokens"],
                                                            inputs["segment_ids"])
    ce = np.asarray(losses.token_cross_entropy(logits, inputs["targets"]))
    step = make_lm_step(graphdef, tx, TokenObjective(), teacher=None, data=data,
                        mesh=sharding.make_mesh())
    _, metrics = step(state)  # (donates the state: the student's arrays are gone after)
    mask = inputs["loss_mask"]
    assert float(metrics["tokens"]) == mask.sum() < mask.size
    np.testing.assert_allclose(float(metrics["loss"]), ce[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ce_sum"]), ce[mask].sum(), rtol=1e-5)


def test_nan_skip_policy_drops_non_finite_updates():
    rng = np.random.default_rng(0)
    tokens, segments = packing.pack([list(rng.integers(3, 40, 30))], 8)
    student = models.ModelSpec("lm_tiny", 40, (8,)).build(0)
    tx = optax.sgd(1e30)
    graphdef, state = init_train_state(student, tx, seed=0, num_examples=len(tokens))
    step = make_lm_step(graphdef, tx, TokenObjective(), teacher=None, mesh=sharding.make_mesh(),
                        data=DeviceData({"tokens": jax.numpy.asarray(tokens),
                                         "segments": jax.numpy.asarray(segments)}, batch_size=2),
                        nan_policy="skip")
    for _ in range(3):
        state, metrics = step(state)
    assert int(state.bad_step) == 2 and int(metrics["skipped_steps"]) == 2  # steps 2 and 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_grad_accum_normalises_by_the_whole_batchs_tokens():
    """One batch of 8 rows and the same rows as 4 accumulated micro-batches of 2, padded
    unevenly (6 to 29 target tokens a micro-batch), give the same gradient: every micro-batch's
    token mean is weighed by its share of the batch's target tokens. The mean of the
    micro-batches' means, the bug grad_accum avoids, is far outside the tolerance."""
    rng = np.random.default_rng(1)
    tokens, segments = packing.pack([list(rng.integers(3, 40, 80))], 8)
    tokens, segments = tokens[:8], segments[:8]
    for row, kept in enumerate((9, 2, 9, 3, 8, 1, 9, 5)):
        segments[row, kept:] = 0
    teacher = freeze(models.ModelSpec("lm_tiny", 40, (8,)).build(1))
    objective = TokenObjective(divergence="forward_kl", ce_weight=0.5, kd_weight=0.5)
    # An "optimizer" that keeps the step's gradient as its state (an update would round it).
    tx = optax.GradientTransformation(
        lambda params: jax.tree.map(jax.numpy.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jax.numpy.zeros_like, grads), grads))

    steps = {}

    def gradient(rows, grad_accum):
        student = models.ModelSpec("lm_tiny", 40, (8,)).build(0)
        graphdef, state = init_train_state(student, tx, seed=0, num_examples=len(rows))
        data = DeviceData({"tokens": jax.numpy.asarray(tokens[rows]),
                           "segments": jax.numpy.asarray(segments[rows])}, batch_size=len(rows))
        if (len(rows), grad_accum) not in steps:
            steps[len(rows), grad_accum] = make_lm_step(
                graphdef, tx, objective, teacher=teacher, data=data, mesh=sharding.make_mesh(),
                grad_accum=grad_accum)
        # the rows are an argument of the compiled step: one compile per shape
        step = dataclasses.replace(steps[len(rows), grad_accum], data=data)
        state, metrics = step(state)
        return jax.device_get(state.opt_state), metrics, rows[np.asarray(state.perm)]

    whole, m1, _ = gradient(np.arange(8), 1)
    accumulated, m4, order = gradient(np.arange(8), 4)
    counts = [packing.model_inputs(tokens[order[j::4]], segments[order[j::4]])["loss_mask"].sum()
              for j in range(4)]
    assert len(set(counts)) > 2  # the micro-batches do hold different numbers of tokens
    assert float(m4["tokens"]) == float(m1["tokens"]) == sum(counts)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    n = int(m1["tokens"]) + 64  # summed over the batch's tokens, and a matmul over d_ff
    _float32.assert_trees_close(accumulated, whole, n=n)
    naive = jax.tree.map(lambda *g: sum(g) / 4,
                         *[gradient(order[j::4], 1)[0] for j in range(4)])
    worst = max(float(np.abs(a - b).max() / _float32.atol(n, np.abs(b).max()))
                for a, b in zip(jax.tree.leaves(naive), jax.tree.leaves(whole)))
    assert worst > 100
