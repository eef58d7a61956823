"""Hugging Face checkpoints in and out (kdjax.lm.hf): the mapping against an independent numpy
forward of the same weights (no transformers needed), against `transformers` itself for every
family, export back to `from_pretrained`, KV-cached sampling with the new options, every refusal,
and a tiny distillation from an imported Qwen-layout teacher into an imported student."""

import json
import math
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from _float32 import assert_close
from kdjax import checkpoint, cli, export
from kdjax.interop import state_dict
from kdjax.lm import hf, models as lm_models, sampling, task as lm_task, tokenizer as tokenizer_lib
from test_lm_sampling import PROMPTS, _full_recompute

pytestmark = pytest.mark.usefixtures("quick_compiles")
TOKENS = np.array([[1, 17, 4, 250, 33, 8, 99, 2, 61, 7]])  # T = 10

# Tiny configs of each family, in the Hugging Face field names (transformers 4's rope names for
# Llama, 5's for the others: both are read).
FAMILIES = {
    "llama3": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=300,
                   hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu",
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=300,
                    hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6,
                    sliding_window=3, tie_word_embeddings=False, head_dim=8,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=300,
                  hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=300,
                  hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # soft caps small enough to bend these weights' scores and logits
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], vocab_size=300,
                   hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=12,
                   attn_logit_softcapping=2.0, final_logit_softcapping=5.0, sliding_window=3,
                   layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=300,
                   hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=12,
                   attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=3,
                   layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 1000000.0},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 10000.0}}),
}
GEMMA = ("gemma2", "gemma3_text")


def _weights(config, seed=0):
    """Random HF-named weights, large enough that every part moves the logits."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, k = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // h

    def lin(o, i):
        return (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)

    def norm(n):
        return (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32),
         "model.norm.weight": norm(d)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight":
                  norm(d), p + "self_attn.q_proj.weight": lin(h * hd, d),
                  p + "self_attn.k_proj.weight": lin(k * hd, d),
                  p + "self_attn.v_proj.weight": lin(k * hd, d),
                  p + "self_attn.o_proj.weight": lin(d, h * hd), p + "mlp.gate_proj.weight":
                  lin(f, d), p + "mlp.up_proj.weight": lin(f, d),
                  p + "mlp.down_proj.weight": lin(d, f)})
        if config["model_type"] == "qwen2":
            for n, o in (("q", h), ("k", k), ("v", k)):
                w[p + f"self_attn.{n}_proj.bias"] = (0.3 * rng.standard_normal(o * hd)).astype(
                    np.float32)
        if config["model_type"] in ("qwen3", "gemma3_text"):
            w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"] = norm(hd), norm(hd)
        if config["model_type"] in GEMMA:
            w[p + "pre_feedforward_layernorm.weight"] = norm(d)
            w[p + "post_feedforward_layernorm.weight"] = norm(d)
    return w


def _inv_freq(rope, hd):
    """Rotary frequencies of a Hugging Face rope dict, rescaled as its rope_type says."""
    inv = 1.0 / rope["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    if rope.get("rope_type") == "linear":
        return inv / rope["factor"]
    if rope.get("rope_type") != "llama3":
        return inv
    old, factor = rope["original_max_position_embeddings"], rope["factor"]  # Llama 3.1's bands
    lo, hi = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    out = []
    for f in inv:
        wave = 2 * math.pi / f
        if wave < hi:
            out.append(f)
        elif wave > lo:
            out.append(f / factor)
        else:
            s = (old / wave - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


def reference_logits(config, w, tokens):
    """The forward of Llama/Mistral/Qwen2/Qwen3/Gemma 2/Gemma 3 written out in float64 numpy
    from the papers' and transformers' definitions, independently of kdjax's code."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    d, h, k = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps = config.get("head_dim") or d // h, config["rms_norm_eps"]
    gemma = config["model_type"] in GEMMA
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}),
                                             "rope_theta": config.get("rope_theta")}
    t = len(tokens)
    i, j = np.arange(t)[:, None], np.arange(t)[None]

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * ((1 + g) if gemma else g)

    def act(x):
        if gemma:  # GELU, tanh approximation
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        return x / (1 + np.exp(-x))

    def cap(x, c):
        return x if c is None else np.tanh(x / c) * c

    x = w["model.embed_tokens.weight"][tokens]
    if gemma:
        x = x * float(np.float32(d ** 0.5))
    for layer in range(config["num_hidden_layers"]):
        kind = config.get("layer_types", ["full_attention"] * 99)[layer]
        window = config.get("sliding_window") if (
            config["model_type"] == "mistral" or kind == "sliding_attention") else None
        allowed = (j <= i) & ((i - j < window) if window else True)
        inv = _inv_freq(rope.get(kind, rope), hd)  # Gemma 3's: per layer type
        angle = np.arange(t)[:, None] * np.concatenate([inv, inv])[None]
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

        def rotate(x, cos=cos, sin=sin):
            return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin + x * cos

        p = f"model.layers.{layer}."
        a = rms(x, w[p + "input_layernorm.weight"])
        q, kk, v = (a @ w[p + f"self_attn.{n}_proj.weight"].T + w.get(
            p + f"self_attn.{n}_proj.bias", 0.0) for n in "qkv")
        q, kk, v = q.reshape(t, h, hd), kk.reshape(t, k, hd), v.reshape(t, k, hd)
        if p + "self_attn.q_norm.weight" in w:
            q = rms(q, w[p + "self_attn.q_norm.weight"])
            kk = rms(kk, w[p + "self_attn.k_norm.weight"])
        q, kk = rotate(q), rotate(kk)
        scale = config["query_pre_attn_scalar"] ** -0.5 if gemma else hd ** -0.5
        heads = []
        for head in range(h):
            kv = head // (h // k)
            s = cap(q[:, head] @ kk[:, kv].T * scale, config.get("attn_logit_softcapping"))
            s = np.where(allowed, s, -np.inf)
            prob = np.exp(s - s.max(-1, keepdims=True))
            heads.append((prob / prob.sum(-1, keepdims=True)) @ v[:, kv])
        o = np.concatenate(heads, -1) @ w[p + "self_attn.o_proj.weight"].T
        if gemma:  # a norm after each sub-layer too
            x = x + rms(o, w[p + "post_attention_layernorm.weight"])
            m = rms(x, w[p + "pre_feedforward_layernorm.weight"])
        else:
            x = x + o
            m = rms(x, w[p + "post_attention_layernorm.weight"])
        f = (act(m @ w[p + "mlp.gate_proj.weight"].T) * (m @ w[p + "mlp.up_proj.weight"].T)) @ w[
            p + "mlp.down_proj.weight"].T
        x = x + (rms(f, w[p + "post_feedforward_layernorm.weight"]) if gemma else f)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return cap(rms(x, w["model.norm.weight"]) @ head.T, config.get("final_logit_softcapping"))


def _terms(config):
    """The additions along the longest chain of float32 reductions (tests/_float32.py)."""
    d, f = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    return config["num_hidden_layers"] * (4 * d + hd + TOKENS.shape[1] + f) + 2 * d


def _folder(path, config, weights, *, shard_every=0, writer=None):
    """A Hugging Face folder written without transformers: safetensors' own numpy writer (our
    raw writer only where numpy cannot: bfloat16), sharded `shard_every` tensors a file."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    write = writer or (lambda p, t: safetensors.numpy.save_file(t, p, metadata={"format": "pt"}))
    if not shard_every:
        write(os.path.join(path, "model.safetensors"), weights)
        return str(path)
    names = sorted(weights)
    groups = [names[i:i + shard_every] for i in range(0, len(names), shard_every)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write(os.path.join(path, file), {n: weights[n] for n in group})
        weight_map.update(dict.fromkeys(group, file))
    with open(os.path.join(path, hf.INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


def _logits(run):
    *_, model = checkpoint.read_model(run)
    return np.asarray(model(TOKENS))[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_computes_the_numpy_reference(family, tmp_path):
    config = FAMILIES[family]
    weights = _weights(config)
    src = _folder(tmp_path / "src", config, weights, shard_every=7 if family == "qwen3" else 0)
    hf.import_hf(src, out=str(tmp_path / "run"))
    want = reference_logits(config, weights, TOKENS[0])
    assert_close(_logits(tmp_path / "run"), want, n=_terms(config), err_msg=family)
    # Each family's option matters: the same weights without Llama 3's rope rescaling, Mistral's
    # window, Qwen2's biases or Qwen3's q/k norms compute something else.
    without = {"llama3": ({**config, "rope_scaling": None}, weights),
               "mistral": ({**config, "sliding_window": None}, weights),
               "qwen2": (config, {k: v for k, v in weights.items() if not k.endswith(".bias")}),
               "qwen3": (config, {k: v for k, v in weights.items() if "_norm." not in k}),
               "gemma2": ({**config, "attn_logit_softcapping": None,
                           "final_logit_softcapping": None}, weights),
               "gemma3": ({**config, "layer_types": ["full_attention"] * 2}, weights)}[family]
    assert np.abs(reference_logits(*without, TOKENS[0]) - want).max() > 0.05 * np.abs(want).max()


def test_bf16_shards_are_read_exactly(tmp_path):
    import ml_dtypes

    config = FAMILIES["qwen2"]
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in _weights(config).items()}
    # the tied head as some savers also write it: the embedding's copy, not read
    files = {**bf16, "lm_head.weight": bf16["model.embed_tokens.weight"]}
    src = _folder(tmp_path / "src", config, files, shard_every=5,
                  writer=lambda p, t: state_dict.write_safetensors(p, t, {"format": "pt"}))
    report = hf.import_hf(src, out=str(tmp_path / "run"))
    assert report.format == "safetensors (bfloat16)"
    assert report.notes[0] == "not read: 1 tensor(s) the model derives (lm_head.weight, ...)"
    _, _, run, _, model = checkpoint.read_model(tmp_path / "run")
    # bfloat16 widens to float32 exactly
    np.testing.assert_array_equal(np.asarray(model.layers[1].attention.k.bias[...]),
                                  bf16["model.layers.1.self_attn.k_proj.bias"].astype(np.float32))
    want = reference_logits(config, {k: v.astype(np.float32) for k, v in bf16.items()}, TOKENS[0])
    assert_close(_logits(tmp_path / "run"), want, n=_terms(config))
    assert run["hf"]["config"]["model_type"] == "qwen2" and run["imported"]["layout"] == "hf"


@pytest.mark.parametrize("options", [
    dict(qkv_bias=True, qk_norm=True, sliding_window=3,
         rope_scaling=FAMILIES["llama3"]["rope_scaling"]),
    dict(qk_norm=True, norm_offset=1.0, embed_scale=True, activation="gelu_tanh",
         sandwich_norms=True, query_scale=12, attn_softcap=2.0, final_softcap=5.0,
         sliding_window=3, sliding_layers=[0], local_rope_theta=100.0,
         rope_scaling={"rope_type": "linear", "factor": 4.0})], ids=["llama-qwen-mistral", "gemma"])
def test_kv_cached_sampling_with_the_new_options(options):
    model = lm_models.Transformer(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, rngs=nnx.Rngs(0), **options)
    nnx.update(model, jax.tree.map(lambda x: x * 8, nnx.state(model, nnx.Param)))
    config = sampling.SamplingConfig()
    tokens, logits = sampling.generate(model, PROMPTS, max_new_tokens=6, return_logits=True)
    want_tokens, want_logits = _full_recompute(model, config, new_tokens=6)
    np.testing.assert_array_equal(tokens, want_tokens)
    assert_close(logits, want_logits, n=2 * (4 * 32 + 8 + 16 + 96) + 64)


# -- refusals --------------------------------------------------------------------------------------


def _refused(tmp_path, src, match, error=ValueError):
    out = tmp_path / "refused"
    with pytest.raises(error, match=match):
        hf.import_hf(str(src), out=str(out))
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no run, no temporary directory


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not a family kdjax computes .*--torch "
                             r"kdjax.torchbridge.causal_lm:from_config --torch-kwargs "
                             r"'\{\"config\": \".*src\"\}' --from .*src/model.safetensors"),
    ({"model_type": "gemma"}, r"'gemma': Gemma 1 is not yet supported .*PyTorch bridge.*--torch "
                              r"kdjax.torchbridge.causal_lm:from_config"),
    ({"model_type": "gemma3"}, r"a multimodal Gemma 3 is not yet supported .*gemma3_text"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     r"config.json: rope_scaling.rope_type=\"yarn\" is not implemented.*'default', 'llama3'"),
    ({"hidden_act": "gelu"}, r"hidden_act=\"gelu\" is not implemented .*a llama feed-forward's "
                             r"gate is silu"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     r"rope_scaling of type 'llama3' lacks \['low_freq_factor'"),
])
def test_config_values_kdjax_does_not_compute_are_refused(change, match, tmp_path):
    config = {**FAMILIES["llama3"], **change}
    _refused(tmp_path, _folder(tmp_path / "src", config, _weights(FAMILIES["llama3"])), match)


def test_broken_checkpoints_are_refused_before_any_directory(tmp_path):
    config = FAMILIES["llama3"]
    src = _folder(tmp_path / "src", config, _weights(config), shard_every=6)
    shards = sorted(f for f in os.listdir(src) if f.startswith("model-"))
    os.rename(os.path.join(src, shards[1]), os.path.join(src, "moved"))
    _refused(tmp_path, src, rf"names 1 shard\(s\) absent .*\['{shards[1]}'\]; copy every shard",
             FileNotFoundError)
    with open(os.path.join(src, "moved"), "rb") as f:
        data = f.read()
    with open(os.path.join(src, shards[1]), "wb") as f:
        f.write(data[:-40])  # a download cut short
    _refused(tmp_path, src, rf"{shards[1]} is truncated or corrupt: tensor .* copy or download")
    with open(os.path.join(src, shards[1]), "wb") as f:
        f.write(b"\x00" * 100)
    _refused(tmp_path, src, rf"{shards[1]} is not a readable .safetensors file")
    os.rename(os.path.join(src, "moved"), os.path.join(src, shards[1]))
    with open(os.path.join(src, hf.INDEX_FILE)) as f:
        index = json.load(f)
    index["weight_map"]["model.norm.weight"] = shards[0]  # an index of another sharding
    with open(os.path.join(src, hf.INDEX_FILE), "w") as f:
        json.dump(index, f)
    assert "model.norm.weight" not in safetensors.numpy.load_file(os.path.join(src, shards[0]))
    _refused(tmp_path, src, rf"places 1 tensor\(s\) in shards that do not hold them \(e.g. "
                            rf"'model.norm.weight' in {shards[0]}\)")
    os.remove(os.path.join(src, shards[1]))
    os.remove(os.path.join(src, hf.INDEX_FILE))
    _refused(tmp_path, src, "has neither model.safetensors nor model.safetensors.index.json",
             FileNotFoundError)


def test_an_unreadable_dtype_and_a_foreign_tokenizer_are_refused(tmp_path, text_dir):
    config = FAMILIES["qwen2"]
    weights = _weights(config)
    weights["model.layers.0.mlp.up_proj.weight"] = np.zeros((48, 32), np.int8)
    src = _folder(tmp_path / "src", config, weights)
    _refused(tmp_path, src, r"'model.layers.0.mlp.up_proj.weight' is I8, a dtype kdjax cannot "
                            r"read .*save the model unquantized")
    os.remove(os.path.join(src, "model.safetensors"))
    safetensors.numpy.save_file(_weights(config), os.path.join(src, "model.safetensors"))
    tokenizer_lib.train_bpe(["one two three four five six seven"] * 10, 264).save(src)
    big = {**config, "vocab_size": 262}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(big, f)
    _refused(tmp_path, src, r"tokenizer.json has 2\d\d tokens but the embedding .* has 262 rows: "
                            r"it is not this model's tokenizer")
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"--data 'tiny' .* is tokenized by a byte tokenizer of "
                                         r"259 tokens, not by this model's tokenizer.json .*"
                                         r"--tokenizer .*src/tokenizer.json"):
        hf.import_hf(src, out=str(tmp_path / "refused"), dataset="tiny", data_dir=text_dir)
    assert sorted(os.listdir(tmp_path)) == ["src"]


# -- with transformers -----------------------------------------------------------------------------


def _hf_model(family, **extra):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = {k: v for k, v in FAMILIES[family].items() if k not in ("architectures",)}
    config["max_position_embeddings"] = 64
    cls = getattr(transformers, FAMILIES[family]["architectures"][0])
    model_config = transformers.AutoConfig.for_model(**{**config, **extra})
    model = cls(model_config)
    weights = _weights(config)
    with torch.no_grad():  # weights of unit scale, so that every part moves the logits
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(weights[name]))
    return model.eval()


def _torch_logits(model_or_dir):
    import torch
    import transformers

    model = (transformers.AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
             if isinstance(model_or_dir, str) else model_or_dir)
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_logits_in_and_out(family, tmp_path):
    model = _hf_model(family)
    model.save_pretrained(tmp_path / "src")
    want = _torch_logits(model)
    n = _terms(FAMILIES[family])
    assert cli.main(["import", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 0
    assert_close(_logits(tmp_path / "run"), want, n=n, err_msg="import")
    # back out, sharded, and loaded by transformers
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                     "--format", "hf", "--max-shard-mb", "0.02"]) == 0
    assert os.path.isfile(tmp_path / "out" / hf.INDEX_FILE)
    assert_close(_torch_logits(str(tmp_path / "out")), want, n=n, err_msg="export")
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["model_type"] == FAMILIES[family]["model_type"]


def test_bf16_sharded_save_pretrained_through_kdjax_export_load(tmp_path):
    model = _hf_model("qwen3", tie_word_embeddings=True)
    import torch

    model.to(torch.bfloat16).save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "src" / hf.INDEX_FILE)
    # the bf16 weights computed in float32 (loaded afresh: `.to(bfloat16)` also rounded the
    # model's rotary-frequency buffer, which a load recomputes)
    want = _torch_logits(str(tmp_path / "src"))
    hf.import_hf(str(tmp_path / "src"), out=str(tmp_path / "run"))
    lm_task.export(str(tmp_path / "run"), str(tmp_path / "exp"))
    loaded, _ = export.load(str(tmp_path / "exp"))
    assert_close(np.asarray(loaded(TOKENS))[0], want, n=_terms(FAMILIES["qwen3"]))


def test_a_kdjax_native_model_exports_as_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = lm_models.create_lm("lm_tiny", vocab_size=300, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: x * 20, nnx.state(model, nnx.Param)))
    from kdjax.models import ModelSpec

    spec = ModelSpec(name="lm_tiny", num_classes=300, input_shape=(16,))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    checkpoint.save_model_only(str(tmp_path / "run"), params, rest,
                               {"model": spec.to_json(), "tokenizer": {"kind": "byte"}})
    hf.export(str(tmp_path / "run"), str(tmp_path / "out"), dtype="bfloat16")
    with open(tmp_path / "out" / "config.json") as f:
        config = json.load(f)
    assert (config["architectures"], config["bos_token_id"], config["eos_token_id"]) == (
        ["LlamaForCausalLM"], 1, 2)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert next(back.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        theirs = back.float()(torch.tensor(TOKENS)).logits.numpy()[0]
    ours = np.asarray(model(TOKENS))[0]
    # bfloat16 weights: 8 significant bits, so a relative error of a few 2^-8 in the logits
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()
    assert np.mean(theirs.argmax(-1) == ours.argmax(-1)) >= 0.9


def test_distill_imported_qwen_teacher_into_imported_student_then_generate(tmp_path, capsys):
    """The issue's scenario in miniature: a Qwen2 teacher with padding rows beyond its tokenizer,
    a Qwen3 student started from one of its own two blocks (init.layers), both imported; distil,
    export --format hf, and transformers generates from the export."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from conftest import ROOT, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    tok = tokenizer_lib.train_bpe([p.read_text() for p in corpus.iterdir()], 280)
    chat = {"chat_template": "{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}",
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    torch.manual_seed(0)
    folders = {}
    for name, cls, config in (
            ("teacher", transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
                vocab_size=tok.vocab_size + 8, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                tie_word_embeddings=True, initializer_range=0.2)),
            ("student", transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
                vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, head_dim=8,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                initializer_range=0.2))):
        folders[name] = str(tmp_path / f"hf_{name}")
        cls(config).save_pretrained(folders[name])
        tok.save(folders[name])
        with open(os.path.join(folders[name], "tokenizer_config.json"), "w") as f:
            json.dump(chat, f)
    data = str(tmp_path / "data")
    assert cli.main(["prepare", "text", "--from", str(corpus), "--name", "code", "--seq-len", "16",
                     "--held-out", "0.2", "--data-dir", data, "--tokenizer",
                     os.path.join(folders["teacher"], "tokenizer.json")]) == 0
    runs = {name: str(tmp_path / name) for name in folders}
    for name, run in runs.items():
        assert cli.main(["import", "--hf", folders[name], "--out", run, "--data", "code",
                         "--data-dir", data]) == 0
    # the imported teacher evaluates on its data as any run does
    assert cli.main(["eval", "--workdir", runs["teacher"], "--config.lm.eval_rows=8",
                     "--config.eval.batch_size=8", "--config.lm.prompts=()",
                     "--no-progress"]) == 0
    assert '"eval/perplexity"' in capsys.readouterr().out
    student = str(tmp_path / "kd")
    assert cli.main([
        "distill", "--config", os.path.join(ROOT, "experiments", "lm", "distill.py"),
        "--workdir", student, f"--config.data.data_dir={data}", "--config.data.name=code",
        f"--config.teacher.workdir={runs['teacher']}", f"--config.init.workdir={runs['student']}",
        "--config.init.layers=[1]", "--config.model.name=qwen3", "--config.train.steps=4",
        "--config.train.batch_size=4", "--config.eval.batch_size=8", "--config.lm.eval_rows=8",
        "--config.eval.every_steps=4", "--config.checkpoint.every_steps=4",
        "--config.train.log_every_steps=2", "--config.lm.prompts=()", "--config.lm.chunk_size=8",
        "--config.optimizer.warmup_steps=0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (f"has {tok.vocab_size + 8} vocabulary rows, the student {tok.vocab_size}, with the "
            f"same tokenizer" in out and "sliced off" in out)
    assert "the student keeps blocks [1] of init.workdir's 2" in out
    exported = str(tmp_path / "export")
    with pytest.raises(SystemExit):  # Hugging Face options without --format hf
        cli.main(["export", "--workdir", student, "--out", exported, "--dtype", "bfloat16"])
    assert "--dtype: only for --format hf" in capsys.readouterr().err
    assert cli.main(["export", "--workdir", student, "--out", exported, "--format", "hf"]) == 0
    with open(os.path.join(exported, "config.json")) as f:
        config = json.load(f)
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == (
        "qwen3", 1, tok.vocab_size)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "def f1(x):"}],
                                        tokenize=False)
    assert prompt == "<bos>def f1(x):<eos>"
    ids = torch.tensor([[tok.bos, *tok.encode("def f1(x):")]])
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False,
                                   pad_token_id=tok.pad)
        theirs = model(ids).logits.numpy()[0]
    assert generated.shape == (1, ids.shape[1] + 5)
    *_, ours = checkpoint.read_model(student)
    assert_close(np.asarray(ours(ids.numpy()))[0], theirs, n=4 * 16 + 8 + 32 + 16)


def test_init_layers_and_padding_rows_reshape_a_model_exactly():
    from kdjax import plan as plan_lib
    from kdjax.compress import training
    from kdjax.models import ModelSpec

    spec = ModelSpec(name="qwen3", num_classes=50, input_shape=(8,),
                     kwargs=dict(d_model=16, num_layers=3, num_heads=2))
    model = spec.build(seed=3)
    small, kept = lm_models.keep_layers(model, spec, [0, 2])
    assert small.kwargs["num_layers"] == kept.num_layers == 2
    np.testing.assert_array_equal(kept.layers[1].attention.k_norm.scale[...],
                                  model.layers[2].attention.k_norm.scale[...])
    np.testing.assert_array_equal(kept.embed.embedding[...], model.embed.embedding[...])
    with pytest.raises(ValueError, match=r"init.layers=\[0, 3, 3\] must be distinct block indices "
                                         r"in \[0, 3\) .*out of range: \[3, 3\], repeated: \[3\]"):
        lm_models.keep_layers(model, spec, [0, 3, 3])
    with pytest.raises(ValueError, match=r"init.layers=\[0\] picks blocks of init.workdir's "
                                         r"model, and init.workdir is not set"):
        training.initial_student(plan_lib.as_plan({"model": {"name": "qwen3"},
                                                   "init": {"layers": [0]}}), spec)
    # the first 40 rows of the vocabulary compute the first 40 logits, exactly
    sliced_spec, sliced = lm_models.slice_vocab(model, spec, 40)
    assert sliced_spec.num_classes == sliced.vocab_size == 40
    tokens = np.array([[1, 5, 39, 7]])
    np.testing.assert_array_equal(np.asarray(sliced(tokens)), np.asarray(model(tokens))[..., :40])


def test_the_chunked_loss_refuses_gemma2s_logit_soft_cap():
    from kdjax.lm.objective import TokenObjective

    model = lm_models.Transformer(vocab_size=40, d_model=16, num_layers=1, num_heads=2,
                                  final_softcap=30.0, rngs=nnx.Rngs(0))
    hidden = model.features(TOKENS[:, :4] % 40, logits=False)["hidden"]
    with pytest.raises(ValueError, match=r"lm.chunk_size=8: the chunked loss .* soft cap "
                                         r"\(final_softcap=30.0\); set lm.chunk_size=0"):
        TokenObjective(chunk_size=8).terms(model, hidden, None, None, np.zeros((1, 4), int),
                                           np.ones((1, 4), bool))


def test_blockwise_attention_computes_the_families_options_too():
    """Rows longer than attention_block attend blockwise (kdjax.lm.attention): with Gemma's
    score scale, soft cap and alternating windows, the same logits as the whole scores."""
    options = dict(vocab_size=300, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   qk_norm=True, norm_offset=1.0, embed_scale=True, activation="gelu_tanh",
                   sandwich_norms=True, query_scale=12, attn_softcap=2.0, final_softcap=5.0,
                   sliding_window=3, sliding_layers=[0], local_rope_theta=100.0)
    whole = lm_models.Transformer(attention_block=0, rngs=nnx.Rngs(0), **options)
    nnx.update(whole, jax.tree.map(lambda x: x * 8, nnx.state(whole, nnx.Param)))
    blocks = lm_models.Transformer(attention_block=4, rngs=nnx.Rngs(0), **options)
    nnx.update(blocks, nnx.state(whole))
    assert_close(np.asarray(blocks(TOKENS)), np.asarray(whole(TOKENS)),
                 n=2 * (4 * 32 + 8 + 16 + 48) + 64)
