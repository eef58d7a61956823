"""Config schema, overrides and their error messages; optimizer and schedule construction."""

import dataclasses
import glob
import os

import numpy as np
import pytest

from kdjax import config as config_lib, optim, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, body):
    path = tmp_path / "exp.py"
    path.write_text("from kdjax.config import base_config\n\ndef get_config():\n" + body)
    return str(path)


def test_load_and_override_types(tmp_path):
    path = _write(tmp_path, "    c = base_config()\n    c.train.steps = 7\n    return c\n")
    c = config_lib.load(path, ["--config.train.steps=200", "--config.optimizer.learning_rate=1",
                               "--config.model.name=resnet20", "--config.data.mean=(0.1,0.2)",
                               "--config.loss.kwargs={'temperature': 2.0}",
                               "--config.data.flip=True"])
    assert c.train.steps == 200
    assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
    assert c.model.name == "resnet20"
    assert tuple(c.data.mean) == (0.1, 0.2)
    assert dict(c.loss.kwargs) == {"temperature": 2.0}
    assert c.data.flip is True


def test_unknown_key_lists_valid_keys(tmp_path):
    path = _write(tmp_path, "    return base_config()\n")
    with pytest.raises(ValueError, match=r"unknown config key 'train.stepz'.*valid keys there: "
                                         r"\['batch_size', 'grad_accum', 'log_every_steps', 'nan_policy', "
                                         r"'steps', 'steps_per_call'\]"):
        config_lib.load(path, ["--config.train.stepz=5"])
    with pytest.raises(ValueError, match=r"no 'trian' under the top level.*'train'"):
        config_lib.validate({"trian": {"steps": 1}})


def test_wrong_type_is_refused(tmp_path):
    path = _write(tmp_path, "    return base_config()\n")
    with pytest.raises(TypeError, match=r"'train.steps' must be of type int.*got 'many'"):
        config_lib.load(path, ["--config.train.steps=many"])
    with pytest.raises(TypeError, match=r"'data.flip' must be of type bool.*got 1"):
        config_lib.validate({"data": {"flip": 1}})


def test_steps_per_call_defaults_to_auto_and_is_an_int(tmp_path):
    path = _write(tmp_path, "    return base_config()\n")
    assert config_lib.load(path).train.steps_per_call == 0  # auto: kdjax.trainer resolves it
    assert config_lib.load(path, ["--config.train.steps_per_call=20"]).train.steps_per_call == 20
    with pytest.raises(TypeError, match=r"'train.steps_per_call' must be of type int \(like its "
                                        r"default 0\), got 'auto'"):
        config_lib.load(path, ["--config.train.steps_per_call=auto"])


def test_malformed_override_and_missing_file(tmp_path):
    path = _write(tmp_path, "    return base_config()\n")
    with pytest.raises(ValueError, match="must look like --config.train.steps=200"):
        config_lib.load(path, ["--config.train.steps"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        config_lib.load(tmp_path / "nope.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        config_lib.load(tmp_path / "empty.py")


def test_json_round_trip():
    c = config_lib.base_config()
    c.loss.kwargs = {"temperature": 3.0}
    back = config_lib.from_json(config_lib.to_json(c))
    assert back.to_dict() == config_lib.validate(c).to_dict()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"),
                                               recursive=True)))
def test_every_experiment_config_validates(path):
    c = config_lib.load(path)
    assert c.train.steps > 0


def test_schedules():
    opt = plan.as_plan({"optimizer": dict(learning_rate=0.1, warmup_steps=10, schedule="step",
                                          decay_boundaries=(50, 80), decay_factor=0.1)}).optimizer
    lr = optim.schedule(opt, 100)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(49), lr(50), lr(80)],
                               [0.0, 0.05, 0.1, 0.1, 0.01, 0.001], rtol=1e-6)
    opt = dataclasses.replace(opt, schedule="cosine", warmup_steps=0)
    lr = optim.schedule(opt, 100)
    np.testing.assert_allclose([lr(0), lr(50), lr(100)], [0.1, 0.05, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="unknown optimizer.schedule='linear'"):
        optim.schedule(dataclasses.replace(opt, schedule="linear"), 100)
    with pytest.raises(ValueError, match="unknown optimizer.name='lamb'"):
        optim.make_optimizer(dataclasses.replace(opt, name="lamb"), 100)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        optim.make_optimizer(dataclasses.replace(opt, learning_rate=0.0), 100)


@pytest.mark.parametrize("role", ["prune", "prune-abc", "prune-1.5", "student-0.3", "teacher-x"])
def test_resnet_deploy_refuses_a_role_it_does_not_have(role):
    with pytest.raises(ValueError, match=rf"resnet_deploy.py:ROLE takes teacher, student or "
                                         rf"prune-SPARSITY with SPARSITY in \[0, 1\) \(e.g. "
                                         rf"prune-0.3\), got '{role}'"):
        config_lib.load(os.path.join(ROOT, "experiments", "fashion_mnist",
                                     f"resnet_deploy.py:{role}"))
    c = config_lib.load(os.path.join(ROOT, "experiments", "fashion_mnist",
                                     "resnet_deploy.py:prune-0.3"))
    assert (c.model.name, c.prune.method, c.prune.sparsity, c.prune.round_to) == (
        "resnet20", "structured", 0.3, 8)
