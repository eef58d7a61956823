"""Distillation across tokenizers (kdjax.lm.cross_tokenizer, lm.cross_tokenizer='next_byte'): the
next-byte marginal against its formula, each tokenizer's token bytes against its own decoding, the
byte-offset alignment against the texts both sides have read, the teacher's next-byte
distribution in the step against the teacher run alone on that text, a distillation end to end,
and every refusal."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _float32 import assert_close
from conftest import ROOT, write_corpus
from kdjax import cli, losses, sharding
from kdjax import plan as plan_lib
from kdjax.lm import cross_tokenizer, tokenizer as tokenizer_lib
from kdjax.lm.step import _teacher_bytes
from kdjax.lm.task import LanguageModelTask

EXP = os.path.join(ROOT, "experiments", "lm")
pytestmark = pytest.mark.usefixtures("quick_compiles")
pytest.importorskip("tokenizers")
SMALL = ["--config.train.batch_size=4", "--config.eval.batch_size=8",
         "--config.lm.eval_rows=8", "--config.lm.prompts=()", "--config.lm.chunk_size=0",
         "--config.optimizer.warmup_steps=0", "--no-progress"]


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _byte_marginal(logits, first):
    """The next-byte distribution, summed token by token in float64."""
    p = _softmax(np.asarray(logits, np.float64))
    out = np.zeros(p.shape[:-1] + (cross_tokenizer.NUM_CLASSES,))
    for v, b in enumerate(first):
        out[..., b] += p[..., v]
    return out


def test_byte_marginal_is_the_sum_of_each_first_bytes_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (2, 3, 40)).astype(np.float32)
    first = rng.integers(0, 5, 40).astype(np.int32)  # classes 5..256 reached by no token
    got = np.asarray(losses.token_byte_log_probs(logits, first))
    want = _byte_marginal(logits, first)
    assert_close(np.exp(got[..., :5]), want[..., :5], n=40)
    assert np.all(np.exp(got[..., 5:]) < 1e-30)  # empty classes: finite, not -inf
    grad = jax.grad(lambda x: losses.token_byte_log_probs(x, first)[..., 0].sum())(logits)
    assert np.isfinite(np.asarray(grad)).all()
    with pytest.raises(ValueError, match=r"first_byte must give one class per vocabulary entry, "
                                         r"shape \(40,\), got \(39,\)"):
        losses.token_byte_log_probs(logits, first[:39])


@pytest.fixture(scope="module")
def bpe():
    texts = ["def f(x):\n    return x + 1\n", "héllo wörld ünïcode ✓\n" * 3, "class A:\n    pass\n"]
    return tokenizer_lib.train_bpe(texts * 20, 300)


def test_token_bytes_spell_each_tokenizers_own_decoding(bpe):
    text = "def g(y):\n    return 'héllo ✓' * y\n"
    for tok in (bpe, tokenizer_lib.ByteTokenizer()):
        table = cross_tokenizer.token_bytes(tok, what="student")
        assert len(table) == tok.vocab_size
        ids = tok.encode(text)
        assert b"".join(table[i] for i in ids) == text.encode()
        assert all(table[i] == b"" for i in (tok.pad, tok.bos, tok.eos))
        first = cross_tokenizer.first_bytes(table)
        assert first[tok.eos] == cross_tokenizer.END
        assert [first[i] for i in ids[:3]] == [table[i][0] for i in ids[:3]]


def test_a_tokenizer_that_does_not_spell_bytes_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from tokenizers import decoders  # noqa: PLC0415

    inner = Tokenizer(models.WordLevel({"<pad>": 0, "<bos>": 1, "<eos>": 2, "a": 3},
                                       unk_token="a"))
    inner.pre_tokenizer = pre_tokenizers.Metaspace()
    inner.decoder = decoders.Metaspace()
    tok = tokenizer_lib.HFTokenizer(inner)
    with pytest.raises(ValueError, match=r"lm.cross_tokenizer: the teacher's tokenizer \(hf, "
                                         r"decoder Metaspace\) does not spell its tokens as bytes"
                                         r"; .*byte-level tokenizers only"):
        cross_tokenizer.token_bytes(tok, what="teacher")


def _rows(tok, texts, seq_len):
    from kdjax.lm import packing  # noqa: PLC0415

    return packing.pack([[tok.bos, *tok.encode(t), tok.eos] for t in texts], seq_len)


def _prefix(tok_table, ids, upto):
    return b"".join(tok_table[i] for i in ids[:upto + 1])


def _check_pairs(found, tokens, segments, student, teacher):
    """Every aligned pair has read the same bytes: the teacher's context (its segment up to the
    paired position) is the student's context's end, as far back as the teacher's window goes."""
    s_table = cross_tokenizer.token_bytes(student, what="student")
    t_table = cross_tokenizer.token_bytes(teacher, what="teacher")
    window = found.reading.window
    pairs = 0
    for r, p in zip(*np.nonzero(found.align >= 0)):
        q = found.align[r, p]
        seg = segments[r, p]
        s_ids = tokens[r][segments[r] == seg]
        s_read = _prefix(s_table, s_ids, int(p - np.argmax(segments[r] == seg)))
        t_ids = found.teacher_tokens[r, :q + 1][found.teacher_segments[r, :q + 1] == seg]
        t_read = b"".join(t_table[i] for i in t_ids)
        assert t_read == s_read, (r, p, q)
        assert q // window == (q - 0) // window  # a position of one of the teacher's rows
        pairs += 1
    return pairs


def test_byte_teacher_and_bpe_student_align_everywhere(bpe):
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "héllo ✓\n"]
    tokens, segments = _rows(bpe, texts, 8)
    byte = tokenizer_lib.ByteTokenizer()
    found = cross_tokenizer.align_rows(tokens, segments, student=bpe, teacher=byte, window=16)
    counted = (segments[:, :-1] != 0) & (segments[:, 1:] == segments[:, :-1])
    # every counted position is paired, except where a row edge cut a character's bytes
    assert found.aligned == float((found.align >= 0)[counted].mean())
    assert found.aligned > 0.9
    assert _check_pairs(found, tokens, segments, bpe, byte) == int((found.align >= 0).sum())
    longest = max(int((s != 0).sum()) for s in found.teacher_segments)
    assert found.reading.chunks == -(-longest // 16)
    assert found.teacher_tokens.shape == (len(tokens), found.reading.chunks * 16)


def test_bpe_teacher_and_byte_student_align_at_the_teachers_token_boundaries(bpe):
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"]
    byte = tokenizer_lib.ByteTokenizer()
    tokens, segments = _rows(byte, texts, 24)
    found = cross_tokenizer.align_rows(tokens, segments, student=byte, teacher=bpe, window=32)
    pairs = _check_pairs(found, tokens, segments, byte, bpe)
    # a byte position is paired iff the BPE has a token boundary there (or it is the bos)
    boundaries = sum(len(bpe.encode(t)) + 1 for t in texts)  # + the bos positions
    assert pairs == boundaries < int(found.align.size)
    assert 0 < found.aligned < 1


def test_text_cut_inside_a_character_is_left_unaligned(bpe):
    byte = tokenizer_lib.ByteTokenizer()
    tokens, segments = _rows(byte, ["ab✓cd"], 4)  # rows of 5 bytes: ✓'s 3 bytes are cut
    found = cross_tokenizer.align_rows(tokens, segments, student=byte, teacher=bpe, window=8)
    # row 0 (<bos> a b and two of ✓'s bytes): read up to b; row 1 starts inside ✓: not at all
    assert (found.align[0, :3] >= 0).all() and (found.align[0, 3:] == -1).all()
    assert (found.align[1] == -1).all()
    assert found.aligned == 3 / 8


@pytest.fixture(scope="module")
def runs(text_dir, tmp_path_factory):
    """A byte-level teacher run on "tiny", and "tiny_bpe": the same corpus in a BPE of 300."""
    root = tmp_path_factory.mktemp("xtok")
    teacher = str(root / "teacher")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", teacher,
                     f"--config.data.data_dir={text_dir}", "--config.data.name=tiny",
                     "--config.model.name=lm_tiny", "--config.train.steps=6",
                     "--config.eval.every_steps=6", "--config.checkpoint.every_steps=6",
                     "--config.train.log_every_steps=6", *SMALL]) == 0
    src = write_corpus(root / "src")
    assert cli.main(["prepare", "text", "--from", str(src), "--name", "tiny_bpe", "--seq-len",
                     "8", "--held-out", "0.2", "--tokenizer", "bpe", "--vocab-size", "300",
                     "--data-dir", text_dir]) == 0
    return teacher


def _plan(text_dir, teacher, **lm):
    plan = plan_lib.as_plan({}, [a for a in SMALL if a.startswith("--config.")])
    return plan.replace(model={"name": "lm_tiny", "kwargs": {"d_model": 16, "d_ff": 32}},
                        loss={"name": "forward_kl", "ce_weight": 0.5, "kd_weight": 0.5},
                        data={"name": "tiny_bpe", "data_dir": text_dir, "eval_split": "validation"},
                        teacher={"workdir": teacher}, lm={"cross_tokenizer": "next_byte", **lm})


def test_the_steps_teacher_bytes_are_the_teacher_alone_on_the_same_text(runs, text_dir):
    task = LanguageModelTask(_plan(text_dir, runs))
    task.check(distill=True)
    mesh = sharding.make_mesh()
    data = task.open_data(mesh)
    frozen = task.load_teacher(runs, data.student, mesh).model
    teacher = nnx.merge(frozen.graphdef, frozen.variables)
    reading, found = task.alignment.reading, task.alignment
    rows = slice(0, 6)
    inputs = {"teacher_tokens": found.teacher_tokens[rows],
              "teacher_segments": found.teacher_segments[rows], "align": found.align[rows]}
    got = np.asarray(_teacher_bytes(teacher, inputs, reading))
    # Each paired teacher context alone, from its first token (one batch: a context fills the
    # front of its own row, causal attention makes the padding after it irrelevant).
    pairs = list(zip(*np.nonzero(found.align[rows] >= 0)))
    alone = np.zeros((len(pairs), reading.window), np.int32)
    ends = []
    for n, (r, p) in enumerate(pairs):
        q = found.align[r, p]
        start = q - q % reading.window  # the teacher's row holding q
        seg = found.teacher_segments[r, start:q + 1]
        ctx = found.teacher_tokens[r, start:q + 1][seg == seg[-1]]
        alone[n, :len(ctx)] = ctx
        ends.append(len(ctx) - 1)
    logits = np.asarray(teacher(jnp.asarray(alone)))[np.arange(len(pairs)), ends]
    want = _byte_marginal(logits, reading.teacher_first_bytes)
    have = np.exp(np.stack([got[r, p] for r, p in pairs]))
    assert_close(have, want, n=64)
    checked = len(pairs)
    assert checked > 20


def test_distill_across_tokenizers_end_to_end(runs, text_dir, tmp_path):
    work = str(tmp_path / "kd")
    assert cli.main(["distill", "--config", f"{EXP}/distill.py", "--workdir", work,
                     f"--config.data.data_dir={text_dir}", "--config.data.name=tiny_bpe",
                     f"--config.teacher.workdir={runs}", "--config.model.name=lm_tiny",
                     "--config.model.kwargs={'d_model': 16, 'd_ff': 32}",
                     "--config.lm.cross_tokenizer=next_byte", "--config.train.steps=8",
                     "--config.train.log_every_steps=4", "--config.eval.every_steps=8",
                     "--config.checkpoint.every_steps=8", *SMALL]) == 0
    import json  # noqa: PLC0415

    with open(os.path.join(work, "summary.json")) as f:
        summary = json.load(f)
    cross = summary["cross_tokenizer"]
    assert cross["mode"] == "next_byte" and cross["aligned"] > 0.9
    assert cross["teacher_window"] == 16 and cross["teacher_rows"] >= 2
    assert np.isfinite(summary["train/kd"]) and summary["train/kd"] > 0
    assert "eval/teacher_agreement" not in summary.get("final_eval", summary)


def test_refusals(runs, text_dir):
    def refused(match, distill=True, **changes):
        plan = _plan(text_dir, runs).replace(**changes)
        task = LanguageModelTask(plan)
        with pytest.raises(ValueError, match=match):
            task.check(distill=distill)
            task.open_data(sharding.make_mesh())

    refused(r"lm.cross_tokenizer must be one of \('', 'next_byte'\).*got 'uld'",
            lm={"cross_tokenizer": "uld"})
    refused(r"lm.cross_tokenizer='next_byte' needs both models' whole logits.*set "
            r"lm.chunk_size=0 \(got 8\)", lm={"cross_tokenizer": "next_byte", "chunk_size": 8})
    refused(r"set teacher.top_k=0 \(got 4\)", teacher={"workdir": runs, "top_k": 4})
    refused(r"lm.cross_tokenizer='next_byte' distils from a teacher: run it with `kdjax "
            r"distill`", distill=False, loss={"name": "ce"})
    # without the setting, another tokenizer is refused, and the message says what to set
    plan = _plan(text_dir, runs, cross_tokenizer="")
    task = LanguageModelTask(plan)
    task.check(distill=True)
    data = task.open_data(sharding.make_mesh())
    with pytest.raises(ValueError, match=r"or (distil )?across tokenizers with "
                                         r"lm.cross_tokenizer='next_byte'"):
        task.load_teacher(runs, data.student, sharding.make_mesh())
