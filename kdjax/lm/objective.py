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
    0 materialises them. `top_k` > 0 distils from the teacher's top k tokens
    (kdjax.losses.token_topk_kl, a forward KL; `tail`: with the tail bucket, else top-k
    renormalisation), which a teacher cache's targets also use.
    """

    divergence: str | None = None
    kwargs: Mapping[str, float] = dataclasses.field(default_factory=dict)
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    chunk_size: int = 0
    top_k: int = 0
    tail: bool = True

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"teacher.top_k must be >= 0 (0 = the whole distribution), got "
                             f"{self.top_k}")
        if self.top_k and self.divergence not in (None, "forward_kl"):
            raise ValueError(f"top-k distillation (teacher.top_k={self.top_k}, or a teacher "
                             f"cache) is a forward KL over the teacher's top k tokens, got "
                             f"loss.name={self.divergence!r}; set loss.name='forward_kl'")
        if (self.top_k and self.divergence is not None and self.tail
                and self.kwargs.get("temperature", 1.0) != 1.0):
            raise ValueError(f"the top-k loss with the tail bucket (teacher.top_k_loss='tail') "
                             f"is at temperature 1 (a teacher's top k do not tell its tail's "
                             f"mass at another), got loss.kwargs={dict(self.kwargs)}; set "
                             f"loss.kwargs={{'temperature': 1.0}}, or teacher.top_k_loss="
                             f"'renorm'")
        if self.top_k and self.divergence is not None:
            try:
                losses.token_topk_kl(jnp.zeros((1, 2)), jnp.zeros((1, 1)),
                                     jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,)),
                                     tail=self.tail, **self.kwargs)
            except TypeError as e:
                raise ValueError(f"loss.kwargs={dict(self.kwargs)} do not fit the top-k "
                                 f"loss: {e}") from None
        elif self.divergence is not None:
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
              teacher_hidden: jax.Array | None, targets: jax.Array, mask: jax.Array,
              cached: tuple[jax.Array, jax.Array, jax.Array] | None = None
              ) -> dict[str, jax.Array]:
        """Per-token ``[B, T]`` "ce", "correct" and, with a teacher or its `cached` top-k
        targets ``(logprobs, ids, log_tail)``, "kd" and "agreement"."""
        teaching = teacher is not None or cached is not None
        divergence = self.divergence if teaching else None
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
                top_k=self.top_k, tail=self.tail, teacher_topk=cached,
                **(self.kwargs if divergence else {}))
        logits = student.logits(hidden)
        out = {"ce": losses.token_cross_entropy(logits, targets, mask=mask),
               "correct": jnp.where(mask, logits.argmax(-1) == targets, 0.0)}
        if not teaching:
            return out
        t_logits = None if teacher is None else teacher.logits(teacher_hidden)
        if cached is not None or self.top_k:
            topk = cached if cached is not None else losses.token_topk_targets(t_logits,
                                                                               self.top_k)
            found = losses.token.topk_terms(logits, topk, mask, tail=self.tail,
                                            **(self.kwargs if divergence else {}))
            out["agreement"] = found["agreement"]
            if divergence:
                out["kd"] = found["kd"]
            return out
        out["agreement"] = jnp.where(mask, logits.argmax(-1) == t_logits.argmax(-1), 0.0)
        if divergence:
            out["kd"] = losses.token_divergence(divergence)(logits, t_logits, mask=mask,
                                                            **self.kwargs)
        return out

    def byte_terms(self, student: nnx.Module, hidden: jax.Array, teacher_bytes: jax.Array,
                   student_first_bytes: jax.Array, targets: jax.Array, mask: jax.Array,
                   aligned: jax.Array) -> dict[str, jax.Array]:
        """`terms` against a teacher of another tokenizer (kdjax.lm.cross_tokenizer): "kd" is the
        divergence between the two next-byte distributions (the teacher's, ``[B, T, 257]`` log
        probabilities, read where its position is `aligned` with the student's), "agreement"
        whether their most likely next bytes agree."""
        logits = student.logits(hidden)
        both = mask & aligned
        student_bytes = losses.token_byte_log_probs(logits[..., :len(student_first_bytes)],
                                                    student_first_bytes)
        return {"ce": losses.token_cross_entropy(logits, targets, mask=mask),
                "correct": jnp.where(mask, logits.argmax(-1) == targets, 0.0),
                "agreement": jnp.where(both, student_bytes.argmax(-1) == teacher_bytes.argmax(-1),
                                       0.0),
                "kd": losses.token_divergence(self.divergence)(student_bytes, teacher_bytes,
                                                               mask=both, **self.kwargs)}

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
    def build(loss: Any, *, chunk_size: int = 0, top_k: int = 0, tail: bool = True
              ) -> TokenObjective:
        return TokenObjective(divergence=divergence, kwargs=dict(loss.kwargs),
                              ce_weight=loss.ce_weight, kd_weight=loss.kd_weight,
                              chunk_size=chunk_size, top_k=top_k, tail=tail)

    return build


methods.register(Method("ce", "supervised", task="lm", objective=_objective(None),
                        needs_teacher=lambda kwargs: False))
for _name in losses.TOKEN_DIVERGENCES:
    methods.register(Method(_name, "token", task="lm", objective=_objective(_name)))
