"""Distilling across tokenizers: both tokenizations of a row's text aligned by byte offsets, and
the two models compared on what they predict of the next byte (`lm.cross_tokenizer='next_byte'`).

Why this scheme. A teacher and a student with different tokenizers cannot be compared token by
token: their vocabularies name different strings, and the same text is a different number of
tokens to each. Two things must be solved, and the literature solves them separately:

* *Which positions to compare.* ULD (Boizard et al., 2024) pairs the i-th token of one
  tokenization with the i-th of the other, which drifts apart as soon as the tokenizations
  differ in length (a byte-level teacher needs ~2-4 positions per BPE token). GOLD (TRL) and
  NeMo RL's cross-tokenizer aligner pair positions by the text they have consumed: here, a
  student position and a teacher position are paired when both have read exactly the same
  bytes of the row's text (their context ends at the same byte offset, a boundary of both
  tokenizations). With a byte-level teacher every student position has its pair.
* *What to compare there.* ULD compares the two next-token distributions sorted by probability,
  ignoring which token is which; for a byte teacher and a BPE student that compares a
  distribution over single bytes with one over multi-byte tokens, whose shapes differ by
  construction. Instead both are marginalised onto the one event both models predict at a
  shared boundary, the next byte (Phan et al., 2024, "Exact byte-level probabilities from
  tokenized language models"): ``P(next byte = b) = sum of p(token) over the tokens whose text
  starts with b``, plus one class for "no further byte" (the end of the document). Any token
  divergence of kdjax.losses then applies to these 257-way distributions
  (kdjax.losses.token_byte_log_probs), so loss.name keeps its meaning.

The tokenizers must say which bytes each token stands for: the built-in byte tokenizer and
byte-level BPEs (GPT-2, Llama 3, Qwen 2/3, `kdjax prepare text --tokenizer bpe`) do. A
SentencePiece-style tokenizer (Llama 2, Mistral, Gemma) rewrites spaces and is refused, with the
reason. Text the teacher cannot read as the student does (a row that starts inside a multi-byte
character, text a normaliser rewrites) is left unaligned, and the share of aligned positions is
reported.

The teacher reads a student row's text as its own tokens in windows of the sequence length it was
trained at (`window`): ``chunks`` windows a row, each a packed row of its own, so the teacher sees
contexts as long as those it learned from, never longer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from kdjax.lm import tokenizer as tokenizer_lib

MODES = ("", "next_byte")
#: The classes of the next-byte distribution: the 256 byte values, and END (no further byte).
NUM_CLASSES = 257
END = 256


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character standing for each
    byte (bytes that print as themselves keep their character, the others are shifted past
    255) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + shifted
            shifted += 1
    return {chr(c): b for b, c in chars.items()}


def token_bytes(tok: tokenizer_lib.Tokenizer, *, what: str) -> list[bytes]:
    """The bytes each token id of `tok` stands for (b"" for special tokens); `what` names the
    tokenizer in errors. Refuses a tokenizer whose tokens are not byte strings."""
    if isinstance(tok, tokenizer_lib.ByteTokenizer):
        return [b""] * tok.offset + [bytes([b]) for b in range(256)]
    inner = getattr(tok, "_tok", None)
    decoder = type(getattr(inner, "decoder", None)).__name__
    if inner is None or decoder != "ByteLevel":
        raise ValueError(
            f"lm.cross_tokenizer: the {what}'s tokenizer ({tok.kind}, decoder {decoder}) does "
            f"not spell its tokens as bytes; cross-tokenizer distillation aligns the two "
            f"tokenizations by byte offsets and supports byte-level tokenizers only (kdjax's "
            f"byte tokenizer, byte-level BPEs such as GPT-2's, Llama 3's, Qwen's, or `kdjax "
            f"prepare text --tokenizer bpe`)")
    alphabet = _byte_level_alphabet()
    special = {i for i, t in inner.get_added_tokens_decoder().items() if t.special}
    table = []
    for i in range(tok.vocab_size):
        piece = inner.id_to_token(i)
        if i in special or piece is None:
            table.append(b"")
        elif all(c in alphabet for c in piece):
            table.append(bytes(alphabet[c] for c in piece))
        else:  # an added (non-special) token is stored as its text
            table.append(piece.encode("utf-8"))
    return table


def first_bytes(table: Sequence[bytes]) -> np.ndarray:
    """``[V]`` int32: each token's first byte, END for a token of no bytes (a special token: the
    end of the document, or one no text reaches)."""
    return np.asarray([t[0] if t else END for t in table], np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Reading:
    """What the train step needs to compare the two models (kdjax.lm.step): each tokenizer's
    `first_bytes`, and the shape of the teacher's reading of a row, `chunks` rows of `window`."""

    student_first_bytes: np.ndarray
    teacher_first_bytes: np.ndarray
    chunks: int
    window: int


@dataclasses.dataclass(frozen=True, eq=False)
class Alignment:
    """A dataset's rows as the teacher reads them, and where the two meet.

    ``teacher_tokens``/``teacher_segments`` ``[N, chunks * window]`` int32: each row's text in the
    teacher's tokens, its documents numbered as packed rows are (kdjax.lm.packing), read by the
    teacher as `reading.chunks` rows of `reading.window`. ``align`` ``[N, seq_len]`` int32: for
    each student input position, the teacher position (into the flat ``chunks * window``) that has
    read the same bytes, -1 where none has. ``aligned``: the share of the student's target
    positions that have a partner."""

    teacher_tokens: np.ndarray
    teacher_segments: np.ndarray
    align: np.ndarray
    reading: Reading
    aligned: float

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays the rows carry into the step (kdjax.step.DeviceData)."""
        return {"teacher_tokens": self.teacher_tokens, "teacher_segments": self.teacher_segments,
                "align": self.align}


def _ends(ids: Sequence[int], table: Sequence[bytes], eos: int) -> list[int | None]:
    """Byte offset at which each token's context ends (what it has read, itself included);
    None for end-of-document tokens, which predict nothing either side aligns."""
    out, offset = [], 0
    for i in ids:
        offset += len(table[i])
        out.append(None if i == eos else offset)
    return out


def _readable(tok: tokenizer_lib.Tokenizer, data: bytes) -> bytes | None:
    """The part of `data` that `tok` can tokenize as text: all of it for bytes; for a text
    tokenizer, without a character that the row's end cut (None when the row's start cut one:
    then no position of the row has read what the teacher would)."""
    if isinstance(tok, tokenizer_lib.ByteTokenizer):
        return data
    for cut in range(min(3, len(data)) + 1):
        try:
            data[:len(data) - cut].decode("utf-8")
            return data[:len(data) - cut]
        except UnicodeDecodeError:
            continue
    return None


def _encode(tok: tokenizer_lib.Tokenizer, data: bytes) -> list[int]:
    if isinstance(tok, tokenizer_lib.ByteTokenizer):
        return [b + tok.offset for b in data]
    return tok.encode(data.decode("utf-8"))


def align_rows(tokens: np.ndarray, segments: np.ndarray, *, student: tokenizer_lib.Tokenizer,
               teacher: tokenizer_lib.Tokenizer, window: int) -> Alignment:
    """The teacher's reading of packed student rows (``tokens``, ``segments`` ``[N, T + 1]``)
    and the byte-offset alignment of the two (see the module docstring)."""
    s_table = token_bytes(student, what="student")
    t_table = token_bytes(teacher, what="teacher")
    n, width = tokens.shape
    rows_t, rows_s, rows_a = [], [], np.full((n, width - 1), -1, np.int32)
    for r in range(n):
        t_ids: list[int] = []
        t_seg: list[int] = []
        for seg in range(1, int(segments[r].max(initial=0)) + 1):
            where = np.flatnonzero(segments[r] == seg)
            ids = tokens[r, where].tolist()
            text = b"".join(s_table[i] for i in ids)
            readable = _readable(teacher, text)
            if readable is None:
                continue
            body = _encode(teacher, readable)
            if b"".join(t_table[i] for i in body) != readable:  # a normaliser rewrote it
                continue
            head = [teacher.bos] if ids[0] == student.bos else []
            tail = [teacher.eos] if ids[-1] == student.eos and readable == text else []
            theirs = head + body + tail
            start = len(t_ids)
            t_ids.extend(theirs)
            t_seg.extend([seg] * len(theirs))
            at = {e: start + j for j, e in enumerate(_ends(theirs, t_table, teacher.eos))
                  if e is not None}
            for p, e in zip(where, _ends(ids, s_table, student.eos)):
                if p < width - 1 and e is not None and e in at:
                    rows_a[r, p] = at[e]
        rows_t.append(t_ids)
        rows_s.append(t_seg)
    longest = max((len(t) for t in rows_t), default=0)
    chunks = max(1, -(-longest // window))
    t_tokens = np.full((n, chunks * window), teacher.pad, np.int32)
    t_segments = np.zeros((n, chunks * window), np.int32)
    for r, (ids, seg) in enumerate(zip(rows_t, rows_s)):
        t_tokens[r, :len(ids)], t_segments[r, :len(seg)] = ids, seg
    counted = (segments[:, :-1] != 0) & (segments[:, 1:] == segments[:, :-1])
    aligned = float((rows_a >= 0)[counted].mean()) if counted.any() else 1.0
    reading = Reading(first_bytes(s_table), first_bytes(t_table), chunks, window)
    return Alignment(t_tokens, t_segments, rows_a, reading, aligned)
