"""Hugging Face causal-LM checkpoints in and out: `kdjax import --hf DIR` and
`kdjax export --format hf`.

A Hugging Face folder holds config.json, the weights (model.safetensors, or shards named by
model.safetensors.index.json; float32, float16 or bfloat16) and usually the tokenizer
(tokenizer.json, tokenizer_config.json with its chat template). The families below are kdjax's
Transformer (kdjax.lm.models) with options: Llama 2/3 (with Llama 3's rope_scaling), Mistral
(sliding window), Qwen2/2.5 (query/key/value biases), Qwen3 (query/key RMSNorms), Gemma 2 and
Gemma 3's text models ((1+w) norms, scaled embedding, GeGLU, four norms a block, soft caps,
alternating sliding-window layers). Parameter names are the "hf" layout of
kdjax.interop.layouts.

An import is a run (kdjax.interop.importer.write_run) whose ModelSpec names the family (model.name
is the model_type: "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"; the sizes in
model.kwargs), with the folder's config.json, generation config and tokenizer files kept in
RUN/hf/. Everything that kdjax does not compute exactly as `transformers` does is refused before
any directory appears.

An export writes the same family's folder (a kdjax-native LM, lm_tiny and the like, as Llama):
what `transformers.AutoModelForCausalLM.from_pretrained` loads, with kdjax's logits.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from flax import nnx

from kdjax import checkpoint, plan as plan_lib
from kdjax.interop import importer, layouts, state_dict
from kdjax.lm import models as lm_models
from kdjax.models import ModelSpec, count_params

__all__ = ["ARCHITECTURES", "HF_DIR", "describe", "export", "hf_config", "import_hf",
           "read_config", "read_weights", "spec_from_config", "tokenizer_source"]

#: model_type -> the transformers class of each family kdjax computes exactly.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
NOT_YET = {"gemma": "Gemma 1 is not yet supported (kdjax imports Gemma 2 and Gemma 3's text "
                    "models)",
           "gemma3": "a multimodal Gemma 3 is not yet supported (kdjax imports Gemma 3's text-only "
                     "models, model_type gemma3_text, such as gemma-3-1b)"}
# What transformers assumes of a Gemma config that leaves a field out (its config classes').
_GEMMA_DEFAULTS = {
    "gemma2": dict(query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, sliding_window=4096, pattern=2, head_dim=256),
    "gemma3_text": dict(query_pre_attn_scalar=256, attn_logit_softcapping=None,
                        final_logit_softcapping=None, sliding_window=4096, pattern=6,
                        head_dim=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)}
HF_DIR = "hf"  # inside an imported run: the folder's config, generation config and tokenizer
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")
# Buffers older checkpoints saved beside the weights: recomputed from the config, not read.
_BUFFER_SUFFIX = ".rotary_emb.inv_freq"
_DEFAULT_SHARD_BYTES = 5 * 2**30  # save_pretrained's 5 GB


def _bridge(directory: str) -> str:
    return (f"use it as a teacher through the PyTorch bridge instead (kdjax.torchbridge."
            f"causal_lm, pip install 'kdjax[torch,hf]'): kdjax import --torch "
            f"kdjax.torchbridge.causal_lm:from_config --torch-kwargs "
            f"'{{\"config\": \"{directory}\"}}' --from {directory}/model.safetensors "
            f"--num-classes VOCAB --input-shape SEQ_LEN --data TEXT_DATASET --out RUN")


def read_config(directory: str) -> dict[str, Any]:
    """config.json of the Hugging Face folder `directory`, its model_type one of ARCHITECTURES."""
    if not os.path.isdir(directory):
        raise ValueError(f"--hf {directory!r} is not a directory; pass the folder that "
                         f"save_pretrained wrote (config.json and model*.safetensors)")
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--hf {directory!r} has no {CONFIG_FILE}: not a Hugging Face "
                                f"model folder (model.save_pretrained(DIR) writes one)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): copy or download it again") from None
    kind = config.get("model_type")
    if kind in NOT_YET:
        raise ValueError(f"{path}: model_type {kind!r}: {NOT_YET[kind]} by kdjax import --hf; "
                         f"{_bridge(directory)}")
    if kind not in ARCHITECTURES:
        raise ValueError(f"{path}: model_type {kind!r} is not a family kdjax computes (it "
                         f"imports {sorted(ARCHITECTURES)}); {_bridge(directory)}")
    return config


def _refuse(path: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{path}: {field}={json.dumps(value)} is not implemented by kdjax's "
                      f"transformer ({why}); kdjax imports only checkpoints it computes exactly "
                      f"as transformers does: {_bridge(os.path.dirname(path))}")


def _rope(config: dict[str, Any], path: str, default_theta: float = 10_000.0
          ) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling kwarg) from transformers 5's rope_parameters (Gemma 3's: its
    "full_attention" entry) or 4's rope_scaling and rope_theta."""
    field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    given = dict(config.get(field) or {})
    if "full_attention" in given:
        field, given = f"{field}.full_attention", dict(given["full_attention"])
    theta = float(given.get("rope_theta", config.get("rope_theta", default_theta)))
    kind = given.get("rope_type", given.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in lm_models.ROPE_SCALING:
        raise _refuse(path, f"{field}.rope_type", kind,
                      f"it computes the rotary types {['default', *lm_models.ROPE_SCALING]}")
    missing = [k for k in lm_models.ROPE_SCALING[kind] if k not in given]
    if missing:
        raise ValueError(f"{path}: {field} of type {kind!r} lacks {missing}: add them (the "
                         f"values the model was trained with)")
    return theta, {"rope_type": kind, **{k: given[k] for k in lm_models.ROPE_SCALING[kind]}}


def spec_from_config(config: dict[str, Any], path: str) -> tuple[str, int, dict[str, Any]]:
    """(family, vocabulary rows, Transformer kwargs) of a Hugging Face config, refusing every
    field whose value kdjax does not compute."""
    family = config["model_type"]
    gemma = _GEMMA_DEFAULTS.get(family)
    field = "hidden_activation" if gemma else "hidden_act"
    want = "gelu_pytorch_tanh" if gemma else "silu"
    act = config.get(field, config.get("hidden_act"))
    if (act or want) != want:
        raise _refuse(path, field, act, f"a {family} feed-forward's gate is {want}")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            raise _refuse(path, field, True, "its only biases are Qwen2's on q, k and v")
    if config.get("quantization_config"):
        raise _refuse(path, "quantization_config", config["quantization_config"].get(
            "quant_method", "?"), "it reads float weights only; save the model unquantized")
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(path, "partial_rotary_factor", config["partial_rotary_factor"],
                      "it rotates whole heads")
    if family in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise _refuse(path, "use_sliding_window", True,
                      "Qwen's per-layer windows are not implemented")
    if config.get("use_bidirectional_attention"):
        raise _refuse(path, "use_bidirectional_attention", True, "it is a causal LM")
    theta, scaling = _rope(config, path, (gemma or {}).get("rope_theta", 10_000.0))
    heads = int(config["num_attention_heads"])
    kwargs: dict[str, Any] = dict(
        d_model=int(config["hidden_size"]), num_layers=int(config["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
        d_ff=int(config["intermediate_size"]),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), rope_theta=theta,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)))
    if scaling is not None:
        kwargs["rope_scaling"] = scaling
    if family == "mistral" and config.get("sliding_window") is not None:
        kwargs["sliding_window"] = int(config["sliding_window"])
    if gemma:
        kwargs.update(_gemma(config, gemma, path))
    return family, int(config["vocab_size"]), kwargs


def _gemma(config: dict[str, Any], defaults: dict[str, Any], path: str) -> dict[str, Any]:
    """The Transformer kwargs particular to Gemma 2/3 (the family's fixed options are its
    LM_MODELS entry)."""
    layers = int(config["num_hidden_layers"])
    types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % config.get("sliding_window_pattern", defaults["pattern"])
        else "full_attention" for i in range(layers)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != layers:
        raise _refuse(path, "layer_types", types, "it has sliding_attention and full_attention "
                      f"layers, one type per layer of num_hidden_layers={layers}")
    out: dict[str, Any] = dict(
        head_dim=int(config.get("head_dim") or defaults["head_dim"]),
        # kept as given: transformers' config classes take an int
        query_scale=config.get("query_pre_attn_scalar", defaults["query_pre_attn_scalar"]),
        attn_softcap=config.get("attn_logit_softcapping", defaults["attn_logit_softcapping"]),
        final_softcap=config.get("final_logit_softcapping",
                                 defaults["final_logit_softcapping"]),
        sliding_window=int(config.get("sliding_window") or defaults["sliding_window"]),
        sliding_layers=[i for i, t in enumerate(types) if t == "sliding_attention"])
    if "rope_local_base_freq" in defaults:  # Gemma 3: the sliding layers' own unscaled rotary
        local = (config.get("rope_parameters") or {}).get("sliding_attention") or {
            "rope_theta": config.get("rope_local_base_freq", defaults["rope_local_base_freq"])}
        if local.get("rope_type", "default") != "default":
            raise _refuse(path, "rope_parameters.sliding_attention.rope_type", local["rope_type"],
                          "Gemma 3's sliding layers rotate unscaled")
        out["local_rope_theta"] = float(local.get("rope_theta", defaults["rope_local_base_freq"]))
    return out


def read_weights(directory: str) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """(tensors, the file whose hash identifies them, the dtypes read) of a Hugging Face folder:
    model.safetensors, or every shard its index names, each checked whole."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is not a safetensors index (JSON with a "
                             f"\"weight_map\"; {e!r}): copy or download it again") from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if absent:
            raise FileNotFoundError(f"{index_path} names {len(absent)} shard(s) absent from "
                                    f"{directory}: {absent}; copy every shard of the checkpoint "
                                    f"into the folder")
        tensors: dict[str, np.ndarray] = {}
        lost = []
        for shard in shards:
            held = state_dict.read_safetensors(os.path.join(directory, shard))
            lost += sorted(n for n, file in weight_map.items() if file == shard and n not in held)
            tensors.update(held)
        if lost:
            raise ValueError(f"{index_path} places {len(lost)} tensor(s) in shards that do not "
                             f"hold them (e.g. {lost[0]!r} in {weight_map[lost[0]]}): the shards "
                             f"are not this index's; copy the checkpoint's own files again")
        source = index_path
    else:
        source = os.path.join(directory, WEIGHTS_FILE)
        if not os.path.isfile(source):
            others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pth", ".pt")))
            raise FileNotFoundError(
                f"--hf {directory!r} has neither {WEIGHTS_FILE} nor {INDEX_FILE}"
                + (f" (it has {others}: PyTorch pickles, which kdjax does not read here; "
                   f"re-save with model.save_pretrained(DIR, safe_serialization=True))"
                   if others else "; save the model with model.save_pretrained(DIR)"))
        tensors = state_dict.read_safetensors(source)
    return tensors, source, sorted({str(t.dtype) for t in tensors.values()})


def _tokenizer_size(directory: str, rows: int) -> int | None:
    """The tokens of the folder's tokenizer.json (None without one), refused when more than the
    embedding has rows."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from kdjax.lm.tokenizer import _import_tokenizers  # noqa: PLC0415  (optional extra)

    try:
        tokens = _import_tokenizers().Tokenizer.from_file(path).get_vocab_size(
            with_added_tokens=True)
    except Exception as e:  # noqa: BLE001  (tokenizers raises its own exception type)
        raise ValueError(f"{path} is not a tokenizer `tokenizers` can load ({e}): copy the "
                         f"model's own tokenizer.json again") from None
    if tokens > rows:
        raise ValueError(f"{path} has {tokens} tokens but the embedding (model.embed_tokens."
                         f"weight) has {rows} rows: it is not this model's tokenizer, whose ids "
                         f"must all have a row; copy the model's own tokenizer files")
    return tokens


def import_hf(directory: str, *, out: str, dataset: str | None = None,
              data_dir: str | None = None) -> importer.ImportReport:
    """Read the Hugging Face folder `directory` and write it as the LM run `out`.

    Args:
      directory: config.json, model.safetensors or its shards and index, tokenizer files.
      out: the run directory to create (must not exist).
      dataset: the prepared text dataset recorded as data.name (for `kdjax eval --workdir out`);
        prepare it with the folder's tokenizer (kdjax prepare text --tokenizer DIR/tokenizer.json).
      data_dir: where it is prepared.
    Raises:
      ValueError / FileNotFoundError naming the file and the fix (an unknown family or config
      value, a missing or corrupt shard, an unreadable dtype, a tokenizer larger than the
      embedding), LayoutMismatchError listing every tensor that does not fit; nothing is written.
    """
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists; pick a new path (an import never "
                         f"overwrites anything)")
    directory = os.path.abspath(directory)
    config = read_config(directory)
    family, vocab, kwargs = spec_from_config(config, os.path.join(directory, CONFIG_FILE))
    tensors, source, dtypes = read_weights(directory)
    notes = []
    buffers = [k for k in tensors if k.endswith(_BUFFER_SUFFIX)]
    if kwargs["tie_embeddings"] and "lm_head.weight" in tensors:
        buffers.append("lm_head.weight")  # the tied copy some savers write: the embedding's
    for k in buffers:
        del tensors[k]
    if buffers:
        notes.append(f"not read: {len(buffers)} tensor(s) the model derives ({buffers[0]}, ...)")
    tokens = _tokenizer_size(directory, vocab)
    if tokens is None:
        notes.append("no tokenizer.json in the folder: the run has no tokenizer (prepare text "
                     "data with the model's own tokenizer to train or evaluate on)")
    seq_len = int(config.get("max_position_embeddings", 2048))
    if dataset:
        from kdjax.lm import data as text_data  # noqa: PLC0415

        try:
            ds = text_data.open_text(dataset, data_dir)
        except FileNotFoundError:
            notes.append(f"--data {dataset!r} is not prepared yet under {data_dir or 'the data '}"
                         f"dir: prepare it with this model's tokenizer.json before kdjax eval")
        else:
            theirs = ds.meta["tokenizer"]
            given = (theirs.get("kind"), theirs.get("vocab_size"))
            if tokens is not None and given != ("hf", tokens):
                raise ValueError(
                    f"--data {dataset!r} ({ds.path}) is tokenized by a {theirs.get('kind')} "
                    f"tokenizer of {theirs.get('vocab_size')} tokens, not by this model's "
                    f"tokenizer.json ({tokens} tokens): its token ids would mean other text; "
                    f"prepare it with kdjax prepare text --tokenizer "
                    f"{os.path.join(directory, 'tokenizer.json')}")
            seq_len = ds.seq_len
    spec = ModelSpec(name=family, num_classes=vocab, input_shape=(seq_len,), kwargs=kwargs)
    abstract = spec.abstract()
    graphdef, _ = nnx.split(abstract)
    state = layouts.from_state_dict(abstract, tensors, "hf", source=source)
    _, params, model_state = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
    report = importer.ImportReport(
        out=out, spec=spec, layout="hf", source=directory, sha256=state_dict.sha256(source),
        format=f"safetensors ({', '.join(dtypes)})", num_params=count_params(params),
        preprocess={"mean": [], "std": []}, data=dataset or "", notes=tuple(notes),
        data_dir=os.path.abspath(data_dir) if data_dir else "")
    run_plan = plan_lib.as_plan({
        "model": {"name": family, "kwargs": kwargs, "num_classes": vocab},
        # the splits `kdjax prepare text` writes
        "data": {"name": dataset or "", "data_dir": report.data_dir, "train_split": "train",
                 "eval_split": "validation"},
        "train": {"steps": 0}, "loss": {"name": "ce"}})
    record = {"hf": {"dir": HF_DIR, "config": config},
              "tokenizer": ({"kind": "hf", "vocab_size": tokens, "file": "tokenizer.json"}
                            if tokens is not None else {}), "dataset": ""}

    def copy_files(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, HF_DIR))
        for name in (CONFIG_FILE, GENERATION_FILE, *TOKENIZER_FILES):
            if os.path.isfile(os.path.join(directory, name)):
                shutil.copy(os.path.join(directory, name), os.path.join(tmp, HF_DIR, name))

    importer.write_run(report, params, model_state, ARCHITECTURES[family], run_plan=run_plan,
                       record=record, extra_files=copy_files)
    return report


def describe(report: importer.ImportReport) -> str:
    k = report.spec.kwargs
    return (f"imported {report.source} ({report.format}) as a {report.spec.name} transformer "
            f"({report.num_params:,} parameters, {k['num_layers']} layers, d_model "
            f"{k['d_model']}, vocabulary {report.spec.num_classes}) into {report.out}")


# -- export ---------------------------------------------------------------------------------------


def _family(spec: ModelSpec, options: dict[str, Any]) -> str:
    """The Hugging Face family of an LM spec: its name, or for a kdjax-native model the family
    its options make it (Llama without any)."""
    if spec.name in lm_models.FAMILIES:
        family = spec.name
    elif options["qk_norm"]:
        family = "qwen3"
    elif options["qkv_bias"]:
        family = "qwen2"
    else:
        family = "mistral" if options["sliding_window"] else "llama"
    fits = {"llama": not (options["qkv_bias"] or options["qk_norm"] or options["sliding_window"]),
            "mistral": not (options["qkv_bias"] or options["qk_norm"]),
            "qwen2": options["qkv_bias"] and not (options["qk_norm"] or options["sliding_window"]),
            "qwen3": options["qk_norm"] and not (options["qkv_bias"] or options["sliding_window"]),
            "gemma2": not (options["qkv_bias"] or options["qk_norm"]),
            "gemma3_text": options["qk_norm"] and not options["qkv_bias"]}
    if not fits[family]:
        raise ValueError(f"model.name={spec.name!r} with qkv_bias={options['qkv_bias']}, qk_norm="
                         f"{options['qk_norm']}, sliding_window={options['sliding_window']} has "
                         f"no Hugging Face family (Qwen2 has q/k/v biases, Qwen3 q/k norms, "
                         f"Mistral a window): it cannot be exported with --format hf")
    return family


def _options(spec: ModelSpec) -> dict[str, Any]:
    """Every Transformer argument of `spec`: its kwargs over the registry's over the defaults."""
    defaults = {k: p.default for k, p in inspect.signature(
        lm_models.Transformer.__init__).parameters.items() if p.default is not p.empty}
    return {**defaults, **lm_models.LM_MODELS[spec.name], **spec.kwargs}


def hf_config(model: lm_models.Transformer, spec: ModelSpec, *, dtype: str,
              base: dict[str, Any] | None = None, tokens: dict[str, int] | None = None
              ) -> dict[str, Any]:
    """The config.json of `model` in its family; `base` (an imported folder's config) keeps its
    fields that change nothing computed (token ids, maximum positions)."""
    options = _options(spec)
    family = _family(spec, options)
    rope = {"rope_type": "default", "rope_theta": options["rope_theta"],
            **(options["rope_scaling"] or {})}
    config = {k: v for k, v in (base or {}).items() if k in (
        "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
        "initializer_range")} if (base or {}).get("model_type") == family else {}
    config.setdefault("max_position_embeddings", max(2048, spec.input_shape[0]))
    config.update({k: v for k, v in (tokens or {}).items() if k not in config})
    config.update(
        architectures=[ARCHITECTURES[family]], model_type=family, vocab_size=model.vocab_size,
        hidden_size=model.d_model, intermediate_size=model.layers[0].mlp.gate.out_features,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads, head_dim=model.head_dim, hidden_act="silu",
        rms_norm_eps=options["norm_eps"], rope_parameters=rope,
        tie_word_embeddings=model.tie_embeddings, dtype=dtype, use_cache=True,
        # transformers 4's names of the same (vLLM and older loaders read these)
        rope_theta=options["rope_theta"], rope_scaling=options["rope_scaling"], torch_dtype=dtype)
    if family in ("llama", "qwen3"):
        config["attention_bias"] = False
    if family == "mistral":
        config["sliding_window"] = options["sliding_window"]
    if family in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None)
    if family in _GEMMA_DEFAULTS:
        config.update(_gemma_config(options, model, rope))
    return config


def _gemma_config(options: dict[str, Any], model: lm_models.Transformer,
                  rope: dict[str, Any]) -> dict[str, Any]:
    windows = [block.attention.sliding_window for block in model.layers]
    out = dict(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
               attention_bias=False, query_pre_attn_scalar=options["query_scale"] or model.head_dim,
               attn_logit_softcapping=options["attn_softcap"],
               final_logit_softcapping=options["final_softcap"],
               sliding_window=(options["sliding_window"]
                               or _GEMMA_DEFAULTS["gemma2"]["sliding_window"]),
               layer_types=["full_attention" if w is None else "sliding_attention"
                            for w in windows])
    if options["local_rope_theta"] is not None:  # Gemma 3
        local = {"rope_type": "default", "rope_theta": options["local_rope_theta"]}
        out.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                   rope_local_base_freq=options["local_rope_theta"])
    return out


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if groups[-1] and size + x.nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = x
        size += x.nbytes
    return groups


def tokenizer_source(workdir: str, run: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(the folder holding the run's Hugging Face tokenizer files, the imported config) of a run
    recorded by an import (RUN/hf) or by a student started from one."""
    hf = run.get("hf") or {}
    if hf.get("dir"):
        return os.path.join(workdir, hf["dir"]), hf.get("config", {})
    tokenizer = run.get("tokenizer") or {}
    if tokenizer.get("kind") == "hf" and run.get("dataset"):
        return run["dataset"], {}
    return None, {}


def _token_ids(description: dict[str, Any], directory: str | None) -> dict[str, int]:
    """bos/eos ids of the run's tokenizer for the config ({} when it names none)."""
    from kdjax.lm import tokenizer as tokenizer_lib  # noqa: PLC0415

    if description.get("kind") == "byte":
        tok = tokenizer_lib.ByteTokenizer()
    elif description.get("kind") == "hf" and directory is not None:
        try:
            tok = tokenizer_lib.HFTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        except ValueError:  # no token named like a bos/eos: transformers' defaults stand
            return {}
    else:
        return {}
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eos}


def export(workdir: str, out: str, *, step: str | int = "latest", dtype: str = "float32",
           max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> str:
    """`kdjax export --format hf`: the LM student of `workdir` as a Hugging Face folder in `out`
    (config.json, model.safetensors or shards with their index above `max_shard_bytes`,
    generation_config.json, the tokenizer files the run has), written whole or not at all."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16 for --format hf, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"--max-shard-mb must be positive, got {max_shard_bytes / 2**20:g}")
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists; pick a new path (an export never "
                         f"overwrites anything)")
    _, _, run, spec, model = checkpoint.read_model(workdir, step)
    if spec.name not in lm_models.LM_MODELS:
        raise ValueError(f"--format hf writes kdjax's language models; {workdir!r} holds "
                         f"{spec.name!r}: use --format safetensors or torch (a PyTorch module "
                         f"saves its own Hugging Face folder with save_pretrained)")
    tok_dir, base = tokenizer_source(workdir, run)
    tokens = {} if "bos_token_id" in base else _token_ids(run.get("tokenizer") or {}, tok_dir)
    config = hf_config(model, spec, dtype=dtype, base=base, tokens=tokens)
    np_dtype = state_dict.FLOAT_DTYPES["BF16" if dtype == "bfloat16" else "F32"]
    tensors = {k: v.astype(np_dtype) for k, v in layouts.to_state_dict(model, "hf").items()}
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if config.get(k) is not None}
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the export private to this user
        shards = _shards(tensors, max_shard_bytes)
        meta = {"format": "pt"}  # what transformers' loader expects in the header
        if len(shards) == 1:
            state_dict.write_safetensors(os.path.join(tmp, WEIGHTS_FILE), shards[0], meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                state_dict.write_safetensors(os.path.join(tmp, name), shard, meta)
                weight_map.update(dict.fromkeys(shard, name))
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                           "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        if tok_dir is not None and os.path.isfile(os.path.join(tok_dir, GENERATION_FILE)):
            shutil.copy(os.path.join(tok_dir, GENERATION_FILE), os.path.join(tmp, GENERATION_FILE))
        else:
            with open(os.path.join(tmp, GENERATION_FILE), "w") as f:
                json.dump(generation, f, indent=2)
        for name in TOKENIZER_FILES if tok_dir is not None else ():
            if os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copy(os.path.join(tok_dir, name), os.path.join(tmp, name))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
