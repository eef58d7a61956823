"""Writes tests/fixtures/interop/: files made by PyTorch, so that CI (no torch) still tests the
import against PyTorch itself.

  .venv/bin/python tests/make_interop_fixtures.py    (needs torch, torchvision, safetensors)

  tiny_resnet.pth          torch.save(state_dict) (zip format) of RepDistiller's ResNet(8,
                           [4, 8, 8, 16]) with random weights and BatchNorm statistics
  tiny_resnet.safetensors  the same state_dict, safetensors.torch.save_file
  tiny_resnet_legacy.pth   RepDistiller's checkpoint dict {"epoch", "model", "accuracy"} in
                           torch.save's legacy format (_use_new_zipfile_serialization=False)
  tiny_resnet_whole.pth    torch.save(model): a pickled whole model
  tiny_resnet_logits.npz   "images" uint8 [4, 32, 32, 3] and "logits": what the PyTorch model
                           (eval mode) outputs for them, normalised with RepDistiller's CIFAR-100
                           mean/std
  reference_shapes.json    {model: {state_dict name: shape}} of torchvision's resnet18/34/50 and
                           the CRD classes of tests/crd_torch.py
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures", "interop")
sys.path.insert(0, HERE)

import crd_torch  # noqa: E402
from _interop import torch_logits  # noqa: E402

CRD_MEAN = (0.5071, 0.4867, 0.4408)
CRD_STD = (0.2675, 0.2565, 0.2761)
TINY = dict(depth=8, num_filters=(4, 8, 8, 16), num_classes=10)
CRD_SHAPES = ("resnet8", "resnet8x4", "wrn_16_1", "wrn_16_2", "vgg8", "vgg13", "mobilenetv2")


def tiny_model() -> torch.nn.Module:
    return crd_torch.randomize(crd_torch.ResNet(**TINY), seed=11)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    model = tiny_model()
    sd = model.state_dict()
    torch.save(sd, os.path.join(OUT, "tiny_resnet.pth"))
    save_file(sd, os.path.join(OUT, "tiny_resnet.safetensors"))
    torch.save({"epoch": 240, "model": sd, "accuracy": torch.tensor(71.5)},
               os.path.join(OUT, "tiny_resnet_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(model, os.path.join(OUT, "tiny_resnet_whole.pth"))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(os.path.join(OUT, "tiny_resnet_logits.npz"), images=images,
             logits=torch_logits(model, images, CRD_MEAN, CRD_STD))
    shapes = {name: {k: list(v.shape) for k, v in getattr(torchvision.models, name)(
        num_classes=10).state_dict().items()} for name in ("resnet18", "resnet34", "resnet50")}
    shapes.update({name: {k: list(v.shape) for k, v in crd_torch.build(name, 10).state_dict()
                          .items()} for name in CRD_SHAPES})
    with open(os.path.join(OUT, "reference_shapes.json"), "w") as f:
        json.dump(shapes, f)
    for name in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, name)):>8,}  {name}")


if __name__ == "__main__":
    main()
