"""A PyTorch `nn.Module` as a pure JAX function of its weights (through torchax), and as a Flax
NNX model, so that a torch-defined network is a teacher or a student of the fused step.

How: torchax runs the module's forward with its parameters and buffers swapped for torchax
tensors that wrap JAX arrays (`torch.nn.utils.stateless._reparametrize_module`), so every aten op
becomes a JAX op of the trace that `jax.jit` compiles. The torch module itself is only a recipe
read while tracing; its own tensors are never used after the weights are taken from it.

What torchax 0.0.13 does not do as PyTorch does, and is done here:
- BatchNorm in train mode: torchax computes the new running statistics and drops them, and
  would update the variance with the biased estimate. `_batch_norm` replaces the two aten ops
  BatchNorm reaches: it writes the statistics back into the buffers, with PyTorch's momentum
  rule and the unbiased batch variance (n / (n - 1)), as `torch.nn.BatchNorm2d` does.
- 2-D convolutions: lowered in NHWC through kdjax.conv, as kdjax's own layers are (`_convolution`).
- an op without a JAX lowering surfaces as torchax's `OperatorNotFound` deep inside the trace;
  here it is reported with the op's name and the module path where it occurred (`TorchOpError`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchax
import torchax.tensor
from torchax.ops import jaten
from flax import nnx
from torch.nn.utils import stateless

from kdjax import conv as conv_lib, models

__all__ = ["TorchOpError", "Buffer", "TorchModel", "from_module", "load_factory",
           "build_module", "state_arrays"]

Arrays = dict[str, jax.Array]


class TorchOpError(ValueError):
    """A PyTorch op that torchax cannot lower, with the module path where the forward met it."""


class Buffer(nnx.Variable):
    """A PyTorch buffer (BatchNorm statistics, counters, constants): state, never trained."""


class DropoutKey(nnx.Variable):
    """The raw uint32 key data dropout draws from; split at every training call (raw data, not a
    typed key, so that it checkpoints like any array)."""


def _env() -> torchax.tensor.Environment:
    env = torchax.default_env()
    if not getattr(env, "_kdjax_ops", False):
        for op in (torch.ops.aten.native_batch_norm.default,
                   torch.ops.aten._native_batch_norm_legit.default):
            env.override_op_definition(op, _batch_norm)
        env.override_op_definition(torch.ops.aten.convolution.default, _convolution)
        env.override_op_definition(torch.ops.aten.conv2d.default, _conv2d)
        env._kdjax_ops = True
    return env


def _conv2d(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
            groups=1):
    return _convolution(input, weight, bias, stride, padding, dilation, False, (0, 0), groups)


def _convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                 groups):
    """aten.convolution on torchax tensors: a 2-D one through kdjax.conv, in NHWC.

    torchax lowers PyTorch's NCHW convolution as it is; XLA:CPU runs the small-map and depthwise
    convolutions that kdjax.conv computes as matrix products and shifted sums one to two orders of
    magnitude slower (torchvision's resnet18 at 64 px: 10x slower forward than kdjax's own
    resnet18). Transposing to NHWC around kdjax.conv gives the torch-defined model the same
    program as the native one; other backends get XLA's convolution in NHWC (transposes between
    consecutive layers cancel). Transposed, 1-D/3-D and unbatched convolutions stay torchax's.
    """
    env = _env()
    x, w = input.jax(), weight.jax()
    b = None if bias is None else bias.jax()
    pads = [int(p) for p in padding] if not isinstance(padding, str) else []
    if transposed or x.ndim != 4 or w.ndim != 4 or len(pads) != 2:
        return env.j2t_iso(jaten._aten_convolution(x, w, b, stride, padding, dilation, transposed,
                                                   output_padding, groups))
    y = conv_lib.conv_general_dilated(
        jnp.transpose(x, (0, 2, 3, 1)), jnp.transpose(w, (2, 3, 1, 0)), tuple(stride),
        [(p, p) for p in pads], rhs_dilation=tuple(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    if b is not None:
        y = y + b.astype(y.dtype)
    return env.j2t_iso(jnp.transpose(y, (0, 3, 1, 2)))


def _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """aten.native_batch_norm / _native_batch_norm_legit on torchax tensors, with PyTorch's
    running-statistics update written into the buffers (see the module docstring)."""
    env = _env()
    x = input.jax()
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)  # statistics in float32 at least
    xf = x.astype(stats_dtype)
    if training or running_mean is None:
        mean = xf.mean(axes)
        var = xf.var(axes)
        if training and running_mean is not None:
            n = x.size // x.shape[1]
            unbiased = var * (n / max(n - 1, 1))
            rm, rv = running_mean.jax(), running_var.jax()
            running_mean._elem = ((1 - momentum) * rm + momentum * mean).astype(rm.dtype)
            running_var._elem = ((1 - momentum) * rv + momentum * unbiased).astype(rv.dtype)
    else:
        mean = running_mean.jax().astype(stats_dtype)
        var = running_var.jax().astype(stats_dtype)
    rstd = jax.lax.rsqrt(var + eps)
    y = (xf - mean.reshape(shape)) * rstd.reshape(shape)
    if weight is not None:
        y = y * weight.jax().astype(stats_dtype).reshape(shape)
    if bias is not None:
        y = y + bias.jax().astype(stats_dtype).reshape(shape)
    saved = (mean, rstd) if training else (jnp.zeros((0,), x.dtype), jnp.zeros((0,), x.dtype))
    return env.j2t_iso((y.astype(x.dtype), *saved))


def load_factory(factory: str, *, what: str = "--torch") -> Callable[..., torch.nn.Module]:
    """The callable `package.module:attr` names (attr may be dotted: `Class.from_config`)."""
    module_name, colon, attr = factory.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"{what} {factory!r} is not 'package.module:callable'; e.g. "
                         f"{what} timm:create_model or {what} torchvision.models:resnet50")
    obj = models.import_named(module_name, f"{what} {factory!r}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {factory!r}: {module_name!r} has no attribute {attr!r}; "
                             f"name a callable that returns a torch.nn.Module")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {factory!r} is a {type(obj).__name__}, not a callable")
    return obj


def build_module(factory: str, kwargs: Mapping[str, Any] | None = None, *, seed: int = 0,
                 what: str = "--torch") -> torch.nn.Module:
    """`factory(**kwargs)` in eval mode, its random initialisation drawn from `seed` (the torch
    global generator is restored afterwards)."""
    fn = load_factory(factory, what=what)
    kwargs = dict(kwargs or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = fn(**kwargs)
        except TypeError as e:
            flag = "--torch-kwargs" if what == "--torch" else f"{what}_kwargs"
            raise ValueError(f"{what} {factory!r} rejected the arguments ({flag}) "
                             f"{json.dumps(kwargs)}: {e}") from None
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"{what} {factory!r} returned a {type(module).__name__}, not a "
                         f"torch.nn.Module")
    return module.eval()


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` takes the keyword argument `name` (by name or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: offer nothing it may refuse
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _draw_seed(rngs: nnx.Rngs | None) -> int:
    """The torch initialisation's seed, drawn from the run's `rngs` so that each run seed gives
    its own student. Under nnx.eval_shape (a restore target) the draw is abstract, and only the
    shapes matter there."""
    if rngs is None:
        return 0
    draw = jax.random.randint(rngs.params(), (), 0, 2**31 - 1)
    return 0 if isinstance(draw, jax.core.Tracer) else int(draw)


def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """Every name of a tensor that is registered under several names (tied weights) -> the first
    one, which alone holds the array."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if id(t) in first and first[id(t)] != name:
            out[name] = first[id(t)]
        first.setdefault(id(t), name)
    return out


def state_arrays(module: torch.nn.Module) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(parameters, buffers) of `module` as numpy arrays by their state_dict names: the floating
    parameters train; buffers (non-persistent ones included: the forward reads them) and any
    integer parameter do not. Tied tensors appear once, under their first name."""
    params, buffers = {}, {}
    for name, p in module.named_parameters():
        (params if p.is_floating_point() else buffers)[name] = p.detach().cpu().numpy()
    for name, b in module.named_buffers():
        buffers[name] = b.detach().cpu().numpy()
    return params, buffers


@contextlib.contextmanager
def _watch(module: torch.nn.Module, taps: Sequence[str]) -> Iterator[dict[str, list]]:
    """Hooks on every sub-module: the path of the module running (for errors) and the outputs of
    the ones in `taps`."""
    stack: list[str] = []
    recorded: dict[str, list] = {t: [] for t in taps}
    handles = []

    def enter(path):
        return lambda mod, args: stack.append(path)

    def leave(path):
        def hook(mod, args, out):
            stack.pop()
            if path in recorded:
                recorded[path].append(out)
        return hook

    try:
        for path, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(enter(path)))
            handles.append(sub.register_forward_hook(leave(path)))
        try:
            yield recorded
        except torchax.tensor.OperatorNotFound as e:
            where = stack[-1] if stack else ""
            kind = type(module.get_submodule(where)).__name__
            raise TorchOpError(
                f"torchax cannot lower a PyTorch op used by module {where or '<root>'!r} "
                f"({kind}) of {type(module).__name__}: {e}; replace that layer, or register a "
                f"JAX implementation with torchax.default_env().override_op_definition"
            ) from None
    finally:
        for h in handles:
            h.remove()


def _logits(out: Any) -> Any:
    """The logits of what a forward returns: a tensor, a Hugging Face output's `.logits`, or the
    first element of a tuple."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def functional_call(module: torch.nn.Module, params: Mapping[str, jax.Array],
                    buffers: Mapping[str, jax.Array], args: Sequence[Any], *, train: bool,
                    key: jax.Array | None = None, taps: Sequence[str] = (),
                    kwargs: Mapping[str, Any] | None = None
                    ) -> tuple[Any, Arrays, dict[str, Any]]:
    """`module(*args, **kwargs)` as JAX: (output, buffers after the call, {tap: output of that
    module}).

    The arrays are in PyTorch's layouts (NCHW). `train` sets the module's mode for this call;
    `key` is what dropout and other random ops draw from (required for them in train mode).
    """
    env = _env()
    aliases = tied_aliases(module)
    tensors = env.j2t_iso({**params, **buffers})
    tensors.update({alias: tensors[name] for alias, name in aliases.items() if name in tensors})
    module.train(train)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(env)
            if key is not None:
                stack.enter_context(env.override_property(prng=key))
            recorded = stack.enter_context(_watch(module, taps))
            stack.enter_context(stateless._reparametrize_module(module, tensors))
            out = module(*env.j2t_iso(tuple(args)), **env.j2t_iso(dict(kwargs or {})))
    finally:
        module.eval()
    new_buffers = {k: tensors[k].jax() for k in buffers}
    tapped = {t: outs[-1] for t, outs in recorded.items() if outs}
    return env.t2j_iso(out), new_buffers, env.t2j_iso(tapped)


def from_module(module: torch.nn.Module, example_input: Any) -> tuple[Arrays, Arrays, Callable]:
    """A PyTorch module as `(params, buffers, apply_fn)` for your own JAX training code.

    `params` are the floating parameters (differentiate and update these), `buffers` the rest
    (BatchNorm statistics, counters), both {state_dict name: jax.Array}. Then

        out, new_buffers = apply_fn(params, buffers, x, train=False, key=None)

    is the module's forward as a pure JAX function (jit, grad, vmap it): `x` in the module's own
    layout (NCHW images), `train=True` runs training mode (BatchNorm returns its updated running
    statistics in `new_buffers`, with PyTorch's momentum rule; dropout draws from `key`).
    `example_input` (a torch tensor or array) is traced once here, so that an op torchax cannot
    lower is refused now (TorchOpError, naming the op and the module path) rather than later.
    """
    params_np, buffers_np = state_arrays(module)
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    buffers = {k: jnp.asarray(v) for k, v in buffers_np.items()}

    def apply_fn(params: Mapping[str, jax.Array], buffers: Mapping[str, jax.Array], *args: Any,
                 train: bool = False, key: jax.Array | None = None) -> tuple[Any, Arrays]:
        out, new_buffers, _ = functional_call(module, params, buffers, args, train=train, key=key)
        return out, new_buffers

    x = example_input.detach().cpu().numpy() if isinstance(example_input, torch.Tensor) \
        else np.asarray(example_input)
    jax.eval_shape(lambda p, b, x: apply_fn(p, b, x), params, buffers,
                   jax.ShapeDtypeStruct(x.shape, x.dtype))
    return params, buffers, apply_fn


_RECIPES: dict[str, torch.nn.Module] = {}


def _recipe(factory: str, kwargs: Mapping[str, Any], built: torch.nn.Module) -> torch.nn.Module:
    """One module object per (factory, kwargs) in a process.

    The module is only the recipe its forward is traced from (its weights live in the NNX
    variables), and it is part of the model's static structure: two TorchModels of one
    architecture must hold the same object for their GraphDefs to be equal (a PATE ensemble
    stacks its teachers into one vmapped forward, which needs one GraphDef)."""
    key = json.dumps([factory, kwargs], sort_keys=True, default=repr)
    return _RECIPES.setdefault(key, built)


def _nest(flat: Mapping[str, Any], wrap: Callable[[Any], nnx.Variable]) -> nnx.Dict:
    """{"a.b.c": v} -> nnx.Dict(a=nnx.Dict(b=nnx.Dict(c=wrap(v)))): state_dict names as NNX paths
    (nested rather than dotted keys, which checkpoint path formats would split)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = wrap(value)

    def build(node):
        return nnx.Dict({k: build(v) if isinstance(v, dict) else v for k, v in node.items()})

    return build(tree)


def _flat(tree: nnx.Dict, prefix: str = "") -> dict[str, jax.Array]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, nnx.Dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v[...]
    return out


def _nhwc(x: Any) -> Any:
    """A tap's value in kdjax's channels-last layout (4-D NCHW feature maps only)."""
    return jax.tree.map(lambda a: jnp.moveaxis(a, 1, -1) if a.ndim == 4 else a, x)


class TorchModel(nnx.Module):
    """A PyTorch module built by `factory(**factory_kwargs)` as a Flax NNX model.

    Its floating parameters are `nnx.Param`s (what optax trains), its buffers `Buffer`s (updated
    by the forward in train mode, as PyTorch does, never by the optimizer), both nested by their
    state_dict names. `__call__(x, train=...)` takes NHWC images (kdjax's layout; transposed to
    the NCHW the module expects inside the compiled program) or token ids and returns the logits.
    `features()` adds the output of every sub-module by its PyTorch module path ("layer3",
    "blocks.5"), feature maps as NHWC, for the feature methods' taps. Dropout draws from the
    model's own key, split at every training call and kept in the model's state (checkpointed).

    The torch module is part of the static structure (the GraphDef), never of the state: a run
    records `factory` and `factory_kwargs` (its ModelSpec) and rebuilds the module from the
    user's installed code.
    """

    def __init__(self, factory: str, factory_kwargs: Mapping[str, Any] | None = None, *,
                 num_classes: int | None = None, seed: int | None = None,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        factory_kwargs = dict(factory_kwargs or {})
        # The dataset's class count reaches a factory that takes one and was not given it
        # (timm's create_model, torchvision's and most users' classifiers), as a zoo model's does.
        if (num_classes is not None and "num_classes" not in factory_kwargs
                and _accepts(load_factory(factory, what="model.torch"), "num_classes")):
            factory_kwargs["num_classes"] = int(num_classes)
        if seed is None:
            seed = _draw_seed(rngs)
        module = build_module(factory, factory_kwargs, seed=seed, what="model.torch")
        params, buffers = state_arrays(module)
        self.module = _recipe(factory, factory_kwargs, module)
        self.factory = factory
        self.factory_kwargs = factory_kwargs
        self.dtype = jnp.dtype(dtype)
        self.paths = tuple(p for p, _ in module.named_modules() if p)
        self.params = _nest(params, lambda v: nnx.Param(jnp.asarray(v)))
        self.buffers = _nest(buffers, lambda v: Buffer(jnp.asarray(v)))
        key = rngs.dropout() if rngs is not None else jax.random.key(seed)
        self.dropout_key = DropoutKey(jax.random.key_data(key))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return ("logits", *self.paths)

    def kernel_paths(self) -> tuple[tuple[str, ...], ...]:
        """The state paths of the Linear and convolution weights: what unstructured pruning
        prunes (embeddings and norms, also called "weight" in PyTorch, are not kernels)."""
        kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
        return tuple(("params", *name.split(".")) for name, p in self.module.named_parameters()
                     if name.endswith("weight") and p.ndim >= 2 and isinstance(
                         self.module.get_submodule(name.rpartition(".")[0]), kinds))

    def _run(self, x: jax.Array, *, train: bool, taps: Sequence[str],
             kwargs: Mapping[str, Any] | None = None) -> tuple[Any, dict]:
        if x.ndim == 4:
            x = jnp.moveaxis(x, -1, 1)  # NHWC -> NCHW
        params = _flat(self.params)
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(self.dtype)
        if self.dtype != jnp.float32:
            params = jax.tree.map(lambda p: p.astype(self.dtype), params)
        key = None
        if train:
            key, new = jax.random.split(jax.random.wrap_key_data(self.dropout_key[...]))
            self.dropout_key[...] = jax.random.key_data(new)
        out, buffers, tapped = functional_call(self.module, params, _flat(self.buffers), (x,),
                                               train=train, key=key, taps=taps,
                                               kwargs=kwargs)
        if train:
            for name, value in buffers.items():
                node = self.buffers
                *parents, leaf = name.split(".")
                for p in parents:
                    node = node[p]
                node[leaf][...] = value
        return _logits(out), tapped

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if not isinstance(x.shape[0], int):
            return self._symbolic_batch(x, train=train)
        return self._run(x, train=train, taps=())[0]

    def _symbolic_batch(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Inference on a batch of symbolic size (jax.export, kdjax's stablehlo export).

        torchax gives a symbolic dimension the size 1 on the torch side, so a decomposition that
        reads sizes computes silently wrong values (GroupNorm normalised over the wrong groups:
        0.19 relative error). In inference each example is independent, so the forward runs on
        one example of concrete shape and jax.vmap batches it, symbolically and exactly.
        """
        if train or not all(isinstance(d, int) for d in x.shape[1:]):
            raise ValueError(f"a PyTorch model runs on a symbolic batch only in inference and "
                             f"with concrete image sizes, got input shape {x.shape} "
                             f"(train={train})")
        return jax.vmap(lambda one: self._run(one[None], train=False, taps=())[0][0])(x)

    def features(self, x: jax.Array, *, train: bool = False) -> dict[str, Any]:
        logits, tapped = self._run(x, train=train, taps=self.paths)
        return {"logits": logits, **{k: _nhwc(v) for k, v in tapped.items()}}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The weights by their PyTorch names, for `module.load_state_dict` (tied names included,
        non-persistent buffers not)."""
        flat = {**_flat(self.params), **_flat(self.buffers)}
        flat.update({alias: flat[name] for alias, name in tied_aliases(self.module).items()})
        # In PyTorch's dtypes: JAX without x64 holds int64 counters as int32.
        return {k: np.asarray(flat[k]).astype(jnp.dtype(str(t.dtype).removeprefix("torch.")))
                for k, t in self.module.state_dict().items()}
