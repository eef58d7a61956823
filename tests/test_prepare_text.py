"""Text preparation (kdjax.prepare.text, `kdjax prepare text`), tokenizers (kdjax.lm.tokenizer)
and packing (kdjax.lm.packing): round trips, document boundaries, the held-out split."""

import json
import os

import numpy as np
import pytest

from kdjax import cli
from kdjax.lm import data as text_data, models as lm_models, packing, tokenizer as tokenizer_lib
from kdjax.prepare.common import DataPreparationError
from kdjax.prepare.text import prepare_text

TEXT = "déjà vu — ünïcödé ✓ 🐍\n\ttabs, \"quotes\" and \\ back\x00slashes\n"


def _corpus(root, n=12):
    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i in range(n):
        text = f"# module {i}\n" + "".join(f"def f{j}(x):\n    return x * {i + j}\n"
                                             for j in range(i % 4 + 1)) + (TEXT if i == 3 else "")
        (root / f"m{i:02d}.py").write_text(text, encoding="utf-8")
        docs[f"m{i:02d}.py"] = text
    (root / "notes.txt").write_text("not python")
    return docs


def test_byte_tokenizer_round_trips_any_text():
    tok = tokenizer_lib.ByteTokenizer()
    ids = tok.encode(TEXT)
    assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259
    assert tok.decode(ids) == TEXT
    assert tok.decode([tok.bos, *ids, tok.eos, tok.pad]) == TEXT  # special tokens are dropped


def test_bpe_trained_saved_and_loaded_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = [TEXT * 3, "def f(x):\n    return x + 1\n" * 20]
    tok = tokenizer_lib.train_bpe(corpus, vocab_size=300)
    assert (tok.pad, tok.bos, tok.eos) == (0, 1, 2) and tok.vocab_size <= 300
    for text in (*corpus, "unseen: ∑ 字 🙂"):
        assert tok.decode(tok.encode(text)) == text
    again = tokenizer_lib.load(str(tmp_path), tokenizer_lib.save(tok, str(tmp_path)))
    assert again.encode(corpus[1]) == tok.encode(corpus[1])
    assert len(tok.encode(corpus[1])) < len(corpus[1].encode())  # it learnt merges
    with pytest.raises(ValueError, match="--vocab-size 100 is too small"):
        tokenizer_lib.train_bpe(corpus, vocab_size=100)


def test_packing_covers_every_token_once_and_never_crosses_a_document():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(3, 50, rng.integers(2, 30))) for _ in range(20)]
    tokens, segments = packing.pack(docs, 16)
    inputs = packing.model_inputs(tokens, segments)
    stream = np.concatenate(docs)
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    # row r, position i is stream position r*16 + i: each stream token is the target once
    pos = np.arange(len(tokens))[:, None] * 16 + np.arange(16)[None]
    real = pos + 1 < len(stream)
    np.testing.assert_array_equal(inputs["targets"][real], stream[pos[real] + 1])
    # a position counts iff its target is the next token of its own document
    same_doc = np.zeros_like(real)
    same_doc[real] = doc_of[pos[real]] == doc_of[pos[real] + 1]
    np.testing.assert_array_equal(inputs["loss_mask"], same_doc)
    assert inputs["loss_mask"].sum() == len(stream) - len(docs)  # all but each document's end
    # attention: allowed only within a document (and causally)
    allowed = np.asarray(lm_models.document_mask(inputs["segment_ids"]))[:, 0]
    in_range = pos < len(stream)
    for r in range(len(tokens)):
        for i in range(16):
            for j in range(16):
                same = in_range[r, i] and in_range[r, j] and doc_of[pos[r, i]] == doc_of[pos[r, j]]
                assert allowed[r, i, j] == (same and j <= i), (r, i, j)


def test_prepare_text_round_trips_the_documents_and_holds_out_whole_ones(tmp_path, capsys):
    docs = _corpus(tmp_path / "src")
    out = tmp_path / "data"
    assert cli.main(["prepare", "text", "--from", str(tmp_path / "src"), "--pattern", "*.py",
                     "--name", "tiny", "--seq-len", "32", "--held-out", "0.25",
                     "--data-dir", str(out)]) == 0
    assert "prepared text dataset tiny" in capsys.readouterr().out
    ds = text_data.open_text("tiny", str(out))
    tok = ds.tokenizer()
    assert ds.seq_len == 32 and ds.vocab_size == 259 and set(ds.splits) == {"train", "validation"}
    seen = {}
    for split in ds.splits:
        tokens, segments = ds.load(split)
        assert tokens.shape == segments.shape == (ds.splits[split]["sequences"], 33)
        # rows overlap by one token: the stream is row 0 and then each row's last 32 tokens
        stream = np.concatenate([tokens[0], *tokens[1:, 1:]])
        seg = np.concatenate([segments[0], *segments[1:, 1:]])
        stream = stream[seg > 0]
        bounds = np.flatnonzero(stream == tok.bos)
        texts = [tok.decode(stream[a:b]) for a, b in zip(bounds, [*bounds[1:], len(stream)])]
        assert all(stream[b - 1] == tok.eos for b in [*bounds[1:], len(stream)])
        seen[split] = texts
    assert sorted(seen["train"] + seen["validation"]) == sorted(docs.values())  # exact, all
    assert seen["validation"] and not set(seen["train"]) & set(seen["validation"])
    assert json.loads((out / "tiny" / text_data.META_FILE).read_text())["pattern"] == "*.py"
    assert cli.main(["datasets", "--data-dir", str(out)]) == 0
    listed = capsys.readouterr().out
    assert "tiny" in listed and "byte/259" in listed and "32" in listed
    # the held-out documents depend on their paths only, not on the seed or the listing
    again = prepare_text([tmp_path / "src"], name="again", data_dir=out, seq_len=32,
                         held_out=0.25, pattern="*.py", seed=7)
    assert os.path.basename(again) == "again"
    assert ds.splits["validation"]["documents"] == text_data.open_text(
        "again", str(out)).splits["validation"]["documents"]


def test_prepare_text_errors(tmp_path):
    _corpus(tmp_path / "src", n=2)
    with pytest.raises(DataPreparationError, match=r"no files matching --pattern '\*.md'"):
        prepare_text([tmp_path / "src"], data_dir=tmp_path / "d", pattern="*.md")
    with pytest.raises(DataPreparationError, match="no such file or directory"):
        prepare_text([tmp_path / "nothing"], data_dir=tmp_path / "d")
    with pytest.raises(ValueError, match=r"--held-out must be a fraction in \[0, 1\)"):
        prepare_text([tmp_path / "src"], data_dir=tmp_path / "d", held_out=1.0)
    with pytest.raises(FileNotFoundError, match="kdjax prepare text --from FILES_OR_DIR --name "
                                                "missing"):
        text_data.open_text("missing", str(tmp_path / "d"))
    assert not (tmp_path / "d" / "text").exists()  # nothing half-written
