"""The run plan (kdjax.plan): a validated config as frozen, typed sections, written as the config
always was, and the same refusals of typos and wrong types before anything is read."""

import dataclasses
import glob
import json
import os

import pytest

from kdjax import config as config_lib, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "fashion_mnist", "*.py"))
                     + glob.glob(os.path.join(ROOT, "experiments", "lm", "*.py")))


@pytest.mark.parametrize("path", [None, *EXPERIMENTS],
                         ids=lambda p: "base" if p is None else os.path.relpath(p, ROOT))
def test_the_plan_writes_exactly_the_configs_json(path):
    config = config_lib.base_config() if path is None else config_lib.load(path)
    run = plan.RunPlan.from_config(config)
    text = run.to_json()
    assert text == config_lib.to_json(config)  # config.json and checkpoints' run records
    assert plan.as_plan(json.loads(text)) == run  # and back, lists become tuples again


def test_sections_are_the_configs_sections_by_attribute():
    config = config_lib.load(os.path.join(ROOT, "experiments", "fashion_mnist", "kd.py"),
                             ["--config.data.mean=[0.5]", "--config.teacher.workdirs=['a', 'b']"])
    run = plan.as_plan(config)
    assert isinstance(run.data, plan.Data) and isinstance(run.teacher.model, plan.TeacherModel)
    assert isinstance(run.loss.temperature_schedule, plan.TemperatureSchedule)
    assert run.data.name == config.data.name and run.loss.name == config.loss.name
    assert run.data.mean == (0.5,) and run.teacher.workdirs == ("a", "b")
    schema = config_lib.base_config()
    for section in schema:
        if isinstance(schema[section], type(schema)):
            assert {f.name for f in dataclasses.fields(getattr(run, section))} == set(
                schema[section].keys()), section


def test_the_plan_is_frozen():
    run = plan.as_plan({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.steps = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.loss.temperature_schedule.name = "cosine"


def test_free_form_dicts_are_read_only_and_still_dicts():
    config = config_lib.validate({"loss": {"kwargs": {"temperature": 2.0}},
                                  "model": {"kwargs": {"hidden": (32,)}},
                                  "prune": {"targets": {"out": 0.5}}})
    run = plan.as_plan(config)
    for mapping in (run.loss.kwargs, run.model.kwargs, run.teacher.model.kwargs,
                    run.prune.targets):
        with pytest.raises(TypeError):
            mapping["new"] = 1
    assert dict(run.loss.kwargs) == {"temperature": 2.0}
    assert (lambda **kw: kw)(**run.model.kwargs) == {"hidden": (32,)}
    config.loss.kwargs.temperature = 8.0  # the plan holds its own copy
    assert run.loss.kwargs["temperature"] == 2.0


def test_as_plan_takes_a_plan_a_config_or_a_dict():
    run = plan.as_plan({"train": {"steps": 7}, "loss": {"kwargs": {"temperature": 2.0}}})
    assert run.train.steps == 7 and run.optimizer.name == "sgd"  # the rest: the defaults
    assert plan.as_plan(run) is run
    config = config_lib.base_config()
    config.train.steps = 7
    config.loss.kwargs = {"temperature": 2.0}
    assert plan.as_plan(config) == run
    assert plan.as_plan(run, ["--config.train.steps=9"]).train.steps == 9
    assert run.train.steps == 7


def test_replace_changes_nested_keys_through_the_schema():
    run = plan.as_plan({})
    changed = run.replace(seed=3, teacher={"workdir": "w", "model": {"name": "resnet8"}})
    assert (changed.seed, changed.teacher.workdir, changed.teacher.model.name) == (3, "w",
                                                                                  "resnet8")
    assert changed.teacher.combine == run.teacher.combine and run.seed == 0
    assert run.replace(data=dataclasses.replace(run.data, flip=True)).data.flip is True
    with pytest.raises(TypeError, match=r"'train.steps' must be of type int.*got 'many'"):
        run.replace(train={"steps": "many"})


def test_a_typo_or_a_wrong_type_is_refused_with_the_key_value_and_fix(monkeypatch):
    # Before any I/O: nothing may read data or workdirs on the way to the refusal.
    from kdjax import data

    def no_io(*args, **kwargs):
        raise AssertionError("read before the config was checked")

    for name in ("dataset_info", "open_split", "load_arrays"):
        monkeypatch.setattr(data, name, no_io)
    with pytest.raises(ValueError, match=r"unknown config key 'train.stepz': no 'stepz' under "
                                         r"train; valid keys there: \['batch_size', "
                                         r"'grad_accum', 'log_every_steps', 'nan_policy', 'steps', "
                                         r"'steps_per_call'\]"):
        plan.as_plan({"train": {"stepz": 5}})
    with pytest.raises(TypeError, match=r"'data.flip' must be of type bool \(like its default "
                                        r"False\), got 1"):
        plan.as_plan({"data": {"flip": 1}})
    with pytest.raises(TypeError, match=r"'loss.kwargs' must be a dict, got 4"):
        plan.as_plan({"loss": {"kwargs": 4}})
    with pytest.raises(ValueError, match=r"unknown config key 'quant.bits'"):
        plan.as_plan({}, ["--config.quant.bits=4"])


def test_read_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json not found: .* is not a kdjax "
                                                r"workdir \(train a model there first with "
                                                r"`kdjax train`, or import one with "
                                                r"`kdjax import`\)"):
        plan.read_run(str(tmp_path))
    run = plan.as_plan({"train": {"steps": 3}, "model": {"kwargs": {"hidden": (8,)}}})
    (tmp_path / "config.json").write_text(run.to_json())
    assert plan.read_run(str(tmp_path)) == run
