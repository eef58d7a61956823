"""The PyTorch peer: the distillation step of mdistiller / RepDistiller / torchdistill, timed the
way the kdjax side is timed, so that kdjax's numbers are read against it.

  python -m benchmarks.torch_peer --rows resnet56:resnet20@64,mlp_1200:mlp_128@128 [--modes eager32]
  python -m benchmarks.torch_peer --reference ../shared/bench/torch_kd_baseline.py   (vs the yardstick)

One step, as kdjax's fused step does it (benchmarks/pairs.py holds the shared hyperparameters):
uint8 images already on the device are gathered by a shuffled index, normalised and randomly
flipped there; the teacher runs in eval mode under no_grad; the student runs forward/backward in
train mode; the loss is 0.1 CE + 0.9 T^2 KL(softmax(t/T) || softmax(s/T)) at T=4 in float32; SGD
with Nesterov momentum and weight decay (added to the gradient, as kdjax's optimizer does).

Modes: eager32 (float32; TF32 matmuls on CUDA), amp (eager, bf16 autocast; CUDA only: on the CPU
bfloat16 is emulated and slower), compile (torch.compile'd teacher and student, bf16 autocast on
CUDA, float32 on the CPU). Channels-last memory format on CUDA (what cuDNN's tensor-core
convolutions want). Architectures are built here to match kdjax.models layer for layer; the suite
checks the parameter counts against kdjax's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import common, pairs as pairs_lib

MODES = ("eager32", "amp", "compile")


# ----------------------------------------------------------------------------------------------
# models (kdjax.models' architectures; NCHW)
# ----------------------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.c1 = nn.Sequential(*_conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True))
        self.c2 = nn.Sequential(*_conv_bn(planes, planes, 3))
        need = stride != 1 or cin != planes
        self.shortcut = nn.Sequential(*_conv_bn(cin, planes, 1, stride)) if need else None

    def forward(self, x):
        sc = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.c2(self.c1(x)) + sc)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        out = planes * 4
        self.body = nn.Sequential(*_conv_bn(cin, planes, 1), nn.ReLU(inplace=True),
                                  *_conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(planes, out, 1))
        need = stride != 1 or cin != out
        self.shortcut = nn.Sequential(*_conv_bn(cin, out, 1, stride)) if need else None

    def forward(self, x):
        sc = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.body(x) + sc)


class WideBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


def _stages(block, cin: int, widths, n, strides) -> tuple[nn.Sequential, int]:
    layers = []
    for planes, count, stride in zip(widths, n, strides):
        for j in range(count):
            layers.append(block(cin, planes, stride if j == 0 else 1))
            cin = planes * block.expansion
    return nn.Sequential(*layers), cin


class Classifier(nn.Module):
    """stem -> body -> (head) -> global average pool -> fc."""

    def __init__(self, stem: nn.Module, body: nn.Module, width: int, num_classes: int,
                 head: nn.Module | None = None):
        super().__init__()
        self.stem, self.body, self.head = stem, body, head or nn.Identity()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.head(self.body(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def cifar_resnet(depth: int, channels, num_classes: int, in_c: int) -> nn.Module:
    n = (depth - 2) // 6
    body, c = _stages(BasicBlock, channels[0], channels[1:], (n,) * 3, (1, 2, 2))
    stem = nn.Sequential(*_conv_bn(in_c, channels[0], 3), nn.ReLU(inplace=True))
    return Classifier(stem, body, c, num_classes)


def wide_resnet(depth: int, widen: int, num_classes: int, in_c: int) -> nn.Module:
    n = (depth - 4) // 6
    w = (16 * widen, 32 * widen, 64 * widen)
    body, c = _stages(WideBlock, 16, w, (n,) * 3, (1, 2, 2))
    head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))
    return Classifier(nn.Conv2d(in_c, 16, 3, 1, 1, bias=False), body, c, num_classes, head)


def imagenet_resnet(block, layers, num_classes: int, in_c: int) -> nn.Module:
    stem = nn.Sequential(*_conv_bn(in_c, 64, 7, 2), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))
    body, c = _stages(block, 64, (64, 128, 256, 512), layers, (1, 2, 2, 2))
    return Classifier(stem, body, c, num_classes)


def small_cnn(channels, dense: int, num_classes: int, in_c: int, size: int) -> nn.Module:
    c1, c2 = channels
    s = size // 4
    return nn.Sequential(*_conv_bn(in_c, c1, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         *_conv_bn(c1, c2, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(s * s * c2, dense), nn.ReLU(inplace=True),
                         nn.Linear(dense, num_classes))


def mlp(hidden, num_classes: int, in_features: int) -> nn.Module:
    dims = (in_features, *hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dims[-1], num_classes))


_CIFAR = {**{f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
          "resnet8x4": (8, (32, 64, 128, 256)), "resnet32x4": (32, (32, 64, 128, 256))}
_IMAGENET = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
             "resnet50": (Bottleneck, (3, 4, 6, 3))}
_SMALL_CNN = {"cnn_small": ((32, 64), 128), "cnn_tiny": ((8, 16), 32)}
_MLP = {"mlp_1200": (1200, 1200), "mlp_800": (800, 800), "mlp_tiny": (64,)}


def build(name: str, num_classes: int, input_shape) -> nn.Module:
    """The bench model `name` (benchmarks/pairs.py) for (H, W, C) inputs, as kdjax builds it."""
    h, w, c = input_shape
    base, kwargs = pairs_lib.registry_entry(name)
    if base in _CIFAR:
        return cifar_resnet(*_CIFAR[base], num_classes, c)
    if base.startswith("wrn_"):
        _, depth, widen = base.split("_")
        return wide_resnet(int(depth), int(widen), num_classes, c)
    if base in _IMAGENET:
        return imagenet_resnet(*_IMAGENET[base], num_classes, c)
    if base in _SMALL_CNN:
        return small_cnn(*_SMALL_CNN[base], num_classes, c, h)
    if base in _MLP or base == "mlp":
        return mlp(kwargs.get("hidden", _MLP.get(base)), num_classes, h * w * c)
    raise ValueError(f"the PyTorch peer has no model {name!r}; add it to benchmarks/torch_peer.py "
                     f"(models: {sorted([*_CIFAR, *_IMAGENET, *_SMALL_CNN, *_MLP])}, wrn_D_K)")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------
def kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    temp = pairs_lib.KD["temperature"]
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                  reduction="batchmean")
    return pairs_lib.KD["ce_weight"] * ce + pairs_lib.KD["kd_weight"] * temp * temp * kl


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else common.cpu_name()


def available_modes() -> tuple[str, ...]:
    return MODES if torch.cuda.is_available() else ("eager32", "compile")


class Loop(NamedTuple):
    """One (pair, batch, mode) ready to time: `run(k)` runs k steps, `sync(run(k))` waits."""

    run: Callable[[int], Any]
    sync: Callable[[Any], None]
    teacher_params: int
    student_params: int


def make_loop(pair: pairs_lib.Pair, batch: int, mode: str) -> Loop:
    """Build the models, data and optimizer of one (pair, batch, mode) on this device."""
    if mode not in available_modes():
        raise ValueError(f"mode {mode!r} is not available on this device; valid: "
                         f"{available_modes()} (amp needs CUDA)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":  # as the reference loop runs: autotuned cuDNN algorithms, TF32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    fmt = torch.channels_last if dev == "cuda" else torch.contiguous_format
    teacher = build(pair.teacher, pair.num_classes, pair.input_shape).to(dev, memory_format=fmt)
    student = build(pair.student, pair.num_classes, pair.input_shape).to(dev, memory_format=fmt)
    teacher.eval()
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=pairs_lib.SGD["learning_rate"],
                          momentum=pairs_lib.SGD["momentum"], nesterov=pairs_lib.SGD["nesterov"],
                          weight_decay=pairs_lib.SGD["weight_decay"])
    t_fwd, s_fwd = (torch.compile(teacher), torch.compile(student)) if mode == "compile" else (
        teacher, student)
    amp = dev == "cuda" and mode in ("amp", "compile")
    h, w, c = pair.input_shape
    n = batch * 8  # as the kdjax side: a small device-resident set, sampled by a shuffled index
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=gen).to(dev)
    labels = torch.randint(0, pair.num_classes, (n,), generator=gen).to(dev)
    order = torch.randperm(n, generator=gen).to(dev)
    scale = 1.0 / (255.0 * pairs_lib.STD)
    shift = pairs_lib.MEAN / pairs_lib.STD
    position = 0

    def step():
        nonlocal position
        idx = order[position:position + batch]
        position = (position + batch) % n
        x = images[idx].float() * scale - shift
        flip = torch.rand(batch, 1, 1, 1, device=dev) < 0.5
        x = torch.where(flip, x.flip(3), x).contiguous(memory_format=fmt)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t = t_fwd(x)
            s = s_fwd(x)
            loss = kd_loss(s.float(), t.float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def run(k: int):
        loss = None
        for _ in range(k):
            loss = step()
        return loss

    def sync(loss):
        if dev == "cuda":
            torch.cuda.synchronize()
        elif loss is not None:
            loss.item()  # CPU ops are synchronous; this only touches the result

    return Loop(run, sync, count_params(teacher), count_params(student))


def bench(pair: pairs_lib.Pair, batch: int, mode: str, *, windows: int, steps: int,
          warmup: int) -> dict:
    """Time one (pair, batch, mode); returns images/s, ms/step and, on CUDA, peak memory."""
    loop = make_loop(pair, batch, mode)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dt, per_window = common.seconds_per_step(loop.run, loop.sync, warmup=warmup, windows=windows,
                                             steps=steps)
    return {"mode": mode, "images_per_s": batch / dt, "ms_per_step": dt * 1e3,
            "window_ms_per_step": [s * 1e3 for s in per_window],
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "teacher_params": loop.teacher_params, "student_params": loop.student_params}


def software() -> dict:
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def run_rows(rows, modes, *, windows: int, steps: int, warmup: int) -> dict:
    """Every (pair name, batch) of `rows` in every mode: {"device", "software", "rows": [...]}."""
    modes = tuple(modes) or available_modes()
    out = []
    for name, batch in rows:
        pair = pairs_lib.get_pair(name)
        for mode in modes:
            r = {"pair": name, "batch": batch,
                 **bench(pair, batch, mode, windows=windows, steps=steps, warmup=warmup)}
            print(f"torch {name} batch {batch} {mode}: {r['images_per_s']:,.0f} images/s "
                  f"({r['ms_per_step']:.2f} ms/step)", file=sys.stderr, flush=True)
            out.append(r)
    return {"device": device_name(), "software": software(), "rows": out}


def compare_reference(path: str, pair_name: str, batch: int, *, rounds: int, steps: int) -> dict:
    """This peer's eager32 loop against the reference loop of `path`, alternated round by round
    (a shared machine slows both alike); each side's median over the rounds."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--reference {path!r}: no such file (it is "
                                f"../shared/bench/torch_kd_baseline.py beside the checkout)")
    spec = importlib.util.spec_from_file_location("torch_kd_baseline", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    pair = pairs_lib.get_pair(pair_name)
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(ref.run((pair.teacher, pair.student), "eager32", batch, steps)["img_per_s"])
        ours.append(bench(pair, batch, "eager32", windows=1, steps=steps, warmup=3)["images_per_s"])
    med = statistics.median
    return {"pair": pair_name, "batch": batch, "device": device_name(), "software": software(),
            "peer_images_per_s": ours, "reference_images_per_s": theirs,
            "peer_median": med(ours), "reference_median": med(theirs),
            "peer_over_reference": med(ours) / med(theirs)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="",
                   help="comma-separated PAIR@BATCH items (pairs: benchmarks/pairs.py; default: "
                        "this device's rows, pairs.default_rows)")
    p.add_argument("--modes", default="", help=f"comma-separated, of {MODES} (default: all "
                                                f"this device runs)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default: pairs.default_warmup)")
    p.add_argument("--json", default="", help="write the result here (default: stdout)")
    p.add_argument("--reference", default="",
                   help="compare the eager32 loop with this reference loop file instead")
    p.add_argument("--rounds", type=int, default=3, help="with --reference: alternated rounds")
    a = p.parse_args(argv)
    on_cpu = not torch.cuda.is_available()
    rows = pairs_lib.parse_rows(a.rows) or pairs_lib.default_rows(on_cpu)
    warmup = pairs_lib.default_warmup(on_cpu) if a.warmup is None else a.warmup
    if a.reference:
        out = compare_reference(a.reference, *rows[0], rounds=a.rounds, steps=a.steps)
    else:
        out = run_rows(rows, [m for m in a.modes.split(",") if m], windows=a.windows,
                       steps=a.steps, warmup=warmup)
    text = json.dumps(out, indent=2)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
