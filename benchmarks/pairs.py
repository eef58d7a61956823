"""The teacher -> student pairs the suite times, described once for both the kdjax and the PyTorch
side (no jax or torch import here).

A model name is kdjax's registry name (kdjax.models.MODELS) plus keyword arguments; the PyTorch
peer builds the same architecture from the same name and the suite checks that both sides count
the same parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: Bench names of models that are a kdjax registry entry with arguments.
MODEL_ARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp_128": ("mlp", {"hidden": (128,)}),  # the Fashion-MNIST demo's student (784-128-10)
}


def registry_entry(name: str) -> tuple[str, dict[str, Any]]:
    """(kdjax registry name, constructor kwargs) of a bench model name."""
    return MODEL_ARGS.get(name, (name, {}))


@dataclasses.dataclass(frozen=True)
class Pair:
    teacher: str
    student: str
    input_shape: tuple[int, int, int]  # H, W, C
    num_classes: int

    @property
    def name(self) -> str:
        return f"{self.teacher}:{self.student}"


PAIRS: dict[str, Pair] = {p.name: p for p in (
    # The Fashion-MNIST demo's pairs (experiments/fashion_mnist/kd.py and kd_cnn.py).
    Pair("mlp_1200", "mlp_128", (28, 28, 1), 10),
    Pair("cnn_small", "cnn_tiny", (28, 28, 1), 10),
    # The CRD benchmark's CIFAR-100 pairs.
    Pair("resnet56", "resnet20", (32, 32, 3), 100),
    Pair("resnet32x4", "resnet8x4", (32, 32, 3), 100),
    Pair("wrn_40_2", "wrn_16_2", (32, 32, 3), 100),
    # A torchvision ResNet-18 at CIFAR resolution into the demo's MLP (issue 26's new user):
    # the teacher's small-map tail is what kdjax.conv speeds up on the CPU.
    Pair("resnet18", "mlp_128", (32, 32, 3), 10),
    # ImageNet-sized.
    Pair("resnet50", "resnet18", (224, 224, 3), 1000),
)}


DEMO_ROWS = (("mlp_1200:mlp_128", 128), ("cnn_small:cnn_tiny", 128))
CIFAR_PAIRS = ("resnet56:resnet20", "resnet32x4:resnet8x4", "wrn_40_2:wrn_16_2")
#: (pair, batch) rows on accelerators: what the issue's targets are measured on.
ACCELERATOR_ROWS = (*DEMO_ROWS, *((p, b) for p in CIFAR_PAIRS for b in (64, 256, 1024)),
                    ("resnet50:resnet18", 128), ("resnet50:resnet18", 256))
#: What 2 CPU cores finish in minutes: the demo's pairs and two CIFAR pairs at batch 64.
CPU_ROWS = (*DEMO_ROWS, ("resnet56:resnet20", 64), ("resnet32x4:resnet8x4", 64))
CPU_SKIPPED = ("wrn_40_2:wrn_16_2, batches 256 and 1024, and resnet50:resnet18 at 224x224: "
               "minutes per timed window on 2 CPU cores; they are accelerator rows")


def default_rows(on_cpu: bool) -> tuple[tuple[str, int], ...]:
    return CPU_ROWS if on_cpu else ACCELERATOR_ROWS


def default_warmup(on_cpu: bool) -> int:
    """Untimed calls before timing: more on accelerators, where cuDNN autotuning and
    torch.compile's first calls take several."""
    return 2 if on_cpu else 10


def get_pair(name: str) -> Pair:
    try:
        return PAIRS[name]
    except KeyError:
        raise ValueError(f"unknown pair {name!r}; valid pairs: {', '.join(PAIRS)}") from None


def parse_rows(text: str) -> list[tuple[str, int]]:
    """"PAIR@BATCH,PAIR@BATCH" -> [(pair, batch), ...], each pair checked."""
    rows = []
    for item in filter(None, text.split(",")):
        name, sep, batch = item.partition("@")
        if not sep or not batch.isdigit():
            raise ValueError(f"--rows item {item!r} is not PAIR@BATCH, e.g. resnet56:resnet20@64")
        rows.append((get_pair(name).name, int(batch)))
    return rows


#: The step's hyperparameters, the same on both sides: Hinton KD at T=4 mixed with CE as the
#: demo's kd config (0.1 CE + 0.9 T^2 KL), SGD with momentum, weight decay added to the gradient.
KD = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
SGD = {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
#: Normalisation (per channel, in [0, 1] pixel units) and random horizontal flips, on the device.
MEAN, STD = 0.5, 0.25
