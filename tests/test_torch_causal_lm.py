"""A Hugging Face causal LM as the teacher of kdjax's LM distillation, through torchax
(kdjax.torchbridge.causal_lm): the same logits as `transformers` on packed rows (each document
alone, positions restarting), imported with `kdjax import --torch` from a safetensors file whose
tied head is stored once, distilled from inside the one compiled step, and refused where it
cannot serve. Skipped without the `torch` extra and `transformers`."""

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("torchax")
transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from conftest import ROOT  # noqa: E402

from kdjax import cli  # noqa: E402
from kdjax.lm import data as text_data  # noqa: E402
from kdjax.torchbridge import TorchCausalLM, bridge  # noqa: E402

FACTORY = "kdjax.torchbridge.causal_lm:from_config"
SEQ_LEN = 16  # the text_dir fixture's rows


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def hf_teacher(text_dir, tmp_path_factory):
    """A tiny random Llama (grouped-query attention, tied embeddings) saved as Hugging Face
    saves one: config.json and model.safetensors without the tied head's name."""
    vocab = text_data.open_text("tiny", text_dir).vocab_size
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(folder)
    return {"model": model, "folder": str(folder), "vocab": vocab}


def test_packed_rows_give_each_documents_own_logits(hf_teacher):
    lm = TorchCausalLM(FACTORY, {"config": hf_teacher["folder"]})
    params, buffers = bridge.state_arrays(hf_teacher["model"])
    for name, value in {**params, **buffers}.items():
        node = lm.params if name in params else lm.buffers
        *parents, leaf = name.split(".")
        for p in parents:
            node = node[p]
        node[leaf][...] = value
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, hf_teacher["vocab"], (2, 12)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], np.int32)
    logits = np.asarray(jax.jit(lambda t, s: lm(t, segment_ids=s))(tokens, segments))
    assert logits.dtype == np.float32 and logits.shape == (2, 12, hf_teacher["vocab"])
    for row, start, stop in ((0, 0, 5), (0, 5, 12), (1, 0, 9)):
        with torch.no_grad():
            want = hf_teacher["model"](torch.from_numpy(tokens[row:row + 1, start:stop])
                                       .long()).logits[0].numpy()
        assert rel_err(logits[row, start:stop], want) <= 1e-5


def _import(hf_teacher, out, *extra):
    return cli.main(["import", "--torch", FACTORY, "--torch-kwargs",
                     json.dumps({"config": hf_teacher["folder"]}), "--from",
                     os.path.join(hf_teacher["folder"], "model.safetensors"), "--num-classes",
                     str(hf_teacher["vocab"]), "--input-shape", str(SEQ_LEN), "--data", "tiny",
                     "--out", str(out), *extra])


def _distill(workdir, teacher, text_dir, *extra):
    return cli.main([
        "distill", "--config", os.path.join(ROOT, "experiments", "lm", "distill.py"),
        "--workdir", str(workdir), f"--config.teacher.workdir={teacher}",
        f"--config.data.data_dir={text_dir}", "--config.data.name=tiny",
        "--config.model.name=lm_tiny", "--config.train.steps=4", "--config.train.batch_size=4",
        "--config.eval.batch_size=8", "--config.eval.every_steps=4",
        "--config.checkpoint.every_steps=4", "--config.train.log_every_steps=2",
        "--config.lm.eval_rows=16", "--config.lm.prompts=()", "--config.lm.chunk_size=0",
        "--no-progress", *extra])


def test_an_imported_hf_teacher_distils_inside_the_step(hf_teacher, text_dir, tmp_path):
    run = tmp_path / "teacher"
    assert _import(hf_teacher, run) == 0
    with open(run / "config.json") as f:
        assert json.load(f)["model"]["name"] == "kdjax.torchbridge:TorchCausalLM"
    assert _distill(tmp_path / "student", run, text_dir) == 0
    with open(tmp_path / "student" / "summary.json") as f:
        summary = json.load(f)
    assert summary["teacher"] == str(run)
    # the teacher's perplexity on held-out rows: a random 2-layer model is near-uniform over the
    # vocabulary, which its logits (not an untrained stand-in's zeros) put a bit off exp(log V)
    teacher_ppl = summary["eval/teacher_perplexity"]
    assert 0.5 * hf_teacher["vocab"] < teacher_ppl < 2.0 * hf_teacher["vocab"]
    assert teacher_ppl != pytest.approx(hf_teacher["vocab"], rel=1e-6)
    assert np.isfinite(summary["train/kd"])

    with pytest.raises(ValueError, match="a PyTorch causal LM, whose head is applied inside its "
                                         r"own forward.*lm.chunk_size=0 \(got 8\)"):
        _distill(tmp_path / "chunked", run, text_dir, "--config.lm.chunk_size=8")
    assert not os.path.exists(tmp_path / "chunked")


def test_lm_import_refusals(hf_teacher, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"output of shape \(2, 16, \d+\) on tokens \[2, 16\] "
                                         r"is not \[batch, length, --num-classes=7\]"):
        cli.main(["import", "--torch", FACTORY, "--torch-kwargs",
                  json.dumps({"config": hf_teacher["folder"]}), "--num-classes", "7",
                  "--input-shape", "16", "--data", "tiny", "--out", str(out)])
    with pytest.raises(ValueError, match="from_config: config '/no/such' does not exist"):
        cli.main(["import", "--torch", FACTORY, "--torch-kwargs", '{"config": "/no/such"}',
                  "--num-classes", "7", "--input-shape", "16", "--data", "tiny",
                  "--out", str(out)])
    with pytest.raises(ValueError, match="--mean/--std normalise images; a language model"):
        _import(hf_teacher, out, "--mean", "0.5", "--std", "0.5")
    assert not os.path.exists(out)
