"""Prepared text datasets: the on-disk format `kdjax prepare text` writes, and reading it back.

    <data_dir>/<name>/
        kdjax_text.json                      what is here: sequence length, tokenizer, splits
        tokenizer.json                       the tokenizer (BPE; none for the byte-level one)
        <split>.array_record-00000-of-0000N  one record per packed row

A record is one packed row (kdjax.lm.packing): ``[2, seq_len + 1]`` int32, the tokens and their
segment ids, little-endian: 8 bytes per token. Instruction data (``"loss_mask": true`` in the
metadata) adds a third array, the per-token loss mask (1 where a token counts as a target: a
response's tokens, every token of plain text; 0 for a conversation's prompt), 12 bytes per token;
datasets without it are read as before, every token counting. A split is read whole into memory
and lives on the device during training, as device-resident image data does (the demo's corpus
is a few MB); a corpus larger than a device's memory needs a streamed reader, which kdjax does
not have yet.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from kdjax.lm import tokenizer as tokenizer_lib
from kdjax.prepare.common import resolve_data_dir

META_FILE = "kdjax_text.json"
FORMAT = "kdjax-text/1"


def encode_row(tokens: np.ndarray, segments: np.ndarray, loss_mask: np.ndarray | None = None
               ) -> bytes:
    arrays = [tokens, segments] if loss_mask is None else [tokens, segments, loss_mask]
    return np.stack(arrays).astype("<i4").tobytes()


def decode_rows(records: list[bytes], seq_len: int, arrays: int = 2) -> tuple[np.ndarray, ...]:
    """The `arrays` arrays of `encode_row` (tokens, segments[, loss mask]), ``[N, seq_len + 1]``
    int32 each."""
    rows = np.frombuffer(b"".join(records), "<i4").reshape(len(records), arrays, seq_len + 1)
    return tuple(rows[:, i].astype(np.int32) for i in range(arrays))


def dataset_dir(name: str, data_dir: str | None) -> str:
    return os.path.join(resolve_data_dir(data_dir), name)


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """A prepared text dataset: its metadata, tokenizer and splits."""

    path: str
    meta: dict[str, Any]

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def splits(self) -> dict[str, dict[str, Any]]:
        return self.meta["splits"]

    @property
    def masked(self) -> bool:
        """Whether the rows carry a per-token loss mask (instruction data)."""
        return bool(self.meta.get("loss_mask", False))

    def tokenizer(self) -> tokenizer_lib.Tokenizer:
        return tokenizer_lib.load(self.path, self.meta["tokenizer"])

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, segment ids) of every row of `split`, ``[N, seq_len + 1]`` int32 each."""
        rows = self.rows(split)
        return rows["tokens"], rows["segments"]

    def rows(self, split: str) -> dict[str, np.ndarray]:
        """Every row of `split`: "tokens", "segments" and, for instruction data, "loss_mask",
        ``[N, seq_len + 1]`` int32 each (the arrays of packing.model_inputs)."""
        from array_record.python import array_record_module  # noqa: PLC0415

        if split not in self.splits:
            raise ValueError(f"the text dataset in {self.path} has no split {split!r}; it has "
                             f"{sorted(self.splits)} (data.train_split / data.eval_split)")
        records: list[bytes] = []
        for shard in self.splits[split]["shards"]:
            reader = array_record_module.ArrayRecordReader(os.path.join(self.path, shard))
            try:
                records.extend(reader.read_all())
            finally:
                reader.close()
        names = ("tokens", "segments", "loss_mask") if self.masked else ("tokens", "segments")
        return dict(zip(names, decode_rows(records, self.seq_len, len(names))))


def open_text(name: str, data_dir: str | None = None) -> TextDataset:
    """The text dataset `name` prepared under `data_dir` (default $TFDS_DATA_DIR or
    ~/tensorflow_datasets, as for image datasets)."""
    path = dataset_dir(name, data_dir)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        root = resolve_data_dir(data_dir)
        raise FileNotFoundError(
            f"no prepared text dataset {name!r} in {root} ({meta_path} not found); prepare it "
            f"once, offline, with:\n  kdjax prepare text --from FILES_OR_DIR --name {name} "
            f"--data-dir {root}")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is format {meta.get('format')!r}, this kdjax reads "
                         f"{FORMAT!r}; prepare the data again")
    return TextDataset(path, meta)


def list_text(data_dir: str | None = None) -> list[TextDataset]:
    """Every text dataset prepared under `data_dir` (for `kdjax datasets`)."""
    root = resolve_data_dir(data_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(os.listdir(root)):
        if os.path.isfile(os.path.join(root, name, META_FILE)):
            try:
                found.append(open_text(name, root))
            except (ValueError, OSError, json.JSONDecodeError):
                continue  # another format's or a damaged directory: not listed
    return found
