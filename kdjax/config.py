"""Experiment configs: the standard keys, loading `get_config()` files, command-line overrides.

Every experiment is a Python file with `get_config()` returning an ml_collections ConfigDict
(big_vision style). It starts from `base_config()`, which is also the schema: a key that is not in
it, or a value of the wrong type, is refused with the list of valid keys, so a typo never silently
trains with a default. `loss.kwargs` and `model.kwargs` are free-form; the loss function's and
the model constructor's signatures check them.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

FREE_FORM = ("loss.kwargs", "model.kwargs", "model.torch_kwargs", "teacher.model.kwargs", "prune.targets")


def base_config() -> ml_collections.ConfigDict:
    """The schema and defaults shared by every experiment."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        name="fashion_mnist",
        data_dir="",  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
        train_split="train",
        eval_split="test",
        mean=(),  # () = the dataset's known per-channel statistics (kdjax.data.NORMALIZATION)
        std=(),
        crop_padding=0,
        flip=False,
        # On-device mixing (kdjax.augment): mixup / CutMix with Beta(alpha, alpha); 0 = off.
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        teacher_view="same",  # same: function matching (teacher sees the student's view) | clean
        # Input mode (kdjax.input): device = uint8 arrays on the devices, batches gathered in the
        # step; stream = host reading and decoding on worker threads, prefetched to the devices;
        # auto = device when the training split fits in device_memory_fraction of a device.
        mode="auto",
        device_memory_fraction=0.25,
        num_workers=0,  # streaming decode threads (0 = one per CPU core)
        image_size=0,  # 0 = the dataset's own size; required for variable-size (ImageNet) images
        random_resized_crop=False,  # inception-style crop, on the host while decoding (stream)
        crop_scale=(0.08, 1.0),  # its range of areas (fractions of the image)
        eval_crop_fraction=0.875,  # variable-size eval images: central crop of the shorter side
    )
    # kwargs go to the model's constructor (e.g. {"hidden": (256,)}); compute_dtype "auto" is
    # bfloat16 on GPU/TPU and float32 on CPU (kdjax.step.compute_dtype). num_classes 0 = the
    # dataset's; set it to give the head more outputs than the dataset has labels.
    # peers: further students trained alongside (loss.name="dml"), by model name; each gets
    # model.kwargs when its name is model.name, its registry defaults otherwise.
    # sharding: how the student's parameters and optimizer state are placed on the mesh,
    # "replicated" or "fsdp" (split over mesh.fsdp; see kdjax/sharding.py).
    # torch: a PyTorch student, "package.module:callable" returning an nn.Module (timm:create_model,
    # my_models:Net), called with torch_kwargs and run through torchax (kdjax.torchbridge; pip
    # install 'kdjax[torch]'); when set it is the student, replacing model.name and model.kwargs
    # by name="kdjax.torchbridge:TorchModel", kwargs={"factory": torch, "factory_kwargs":
    # torch_kwargs}, which the run records.
    # lora: low-rank adapters on the frozen init.workdir student (kdjax.lora); rank 0 = off.
    # Each targeted nnx.Linear (targets: module-path globs, e.g. "layers/0/attention/q") computes
    # x W + (alpha / rank) x A B with W frozen; only A and B train, and only they are in the
    # optimizer state and the checkpoints. The default targets are kdjax.lm.models.Transformer's
    # attention and MLP projections.
    c.model = dict(name="mlp_800", kwargs={}, compute_dtype="auto", num_classes=0, peers=(),
                   sharding="replicated", torch="", torch_kwargs={},
                   lora=dict(rank=0, alpha=16.0, targets=(
                       "*attention/q", "*attention/k", "*attention/v", "*attention/o",
                       "*mlp/gate", "*mlp/up", "*mlp/down")))
    # nan_policy: what a step whose loss, gradients or updated parameters are NaN/Inf does.
    # "stop" ends the run with the step and the terms named, keeping the last good checkpoint;
    # "skip" drops that step's update inside the compiled step and counts it (skipped_steps).
    # steps_per_call: train steps per dispatch (a lax.scan over them; kdjax.step). 0 = auto
    # (kdjax.trainer.resolve_steps_per_call): 1 on the CPU, where one is as fast; on GPU/TPU the
    # largest k <= 20 dividing train.steps and the step a resumed run starts from, since the
    # host's per-dispatch cost dominates small models' steps there. Cadences that k does not
    # divide (log/eval/checkpoint every_steps) fire at the first call boundary after their step.
    # grad_accum: each step's batch_size rows are split into this many micro-batches, run one
    # after the other (the teacher's and the student's activations of one at a time), their
    # gradients added; token losses are normalised by the target tokens of the whole batch, so
    # the update does not depend on it (kdjax.step.make_step).
    c.train = dict(steps=1000, batch_size=128, log_every_steps=100, steps_per_call=0,
                   nan_policy="stop", grad_accum=1)
    c.optimizer = dict(
        name="sgd",  # sgd | adam | adamw
        learning_rate=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
        schedule="cosine",  # cosine | constant | step
        warmup_steps=0,
        decay_boundaries=(),  # step schedule: steps at which the rate is multiplied by decay_factor
        decay_factor=0.1,
    )
    c.loss = dict(
        # ce (supervised) | logit: kd dkd lskd reverse_kl jsd tvd | feature: fitnet at sp rkd pkt
        # nst cc vid crd | dml (mutual learning) | self-distillation: tfkd byot. See
        # kdjax.objectives.
        name="ce",
        # the loss function's keyword hyperparameters, e.g. {"temperature": 4.0}; for feature
        # methods also their connector's (e.g. crd: {"num_negatives": 4096, "embed_dim": 128})
        kwargs={},
        ce_weight=1.0,
        kd_weight=1.0,  # logit methods: their loss; feature methods: an added Hinton KD term
        kd_warmup_steps=0,  # the distillation terms ramp up linearly over these steps
        label_smoothing=0.0,
        # feature methods: ce_weight * CE + kd_weight * KD(kd_temperature) + feature_weight * L
        feature_weight=1.0,
        kd_temperature=4.0,
        # the layers compared, paired one to one, e.g. ("stage2",) and ("stage3",); () = the
        # method's RepDistiller default (kdjax.objectives.FeatureMethod.taps)
        student_taps=(),
        teacher_taps=(),
        hint_steps=0,  # FitNets' two-stage training: the first steps optimise the hint alone
        # The temperature over training (kdjax.temperature), for every logit loss, feature
        # methods' KD term, tfkd and byot; computed from the step inside the compiled step (one
        # program for every step). name "" = the fixed loss.kwargs.temperature (kd_temperature);
        # constant (init_value) | linear | cosine (init_value -> end_value over `steps` steps
        # from begin_step; steps 0 = until the end of training) | step (init_value, times each
        # of `factors` from each of `boundaries` on, optax.piecewise_constant_schedule).
        temperature_schedule=dict(name="", init_value=4.0, end_value=4.0, begin_step=0, steps=0,
                                  boundaries=(), factors=()),
        # CTKD (Li et al., AAAI 2023): the temperature learned adversarially through a gradient-
        # reversal layer. mode "" = off | global (one value) | instance (per example, an MLP of
        # `hidden` units over both logits); T = t_min + t_range * sigmoid(z), starting at the
        # loss's temperature; the reversal's strength rises from 0 to max_strength over
        # curriculum_steps (cosine; 0 = the whole run). Logged as train/temperature.
        learned_temperature=dict(mode="", t_min=1.0, t_range=20.0, max_strength=1.0,
                                 curriculum_steps=0, hidden=128),
    )
    c.eval = dict(every_steps=500, batch_size=1000)
    # Checkpoints (Orbax, asynchronous and atomic) are saved every `every_steps`, at the end, on
    # SIGTERM/SIGINT and, when keep_best > 0, at every eval (each evaluated model is a candidate).
    # Kept: the latest `max_to_keep` plus the `keep_best` best by `best_metric` (an eval metric:
    # eval/accuracy, eval/loss, eval/top5_accuracy, eval/teacher_agreement) in `best_mode`.
    c.checkpoint = dict(every_steps=1000, max_to_keep=2, keep_best=0,
                        best_metric="eval/accuracy", best_mode="max")
    # distill: the workdir of the run that trained the teacher. The teacher's architecture is read
    # from its checkpoint; model.name/kwargs, when set, state the architecture this experiment
    # expects instead, and a checkpoint that does not match it is refused before training.
    # workdirs/weights/combine: several teachers (instead of workdir), each from its own run;
    # weights one per teacher, normalised (() = uniform); combine for logit losses: "ensemble"
    # (one target) | "per_teacher" (weighted sum of per-teacher losses).
    # sharding: the teachers' variables' placement, "replicated" or "fsdp" (a large teacher is
    # usually sharded, a small student replicated).
    # A frozen teacher is prepared for inference (kdjax.teacher): fold_batchnorm folds each
    # BatchNorm that follows a convolution into it; compute_dtype ("auto" = bfloat16 on GPU/TPU,
    # float32 on CPU) is the dtype of its activations and of its stored weights. When that changes
    # anything, the prepared teacher is compared with its float32 self on the first
    # agreement_examples eval examples before training (0 = skip) and refused below min_agreement
    # (top-1 agreement, a fraction). aggregation: "" (the teacher's outputs, as loss.name uses
    # them) | "gnmax" | "plurality": a PATE ensemble's votes instead (see c.pate below).
    # Language models: cache, a `kdjax cache-teacher` directory, trains from the teacher's cached
    # top-k targets (no teacher runs; workdir may be "" or the cache's teacher). top_k > 0
    # distils from the online teacher's top k tokens instead of its whole distribution (0 = the
    # whole, or the cache's k). top_k_loss: "tail" (the k tokens and one bucket for the rest,
    # the default) | "renorm" (the k renormalised; kdjax.losses.token_topk_kl).
    c.teacher = dict(workdir="", model=dict(name="", kwargs={}), workdirs=(), weights=(),
                     combine="ensemble", sharding="replicated", compute_dtype="auto",
                     fold_batchnorm=True, agreement_examples=2000, min_agreement=0.99,
                     aggregation="", cache="", top_k=0, top_k_loss="tail")
    # The device mesh over all devices of all processes: the batch is split over data × fsdp,
    # parameters with the "fsdp" rule over fsdp. Sizes must multiply to the device count; one
    # may be -1 (all remaining devices), so one config runs unchanged on 1 or 512 devices.
    # fsdp_min_bytes: arrays smaller than this stay replicated under "fsdp" (gathering them
    # costs more than it saves; big_vision's 4 MiB).
    c.mesh = dict(data=-1, fsdp=1, fsdp_min_bytes=4 * 2**20)
    # The student's initial weights: the latest checkpoint of the run in init.workdir (its
    # student, as its ModelSpec records it: model.name must be that run's), instead of a random
    # init. Distil-then-prune, prune-the-teacher (Minitron) and QAT fine-tuning start here.
    # layers: for a language model, the indices of init.workdir's blocks the student keeps, in
    # order (DistilBERT's initialisation from every other teacher layer: [0, 2, 4, ...]); () all.
    c.init = dict(workdir="", layers=())
    # Pruning inside the fused step (kdjax.compress.prune; README "Compression"): masks in the
    # optimizer state, pruned weights exactly 0. method: none | magnitude | random | nm (N:M,
    # n of every m weights kept along the input axis) | structured (whole coupled channel groups,
    # residual widths included, scored by criterion bn_scale | l1 | group_l2, removed on
    # export). scope: per_layer | global. sparsity: the final fraction pruned, in [0, 1).
    # schedule: one_shot (at begin_step) | cubic (Zhu & Gupta, from initial_sparsity at
    # begin_step to sparsity at end_step, masks recomputed every_steps) | init (structured:
    # prune init.workdir's weights once and train the smaller model). exclude: parameter-path
    # patterns left dense (fnmatch, e.g. "stages/0/*"); targets: {pattern: sparsity} per layer;
    # dense_first_last: the input layer and the classifier stay dense (unstructured and N:M).
    # round_to: structured: each group keeps a multiple of this many channels (8: ONNX Runtime's
    # CPU convolutions block channels by 8, and odd widths ran slower than the unpruned model).
    # method "minitron" (language models, schedule "init"; kdjax.compress.minitron): init.workdir's
    # transformer pruned once, before training, to the minitron sizes (0 keeps the model's):
    # d_model (the residual width), d_ff, num_heads (in whole KV groups) and num_layers (whole
    # blocks), ranked by Minitron's activation importance and ShortGPT's Block Influence on
    # calibration_rows rows of data.train_split.
    c.prune = dict(method="none", scope="per_layer", sparsity=0.0, initial_sparsity=0.0,
                   schedule="one_shot", begin_step=0, end_step=0, every_steps=100, n=2, m=4,
                   criterion="bn_scale", exclude=(), targets={}, dense_first_last=True,
                   round_to=1, minitron=dict(d_model=0, d_ff=0, num_heads=0, num_layers=0,
                                             calibration_rows=64))
    # Quantization (kdjax.compress.quantize, built on Qwix). mode: none | qat (the student's
    # forward fake-quantized in the fused step, straight-through gradients, the float teacher
    # beside it) | ptq (trained in float; quantized on export). weights: int8 | int4;
    # activations: int8 | none (weight-only). The export stores integer weights and scales;
    # static activation scales are calibrated on calibration_examples training examples.
    # exclude: layer-path patterns left in float.
    c.quant = dict(mode="none", weights="int8", activations="int8", calibration_examples=512,
                   exclude=())
    # PATE (kdjax.privacy). `kdjax train` with teachers=N > 0 trains N teachers on disjoint
    # slices of data.train_split into WORKDIR/teacher_<k>. `kdjax distill` with
    # teacher.aggregation="gnmax" (teacher.workdir = that ensemble) labels the first `queries`
    # (0 = all) examples of public_split by noisy vote: GNMax with noise sigma, or, with
    # threshold > 0, Confident-GNMax (threshold T, check noise sigma1, argmax noise sigma), trains
    # the student on the answered ones with cross-entropy, and reports (epsilon, delta) from
    # Rényi-DP accounting (kdjax.privacy.rdp). "plurality" is the noise-free vote: NOT private,
    # the baseline. public_split and data.eval_split must not overlap.
    c.pate = dict(teachers=0, sigma=40.0, threshold=0.0, sigma1=0.0, delta=1e-5,
                  public_split="test[:5000]", queries=0, vote_batch_size=500)
    # Data-free distillation (kdjax.datafree): `kdjax distill` with method set never reads
    # data.train_split; the student's inputs are synthesised from the teacher (a BatchNorm one).
    # "deepinversion": num_images images optimised against the teacher's BatchNorm statistics
    # and outputs (synthesis_* keys, bn/tv/l2 weights, jitter/flip), then the fused KD step on
    # them. "zskt": a generator (latent_dim, generator_channels, generator_lr) trained against
    # the student, student_steps student steps per generator step, train.steps student steps in
    # all; bn_weight and balance_weight add DeepInversion's and DAFL's priors to its loss.
    # steps_per_call 0 = auto (all iterations in one compiled loop on accelerators, 1 on CPU).
    c.datafree = dict(method="", num_images=2560, synthesis_batch_size=256, synthesis_steps=200,
                      synthesis_lr=0.1, synthesis_steps_per_call=0, bn_weight=1.0,
                      tv_weight=1e-2, l2_weight=1e-4, jitter=2, flip=True, latent_dim=100,
                      generator_channels=(64, 32), generator_lr=1e-3, student_steps=5,
                      balance_weight=0.0)
    # Language models (kdjax.lm; a run is an LM run when model.name is one of kdjax.lm.models'):
    # data.name is a text dataset of `kdjax prepare text`, loss.name "ce" or a token divergence
    # (forward_kl reverse_kl jsd skew_kl skew_reverse_kl tvd) with loss.kwargs temperature /
    # beta / alpha. chunk_size: positions per chunk of the vocabulary-chunked loss (0 = whole
    # [B, T, V] logits). eval_rows: held-out rows evaluated (0 = all). prompts: texts continued
    # by generate_tokens tokens after the final eval (in summary.json), sampled with
    # sample_temperature (0 = greedy), top_k, top_p. cross_tokenizer "next_byte" distils from a
    # teacher with another (byte-level) tokenizer, aligned by byte offsets and compared on the
    # next byte (kdjax.lm.cross_tokenizer); "" refuses one.
    # on_policy (kdjax.lm.onpolicy; `kdjax distill` with an online teacher): with probability
    # fraction (λ in [0, 1]; 0 = supervised distillation only) a step's batch is instead a
    # prompt of each of its rows (plain text: its first prompt_tokens tokens; instruction data:
    # a conversation's prompt of at most prompt_tokens tokens, else the row counts nothing;
    # kdjax.lm.onpolicy) continued by max_new_tokens tokens sampled at temperature (0 =
    # greedy) inside the fused step, and the loss (loss.name's divergence, loss.kwargs) counts
    # the generated tokens only. generator: "student" (on-policy
    # distillation: the student with this step's weights generates, the teacher scores; no CE
    # on the student's own tokens) | "teacher" (sequence-level KD: the teacher generates, the
    # student learns its tokens by CE and its distribution by the divergence).
    # prompt_tokens + max_new_tokens must fit in the data's seq_len.
    c.lm = dict(chunk_size=128, eval_rows=0, prompts=(), generate_tokens=48,
                sample_temperature=0.0, top_k=0, top_p=1.0, cross_tokenizer="",
                on_policy=dict(fraction=0.0, generator="student", prompt_tokens=16,
                               max_new_tokens=16, temperature=1.0))
    return c


def _walk(d: Any, prefix: str = ""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, (dict, ml_collections.ConfigDict)) and path not in FREE_FORM:
            yield from _walk(v, path + ".")
        else:
            yield path, v


def _lookup(schema: ml_collections.ConfigDict, path: str) -> Any:
    node, parts = schema, path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "the top level"
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ValueError(f"unknown config key {path!r}: no {part!r} under {where}; "
                             f"valid keys there: {valid}")
        node = node[part]
    return node


def _coerce(path: str, value: Any, default: Any) -> Any:
    """Return `value` converted to the type of the schema's `default`, or raise naming both."""
    if path in FREE_FORM:
        if not isinstance(value, (dict, ml_collections.ConfigDict)):
            raise TypeError(f"config key {path!r} must be a dict, got {value!r}")
        return dict(value)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise TypeError(f"config key {path!r} must be of type {type(default).__name__} "
                        f"(like its default {default!r}), got {value!r}")
    return value


def validate(config: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
    """Check every key against `base_config()` and return the full, typed config."""
    schema = base_config()
    out = base_config()
    for path, value in _walk(config):
        default = _lookup(schema, path)
        parent, _, leaf = path.rpartition(".")
        target = _lookup(out, parent) if parent else out
        target[leaf] = _coerce(path, value, default)
    return out


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `get_config()` from a Python file, apply `--config.a.b=value` overrides, validate.

    `FILE.py:ARG` calls `get_config(ARG)` (big_vision's convention), e.g. one recipe file for
    several teacher-student pairs: experiments/cifar100/kd.py:resnet32x4-resnet8x4.
    """
    path, arg = os.fspath(path), None
    if not os.path.isfile(path) and ":" in path and os.path.isfile(path.rpartition(":")[0]):
        path, _, arg = path.rpartition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r}: no such file (pass an experiment file, e.g. "
                                f"experiments/fashion_mnist/teacher.py)")
    if not path.endswith(".py"):
        raise ValueError(f"--config {path!r} is not a Python experiment file (.py with a "
                         f"get_config() function, e.g. experiments/fashion_mnist/teacher.py); "
                         f"a run's saved config.json is read with --workdir, by kdjax eval")
    spec = importlib.util.spec_from_file_location("kdjax_experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    # Experiments may import their siblings (kd.py builds on student_scratch.py). Siblings are
    # imported afresh for each load and forgotten after it: folders reuse names (each has a
    # kd.py), and a cached kd from one folder must not serve another's `import kd`.
    folder = os.path.dirname(os.path.abspath(path))
    siblings = {name[:-3] for name in os.listdir(folder) if name.endswith(".py")}
    shadowed = {name: sys.modules.pop(name) for name in siblings if name in sys.modules}
    sys.path.insert(0, folder)
    try:
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001  (an error in the user's experiment file)
            raise ValueError(f"--config {path!r} failed to run ({type(e).__name__}: {e}); fix "
                             f"the experiment file") from e
        if not hasattr(module, "get_config"):
            raise ValueError(f"--config {path!r} defines no get_config() function")
        config = validate(module.get_config() if arg is None else module.get_config(arg))
    finally:
        sys.path.pop(0)
        for name in siblings:
            sys.modules.pop(name, None)
        sys.modules.update(shadowed)
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Apply one `--config.a.b=value` (value parsed as a Python literal, else taken as a string)."""
    key, sep, raw = item.removeprefix("--").partition("=")
    if not key.startswith("config.") or not sep:
        raise ValueError(f"config override {item!r} must look like --config.train.steps=200")
    path = key.removeprefix("config.")
    default = _lookup(base_config(), path)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(default, str):
        value = raw
    parent, _, leaf = path.rpartition(".")
    target = _lookup(config, parent) if parent else config
    target[leaf] = _coerce(path, value, default)


def diff(old: ml_collections.ConfigDict | dict, new: ml_collections.ConfigDict | dict) -> list[str]:
    """The keys whose values differ between two configs, as "key: old -> new" lines."""
    # Through JSON, so that a tuple and the list it was stored as compare equal.
    before, after = (dict(_walk(json.loads(to_json(validate(c))))) for c in (old, new))
    return [f"{k}: {before[k]!r} -> {after[k]!r}" for k in sorted(after) if before[k] != after[k]]


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    return validate(json.loads(text))
