"""Tokenizers for text data: a byte-level one built in, and BPE through Hugging Face `tokenizers`.

Every tokenizer has the same small interface: ``encode(text) -> list[int]`` (no special tokens),
``decode(ids) -> str`` (special tokens dropped), ``vocab_size``, and the ids of its ``pad``,
``bos`` (start of a document) and ``eos`` (end of a document) tokens. It is saved next to the
prepared data (`save`) and read back from there (`load`), so a run, its teacher and `kdjax eval`
all tokenize exactly as the data was tokenized.

* ``ByteTokenizer``: UTF-8 bytes, ids 3..258, after ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2
  (vocabulary 259). Needs nothing, round-trips any text exactly.
* ``HFTokenizer``: a `tokenizers.Tokenizer` (the optional extra ``pip install kdjax[text]``):
  a byte-level BPE trained on the corpus (`train_bpe`) or any ``tokenizer.json`` loaded as is
  (`HFTokenizer.from_file`), its special tokens found by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

SPECIALS = ("<pad>", "<bos>", "<eos>")
# Names other tokenizers give their special tokens, tried in order when loading a tokenizer.json.
_PAD_NAMES = ("<pad>", "[PAD]", "<|padding|>", "<|pad|>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"
#: An export's record of its tokenizer (what `save` returns), next to the tokenizer's files.
DESCRIPTION_FILE = "kdjax_tokenizer.json"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    pad: int
    bos: int
    eos: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: byte b is id b + 3; 0, 1, 2 are <pad>, <bos>, <eos>."""

    kind = "byte"
    pad, bos, eos = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids
                     if self.offset <= int(i) < self.vocab_size)
        # a generation may stop inside a multi-byte character
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> dict:
        del directory  # nothing to write: the kind is the whole description
        return {"kind": self.kind, "vocab_size": self.vocab_size}


def _import_tokenizers():
    try:
        import tokenizers  # noqa: PLC0415  (optional extra)
    except ImportError:
        raise ImportError("BPE tokenizers need Hugging Face's `tokenizers` package: pip install "
                          "'kdjax[text]' (or pip install tokenizers), or use the built-in "
                          "byte-level tokenizer (--tokenizer byte)") from None
    return tokenizers


def _find(vocab: dict[str, int], names: Sequence[str], what: str, where: str) -> int:
    for n in names:
        if n in vocab:
            return vocab[n]
    raise ValueError(f"the tokenizer {where} has no {what} token (looked for {list(names)}); add "
                     f"one to its special tokens")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` behind kdjax's tokenizer interface."""

    kind = "hf"

    def __init__(self, tokenizer, *, where: str = "given"):
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos = _find(vocab, _BOS_NAMES, "document-start (bos)", where)
        self.eos = _find(vocab, _EOS_NAMES, "document-end (eos)", where)
        # Padding positions are masked out of attention and loss (segment id 0), so any id will
        # do when a tokenizer has no pad token.
        self.pad = next((vocab[n] for n in _PAD_NAMES if n in vocab), self.eos)

    @classmethod
    def from_file(cls, path: str) -> "HFTokenizer":
        tokenizers = _import_tokenizers()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--tokenizer {path!r}: no such tokenizer.json file")
        return cls(tokenizers.Tokenizer.from_file(path), where=path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> dict:
        self._tok.save(os.path.join(directory, TOKENIZER_FILE))
        return {"kind": self.kind, "vocab_size": self.vocab_size, "file": TOKENIZER_FILE}


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization, so every text encodes) with ``<pad>``,
    ``<bos>``, ``<eos>`` as ids 0, 1, 2, trained on `texts` up to `vocab_size` tokens."""
    tokenizers = _import_tokenizers()
    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: it needs "
                         f"at least {256 + len(SPECIALS)} (256 bytes + {len(SPECIALS)} special "
                         f"tokens)")
    from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, where="trained on the corpus")


def save(tokenizer: Tokenizer, directory: str) -> dict:
    """Write what `load` needs into `directory`; returns the description for the metadata."""
    return tokenizer.save(directory)


def load(directory: str, description: dict) -> Tokenizer:
    """The tokenizer `save` wrote into `directory` with this `description`."""
    kind = description.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_file(os.path.join(directory, description["file"]))
    raise ValueError(f"{directory}: unknown tokenizer kind {kind!r} in its metadata "
                     f"({json.dumps(description)}); prepare the data again with this kdjax")


def from_directory(directory: str) -> Tokenizer:
    """The tokenizer of an LM export (its DESCRIPTION_FILE and the files it names)."""
    path = os.path.join(directory, DESCRIPTION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} has no {DESCRIPTION_FILE}: not the export of a "
                                f"language-model run (make one with `kdjax export`)")
    with open(path) as f:
        return load(directory, json.load(f))
