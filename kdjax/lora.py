"""LoRA students (model.lora): low-rank adapters trained on a frozen student initialisation.

Each targeted `nnx.Linear` of the init.workdir student (an imported Hugging Face model or a kdjax
run) becomes a `LoRALinear`: y = x W + b + (alpha / rank) (x A) B. W and b keep their paths
(".../q/kernel") but become `Frozen` variables, not `nnx.Param`, and so does every other weight
of the student (embeddings, norms, head): the step differentiates and the optimizer updates only
the Params, so gradients and optimizer state hold A and B alone. B starts
at zero, so step 0 is the initialisation's own function.

Checkpoints hold the adapters too, not W: a run's "model" item is A, B and the rest of the
student's non-frozen state, and its run record's "lora" names the base (init.workdir, its step,
and the SHA-256 of the frozen weights). A resumed run loads the base from init.workdir again and
refuses it when the hash differs (that run trained on since); so do `kdjax export`, `kdjax eval`
and a teacher read of a LoRA run, which rebuild the base, put the adapters on it and merge them
(W + (alpha / rank) A B), so every reader sees a plain model of the recorded ModelSpec.
`kdjax export --lora separate` writes the adapters alone in PEFT's layout instead.

Flax's own `nnx.LoRA` keeps its base module's kernel an `nnx.Param`, which would train it; hence
this module's layer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import plan as plan_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class Frozen(nnx.Variable):
    """A weight LoRA leaves as it is: not an nnx.Param, so no gradient, optimizer state or
    checkpoint holds it."""


class LoRALinear(nnx.Module):
    """`base` (an nnx.Linear, frozen) plus a rank-`rank` update scaled by alpha / rank.

    Works on a scanned model's stacked layers as well: A and B take the kernel's leading
    [num_layers] axis, and each scan step sees one layer's slice of all three."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        kernel = base.kernel[...]
        *lead, fan_in, fan_out = kernel.shape
        self.kernel = Frozen(kernel)
        self.bias = None if base.bias is None else Frozen(base.bias[...])
        # PEFT's initialisation up to the distribution: A random, B zero.
        self.lora_a = nnx.Param(jax.random.normal(rngs.params(), (*lead, fan_in, rank),
                                                  jnp.float32) / np.sqrt(fan_in))
        self.lora_b = nnx.Param(jnp.zeros((*lead, rank, fan_out), jnp.float32))
        self.scale = alpha / rank
        self.dtype = base.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # as nnx.Linear: its compute dtype, else the promotion of input and weights
        dtype = self.dtype or jnp.result_type(x.dtype, self.kernel.dtype)
        x = x.astype(dtype)
        y = x @ self.kernel[...].astype(dtype)
        y = y + self.scale * ((x @ self.lora_a[...].astype(dtype))
                              @ self.lora_b[...].astype(dtype))
        return y if self.bias is None else y + self.bias[...].astype(dtype)

    def merged_kernel(self) -> jax.Array:
        return self.kernel[...] + self.scale * (self.lora_a[...] @ self.lora_b[...])


def _path(path: tuple) -> str:
    return "/".join(map(str, path))


def check(lora: plan_lib.Lora) -> None:
    """Refuse model.lora's rank and alpha before any I/O."""
    if lora.rank < 0:
        raise ValueError(f"model.lora.rank={lora.rank} must be a positive adapter rank (e.g. 8), "
                         f"or 0 to train every weight")
    if lora.rank and lora.alpha <= 0:
        raise ValueError(f"model.lora.alpha={lora.alpha} must be > 0 (the adapters' output is "
                         f"scaled by alpha / rank; e.g. 2 * rank)")
    if lora.rank and not lora.targets:
        raise ValueError("model.lora.targets=() adapts nothing: give module-path globs, e.g. "
                         "('*attention/q', '*attention/v'), or set model.lora.rank=0")


def match(model: nnx.Module, lora: plan_lib.Lora) -> dict[str, tuple]:
    """{module path: graph path} of the nnx.Linear layers of `model` (abstract is fine) that
    model.lora.targets match; refuses a glob that matches none, listing the model's."""
    check(lora)
    found = {_path(p): p for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)}
    unmatched = [g for g in lora.targets if not fnmatch.filter(found, g)]
    if unmatched:
        raise ValueError(f"model.lora.targets {unmatched} match no nnx.Linear module of the "
                         f"student; its module paths are: {', '.join(found) or 'none'}; use "
                         f"globs of these (e.g. '*attention/q')")
    chosen = {k: p for k, p in found.items() if any(fnmatch.fnmatch(k, g) for g in lora.targets)}
    if "lm_head" in chosen:
        raise ValueError(f"model.lora.targets {list(lora.targets)} match lm_head, the output head "
                         f"that the vocabulary-chunked loss reads as a matrix (an adapter there "
                         f"would not be applied); target the blocks' projections only")
    return chosen


def apply(model: nnx.Module, lora: plan_lib.Lora, *, seed: int) -> list[str]:
    """Replace, in place, each nnx.Linear of `model` that model.lora.targets match (`match`) by
    a LoRALinear; returns the adapted module paths."""
    chosen = match(model, lora)
    rngs = nnx.Rngs(params=seed)
    for name in chosen:
        *parents, last = chosen[name]
        parent = model
        for key in parents:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        wrapped = LoRALinear(parent[last] if isinstance(last, int) else getattr(parent, last),
                             rank=lora.rank, alpha=lora.alpha, rngs=rngs)
        if isinstance(last, int):
            parent[last] = wrapped
        else:
            setattr(parent, last, wrapped)
    # everything else of the student is frozen too: embeddings, norms, the head
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, nnx.Module) and not isinstance(node, LoRALinear):
            for name, value in list(vars(node).items()):
                if isinstance(value, nnx.Param):
                    setattr(node, name, Frozen(value[...]))
    left = [_path(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if p[-1] not in ("lora_a", "lora_b")]
    if left:
        raise ValueError(f"model.lora: the student keeps parameters outside its modules' "
                         f"attributes, which LoRA cannot freeze: {left}; set model.lora.rank=0")
    return list(chosen)


def split_frozen(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(`state` without its Frozen variables, those variables)."""
    frozen, rest = nnx.split_state(state, Frozen, ...)
    return rest, frozen


def join_frozen(state: nnx.State, frozen: nnx.State) -> nnx.State:
    return nnx.merge_state(state, frozen)


def base_hash(model: nnx.Module) -> str:
    """SHA-256 of the frozen weights (paths, dtypes, shapes and bytes), in path order."""
    digest = hashlib.sha256()
    for path, v in sorted(nnx.to_flat_state(nnx.state(model, Frozen)),
                          key=lambda item: tuple(map(str, item[0]))):
        x = np.asarray(jax.device_get(v[...]))
        digest.update(f"{_path(path)}:{x.dtype}:{x.shape};".encode())
        digest.update(np.ascontiguousarray(x).tobytes())
    return digest.hexdigest()


def adapted(model: nnx.Module) -> list[str]:
    """The module paths of `model`'s LoRALinear layers."""
    return [_path(p) for p, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)]


def record(model: nnx.Module, run: plan_lib.RunPlan) -> dict[str, Any]:
    """The run record's "lora": what rebuilds and verifies the frozen base."""
    from kdjax import checkpoint  # noqa: PLC0415  (kdjax.checkpoint imports this module)

    reader = checkpoint.RunReader(run.init.workdir, what="init.workdir")
    try:
        step = reader.resolve_step("latest")
    finally:
        reader.close()
    return {"rank": run.model.lora.rank, "alpha": run.model.lora.alpha, "modules": adapted(model),
            "base": {"workdir": os.path.abspath(run.init.workdir), "step": step,
                     "sha256": base_hash(model)}}


def check_base(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse a base whose weights differ from the ones the adapters were trained on."""
    was, now = saved["base"], current["base"]
    if was["sha256"] != now["sha256"]:
        raise ValueError(
            f"{where} holds LoRA adapters trained on the frozen weights of {was['workdir']} step "
            f"{was['step']} (sha256 {was['sha256'][:12]}), but init.workdir now gives step "
            f"{now['step']} (sha256 {now['sha256'][:12]}): the adapters only fit their own base; "
            f"restore that run's checkpoint {was['step']} (or keep it as the latest), or start "
            f"the LoRA run afresh in a new --workdir")


def merged(model: nnx.Module, spec: Any) -> nnx.Module:
    """`spec`'s plain model (a kdjax.models.ModelSpec) with each LoRALinear's kernel merged,
    W + (alpha / rank) A B, and every other weight `model`'s."""
    kernels = {(*p, "kernel"): node.merged_kernel() for p, node in nnx.iter_graph(model)
               if isinstance(node, LoRALinear)}
    source = dict(nnx.to_flat_state(nnx.state(model)))
    graphdef, abstract = nnx.split(spec.abstract())
    return nnx.merge(graphdef, nnx.from_flat_state(
        [(p, v.replace(kernels[p] if p in kernels else source[p][...]))
         for p, v in nnx.to_flat_state(abstract)]))


def rebuild(run: dict[str, Any], spec: Any, read_adapters) -> nnx.Module:
    """The LoRA student of a checkpoint: its base rebuilt from init.workdir (verified by hash)
    and `read_adapters(target)` (the checkpoint's "model" item read onto `target`) put on it."""
    from kdjax.compress import training  # noqa: PLC0415  (it imports kdjax.checkpoint)

    plan = plan_lib.as_plan(run["config"])
    # model.kwargs {} takes init.workdir's architecture, as the run itself did
    _, model = training.initial_student(plan, dataclasses.replace(spec, kwargs={}))
    check_base(run["lora"], record(model, plan), "this checkpoint")
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    rest, _ = split_frozen(model_state)
    restored = read_adapters({"params": params, "model_state": rest})
    nnx.update(model, restored["params"], restored["model_state"])
    return model


def write_peft(model: nnx.Module, run: dict[str, Any], out: str) -> dict[str, tuple[int, ...]]:
    """The adapters of a LoRA Transformer in PEFT's layout: `out`/adapter_config.json and
    adapter_model.safetensors (lora_A [rank, in], lora_B [out, rank], Hugging Face module names).
    Returns {tensor name: shape}."""
    from kdjax.interop import layouts, state_dict  # noqa: PLC0415  (torch-facing, on demand)

    tensors, modules = {}, []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, LoRALinear):
            continue
        a, b = np.asarray(node.lora_a[...]), np.asarray(node.lora_b[...])
        # a scanned model's stacked layers are written one layer each, as Hugging Face has them
        stacked = a.ndim == 3
        for i in range(a.shape[0]) if stacked else (None,):
            where = list(map(str, path))
            if stacked:
                where.insert(1, str(i))
            name = layouts.hf_module_name(".".join(where))
            modules.append(name)
            tensors[f"base_model.model.{name}.lora_A.weight"] = (a[i] if stacked else a).T.copy()
            tensors[f"base_model.model.{name}.lora_B.weight"] = (b[i] if stacked else b).T.copy()
    lora = run["lora"]
    base = run.get("hf", {}).get("dir") or lora["base"]["workdir"]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"],
              "lora_alpha": lora["alpha"], "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(modules), "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
              "base_model_name_or_path": base, "revision": None}
    state_dict.write_safetensors(os.path.join(out, ADAPTER_WEIGHTS), tensors, {"format": "pt"})
    with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return {k: v.shape for k, v in tensors.items()}


def export_separate(workdir: str, out: str, *, step: str | int = "latest") -> str:
    """`kdjax export --lora separate`: the adapters of the LoRA run `workdir` alone, in PEFT's
    layout (`write_peft`), written whole or not at all."""
    from kdjax import checkpoint  # noqa: PLC0415  (kdjax.checkpoint imports this module)
    from kdjax.models import ModelSpec  # noqa: PLC0415

    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists; pick a new path (an export never "
                         f"overwrites anything)")
    reader = checkpoint.RunReader(workdir)
    try:
        n = reader.resolve_step(step)
        run = reader.run_meta(n)
        if "lora" not in run:
            raise ValueError(f"--lora separate writes a LoRA run's adapters; {workdir!r} trained "
                             f"every weight (model.lora.rank=0): export it without --lora")
        spec = ModelSpec.from_json(run["model"])
        model = reader.load_lora(n, spec)
    finally:
        reader.close()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.tmp-")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the export private to this user
        write_peft(model, run, tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
