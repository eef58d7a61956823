"""A teacher cache: the teacher's top-k next-token distribution of every position of a prepared
text split, computed once (`kdjax cache-teacher`) and read by `kdjax distill
--config.teacher.cache=DIR` instead of running the teacher in every step.

    DIR/manifest.json                  written last: the cache is complete and what it is for
    DIR/progress.json                  while it is written: its settings and finished shards
    DIR/shard-00000.array_record ...   one record per packed row, in the split's row order

A record is the 16-byte BLAKE2b key of its packed row (tokens and segment ids, as
kdjax.lm.data stores them) followed by the row's ``seq_len`` positions, each `Layout.token_bytes`
bytes (every position is stored, those the loss masks included, so that a record is an array):

* the log of the tail mass ``log(1 - sum_k p)``, float32 (4 bytes);
* ``D``, the largest ``d_i = log p_top1 - log p_i`` of the position's top k, float16 rounded up
  (2 bytes);
* the k values ``d_i`` in the order of their ids, each ``round(sqrt(d_i / D) * (2^b - 1))`` in
  b bits (`value_bits`, default 9), bit-packed;
* the k ids, sorted, in Elias-Fano form: the low ``l = floor(log2(V / k))`` bits of each,
  bit-packed, and the high parts as the positions ``(id >> l) + i`` set in a bit vector of
  ``k + ((V - 1) >> l) + 1`` bits: at most ``2 + log2(V / k)`` bits an id, whatever the
  vocabulary.

At k = 128 of the byte tokenizer's 259 tokens that is 199 bytes a position (MaxText's fp32 values
and int64 ids: 1,536). Decoding (`Layout.decode`, jnp, inside the jitted step) gives
``d~_i = (q_i / (2^b - 1))^2 * D``, within ``|d_i - d~_i| <= sqrt(d_i * D) / (2^b - 1) +
D / (4 (2^b - 1)^2)`` of the teacher's (the square root spends the levels near the top-1 token,
whose error weighs most in the loss; at b = 9 and the benchmark's D <= 12.4: <= 0.025), then
renormalised so that the k probabilities sum to ``1 - exp(log_tail)``: every decoded
log-probability is within twice that bound of the teacher's. The top-k loss with the tail term
(kdjax.losses.token_topk_kl) renormalises the same way, so an error common to the k values
cancels; benchmarks/results/teacher_cache_cpu.md has the measured loss error.

A cache is checked before use: complete (its manifest), every shard's SHA-256, its row count, and
each record's key against the hash of the run's row, and refused, naming the difference, when it
was made with another sequence length, tokenizer, packing or data. An interrupted
`cache-teacher` keeps its finished shards (listed with their hashes in progress.json) and resumes
after them; a partial shard is written again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import checkpoint, losses, sharding
from kdjax import plan as plan_lib
from kdjax.lm import data as text_data, packing
from kdjax.prepare.common import file_digests
from kdjax.step import FrozenModel, compute_dtype

FORMAT = "kdjax-teacher-cache/1"
SCHEME = "sqrt-quantised relative log-probs + Elias-Fano ids"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
KEY_BYTES = 16
#: How documents become rows (kdjax.lm.packing); a cache records it with the preparation's seed.
PACKING = "kdjax.lm.packing.pack/1"


def _pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """``[..., n]`` unsigned values -> ``[..., ceil(n * width / 8)]`` uint8, little-endian bits."""
    if width == 0:
        return np.zeros((*values.shape[:-1], 0), np.uint8)
    bits = (values[..., None].astype(np.uint64) >> np.arange(width, dtype=np.uint64)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(*values.shape[:-1], -1), axis=-1,
                       bitorder="little")


def _unpack_bits(data: jax.Array, width: int, count: int) -> jax.Array:
    """`_pack_bits`' inverse, in jnp: ``[..., nbytes]`` uint8 -> ``[..., count]`` int32."""
    if width == 0:
        return jnp.zeros((*data.shape[:-1], count), jnp.int32)
    bits = jnp.unpackbits(data, axis=-1, bitorder="little")[..., :count * width]
    bits = bits.reshape(*data.shape[:-1], count, width).astype(jnp.int32)
    return (bits << jnp.arange(width, dtype=jnp.int32)).sum(-1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The bytes of one cached position for a vocabulary, k and value width."""

    vocab_size: int
    k: int
    value_bits: int = 9

    def __post_init__(self):
        if not 1 <= self.k < self.vocab_size:
            raise ValueError(f"--top-k must be in [1, {self.vocab_size}) for a vocabulary of "
                             f"{self.vocab_size} tokens (the tail needs one), got {self.k}")
        if not 2 <= self.value_bits <= 16:
            raise ValueError(f"value_bits must be in [2, 16], got {self.value_bits}")

    @property
    def low_bits(self) -> int:
        return max(0, math.floor(math.log2(self.vocab_size / self.k)))

    @property
    def high_len(self) -> int:
        return self.k + ((self.vocab_size - 1) >> self.low_bits) + 1

    @property
    def _sizes(self) -> tuple[int, int, int, int, int]:
        return (4, 2, -(-self.k * self.value_bits // 8), -(-self.k * self.low_bits // 8),
                -(-self.high_len // 8))

    @property
    def token_bytes(self) -> int:
        return sum(self._sizes)

    def describe(self) -> dict[str, Any]:
        return {"name": SCHEME, "value_bits": self.value_bits, "low_bits": self.low_bits,
                "bytes_per_token": self.token_bytes}

    def encode(self, logprobs: np.ndarray, ids: np.ndarray, log_tail: np.ndarray) -> np.ndarray:
        """`losses.token_topk_targets`' ``(logprobs, ids [..., k], log_tail [...])`` ->
        ``[..., token_bytes]`` uint8."""
        logprobs, ids = np.asarray(logprobs, np.float64), np.asarray(ids, np.int64)
        order = np.argsort(ids, axis=-1)
        ids = np.take_along_axis(ids, order, -1)
        d = np.maximum(logprobs.max(-1, keepdims=True) - np.take_along_axis(logprobs, order, -1),
                       0.0)
        top = d.max(-1, keepdims=True)
        scale = top.astype(np.float16)
        scale = np.where(scale < top, np.nextafter(scale, np.float16(np.inf)), scale)
        scale = np.where(scale > 0, scale, np.float16(1.0))  # k = 1 or ties: all d are 0
        levels = (1 << self.value_bits) - 1
        q = np.rint(np.sqrt(d / scale.astype(np.float64)) * levels).astype(np.uint64)
        high = np.zeros((*ids.shape[:-1], self.high_len), np.uint8)
        np.put_along_axis(high, (ids >> self.low_bits) + np.arange(self.k), 1, axis=-1)
        parts = [np.asarray(log_tail, "<f4")[..., None].view(np.uint8),
                 scale.astype("<f2").view(np.uint8), _pack_bits(q, self.value_bits),
                 _pack_bits((ids & ((1 << self.low_bits) - 1)).astype(np.uint64),
                            self.low_bits),
                 np.packbits(high, axis=-1, bitorder="little")]
        return np.concatenate(parts, axis=-1)

    def decode(self, data: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``[..., token_bytes]`` uint8 -> ``(logprobs [..., k] float32 (ids' order), ids int32,
        log_tail float32)``: the targets `losses.token_topk_kl` takes."""
        data = jnp.asarray(data, jnp.uint8)
        edges = np.cumsum((0, *self._sizes))
        part = [data[..., a:b] for a, b in itertools.pairwise(edges)]
        log_tail = jax.lax.bitcast_convert_type(part[0].reshape(*data.shape[:-1], 4),
                                                jnp.float32)
        scale = jax.lax.bitcast_convert_type(part[1].reshape(*data.shape[:-1], 2),
                                             jnp.float16).astype(jnp.float32)
        levels = (1 << self.value_bits) - 1
        s = _unpack_bits(part[2], self.value_bits, self.k).astype(jnp.float32) / levels
        rel = -(s * s) * scale[..., None]
        head = jnp.log(-jnp.expm1(log_tail))  # log(1 - tail), exact near 0
        logprobs = rel - jax.nn.logsumexp(rel, axis=-1, keepdims=True) + head[..., None]
        high_bits = _unpack_bits(part[4], 1, self.high_len).reshape(-1, self.high_len)
        # The positions of the k set bits, in order: the i-th set bit goes to slot i of its row
        # (one scatter; a sort of the bits was 8x slower on the CPU).
        rows = high_bits.shape[0]
        slot = jnp.cumsum(high_bits, axis=-1) - 1 + self.k * jnp.arange(rows)[:, None]
        slot = jnp.where(high_bits > 0, slot, rows * self.k)  # zeros: dropped
        positions = jnp.zeros(rows * self.k, jnp.int32).at[slot.reshape(-1)].set(
            jnp.broadcast_to(jnp.arange(self.high_len, dtype=jnp.int32), slot.shape).reshape(-1),
            mode="drop")
        high = (positions.reshape(*data.shape[:-1], self.k)
                - jnp.arange(self.k, dtype=jnp.int32))
        ids = (high << self.low_bits) | _unpack_bits(part[3], self.low_bits, self.k)
        return logprobs, ids.astype(jnp.int32), log_tail


def row_keys(tokens: np.ndarray, segments: np.ndarray) -> list[bytes]:
    """The key of each packed row: BLAKE2b-128 of its bytes as kdjax.lm.data stores them."""
    return [hashlib.blake2b(text_data.encode_row(t, s), digest_size=KEY_BYTES).digest()
            for t, s in zip(tokens, segments)]


def _fingerprint(keys: list[bytes]) -> str:
    return hashlib.sha256(b"".join(keys)).hexdigest()


def tokenizer_fingerprint(ds: text_data.TextDataset) -> str:
    """SHA-256 of the tokenizer's description and of its file, when it has one."""
    description = ds.meta["tokenizer"]
    h = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    if "file" in description:
        with open(os.path.join(ds.path, description["file"]), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _packing(ds: text_data.TextDataset) -> dict[str, Any]:
    return {"scheme": PACKING, "seed": ds.meta.get("seed"), "held_out": ds.meta.get("held_out")}


def _file_sha256(path: str) -> str:
    return file_digests(Path(path))[0]


def _write_json(path: str, record: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def _data_record(ds: text_data.TextDataset, split: str, keys: list[bytes]) -> dict[str, Any]:
    return {"name": ds.meta.get("name", os.path.basename(ds.path)), "split": split,
            "rows": len(keys), "fingerprint": _fingerprint(keys)}


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.array_record"


def teacher_targets(teacher: FrozenModel, k: int) -> Callable:
    """``targets(variables, tokens, segments) -> (logprobs, ids, log_tail)``, jitted: the
    frozen LM `teacher`'s top-k targets (`losses.token_topk_targets`) of packed rows, what a
    cache stores."""
    graphdef = teacher.graphdef

    @jax.jit
    def targets(variables, tokens, segments):
        model = nnx.merge(graphdef, variables)
        inputs = packing.model_inputs(tokens, segments)
        hidden = model.features(inputs["tokens"], segment_ids=inputs["segment_ids"],
                                logits=False)["hidden"]
        return losses.token_topk_targets(model.logits(hidden), k)

    return targets


def _teacher_identity(workdir: str, teacher: FrozenModel) -> dict[str, Any]:
    reader = checkpoint.RunReader(workdir, what="--teacher")
    try:
        step = reader.resolve_step("latest")
    finally:
        reader.close()
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(teacher.variables):
        h.update(np.asarray(leaf).tobytes())
    return {"workdir": os.path.realpath(workdir), "step": int(step), "params_sha256": h.hexdigest()}


def cache_teacher(teacher: str, data: str, out: str, *, top_k: int, split: str = "train",
                  data_dir: str | None = None, value_bits: int = 9, batch_size: int = 32,
                  rows_per_shard: int = 1024,
                  on_shard: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write the teacher cache of `teacher` (an LM run's workdir) on `split` of the prepared text
    dataset `data` to `out`, and return its manifest.

    The teacher runs jitted, `batch_size` rows at a time, in its teacher.compute_dtype ("auto":
    float32 on the CPU). `out` is created; one that holds an interrupted cache of the same
    settings is resumed after its finished shards, one of other settings or a finished cache is
    refused. `on_shard(done, total)` is called after each finished shard.
    """
    from kdjax.lm.task import LanguageModelTask  # noqa: PLC0415

    if os.path.exists(os.path.join(out, MANIFEST)):
        raise ValueError(f"--out {out!r} already holds a finished teacher cache; pick another "
                         f"--out, or delete that one to make it again")
    if batch_size < 1 or rows_per_shard < 1:
        raise ValueError(f"--batch-size and rows per shard must be >= 1, got {batch_size} and "
                         f"{rows_per_shard}")
    plan = plan_lib.read_run(teacher).replace(data={"name": data, "data_dir": data_dir or ""},
                                              teacher={"workdir": teacher})
    task = LanguageModelTask(plan)
    ds = task._dataset()
    tokens, segments = ds.load(split)
    layout = Layout(ds.vocab_size if not plan.model.num_classes else plan.model.num_classes,
                    top_k, value_bits)
    mesh = sharding.make_mesh()
    loaded = task.load_teacher(teacher, task._student(), mesh).model
    keys = row_keys(tokens, segments)
    settings = {
        "format": FORMAT, "teacher": _teacher_identity(teacher, loaded),
        "teacher_dtype": compute_dtype(plan.teacher.compute_dtype).name,
        "data": _data_record(ds, split, keys),
        "tokenizer": {"kind": ds.meta["tokenizer"].get("kind"),
                      "fingerprint": tokenizer_fingerprint(ds)},
        "seq_len": ds.seq_len, "packing": _packing(ds), "k": top_k,
        "vocab_size": layout.vocab_size, "scheme": layout.describe(),
        "rows_per_shard": rows_per_shard}

    def write_shards() -> None:
        """The shards after `done` (appended to it, and to progress.json, as each is
        finished)."""
        from array_record.python import array_record_module  # noqa: PLC0415

        count = -(-len(tokens) // rows_per_shard)
        for i in range(len(done), count):
            rows = range(i * rows_per_shard, min(len(tokens), (i + 1) * rows_per_shard))
            path = os.path.join(out, _shard_name(i))
            tmp = path + ".partial"
            writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
            try:
                for start in range(rows.start, rows.stop, batch_size):
                    stop = min(rows.stop, start + batch_size)
                    pad = batch_size - (stop - start)  # one shape, one compile
                    t = np.concatenate([tokens[start:stop], np.zeros((pad, tokens.shape[1]),
                                                                     tokens.dtype)])
                    s = np.concatenate([segments[start:stop], np.zeros((pad, tokens.shape[1]),
                                                                       segments.dtype)])
                    encoded = layout.encode(*jax.device_get(targets(loaded.variables, t, s)))
                    for r in range(stop - start):
                        writer.write(keys[start + r] + encoded[r].tobytes())
                writer.close()
            except BaseException:
                writer.close()
                os.remove(tmp)  # no partial shard left behind
                raise
            os.replace(tmp, path)
            done.append({"file": _shard_name(i), "rows": len(rows),
                         "sha256": _file_sha256(path)})
            _write_json(os.path.join(out, PROGRESS), {**settings, "shards": done})
            if on_shard is not None:
                on_shard(i + 1, count)

    new = not os.path.exists(out)
    done = _resume(out, settings)
    targets = teacher_targets(loaded, top_k)
    try:
        write_shards()
    except BaseException:
        if new and not done:  # nothing worth resuming: no directory left behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    manifest = {**settings, "rows": len(tokens), "shards": done,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_json(os.path.join(out, MANIFEST), manifest)
    os.remove(os.path.join(out, PROGRESS))
    return manifest


def _resume(out: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished shards of an interrupted cache of the same `settings` in `out` (whose other
    files, partial shards, are removed), or [] for a new directory."""
    progress = os.path.join(out, PROGRESS)
    if not os.path.exists(progress):
        if os.path.isdir(out) and os.listdir(out):
            raise ValueError(f"--out {out!r} is a non-empty directory that is not a teacher "
                             f"cache; pick a new or empty directory")
        os.makedirs(out, exist_ok=True)
        return []
    with open(progress) as f:
        previous = json.load(f)
    changed = sorted(k for k in settings if previous.get(k) != settings[k])
    if changed:
        raise ValueError(f"--out {out!r} holds an interrupted teacher cache made with other "
                         f"settings ({', '.join(changed)} differ); rerun with its settings to "
                         f"finish it, or pick another --out")
    done = [s for s in previous["shards"]
            if os.path.exists(os.path.join(out, s["file"]))
            and _file_sha256(os.path.join(out, s["file"])) == s["sha256"]]
    done = done[:next((i for i, s in enumerate(done) if s["file"] != _shard_name(i)), len(done))]
    keep = {s["file"] for s in done} | {PROGRESS}
    for name in os.listdir(out):
        if name not in keep:  # a shard cut short by the interruption
            os.remove(os.path.join(out, name))
    print(f"kdjax: resuming the teacher cache in {out}: {len(done)} finished shards kept",
          flush=True)
    return done


@dataclasses.dataclass(frozen=True)
class TeacherCache:
    """A verified cache: its manifest, layout and records ``[rows, seq_len, token_bytes]``."""

    path: str
    manifest: dict[str, Any]
    layout: Layout
    records: np.ndarray


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the finished cache in `path`; refuses an incomplete or foreign one."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        if os.path.isfile(os.path.join(path, PROGRESS)):
            with open(os.path.join(path, PROGRESS)) as f:
                done = len(json.load(f)["shards"])
            raise ValueError(f"teacher.cache={path!r} is incomplete ({done} finished shards, no "
                             f"{MANIFEST}): its `kdjax cache-teacher` was interrupted; run the "
                             f"same command again to finish it")
        raise ValueError(f"teacher.cache={path!r} is not a teacher cache ({manifest_path} not "
                         f"found); make one with `kdjax cache-teacher --teacher RUN --data NAME "
                         f"--top-k K --out {path}`")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"teacher.cache={path!r} is format {manifest.get('format')!r}, this "
                         f"kdjax reads {FORMAT!r}; make the cache again")
    return manifest


def open_cache(path: str, ds: text_data.TextDataset, split: str, tokens: np.ndarray,
               segments: np.ndarray) -> TeacherCache:
    """The cache in `path`, verified for the rows (`tokens`, `segments`) of `split` of `ds`:
    refused, naming the difference, when it was made for another sequence length, tokenizer,
    packing or data, or when it is incomplete or corrupt."""
    from array_record.python import array_record_module  # noqa: PLC0415

    m = read_manifest(path)
    remake = (f"make a cache for it with `kdjax cache-teacher --teacher {m['teacher']['workdir']} "
              f"--data {ds.meta.get('name')} --data-dir {os.path.dirname(ds.path)} --split "
              f"{split} --top-k {m['k']} --out NEW_DIR`")
    name = ds.meta.get("name", os.path.basename(ds.path))
    if m["seq_len"] != ds.seq_len:
        raise ValueError(f"teacher.cache={path!r} was made for seq_len {m['seq_len']}, this "
                         f"run's data {name!r} has seq_len {ds.seq_len}; {remake}")
    if m["tokenizer"]["fingerprint"] != tokenizer_fingerprint(ds):
        raise ValueError(f"teacher.cache={path!r} was made with another tokenizer "
                         f"({m['tokenizer']['kind']!r}, fingerprint "
                         f"{m['tokenizer']['fingerprint'][:12]}) than this run's data {name!r} "
                         f"({ds.meta['tokenizer'].get('kind')!r}, "
                         f"{tokenizer_fingerprint(ds)[:12]}); {remake}")
    if m["packing"] != _packing(ds):
        raise ValueError(f"teacher.cache={path!r} was made for another packing of the documents "
                         f"({m['packing']}) than this run's data {name!r} ({_packing(ds)}); "
                         f"{remake}")
    keys = row_keys(tokens, segments)
    ours = _data_record(ds, split, keys)
    theirs = m["data"]
    if (theirs["name"], theirs["split"]) != (ours["name"], ours["split"]):
        raise ValueError(f"teacher.cache={path!r} was made for data {theirs['name']!r} split "
                         f"{theirs['split']!r}, this run trains on {ours['name']!r} split "
                         f"{ours['split']!r}; {remake}")
    if (theirs["rows"], theirs["fingerprint"]) != (ours["rows"], ours["fingerprint"]):
        raise ValueError(f"teacher.cache={path!r} was made for other rows of {ours['name']!r} "
                         f"split {split!r} ({theirs['rows']} rows, fingerprint "
                         f"{theirs['fingerprint'][:12]}; now {ours['rows']} rows, "
                         f"{ours['fingerprint'][:12]}): the data was prepared again; {remake}")
    layout = Layout(m["vocab_size"], m["k"], m["scheme"]["value_bits"])
    width = KEY_BYTES + ds.seq_len * layout.token_bytes
    body = np.empty((len(keys), ds.seq_len, layout.token_bytes), np.uint8)
    count = 0
    for shard in m["shards"]:
        file = os.path.join(path, shard["file"])
        if not os.path.isfile(file) or _file_sha256(file) != shard["sha256"]:
            raise ValueError(f"teacher.cache={path!r} is corrupt: shard {shard['file']} is "
                             f"{'missing' if not os.path.isfile(file) else 'changed'} (its "
                             f"SHA-256 differs from the manifest's); make the cache again")
        reader = array_record_module.ArrayRecordReader(file)
        try:
            records = reader.read_all()
        finally:
            reader.close()
        if count + len(records) > len(keys) or any(len(r) != width for r in records):
            count += len(records)
            break
        for r in records:
            if r[:KEY_BYTES] != keys[count]:
                raise ValueError(f"teacher.cache={path!r} does not match the data: record "
                                 f"{count}'s key is not the hash of row {count} of {name!r} "
                                 f"split {split!r}; {remake}")
            body[count] = np.frombuffer(r, np.uint8, offset=KEY_BYTES).reshape(body.shape[1:])
            count += 1
    if count != len(keys):
        raise ValueError(f"teacher.cache={path!r} is corrupt: its shards hold other than the "
                         f"{len(keys)} records of {width} bytes the manifest and the data have; "
                         f"make the cache again")
    return TeacherCache(path, m, layout, body)
