"""On-policy distillation and sequence-level KD: training rows generated inside the fused step.

With probability λ (lm.on_policy.fraction) a step's batch is replaced, on the device, by rows
made of the first ``prompt_tokens`` tokens of each of its corpus rows continued by
``max_new_tokens`` tokens that a model samples (kdjax.lm.sampling.decode: KV-cached, in the same
jitted program as the update, so no batch travels to the host):

- generator "student": on-policy distillation (GKD, Agarwal et al. 2024; MiniLLM). The student
  samples with the parameters of this very step (`kdjax.step.StepParts.rollout` merges them from
  the step's state), the teacher scores the continuation in the same step, and the student is
  trained on it by the divergence alone: the CE of the student's own samples would only teach
  it to repeat itself.
- generator "teacher": sequence-level KD (Kim & Rush 2016), generated in the step rather than
  cached to disk: with temperature > 0 every step sees fresh teacher samples instead of one
  fixed set, nothing is stored or verified, and the teacher runs in the step anyway to score
  the tokens. The student learns the teacher's tokens by CE and its distribution by the
  divergence. (An offline set would pay off for a teacher too large to run per step; the
  teacher cache, kdjax.lm.cache, is that path for corpus text.)

Where the prompts come from:

- plain text (rows without a per-token loss mask): the first ``prompt_tokens`` tokens of each
  row. A prompt that would hold padding (the corpus's last row) counts nothing, and the prompt
  is attended as one document even where it spans two of the corpus.
- instruction data (kdjax.prepare.chat; rows with a "loss_mask", 0 on prompt tokens, 1 on
  response tokens): a conversation's own prompt, ``prompt_of_conversation``: of the row's
  conversations that begin inside the row (segment 2 onwards: segment 1 may have begun in the
  previous row, and a prompt cut at its start is not the prompt the conversation was written
  with), the first whose first response token is in the row and whose prompt (its tokens
  before that response token) is at most ``prompt_tokens`` long. Prompts are left-padded to
  ``prompt_tokens`` for the decode (kdjax.lm.sampling.decode masks the padding and starts the
  positions at each prompt's first token) and the generated row starts with the prompt itself.
  Longer prompts are skipped rather than truncated from the left: that would cut off a
  system prompt or the question's beginning, a prompt no conversation of the data has. A row
  with no such conversation (plain-text documents of instruction data have no prompt) counts
  nothing in that step; training data none of whose rows has one is refused
  (`check_prompts`).

A generated row is one document, prompt and continuation, laid out in the batch's own shape
(``[B, seq_len]``, the tail padding), and the loss counts its generated tokens only: the
positions whose targets are sampled, none after the first end-of-document token.
λ = 0 builds no rollout at all, so the program is the supervised step's; 0 < λ < 1 picks the
batch by `lax.cond`, which runs only the chosen branch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import plan as plan_lib
from kdjax.lm import packing, sampling

GENERATORS = ("student", "teacher")
# The step key's sub-streams: the coin that picks the batch, the sampler's keys.
_COIN, _SAMPLE = 0x0C01, 0x5A3E


def check(on_policy: plan_lib.OnPolicy, *, seq_len: int, loss_name: str, distill: bool,
          cache: str, data_name: str, cross_tokenizer: str = "") -> None:
    """Refuse lm.on_policy settings (λ = fraction != 0) that cannot run, naming the key, the
    value and the fix."""
    fraction = on_policy.fraction
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"lm.on_policy.fraction={fraction} is a probability (λ, the share of "
                         f"batches generated): set it in [0, 1] (0 = supervised distillation "
                         f"only, 1 = every batch generated)")
    if on_policy.generator not in GENERATORS:
        raise ValueError(f"lm.on_policy.generator={on_policy.generator!r}: expected one of "
                         f"{GENERATORS} (student = on-policy distillation, teacher = "
                         f"sequence-level KD)")
    if not distill or loss_name == "ce":
        raise ValueError(f"lm.on_policy.fraction={fraction} trains on generated tokens that a "
                         f"teacher scores: run `kdjax distill` with a token divergence "
                         f"(loss.name='forward_kl', 'reverse_kl', 'jsd', ...; got loss.name="
                         f"{loss_name!r}), or set lm.on_policy.fraction=0")
    if cache:
        raise ValueError(f"lm.on_policy.fraction={fraction}: teacher.cache={cache!r} holds "
                         f"targets for the corpus's tokens only, not for generated ones; set "
                         f"teacher.cache='' and teacher.workdir to the teacher's run, or "
                         f"lm.on_policy.fraction=0")
    if cross_tokenizer:
        raise ValueError(f"lm.on_policy.fraction={fraction}: lm.cross_tokenizer="
                         f"{cross_tokenizer!r} aligns the teacher's tokenization of corpus text, "
                         f"which generated tokens do not have; set lm.cross_tokenizer='' (a "
                         f"teacher of the student's tokenizer), or lm.on_policy.fraction=0")
    for key in ("prompt_tokens", "max_new_tokens"):
        if getattr(on_policy, key) < 1:
            raise ValueError(f"lm.on_policy.{key}={getattr(on_policy, key)} must be >= 1")
    total = on_policy.prompt_tokens + on_policy.max_new_tokens
    if total > seq_len:
        raise ValueError(f"lm.on_policy.prompt_tokens={on_policy.prompt_tokens} + "
                         f"lm.on_policy.max_new_tokens={on_policy.max_new_tokens} = {total} "
                         f"tokens exceed the model's context of {seq_len} positions (the "
                         f"sequence length of data.name={data_name!r}); lower them to a sum of "
                         f"at most {seq_len}")
    if on_policy.temperature < 0:
        raise ValueError(f"lm.on_policy.temperature={on_policy.temperature} must be >= 0 "
                         f"(0 = greedy)")


def generated_inputs(prompts: jax.Array, new: jax.Array, valid: jax.Array, seq_len: int,
                     eos: int | None = None, pad: jax.Array | None = None
                     ) -> dict[str, jax.Array]:
    """The model inputs (as kdjax.lm.packing.model_inputs gives them, ``[B, seq_len]``) of rows
    ``prompts [B, P] + new [B, N]``, one document each, padded at the end (a prompt left-padded
    by `pad` ``[B]`` tokens, as kdjax.lm.sampling.decode takes it, is moved to the row's start);
    "loss_mask" holds the positions whose targets are the `new` tokens of `valid` ``[B]`` rows,
    up to and including the first `eos` (the end of the document: what follows is no text of
    it), and "generated" is 1 for every row."""
    b, p = prompts.shape
    n = new.shape[1]
    pad = jnp.zeros((b,), jnp.int32) if pad is None else pad
    counted = jnp.ones(new.shape, bool) if eos is None else (
        jnp.cumsum(new == eos, axis=1) - (new == eos) == 0)
    rows = jnp.concatenate([prompts, new], axis=1)
    # row b's token j is prompt-and-continuation token j + pad[b]; past its end, padding
    source = jnp.arange(p + n)[None, :] + pad[:, None]
    rows = jnp.where(source < p + n, jnp.take_along_axis(rows, jnp.minimum(source, p + n - 1),
                                                         axis=1), 0)
    rows = jnp.pad(rows, ((0, 0), (0, seq_len + 1 - p - n)))
    pos = jnp.arange(seq_len)[None, :]
    # position i predicts generated token i - (p - 1 - pad)
    step = pos - (p - 1 - pad[:, None])
    targets_counted = (step >= 0) & (step < n) & jnp.take_along_axis(
        counted, jnp.clip(step, 0, n - 1), axis=1)
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:],
            "segment_ids": (pos < (p + n - pad)[:, None] - 1).astype(jnp.int32),
            "loss_mask": targets_counted & valid[:, None],
            "generated": jnp.ones((b,), jnp.float32)}


def prompt_of_conversation(tokens: jax.Array, segment_ids: jax.Array, response: jax.Array,
                           width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's conversation prompt (the module's rule), left-padded to `width` tokens.

    `tokens`, `segment_ids` and `response` (nonzero on response tokens) are a batch's input
    positions ``[B, T]``. Returns (prompts ``[B, width]``, pad ``[B]``, valid ``[B]``); a row
    without a usable conversation gets its first `width` tokens and valid False (a prompt of
    padding alone would leave the decode no key to attend to).
    """
    t = tokens.shape[1]
    pos = jnp.arange(t)[None, :]
    response = response != 0
    prev_seg = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
    prev_resp = jnp.pad(response, ((0, 0), (1, 0)))[:, :-1]
    # position 0's document may have begun in the previous row: not a start of one here
    starts = (segment_ids != 0) & (segment_ids != prev_seg) & (pos > 0)
    start = jax.lax.cummax(jnp.where(starts, pos, -1), axis=1)
    # a conversation's first response token: the first 1 after its 0s, within its document
    first = response & ~prev_resp & (segment_ids == prev_seg) & (segment_ids != 0)
    length = pos - start
    usable = first & (start >= 0) & (length <= width)
    valid = usable.any(axis=1)
    at = jnp.argmax(usable, axis=1)
    length = jnp.where(valid, jnp.take_along_axis(length, at[:, None], axis=1)[:, 0], width)
    begin = jnp.where(valid, jnp.take_along_axis(start, at[:, None], axis=1)[:, 0], 0)
    pad = width - length
    source = begin[:, None] + jnp.arange(width)[None, :] - pad[:, None]
    prompts = jnp.where(source >= begin[:, None],
                        jnp.take_along_axis(tokens, jnp.clip(source, 0, t - 1), axis=1), 0)
    return prompts, pad.astype(jnp.int32), valid


def check_prompts(rows: Mapping[str, np.ndarray], on_policy: plan_lib.OnPolicy, *,
                  data_name: str, split: str, chunk: int = 1024) -> None:
    """Refuse instruction rows (`rows` with "loss_mask") of which none has a usable conversation
    prompt (`prompt_of_conversation`) of at most lm.on_policy.prompt_tokens tokens: every
    generated batch would count no token. Checked `chunk` rows at a time on the device."""
    if "loss_mask" not in rows:
        return
    width, seq_len = on_policy.prompt_tokens, rows["tokens"].shape[1] - 1
    find = jax.jit(prompt_of_conversation, static_argnums=3)
    shortest = seq_len + 1
    for start in range(0, len(rows["tokens"]), chunk):
        inputs = packing.model_inputs(*(rows[k][start:start + chunk]
                                        for k in ("tokens", "segments", "loss_mask")))
        response = rows["loss_mask"][start:start + chunk, :-1]
        if jax.device_get(find(inputs["tokens"], inputs["segment_ids"], response, width)[2]
                          ).any():
            return
        # the longest width: each row's first conversation prompt, however long
        _, pad, valid = jax.device_get(find(inputs["tokens"], inputs["segment_ids"], response,
                                            seq_len))
        if valid.any():
            shortest = min(shortest, int((seq_len - pad)[valid].min()))
    found = (f"the shortest is {shortest} tokens: set lm.on_policy.prompt_tokens >= {shortest} "
             f"(with prompt_tokens + max_new_tokens <= {seq_len})" if shortest <= seq_len else
             "there is none: prepare conversations, prompt/response or messages lines")
    raise ValueError(f"lm.on_policy.prompt_tokens={width}: no row of split {split!r} of "
                     f"data.name={data_name!r} has a conversation beginning inside it whose "
                     f"prompt (its tokens before the response) fits in {width} tokens, so no "
                     f"generated token would count; {found}, or set lm.on_policy.fraction=0")


def rollout(on_policy: plan_lib.OnPolicy, eos: int | None = None) -> Callable[..., Any] | None:
    """kdjax.step.StepParts.rollout of lm.on_policy: `(distillee, teachers, inputs, key) ->
    inputs`, with probability λ the batch generated (`generated_inputs`; `eos` the tokenizer's
    end-of-document id), else the corpus rows with "generated" 0; None for λ = 0 (the
    supervised step, unchanged). Inputs with "response" (instruction data's per-token loss
    mask of the input tokens) are continued from their conversations' prompts
    (`prompt_of_conversation`), others from their first prompt_tokens tokens."""
    if on_policy.fraction == 0.0:
        return None
    config = sampling.SamplingConfig(temperature=float(on_policy.temperature))
    p, n = on_policy.prompt_tokens, on_policy.max_new_tokens

    def generate(model: nnx.Module, teachers: tuple[nnx.Module, ...],
                 inputs: Mapping[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
        sampler = model.student if on_policy.generator == "student" else teachers[0]
        if "response" in inputs:
            prompts, pad, valid = prompt_of_conversation(inputs["tokens"], inputs["segment_ids"],
                                                         inputs["response"], p)
        else:
            prompts, pad = inputs["tokens"][:, :p], jnp.zeros(inputs["tokens"].shape[:1],
                                                              jnp.int32)
            valid = (inputs["segment_ids"][:, :p] != 0).all(axis=1)
        new, _ = sampling.decode(sampler, prompts, pad, jax.random.fold_in(key, _SAMPLE),
                                 max_new_tokens=n, config=config)
        return generated_inputs(prompts, new, valid, inputs["tokens"].shape[1], eos, pad)

    def run(model, teachers, inputs, key):
        if on_policy.fraction == 1.0:
            return generate(model, teachers, inputs, key)
        # "response" only picks the prompts: both branches give the loss the same inputs
        corpus = {**{k: v for k, v in inputs.items() if k != "response"},
                  "generated": jnp.zeros(inputs["tokens"].shape[:1], jnp.float32)}
        coin = jax.random.uniform(jax.random.fold_in(key, _COIN)) < on_policy.fraction
        return jax.lax.cond(coin, lambda: generate(model, teachers, inputs, key),
                            lambda: corpus)

    return run


def weigh_terms(terms: dict[str, jax.Array], inputs: Mapping[str, jax.Array],
                on_policy: plan_lib.OnPolicy) -> dict[str, jax.Array]:
    """The objective's per-token terms with the CE of the student's own samples left out (a
    generated row of generator "student" is learnt by the divergence alone)."""
    if on_policy.generator != "student":
        return terms
    return {**terms, "ce": terms["ce"] * (1.0 - inputs["generated"])[:, None]}
