"""Instruction data (kdjax.prepare.chat through `kdjax prepare text`): prompt/response, messages
and text JSONL, chat templates, the response-only loss mask in packing, training, distillation
and eval, and the refusals."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from kdjax import cli
from kdjax.lm import data as text_data, packing, tokenizer as tokenizer_lib
from kdjax.prepare.common import DataPreparationError
from kdjax.report import lm as report_lm
from kdjax.prepare.text import _held_out, prepare_text

EXP = os.path.join(ROOT, "experiments", "lm")
pytestmark = pytest.mark.usefixtures("quick_compiles")

LINES = [
    {"prompt": "hi", "response": "yo"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"text": "plain"},
]
# a chat template in the Hugging Face layout: special tokens named by tokenizer_config.json
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
            "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def _jsonl(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _targets(ds, split="train"):
    """(targets, loss mask) of every position of `split`, row by row."""
    rows = ds.rows(split)
    inputs = packing.model_inputs(rows["tokens"], rows["segments"], rows.get("loss_mask"))
    return inputs["targets"], inputs["loss_mask"]


def test_byte_tokenizer_plain_format_masks_all_but_the_responses(tmp_path):
    src = _jsonl(tmp_path / "chat.jsonl", LINES)
    prepare_text([src], name="chat", data_dir=tmp_path / "d", seq_len=128, held_out=0)
    ds = text_data.open_text("chat", str(tmp_path / "d"))
    assert ds.masked and ds.meta["chat_format"].startswith("plain")
    tok = ds.tokenizer()
    [tokens] = ds.rows("train")["tokens"]
    # one row holds the three documents, in the packing order: find each from its text
    docs = {"user: hi\nassistant: yo\n": "yo\n",
            "system: be brief\nuser: 2+2?\nassistant: 4\n": "4\n", "plain": "plain"}
    targets, mask = _targets(ds)
    want = np.zeros(128, bool)
    stream, found = list(tokens), []
    for text, response in docs.items():
        ids = [tok.bos, *tok.encode(text), tok.eos]
        start = next(i for i in range(len(stream)) if stream[i:i + len(ids)] == ids)
        end = start + len(ids) - 1  # the eos, the last target of the document
        # position p predicts token p + 1: the response's tokens and the eos count
        want[end - len(tok.encode(response)) - 1:end] = True
        found.append((start, response))
    np.testing.assert_array_equal(mask[0], want)
    assert int(mask.sum()) == 4 + 3 + 6 == ds.splits["train"]["target_tokens"]
    assert tok.decode(targets[0][mask[0]]) == "".join(r for _, r in sorted(found))
    # text lines alone are plain documents: no mask stored, the rows as before
    prepare_text([_jsonl(tmp_path / "text.jsonl", LINES[2:] * 2)], name="text",
                 data_dir=tmp_path / "d", seq_len=8, held_out=0)
    plain = text_data.open_text("text", str(tmp_path / "d"))
    assert not plain.masked and set(plain.rows("train")) == {"tokens", "segments"}
    assert plain.splits["train"]["target_tokens"] == 2 * 6


def _hf_tokenizer(tmp_path, template=TEMPLATE):
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    folder = tmp_path / "tok"
    folder.mkdir()
    tok = tokenizer_lib.train_bpe(["hi yo 2+2? 4 be brief plain <user> <assistant>"] * 10, 300)
    tok.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<bos>", "eos_token": {"content": "<eos>"}}))
    return folder / "tokenizer.json", tok


def test_bpe_tokenizer_json_applies_its_chat_template(tmp_path):
    path, tok = _hf_tokenizer(tmp_path)
    src = _jsonl(tmp_path / "chat.jsonl", LINES)
    prepare_text([src], name="chat", data_dir=tmp_path / "d", tokenizer=str(path), seq_len=64,
                 held_out=0)
    ds = text_data.open_text("chat", str(tmp_path / "d"))
    assert ds.meta["chat_format"] == f"chat template of {tmp_path / 'tok/tokenizer_config.json'}"
    [tokens] = ds.rows("train")["tokens"]
    targets, mask = _targets(ds)
    # the template's "<bos>" is the bos token, once per conversation (no other one added)
    bos = np.flatnonzero(tokens == tok.bos)
    assert len(bos) == 3
    counted = {}
    for start, end in zip(bos, [*bos[1:], ds.splits["train"]["tokens"]]):
        doc = tokens[start:end]
        counted[tok.decode(doc)] = list(targets[0][start:end - 1][mask[0][start:end - 1]])
    # the response and its end of turn (the template's eos) count; nothing of the prompt does
    assert counted == {"<user>hi<assistant>yo": [*tok.encode("yo"), tok.eos],
                       "<system>be brief<user>2+2?<assistant>4": [*tok.encode("4"), tok.eos],
                       "plain": [*tok.encode("plain"), tok.eos]}


def test_refusals_name_the_line_and_leave_nothing(tmp_path):
    out = tmp_path / "d"

    def refused(lines, match, **kwargs):
        src = tmp_path / "bad.jsonl"
        src.write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines))
        with pytest.raises(DataPreparationError, match=match):
            prepare_text([src], name="bad", data_dir=out, seq_len=16, **kwargs)
        assert not out.exists() or not os.listdir(out)

    refused([LINES[0], "{not json\n"], r"bad.jsonl:2: not JSON")
    refused([LINES[0], LINES[2], {"question": "q", "answer": "a"}],
            r"bad.jsonl:3: an object of keys \['answer', 'question'\] is none of the accepted "
            r"shapes: \{\"prompt\"")
    refused([{"text": "a", "prompt": "b", "response": "c"}], r"bad.jsonl:1: .* none of")
    refused([[1, 2]], r"bad.jsonl:1: a JSON list, not an object")
    refused([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
            r"bad.jsonl:1: the last message's role is 'user'; it must be the assistant's")
    refused([{"prompt": "a", "response": 3}], r"bad.jsonl:1: \"response\" is a int")
    # a template whose prompt render is not the conversation's beginning
    shifty = tmp_path / "shifty.jinja"
    shifty.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                      "{% if add_generation_prompt %}!{% endif %}")
    refused([LINES[2], LINES[0]], r"bad.jsonl:2: the chat template of .*shifty.jinja renders the "
            r"prompt .* as 'hi!', which is not a prefix of .* 'hiyo'",
            chat_template=str(shifty))
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                      "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    refused([LINES[0], LINES[1]], r"bad.jsonl:2: .* refused the conversation: user first",
            chat_template=str(strict))
    refused([LINES[0]], r"--chat-template .*nope.jinja.*: no such file",
            chat_template=str(tmp_path / "nope.jinja"))


def _run(command, workdir, data, *extra):
    return cli.main([
        command, "--config", f"{EXP}/{'teacher' if command == 'train' else 'distill'}.py",
        "--workdir", str(workdir), "--config.data.name=chat", f"--config.data.data_dir={data}",
        "--config.model.name=lm_tiny", "--config.train.steps=2", "--config.eval.every_steps=2",
        "--config.checkpoint.every_steps=2", "--config.train.log_every_steps=1",
        "--config.lm.eval_rows=0", "--config.lm.prompts=()", "--config.lm.chunk_size=8",
        "--config.optimizer.warmup_steps=0", "--no-progress", *extra])


def test_train_and_distill_count_only_response_tokens(tmp_path):
    # 24 conversations and 4 texts, 25% held out by a hash of "chat.jsonl:<line>"
    lines = [{"prompt": f"q{i}", "response": "a" * (1 + i % 5)} for i in range(24)]
    lines += [{"text": f"text number {i}"} for i in range(4)]
    src = _jsonl(tmp_path / "chat.jsonl", lines)
    data = tmp_path / "d"
    prepare_text([src], name="chat", data_dir=data, seq_len=32, held_out=0.25)
    ds = text_data.open_text("chat", str(data))
    # a response's bytes, the plain format's "\n" after it and the eos; a text's bytes and eos
    want = {"train": 0, "validation": 0}
    for number, x in enumerate(lines, start=1):
        split = "validation" if _held_out(f"chat.jsonl:{number}", 0.25) else "train"
        want[split] += len(x["response"]) + 2 if "response" in x else len(x["text"]) + 1
    assert {s: v["target_tokens"] for s, v in ds.splits.items()} == want
    assert want["validation"] > 0 and want["train"] > 0
    # kdjax report's per-token metrics take the mask too: a uniform model over the responses
    uniform = report_lm.evaluate(lambda t, s: jnp.zeros((*t.shape, ds.vocab_size)),
                                 *ds.rows("validation").values(), batch_size=4)
    assert uniform["tokens"] == want["validation"]
    np.testing.assert_allclose(uniform["perplexity"], ds.vocab_size, rtol=1e-5)
    rows = ds.splits["train"]["sequences"]
    # the batch is every training row, so each step counts the whole split's targets
    assert _run("train", tmp_path / "teacher", data, f"--config.train.batch_size={rows}") == 0
    with open(tmp_path / "teacher" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [m["train/tokens_per_step"] for m in logged if "train/tokens_per_step" in m] \
        == [want["train"]] * 2
    with open(tmp_path / "teacher" / "summary.json") as f:
        assert json.load(f)["eval/tokens"] == want["validation"]
    assert _run("distill", tmp_path / "kd", data, f"--config.train.batch_size={rows}",
                f"--config.teacher.workdir={tmp_path / 'teacher'}",
                "--config.model.kwargs={'d_model': 16, 'd_ff': 32}") == 0
    with open(tmp_path / "kd" / "summary.json") as f:
        s = json.load(f)
    assert s["eval/tokens"] == want["validation"] and np.isfinite(s["eval/loss"])
    # a teacher cache stores every position; the rows' mask still decides which ones count
    cache = str(tmp_path / "cache")
    assert cli.main(["cache-teacher", "--teacher", str(tmp_path / "teacher"), "--data", "chat",
                     "--data-dir", str(data), "--top-k", "8", "--out", cache]) == 0
    assert _run("distill", tmp_path / "kd_cached", data, f"--config.train.batch_size={rows}",
                "--config.teacher.workdir=", f"--config.teacher.cache={cache}",
                "--config.model.kwargs={'d_model': 16, 'd_ff': 32}") == 0
    with open(tmp_path / "kd_cached" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [m["train/tokens_per_step"] for m in logged if "train/tokens_per_step" in m] \
        == [want["train"]] * 2
