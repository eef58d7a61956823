"""Any PyTorch module in kdjax through torchax (kdjax.torchbridge), checked against PyTorch's own
forward: a user's module and timm models give PyTorch's logits, BatchNorm's train-mode
statistics follow PyTorch's momentum rule, gradients match autograd's, `kdjax import --torch`
writes a run that teaches inside the one compiled step and exports as StableHLO with PyTorch's
logits, and every bad input is refused before a directory appears. Skipped without the `torch`
extra (pip install 'kdjax[torch]')."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("torchax")
import torch  # noqa: E402

import _float32  # noqa: E402
import _torch_nets  # noqa: E402
from kdjax import checkpoint, cli, losses, models, sharding  # noqa: E402
from kdjax.interop.layouts import LayoutMismatchError  # noqa: E402
from kdjax.step import Distillee, freeze, init_train_state, make_distill_step  # noqa: E402
from kdjax.torchbridge import TorchModel, TorchOpError, from_module  # noqa: E402
from kdjax.torchbridge import importer as torch_importer  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
NET = "_torch_nets:Net"
MEAN, STD = 0.25, 0.5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def randomize_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics, so that eval mode really reads them."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def with_random_bn(model: TorchModel) -> TorchModel:
    """`model` and its torch module with the same random BatchNorm statistics."""
    randomize_bn(model.module)
    for name, b in model.module.named_buffers():
        node = model.buffers
        *parents, leaf = name.split(".")
        for p in parents:
            node = node[p]
        node[leaf][...] = jnp.asarray(b.numpy())
    return model


def images(n=4, h=8, c=1, seed=0):
    return np.random.default_rng(seed).random((n, h, h, c), dtype=np.float32)


def test_a_user_module_gives_pytorchs_logits_and_batchnorm_statistics():
    model = with_random_bn(TorchModel(NET, {"num_classes": 5}))
    ref = _torch_nets.Net(num_classes=5)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    x = images()
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    assert rel_err(logits, ref.eval()(nchw(x)).detach().numpy()) <= 1e-5

    def train_call(s, x):  # two training steps' worth of statistics updates
        m = nnx.merge(graphdef, s)
        m(x, train=True)
        return m(x[::-1], train=True), nnx.state(m)

    out, new_state = jax.jit(train_call)(state, x)
    ref.train()
    ref(nchw(x))
    want = ref(nchw(x[::-1])).detach().numpy()
    assert rel_err(out, want) <= 1e-5
    bn = new_state["buffers"]["bn"]
    np.testing.assert_allclose(bn["running_mean"][...], ref.bn.running_mean.numpy(), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(bn["running_var"][...], ref.bn.running_var.numpy(), rtol=1e-5)
    assert int(bn["num_batches_tracked"][...]) == int(ref.bn.num_batches_tracked) == 2


TIMM_32PX = {"convnext_atto": {}, "regnetx_002": {}, "efficientnet_b0": {},
             "vit_tiny_patch16_224": {"img_size": 32}}


@pytest.mark.parametrize("name", sorted(TIMM_32PX))
def test_timm_models_import_and_export_as_stablehlo_with_pytorchs_logits(name, tmp_path):
    kwargs = {"model_name": name, "num_classes": 10, "pretrained": False, **TIMM_32PX[name]}
    import timm

    torch.manual_seed(0)
    net = timm.create_model(**kwargs)
    randomize_bn(net)  # eval-mode BatchNorm then reads statistics that are not 0 and 1
    torch.save(net.state_dict(), tmp_path / "net.pth")
    run, out = tmp_path / "run", tmp_path / "hlo"
    assert cli.main(["import", "--torch", "timm:create_model", "--torch-kwargs",
                     json.dumps(kwargs), "--from", str(tmp_path / "net.pth"),
                     "--num-classes", "10", "--input-shape", "32,32,3", "--mean", "0.5,0.4,0.3",
                     "--std", "0.2,0.25,0.3", "--data", "cifar10", "--out", str(run)]) == 0
    assert cli.main(["export", "--workdir", str(run), "--out", str(out),
                     "--format", "stablehlo"]) == 0
    exported = jax.export.deserialize(bytearray((out / "model.stablehlo").read_bytes()))
    pixels = (np.random.default_rng(1).random((3, 32, 32, 3)) * 255).astype(np.uint8)
    got = np.asarray(exported.call(pixels))
    x = (pixels / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.3])
    want = net.eval()(nchw(x.astype(np.float32))).detach().numpy()
    assert got.shape == (3, 10) and rel_err(got, want) <= 1e-4


def test_from_module_is_a_pure_function_with_pytorchs_gradients_and_dropout_from_the_key():
    torch.manual_seed(0)
    net = _torch_nets.Net(num_classes=3, drop=0.5)
    x = images(4, 6)
    params, buffers, apply_fn = from_module(net, nchw(x))
    assert set(params) == {k for k, _ in net.named_parameters()}
    assert set(buffers) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    labels = jnp.array([0, 1, 2, 0])

    def loss(p):
        logits, _ = apply_fn(p, buffers, jnp.asarray(nchw(x).numpy()))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.jit(jax.grad(loss))(params)
    net.eval()
    torch.nn.functional.cross_entropy(net(nchw(x)), torch.tensor([0, 1, 2, 0])).backward()
    for name, p in net.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-4, atol=1e-6)

    train = jax.jit(lambda k: apply_fn(params, buffers, jnp.asarray(nchw(x).numpy()), train=True,
                                       key=k)[0])
    a, b, a2 = train(jax.random.key(1)), train(jax.random.key(2)), train(jax.random.key(1))
    np.testing.assert_array_equal(a, a2)  # the key decides the mask...
    assert not np.allclose(a, b)  # ...and a different key draws a different one


def test_an_op_torchax_cannot_lower_is_named_with_its_module_path():
    with pytest.raises(TorchOpError, match=r"module 'pool' \(FractionalMaxPool2d\).*"
                                           r"fractional_max_pool2d"):
        from_module(_torch_nets.Unlowerable(), torch.zeros(2, 1, 8, 8))


def test_state_dict_loads_back_into_pytorch():
    model = TorchModel(NET, {"num_classes": 4}, seed=3)
    ref = _torch_nets.Net(num_classes=4)
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v))
                         for k, v in model.state_dict().items()})  # strict: every key, no more
    x = images(2, 8)
    assert rel_err(model(x), ref.eval()(nchw(x)).detach().numpy()) <= 1e-5


# --- kdjax import --torch --------------------------------------------------------------------

def _import(out, *extra):
    return cli.main(["import", "--torch", NET, "--num-classes", "10", "--input-shape", "28,28,1",
                     "--mean", str(MEAN), "--std", str(STD), "--data", "fashion_mnist",
                     "--out", str(out), *extra])


@pytest.fixture(scope="module")
def torch_teacher(tmp_path_factory):
    """A user's module with trained-looking weights, saved by PyTorch, imported by the CLI."""
    work = tmp_path_factory.mktemp("torch")
    torch.manual_seed(1)
    net = _torch_nets.Net()
    randomize_bn(net)
    torch.save(net.state_dict(), work / "net.pth")
    run = work / "run"
    assert _import(run, "--from", str(work / "net.pth")) == 0
    return {"net": net.eval(), "run": str(run), "work": work}


def test_the_run_records_the_factory_and_keeps_a_state_dict(torch_teacher):
    reader = checkpoint.RunReader(torch_teacher["run"])
    run = reader.run_meta(reader.resolve_step("latest"))
    reader.close()
    assert run["model"]["name"] == "kdjax.torchbridge:TorchModel"
    assert run["model"]["kwargs"] == {"factory": NET, "factory_kwargs": {}}
    # the effective arguments: --num-classes reached the factory, which takes num_classes
    assert run["imported"]["torch"] == {"factory": NET, "kwargs": {"num_classes": 10}}
    assert run["preprocess"] == {"mean": [MEAN], "std": [STD]}
    import safetensors.torch

    saved = safetensors.torch.load_file(os.path.join(torch_teacher["run"],
                                                     torch_importer.STATE_DICT_FILE))
    net = _torch_nets.Net()
    net.load_state_dict(saved)
    for k, v in torch_teacher["net"].state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)


def test_an_imported_teacher_is_inside_the_one_compiled_step_and_stays_frozen(torch_teacher):
    reader = checkpoint.RunReader(torch_teacher["run"])
    step_no = reader.resolve_step("latest")
    spec = models.ModelSpec.from_json(reader.run_meta(step_no)["model"])
    teacher = reader.load_model(step_no, spec)
    reader.close()
    x = images(3, 28)
    want = torch_teacher["net"](nchw(x)).detach().numpy()
    assert rel_err(teacher(x), want) <= 1e-5

    student = models.create_model("mlp", hidden=(16,), in_features=28 * 28, num_classes=10,
                                  rngs=nnx.Rngs(0))
    tx = optax.sgd(0.0123)
    graphdef, state = init_train_state(Distillee(student), tx, seed=0)
    state = sharding.replicate(state, sharding.make_mesh())  # committed, as the step returns it
    frozen = freeze(teacher)
    step = make_distill_step(graphdef, tx, _kd, teachers=[frozen])
    batch = {"image": (np.random.default_rng(0).random((8, 28, 28, 1)) * 255).astype(np.uint8),
             "label": np.arange(8, dtype=np.int32)}
    lowered = step.lower(state, batch)
    hlo = lowered.as_text()
    assert len(re.findall(r"^module @", hlo, flags=re.M)) == 1
    # the teacher's stem convolution (the student is an MLP) and the student's update
    assert re.search(r"stablehlo\.convolution", hlo) and re.search(r"1\.230000e-02", hlo)
    before = jax.tree.map(np.array, step.teachers)
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and step.fn._cache_size() == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, step.teachers))


def _kd(student, teachers, labels, step):
    loss = losses.hinton_kd(student["logits"], teachers[0]["logits"], labels, temperature=4.0,
                            alpha=0.9).mean()
    return loss, {"kd": loss}


def test_distill_and_stablehlo_export_from_the_command_line(torch_teacher, data_dir):
    work = torch_teacher["work"]
    assert cli.main(["distill", "--config", os.path.join(TESTS, "..", "experiments",
                                                         "fashion_mnist", "kd.py"),
                     "--workdir", str(work / "student"),
                     f"--config.teacher.workdir={torch_teacher['run']}",
                     f"--config.data.data_dir={data_dir}", "--config.train.steps=4",
                     "--config.train.batch_size=32", "--config.eval.every_steps=4",
                     "--config.train.log_every_steps=4", "--config.checkpoint.every_steps=4",
                     "--config.eval.batch_size=50", "--no-progress"]) == 0
    summary = json.load(open(work / "student" / "summary.json"))
    assert summary["teacher"] == torch_teacher["run"] and "eval/teacher_agreement" in summary

    out = work / "hlo"
    assert cli.main(["export", "--workdir", torch_teacher["run"], "--out", str(out),
                     "--format", "stablehlo"]) == 0
    pixels = (np.random.default_rng(2).random((5, 28, 28, 1)) * 255).astype(np.uint8)
    np.save(work / "pixels.npy", pixels)
    serve = ("import sys, jax, numpy as np\n"
             "e = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))\n"
             "np.save(sys.argv[3], np.asarray(e.call(np.load(sys.argv[2]))))\n")
    # jax alone: no kdjax, torch or torchax in the serving process
    subprocess.run([sys.executable, "-I", "-c", serve, str(out / "model.stablehlo"),
                    str(work / "pixels.npy"), str(work / "logits.npy")], check=True)
    got = np.load(work / "logits.npy")
    want = torch_teacher["net"](nchw((pixels / 255.0 - MEAN) / STD).float()).detach().numpy()
    assert rel_err(got, want) <= 1e-4


def test_bad_imports_are_refused_before_any_directory_appears(tmp_path, torch_teacher):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--torch 'no_such_pkg:Net': cannot import"):
        cli.main(["import", "--torch", "no_such_pkg:Net", "--num-classes", "10",
                  "--input-shape", "28,28,1", "--data", "x", "--out", str(out)])
    with pytest.raises(ValueError, match=r"rejected the arguments \(--torch-kwargs\) "
                                         r"\{\"depth\": 3\}.*unexpected keyword argument 'depth'"):
        _import(out, "--torch-kwargs", '{"depth": 3}')
    torch.save(_torch_nets.Net(num_classes=5, width=4).state_dict(), tmp_path / "other.pth")
    sd = _torch_nets.Net().state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(LayoutMismatchError,
                       match=r"wrong shape: head.weight: the file has \(5, 4\), the module "
                             r"\(10, 8\)"):
        _import(out, "--from", str(tmp_path / "other.pth"))
    with pytest.raises(LayoutMismatchError, match=r"(?s)missing: head.bias \(10,\).*"
                                                  r"unexpected: extra.weight \(2,\)"):
        _import(out, "--from", str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match=r"output of shape \(2, 7\).*\(2, 10\)"):
        _import(out, "--torch-kwargs", '{"num_classes": 7}')
    assert sorted(os.listdir(tmp_path)) == ["other.pth", "partial.pth"]  # no run, no temporary


def test_without_torchax_the_flag_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['torchax'] = None\n"
            "from kdjax import cli\n"
            "try:\n"
            "    cli.main(['import', '--torch', 'timm:create_model', '--out', sys.argv[1]])\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True,
                       text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "pip install 'kdjax[torch]'" in r.stdout
    assert not os.path.exists(tmp_path / "run")


# --- a PyTorch student: --config.model.torch ------------------------------------------------

def _distill_torch_student(workdir, teacher_run, data_dir, steps, *extra):
    return cli.main([
        "distill", "--config", os.path.join(TESTS, "..", "experiments", "fashion_mnist", "kd.py"),
        "--workdir", str(workdir), f"--config.teacher.workdir={teacher_run}",
        f"--config.data.data_dir={data_dir}", "--config.model.torch=_torch_nets:Net",
        '--config.model.torch_kwargs={"width": 4}', f"--config.train.steps={steps}",
        "--config.train.batch_size=16", "--config.eval.every_steps=2",
        "--config.train.log_every_steps=2", "--config.checkpoint.every_steps=2",
        # constant: the same rate at each step whether the run is given 2 or 4 steps
        "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0",
        "--config.eval.batch_size=50", "--config.data.eval_split=test[:100]", "--no-progress",
        *extra])


def _student(workdir):
    n, _, run, spec, model = checkpoint.read_model(str(workdir), "latest")
    return n, run, spec, model


def test_a_pytorch_student_trains_resumes_exactly_and_loads_back_into_pytorch(
        torch_teacher, data_dir, tmp_path):
    teacher = torch_teacher["run"]
    assert _distill_torch_student(tmp_path / "once", teacher, data_dir, 4) == 0
    assert _distill_torch_student(tmp_path / "twice", teacher, data_dir, 2) == 0
    assert _distill_torch_student(tmp_path / "twice", teacher, data_dir, 4) == 0  # resumes
    n, run, spec, model = _student(tmp_path / "once")
    _, _, _, resumed = _student(tmp_path / "twice")
    assert n == 4 and run["model"]["name"] == "kdjax.torchbridge:TorchModel"
    # the dataset's 10 classes reached the factory, which was not given num_classes
    assert spec.kwargs == {"factory": "_torch_nets:Net", "factory_kwargs": {"width": 4}}
    assert model.factory_kwargs == {"width": 4, "num_classes": 10}
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(resumed))
    # BatchNorm counted its 4 training batches through the buffers, which optax never touched;
    # the weights were trained away from the factory's initialisation
    state = model.state_dict()
    assert int(state["bn.num_batches_tracked"]) == 4
    assert state["bn.running_var"].dtype == np.float32 and not np.allclose(
        state["bn.running_var"], 1.0)
    init = TorchModel("_torch_nets:Net", {"width": 4}, num_classes=10, rngs=nnx.Rngs(0))
    assert not np.allclose(state["head.weight"], init.state_dict()["head.weight"])

    x = images(6, 28)
    for fmt, file in (("torch", "model.pth"), ("safetensors", "model.safetensors")):
        out = tmp_path / fmt
        assert cli.main(["export", "--workdir", str(tmp_path / "once"), "--out", str(out),
                         "--format", fmt]) == 0
        if fmt == "torch":
            weights = torch.load(out / file, weights_only=True)
        else:
            import safetensors.torch
            weights = safetensors.torch.load_file(out / file)
        ref = _torch_nets.Net(width=4, num_classes=10)
        ref.load_state_dict(weights)  # strict: every name, no more
        meta = json.load(open(out / "kdjax_model.json"))
        assert meta["torch"] == {"factory": "_torch_nets:Net",
                                 "kwargs": {"width": 4, "num_classes": 10}}
        assert "_torch_nets.Net(**{'width': 4, 'num_classes': 10})" in open(
            out / "README.md").read()
        want_eval = ref.eval()(nchw(x)).detach().numpy()
        want_train = ref.train()(nchw(x)).detach().numpy()
        assert rel_err(model(x), want_eval) <= 1e-5
        assert rel_err(nnx.clone(model)(x, train=True), want_train) <= 1e-5
    with pytest.raises(ValueError, match="--layout torchvision: the student is the PyTorch "
                                         "module _torch_nets:Net builds"):
        cli.main(["export", "--workdir", str(tmp_path / "once"), "--out", str(tmp_path / "l"),
                  "--format", "torch", "--layout", "torchvision"])



def test_model_torch_replaces_the_experiments_student():
    from kdjax import plan

    p = plan.as_plan({"model": {"name": "cnn_small", "kwargs": {"width": 8}}},
                     ["--config.model.torch=_torch_nets:Net",
                      '--config.model.torch_kwargs={"width": 4}'])
    assert p.model.name == "kdjax.torchbridge:TorchModel"
    assert p.model.kwargs == {"factory": "_torch_nets:Net", "factory_kwargs": {"width": 4}}
    assert plan.as_plan(p.to_dict()) == p  # a saved run's config reads back the same


def test_a_pytorch_student_is_pruned_in_the_step_and_refuses_qwix_and_nm(
        torch_teacher, data_dir, tmp_path):
    args = ["--config.prune.method=magnitude", "--config.prune.sparsity=0.5",
            "--config.prune.dense_first_last=False"]
    workdir = tmp_path / "pruned"
    assert _distill_torch_student(workdir, torch_teacher["run"], data_dir, 2, *args) == 0
    state = _student(workdir)[3].state_dict()
    # every Linear/Conv weight at half its entries, norms, biases and buffers dense
    for name in ("stem.weight", "dw.weight", "head.weight"):
        assert (state[name] == 0).mean() == pytest.approx(0.5, abs=1 / state[name].size)
    for name in ("gn.weight", "bn.weight", "stem.bias"):
        assert (state[name] != 0).all()
    for extra, message in (
            (["--config.quant.mode=qat"], "Qwix quantizes Flax layers .* a PyTorch student "
                                          r"\(_torch_nets:Net\)"),
            (["--config.prune.method=nm"], "prune.method='nm' groups weights along NNX "
                                           r"kernels' input axis \(-2\)")):
        with pytest.raises(ValueError, match=message):
            _distill_torch_student(tmp_path / "refused", torch_teacher["run"], data_dir, 2,
                                   *extra)
        assert not os.path.exists(tmp_path / "refused")


FSDP_TEACHER = """
import json, sys
import jax, numpy as np, optax
from flax import nnx
from kdjax import models, objectives, sharding
from kdjax.step import DeviceData, freeze, init_train_state, make_distill_step
from kdjax.torchbridge import TorchModel

mesh = sharding.make_mesh(data=1, fsdp=2)
teacher = freeze(TorchModel("_torch_nets:Net", {"num_classes": 4, "width": 8}, seed=1))
rng = np.random.default_rng(0)
data = DeviceData({"image": sharding.replicate(rng.integers(0, 256, (64, 8, 8, 1), np.uint8), mesh),
                   "label": sharding.replicate(rng.integers(0, 4, 64).astype(np.int32), mesh)}, 16)
out = {}
for rule in ("replicated", "fsdp"):
    student = models.create_model("mlp", hidden=(16,), in_features=64, num_classes=4,
                                  rngs=nnx.Rngs(0))
    tx = optax.sgd(0.1)
    graphdef, state = init_train_state(student, tx, seed=0, num_examples=64)
    state = sharding.replicate(state, mesh)
    shardings = (sharding.tree_shardings(teacher.variables, mesh, rule, min_bytes=0),)
    step = make_distill_step(graphdef, tx, objectives.logit_distillation(
        "kd", ce_weight=0.5, kd_weight=0.5, temperature=2.0), teachers=(teacher,), data=data,
        mesh=mesh, teacher_sharding=shardings)
    losses = []
    for _ in range(3):
        state, metrics = step(state)
        losses.append(float(metrics["loss"]))
    out[rule] = {"losses": losses, "split": sorted(
        jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_flatten_with_path(step.teachers)[0]
        if len({str(s.index) for s in x.addressable_shards}) == 2)}
json.dump(out, open(sys.argv[1], "w"))
"""


def test_a_torch_teacher_is_fsdp_sharded_with_the_same_losses(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": TESTS + os.pathsep +
           os.environ.get("PYTHONPATH", ""),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    subprocess.run([sys.executable, "-c", FSDP_TEACHER, str(tmp_path / "out.json")], check=True,
                   env=env)
    out = json.load(open(tmp_path / "out.json"))
    assert out["replicated"]["split"] == []
    # the conv and linear weights (even axes) are split over the 2 devices, BatchNorm's too
    assert any("stem" in k and "weight" in k for k in out["fsdp"]["split"])
    assert any("head" in k and "weight" in k for k in out["fsdp"]["split"])
    # two programs (gathered weights): the teacher's 3x3x8 convolution, 64-pixel mean and 8-wide
    # head, the student's 64-input layer and the 16-example batch mean, per step
    losses = out["replicated"]["losses"]
    _float32.assert_close(out["fsdp"]["losses"], losses, n=3 * (72 + 64 + 8 + 64 + 16),
                          magnitude=max(losses))


def test_feature_taps_are_pytorchs_submodule_outputs_and_serve_feature_methods(
        torch_teacher, data_dir, tmp_path):
    model = with_random_bn(TorchModel(NET, {"width": 8}))
    x = images(3, 8)
    got = jax.jit(lambda x: model.features(x))(x)
    seen = {}
    hooks = [model.module.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: seen.update({p: o.detach().numpy()})) for p in ("dw", "head")]
    model.module.eval()(nchw(x))
    for h in hooks:
        h.remove()
    assert rel_err(got["dw"], seen["dw"].transpose(0, 2, 3, 1)) <= 1e-5  # NCHW map -> NHWC
    assert rel_err(got["head"], seen["head"]) <= 1e-5 and got["logits"].shape == (3, 10)
    # attention transfer between the student's and the teacher's depthwise stages, by path
    workdir = tmp_path / "at"
    assert cli.main([
        "distill", "--config", os.path.join(TESTS, "..", "experiments", "fashion_mnist", "at.py"),
        "--workdir", str(workdir), f"--config.teacher.workdir={torch_teacher['run']}",
        f"--config.data.data_dir={data_dir}", "--config.model.torch=_torch_nets:Net",
        '--config.model.torch_kwargs={"width": 4}', "--config.loss.student_taps=('dw',)",
        "--config.loss.teacher_taps=('dw',)", "--config.train.steps=2",
        "--config.train.batch_size=16", "--config.eval.every_steps=2",
        "--config.eval.batch_size=50", "--config.data.eval_split=test[:100]",
        "--no-progress"]) == 0
    first = json.loads(open(workdir / "metrics.jsonl").readline())
    assert first["train/feature"] > 0 and np.isfinite(first["train/feature"])


def test_a_torch_teacher_runs_in_the_compute_dtype():
    from kdjax import teacher as teacher_lib

    spec = torch_importer.torch_spec(NET, {"width": 8}, num_classes=10, input_shape=(8, 8, 1))
    reference = with_random_bn(spec.build(0))
    prepared, preparation = teacher_lib.prepare(reference, spec, dtype=jnp.bfloat16)
    floats = [v.dtype for v in jax.tree.leaves(nnx.state(prepared))
              if jnp.issubdtype(v.dtype, jnp.floating)]
    assert preparation.dtype == "bfloat16" and set(floats) == {jnp.dtype(jnp.bfloat16)}
    x = images(4, 8)
    got, want = prepared(x), reference(x)
    assert got.dtype == jnp.bfloat16
    # bfloat16's rounding (eps 2^-8) over the stem's 9 taps, GroupNorm's and the mean's 64
    # pixels and the head's 8 inputs, as tests/_float32.py bounds float32's
    bound = 4 * 2.0 ** -8 * np.sqrt(9 + 64 + 64 + 8) * float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=bound)


def test_torch_teachers_in_a_multi_teacher_ensemble(torch_teacher, data_dir, tmp_path):
    """The imported torch run beside a native one (a kdjax import of a torch Net's weights
    would be the same run twice: an ensemble of two different kinds is the case to show)."""
    native = tmp_path / "native"
    assert cli.main(["train", "--config", os.path.join(TESTS, "..", "experiments",
                                                       "fashion_mnist", "teacher.py"),
                     "--workdir", str(native), f"--config.data.data_dir={data_dir}",
                     "--config.train.steps=2", "--config.train.batch_size=16",
                     "--config.eval.every_steps=2", "--config.eval.batch_size=50",
                     "--config.data.eval_split=test[:100]", "--no-progress"]) == 0
    workdir = tmp_path / "student"
    assert cli.main(["distill", "--config", os.path.join(TESTS, "..", "experiments",
                                                         "fashion_mnist", "multi_teacher.py"),
                     "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
                     f"--config.teacher.workdirs=('{torch_teacher['run']}', '{native}')",
                     "--config.train.steps=2", "--config.train.batch_size=16",
                     "--config.eval.every_steps=2", "--config.eval.batch_size=50",
                     "--config.data.eval_split=test[:100]", "--no-progress"]) == 0
    summary = json.load(open(workdir / "summary.json"))
    assert [p["workdir"] for p in summary["teacher_preparation"]] == [torch_teacher["run"],
                                                                      str(native)]
    assert np.isfinite(summary["train/loss"])


def test_a_pate_ensemble_of_torch_teachers(data_dir, tmp_path):
    """PATE stacks its teachers into one vmapped forward: torch teachers of one architecture
    share one module (their GraphDefs are equal) though each has its own weights."""
    exp = os.path.join(TESTS, "..", "experiments", "fashion_mnist")
    common = [f"--config.data.data_dir={data_dir}", "--config.eval.batch_size=50",
              "--config.train.steps=2", "--no-progress"]
    assert cli.main(["train", "--config", os.path.join(exp, "pate_teachers.py"), "--workdir",
                     str(tmp_path / "teachers"), "--config.pate.teachers=2",
                     "--config.model.torch=_torch_nets:Net", '--config.model.torch_kwargs='
                     '{"width": 4}', "--config.train.batch_size=16",
                     "--config.data.eval_split=test[:100]", *common]) == 0
    a, b = (checkpoint.read_model(str(tmp_path / "teachers" / f"teacher_{k}"), "latest")[4]
            for k in range(2))
    assert a.module is b.module  # one recipe, so one GraphDef
    assert not np.array_equal(a.state_dict()["head.weight"], b.state_dict()["head.weight"])
    assert cli.main(["distill", "--config", os.path.join(exp, "pate_student.py"), "--workdir",
                     str(tmp_path / "student"), f"--config.teacher.workdir={tmp_path / 'teachers'}",
                     "--config.pate.public_split=test[:100]", "--config.pate.queries=50",
                     "--config.pate.threshold=1.0", "--config.train.batch_size=8",
                     "--config.data.eval_split=test[100:150]", *common]) == 0
    summary = json.load(open(tmp_path / "student" / "summary.json"))
    assert 0 < summary["privacy/answered"] <= 50 and summary["privacy/epsilon"] > 0
