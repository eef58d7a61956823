"""LoRA students (kdjax.lora, model.lora): the merge equals the adapted forward, only the adapters
train and are saved, the frozen base stays bit-identical, a LoRA distillation from an lm_tiny
init.workdir resumes and exports (merged, and separately in PEFT's layout), and bad model.lora
values are refused before any directory is made."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import _float32
from conftest import ROOT
from kdjax import checkpoint, cli, export, lora, models, plan as plan_lib, sharding
from kdjax.interop import state_dict
from kdjax.lm import models as lm_models
from kdjax.lm.step import TokenObjective, make_lm_step
from kdjax.step import DeviceData, init_train_state

EXP = os.path.join(ROOT, "experiments", "lm")
pytestmark = pytest.mark.usefixtures("quick_compiles")
TINY = ["--config.data.name=tiny", "--config.train.batch_size=4", "--config.eval.batch_size=8",
        "--config.lm.eval_rows=8", "--config.lm.prompts=()", "--config.lm.chunk_size=8",
        "--config.optimizer.warmup_steps=0", "--config.model.name=lm_tiny", "--no-progress"]
RANK, ALPHA = 4, 8.0
LORA = [f"--config.model.lora.rank={RANK}", f"--config.model.lora.alpha={ALPHA}"]
SPEC = models.ModelSpec("lm_tiny", 40, (8,))


def _section(**lora_keys):
    return plan_lib.as_plan({"model": {"lora": {"rank": RANK, "alpha": ALPHA, **lora_keys}}}
                            ).model.lora


def _adapted(seed=0, **lora_keys):
    model = SPEC.build(seed)
    lora.apply(model, _section(**lora_keys), seed=seed)
    return model


def test_merged_weights_equal_the_adapted_forward():
    model = _adapted()
    key = jax.random.key(1)
    for _, node in nnx.iter_graph(model):  # B is zero at init; make the adapters matter
        if isinstance(node, lora.LoRALinear):
            key, sub = jax.random.split(key)
            node.lora_b[...] = 0.2 * jax.random.normal(sub, node.lora_b.shape)
    tokens = jax.random.randint(jax.random.key(2), (3, 8), 0, 40)
    forward = nnx.jit(lambda m, t: m(t))
    adapted = np.asarray(forward(model, tokens))
    merged = lora.merged(model, SPEC)
    assert type(merged) is lm_models.Transformer
    assert not any(isinstance(n, lora.LoRALinear) for _, n in nnx.iter_graph(merged))
    plain = np.asarray(forward(merged, tokens))
    # every layer's matmul (64 inputs at most) plus the rank-4 path, summed through 2 blocks
    _float32.assert_close(plain, adapted, n=2 * (64 + RANK) + 32)
    # and the adapters moved the function: the base alone is far from it
    base = np.asarray(forward(SPEC.build(0), tokens))
    assert np.abs(base - adapted).max() > 1e3 * np.abs(plain - adapted).max()


def test_only_the_adapters_have_optimizer_state_and_the_base_stays_fixed():
    model = _adapted()
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, lora.Frozen))}
    graphdef, state = init_train_state(model, optax.adam(1e-2), seed=0, num_examples=8)
    names = {p[-1] for p, _ in nnx.to_flat_state(state.params)}
    assert names == {"lora_a", "lora_b"}
    d, r, ff, layers = 32, RANK, 64, 2
    # per block: q (32x32), k, v (32x16 each: 2 kv heads of 8), o (32x32), gate/up (32x64),
    # down (64x32); A is [in, r] and B [r, out]
    per_block = sum(r * (i + o) for i, o in ((d, d), (d, 16), (d, 16), (d, d), (d, ff),
                                             (d, ff), (ff, d)))
    adapter_bytes = 4 * layers * per_block
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    assert param_bytes == adapter_bytes
    assert opt_bytes == 2 * adapter_bytes + 4  # Adam's mu and nu, and its int32 count
    full = sum(x.nbytes for x in jax.tree.leaves(nnx.state(SPEC.build(0), nnx.Param)))
    assert adapter_bytes < full / 3

    rng = np.random.default_rng(0)
    data = DeviceData({"tokens": jnp.asarray(rng.integers(1, 40, (8, 9)), jnp.int32),
                       "segments": jnp.ones((8, 9), jnp.int32)}, batch_size=4)
    step = make_lm_step(graphdef, optax.adam(1e-2), TokenObjective(), teacher=None, data=data,
                        mesh=sharding.make_mesh())
    for _ in range(3):
        state, _ = step(state)
    trained = nnx.merge(graphdef, state.params, state.model_state).student
    after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(trained, lora.Frozen))}
    assert before.keys() == after.keys() and len(before) == 21  # per block 7 kernels and 2 norms;
    # the embedding, the final norm and the head
    for p in before:
        np.testing.assert_array_equal(after[p], before[p], err_msg=str(p))
    moved = [np.abs(np.asarray(v[...])).max() for p, v in nnx.to_flat_state(state.params)
             if p[-1] == "lora_b"]
    assert min(moved) > 0  # every B left zero: the adapters trained


def _args(command, workdir, text_dir, *extra, steps=4):
    return [command, "--config", f"{EXP}/{'teacher.py' if command == 'train' else 'distill.py'}",
            "--workdir", str(workdir), f"--config.data.data_dir={text_dir}",
            f"--config.train.steps={steps}", f"--config.eval.every_steps={steps}",
            "--config.checkpoint.every_steps=2", "--config.train.log_every_steps=2", *TINY,
            *extra]


@pytest.fixture(scope="module")
def base(text_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora") / "base"
    assert cli.main(_args("train", workdir, text_dir)) == 0
    return str(workdir)


@pytest.fixture(scope="module")
def lora_run(base, text_dir, tmp_path_factory):
    """A rank-4 LoRA student of the base distilled from the base, interrupted after 2 of 4 steps
    and resumed."""
    workdir = tmp_path_factory.mktemp("lora") / "lora"
    common = (f"--config.teacher.workdir={base}", f"--config.init.workdir={base}", *LORA)
    assert cli.main(_args("distill", workdir, text_dir, *common, steps=2)) == 0
    assert cli.main(_args("distill", workdir, text_dir, *common, steps=4)) == 0  # resumes at 2
    return workdir


TOKENS = np.arange(32).reshape(2, 16) % 100


def test_lora_distillation_resumes_and_exports_merged(base, lora_run, tmp_path):
    summary = json.load(open(lora_run / "summary.json"))
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2
    # the checkpoint's model item: adapters only, 14 layers x (A, B)
    reader = checkpoint.RunReader(str(lora_run))
    saved = ocp.tree.to_flat_dict(reader.manager.item_metadata(4)["model"].tree, sep="/")
    run = reader.run_meta(4)
    adapted = reader.load_lora(4, models.ModelSpec.from_json(run["model"]))
    reader.close()
    names = sorted({k.removesuffix("/value").rsplit("/", 1)[-1] for k, v in saved.items()
                    if hasattr(v, "shape")})
    assert names == ["lora_a", "lora_b"] and sum(hasattr(v, "shape") for v in saved.values()) == 28
    assert run["lora"]["rank"] == RANK and len(run["lora"]["modules"]) == 14
    assert run["lora"]["base"]["step"] == 4 and len(run["lora"]["base"]["sha256"]) == 64

    # merged export: the plain lm_tiny whose forward is the LoRA student's
    out = tmp_path / "merged"
    assert cli.main(["export", "--workdir", str(lora_run), "--out", str(out)]) == 0
    merged, _ = export.load(str(out))
    assert type(merged) is lm_models.Transformer
    _float32.assert_close(merged(TOKENS), adapted(TOKENS), n=2 * (64 + RANK) + 32)
    original = checkpoint.read_model(base).model
    assert np.abs(np.asarray(merged(TOKENS)) - np.asarray(original(TOKENS))).max() > 1e-4


def test_separate_export_is_peft_named(lora_run, tmp_path):
    sep = tmp_path / "adapters"
    assert cli.main(["export", "--workdir", str(lora_run), "--out", str(sep),
                     "--lora", "separate"]) == 0
    config = json.load(open(sep / lora.ADAPTER_CONFIG))
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert len(config["target_modules"]) == 14
    assert "model.layers.1.mlp.gate_proj" in config["target_modules"]
    tensors = state_dict.read_safetensors(str(sep / lora.ADAPTER_WEIGHTS))
    assert len(tensors) == 28
    prefix = "base_model.model.model.layers"
    assert tensors[f"{prefix}.0.self_attn.q_proj.lora_A.weight"].shape == (RANK, 32)
    assert tensors[f"{prefix}.1.self_attn.k_proj.lora_B.weight"].shape == (16, RANK)
    assert tensors[f"{prefix}.1.mlp.down_proj.lora_A.weight"].shape == (RANK, 64)


def test_peft_on_the_exported_base_equals_the_merged_student(base, lora_run, tmp_path):
    """transformers + peft (optional: not kdjax's dependencies) load the base's --format hf
    export with the --lora separate adapters, and compute the merged student's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    assert cli.main(["export", "--workdir", base, "--out", str(tmp_path / "hf"),
                     "--format", "hf"]) == 0
    assert cli.main(["export", "--workdir", str(lora_run), "--out", str(tmp_path / "ad"),
                     "--lora", "separate"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                              dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.numpy()
    ours = np.asarray(checkpoint.read_model(str(lora_run)).model(TOKENS))
    _float32.assert_close(theirs, ours, n=2 * (64 + RANK) + 32 + 16)


def test_a_changed_base_is_refused_on_resume(base, lora_run, text_dir, tmp_path):
    """The checkpoints hold the adapters alone: resuming reloads init.workdir, and a base that
    trained on since (other weights, whatever its path) is refused by its hash."""
    moved, resumed = tmp_path / "base", tmp_path / "lora"
    shutil.copytree(base, moved)
    shutil.copytree(lora_run, resumed)
    assert cli.main(_args("train", moved, text_dir, steps=6)) == 0  # the base trains on
    with pytest.raises(ValueError, match=r"trained on the frozen weights of .*base step 4 .*now "
                                         r"gives step 6"):
        cli.main(_args("train", resumed, text_dir, f"--config.init.workdir={moved}", *LORA,
                       steps=6))


@pytest.mark.parametrize("override, message", [
    ("--config.model.lora.rank=-2", "model.lora.rank=-2"),
    ("--config.model.lora.alpha=0", "model.lora.alpha=0.0"),
    ("--config.model.lora.targets=('*attention/q', '*ffn/*')",
     r"\['\*ffn/\*'\] match no nnx.Linear.*layers/0/attention/q.*lm_head"),
    ("--config.model.lora.targets=('*',)", "match lm_head"),
])
def test_bad_lora_settings_are_refused_before_any_directory(base, text_dir, tmp_path, override,
                                                            message):
    workdir = tmp_path / "never"
    args = _args("distill", workdir, text_dir, f"--config.teacher.workdir={base}",
                 f"--config.init.workdir={base}", "--config.model.lora.rank=4", override)
    with pytest.raises(ValueError, match=message):
        cli.main(args)
    assert not workdir.exists()


def test_lora_without_init_workdir_is_refused(text_dir, tmp_path):
    workdir = tmp_path / "never"
    with pytest.raises(ValueError, match="init.workdir is not set"):
        cli.main(_args("train", workdir, text_dir, *LORA))
    assert not workdir.exists()
