"""The language-model objective: ``ce_weight * CE + kd_weight * divergence`` per target token.

The token divergences of kdjax.losses (and "ce", supervised training) are registered here as the
methods of the "lm" task (kdjax.methods), so the registry answers which loss.name a language-model
run accepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import losses, methods
from kdjax.methods import Method, Term, combine


@dataclasses.dataclass(frozen=True)
class TokenObjective:
    """What the step minimises: ``ce_weight * CE + kd_weight * divergence`` per target token.

    `divergence` is a key of kdjax.losses.TOKEN_DIVERGENCES (None: CE alone, supervised
    training) with its keyword hyperparameters in `kwargs`. `chunk_size` > 0 computes both models'
    logits that many positions at a time (kdjax.losses.chunked_token_losses), never whole;
    0 materialises them.
    """

    divergence: str | None = None
    kwargs: Mapping[str, float] = dataclasses.field(default_factory=dict)
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    chunk_size: int = 0

    def __post_init__(self):
        if self.divergence is not None:
            fn = losses.token_divergence(self.divergence)
            try:  # bad hyperparameters fail here, before anything compiles
                jax.eval_shape(lambda: fn(jnp.zeros((1, 2)), jnp.zeros((1, 2)), **self.kwargs))
            except TypeError as e:
                raise ValueError(f"loss.kwargs={dict(self.kwargs)} do not fit the token "
                                 f"divergence {self.divergence!r}: {e}") from None
        if self.chunk_size < 0:
            raise ValueError(f"lm.chunk_size must be >= 0 (0 = whole logits), got "
                             f"{self.chunk_size}")

    def terms(self, student: nnx.Module, hidden: jax.Array, teacher: nnx.Module | None,
              teacher_hidden: jax.Array | None, targets: jax.Array, mask: jax.Array
              ) -> dict[str, jax.Array]:
        """Per-token ``[B, T]`` "ce", "correct" and, with a teacher, "kd" and "agreement"."""
        divergence = self.divergence if teacher is not None else None
        capped = [m for m in (student, teacher) if getattr(m, "final_softcap", None)]
        if self.chunk_size and capped:
            raise ValueError(f"lm.chunk_size={self.chunk_size}: the chunked loss projects hidden "
                             f"states without Gemma 2's logit soft cap (final_softcap="
                             f"{capped[0].final_softcap}); set lm.chunk_size=0 for this model")
        if self.chunk_size:
            return losses.chunked_token_losses(
                hidden, student.head(), teacher_hidden,
                None if teacher is None else teacher.head(), targets, mask=mask,
                divergence=divergence or "forward_kl", chunk_size=self.chunk_size,
                **(self.kwargs if divergence else {}))
        logits = student.logits(hidden)
        out = {"ce": losses.token_cross_entropy(logits, targets, mask=mask),
               "correct": jnp.where(mask, logits.argmax(-1) == targets, 0.0)}
        if teacher is not None:
            t_logits = teacher.logits(teacher_hidden)
            out["agreement"] = jnp.where(mask, logits.argmax(-1) == t_logits.argmax(-1), 0.0)
            if divergence:
                out["kd"] = losses.token_divergence(divergence)(logits, t_logits, mask=mask,
                                                                **self.kwargs)
        return out

    def loss(self, terms: dict[str, jax.Array], mask: jax.Array, step: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the token-mean objective, metrics) from `terms`' per-token values: each term's sum
        over the batch ("ce_sum", ...) and "tokens", their count."""
        sums = {f"{k}_sum": v.sum() for k, v in terms.items()}
        mix = [Term("ce_sum", self.ce_weight, lambda sums, step: sums["ce_sum"])]
        if "kd_sum" in sums:
            mix.append(Term("kd_sum", self.kd_weight, lambda sums, step: sums["kd_sum"]))
        total, metrics = combine(*mix)(sums, step)
        count = mask.sum().astype(jnp.float32)
        return total / jnp.maximum(count, 1.0), {**sums, **metrics, "tokens": count}


def _objective(divergence: str | None) -> Any:
    def build(loss: Any, *, chunk_size: int = 0) -> TokenObjective:
        return TokenObjective(divergence=divergence, kwargs=dict(loss.kwargs),
                              ce_weight=loss.ce_weight, kd_weight=loss.kd_weight,
                              chunk_size=chunk_size)

    return build


methods.register(Method("ce", "supervised", task="lm", objective=_objective(None),
                        needs_teacher=lambda kwargs: False))
for _name in losses.TOKEN_DIVERGENCES:
    methods.register(Method(_name, "token", task="lm", objective=_objective(_name)))
