"""Text corpora -> tokenized, packed ArrayRecord shards with their tokenizer (`kdjax prepare text`).

Every file is one document. Files are read from the paths given (files, or directories searched
recursively for `pattern`), decoded as UTF-8 (undecodable bytes replaced), and split into
training and held-out documents by a hash of their path relative to the source, so the split
does not depend on the order files are listed in and a document never straddles two splits. The
tokenizer is the built-in byte-level one, a BPE trained on the training documents, or a
``tokenizer.json`` loaded as is (kdjax.lm.tokenizer). Each document becomes
``[bos] + tokens + [eos]``; the documents of a split, in an order shuffled by `seed`, are packed
into rows of ``seq_len + 1`` tokens with segment ids (kdjax.lm.packing). The format is described
in kdjax.lm.data; everything is written into a temporary directory and renamed into place.

A ``.jsonl`` file is instruction data instead (kdjax.prepare.chat): every line is a document,
split by its file and line number; a conversation (prompt/response or messages) is rendered with
the tokenizer's chat template, or ``--chat-template``, and only its response's tokens count in
the loss. A dataset with any conversation stores a per-token loss mask beside its rows.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdjax.lm import data as text_data, packing, tokenizer as tokenizer_lib
from kdjax.prepare import chat
from kdjax.prepare.common import (SHARD_BYTES, DataPreparationError, atomic_directory,
                                  resolve_data_dir)

SPLITS = ("train", "validation")


def _documents(sources: Sequence[str | os.PathLike], pattern: str) -> list[tuple[str, Path]]:
    """(key, path) of every document: the key is the path relative to its source (the file name
    for a file given directly), which decides the split."""
    found: dict[str, Path] = {}
    for source in sources:
        src = Path(os.path.expanduser(os.fspath(source)))
        if src.is_file():
            found.setdefault(src.name, src)
        elif src.is_dir():
            for root, dirs, files in os.walk(src):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(files):
                    if fnmatch.fnmatch(f, pattern):
                        path = Path(root) / f
                        found.setdefault(os.fspath(path.relative_to(src)), path)
        else:
            raise DataPreparationError(f"--from {os.fspath(source)!r}: no such file or directory")
    if not found:
        raise DataPreparationError(f"no files matching --pattern {pattern!r} under "
                                   f"{[os.fspath(s) for s in sources]}")
    return sorted(found.items())


def _held_out(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def _examples(docs: list[tuple[str, Path]], form: chat.ChatFormat) -> dict[str, chat.Example]:
    """Every document by its split key: a file's, or a .jsonl file's lines (``key:line``)."""
    out = {}
    for key, path in docs:
        if path.suffix == ".jsonl":
            for number, record in chat.read_jsonl(path):
                out[f"{key}:{number}"] = form.example(record, f"{path}:{number}")
        else:
            out[key] = chat.Example(path.read_bytes().decode("utf-8", errors="replace"))
    return out


def _write_split(out: Path, split: str, tokens: np.ndarray, segments: np.ndarray,
                 loss_mask: np.ndarray | None) -> list[str]:
    from array_record.python import array_record_module  # noqa: PLC0415

    row_bytes = (2 if loss_mask is None else 3) * tokens.shape[1] * 4
    per_shard = max(1, SHARD_BYTES // row_bytes)
    count = max(1, -(-len(tokens) // per_shard))
    names = [f"{split}.array_record-{i:05d}-of-{count:05d}" for i in range(count)]
    for i, name in enumerate(names):
        writer = array_record_module.ArrayRecordWriter(os.fspath(out / name), "group_size:1")
        try:
            for r in range(i * per_shard, min(len(tokens), (i + 1) * per_shard)):
                writer.write(text_data.encode_row(
                    tokens[r], segments[r], None if loss_mask is None else loss_mask[r]))
        finally:
            writer.close()
    return names


def prepare_text(
    sources: Sequence[str | os.PathLike],
    *,
    name: str = "text",
    data_dir: str | os.PathLike | None = None,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    seq_len: int = 256,
    held_out: float = 0.05,
    pattern: str = "*",
    seed: int = 0,
    max_examples_per_split: int | None = None,
    chat_template: str | None = None,
) -> str:
    """Prepare the documents under `sources` as the text dataset `name`; return its directory.

    Args:
      sources: files and/or directories (searched recursively for `pattern`); ``.jsonl`` files
        hold one example a line (kdjax.prepare.chat).
      name: the dataset's name (``data.name`` of LM experiments); written to
        ``<data_dir>/<name>``.
      data_dir: default $TFDS_DATA_DIR or ~/tensorflow_datasets.
      tokenizer: ``"byte"`` (built in), ``"bpe"`` (trained on the training documents up to
        `vocab_size` tokens; needs `tokenizers`) or the path of a ``tokenizer.json``.
      seq_len: positions per packed row (rows store seq_len + 1 tokens).
      held_out: fraction of documents in the ``validation`` split, in [0, 1).
      pattern: file-name glob for directories, e.g. ``"*.py"``.
      seed: the order documents are packed in.
      max_examples_per_split: keep only the first N rows of each split (tests, quick demos).
      chat_template: a Jinja chat template file (or a tokenizer_config.json holding one) for
        conversations; default: the one beside a `tokenizer` tokenizer.json, else the plain
        format.
    """
    if not 0 <= held_out < 1:
        raise ValueError(f"--held-out must be a fraction in [0, 1), got {held_out}")
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if max_examples_per_split is not None and max_examples_per_split < 1:
        raise ValueError(f"--max-examples must be >= 1, got {max_examples_per_split}")
    form = chat.load_format(tokenizer, chat_template)
    texts = _examples(_documents(sources, pattern), form)
    masked = any(e.prompt is not None for e in texts.values())
    keys = {"train": [k for k in texts if not _held_out(k, held_out)],
            "validation": [k for k in texts if _held_out(k, held_out)]}
    if held_out and not keys["validation"]:
        # a small corpus may hash no document below the fraction: hold out one all the same
        keys["validation"].append(keys["train"].pop())
    if not keys["train"]:
        raise DataPreparationError(f"{len(texts)} document(s) found, none left for training "
                                   f"after holding out {held_out:.0%}; add documents or lower "
                                   f"--held-out")
    if tokenizer == "byte":
        tok: tokenizer_lib.Tokenizer = tokenizer_lib.ByteTokenizer()
    elif tokenizer == "bpe":
        tok = tokenizer_lib.train_bpe((texts[k].text for k in keys["train"]), vocab_size)
    else:
        tok = tokenizer_lib.HFTokenizer.from_file(os.fspath(tokenizer))
    root = Path(resolve_data_dir(data_dir))
    rng = np.random.default_rng(seed)
    with atomic_directory(root, (), name) as tmp:
        splits = {}
        for split in SPLITS:
            order = [keys[split][i] for i in rng.permutation(len(keys[split]))]
            encoded, masks = zip(*(texts[k].encode(tok) for k in order)) if order else ((), ())
            tokens, segments = packing.pack(encoded, seq_len, pad_id=tok.pad)
            # the masks have the documents' lengths, so they pack into the same places
            loss_mask = packing.pack(masks, seq_len)[0] if masked else None
            if max_examples_per_split is not None:
                tokens, segments = tokens[:max_examples_per_split], segments[:max_examples_per_split]
                loss_mask = None if loss_mask is None else loss_mask[:max_examples_per_split]
            if len(tokens):
                splits[split] = {
                    "sequences": int(len(tokens)), "documents": len(order),
                    "tokens": int(sum(len(e) for e in encoded)),
                    "target_tokens": int(packing.model_inputs(tokens, segments, loss_mask)[
                        "loss_mask"].sum()),
                    "shards": _write_split(tmp, split, tokens, segments, loss_mask)}
        meta = {"format": text_data.FORMAT, "prepared_by": "kdjax", "name": name,
                "seq_len": seq_len, "tokenizer": tokenizer_lib.save(tok, os.fspath(tmp)),
                "loss_mask": masked, "chat_format": form.describe() if masked else None,
                "splits": splits, "held_out": held_out, "pattern": pattern, "seed": seed,
                "sources": [os.path.abspath(os.fspath(s)) for s in sources],
                "max_examples_per_split": max_examples_per_split,
                "prepared_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        (tmp / text_data.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return os.fspath(root / name)
