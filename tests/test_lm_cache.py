"""The teacher cache (kdjax.lm.cache, `kdjax cache-teacher`, teacher.cache): its round trip
within the stated bound, the resume of an interrupted cache, every refusal, and distillation
from it through the fused step (it trains, and its first loss is the online top-k loss)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from array_record.python import array_record_module

from conftest import ROOT
from kdjax import cli, losses, models, optim, sharding
from kdjax import plan as plan_lib
from kdjax.lm import cache as teacher_cache
from kdjax.lm.task import LanguageModelTask
from kdjax.step import init_train_state

EXP = os.path.join(ROOT, "experiments", "lm")
pytestmark = pytest.mark.usefixtures("quick_compiles")
K, ROWS_PER_SHARD = 8, 24
SMALL = ["--config.data.name=tiny", "--config.train.batch_size=4", "--config.eval.batch_size=8",
         "--config.lm.eval_rows=8", "--config.lm.prompts=()", "--config.lm.chunk_size=8",
         "--config.optimizer.warmup_steps=0", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(text_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cache") / "teacher")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", workdir,
                     f"--config.data.data_dir={text_dir}", "--config.model.name=lm_tiny",
                     "--config.train.steps=6", "--config.eval.every_steps=6",
                     "--config.checkpoint.every_steps=6", "--config.train.log_every_steps=6",
                     *SMALL]) == 0
    return workdir


@pytest.fixture(scope="module")
def cache(teacher, text_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "k8")
    assert cli.main(["cache-teacher", "--teacher", teacher, "--data", "tiny", "--data-dir",
                     text_dir, "--top-k", str(K), "--out", out, "--rows-per-shard",
                     str(ROWS_PER_SHARD), "--batch-size", "8"]) == 0
    return out


def _distill_plan(text_dir, cache_dir, **teacher):
    plan = plan_lib.as_plan({}, [a for a in SMALL if a.startswith("--config.")])
    return plan.replace(model={"name": "lm_tiny", "kwargs": {"d_model": 16, "d_ff": 32}},
                        loss={"name": "forward_kl", "ce_weight": 0.5, "kd_weight": 0.5},
                        data={"data_dir": text_dir, "eval_split": "validation"},
                        teacher={"cache": cache_dir, **teacher},
                        optimizer={"name": "adamw", "learning_rate": 3e-3})


def _open(plan):
    task = LanguageModelTask(plan)
    task.check(distill=True)
    return task, task.open_data(sharding.make_mesh())


def _exact_targets(teacher, text_dir):
    """The teacher's own top-K targets of every training row, and its rows."""
    plan = plan_lib.read_run(teacher).replace(data={"data_dir": text_dir})
    task = LanguageModelTask(plan)
    tokens, segments = task._dataset().load("train")
    model = task.load_teacher(teacher, task._student(), sharding.make_mesh()).model
    exact = teacher_cache.teacher_targets(model, K)(model.variables, tokens, segments)
    return jax.device_get(exact), tokens, segments


def test_round_trip_within_the_stated_bound(cache, teacher, text_dir):
    (lp, ids, log_tail), tokens, segments = _exact_targets(teacher, text_dir)
    ds = LanguageModelTask(plan_lib.read_run(teacher).replace(data={"data_dir": text_dir}))
    found = teacher_cache.open_cache(cache, ds._dataset(), "train", tokens, segments)
    layout = found.layout
    # 4 + 2 bytes of tail and range, 8 x 9 bits of values, Elias-Fano: 8 x 5 low bits and
    # 8 + (258 >> 5) + 1 = 17 high bits
    assert layout.token_bytes == 4 + 2 + 9 + 5 + 3 == 23
    assert found.records.shape == (len(tokens), 16, 23)
    got_lp, got_ids, got_tail = jax.device_get(layout.decode(found.records))
    order = np.argsort(ids, -1)
    np.testing.assert_array_equal(got_ids, np.take_along_axis(ids, order, -1))
    np.testing.assert_array_equal(got_tail, log_tail)  # float32, stored as it is
    # the stated bound: |d - d~| <= sqrt(d D) / L + D / (4 L^2) for d = log p_1 - log p_i, and
    # each decoded log-probability within twice the position's largest such error
    want = np.take_along_axis(lp, order, -1).astype(np.float64)
    d = want.max(-1, keepdims=True) - want
    top, levels = d.max(-1, keepdims=True), 2**9 - 1
    bound = np.sqrt(d * top) / levels + top / (4 * levels**2)
    err = np.abs(got_lp - want)
    assert (err <= 2 * bound.max(-1, keepdims=True) + 1e-6).all()
    assert 0 < err.max() < 0.05
    # the student's loss: the top-k KL of an untrained student within 1e-3 nats a token
    student = models.ModelSpec("lm_tiny", 259, (16,)).build(3)
    logits = student(tokens[:, :-1], segment_ids=segments[:, :-1])
    exact_kl = losses.token_topk_kl(logits, lp, ids, log_tail)
    cached_kl = losses.token_topk_kl(logits, got_lp, got_ids, got_tail)
    assert float(np.abs(np.asarray(cached_kl) - np.asarray(exact_kl)).mean()) < 1e-3


class _Killed(Exception):
    pass


def test_an_interrupted_cache_resumes_after_its_finished_shards(cache, teacher, text_dir,
                                                                tmp_path, monkeypatch):
    out = str(tmp_path / "cache")

    def kill_after_two(done, total):
        if done == 2:
            raise _Killed

    args = dict(top_k=K, data_dir=text_dir, batch_size=8, rows_per_shard=ROWS_PER_SHARD)
    def killed(*args):
        raise _Killed

    with monkeypatch.context() as m:  # killed in its first shard: nothing is left
        m.setattr(teacher_cache.Layout, "encode", killed)
        with pytest.raises(_Killed):
            teacher_cache.cache_teacher(teacher, "tiny", out, **args)
    assert not os.path.exists(out)
    with pytest.raises(_Killed):
        teacher_cache.cache_teacher(teacher, "tiny", out, on_shard=kill_after_two, **args)
    assert sorted(os.listdir(out)) == ["progress.json", "shard-00000.array_record",
                                       "shard-00001.array_record"]
    with pytest.raises(ValueError, match=r"is incomplete \(2 finished shards, no "
                                         r"manifest.json\).*run the same command again"):
        teacher_cache.read_manifest(out)
    with pytest.raises(ValueError, match=r"holds an interrupted teacher cache made with other "
                                         r"settings \(k, scheme differ\)"):
        teacher_cache.cache_teacher(teacher, "tiny", out, **{**args, "top_k": 4})
    # as a SIGKILL would leave it: the next shard cut short
    with open(os.path.join(out, "shard-00002.array_record"), "wb") as f:
        f.write(b"\x00" * 100)
    calls = []
    manifest = teacher_cache.cache_teacher(teacher, "tiny", out,
                                           on_shard=lambda d, t: calls.append(d), **args)
    with open(os.path.join(cache, "manifest.json")) as f:
        whole = json.load(f)
    assert calls == list(range(3, len(whole["shards"]) + 1)) and len(calls) >= 2
    assert manifest["shards"] == whole["shards"] and manifest["rows"] == whole["rows"]
    assert not os.path.exists(os.path.join(out, "progress.json"))


def _rewrite(path, records):
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()


def _read(path):
    reader = array_record_module.ArrayRecordReader(path)
    try:
        return reader.read_all()
    finally:
        reader.close()


def test_every_damaged_cache_is_refused(cache, text_dir, tmp_path):
    plan = _distill_plan(text_dir, "")

    def refused(directory, match, edit=None):
        copy = str(tmp_path / f"c{len(os.listdir(tmp_path))}")
        shutil.copytree(directory, copy)
        if edit is not None:
            edit(copy)
        with pytest.raises(ValueError, match=match):
            _open(plan.replace(teacher={"cache": copy}))

    first, second = "shard-00000.array_record", "shard-00001.array_record"

    def flip_a_byte(d):
        with open(os.path.join(d, second), "r+b") as f:
            f.seek(200)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 1]))

    def edit_manifest(d, change):
        with open(os.path.join(d, "manifest.json")) as f:
            m = json.load(f)
        change(m)
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(m, f)

    def swap_rows(d):  # a manifest that vouches for the wrong records
        path = os.path.join(d, first)
        records = _read(path)
        _rewrite(path, [records[1], records[0], *records[2:]])
        edit_manifest(d, lambda m: m["shards"][0].update(
            sha256=teacher_cache._file_sha256(path)))

    refused(cache, rf"is corrupt: shard {second} is changed \(its SHA-256 differs", flip_a_byte)
    refused(cache, rf"is corrupt: shard {second} is missing",
            lambda d: os.remove(os.path.join(d, second)))
    refused(cache, r"is corrupt: its shards hold other than the \d+ records of 384 bytes the "
                   r"manifest and the data have",
            lambda d: edit_manifest(d, lambda m: m["shards"].pop()))
    refused(cache, r"does not match the data: record 0's key is not the hash of row 0 of "
                   r"'tiny' split 'train'", swap_rows)
    refused(cache, r"is format 'kdjax-teacher-cache/0', this kdjax reads "
                   r"'kdjax-teacher-cache/1'",
            lambda d: edit_manifest(d, lambda m: m.update(format="kdjax-teacher-cache/0")))
    os.makedirs(tmp_path / "empty")
    refused(str(tmp_path / "empty"), r"is not a teacher cache \(.*manifest.json not found\); "
                                     r"make one with `kdjax cache-teacher")


def _prepare(root, name, *extra, seq_len=16, text="def f{j}(x):\n    return x + {j}\n"):
    src = root / f"src_{name}_{len(extra)}_{seq_len}"
    src.mkdir()
    for i in range(24):  # conftest's corpus, or another text
        (src / f"f{i}.py").write_text("".join(text.format(j=j) for j in range(i % 5 + 2)))
    out = str(root / f"data_{len(os.listdir(root))}")
    assert cli.main(["prepare", "text", "--from", str(src), "--name", name, "--seq-len",
                     str(seq_len), "--held-out", "0.2", "--data-dir", out, *extra]) == 0
    return out


def test_a_cache_for_other_data_or_settings_is_refused(cache, teacher, text_dir, tmp_path):
    def refused(match, data_dir=text_dir, **changes):
        plan = _distill_plan(data_dir, cache)
        with pytest.raises(ValueError, match=match):
            _open(plan.replace(**changes))

    remake = "make a cache for it with `kdjax cache-teacher --teacher"
    refused(rf"was made for seq_len 16, this run's data 'tiny' has seq_len 32; {remake}",
            _prepare(tmp_path, "tiny", seq_len=32))
    refused(r"was made with another tokenizer \('byte', fingerprint \w+\) than this run's "
            r"data 'tiny' \('hf'", _prepare(tmp_path, "tiny", "--tokenizer", "bpe",
                                               "--vocab-size", "300"))
    refused(r"was made for another packing of the documents .*'seed': 0.* than this run's "
            r"data 'tiny' .*'seed': 1", _prepare(tmp_path, "tiny", "--seed", "1"))
    refused(r"was made for other rows of 'tiny' split 'train' .*: the data was prepared again",
            _prepare(tmp_path, "tiny", text="def g{j}(y):\n    return y * {j}\n"))
    refused(r"was made for data 'tiny' split 'train', this run trains on 'other' split "
            r"'train'", _prepare(tmp_path, "other"), data={"name": "other"})
    refused(r"this run trains on 'tiny' split 'validation'", data={"train_split": "validation"})
    refused(r"teacher.top_k=4 but teacher.cache=.* holds the teacher's top 8; set "
            r"teacher.top_k=0", teacher={"top_k": 4})
    refused(rf"holds the targets of the teacher '{os.path.realpath(teacher)}', not of "
            r"teacher.workdir='elsewhere'", teacher={"workdir": "elsewhere"})
    moved = str(tmp_path / "moved")
    shutil.copytree(cache, moved)
    with open(os.path.join(moved, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["teacher"]["step"] = 3
    with open(os.path.join(moved, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    refused(r"holds the targets of step 3 of .*, whose latest checkpoint is now step 6; make "
            r"the cache again, or set teacher.workdir=''",
            teacher={"workdir": teacher, "cache": moved})
    refused(r"top-k distillation .* is a forward KL .* got loss.name='reverse_kl'; set "
            r"loss.name='forward_kl'", loss={"name": "reverse_kl"})
    refused(r"the top-k loss with the tail bucket \(teacher.top_k_loss='tail'\) is at "
            r"temperature 1 .* set loss.kwargs=\{'temperature': 1.0\}, or "
            r"teacher.top_k_loss='renorm'", loss={"kwargs": {"temperature": 2.0}})
    refused(r"teacher.top_k_loss must be one of \('tail', 'renorm'\), got 'all'",
            teacher={"top_k_loss": "all"})
    with pytest.raises(ValueError, match=r"`kdjax train` has no teacher: set teacher.cache=''"):
        LanguageModelTask(_distill_plan(text_dir, cache).replace(loss={"name": "ce"})).check(
            distill=False)
    # and cache-teacher's own
    with pytest.raises(ValueError, match=r"already holds a finished teacher cache"):
        teacher_cache.cache_teacher(teacher, "tiny", cache, top_k=K, data_dir=text_dir)
    with pytest.raises(ValueError, match=r"--top-k must be in \[1, 259\) for a vocabulary of "
                                         r"259 tokens.*got 259"):
        teacher_cache.cache_teacher(teacher, "tiny", str(tmp_path / "new"), top_k=259,
                                    data_dir=text_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is a non-empty directory that is not a teacher "
                                         r"cache"):
        teacher_cache.cache_teacher(teacher, "tiny", str(tmp_path / "busy"), top_k=K,
                                    data_dir=text_dir)


def _first_step(plan, teachers=()):
    task, data = _open(plan)
    mesh = sharding.make_mesh()
    loaded = tuple(task.load_teacher(w, data.student, mesh).model for w in teachers)
    model, _ = task.build(data, loaded)
    tx = optim.make_optimizer(plan.optimizer, plan.train.steps)
    graphdef, state = init_train_state(model, tx, seed=plan.seed, num_examples=data.num_train)
    step = task.make_step(graphdef, tx, loaded, data, mesh=mesh)
    return jax.device_get(step(state)[1])


def test_distill_from_the_cache_trains_and_matches_online_top_k(cache, teacher, text_dir,
                                                                tmp_path):
    work = tmp_path / "kd"
    assert cli.main(["distill", "--config", f"{EXP}/distill.py", "--workdir", str(work),
                     f"--config.data.data_dir={text_dir}", "--config.teacher.workdir=",
                     f"--config.teacher.cache={cache}", "--config.model.name=lm_tiny",
                     "--config.model.kwargs={'d_model': 16, 'd_ff': 32}",
                     "--config.train.steps=16", "--config.train.log_every_steps=8",
                     "--config.eval.every_steps=16", "--config.checkpoint.every_steps=16",
                     "--config.optimizer.learning_rate=0.01", *SMALL]) == 0
    with open(work / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f if "train/loss" in line]
    assert logged[1]["train/loss"] < 0.9 * logged[0]["train/loss"]
    assert logged[0]["train/kd"] > 0 and 0 <= logged[0]["train/agreement"] <= 1
    with open(work / "summary.json") as f:
        summary = json.load(f)
    assert summary["teacher_cache"]["k"] == K and summary["teacher"] is None
    # step 1's loss (at the initial student) from the cache and from the online teacher's
    # exact top 8: within the cache's bound on the student's loss (1e-3 nats a token)
    cached = _first_step(_distill_plan(text_dir, cache))
    online = _first_step(_distill_plan(text_dir, "", workdir=teacher, top_k=K), (teacher,))
    assert cached["tokens"] == online["tokens"] > 0
    np.testing.assert_allclose(cached["ce_sum"], online["ce_sum"], rtol=1e-6)
    kd_gap = abs(cached["kd_sum"] - online["kd_sum"]) / online["tokens"]
    assert 0 < kd_gap < 1e-3 and abs(cached["loss"] - online["loss"]) < 1e-3
