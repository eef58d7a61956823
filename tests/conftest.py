"""Shared fixtures: one tiny prepared dataset for every end-to-end test; quick compiles."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import cli, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "fashion_mnist")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A learnable 320/150-example Fashion-MNIST look-alike, prepared as kdjax prepares the real
    one (10 classes, 28x28x1)."""
    root = tmp_path_factory.mktemp("data")
    src = data.make_synthetic_idx_dir(str(root / "src"), 320, 150, seed=0)
    out = str(root / "tfds")
    assert cli.main(["prepare", "fashion_mnist", "--from", src, "--data-dir", out,
                     "--skip-checksums"]) == 0
    return out


def write_corpus(src):
    """24 tiny Python files in the new directory `src` (a pathlib.Path): a text corpus."""
    src.mkdir()
    for i in range(24):
        (src / f"f{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {j}\n"
                                              for j in range(i % 5 + 2)))
    return src


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """A tiny text dataset "tiny" of `kdjax prepare text` (byte tokenizer, 16 positions a row)."""
    root = tmp_path_factory.mktemp("lm")
    src = write_corpus(root / "src")
    out = str(root / "data")
    assert cli.main(["prepare", "text", "--from", str(src), "--name", "tiny", "--seq-len", "16",
                     "--held-out", "0.2", "--data-dir", out]) == 0
    return out


@pytest.fixture(scope="module")
def quick_compiles():
    """Compile without most of XLA's optimisation passes for a module's tests.

    On CPU those passes dominate the run time of tests that compile many small steps (about 3x),
    and they change nothing such tests check: what is computed, not how fast. Restored after,
    and the compiled programs dropped: jit's cache does not key on this flag, so a later test
    would otherwise reuse them (e.g. a parameter init whose last bits differ from the optimised
    program's, breaking a bit-identical resume check against a subprocess).
    """
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
    jax.clear_caches()


def randomize_batchnorms(model, seed=0):
    """BatchNorm statistics and affine parameters far from their init (as after training), so
    that folding or casting them has work to do. In place; returns the model."""
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            c = node.mean.shape[-1]
            node.mean[...] = jnp.asarray(rng.normal(0, 0.2, c), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.3, 2.0, c), jnp.float32)
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            node.bias[...] = jnp.asarray(rng.normal(0, 0.2, c), jnp.float32)
    return model


@pytest.fixture(scope="module")
def pruned_run(data_dir, tmp_path_factory):
    """A 4-step run of the zoo's small CNN (BatchNorm, max-pool) structurally pruned to half
    its channels: the student the deployment-format tests export."""
    out = str(tmp_path_factory.mktemp("deploy_runs") / "pruned")
    assert cli.main(["train", "--config", f"{EXP}/teacher.py", "--workdir", out,
                     "--config.model.name=cnn_tiny", f"--config.data.data_dir={data_dir}",
                     "--config.train.steps=4", "--config.train.batch_size=32",
                     "--config.eval.every_steps=4", "--config.train.log_every_steps=4",
                     "--config.checkpoint.every_steps=4", "--config.eval.batch_size=50",
                     "--no-progress", "--config.prune.method=structured",
                     "--config.prune.sparsity=0.5", "--config.prune.schedule=one_shot",
                     "--config.prune.begin_step=0"]) == 0
    return out


def uint8_images(n: int) -> np.ndarray:
    """n random 28x28x1 uint8 images (a deployment format's input)."""
    return np.random.default_rng(1).integers(0, 256, (n, 28, 28, 1), np.uint8)
