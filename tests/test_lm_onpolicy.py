"""On-policy distillation and sequence-level KD (kdjax.lm.onpolicy): the step samples with the
student's weights of that very step, λ = 0 is the supervised step's program, a generated batch
counts its generated tokens only (checked against numpy formulas), λ between mixes whole
batches, and every refusal comes before a run directory exists."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _float32 import assert_close
from conftest import ROOT
from kdjax import cli, models, sharding
from kdjax import plan as plan_lib
from kdjax.lm import onpolicy, packing, sampling
from kdjax.lm.step import TokenObjective, lm_parts, make_lm_step
from kdjax.step import DeviceData, freeze, init_train_state

EXP = os.path.join(ROOT, "experiments", "lm")
pytestmark = pytest.mark.usefixtures("quick_compiles")
V, SEQ, P, N = 40, 16, 4, 6


def _on_policy(fraction=1.0, generator="student", temperature=0.0):
    return plan_lib.OnPolicy(fraction=fraction, generator=generator, prompt_tokens=P,
                             max_new_tokens=N, temperature=temperature)


def _rows(count=6):
    rng = np.random.default_rng(0)
    tokens, segments = packing.pack([list(rng.integers(3, V, 25)) for _ in range(5)], SEQ)
    return tokens[:count], segments[:count]


def _spec():
    return models.ModelSpec("lm_tiny", V, (SEQ,))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(student, teacher, tokens, segments, generator="student"):
    """The λ = 1 step's loss terms by numpy: each row's first P tokens continued greedily by
    N tokens of `generator` (kdjax.lm.sampling.generate, its own program), the student's CE of
    the new tokens and the forward KL(teacher || student) at each position predicting one."""
    sampler = student if generator == "student" else teacher
    valid = (segments[:, :P] != 0).all(1)
    new = sampling.generate(sampler, tokens[:, :P].tolist(), max_new_tokens=N)
    rows = np.concatenate([tokens[:, :P], new], 1)
    log_s = _log_softmax(student(jnp.asarray(rows[:, :-1])))[:, P - 1:]
    log_t = _log_softmax(teacher(jnp.asarray(rows[:, :-1])))[:, P - 1:]
    kd = (np.exp(log_t) * (log_t - log_s)).sum(-1)[valid]
    ce = -np.take_along_axis(log_s, rows[:, P:, None], -1)[..., 0][valid]
    return {"kd": kd.sum(), "ce": ce.sum(), "tokens": kd.size, "kd_abs": np.abs(kd).sum()}


def _step(tx, objective, on_policy, rows, teacher, **kwargs):
    tokens, segments = rows
    student = _spec().build(0)
    graphdef, state = init_train_state(student, tx, seed=0, num_examples=len(tokens))
    data = DeviceData({"tokens": jnp.asarray(tokens), "segments": jnp.asarray(segments)},
                      batch_size=len(tokens))
    step = make_lm_step(graphdef, tx, objective, teacher=freeze(teacher), data=data,
                        mesh=sharding.make_mesh(), on_policy=on_policy, **kwargs)
    return graphdef, state, step


def test_generated_inputs_count_only_the_new_tokens():
    prompts = jnp.array([[5, 6, 7], [8, 9, 10]], jnp.int32)
    new = jnp.array([[11, 12], [13, 14]], jnp.int32)
    out = jax.device_get(onpolicy.generated_inputs(prompts, new, jnp.array([True, False]), 8))
    np.testing.assert_array_equal(out["tokens"][0], [5, 6, 7, 11, 12, 0, 0, 0])
    np.testing.assert_array_equal(out["targets"][0], [6, 7, 11, 12, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 0, 0, 0, 0])
    # positions 2 and 3 predict the new tokens 11 and 12; the second row's prompt was invalid
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 1, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(out["generated"], [1.0, 1.0])
    # tokens after the first end of document do not count; the eos itself does
    new = jnp.array([[2, 12], [13, 2]], jnp.int32)
    out = jax.device_get(onpolicy.generated_inputs(prompts, new, jnp.array([True, True]), 8,
                                                   eos=2))
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 0, 0, 0, 0, 0],
                                                     [0, 0, 1, 1, 0, 0, 0, 0]])


def test_sampling_uses_the_current_student_weights():
    """Each step generates with the parameters it starts from: after an update, and after the
    parameters are replaced between steps. Its KD term matches the numpy reference of those
    parameters' own greedy continuations, and is far from the stale parameters' reference."""
    rows = _rows()
    teacher = _spec().build(1)
    objective = TokenObjective(divergence="forward_kl", ce_weight=0.5, kd_weight=1.0)
    tx = optax.adam(0.05)
    graphdef, state, step = _step(tx, objective, _on_policy(), rows, teacher)

    references = {}

    def reference(name, params):
        if name not in references:
            student = nnx.merge(graphdef, params, state.model_state).student
            references[name] = _reference(student, teacher, *rows)
        return references[name]

    def check(name, params, metrics, stale=None):
        want = reference(name, params)
        n = SEQ * V
        assert float(metrics["tokens"]) == float(metrics["generated_sum"]) == want["tokens"]
        assert_close(float(metrics["kd_sum"]), want["kd"], n=n, magnitude=want["kd_abs"])
        # the student's own tokens are no CE targets: the loss is the KD term alone
        assert float(metrics["ce_sum"]) == 0.0
        assert_close(float(metrics["loss"]), want["kd"] / want["tokens"], n=n,
                     magnitude=want["kd_abs"] / want["tokens"])
        if stale is not None:
            old = references[stale]
            assert abs(old["kd"] - want["kd"]) > 100 * (abs(float(metrics["kd_sum"])
                                                            - want["kd"]) + 1e-4)

    first = jax.device_get(state.params)
    state, metrics = step(state)
    check("first", first, metrics)
    updated = jax.device_get(state.params)
    state, metrics = step(state)  # samples with the updated weights, not the first ones
    check("updated", updated, metrics, stale="first")
    other = jax.device_get(init_train_state(_spec().build(7), tx, seed=0)[1].params)
    state = state.replace(params=jax.tree.map(jnp.asarray, other))
    state, metrics = step(state)  # weights replaced between steps: it samples with them
    check("other", other, metrics, stale="updated")


def test_lambda_zero_is_the_supervised_step():
    """λ = 0 compiles the supervised step's very program, and computes the same numbers."""
    rows = _rows()
    teacher = _spec().build(1)
    objective = TokenObjective(divergence="jsd", kwargs={"beta": 0.3})
    tx = optax.sgd(0.1)
    _, state_a, supervised = _step(tx, objective, None, rows, teacher)
    _, state_b, zero = _step(tx, objective, _on_policy(fraction=0.0), rows, teacher)
    assert supervised.lower(state_a).as_text() == zero.lower(state_b).as_text()
    _, ma = supervised(state_a)
    _, mb = zero(state_b)
    assert jax.device_get(ma) == jax.device_get(mb)
    assert "generated_sum" not in ma


def test_sequence_level_kd_learns_the_teachers_tokens():
    """generator "teacher": the rows are the teacher's greedy continuations; the student's CE
    of them counts as well as the divergence, over the generated tokens only."""
    rows = _rows()
    teacher = _spec().build(1)
    objective = TokenObjective(divergence="forward_kl", ce_weight=0.5, kd_weight=1.0)
    graphdef, state, step = _step(optax.sgd(0.0), objective, _on_policy(generator="teacher"),
                                  rows, teacher)
    student = nnx.merge(graphdef, state.params, state.model_state).student
    want = _reference(student, teacher, *rows, generator="teacher")
    _, metrics = step(state)
    assert float(metrics["tokens"]) == float(metrics["generated_sum"]) == want["tokens"]
    assert_close(float(metrics["ce_sum"]), want["ce"], n=SEQ * V)
    assert_close(float(metrics["kd_sum"]), want["kd"], n=SEQ * V, magnitude=want["kd_abs"])
    assert_close(float(metrics["loss"]), (0.5 * want["ce"] + want["kd"]) / want["tokens"],
                 n=SEQ * V)


def test_a_fraction_between_mixes_whole_batches():
    """0 < λ < 1: each step's batch is either generated (every target token generated) or the
    corpus's (the supervised count, none generated), both happen, and sampling at temperature
    > 0 differs from greedy."""
    rows = _rows()
    corpus = int(packing.model_inputs(*rows)["loss_mask"].sum())
    teacher = _spec().build(1)
    objective = TokenObjective(divergence="reverse_kl")
    _, state, step = _step(optax.sgd(0.0), objective, _on_policy(0.5, temperature=1.0), rows,
                           teacher)
    kinds = []
    for _ in range(8):
        state, metrics = step(state)
        tokens, generated = float(metrics["tokens"]), float(metrics["generated_sum"])
        assert (tokens, generated) in ((corpus, 0.0), (len(rows[0]) * N, len(rows[0]) * N))
        kinds.append(generated > 0)
    assert 0 < sum(kinds) < len(kinds)


def test_every_refusal_comes_before_a_run_directory(text_dir, tmp_path):
    workdir = str(tmp_path / "run")

    def refused(match, *overrides):
        with pytest.raises(ValueError, match=match):
            cli.main(["distill", "--config", f"{EXP}/onpolicy.py", "--workdir", workdir,
                      f"--config.data.data_dir={text_dir}", "--config.data.name=tiny",
                      "--config.teacher.workdir=" + str(tmp_path / "teacher"), "--no-progress",
                      "--config.lm.on_policy.prompt_tokens=8",
                      "--config.lm.on_policy.max_new_tokens=8", *overrides])
        assert not os.path.exists(workdir)

    refused(r"lm.on_policy.fraction=1.5 is a probability .*: set it in \[0, 1\]",
            "--config.lm.on_policy.fraction=1.5")
    refused(r"lm.on_policy.fraction=-0.1 is a probability", "--config.lm.on_policy.fraction=-0.1")
    refused(r"lm.on_policy.prompt_tokens=8 \+ lm.on_policy.max_new_tokens=9 = 17 tokens exceed "
            r"the model's context of 16 positions \(the sequence length of data.name='tiny'\); "
            r"lower them to a sum of at most 16", "--config.lm.on_policy.max_new_tokens=9")
    refused(r"unknown loss.name='kl_forward'; valid names: \[.*'forward_kl'",
            "--config.loss.name=kl_forward")
    refused(r"lm.on_policy.generator='peer': expected one of \('student', 'teacher'\)",
            "--config.lm.on_policy.generator=peer")
    refused(r"lm.on_policy.temperature=-1.0 must be >= 0",
            "--config.lm.on_policy.temperature=-1.0")
    refused(r"lm.on_policy.max_new_tokens=0 must be >= 1",
            "--config.lm.on_policy.max_new_tokens=0")
    refused(r"teacher.cache='somewhere' holds targets for the corpus's tokens only",
            "--config.teacher.cache=somewhere", "--config.loss.name=forward_kl",
            "--config.loss.kwargs={}")
    refused(r"lm.cross_tokenizer='next_byte' aligns the teacher's tokenization of corpus text",
            "--config.lm.cross_tokenizer=next_byte", "--config.lm.chunk_size=0")
    with pytest.raises(ValueError, match=r"lm.on_policy.fraction=0.5 trains on generated tokens "
                                         r"that a teacher scores: run `kdjax distill`"):
        cli.main(["train", "--config", f"{EXP}/student_scratch.py", "--workdir", workdir,
                  f"--config.data.data_dir={text_dir}", "--config.data.name=tiny",
                  "--config.lm.on_policy.fraction=0.5", "--no-progress"])
    assert not os.path.exists(workdir)


def test_kdjax_distill_runs_on_policy_end_to_end(text_dir, tmp_path):
    """`kdjax distill --config experiments/lm/onpolicy.py` on the tiny corpus: its log reports
    the share of target tokens generated, in (0, 1) for λ = 0.5, and the run evaluates."""
    common = [f"--config.data.data_dir={text_dir}", "--config.data.name=tiny",
              "--config.train.batch_size=4", "--config.eval.batch_size=8",
              "--config.lm.eval_rows=8", "--config.lm.prompts=()", "--config.lm.chunk_size=8",
              "--config.optimizer.warmup_steps=0", "--config.model.name=lm_tiny",
              "--config.train.steps=4", "--config.eval.every_steps=4",
              "--config.checkpoint.every_steps=4", "--config.train.log_every_steps=4",
              "--no-progress"]
    teacher = str(tmp_path / "teacher")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", teacher,
                     *common]) == 0
    student = tmp_path / "student"
    assert cli.main(["distill", "--config", f"{EXP}/onpolicy.py", "--workdir", str(student),
                     f"--config.teacher.workdir={teacher}",
                     "--config.lm.on_policy.prompt_tokens=6",
                     "--config.lm.on_policy.max_new_tokens=10", *common]) == 0
    with open(student / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    train = next(r for r in logged if "train/generated" in r)
    assert 0 < train["train/generated"] < 1 and np.isfinite(train["train/loss"])
    with open(student / "summary.json") as f:
        assert json.load(f)["eval/perplexity"] > 1


def test_conversation_prompts_follow_the_documented_rule():
    """Of the conversations that begin inside a row (segment 2 on), the first whose prompt fits
    in the width, left-padded; a row without one keeps its first tokens and is not valid."""
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3],
                    [1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4, 0],
                    [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]])
    resp = np.array([[1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1],
                     # segment 1 began in the row before; segment 2's prompt is 5 > 4 long;
                     # segment 3 is plain text; segment 4's prompt is 3 long
                     [0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0],
                     [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    tokens = np.arange(10, 58).reshape(3, 16)
    prompts, pad, valid = jax.device_get(onpolicy.prompt_of_conversation(
        jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(resp), 4))
    np.testing.assert_array_equal(prompts, [[0, 0, 13, 14], [0, 37, 38, 39], [42, 43, 44, 45]])
    np.testing.assert_array_equal(pad, [2, 1, 0])
    np.testing.assert_array_equal(valid, [True, True, False])


def _instruction_rows(tmp_path):
    """A tiny instruction dataset (byte tokenizer, plain chat format) and each conversation's
    prompt and first response token, computed from the JSONL lines alone."""
    from kdjax.lm import data as text_data
    from kdjax.prepare.text import prepare_text

    lines = [{"prompt": "q" * (1 + i % 4), "response": "ab"[i % 2] * (1 + i % 3)}
             for i in range(10)]
    lines += [{"prompt": "a question far too long", "response": "no"}, {"text": "plain text"}]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    prepare_text([src], name="chat", data_dir=tmp_path / "d", seq_len=64, held_out=0)
    ds = text_data.open_text("chat", str(tmp_path / "d"))
    tok = ds.tokenizer()
    conversations = [([tok.bos, *tok.encode(f"user: {x['prompt']}\nassistant: ")],
                      tok.encode(x["response"])[0]) for x in lines if "prompt" in x]
    return ds, tok, conversations


def _expected_prompt(row, conversations, width):
    """The first conversation of `row`'s input tokens that starts after position 0, whose first
    response token is an input too and whose prompt is at most `width` tokens; or None."""
    found = []
    for prompt, first in conversations:
        pattern = [*prompt, first]
        for s in range(1, len(row) - len(pattern) + 1):
            if list(row[s:s + len(pattern)]) == pattern and len(prompt) <= width:
                found.append((s, prompt))
    return min(found)[1] if found else None


def test_instruction_rows_continue_their_conversations_prompts(tmp_path):
    """On instruction data each generated row starts with its conversation's prompt exactly
    (left-padded in the decode, moved to the row's start), continues it as the teacher does
    alone, counts only the generated tokens, and rows without a usable prompt count nothing;
    the same rows without their loss mask are plain text: prompts of their first tokens."""
    ds, tok, conversations = _instruction_rows(tmp_path)
    p, n = 24, 8
    rows = {k: jnp.asarray(v) for k, v in ds.rows("train").items()}
    spec = models.ModelSpec("lm_tiny", ds.vocab_size, (ds.seq_len,))
    teacher = spec.build(1)
    on_policy = plan_lib.OnPolicy(fraction=1.0, generator="teacher", prompt_tokens=p,
                                  max_new_tokens=n, temperature=0.0)
    parts = lm_parts(TokenObjective(divergence="forward_kl"), on_policy=on_policy, eos=tok.eos)
    key = jax.random.key(0)
    out = jax.device_get(parts.rollout(None, (teacher,), parts.inputs(rows, key), key))
    prompts = {b: _expected_prompt(row, conversations, p)
               for b, row in enumerate(np.asarray(rows["tokens"])[:, :-1])}
    # each prompt continued by the teacher alone, unpadded: one generate call per prompt length
    alone = {}
    for k in {len(q) for q in prompts.values() if q is not None}:
        same = [b for b, q in prompts.items() if q is not None and len(q) == k]
        alone.update(zip(same, sampling.generate(teacher, [prompts[b] for b in same],
                                                 max_new_tokens=n)))
    lengths, total = [], 0
    for b, prompt in prompts.items():
        if prompt is None:
            assert not out["loss_mask"][b].any()
            continue
        k = len(prompt)
        lengths.append(k)
        np.testing.assert_array_equal(out["tokens"][b, :k], prompt)
        np.testing.assert_array_equal(out["targets"][b, k - 1:k - 1 + n], alone[b])
        ends = np.flatnonzero(alone[b] == tok.eos)
        counted = n if not len(ends) else ends[0] + 1
        total += counted
        np.testing.assert_array_equal(np.flatnonzero(out["loss_mask"][b]),
                                      np.arange(k - 1, k - 1 + counted))
    # the data exercises the rule: rows of prompts of different lengths, and skipped rows
    assert len(set(lengths)) > 1 and 0 < len(lengths) < len(out["tokens"])
    assert len(conversations[-1][0]) > p
    # the train step (its data with the loss mask, every row in the batch) counts the same
    tx = optax.sgd(0.0)
    graphdef, state = init_train_state(spec.build(0), tx, seed=0, num_examples=len(out["tokens"]))
    step = make_lm_step(graphdef, tx, TokenObjective(divergence="forward_kl"),
                        teacher=freeze(teacher), data=DeviceData(rows, batch_size=len(
                            out["tokens"])), mesh=sharding.make_mesh(), on_policy=on_policy,
                        eos=tok.eos)
    _, metrics = step(state)
    assert float(metrics["tokens"]) == float(metrics["generated_sum"]) == total
    plain = jax.device_get(parts.rollout(None, (teacher,), parts.inputs(
        {k: v for k, v in rows.items() if k != "loss_mask"}, key), key))
    np.testing.assert_array_equal(plain["tokens"][:, :p], np.asarray(rows["tokens"])[:, :p])
    # prompts longer than every row's usable one: refused when the data loads, with the fix
    host = ds.rows("train")
    onpolicy.check_prompts(host, on_policy, data_name="chat", split="train")
    shortest = min(len(prompt) for prompt in map(lambda r: _expected_prompt(
        r[:-1], conversations, ds.seq_len), host["tokens"]) if prompt)
    with pytest.raises(ValueError, match=rf"lm.on_policy.prompt_tokens={shortest - 1}: no row of "
                                         rf"split 'train' of data.name='chat' has a conversation .*"
                                         rf"the shortest is {shortest} tokens: set lm.on_policy."
                                         rf"prompt_tokens >= {shortest}"):
        onpolicy.check_prompts(host, dataclasses.replace(on_policy, prompt_tokens=shortest - 1),
                               data_name="chat", split="train")
