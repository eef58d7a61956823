"""The input modes: streamed batches equal the device-resident step's own batches for a seed,
resume from a saved iterator state, per-process shards are disjoint and cover each epoch, eval
sees every example exactly once, host JPEG decoding is deterministic, no TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.data as kd
import kdjax.input as ki
import kdjax.prepare as kp
from kdjax import plan, sharding, step as step_lib

pytestmark = pytest.mark.usefixtures("quick_compiles")  # what is computed, not its speed

REPO_ROOT = Path(kd.__file__).resolve().parent.parent
N_TRAIN, N_TEST, B = 40, 13, 16  # 2 steps per epoch, 8 examples dropped per epoch


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("input")
    src = kp.make_synthetic_cifar(root / "c.tar.gz", "cifar10", n_train=N_TRAIN, n_test=N_TEST)
    kd.prepare("cifar10", src, data_dir=root / "d", verify_checksums=False)
    return root / "d"


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpeg")
    src = kp.make_synthetic_image_folder(root / "src", n_train=12, n_val=5, size=(40, 56))
    kd.prepare("toy", src, data_dir=root / "d")
    return root / "d"


def data_section(**keys) -> plan.Data:
    """The run's `data` section with `keys` changed (through the schema, as a config's)."""
    return plan.as_plan({"data": keys}).data


def device_batches(data_dir, seed, steps):
    """The batches the device-resident step gathers itself (kdjax.step.sample)."""
    arrays = kd.load_arrays("cifar10", "train", data_dir=data_dir)
    mesh = sharding.make_mesh()
    data = step_lib.DeviceData({"image": jnp.asarray(arrays["image"]),
                                "label": jnp.asarray(arrays["label"])}, batch_size=B)
    zero = jnp.zeros((), jnp.int32)
    state = step_lib.TrainState(step=zero, params={}, model_state={}, opt_state=(),
                                rng=jax.random.key_data(jax.random.key(seed)),
                                perm=jnp.zeros((N_TRAIN,), jnp.int32), skipped_steps=zero,
                                bad_step=zero, bad_terms=zero)
    sample = jax.jit(lambda s: step_lib.sample(s, data, mesh))
    out = []
    for i in range(steps):
        state, batch = sample(state.replace(step=jnp.int32(i)))
        out.append(jax.device_get(batch))
    return out


def stream(data_dir, seed, *, state=None, steps_per_call=1, workers=2, name="cifar10",
           data=None):
    reader = kd.open_split(name, "train", data_dir=data_dir)
    decode = ki.decode_spec(data or data_section(), reader.spec, seed=seed)
    return ki.TrainStream(reader, decode, seed=seed, batch_size=B if name == "cifar10" else 4,
                          steps_per_call=steps_per_call, state=state, num_workers=workers)


def take(s, n):
    with s:
        return [jax.device_get(next(s)) for _ in range(n)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_streamed_batches_equal_device_resident_batches(cifar):
    dev = device_batches(cifar, seed=3, steps=5)  # crosses two epoch boundaries
    streamed = take(stream(cifar, 3), 5)
    for a, b in zip(dev, streamed, strict=True):
        assert_same(a, b)  # "index" too: CRD's memory rows are the same in both modes
    assert streamed[0]["index"].dtype == np.int32
    np.testing.assert_array_equal(streamed[3]["index"],
                                  ki.TrainSampler(N_TRAIN, B, seed=3).global_indices(3))
    mesh = sharding.make_mesh()
    s = stream(cifar, 3)
    with s:
        batch = next(s)
    assert batch["image"].sharding.is_equivalent_to(sharding.batch_sharded(mesh), 4)
    assert len(batch["image"].addressable_shards) == mesh.size
    # steps_per_call stacks the same batches on a leading axis.
    stacked = take(stream(cifar, 3, steps_per_call=2), 2)
    for i, s in enumerate(stacked):
        for j in range(2):
            assert_same({k: v[j] for k, v in s.items()}, dev[2 * i + j])


def test_same_seed_same_batches(cifar):
    a, b = take(stream(cifar, 5, workers=1), 3), take(stream(cifar, 5, workers=3), 3)
    for x, y in zip(a, b):
        assert_same(x, y)
    other = take(stream(cifar, 6), 1)[0]
    assert not np.array_equal(other["label"], a[0]["label"]) or not np.array_equal(
        other["image"], a[0]["image"])
    sampler = ki.TrainSampler(N_TRAIN, B, seed=5)
    assert not np.array_equal(sampler.permutation(0), sampler.permutation(1))  # reshuffled


def test_resume_from_saved_iterator_state_mid_epoch(cifar):
    s = stream(cifar, 7)
    with s:
        first = [jax.device_get(next(s)) for _ in range(3)]
        saved = s.state().to_dict()  # what a checkpoint stores
        rest = [jax.device_get(next(s)) for _ in range(3)]
    assert saved == {"epoch": 1, "position": 1}
    resumed = take(stream(cifar, 7, state=ki.InputState.from_dict(saved)), 3)
    for x, y in zip(rest, resumed):
        assert_same(x, y)
    assert ki.InputState.from_step(3, 2) == ki.InputState(1, 1)
    assert ki.InputState(1, 1).step(2) == 3
    del first


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_shards_are_disjoint_and_cover_each_epoch(processes):
    n, batch = 50, 12
    samplers = [ki.TrainSampler(n, batch, seed=0, rows=ki.even_rows(batch, p, processes))
                for p in range(processes)]
    spe = samplers[0].steps_per_epoch
    for epoch in range(2):
        seen = []
        for s in range(epoch * spe, (epoch + 1) * spe):
            parts = [smp.indices(s) for smp in samplers]
            # Process p reads rows [p*B/P, (p+1)*B/P) of the global batch.
            np.testing.assert_array_equal(np.concatenate(parts), samplers[0].global_indices(s))
            seen += [set(p.tolist()) for p in parts]
        flat = [i for part in seen for i in part]
        assert len(flat) == len(set(flat)) == spe * batch  # disjoint
        perm = samplers[0].permutation(epoch)
        assert set(flat) == set(perm[:spe * batch].tolist())  # covering the epoch
        assert sorted(perm.tolist()) == list(range(n))
    assert ki.process_rows(sharding.make_mesh(), batch) == (0, batch)
    mesh = sharding.make_mesh()
    if mesh.size > 1:
        with pytest.raises(ValueError, match="is not divisible by the .* devices of the batch axes"):
            ki.process_rows(mesh, mesh.size + 1)
    with pytest.raises(ValueError, match="divisible"):
        ki.even_rows(10, 0, 3)


def test_sampler_uses_the_device_paths_permutation():
    rng = jax.random.key_data(jax.random.key(11))
    expected = jax.random.permutation(step_lib.epoch_key(rng, 4), 37)
    np.testing.assert_array_equal(ki.epoch_permutation(np.asarray(rng), 4, 37), expected)


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_covers_every_example_exactly_once(cifar, processes):
    n, batch = 13, 4
    per_process = [list(ki.eval_items(n, batch, ki.even_rows(batch, p, processes)))
                   for p in range(processes)]
    indices = np.concatenate([it.indices for items in per_process for it in items])
    real = indices[indices >= 0]
    assert sorted(real.tolist()) == list(range(n))  # each exactly once
    assert (indices < 0).sum() == 4 * batch - n  # the last batch is padded, not dropped
    # Through the real pipeline: masks, labels and images in fixed order.
    arrays = kd.load_arrays("cifar10", "test", data_dir=cifar)
    config = data_section(name="cifar10", data_dir=str(cifar), eval_split="test", num_workers=2)
    batches = [jax.device_get(b) for b in ki.eval_batches(config, batch_size=batch,
                                                          mesh=sharding.make_mesh())]
    assert [b["image"].shape[0] for b in batches] == [batch] * 4
    mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
    assert mask.sum() == n and mask[:n].all()
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask],
                                  arrays["label"])
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[mask],
                                  arrays["image"])
    dev = list(ki.array_eval_batches(arrays, batch, sharding.make_mesh()))
    assert_same(jax.device_get(dev[-1]), batches[-1])


def test_choose_mode(cifar, jpegs):
    spec = kd.dataset_info("cifar10", data_dir=cifar)
    assert ki.choose_mode(data_section(), spec)[0] == "device"
    mode, why = ki.choose_mode(data_section(device_memory_fraction=1e-9), spec)
    assert mode == "stream" and "MiB" in why
    assert ki.choose_mode(data_section(mode="stream"), spec)[0] == "stream"
    assert ki.choose_mode(data_section(random_resized_crop=True), spec)[0] == "stream"
    assert ki.choose_mode(data_section(image_size=24), spec)[0] == "stream"
    assert ki.model_input_shape(data_section(), spec) == (32, 32, 3)
    toy = kd.dataset_info("toy", data_dir=jpegs)
    assert ki.choose_mode(data_section(), toy)[0] == "stream"
    with pytest.raises(ValueError, match="varying sizes"):
        ki.choose_mode(data_section(mode="device"), toy)
    with pytest.raises(ValueError, match="data.image_size"):
        ki.model_input_shape(data_section(), toy)
    with pytest.raises(ValueError, match="'auto', 'device' or 'stream'"):
        ki.choose_mode(data_section(mode="disk"), spec)
    assert ki.device_capacity([jax.devices()[0]]) > 0


def test_jpeg_streaming_with_random_resized_crop(jpegs):
    data = data_section(image_size=24, random_resized_crop=True)
    a = take(stream(jpegs, 0, name="toy", data=data, workers=1), 4)
    b = take(stream(jpegs, 0, name="toy", data=data, workers=3), 4)
    for x, y in zip(a, b):
        assert_same(x, y)  # independent of the number of decode threads
        assert x["image"].shape == (4, 24, 24, 3) and x["image"].dtype == np.uint8
    c = take(stream(jpegs, 1, name="toy", data=data), 1)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    ev = [jax.device_get(x) for x in ki.eval_batches(
        data_section(name="toy", data_dir=str(jpegs), eval_split="validation", image_size=24),
        batch_size=4, mesh=sharding.make_mesh())]
    assert [x["image"].shape for x in ev] == [(4, 24, 24, 3)] * 2
    assert np.concatenate([x["mask"] for x in ev]).sum() == 5


def test_stream_errors_reach_the_consumer(cifar):
    reader = kd.open_split("cifar10", "train", data_dir=cifar)

    class Broken:
        spec = reader.spec

        def __len__(self):
            return len(reader)

        def read(self, indices):
            raise OSError("disk on fire")

    s = ki.TrainStream(Broken(), ki.decode_spec(data_section(), reader.spec, seed=0), seed=0,
                       batch_size=B)
    with pytest.raises(OSError, match="disk on fire"):
        next(s)


def test_no_tensorflow_while_streaming(cifar, jpegs):
    code = f"""
import sys
import jax
import kdjax.data as kd, kdjax.input as ki, kdjax.plan as kplan
r = kd.open_split("toy", "train", data_dir={str(jpegs)!r})
data = kplan.as_plan({{"data": {{"image_size": 16, "random_resized_crop": True}}}}).data
s = ki.TrainStream(r, ki.decode_spec(data, r.spec, seed=0), seed=0, batch_size=4)
assert next(s)["image"].shape == (4, 16, 16, 3)
s.close()
assert kd.load_arrays("cifar10", "test", data_dir={str(cifar)!r})["image"].shape == (13, 32, 32, 3)
bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
assert not bad, bad
print("OK")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT),
                                                         os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def test_on_a_two_device_mesh():
    """The same equalities with the batch split over two (fake CPU) devices: placement through
    jax.make_array_from_process_local_data onto the step's mesh."""
    if os.environ.get("KDJAX_INNER_TWO_DEVICES"):
        pytest.skip("already inside the two-device run")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "KDJAX_INNER_TWO_DEVICES": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "streamed_batches_equal or eval_covers or process_shards"],
        capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO_ROOT))
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
