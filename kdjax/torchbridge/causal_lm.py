"""A Hugging Face causal language model (any `transformers` architecture, through torchax) as the
teacher of kdjax's language-model distillation: tokens in, float32 logits `[B, T, V]` out, inside
the one compiled step.

This is how an architecture without a native port teaches. `from_config` is the factory that
`kdjax import --torch` takes for it, since `transformers` builds a model from a config object,
which a JSON `--torch-kwargs` cannot carry:

    kdjax import --torch kdjax.torchbridge.causal_lm:from_config \\
        --torch-kwargs '{"config": "path/to/hf_folder"}' --from path/to/model.safetensors \\
        --num-classes VOCAB --input-shape SEQ_LEN --data TEXT_DATASET --out RUN

Packed rows. kdjax packs several documents into a row (segment ids, kdjax.lm.packing); the native
models attend within a document only and restart rotary positions at each. The Hugging Face
model is given the same view: a 4-D additive attention mask (0 where a query may attend, the
dtype's minimum elsewhere), which `transformers` uses as it is, and per-document position ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import torch

from kdjax.lm.models import document_mask, positions_from_segments
from kdjax.torchbridge.bridge import TorchModel

__all__ = ["TorchCausalLM", "from_config"]


def from_config(config: str | Mapping[str, Any] | None = None, *, model_type: str | None = None,
                **overrides: Any) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_config(...)` from a local folder or config.json (`config`), or
    from a `model_type` ("llama", "qwen2", "gpt2", ...) and its config fields; `overrides`
    change fields of either. Nothing is downloaded: the weights come from `kdjax import --from`.
    """
    import transformers  # noqa: PLC0415  (an optional dependency of an optional extra)

    if (config is None) == (model_type is None):
        raise ValueError("from_config takes one of config (a Hugging Face folder or its "
                         "config.json) or model_type (with the config's fields), e.g. "
                         '--torch-kwargs \'{"config": "models/qwen"}\'')
    if model_type is not None:
        cfg = transformers.AutoConfig.for_model(model_type, **overrides)
    else:
        if not os.path.exists(config):
            raise ValueError(f"from_config: config {config!r} does not exist; pass the folder "
                             f"holding the model's config.json, or that file")
        cfg = transformers.AutoConfig.from_pretrained(config, local_files_only=True,
                                                      **overrides)
    return transformers.AutoModelForCausalLM.from_config(cfg)


class TorchCausalLM(TorchModel):
    """A PyTorch causal LM as a kdjax language model (the interface kdjax.lm's step reads).

    `features(...)["hidden"]` is the float32 logits themselves and `logits(hidden)` returns them
    as they are: the module's head (tied, biased or soft-capped, as the architecture has it) is
    applied inside its own forward, so the teacher's logits are whole (lm.chunk_size = 0).
    """

    def __init__(self, factory: str, factory_kwargs: Mapping[str, Any] | None = None, *,
                 num_classes: int | None = None, seed: int | None = None,
                 dtype: Any = jnp.float32, rngs: Any = None):
        del num_classes  # the vocabulary is the config's; `kdjax import` checks the logits
        super().__init__(factory, factory_kwargs, seed=seed, dtype=dtype, rngs=rngs)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return ("hidden", "logits")

    def features(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, train: bool = False,
                 logits: bool = True) -> dict[str, jax.Array]:
        del logits  # the logits are the hidden output here: nothing to leave out
        out = self(tokens, segment_ids=segment_ids, positions=positions, train=train)
        return {"hidden": out, "logits": out}

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, train: bool = False) -> jax.Array:
        """float32 next-token logits ``[B, T, vocab]`` of ``tokens [B, T]``."""
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        allowed = document_mask(segment_ids)
        mask = jnp.where(allowed, 0.0, jnp.finfo(self.dtype).min).astype(self.dtype)
        out, _ = self._run(tokens, train=train, taps=(), kwargs={
            "attention_mask": mask, "position_ids": positions.astype(jnp.int32)})
        return out.astype(jnp.float32)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return hidden

    def head(self) -> jax.Array:
        raise ValueError("lm.chunk_size > 0 projects the teacher's hidden states chunk by chunk, "
                         "but a PyTorch teacher applies its own head inside its forward; set "
                         "lm.chunk_size=0")
