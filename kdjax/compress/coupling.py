"""Which channels must be pruned together, derived from the model's own forward pass (DepGraph).

Fang et al. (2023), "DepGraph: Towards Any Structural Pruning": removing channel c of one layer's
output also removes input c of every layer that reads it, the BatchNorm entries of that channel,
and, when the tensor is added to others (a residual sum), channel c of every tensor in that sum
and of every layer producing them. Those parameter slices form one group, pruned as a whole.

kdjax derives the groups by tracing: `jax.make_jaxpr` of the model's forward as a function of
every array of its NNX state, then one pass over the equations that gives each axis of each value
one of three annotations:

- free (None): the values do not vary along the axis (a broadcast, a size-1 axis);
- OPAQUE: data that is not a prunable channel space (the batch, pixels, the input's channels);
- a Layout: channel spaces laid out along the axis, as pieces (dim, outer, inner): index
  (o * size + c) * inner + r of the piece carries channel c of `dim` (a flattened NHWC map before
  a Dense is one piece with outer = H * W; a concatenation is several pieces).

Every parameter axis starts as its own dim. A convolution's or matrix product's output feature
axis is its kernel's output axis; the contracted axes of both operands are unified; elementwise
operands' aligned axes are unified (union-find: this is what couples a residual stream);
broadcasts, reshapes, transposes, concatenations and pooling map axes. Unifying a channel dim with
OPAQUE data (the model's input or output, a convolution window, a reduction over channels, an op
the pass does not follow) blocks the whole group: it stays dense, and its layers are reported
with the reason.

Why removing a group's channels is exact: every Param slice in the group is masked to 0, so each
channel's contribution to anything outside the group passes through a masked kernel entry (a
contraction with a parameter whose axis is in the group), and the ops that would mix channels
otherwise (reductions over them, contractions between two activations, unknown ops) block it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import conv as conv_lib
from kdjax import taps

Path = tuple
OPAQUE = "opaque"
Piece = tuple[int, int, int]  # (dim, outer, inner)

OUTPUT = "its channels are the model's output"
UNFOLLOWED = "which the channel tracer does not follow"

_ELEMENTWISE = frozenset([
    "add", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem", "and", "or", "xor", "not",
    "ne", "eq", "lt", "le", "gt", "ge", "select_n", "clamp", "nextafter", "add_any", "integer_pow",
    "neg", "abs", "sign", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos",
    "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt",
    "cbrt", "erf", "erfc", "erf_inv", "square", "floor", "ceil", "round", "is_finite",
    "convert_element_type", "copy", "copy_p", "reduce_precision", "real", "imag", "stop_gradient"
])
_REDUCE = frozenset([
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax",
    "argmin"
])
_CUMULATIVE = frozenset([
    "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"
])
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
# A parameter passes unchanged through these (a cast to the compute dtype, BatchNorm's reshape
# of its scale): the result is still that parameter for the "contraction with a parameter" rule.
_PARAM_VIEWS = frozenset([
    "convert_element_type", "copy", "reshape", "transpose", "broadcast_in_dim"
])


@dataclasses.dataclass(frozen=True)
class Member:
    """One array's slice in a group: along `axis`, the piece starting at `offset` holds `outer`
    blocks of the group's `size` channels, each channel repeated `inner` times."""

    path: Path
    axis: int
    offset: int = 0
    outer: int = 1
    inner: int = 1
    param: bool = True  # False: a BatchNorm statistic (sliced when shrinking, never masked)

    def channel_map(self, length: int, size: int) -> np.ndarray:
        """For each index along the axis, the channel it holds, or -1 outside this piece."""
        out = np.full(length, -1, np.int64)
        span = np.arange(self.outer * size * self.inner)
        out[self.offset:self.offset + span.size] = (span // self.inner) % size
        return out


@dataclasses.dataclass(frozen=True)
class Coupled:
    """A group: `size` channels, `members` pruned together, `producers` the layers whose
    output axis it is (in forward order; the first names the group)."""

    name: str
    size: int
    members: tuple[Member, ...]
    producers: tuple[Path, ...]


@dataclasses.dataclass(frozen=True)
class Coupling:
    """The model's prunable groups, and the layers whose output channels stay dense: layer
    path -> why (`unfollowed` holds those an op the tracer cannot follow blocked)."""

    groups: tuple[Coupled, ...]
    refused: dict[str, str]
    unfollowed: dict[str, str]


def layer_name(path: Path) -> str:
    return "/".join(str(p) for p in path)


def key_path(path) -> Path:
    # nnx.State leaves are Variables: drop the trailing attribute that holds the array.
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def trace(model: nnx.Module, input_shape: Sequence[int], batch: int = 1
          ) -> tuple[jax.extend.core.ClosedJaxpr, list[Path], list[nnx.Variable]]:
    """The jaxpr of `model`'s inference forward as a function of every array of its state and,
    last, a batch of images, with the state's paths and Variables in argument order. The model may be
    abstract (nnx.eval_shape)."""
    graphdef, state = nnx.split(model)
    flat, _ = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    variables = [v for _, v in flat]
    leaves, leaf_def = jax.tree.flatten(state)

    def forward(*arrays):
        m = nnx.merge(graphdef, jax.tree.unflatten(leaf_def, arrays[:-1]))
        # Inference mode: a Dropout's random mask would be data with no channel structure.
        return taps.call(m, arrays[-1], train=False)

    # kdjax.conv rewrites some CPU convolutions as patches and matrix products, which would hide
    # the kernel's axes; the native convolution is the same function of the same kernel.
    with conv_lib.native():
        closed = jax.make_jaxpr(forward)(*leaves, jnp.zeros((batch, *input_shape), jnp.float32))
    return closed, [key_path(p) for p, _ in flat], variables


class _Tracer:
    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fresh: list[bool] = []  # never unified: a parameter axis that may adopt a layout
        self.derived: dict[int, tuple[Piece, ...]] = {}
        self.blocked: dict[int, str] = {}
        self.producer_dims: list[int] = []
        self.env: dict = {}
        self.param_vars: set = set()

    # -- union-find over channel dims ----------------------------------------------------------
    def new_dim(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fresh.append(True)
        return len(self.parent) - 1

    def find(self, d: int) -> int:
        while self.parent[d] != d:
            self.parent[d] = self.parent[self.parent[d]]
            d = self.parent[d]
        return d

    def resolve(self, layout: tuple[Piece, ...]) -> tuple[Piece, ...] | None:
        """The layout in root dims (a dim that adopted a layout is replaced by it); None when a
        substitution cannot be written as pieces."""
        out = []
        for d, o, i in layout:
            r = self.find(d)
            if r not in self.derived:
                out.append((r, o, i))
                continue
            sub = self.resolve(self.derived[r])
            if sub is None:
                return None
            if o == 1 and i == 1:
                out.extend(sub)
            elif len(sub) == 1:
                (d2, o2, i2), = sub
                out.append((d2, o * o2, i2 * i))
            else:
                return None
        return tuple(out)

    def dims_of(self, layout: tuple[Piece, ...]) -> list[int]:
        resolved = self.resolve(layout)
        if resolved is None:
            return [self.find(d) for d, _, _ in layout]
        return [d for d, _, _ in resolved]

    def block(self, ann, reason: str) -> None:
        if isinstance(ann, tuple):
            for d in self.dims_of(ann):
                self.blocked.setdefault(self.find(d), reason)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        self.fresh[a] = self.fresh[b] = False
        if a == b:
            return
        self.parent[b] = a
        if b in self.blocked:
            self.blocked.setdefault(a, self.blocked.pop(b))

    def unify(self, a, b, why: str):
        """The annotation of an axis along which values annotated `a` and `b` are combined."""
        if a is None:
            return b
        if b is None:
            return a
        if a == OPAQUE or b == OPAQUE:
            reason = (f"{why} combines its channels with data that has no channel structure "
                      f"(the model's input, pixels, a constant)")
            self.block(a, reason)
            self.block(b, reason)
            return OPAQUE
        ra, rb = self.resolve(a), self.resolve(b)
        if ra is not None and rb is not None:
            if len(ra) == len(rb) and all(
                    (oa, ia, self.size[da]) == (ob, ib, self.size[db])
                    for (da, oa, ia), (db, ob, ib) in zip(ra, rb)):
                for (da, _, _), (db, _, _) in zip(ra, rb):
                    self.union(da, db)
                return ra
            for fresh, other in ((ra, rb), (rb, ra)):
                if len(fresh) == 1 and fresh[0][1:] == (1, 1) and self.fresh[fresh[0][0]]:
                    self.derived[fresh[0][0]] = other
                    self.fresh[fresh[0][0]] = False
                    return other
        self.block(a, f"{why}: its channels are laid out differently there")
        self.block(b, f"{why}: its channels are laid out differently there")
        return OPAQUE

    # -- annotations of values -----------------------------------------------------------------
    def is_param(self, v) -> bool:
        """Whether `v` is a parameter (or a cast or reshape of one); a literal never is."""
        return not isinstance(v, jax.extend.core.Literal) and v in self.param_vars

    def ann(self, v) -> list:
        if isinstance(v, jax.extend.core.Literal):
            return [None] * np.ndim(v.val)
        return self.env[v]

    def set(self, v, anns: list) -> None:
        self.env[v] = [None if s == 1 else a for s, a in zip(v.aval.shape, anns)]

    def opaque(self, v) -> list:
        return [OPAQUE] * len(v.aval.shape)

    # -- the pass ------------------------------------------------------------------------------
    def run(self, jaxpr, in_anns: list[list], const_anns: list[list]) -> list[list]:
        for v, a in zip(jaxpr.constvars, const_anns):
            self.set(v, a)
        for v, a in zip(jaxpr.invars, in_anns):
            self.set(v, a)
        for eqn in jaxpr.eqns:
            self.equation(eqn)
        return [self.ann(v) for v in jaxpr.outvars]

    def equation(self, eqn) -> None:
        name = eqn.primitive.name
        ins = [self.ann(v) for v in eqn.invars]
        outs = eqn.outvars
        if name in _PARAM_VIEWS and any(self.is_param(v) for v in eqn.invars):
            self.param_vars.update(outs)
        handler = _HANDLERS.get(name)
        if name in _CALLS and _CALLS[name] in eqn.params:
            sub = eqn.params[_CALLS[name]]
            closed = sub if hasattr(sub, "jaxpr") else None
            inner = closed.jaxpr if closed is not None else sub
            consts = [[OPAQUE] * np.ndim(c) for c in (closed.consts if closed else [])]
            for outer_v, inner_v in zip(eqn.invars, inner.invars):
                if self.is_param(outer_v):
                    self.param_vars.add(inner_v)
            results = self.run(inner, ins, consts)
            for v, a in zip(outs, results):
                self.set(v, a)
            for outer_v, inner_v in zip(outs, inner.outvars):
                if self.is_param(inner_v):
                    self.param_vars.add(outer_v)
        elif name in _ELEMENTWISE:
            out = outs[0]
            anns = []
            for k, s in enumerate(out.aval.shape):
                a = None
                for v, ann in zip(eqn.invars, ins):
                    if len(ann) == len(out.aval.shape) and v.aval.shape[k] == s:
                        a = self.unify(a, ann[k], f"{name}")
                anns.append(a)
            for v in outs:
                self.set(v, anns)
        elif name in _REDUCE:
            self._reduce(eqn, ins, eqn.params["axes"], name)
        elif name in _CUMULATIVE:
            self._cumulative(eqn, ins, name)
        elif handler is not None:
            handler(self, eqn, ins)
        else:
            self._unknown(eqn, ins)

    def _broadcast_in_dim(self, eqn, ins):
        out = eqn.outvars[0]
        shape, src = out.aval.shape, eqn.invars[0].aval.shape
        anns = [None] * len(shape)
        for j, d in enumerate(eqn.params["broadcast_dimensions"]):
            if src[j] == shape[d]:
                anns[d] = ins[0][j]
        self.set(out, anns)

    def _transpose(self, eqn, ins):
        self.set(eqn.outvars[0], [ins[0][p] for p in eqn.params["permutation"]])

    def _squeeze(self, eqn, ins):
        drop = {d % len(ins[0]) for d in eqn.params["dimensions"]}
        self.set(eqn.outvars[0], [a for k, a in enumerate(ins[0]) if k not in drop])

    def _reshape(self, eqn, ins):
        out = eqn.outvars[0]
        if eqn.params.get("dimensions") is not None:
            return self._unknown(eqn, ins)
        a_shape, b_shape = eqn.invars[0].aval.shape, out.aval.shape
        a_idx = [k for k, s in enumerate(a_shape) if s != 1]
        b_idx = [k for k, s in enumerate(b_shape) if s != 1]
        anns = [None] * len(b_shape)
        i = j = 0
        while i < len(a_idx):
            gi, gj, pa, pb = [a_idx[i]], [], a_shape[a_idx[i]], 1
            i += 1
            while pa != pb:
                if pb < pa:
                    gj.append(b_idx[j])
                    pb *= b_shape[b_idx[j]]
                    j += 1
                else:
                    gi.append(a_idx[i])
                    pa *= a_shape[a_idx[i]]
                    i += 1
            for k, a in zip(gj, self._regroup([ins[0][k] for k in gi],
                                              [a_shape[k] for k in gi],
                                              [b_shape[k] for k in gj])):
                anns[k] = a
        self.set(out, anns)

    def _regroup(self, anns: list, sizes: list[int], new_sizes: list[int]) -> list:
        """Annotations of axes `new_sizes` that hold the same elements as axes `sizes`."""
        layouts = [k for k, a in enumerate(anns) if isinstance(a, tuple)]
        if not layouts:
            rest = OPAQUE if OPAQUE in anns else None
            return [rest] * len(new_sizes)
        why = "a reshape that splits or merges channel axes"
        if len(anns) == 1 == len(new_sizes):
            return anns
        if len(layouts) == 1 and len(new_sizes) == 1:  # a flatten: other axes repeat the channels
            k = layouts[0]
            outer, inner = int(np.prod(sizes[:k])), int(np.prod(sizes[k + 1:]))
            pieces = self.resolve(anns[k])
            if pieces is not None and (len(pieces) == 1 or outer == 1):
                return [tuple((d, outer * o, i * inner) for d, o, i in pieces)]
        if len(anns) == 1:  # an unflatten: find the axis that holds the channels
            pieces = self.resolve(anns[0])
            if pieces is not None and len(pieces) == 1:
                d, o, i = pieces[0]
                for q in range(len(new_sizes)):
                    if (int(np.prod(new_sizes[:q])), new_sizes[q],
                            int(np.prod(new_sizes[q + 1:]))) == (o, self.size[d], i):
                        return [((d, 1, 1),) if k == q else OPAQUE
                                for k in range(len(new_sizes))]
        for a in anns:
            self.block(a, why)
        return [OPAQUE] * len(new_sizes)

    def _reduce(self, eqn, ins, axes, name):
        for k in axes:
            self.block(ins[0][k], f"a reduction over channels ({name})")
        out = eqn.outvars[0]
        self.set(out, [a for k, a in enumerate(ins[0]) if k not in set(axes)])

    def _cumulative(self, eqn, ins, name):
        anns = list(ins[0])
        axis = eqn.params["axis"]
        self.block(anns[axis], f"a cumulative {name} over channels")
        anns[axis] = OPAQUE
        self.set(eqn.outvars[0], anns)

    def _unknown(self, eqn, ins):
        for a in ins:
            for x in a:
                self.block(x, f"the operation {eqn.primitive.name!r}, {UNFOLLOWED}")
        for v in eqn.outvars:
            self.set(v, self.opaque(v))

    def _windowed(self, eqn, ins, unchanged: list[bool], what: str):
        anns = list(ins[0])
        for k, same in enumerate(unchanged):
            if not same:
                self.block(anns[k], what)
                anns[k] = OPAQUE if anns[k] is not None else None
        for v in eqn.outvars:
            self.set(v, anns)

    def _pad(self, eqn, ins):
        self._windowed(eqn, ins, [cfg == (0, 0, 0) for cfg in eqn.params["padding_config"]],
                       "padding along channels")

    def _slice(self, eqn, ins):
        shape = eqn.invars[0].aval.shape
        strides = eqn.params["strides"] or (1,) * len(shape)
        self._windowed(eqn, ins, [(s, l, t) == (0, n, 1) for s, l, t, n in zip(
            eqn.params["start_indices"], eqn.params["limit_indices"], strides, shape)],
            "a slice of channels")

    def _reduce_window(self, eqn, ins):
        p = eqn.params
        n = len(ins[0])
        same = [p["window_dimensions"][k] == 1 and p["window_strides"][k] == 1
                and tuple(p["padding"][k]) == (0, 0)
                and (p.get("base_dilation") or (1,) * n)[k] == 1
                and (p.get("window_dilation") or (1,) * n)[k] == 1 for k in range(n)]
        self._windowed(eqn, ins, same, "a pooling window across channels")


    def _concatenate(self, eqn, ins):
        axis = eqn.params["dimension"]
        out = eqn.outvars[0]
        anns = []
        for k in range(len(out.aval.shape)):
            if k != axis:
                a = None
                for ann in ins:
                    a = self.unify(a, ann[k], "concatenate")
                anns.append(a)
                continue
            parts = [self.resolve(ann[k]) if isinstance(ann[k], tuple) else None for ann in ins]
            if all(p is not None for p in parts):
                anns.append(tuple(piece for p in parts for piece in p))
            else:
                for ann in ins:
                    self.block(ann[k], "a concatenation with data that is not a channel "
                                       "(the input, a constant)")
                anns.append(OPAQUE)
        self.set(out, anns)

    def _dot_general(self, eqn, ins):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        weighted = any(self.is_param(v) for v in eqn.invars)
        for a, b in zip(lc, rc):
            joined = self.unify(lhs[a], rhs[b], "a matrix product")
            if not weighted:
                self.block(joined, "a product of two activations that sums over channels")
        batch = [self.unify(lhs[a], rhs[b], "a batched matrix product") for a, b in zip(lb, rb)]
        free_l = [lhs[k] for k in range(len(lhs)) if k not in lc and k not in lb]
        free_r = [rhs[k] for k in range(len(rhs)) if k not in rc and k not in rb]
        for a in free_l + free_r:
            self._produced(a)
        self.set(eqn.outvars[0], batch + free_l + free_r)

    def _produced(self, ann) -> None:
        if isinstance(ann, tuple):
            self.producer_dims.extend(d for d, _, _ in ann)

    def _conv_general_dilated(self, eqn, ins):
        p = eqn.params
        dn = p["dimension_numbers"]
        lhs, rhs = ins
        l_b, l_f, *l_sp = dn.lhs_spec
        r_o, r_i, *r_sp = dn.rhs_spec
        o_b, o_f, *o_sp = dn.out_spec
        groups, c_in = p["feature_group_count"], eqn.invars[0].aval.shape[l_f]
        c_out = eqn.invars[1].aval.shape[r_o]
        for k in r_sp:
            self.unify(rhs[k], OPAQUE, "a convolution window")
        for k in l_sp:
            self.block(lhs[k], "a convolution window over channels")
        self._produced(rhs[r_o])  # this layer's output channels, whether or not they can go
        why = "a convolution"
        if p["batch_group_count"] != 1 or not self.is_param(eqn.invars[1]):
            why = ("a convolution whose kernel is not a parameter" if p["batch_group_count"] == 1
                   else "a convolution with batch_group_count > 1")
            self.block(lhs[l_f], why)
            self.block(rhs[r_o], why)
            out_f = OPAQUE
        elif groups == 1:
            self.unify(lhs[l_f], rhs[r_i], why)
            out_f = rhs[r_o]
        elif groups == c_in == c_out:  # depthwise: output channel c reads input channel c only
            out_f = self.unify(lhs[l_f], rhs[r_o], "a depthwise convolution")
        else:
            why = f"a grouped convolution (feature_group_count={groups})"
            self.block(lhs[l_f], why)
            self.block(rhs[r_o], why)
            out_f = OPAQUE
        anns = [None] * len(eqn.outvars[0].aval.shape)
        anns[o_b], anns[o_f] = lhs[l_b], out_f
        for k in o_sp:
            anns[k] = OPAQUE
        self.set(eqn.outvars[0], anns)


_HANDLERS = {
    "broadcast_in_dim": _Tracer._broadcast_in_dim, "transpose": _Tracer._transpose,
    "squeeze": _Tracer._squeeze, "reshape": _Tracer._reshape, "pad": _Tracer._pad,
    "slice": _Tracer._slice, "concatenate": _Tracer._concatenate,
    "dot_general": _Tracer._dot_general, "conv_general_dilated": _Tracer._conv_general_dilated,
    **{f"reduce_window_{op}": _Tracer._reduce_window for op in ("max", "min", "sum")},
}


def couple(model: nnx.Module, input_shape: Sequence[int]) -> Coupling:
    """The model's channel groups (module docstring), traced from its forward on one batch of
    `input_shape` images."""
    closed, paths, variables = trace(model, input_shape, batch=2)
    jaxpr = closed.jaxpr
    t = _Tracer()
    members: list[tuple[int, int, int]] = []  # (leaf, axis, dim)
    in_anns = []
    for leaf, v in enumerate(jaxpr.invars[:-1]):
        anns = []
        for axis, s in enumerate(v.aval.shape):
            d = t.new_dim(s)
            members.append((leaf, axis, d))
            anns.append(((d, 1, 1),))
        in_anns.append(anns)
        if isinstance(variables[leaf], nnx.Param):
            t.param_vars.add(v)
    in_anns.append(t.opaque(jaxpr.invars[-1]))
    out_anns = t.run(jaxpr, in_anns, [[OPAQUE] * np.ndim(c) for c in closed.consts])
    for v, anns in zip(jaxpr.outvars, out_anns):
        for a in anns:
            t.block(a, OUTPUT)
    dim_owner = {d: leaf for leaf, _, d in members}
    by_root: dict[int, list[Member]] = {}
    for leaf, axis, d in members:
        layout = t.resolve(((d, 1, 1),))
        if layout is None:
            continue
        offset = 0
        for root, o, i in layout:
            by_root.setdefault(root, []).append(Member(
                paths[leaf], axis, offset, o, i, isinstance(variables[leaf], nnx.Param)))
            offset += o * t.size[root] * i
    producers: dict[int, list[Path]] = {}
    for d in t.producer_dims:
        if d in dim_owner:
            for root in {r for r, _, _ in t.resolve(((d, 1, 1),)) or ()}:
                layer = paths[dim_owner[d]][:-1]
                if layer not in producers.setdefault(root, []):
                    producers[root].append(layer)
    groups, refused, unfollowed = [], {}, {}
    for root, layers in producers.items():
        if root in t.blocked:
            for layer in layers:
                refused[layer_name(layer)] = t.blocked[root]
                if UNFOLLOWED in t.blocked[root]:
                    unfollowed[layer_name(layer)] = t.blocked[root]
            continue
        if t.size[root] < 2:
            continue
        groups.append(Coupled(layer_name(layers[0]), t.size[root],
                              tuple(by_root[root]), tuple(layers)))
    return Coupling(tuple(groups), refused, unfollowed)
