"""What the deployment-format tests (test_interop_onnx.py, test_interop_litert.py) share: a short
structurally pruned run of the zoo's small CNN to export, and uint8 images to run it on."""

import os

import numpy as np
import pytest

from kdjax import cli

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
RUN = ["--config.train.steps=4", "--config.train.batch_size=32", "--config.eval.every_steps=4",
       "--config.train.log_every_steps=4", "--config.checkpoint.every_steps=4",
       "--config.eval.batch_size=50", "--no-progress"]
PRUNE = ["--config.prune.method=structured", "--config.prune.sparsity=0.5",
         "--config.prune.schedule=one_shot", "--config.prune.begin_step=0"]


@pytest.fixture(scope="module")
def pruned_run(data_dir, tmp_path_factory):
    """A 4-step run of the zoo's small CNN (BatchNorm, max-pool) structurally pruned to half
    its channels."""
    out = str(tmp_path_factory.mktemp("deploy_runs") / "pruned")
    assert cli.main(["train", "--config", f"{EXP}/fashion_mnist/teacher.py", "--workdir", out,
                     "--config.model.name=cnn_tiny", f"--config.data.data_dir={data_dir}", *RUN,
                     *PRUNE]) == 0
    return out


def uint8_images(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 28, 28, 1), np.uint8)
