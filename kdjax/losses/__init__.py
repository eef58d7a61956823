"""Knowledge-distillation losses: logit divergences, feature and relational losses, token losses.

Modules: `kdjax.losses.logit` (class-distribution divergences), `kdjax.losses.feature`
(feature, relational and mutual-learning losses), `kdjax.losses.self_distillation` (no external
teacher: Tf-KD's virtual teacher, BYOT's hint), `kdjax.losses.token` (language models:
per-token divergences with a mask, and their vocabulary-chunked form); every public loss is
importable from here.

Conventions (optax style):

* Pure functions. Logits / features are the leading positional arguments;
  hyperparameters are keyword-only static Python numbers, validated at trace time
  (bad values raise ``ValueError``). Under ``jax.jit`` bind them with
  ``functools.partial`` or ``static_argnames`` rather than passing them traced.
  The exception is the logit losses' ``temperature``: it may also be an array, a
  scalar or one value per example, traced (a schedule computed from the step, a
  learned temperature: ``kdjax.temperature``), so that changing it never recompiles;
  Python numbers are still validated, arrays cannot be. ``T**2`` scaling applies to
  either (per example for per-example temperatures).
* Everything is computed in float32 whatever the input dtype, and returned as float32.
* Logit losses take ``[..., num_classes]`` arrays and return per-example values of
  shape ``[...]``; the caller reduces. Feature losses return ``[batch]``; losses
  defined on the structure of a whole batch (SP, RKD, PKT, CC) return a scalar.
  Token losses take ``[B, T, V]`` logits and a ``[B, T]`` mask and return ``[B, T]``.
* ``p = softmax(logits / T)``. Divergences between student and teacher logits
  evaluate both sides at the same temperature ``T`` and multiply by ``T**2``, which
  keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
* ``-inf`` logits (masked classes) are supported when student and teacher mask the
  same classes: ``0 * log 0`` is taken as 0 and values and gradients stay finite.
* Logit losses let gradients flow into both arguments: a frozen teacher is normally
  computed outside the differentiated function (otherwise wrap it in
  ``jax.lax.stop_gradient``). Feature losses stop gradients exactly where their
  reference implementations detach (RKD's teacher side, NST's teacher-teacher term).
"""

from kdjax.losses._common import adaptive_avg_pool, l2_normalize
from kdjax.losses.feature import (attention_transfer, correlation_congruence, crd, crd_scores,
                                  fitnet, mutual_learning, nst, pkt, rkd, similarity_preserving,
                                  vid)
from kdjax.losses.logit import (cross_entropy, dkd, ensemble_teacher, generalized_jsd, hinton_kd,
                                logit_standardized_kd, reverse_kl, soft_target_kl,
                                topk_soft_target_kl, tvd)
from kdjax.losses.self_distillation import byot_hint, teacher_free_kd, virtual_teacher_logits
from kdjax.losses.token import (TOKEN_DIVERGENCES, chunked_token_losses, token_byte_log_probs,
                                token_cross_entropy, token_divergence, token_forward_kl,
                                token_generalized_jsd,
                                token_reverse_kl, token_skew_kl, token_skew_reverse_kl,
                                token_topk_kl, token_topk_targets, token_tvd)

__all__ = [
    "TOKEN_DIVERGENCES",
    "adaptive_avg_pool",
    "attention_transfer",
    "byot_hint",
    "chunked_token_losses",
    "correlation_congruence",
    "crd",
    "crd_scores",
    "cross_entropy",
    "dkd",
    "ensemble_teacher",
    "fitnet",
    "generalized_jsd",
    "hinton_kd",
    "l2_normalize",
    "logit_standardized_kd",
    "mutual_learning",
    "nst",
    "pkt",
    "reverse_kl",
    "rkd",
    "similarity_preserving",
    "soft_target_kl",
    "teacher_free_kd",
    "token_byte_log_probs",
    "token_cross_entropy",
    "token_divergence",
    "token_forward_kl",
    "token_generalized_jsd",
    "token_reverse_kl",
    "token_skew_kl",
    "token_skew_reverse_kl",
    "token_topk_kl",
    "token_topk_targets",
    "token_tvd",
    "topk_soft_target_kl",
    "tvd",
    "vid",
    "virtual_teacher_logits",
]
