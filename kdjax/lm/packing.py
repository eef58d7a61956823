"""Packing documents into fixed-length rows, and what a row means to the loss.

Documents (each ``[bos] + tokens + [eos]``) are concatenated into one stream and cut into rows of
``seq_len + 1`` tokens, consecutive rows overlapping by one token, so that every token of the
stream is the target of exactly one position (none is lost at a row's edge) and no padding is
needed but at the very end. Each row carries segment ids numbering its documents 1, 2, ... (0 =
padding): the model attends within a segment only (kdjax.lm.models.document_mask), and a position
counts in the loss only when its target is the next token of the same document. Instruction data
(kdjax.prepare.text) adds a per-token loss mask, packed the same way (`pack` of the documents'
masks), that leaves a conversation's prompt tokens out of the targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pack(documents: Iterable[Sequence[int]], seq_len: int, *, pad_id: int = 0
         ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``seq_len + 1`` tokens and their segment ids, both ``[N, seq_len + 1]`` int32.

    Row r holds stream positions ``r*seq_len .. r*seq_len + seq_len``. Segment ids restart at 1
    in every row (a document cut by a row boundary continues, under a new id, in the next row).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    docs = [np.asarray(d, np.int32) for d in documents if len(d)]
    if not docs:
        return np.zeros((0, seq_len + 1), np.int32), np.zeros((0, seq_len + 1), np.int32)
    stream = np.concatenate(docs)
    doc_of = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int64), [len(d) for d in docs])
    rows = max(1, -(-(len(stream) - 1) // seq_len))
    width = rows * seq_len + 1
    tokens = np.full(width, pad_id, np.int32)
    docs_padded = np.zeros(width, np.int64)
    tokens[:len(stream)], docs_padded[:len(stream)] = stream, doc_of
    index = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    row_tokens, row_docs = tokens[index], docs_padded[index]
    # Renumber each row's documents from 1, keeping 0 for padding.
    first = np.where(row_docs > 0, row_docs, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
    segments = np.where(row_docs > 0, row_docs - first + 1, 0).astype(np.int32)
    return row_tokens, segments


def model_inputs(tokens: np.ndarray, segments: np.ndarray, loss_mask: np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
    """A packed row's inputs, targets and loss mask (numpy or jax arrays alike).

    inputs are the first ``seq_len`` tokens, targets the last ``seq_len``; position i counts in
    the loss iff it is not padding, its target belongs to the same document and, given a
    per-token `loss_mask` (``[..., seq_len + 1]``, nonzero where a token counts as a target: a
    response's), its target is one that counts.
    """
    seg_in, seg_out = segments[..., :-1], segments[..., 1:]
    mask = (seg_in != 0) & (seg_out == seg_in)
    if loss_mask is not None:
        mask = mask & (loss_mask[..., 1:] != 0)
    return {"tokens": tokens[..., :-1], "segment_ids": seg_in, "targets": tokens[..., 1:],
            "loss_mask": mask}


def pad_rows(rows: np.ndarray, count: int) -> np.ndarray:
    """`rows` with zero rows appended up to `count`: segment 0, padding that no loss counts (a
    last partial batch keeps the batch's compiled shape)."""
    return np.concatenate([rows, np.zeros((count - len(rows), *rows.shape[1:]), rows.dtype)])
