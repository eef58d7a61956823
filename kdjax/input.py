"""Training input: device-resident data sampled inside the step, or batches streamed from the host.

Two modes, one contract: for a seed, step `s` trains on the examples
``perm_e[p * B:(p + 1) * B]`` where ``e, p = divmod(s, steps_per_epoch)``,
``perm_e = jax.random.permutation(kdjax.step.epoch_key(rng, e), N)``, ``rng`` is the run's key
from the seed, B the global batch size and ``steps_per_epoch = N // B`` (the last partial batch
of an epoch is dropped). So batches are deterministic given (seed, epoch, step), identical in both
modes, and a run resumes anywhere from its step alone; :class:`InputState` (epoch, position) is
the small iterator state a checkpoint stores.

* **device** (Fashion-MNIST, CIFAR: the uint8 training set fits in a configurable share of device
  memory): the arrays go to the devices once and the jitted step gathers each batch itself
  (:class:`kdjax.step.DeviceData`); the host does nothing per step.
* **stream** (ImageNet-style data, or anything that does not fit): :class:`TrainStream` reads the
  examples of each batch through TFDS's array_record data source (:func:`kdjax.data.open_split`),
  decodes them on worker threads (PIL and zlib release the GIL, so threads scale on cores without
  the copies and pickling of worker processes), assembles this process's rows of the global batch,
  places it with ``jax.make_array_from_process_local_data`` over the step's mesh and keeps two
  batches in flight on the device ahead of the step. Each process reads only the rows of the
  global batch that its own devices hold, so processes read disjoint slices of every epoch's
  permutation that together cover it.

Why not grain: the sampler must reproduce the device path's permutation exactly (same batches in
both modes), which grain's samplers do not; past that, an index list, a thread pool and a
two-deep queue are all the pipeline needs, and the dependency stays out.

Augmentation runs on the device in both modes (crop with padding, flip, mixup, cutmix: see
:mod:`kdjax.augment`), from the step's key, so it is the same in both modes too. The exception is
the inception-style random-resized crop of variable-size (ImageNet-style) images: it runs here on
the host, inside the decode, because images of different sizes cannot be batched before they are
cropped to one size, and because knowing the crop before decoding lets libjpeg decode at a reduced
DCT scale (the dominant cost; see :mod:`kdjax.images`). Its randomness is keyed by
(seed, epoch, example index), so it too is deterministic and independent of the number of
workers and processes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from kdjax import data as data_lib
from kdjax import images as image_codec
from kdjax import plan as plan_lib
from kdjax import sharding

#: Capacity assumed for a device that reports no memory statistics (XLA:CPU).
DEFAULT_CPU_CAPACITY = 4 << 30


# --------------------------------------------------------------------------
# Mode choice
# --------------------------------------------------------------------------


def device_capacity(devices: Sequence[jax.Device] | None = None) -> int:
    """Bytes of memory of the smallest local device (DEFAULT_CPU_CAPACITY when unknown)."""
    devices = jax.local_devices() if devices is None else devices
    caps = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory stats
            stats = None
        limit = (stats or {}).get("bytes_limit")
        caps.append(int(limit) if limit else DEFAULT_CPU_CAPACITY)
    return min(caps) if caps else DEFAULT_CPU_CAPACITY


def model_input_shape(data: plan_lib.Data, spec: data_lib.DatasetSpec) -> tuple[int, int, int]:
    """(H, W, C) the model sees: the dataset's own shape, or data.image_size when set."""
    size = data.image_size
    channels = int(spec.image_shape[-1] or 3)
    if size:
        return (size, size, channels)
    if not spec.fixed_shape:
        raise ValueError(
            f"{spec.name} has images of varying sizes (shape {spec.image_shape}); set the size the "
            f"model sees with data.image_size, e.g. --config.data.image_size=224")
    return tuple(int(s) for s in spec.image_shape)  # type: ignore[return-value]


def choose_mode(data: plan_lib.Data, spec: data_lib.DatasetSpec, *,
                split: str | None = None, devices: Sequence[jax.Device] | None = None
                ) -> tuple[str, str]:
    """("device" | "stream", why) for data.mode = "auto" | "device" | "stream", reading `split`
    (default data.train_split)."""
    mode = data.mode
    if mode not in ("auto", "device", "stream"):
        raise ValueError(f"data.mode must be 'auto', 'device' or 'stream', got {mode!r}")
    split = split or data.train_split
    host_only = []
    if not spec.fixed_shape:
        host_only.append(f"its images have varying sizes {spec.image_shape}")
    if data.random_resized_crop:
        host_only.append("data.random_resized_crop runs on the host while decoding")
    size = data.image_size
    if size and spec.fixed_shape and tuple(spec.image_shape[:2]) != (size, size):
        host_only.append(f"data.image_size={size} resizes its {spec.image_shape[0]}x"
                         f"{spec.image_shape[1]} images on the host")
    if mode == "stream":
        return "stream", "data.mode='stream'"
    if host_only:
        if mode == "device":
            raise ValueError(f"data.mode='device' cannot hold {spec.name}: "
                             f"{'; '.join(host_only)}. Use data.mode='stream' (or 'auto').")
        return "stream", "; ".join(host_only)
    n = spec.num_examples(_split_name(split))
    nbytes = n * int(np.prod(spec.image_shape)) + 4 * n
    fraction = data.device_memory_fraction
    capacity = device_capacity(devices)
    fits = nbytes <= fraction * capacity
    why = (f"{spec.name} {split}: {nbytes / 2**20:,.0f} MiB of uint8 "
           f"{'<=' if fits else '>'} data.device_memory_fraction={fraction} of "
           f"{capacity / 2**30:.1f} GiB per device")
    if mode == "device":
        return "device", "data.mode='device' (" + why + ")"
    return ("device" if fits else "stream"), why


def _split_name(split: str) -> str:
    return split.partition("[")[0]


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputState:
    """Where a training input stands: the next batch is batch `position` of epoch `epoch`."""

    epoch: int = 0
    position: int = 0

    @classmethod
    def from_step(cls, step: int, steps_per_epoch: int) -> InputState:
        epoch, position = divmod(int(step), int(steps_per_epoch))
        return cls(epoch, position)

    def step(self, steps_per_epoch: int) -> int:
        return self.epoch * steps_per_epoch + self.position

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputState:
        return cls(int(d["epoch"]), int(d["position"]))


def run_key(seed: int) -> np.ndarray:
    """The run's base key data, as `kdjax.step.init_train_state` stores it in TrainState.rng."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


@functools.partial(jax.jit, static_argnums=2)
def _permutation_jit(rng, epoch, num_examples: int):
    from kdjax.step import epoch_key  # noqa: PLC0415  (the step's own epoch key)

    return jax.random.permutation(epoch_key(rng, epoch), num_examples)


def epoch_permutation(rng: np.ndarray, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of `epoch`: exactly the permutation the device-resident step draws."""
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        perm = _permutation_jit(jax.device_put(rng, cpu), np.int32(epoch), int(num_examples))
    return np.asarray(perm).astype(np.int64)


def even_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of a global batch that `process_index` reads."""
    if batch_size % process_count:
        raise ValueError(f"the batch size {batch_size} must be divisible by the number of "
                         f"processes {process_count}")
    per = batch_size // process_count
    return process_index * per, (process_index + 1) * per


def process_rows(mesh: jax.sharding.Mesh, batch_size: int) -> tuple[int, int]:
    """Rows of a global batch sharded over `mesh` held by this process's devices (contiguous)."""
    sharding.check_batch_size(batch_size, mesh, "the batch size (train.batch_size, eval.batch_size)")
    spec = sharding.batch_sharded(mesh)
    index_map = spec.addressable_devices_indices_map((batch_size,))
    rows = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                   for s in index_map.values()})
    start, stop = rows[0][0], rows[0][1]
    for a, b in rows[1:]:
        if a != stop:
            raise ValueError(f"this process's devices hold non-contiguous rows {rows} of the "
                             f"batch; order the mesh's devices by process")
        stop = b
    return start, stop


class TrainSampler:
    """Which examples this process reads for each step (see the module docstring).

    `rows` = (start, stop): this process's rows of every global batch (default: all of them).
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int,
                 rows: tuple[int, int] | None = None):
        if batch_size < 1 or batch_size > num_examples:
            raise ValueError(f"the batch size must be in [1, {num_examples}] (the number of "
                             f"training examples), got {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.steps_per_epoch = num_examples // batch_size
        self.rows = rows or (0, batch_size)
        if not 0 <= self.rows[0] < self.rows[1] <= batch_size:
            raise ValueError(f"rows {self.rows} are not a slice of a batch of {batch_size}")
        self._rng = run_key(seed)
        self._cache: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if self._cache is None or self._cache[0] != epoch:
                self._cache = (epoch, epoch_permutation(self._rng, epoch, self.num_examples))
            return self._cache[1]

    def indices(self, step: int) -> np.ndarray:
        """Example indices of this process's rows of the global batch of `step`."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        start = pos * self.batch_size
        return self.permutation(epoch)[start + self.rows[0]:start + self.rows[1]]

    def global_indices(self, step: int) -> np.ndarray:
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        return self.permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How records become uint8 images of `shape` (H, W, C) on the host."""

    shape: tuple[int, int, int]
    source_shape: tuple[int | None, ...]
    random_resized_crop: bool = False  # training only
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    eval_crop_fraction: float = 0.875
    seed: int = 0

    def __post_init__(self):
        fixed = all(isinstance(s, int) for s in self.source_shape)
        if not fixed and self.shape[-1] != 3:
            raise ValueError(f"variable-size images are decoded as RGB; got shape {self.shape}")

    @property
    def passthrough(self) -> bool:
        """Fixed-shape data at its own size: decode only (vectorised PNG), no resampling."""
        return (not self.random_resized_crop
                and tuple(self.source_shape) == tuple(self.shape))

    def decode(self, blobs: Sequence[bytes], indices: Sequence[int], epochs: Sequence[int], *,
               train: bool) -> np.ndarray:
        """[len(blobs), H, W, C] uint8. Each example's (index, epoch) keys its random crop."""
        if self.passthrough:
            return image_codec.decode_images(blobs, self.shape)
        out = np.empty((len(blobs), *self.shape), np.uint8)
        hw = self.shape[:2]
        fixed = all(isinstance(s, int) for s in self.source_shape)
        for i, (blob, idx, epoch) in enumerate(zip(blobs, indices, epochs)):
            if train and self.random_resized_crop:
                rng = np.random.default_rng((self.seed, int(epoch), int(idx)))
                img = image_codec.decode_random_resized_crop(
                    blob, hw, rng, scale=self.crop_scale, ratio=self.crop_ratio)
            elif fixed:
                img = image_codec.decode_resized(blob, hw)
            else:
                img = image_codec.decode_center_crop(blob, hw,
                                                     crop_fraction=self.eval_crop_fraction)
            out[i] = img.reshape(self.shape) if img.ndim == 3 else img[..., None]
        return out


# --------------------------------------------------------------------------
# The threaded, prefetching pipeline
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Item:
    """One host batch to build: example indices (-1 = padding) laid out as `shape`."""

    key: int
    indices: np.ndarray  # [m] flat
    epochs: np.ndarray  # [m] epoch of each example (random crops are keyed by it)
    shape: tuple[int, ...]  # leading dims of the batch, prod == m
    mask: bool  # add a "mask" of the real examples (evaluation)


class _Error:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Pipeline:
    """Builds `_Item`s on a thread pool, `ahead` items at a time, in order; a feeder thread puts
    finished batches on the device and keeps `prefetch` of them queued for the consumer."""

    def __init__(self, reader: data_lib.SplitReader, decode: DecodeSpec, items: Iterator[_Item],
                 to_device: Callable[[dict[str, np.ndarray]], Any], *, train: bool,
                 num_workers: int, prefetch: int = 2):
        self._reader, self._decode, self._train = reader, decode, train
        self._items = items
        self._to_device = to_device
        self._workers = max(1, num_workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers,
                                                           thread_name_prefix="kdjax-decode")
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="kdjax-input", daemon=True)
        self._thread.start()

    def _load(self, out_images, out_labels, positions, indices, epochs):
        blobs, labels = self._reader.read(indices)
        out_images[positions] = self._decode.decode(blobs, indices, epochs, train=self._train)
        out_labels[positions] = labels

    def _submit(self, item: _Item):
        m = len(item.indices)
        images = np.zeros((m, *self._decode.shape), np.uint8)
        labels = np.zeros((m,), np.int32)
        real = np.nonzero(item.indices >= 0)[0]
        chunks = np.array_split(real, min(self._workers, max(1, len(real)))) if len(real) else []
        futures = [self._pool.submit(self._load, images, labels, pos, item.indices[pos],
                                     item.epochs[pos]) for pos in chunks if len(pos)]
        return item, images, labels, futures

    def _feed(self):
        pending: list = []
        try:
            items = iter(self._items)
            exhausted = False
            while not self._stop.is_set():
                while not exhausted and len(pending) < 2 + self._queue.maxsize:
                    try:
                        pending.append(self._submit(next(items)))
                    except StopIteration:
                        exhausted = True
                if not pending:
                    self._put(None)
                    return
                item, images, labels, futures = pending.pop(0)
                for f in futures:
                    f.result()
                batch = {"image": images.reshape(*item.shape, *images.shape[1:]),
                         "label": labels.reshape(item.shape)}
                if item.mask:
                    batch["mask"] = (item.indices >= 0).astype(np.float32).reshape(item.shape)
                else:  # training: each row's place in the training set, for CRD's memory
                    batch["index"] = item.indices.astype(np.int32).reshape(item.shape)
                self._put((item.key, self._to_device(batch)))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(_Error(e))

    def _put(self, value):
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self):
        value = self._queue.get()
        if isinstance(value, _Error):
            self.close()
            raise value.exc
        return value

    def close(self):
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)


def _placer(mesh: jax.sharding.Mesh, global_batch: int, leading: tuple[int, ...]):
    """Host batch of this process's rows -> global jax.Arrays sharded like the step expects."""
    target = sharding.batch_sharded(mesh, stacked=bool(leading))

    def place(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        out = {}
        for k, v in batch.items():
            global_shape = (*leading, global_batch, *v.shape[len(leading) + 1:])
            out[k] = jax.make_array_from_process_local_data(target, v, global_shape)
        return out

    return place


class TrainStream:
    """Streamed training batches in the device path's order; ``next(stream)`` gives the batch of
    the next step(s) as global jax.Arrays ({"image": uint8, "label": int32, "index": int32, the
    examples' rows in the training set as in the device path}, a leading [steps_per_call] axis
    when steps_per_call > 1)."""

    def __init__(self, reader: data_lib.SplitReader, decode: DecodeSpec, *, seed: int,
                 batch_size: int, mesh: jax.sharding.Mesh | None = None, steps_per_call: int = 1,
                 state: InputState | None = None, num_workers: int | None = None,
                 prefetch: int = 2, rows: tuple[int, int] | None = None):
        self.mesh = mesh or sharding.make_mesh()
        if rows is None:
            rows = process_rows(self.mesh, batch_size)
        self.sampler = TrainSampler(len(reader), batch_size, seed=seed, rows=rows)
        self.steps_per_call = steps_per_call
        state = state or InputState()
        self._next_step = state.step(self.sampler.steps_per_epoch)
        leading = (steps_per_call,) if steps_per_call > 1 else ()
        self._pipeline = _Pipeline(
            reader, decode, self._items(self._next_step, leading), _placer(
                self.mesh, batch_size, leading), train=True,
            num_workers=num_workers or os.cpu_count() or 1, prefetch=prefetch)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def _items(self, start: int, leading: tuple[int, ...]) -> Iterator[_Item]:
        step = start
        spe = self.sampler.steps_per_epoch
        while True:
            steps = range(step, step + self.steps_per_call)
            idx = np.concatenate([self.sampler.indices(s) for s in steps])
            epochs = np.repeat([s // spe for s in steps], len(idx) // len(steps))
            yield _Item(step, idx, epochs, (*leading, len(idx) // len(steps)), mask=False)
            step += self.steps_per_call

    def state(self) -> InputState:
        """The state to resume from: the next batch `next()` will return."""
        return InputState.from_step(self._next_step, self.sampler.steps_per_epoch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        key, batch = self._pipeline.get()
        assert key == self._next_step, (key, self._next_step)
        self._next_step += self.steps_per_call
        return batch

    def close(self) -> None:
        self._pipeline.close()

    def __del__(self):  # an abandoned stream (e.g. training raised) stops its threads
        pipeline = getattr(self, "_pipeline", None)
        if pipeline is not None:
            pipeline.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def eval_items(num_examples: int, batch_size: int, rows: tuple[int, int]) -> Iterator[_Item]:
    """Fixed-order evaluation batches: this process's `rows` of each global batch, the indices
    past the end padded with -1 (masked out), the last partial batch never dropped."""
    for b, start in enumerate(range(0, num_examples, batch_size)):
        idx = np.arange(start + rows[0], start + rows[1])
        idx[idx >= num_examples] = -1
        yield _Item(b, idx, np.zeros_like(idx), (len(idx),), mask=True)


def eval_stream(reader: data_lib.SplitReader, decode: DecodeSpec, *, batch_size: int,
                mesh: jax.sharding.Mesh | None = None, num_workers: int | None = None,
                prefetch: int = 2, rows: tuple[int, int] | None = None
                ) -> Iterator[dict[str, jax.Array]]:
    """Padded, masked evaluation batches ({"image", "label", "mask"}) as global jax.Arrays."""
    mesh = mesh or sharding.make_mesh()
    rows = rows or process_rows(mesh, batch_size)
    pipeline = _Pipeline(reader, decode, eval_items(len(reader), batch_size, rows),
                         _placer(mesh, batch_size, ()), train=False,
                         num_workers=num_workers or os.cpu_count() or 1, prefetch=prefetch)
    try:
        while True:
            value = pipeline.get()
            if value is None:
                return
            yield value[1]
    finally:
        pipeline.close()


def array_eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int,
                       mesh: jax.sharding.Mesh) -> Iterator[dict[str, jax.Array]]:
    """Padded, masked evaluation batches from in-memory arrays (the device-resident mode)."""
    from kdjax.step import pad_batch  # noqa: PLC0415

    n = len(arrays["label"])
    for start in range(0, n, batch_size):
        batch = pad_batch({k: v[start:start + batch_size] for k, v in arrays.items()}, batch_size)
        yield sharding.shard_batch(batch, mesh, "eval.batch_size")


# --------------------------------------------------------------------------
# From the run's `data` section
# --------------------------------------------------------------------------


def decode_spec(data: plan_lib.Data, spec: data_lib.DatasetSpec, *, seed: int) -> DecodeSpec:
    return DecodeSpec(
        shape=model_input_shape(data, spec),
        source_shape=tuple(spec.image_shape),
        random_resized_crop=data.random_resized_crop,
        crop_scale=tuple(data.crop_scale),
        eval_crop_fraction=data.eval_crop_fraction,
        seed=seed,
    )


def train_stream(data: plan_lib.Data, *, seed: int, batch_size: int,
                 mesh: jax.sharding.Mesh, steps_per_call: int = 1, start_step: int = 0
                 ) -> TrainStream:
    """The streamed training input of the `data` section, positioned at `start_step`."""
    name = data.name
    reader = data_lib.open_split(name, data.train_split, data_dir=data.data_dir or None)
    steps_per_epoch = len(reader) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size={batch_size} exceeds the {len(reader)} training "
                         f"examples of {name}")
    return TrainStream(reader, decode_spec(data, reader.spec, seed=seed), seed=seed,
                       batch_size=batch_size, mesh=mesh, steps_per_call=steps_per_call,
                       state=InputState.from_step(start_step, steps_per_epoch),
                       num_workers=data.num_workers or None)


def eval_batches(data: plan_lib.Data, *, batch_size: int, mesh: jax.sharding.Mesh
                 ) -> Iterator[dict[str, jax.Array]]:
    """The streamed evaluation input of the `data` section's eval_split (fixed order, padded)."""
    reader = data_lib.open_split(data.name, data.eval_split, data_dir=data.data_dir or None)
    return eval_stream(reader, decode_spec(data, reader.spec, seed=0),
                       batch_size=batch_size, mesh=mesh, num_workers=data.num_workers or None)
