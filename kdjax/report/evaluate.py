"""Accuracy, calibration and fidelity of an Artifact on a dataset split.

One jitted forward pass over the split's padded, masked batches gives the logits of its real
examples; every metric is then `kdjax.step.eval_sums` (the training eval's own sums) over those
logits, so the report and `kdjax train`'s eval compute the same numbers. Keeping the logits makes
temperature scaling cheap: fitted on the held-out split's logits, then the same sums at logits / T.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import calibration, data as data_lib, input as input_lib, plan, sharding
from kdjax.report.artifacts import Artifact
from kdjax.step import eval_sums


def held_out_split(train_split: str | None, available: dict[str, int], eval_split: str
                   ) -> tuple[str | None, str]:
    """(split for temperature scaling, why): data the model never trained on, never `eval_split`.

    A run trained on a slice "NAME[:N]" (or "NAME[:P%]") is calibrated on the rest, "NAME[N:]";
    otherwise on a "validation" split when the dataset has one; otherwise there is none (every
    training example was seen, so it would overstate confidence): None.
    """
    match = re.fullmatch(r"\s*(\w+)\[\s*:\s*(-?\d+%?)\s*\]\s*", train_split or "")
    if match:
        split = f"{match.group(1)}[{match.group(2)}:]"
        return split, f"the rest of its training split {train_split!r}"
    if "validation" in available and eval_split != "validation" and train_split != "validation":
        return "validation", "the dataset's validation split"
    if train_split is None:
        return None, ("it records no training split (an export or an imported model): pass "
                      "--calibration-split with data it never saw")
    return None, (f"it trained on all of {train_split!r} and the dataset has no validation split; "
                  f"pass --calibration-split with data it never saw")


def data_config(artifact: Artifact, *, split: str, dataset: str | None = None,
                data_dir: str | None = None) -> plan.Data:
    """The `data` section to read `split` (as its eval_split) for this artifact: its own (name,
    data_dir, image size and crops), with `dataset`/`data_dir` when given."""
    known = {f.name for f in dataclasses.fields(plan.Data)}
    # through the schema, so a JSON list is the tuple a config holds
    recorded = plan.as_plan({"data": {k: v for k, v in artifact.data.items()
                                      if k in known}}).data
    name = dataset or artifact.data.get("name")
    if not name:
        raise ValueError(f"{artifact.path!r} does not record its dataset; pass --dataset NAME")
    return dataclasses.replace(recorded, name=name, eval_split=split,
                               data_dir=data_dir or artifact.data.get("data_dir") or "")


def _adapted(images: jax.Array, artifact: Artifact) -> jax.Array:
    """uint8 images as a model of another input shape sees them in training and `kdjax eval`
    (kdjax.augment.teacher_view): grayscale replicated to its channels, resized (bilinear) to its
    size. Resizing is linear with weights summing to 1, so it commutes with the model's own
    normalisation inside `apply`; a StableHLO program or ONNX graph takes uint8, so its pixels are
    rounded."""
    shape = tuple(artifact.input_shape)
    if tuple(images.shape[1:]) == shape:
        return images
    h, w, c = shape
    if images.shape[-1] not in (1, c):
        raise ValueError(f"{artifact.path!r} takes {h}x{w}x{c} images and cannot see "
                         f"{images.shape[-1]}-channel ones; pass the dataset it was trained on")
    x = jnp.broadcast_to(images.astype(jnp.float32), (*images.shape[:-1], c))
    x = jax.image.resize(x, (x.shape[0], h, w, c), method="bilinear")
    uint8_only = artifact.kind in ("stablehlo", "onnx", "litert")
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8) if uint8_only else x


def split_logits(artifact: Artifact, data: plan.Data, *, batch_size: int = 1000,
                 mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C] float32, labels [N]) of the split `data.eval_split`, in its order."""
    mesh = mesh or sharding.make_mesh()
    spec = data_lib.dataset_info(data.name, data_dir=data.data_dir or None)
    mode, _ = input_lib.choose_mode(data, spec, split=data.eval_split)
    if mode == "device":
        arrays = data_lib.load_arrays(data.name, data.eval_split, data_dir=data.data_dir or None)
        batches = input_lib.array_eval_batches(arrays, batch_size, mesh)
    else:
        batches = input_lib.eval_batches(data, batch_size=batch_size, mesh=mesh)
    forward = jax.jit(lambda v, x: artifact.apply(v, _adapted(x, artifact)).astype(jnp.float32))
    variables = sharding.replicate(artifact.variables, mesh)
    logits, labels = [], []
    for batch in batches:
        out, mask = jax.device_get((forward(variables, batch["image"]), batch["mask"]))
        real = np.asarray(mask) > 0
        logits.append(np.asarray(out)[real])
        labels.append(np.asarray(jax.device_get(batch["label"]))[real])
    if not logits:
        raise ValueError(f"{data.name} split {data.eval_split!r} is empty")
    return np.concatenate(logits), np.concatenate(labels)


_sums = jax.jit(eval_sums, static_argnames="calibration_bins")


def metrics(logits: np.ndarray, labels: np.ndarray, *, teacher_logits: np.ndarray | None = None,
            temperature: float = 1.0, num_bins: int = calibration.NUM_BINS,
            chunk: int = 8192) -> dict[str, Any]:
    """Accuracy, NLL, Brier, ECE/MCE with per-bin statistics (and fidelity with
    `teacher_logits`) of `logits / temperature`, summed chunk by chunk with `eval_sums`."""
    n = len(labels)
    totals: dict[str, Any] = {}
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # one compiled shape for every chunk of every split: the last chunk is padded
        def pad(a, rows=chunk - (stop - start)):
            return np.concatenate([a, np.zeros((rows, *a.shape[1:]), a.dtype)])

        mask = pad(np.ones(stop - start, np.float32))
        sums = _sums(jnp.asarray(pad(logits[start:stop])) / temperature,
                     jnp.asarray(pad(labels[start:stop])), jnp.asarray(mask),
                     teacher_logits=None if teacher_logits is None
                     else jnp.asarray(pad(teacher_logits[start:stop])),
                     calibration_bins=num_bins)
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    bins = calibration.CalibrationBins(*(np.asarray(x) for x in totals.pop("calibration")))
    accuracy, confidence, _ = (np.asarray(x) for x in calibration.bin_statistics(bins))
    out = {k: float(v / n) for k, v in totals.items()}
    out["ece"] = float(calibration.ece_from_bins(bins))
    out["mce"] = float(calibration.mce_from_bins(bins))
    out["bins"] = {"edges": calibration.bin_edges(num_bins).tolist(),
                   "count": bins.count.astype(int).tolist(), "accuracy": accuracy.tolist(),
                   "confidence": confidence.tolist()}
    return out
