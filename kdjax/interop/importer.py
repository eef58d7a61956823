"""`kdjax import`: a PyTorch state_dict or safetensors file mapped onto a zoo model and written
as a kdjax run, usable wherever a trained run is.

The output directory is a run without training: one Orbax checkpoint (step 0) holding the items
every reader of a run reads, "model" = {"params", "model_state"} (the weights, BatchNorm running
statistics included) and "run" = the run record (config, ModelSpec, the input normalisation the
teacher was trained with under "preprocess", and where the weights came from under "imported"),
plus config.json and summary.json. So `--config.teacher.workdir=DIR` (`kdjax distill`),
`kdjax eval --workdir DIR`, `kdjax export --workdir DIR` and `kdjax summary DIR` take it as they
take a run that kdjax trained. It has no "train" item (no optimizer state): it is not a run to
resume, and `kdjax train --workdir DIR` refuses it.

Everything is written into a temporary directory next to DIR and renamed when complete, so DIR
exists only whole, and a file that does not fit the model leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

import kdjax
from kdjax import checkpoint, data, plan
from kdjax.interop import layouts, state_dict
from kdjax.models import ModelSpec, count_params

__all__ = ["LAYOUT_CONVENTIONS", "ImportReport", "channel_values", "import_checkpoint", "write_run"]

# What a checkpoint of each layout's reference code was trained on, as its training scripts do it:
# torchvision's ImageNet recipe (224 px, ImageNet mean/std), RepDistiller's CIFAR-100 loaders.
LAYOUT_CONVENTIONS: dict[str, dict[str, Any]] = {
    "torchvision": {"input_shape": (224, 224, 3), "mean": data.NORMALIZATION["imagenet2012"][0],
                    "std": data.NORMALIZATION["imagenet2012"][1], "data": "imagenet2012"},
    "crd": {"input_shape": (32, 32, 3), "mean": (0.5071, 0.4867, 0.4408),
            "std": (0.2675, 0.2565, 0.2761), "data": "cifar100"},
}


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What `import_checkpoint` wrote, and what it did to the file on the way (`notes`)."""

    out: str
    spec: ModelSpec
    layout: str
    source: str
    sha256: str
    format: str
    num_params: int
    preprocess: dict[str, list[float]]
    data: str
    notes: tuple[str, ...]
    data_dir: str = ""

    def describe(self) -> str:
        return (f"imported {self.source} ({self.format}, {self.layout} layout) as {self.spec.name} "
                f"({self.num_params:,} parameters, {self.spec.num_classes} classes, input "
                f"{tuple(self.spec.input_shape)}, normalised with mean {self.preprocess['mean']} "
                f"std {self.preprocess['std']}) into {self.out}")


def _file_metadata(loaded: state_dict.Loaded, source: str) -> dict[str, Any]:
    raw = loaded.metadata.get(state_dict.METADATA_KEY)
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{source}: its {state_dict.METADATA_KEY!r} header entry is not "
                         f"JSON") from None


def _head_classes(spec: ModelSpec, tensors: dict, layout: str) -> int | None:
    """The class count the file's classifier head has: the entries whose shape follows
    num_classes (found by building the model with two class counts) say it."""
    def shapes(n):
        return layouts.expected_shapes(dataclasses.replace(spec, num_classes=n).abstract(), layout)

    a, b = shapes(1000), shapes(1001)
    for name, shape in a.items():
        axes = [i for i, (x, y) in enumerate(zip(shape, b[name])) if x != y]
        if len(axes) == 1 and name in tensors and len(tensors[name].shape) == len(shape):
            return int(tensors[name].shape[axes[0]])
    return None


def channel_values(values: Sequence[float] | None, what: str, channels: int) -> tuple[float, ...] | None:
    if values is None:
        return None
    out = tuple(float(v) for v in values)
    if len(out) != channels:
        raise ValueError(f"{what} has {len(out)} value(s) but the input has {channels} channel(s) "
                         f"(--input-shape): give one per channel, e.g. {what} "
                         f"{','.join(['0.5'] * channels)}")
    return out


def import_checkpoint(source: str, *, model: str, out: str, num_classes: int | None = None,
                      input_shape: Sequence[int] | None = None, layout: str | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      model_kwargs: dict[str, Any] | None = None, key: str | None = None,
                      dataset: str | None = None, data_dir: str | None = None) -> ImportReport:
    """Map the state_dict in `source` onto the zoo model `model` and write it as a run in `out`.

    Args:
      source: a .pth/.pt (read without running pickled code) or .safetensors file.
      model: the zoo name (kdjax.models.model_names()).
      out: the directory to create (must not exist).
      num_classes: the classifier's outputs (default: read off the file's classifier head).
      input_shape: (H, W, C) (default: the layout's convention, 224x224x3 / 32x32x3).
      layout: "torchvision" | "crd" | "kdjax" (default: the one recorded in a kdjax export's
        header, else the architecture's reference).
      mean, std: the per-channel input normalisation (in [0, 1] units) the weights were trained
        with (default: the layout's convention: ImageNet's / RepDistiller's CIFAR-100 ones).
      model_kwargs: constructor arguments of the zoo model (model.kwargs).
      key: the entry of a checkpoint dict that holds the state_dict.
      dataset: the data.name recorded for the run (default: the layout's, imagenet2012 /
        cifar100); `kdjax eval --workdir out` evaluates on it.
      data_dir: where that dataset is prepared (data.data_dir recorded for the run, so that
        `kdjax eval` and `kdjax report` find it; default: $TFDS_DATA_DIR or
        ~/tensorflow_datasets).
    Raises:
      LayoutMismatchError listing every unmapped, missing or wrongly shaped tensor;
      UnsafePickleError for a .pth that is not a plain state_dict; ValueError for bad arguments.
    """
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists; pick a new path (an import never "
                         f"overwrites anything)")
    if input_shape is not None and (len(input_shape) != 3 or min(input_shape) < 1):
        raise ValueError(f"--input-shape must be H,W,C (three positive ints), got "
                         f"{tuple(input_shape)}")
    source = os.path.abspath(source)
    loaded = state_dict.load(source, key=key)
    meta = _file_metadata(loaded, source)
    recorded = meta.get("model", {})
    kwargs = dict(model_kwargs if model_kwargs is not None else
                  recorded.get("kwargs", {}) if recorded.get("name") == model else {})
    probe = ModelSpec(name=model, num_classes=recorded.get("num_classes", 10),
                      input_shape=tuple(input_shape or recorded.get("input_shape") or (32, 32, 3)),
                      kwargs=kwargs)
    abstract = probe.abstract()  # an unknown model name or kwargs are refused here
    layout = layout or meta.get("layout") or layouts.default_layout(abstract)
    convention = LAYOUT_CONVENTIONS.get(layout, {})
    header = {"input_shape": recorded.get("input_shape"), "data": meta.get("data"),
              **{k: meta.get("preprocess", {}).get(k) for k in ("mean", "std")}}

    def pick(value, name: str, flag: str):
        """The argument, else what a kdjax export's header recorded, else the convention."""
        for v in (value, header[name], convention.get(name)):
            if v is not None and v != ():
                return v
        raise ValueError(f"{flag} is required with --layout {layout} (the {layout!r} layout has "
                         f"no convention for it), e.g. {flag} "
                         + {"input_shape": "32,32,3", "mean": "0.5,0.5,0.5", "std": "0.5,0.5,0.5",
                            "data": "cifar100"}[name])

    shape = tuple(int(d) for d in pick(input_shape, "input_shape", "--input-shape"))
    mean_ = channel_values(pick(mean, "mean", "--mean"), "--mean", shape[-1])
    std_ = channel_values(pick(std, "std", "--std"), "--std", shape[-1])
    if min(std_) <= 0:
        raise ValueError(f"--std must be positive per channel, got {std_}")
    dataset = pick(dataset, "data", "--data")
    spec = dataclasses.replace(probe, input_shape=shape)
    if num_classes is None:
        num_classes = _head_classes(spec, loaded.tensors, layout)
        if num_classes is None:
            raise ValueError(f"cannot tell the class count from {source} (its classifier head "
                             f"is not among its tensors): pass --num-classes N")
    elif num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {num_classes}")
    spec = dataclasses.replace(spec, num_classes=int(num_classes))
    abstract = spec.abstract()
    graphdef, _ = nnx.split(abstract)
    state = layouts.from_state_dict(abstract, loaded.tensors, layout, source=source)
    _, params, model_state = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
    report = ImportReport(
        out=out, spec=spec, layout=layout, source=source, sha256=state_dict.sha256(source),
        format=loaded.format, num_params=count_params(params),
        preprocess={"mean": list(mean_), "std": list(std_)}, data=dataset,
        notes=tuple(loaded.notes), data_dir=os.path.abspath(data_dir) if data_dir else "")
    write_run(report, params, model_state, layouts.reference_class(abstract, layout, model))
    return report


def _fixed_size(dataset: str, data_dir: str) -> bool:
    """Whether `dataset` is prepared with images of one size (False when it is not found)."""
    try:
        return data.dataset_info(dataset, data_dir=data_dir or None).fixed_shape
    except (FileNotFoundError, ValueError):
        return False


def _run_plan(report: ImportReport) -> plan.RunPlan:
    data_keys = {"name": report.data, "mean": tuple(report.preprocess["mean"]),
                 "std": tuple(report.preprocess["std"]), "data_dir": report.data_dir}
    if report.layout == "torchvision" and not _fixed_size(report.data, report.data_dir):
        # ImageNet's images vary in size: the model's is recorded. A fixed-size dataset keeps
        # its own, and the model sees its images adapted (kdjax.augment.teacher_view).
        data_keys["image_size"] = report.spec.input_shape[0]
    return plan.as_plan({"model": {"name": report.spec.name, "kwargs": dict(report.spec.kwargs),
                                   "num_classes": report.spec.num_classes},
                         "data": data_keys, "train": {"steps": 0}})


def write_run(report: ImportReport, params: nnx.State, model_state: nnx.State,
              reference: str | None, *, torch: dict[str, Any] | None = None,
              extra_files: Callable[[str], None] | None = None,
              run_plan: plan.RunPlan | None = None, record: dict[str, Any] | None = None) -> None:
    """Write the run of an import into `report.out`, whole or not at all. `torch` records the
    factory and kwargs of a `--torch` import; `extra_files(dir)` adds files to the run;
    `run_plan` replaces an image model's plan (a language model's names its text data) and
    `record` adds entries to the run record (an LM's tokenizer)."""
    run_plan = run_plan or _run_plan(report)
    imported = {"from": report.source, "sha256": report.sha256, "format": report.format,
                "layout": report.layout, "reference": reference, "notes": list(report.notes)}
    if torch is not None:
        imported["torch"] = torch
    run = {"kdjax_version": kdjax.__version__, "config": json.loads(run_plan.to_json()),
           "model": report.spec.to_json(), "preprocess": report.preprocess, "imported": imported,
           **(record or {})}
    summary = {"imported": True, **imported, "model": report.spec.name,
               "num_params": report.num_params, "num_classes": report.spec.num_classes,
               "input_shape": list(report.spec.input_shape), "preprocess": report.preprocess,
               "data": report.data, "steps": 0}
    parent = os.path.dirname(report.out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(report.out)}.tmp-")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the run private to this user
        checkpoint.save_model_only(tmp, params, model_state, run)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(run_plan.to_json())
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if extra_files is not None:
            extra_files(tmp)
        os.rename(tmp, report.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
