"""The run plan: a validated config as typed, frozen objects, built once before any I/O.

`kdjax.config` is the schema (every key, its default and type, the experiment files' ConfigDict)
and refuses a typo or a wrong type with the key, the value and the fix. A `RunPlan` is what a
validated config becomes: one frozen dataclass per section, named as the config's sections and
keys (so `plan.data.name` reads as `config.data.name` did), tuples for sequences and read-only
mappings for the free-form dicts (loss.kwargs, model.kwargs, teacher.model.kwargs,
prune.targets). Code below the boundary takes the sections it needs; `as_plan` turns whatever a
caller holds (a RunPlan, a ConfigDict, a plain dict) into one.

The defaults live in `kdjax.config.base_config()` only, and so do the longer notes on what each
key does: a RunPlan is only ever built from a validated config, which has every key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from kdjax import config as config_lib
from kdjax import models


@dataclasses.dataclass(frozen=True)
class Data:
    """The dataset and how its images reach the model (kdjax.data, kdjax.input, kdjax.augment)."""

    name: str  # a prepared TFDS dataset (kdjax prepare)
    data_dir: str  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    train_split: str
    eval_split: str
    mean: tuple[float, ...]  # () = the dataset's known per-channel statistics
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    mixup_alpha: float  # 0 = off
    cutmix_alpha: float  # 0 = off
    teacher_view: str  # same (function matching) | clean
    mode: str  # auto | device | stream
    device_memory_fraction: float  # auto: device when the split fits in this much of a device
    num_workers: int  # streaming decode threads (0 = one per CPU core)
    image_size: int  # 0 = the dataset's own size
    random_resized_crop: bool  # inception-style, on the host while decoding
    crop_scale: tuple[float, ...]  # its range of areas
    eval_crop_fraction: float  # variable-size eval images: central crop of the shorter side


@dataclasses.dataclass(frozen=True)
class Lora:
    """Low-rank adapters on the frozen student (kdjax.lora)."""

    rank: int  # 0 = off
    alpha: float  # the adapters' output is scaled by alpha / rank
    targets: tuple[str, ...]  # module-path globs of the nnx.Linear layers adapted


@dataclasses.dataclass(frozen=True)
class Model:
    """The student."""

    name: str  # a kdjax.models (or kdjax.lm.models) registry name
    kwargs: Mapping[str, Any]  # its constructor's keyword arguments (read-only)
    compute_dtype: str  # auto = bfloat16 on GPU/TPU, float32 on CPU
    num_classes: int  # 0 = the dataset's
    peers: tuple[str, ...]  # loss.name="dml": further students, by model name
    sharding: str  # replicated | fsdp
    torch: str  # a PyTorch student's factory, "package.module:callable" ("" = none)
    torch_kwargs: Mapping[str, Any]  # its keyword arguments
    lora: Lora

    def __post_init__(self):
        # model.torch is the user's spelling of a TorchModel student, resolved here, once, so
        # that every reader of the plan (the task, peers, export, resume) sees one ModelSpec. It
        # wins over model.name/kwargs: an experiment file's zoo student is what a
        # --config.model.torch on its command line replaces.
        if not self.torch:
            return
        derived = {"factory": self.torch, "factory_kwargs": dict(self.torch_kwargs)}
        object.__setattr__(self, "name", models.TORCH_MODEL)
        object.__setattr__(self, "kwargs", _frozen(derived))


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int
    batch_size: int
    log_every_steps: int
    steps_per_call: int  # train steps per dispatch; 0 = auto
    nan_policy: str  # stop | skip
    grad_accum: int  # micro-batches per step, their gradients added


@dataclasses.dataclass(frozen=True)
class Optimizer:
    name: str  # sgd | adam | adamw
    learning_rate: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str  # cosine | constant | step
    warmup_steps: int
    decay_boundaries: tuple[int, ...]  # step schedule: where the rate is multiplied by decay_factor
    decay_factor: float


@dataclasses.dataclass(frozen=True)
class TemperatureSchedule:
    """The distillation temperature over training (kdjax.temperature)."""

    name: str  # "" = the fixed loss temperature | constant | linear | cosine | step
    init_value: float
    end_value: float
    begin_step: int
    steps: int  # 0 = until the end of training
    boundaries: tuple[int, ...]  # step: where the temperature is multiplied by `factors`
    factors: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class LearnedTemperature:
    """CTKD's adversarially learned temperature."""

    mode: str  # "" = off | global | instance
    t_min: float  # T = t_min + t_range * sigmoid(z)
    t_range: float
    max_strength: float  # of the gradient reversal, reached after curriculum_steps
    curriculum_steps: int  # 0 = the whole run
    hidden: int  # instance mode: the MLP's units


@dataclasses.dataclass(frozen=True)
class Loss:
    """The training objective (kdjax.objectives)."""

    name: str  # ce | a logit, feature, mutual or self-distillation method
    kwargs: Mapping[str, Any]  # the loss function's (and connector's) hyperparameters (read-only)
    ce_weight: float
    kd_weight: float
    kd_warmup_steps: int  # the distillation terms ramp up linearly over these steps
    label_smoothing: float
    feature_weight: float  # feature methods: the weight of their own term
    kd_temperature: float  # feature methods: the temperature of their added KD term
    student_taps: tuple[str, ...]  # the layers compared; () = the method's default
    teacher_taps: tuple[str, ...]
    hint_steps: int  # FitNets: the first steps optimise the hint alone
    temperature_schedule: TemperatureSchedule
    learned_temperature: LearnedTemperature


@dataclasses.dataclass(frozen=True)
class Eval:
    every_steps: int
    batch_size: int


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    every_steps: int
    max_to_keep: int  # the latest kept
    keep_best: int  # and the best by best_metric; 0 = none
    best_metric: str  # an eval metric, e.g. eval/accuracy
    best_mode: str  # max | min


@dataclasses.dataclass(frozen=True)
class TeacherModel:
    """The architecture a distillation expects of its teacher ("" = what its checkpoint says)."""

    name: str
    kwargs: Mapping[str, Any]  # read-only


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The trained teacher(s) a distillation reads (kdjax.teacher)."""

    workdir: str  # the run that trained it
    model: TeacherModel
    workdirs: tuple[str, ...]  # several teachers instead of workdir
    weights: tuple[float, ...]  # one per teacher, normalised; () = uniform
    combine: str  # ensemble | per_teacher
    sharding: str  # replicated | fsdp
    compute_dtype: str  # auto = bfloat16 on GPU/TPU, float32 on CPU
    fold_batchnorm: bool
    agreement_examples: int  # the prepared teacher checked against float32 on these; 0 = skip
    min_agreement: float  # and refused below this top-1 agreement
    aggregation: str  # "" | gnmax | plurality (a PATE ensemble's votes)
    cache: str  # a `kdjax cache-teacher` directory: the LM teacher's cached top-k targets
    top_k: int  # LM: distil from the teacher's top k tokens; 0 = all (or the cache's k)
    top_k_loss: str  # tail | renorm


@dataclasses.dataclass(frozen=True)
class Mesh:
    """The device mesh (kdjax.sharding): sizes multiply to the device count, one may be -1."""

    data: int
    fsdp: int
    fsdp_min_bytes: int  # smaller arrays stay replicated under "fsdp"


@dataclasses.dataclass(frozen=True)
class Init:
    workdir: str  # the run whose latest student this one starts from; "" = random init
    layers: tuple[int, ...]  # an LM's blocks of init.workdir kept, in order; () = all


@dataclasses.dataclass(frozen=True)
class Minitron:
    """An LM's target sizes for prune.method="minitron" (kdjax.compress.minitron); 0 = keep."""

    d_model: int
    d_ff: int
    num_heads: int  # query heads, in whole KV groups
    num_layers: int
    calibration_rows: int  # training rows the importance is estimated on


@dataclasses.dataclass(frozen=True)
class Prune:
    """Pruning in the fused step (kdjax.compress.prune)."""

    method: str  # none | magnitude | random | nm | structured | minitron
    scope: str  # per_layer | global
    sparsity: float  # the final fraction pruned, in [0, 1)
    initial_sparsity: float  # cubic: where the ramp starts
    schedule: str  # one_shot | cubic | init
    begin_step: int
    end_step: int
    every_steps: int  # cubic: masks recomputed this often
    n: int  # N:M: n of every m weights kept
    m: int
    criterion: str  # structured: bn_scale | l1 | group_l2
    exclude: tuple[str, ...]  # parameter-path globs left dense
    targets: Mapping[str, float]  # {glob: sparsity} per layer (read-only)
    dense_first_last: bool  # the input layer and the classifier stay dense
    round_to: int  # structured: each group keeps a multiple of this many channels
    minitron: Minitron


@dataclasses.dataclass(frozen=True)
class Quant:
    """Quantization (kdjax.compress.quantize)."""

    mode: str  # none | qat | ptq
    weights: str  # int8 | int4
    activations: str  # int8 | none (weight-only)
    calibration_examples: int  # static activation scales are calibrated on these
    exclude: tuple[str, ...]  # layer-path globs left in float


@dataclasses.dataclass(frozen=True)
class Pate:
    """PATE (kdjax.privacy): the teacher ensemble and its noisy votes."""

    teachers: int  # kdjax train: > 0 trains this many on disjoint slices
    sigma: float  # GNMax noise
    threshold: float  # > 0: Confident-GNMax
    sigma1: float  # its check's noise
    delta: float
    public_split: str  # the student's unlabelled data
    queries: int  # 0 = all of public_split
    vote_batch_size: int


@dataclasses.dataclass(frozen=True)
class Datafree:
    """Data-free distillation (kdjax.datafree)."""

    method: str  # "" | deepinversion | zskt
    num_images: int
    synthesis_batch_size: int
    synthesis_steps: int
    synthesis_lr: float
    synthesis_steps_per_call: int  # 0 = auto
    bn_weight: float
    tv_weight: float
    l2_weight: float
    jitter: int
    flip: bool
    latent_dim: int  # zskt: the generator's
    generator_channels: tuple[int, ...]
    generator_lr: float
    student_steps: int  # student steps per generator step
    balance_weight: float  # DAFL's prior


@dataclasses.dataclass(frozen=True)
class OnPolicy:
    """Batches generated inside the step (kdjax.lm.onpolicy)."""

    fraction: float  # λ: the probability that a step's batch is generated; 0 = off
    generator: str  # student (on-policy distillation) | teacher (sequence-level KD)
    prompt_tokens: int  # a plain row's first tokens continued; an instruction prompt's limit
    max_new_tokens: int
    temperature: float  # 0 = greedy


@dataclasses.dataclass(frozen=True)
class Lm:
    """Language models (kdjax.lm)."""

    chunk_size: int  # positions per chunk of the vocabulary-chunked loss; 0 = whole logits
    eval_rows: int  # 0 = all
    prompts: tuple[str, ...]  # continued after the final eval
    generate_tokens: int
    sample_temperature: float  # 0 = greedy
    top_k: int
    top_p: float
    cross_tokenizer: str  # "" | next_byte: a teacher of another tokenizer (kdjax.lm.cross_tokenizer)
    on_policy: OnPolicy


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A whole validated config. Build it with `as_plan` (or `RunPlan.from_config` on a config
    that `kdjax.config` has already validated)."""

    seed: int
    data: Data
    model: Model
    train: Train
    optimizer: Optimizer
    loss: Loss
    eval: Eval
    checkpoint: Checkpoint
    teacher: Teacher
    mesh: Mesh
    init: Init
    prune: Prune
    quant: Quant
    pate: Pate
    datafree: Datafree
    lm: Lm

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> RunPlan:
        """The plan of a config `kdjax.config.validate` returned (it has every key)."""
        return _build(cls, config, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts, as `ConfigDict.to_dict()` gives them (tuples stay tuples)."""
        return _plain(self)

    def to_json(self) -> str:
        """What `kdjax.config.to_json` writes: each workdir's config.json and the run record in
        its checkpoints, which resuming compares, so the format must not change."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> RunPlan:
        """This plan with some keys changed, checked against the schema as a config's are.

        A section's changes are a mapping of its keys (nested sections likewise):
        `plan.replace(seed=1, teacher={"workdir": w, "model": {"name": "resnet8"}})`.
        """
        return as_plan(_merge(self.to_dict(), changes, ""))


def as_plan(config: RunPlan | ml_collections.ConfigDict | Mapping[str, Any],
            overrides: Sequence[str] = ()) -> RunPlan:
    """`config` as a RunPlan: a RunPlan as it is, anything else validated by `kdjax.config`
    first (an unknown key or a wrong type raises naming the key, the value and the fix).

    `overrides` are `--config.a.b=value` items, applied as `kdjax.config.apply_override` does.
    """
    if isinstance(config, RunPlan):
        if not overrides:
            return config
        config = config.to_dict()
    validated = config_lib.validate(config)
    for item in overrides:
        config_lib.apply_override(validated, item)
    return RunPlan.from_config(validated)


def read_run(workdir: str) -> RunPlan:
    """The plan a run (or an imported model) was made with: its workdir's config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a kdjax workdir (train a "
                                f"model there first with `kdjax train`, or import one with "
                                f"`kdjax import`)")
    with open(path) as f:
        return RunPlan.from_config(config_lib.from_json(f.read()))


def _frozen(value: Any) -> types.MappingProxyType:
    # A copy behind the proxy: nothing else holds the dict it reads, so nothing can change it.
    return types.MappingProxyType(_tuples(value))


def _tuples(value: Any) -> Any:
    """Plain dicts and tuples all the way down: an experiment's tuple and the list config.json
    stored it as are one value."""
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_tuples(v) for v in value)
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, node: Any, prefix: str) -> Any:
    values = {}
    for field in dataclasses.fields(cls):
        path, value, hint = f"{prefix}{field.name}", node[field.name], _hints(cls)[field.name]
        if path in config_lib.FREE_FORM:
            value = _frozen(value)
        elif dataclasses.is_dataclass(hint):
            value = _build(hint, value, path + ".")
        elif isinstance(value, (tuple, list)):
            value = tuple(value)
        values[field.name] = value
    return cls(**values)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _merge(base: dict[str, Any], changes: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        path = f"{prefix}{key}"
        if dataclasses.is_dataclass(value):
            value = _plain(value)
        if (isinstance(value, Mapping) and isinstance(out.get(key), dict)
                and path not in config_lib.FREE_FORM):
            value = _merge(out[key], value, path + ".")
        out[key] = value
    return out


def diff(saved: Mapping[str, Any], plan: RunPlan) -> list[str]:
    """The keys whose values differ between a saved run's config (a checkpoint's record) and
    `plan`, as "key: old -> new" lines (what a resumed run says changed)."""
    return config_lib.diff(saved, plan.to_dict())


def section(name: str, value: Any) -> Any:
    """The typed section `name` ("loss", "teacher", ...) of `value`: a section as it is (typed,
    or a ConfigDict's), or a plain mapping of some of its keys (the rest the schema's
    defaults), validated as a config's is. Library functions that take a section accept a
    user's dict through this: `kdjax.build_connectors({"name": "rkd", ...}, ...)`."""
    if isinstance(value, Mapping) and not isinstance(value, ml_collections.ConfigDict):
        return getattr(as_plan({name: dict(value)}), name)
    return value
