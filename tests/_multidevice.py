"""The 8-device half of tests/test_multidevice.py, run in a subprocess: the simulated device count
(XLA_FLAGS=--xla_force_host_platform_device_count=8) must be set before JAX starts, so it cannot
run inside the pytest process (which keeps its single CPU device).

  python tests/_multidevice.py OUT_DIR

trains the same distillation for STEPS steps on 1 device, on 8 (data parallel), with FSDP over 8
and on a (data=2, fsdp=4) mesh with a sharded teacher and a replicated student; writes each run's
losses and final parameters and how the FSDP arrays are split; checkpoints the 1-device run and
restores it onto the 8-device FSDP layout; checkpoints the FSDP run for the test to restore in its
own one-device process.
"""

import json
import os
import sys

import jax
import numpy as np
import optax
from flax import nnx

from kdjax import augment, input as input_lib, models, objectives, sharding
from kdjax.checkpoint import Checkpointer
from kdjax.step import DeviceData, freeze, init_train_state, make_distill_step

N, B, C, STEPS = 256, 32, 4, 50


def simulated_devices_env(num_devices: int) -> dict[str, str]:
    """Environment for a subprocess with `num_devices` simulated CPU devices."""
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}"}


def toy_data():
    """8x8 images whose mean brightness encodes the class."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, N).astype(np.int32)
    images = np.clip(labels[:, None, None, None] * 60 + rng.normal(20, 25, (N, 8, 8, 1)), 0, 255)
    return images.astype(np.uint8), labels


TX = optax.sgd(0.05, momentum=0.9)


def init():
    """Student: a small CNN with BatchNorm (its statistics must be global-batch statistics)."""
    student = models.create_model("cnn_small", channels=(8, 16), dense=32, input_size=8,
                                  in_channels=1, num_classes=C, rngs=nnx.Rngs(0))
    return init_train_state(student, TX, seed=0, num_examples=N)


def setup(mesh, *, rule="replicated", teacher_rule="replicated"):
    """The student, an MLP teacher, the step. min_bytes=0: the FSDP rule splits every array with
    an axis divisible by the fsdp axis size, however small."""
    teacher = freeze(models.create_model("mlp", hidden=(64,), in_features=64, num_classes=C,
                                         rngs=nnx.Rngs(1)))
    graphdef, state = init()
    state_sharding = sharding.state_shardings(state, mesh, rule, min_bytes=0)
    teacher_sharding = (sharding.tree_shardings(teacher.variables, mesh, teacher_rule,
                                                min_bytes=0),)
    images, labels = toy_data()
    data = DeviceData({"image": sharding.replicate(images, mesh), "label": sharding.replicate(labels, mesh)},
                      batch_size=B)
    step = make_distill_step(
        graphdef, TX, objectives.logit_distillation("kd", ce_weight=0.5, kd_weight=0.5,
                                                    temperature=2.0),
        teachers=(teacher,), preprocess=augment.Preprocess(crop_padding=1, flip=True),
        mesh=mesh, data=data, state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    return sharding.put(state, state_sharding), state_sharding, step


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def split_info(tree) -> dict[str, dict]:
    """Per array: its global shape, the shapes of the 8 devices' shards, distinct shards."""
    return {jax.tree_util.keystr(k): {
        "shape": list(x.shape),
        "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
        "distinct_shards": len({str(s.index) for s in x.addressable_shards}),
        "num_shards": len(x.addressable_shards)}
        for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def lm_run(mesh, rule: str, teacher_rule: str) -> dict:
    """10 steps of the fused LM distillation step (chunked forward KL) on `mesh`: its losses and
    how the teacher's arrays are split."""
    from kdjax.lm import packing
    from kdjax.lm.step import TokenObjective, make_lm_step
    from kdjax.step import DeviceData
    from kdjax.step import Distillee

    rng = np.random.default_rng(0)
    tokens, segments = packing.pack([list(rng.integers(3, 64, rng.integers(5, 40)))
                                     for _ in range(60)], 16)
    student = Distillee(models.ModelSpec("lm_tiny", 64, (16,)).build(0))
    teacher = freeze(models.ModelSpec("lm_tiny", 64, (16,), kwargs={"d_model": 64}).build(1))
    tx = optax.adam(1e-2)
    graphdef, state = init_train_state(student, tx, seed=0, num_examples=len(tokens))
    state_sharding = sharding.state_shardings(state, mesh, rule, min_bytes=0)
    teacher_sharding = sharding.tree_shardings(teacher.variables, mesh, teacher_rule, min_bytes=0)
    data = DeviceData({"tokens": sharding.replicate(tokens, mesh),
                       "segments": sharding.replicate(segments, mesh)}, batch_size=8)
    step = make_lm_step(graphdef, tx, TokenObjective("forward_kl", {"temperature": 2.0}, 0.5, 0.5,
                                                     chunk_size=8),
                        teacher=teacher, data=data, mesh=mesh, state_sharding=state_sharding,
                        teacher_sharding=(teacher_sharding,))
    state = sharding.put(state, state_sharding)
    losses = []
    for _ in range(10):
        state, metrics = step(state)
        losses.append(metrics["loss"])
    return {"losses": [float(x) for x in jax.device_get(losses)],
            "teacher_split": split_info(step.teachers)}


def main(out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    meshes = {
        "single": (sharding.make_mesh(devices=jax.devices()[:1]), "replicated", "replicated"),
        "dp": (sharding.make_mesh(data=8, fsdp=1), "replicated", "replicated"),
        "fsdp": (sharding.make_mesh(data=1, fsdp=-1), "fsdp", "fsdp"),
        "hybrid": (sharding.make_mesh(data=2, fsdp=4), "replicated", "fsdp"),
    }
    result = {}
    for name, (mesh, rule, teacher_rule) in meshes.items():
        state, state_sharding, step = setup(mesh, rule=rule, teacher_rule=teacher_rule)
        losses = []
        for _ in range(STEPS):
            state, metrics = step(state)
            losses.append(metrics["loss"])
        result[name] = {"losses": [float(x) for x in jax.device_get(losses)],
                        "param_bytes": sharding.bytes_per_device(state.params),
                        "opt_bytes": sharding.bytes_per_device(state.opt_state),
                        "teacher_bytes": sharding.bytes_per_device(step.teachers)}
        np.savez(os.path.join(out, f"{name}.npz"),
                 **flat({"params": state.params, "model_state": state.model_state}))
        if name == "single":  # a checkpoint written on one device
            with Checkpointer(os.path.join(out, "run1"), max_to_keep=1) as ckpt:
                ckpt.save(state, {})
            np.savez(os.path.join(out, "written_on_1.npz"),
                     **flat({"params": state.params, "opt_state": state.opt_state}))
        if name == "fsdp":
            result["fsdp"]["params_split"] = split_info(state.params)
            result["fsdp"]["opt_split"] = split_info(state.opt_state)
            result["fsdp"]["teacher_split"] = split_info(step.teachers)
            with Checkpointer(os.path.join(out, "run8"), max_to_keep=1) as ckpt:
                ckpt.save(state, {})
            # A checkpoint written on one device, restored straight onto the 8-device FSDP layout.
            with Checkpointer(os.path.join(out, "run1"), max_to_keep=1) as ckpt:
                restored, _ = ckpt.restore(sharding.abstract(state, state_sharding))
            result["restored_from_1dev"] = {"step": int(restored.step),
                                            "params_split": split_info(restored.params)}
            np.savez(os.path.join(out, "restored_from_1dev.npz"),
                     **flat({"params": restored.params, "opt_state": restored.opt_state}))
        if name == "hybrid":
            result["hybrid"]["teacher_split"] = split_info(step.teachers)

    # Streamed input reads one shard per process: here one process holds all 8 devices' rows.
    images, labels = toy_data()
    place = input_lib._placer(meshes["dp"][0], B, ())  # what streamed input does
    batch = place({"image": images[:B], "label": labels[:B]})
    result["local_batch"] = {"shard_shapes": split_info(batch)["['image']"]["shard_shapes"],
                             "equal": bool(np.array_equal(np.asarray(batch["image"]),
                                                          images[:B]))}
    result["serial_dispatch"] = sharding.serial_dispatch(meshes["dp"][0])
    result["lm"] = {name: lm_run(meshes[name][0], rule, teacher_rule)
                    for name, rule, teacher_rule in (("single", "replicated", "replicated"),
                                                     ("fsdp", "fsdp", "fsdp"))}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
