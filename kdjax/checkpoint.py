"""Orbax checkpoints of a run: what is saved, what is kept, how a run finds its way back.

A checkpoint is one step directory under WORKDIR/checkpoints with three items, so that each reader
reads only what it needs:
  "model"  {"params", "model_state"}: the student (parameters, BatchNorm statistics). All that a
           teacher, `kdjax eval` and `kdjax export` read. A LoRA student's (kdjax.lora) is its
           adapters alone: readers rebuild the frozen base from the init.workdir its run record
           names, verified by hash, and merge.
  "train"  the rest of the TrainState: step, optimizer state, PRNG key, the epoch's example order
           (step + perm are the data iterator's state) and the NaN/Inf counters.
  "run"    JSON: the config, the ModelSpec and input normalisation that rebuild the model, and the
           train metrics of the steps since the last log line (so a resumed run logs the same
           averages as an uninterrupted one).
Trainable connectors, when they come, get an item of their own, which export leaves out.

Orbax writes asynchronously (training goes on while the files are written) and atomically (into a
temporary directory renamed when complete): a reader never sees a half-written checkpoint, and a
temporary directory left by a killed run is removed when the next run starts. Kept: the latest
`max_to_keep` checkpoints plus the `keep_best` best by an eval metric (Orbax preservation
policies). The teacher is never copied: it is read, read-only, from the run that trained it.

In a multi-process run every process saves and restores collectively: each writes the shards of
its own devices (the workdir must be on a filesystem all hosts share), and a restore reads each
array onto the shardings of its target, so a checkpoint written on 8 devices restores on 1 and
vice versa.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from kdjax import lora, sharding
from kdjax.distillee import join_student, split_student
from kdjax.errors import CheckpointError, CheckpointMismatchError
from kdjax.models import ModelSpec
from kdjax.step import TrainState

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"  # where resume moves checkpoints it cannot read
BEST_MODES = ("max", "min")


class _OrbaxNoise(logging.Filter):
    """Orbax logs a failed save's traceback (twice) and warns "Given directory is read only" for
    every read-only manager. kdjax raises the failure as one clear CheckpointError (the original
    chained, for KDJAX_TRACEBACK=1), and reading read-only is the point of a RunReader."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        return not (record.exc_info or
                    record.getMessage().startswith("Given directory is read only"))


_ORBAX_NOISE = _OrbaxNoise()


def _quiet_orbax() -> None:
    logging.getLogger("absl").addFilter(_ORBAX_NOISE)  # idempotent: one filter object


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """When one array of a checkpoint cannot be read, Orbax closes its event loop while
    TensorStore still completes the other reads, and each prints "Event loop is closed" with a
    traceback (as an unraisable exception). The failure itself is reported once, clearly."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {"model": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
            "run": ocp.JsonCheckpointHandler()}


def _items(state: TrainState) -> dict[str, dict[str, Any]]:
    """The student in "model" (what teachers, eval and export read); the rest of the state, with
    what trains alongside the student (connectors, memory banks, peers) as "extras", in "train"."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    params, extra_params = split_student(fields.pop("params"))
    # A LoRA student's frozen base is init.workdir's, which the run record names (kdjax.lora).
    model_state, extra_state = split_student(lora.split_frozen(fields.pop("model_state"))[0])
    return {"model": {"params": params, "model_state": model_state},
            "train": {**fields, "extras": {"params": extra_params, "model_state": extra_state}}}


def _state(model: dict[str, Any], train: dict[str, Any], like: TrainState) -> TrainState:
    """Inverse of `_items` for a state shaped like `like` (a Distillee's or a plain model's)."""
    train = dict(train)
    extras = train.pop("extras")
    if "student" not in like.params:  # a plain model's state, not a Distillee's
        return TrainState(**model, **train)
    return TrainState(params=join_student(model["params"], extras["params"]),
                      model_state=join_student(model["model_state"], extras["model_state"]),
                      **train)


def mismatches(saved: Any, target: Any) -> list[str]:
    """Lines naming each array path whose presence, shape or dtype differs between a checkpoint's
    metadata tree and a restore target (empty when they match)."""
    def stored(v):
        # Orbax stores a typed PRNG key (e.g. the RngKey of a model's Dropout) as its key data.
        if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
            return jax.eval_shape(jax.random.key_data, v)
        return v

    def flat(tree):
        return {k.removesuffix("/value"): stored(v)
                for k, v in ocp.tree.to_flat_dict(tree, sep="/").items() if hasattr(v, "shape")}

    have, want = flat(saved), flat(target)
    lines = []
    for path in sorted(have.keys() | want.keys()):
        if path not in want:
            lines.append(f"{path}: {tuple(have[path].shape)} in the checkpoint, not expected")
        elif path not in have:
            lines.append(f"{path}: {tuple(want[path].shape)} expected, not in the checkpoint")
        elif (tuple(have[path].shape), have[path].dtype) != (tuple(want[path].shape),
                                                            want[path].dtype):
            lines.append(f"{path}: checkpoint {tuple(have[path].shape)} {have[path].dtype}, "
                         f"expected {tuple(want[path].shape)} {want[path].dtype}")
    return lines


def ensure_writable(workdir: str) -> None:
    """Refuse, before any work, a workdir whose checkpoints could not be written."""
    directory = checkpoint_dir(workdir)
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".kdjax-write-probe-") as f:
            f.write(b"kdjax")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ValueError(f"--workdir {workdir!r} is not writable: cannot write into {directory} "
                         f"({e}); pick a directory you can write to") from None


def _disk_bytes(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except FileNotFoundError:
                # Orbax deletes a failed save's temporary directory in a background thread, so
                # files listed by the walk may be gone a moment later; they free space anyway.
                pass
    return total


def ensure_space(workdir: str, state: TrainState, copies: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints the run will keep.

    `copies` is the number kept at once plus the one being written; what the workdir's
    checkpoints already occupy counts as available to them.
    """
    directory = checkpoint_dir(workdir)
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    need = copies * size - _disk_bytes(directory)
    free = shutil.disk_usage(directory).free
    if free < need:
        mib = 2 ** 20
        raise ValueError(
            f"not enough disk space for the checkpoints in {directory}: {copies} copies of the "
            f"{size / mib:.1f} MiB train state need {need / mib:.1f} MiB more, {free / mib:.1f} MiB "
            f"are free; free some space, lower checkpoint.max_to_keep / checkpoint.keep_best, or "
            f"pick another --workdir")


class Checkpointer:
    """A run's checkpoints: asynchronous atomic saves, latest K + best N kept, resume with fallback.

    Args:
      workdir: the run's workdir; checkpoints go to WORKDIR/checkpoints.
      max_to_keep: how many of the latest checkpoints to keep (>= 1).
      keep_best: also keep this many best checkpoints by `best_metric` (0: none); only checkpoints
        saved with eval metrics compete.
      best_metric, best_mode: the eval metric ("eval/accuracy", ...) and whether "max" or "min" is
        best.
    """

    def __init__(self, workdir: str, *, max_to_keep: int, keep_best: int = 0,
                 best_metric: str = "eval/accuracy", best_mode: str = "max"):
        if max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep must be >= 1 (the latest checkpoint is what "
                             f"a run resumes from), got {max_to_keep}")
        if keep_best < 0:
            raise ValueError(f"checkpoint.keep_best must be >= 0, got {keep_best}")
        if best_mode not in BEST_MODES:
            raise ValueError(f"checkpoint.best_mode must be one of {BEST_MODES}, got {best_mode!r}")
        _quiet_orbax()
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)

        def metric(metrics: dict[str, float]) -> float:
            return metrics[best_metric]

        policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=metric, reverse=best_mode == "min", n=keep_best,
                keep_checkpoints_without_metrics=False))
        self.manager = ocp.CheckpointManager(
            self.directory, item_handlers=_handlers(),
            options=ocp.CheckpointManagerOptions(
                create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True,
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
                # best_fn makes Orbax store each checkpoint's metrics and answer best_step().
                best_fn=metric if keep_best else None, best_mode=best_mode))
        self._in_flight: int | None = None  # the step of an asynchronous save not yet confirmed
        self._failed = False

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, run: dict[str, Any], *,
             metrics: dict[str, float] | None = None) -> bool:
        """Start saving `state` (and the JSON `run` record) at its step; False if already saved.

        Returns once the arrays are copied off the device; the files are written in the background.
        Raises CheckpointError when this save, or the previous one still in the background, fails.
        """
        step = int(jax.device_get(state.step))
        self.wait()  # a failed earlier save must stop the run before this one replaces it
        if step in self.manager.all_steps():
            return False
        items = _items(state)
        try:
            self.manager.save(step, force=True, metrics=metrics, args=ocp.args.Composite(
                model=ocp.args.StandardSave(items["model"]),
                train=ocp.args.StandardSave(items["train"]), run=ocp.args.JsonSave(run)))
        except Exception as e:  # noqa: BLE001  (OSError, or Orbax/TensorStore wrapping one)
            raise self._save_failed(step, e) from e
        self._in_flight = step
        return True

    def wait(self) -> None:
        """Block until the background save is on disk; CheckpointError if it failed."""
        if self._failed:  # Orbax re-raises a failed save at every wait; it was reported once
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._failed = True
            raise self._save_failed(self._in_flight, e) from e
        finally:
            self._in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if not self._failed:
                self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Another error is on its way out: a failing background save is reported, not raised in
        # its place.
        try:
            self.close()
        except CheckpointError as e:
            print(f"kdjax: warning: {e}", file=sys.stderr)

    def _save_failed(self, step: int | None, error: Exception) -> CheckpointError:
        self.manager.reload()  # what is really on disk: Orbax keeps old steps when a save fails
        good = self.manager.latest_step()
        kept = (f"the previous checkpoint, {self.path(good)}, is intact and rerunning the same "
                f"command resumes from it" if good is not None else
                "no earlier checkpoint exists, so a rerun starts from step 0")
        return CheckpointError(
            f"saving the checkpoint of step {step} to {self.directory} failed: {error}. Orbax "
            f"writes into a temporary directory, so nothing half-written is left as a checkpoint: "
            f"{kept}. Free disk space (or fix the permissions) there first.")

    def restore(self, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """Restore the newest readable checkpoint onto `abstract_state` (`kdjax.sharding.abstract`).

        A checkpoint that cannot be read (truncated, corrupted) is reported on stderr and moved to
        WORKDIR/checkpoints_unreadable, and the one before it is tried. Returns None when the
        workdir has no checkpoint. Raises CheckpointMismatchError when the newest one holds a
        different model or optimizer than this run's, CheckpointError when none is readable.
        """
        with _quiet_abandoned_reads():
            return self._restore(_items(abstract_state), abstract_state)

    def _restore(self, target: dict[str, Any], like: TrainState
                 ) -> tuple[TrainState, dict[str, Any]] | None:
        moved = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = self.path(step)
            try:
                saved = self.manager.item_metadata(step)
                if saved.get("train") is None and saved.get("model") is not None:
                    raise CheckpointMismatchError(
                        f"the checkpoint {path} holds a model without training state (written "
                        f"by `kdjax import`): it is a teacher (teacher.workdir) or a model to "
                        f"eval/export, not a run to resume; train in another --workdir")
                lines = [f"{item}/{line}" for item in target
                         for line in mismatches(saved[item].tree, target[item])]
                if lines:
                    raise CheckpointMismatchError(
                        f"the checkpoint {path} does not match this run's model and optimizer:\n  "
                        + "\n  ".join(lines) + "\nresume it with the config it was saved with "
                        f"(its config is in {self.workdir}/config.json), or start this config in "
                        f"another --workdir")
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    model=ocp.args.StandardRestore(target["model"]),
                    train=ocp.args.StandardRestore(target["train"]),
                    run=ocp.args.JsonRestore()))
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001  (JSON, TensorStore and Orbax errors alike)
                moved.append(self._set_aside(step))
                print(f"kdjax: warning: checkpoint {path} is unreadable ({_first_line(e)}); moved "
                      f"it to {moved[-1]}, trying the one before it", file=sys.stderr)
                continue
            return _state(restored["model"], restored["train"], like), dict(restored["run"])
        if moved:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: all were unreadable "
                                  f"and moved to {os.path.dirname(moved[0])}; start over in a new "
                                  f"--workdir (or delete them and use this one)")
        return None

    def _set_aside(self, step: int) -> str:
        # Kept, not deleted (the user may want to inspect or recover it), but out of Orbax's
        # directory, so that the resumed run can save this step again.
        dest = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR, str(step))
        n = 1
        while os.path.exists(dest):
            dest, n = os.path.join(os.path.dirname(dest), f"{step}.{n}"), n + 1
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(self.path(step), dest)
        self.manager.reload()
        return dest


def save_model_only(workdir: str, params: Any, model_state: Any, run: dict[str, Any], *,
                    step: int = 0) -> str:
    """Write a checkpoint with the "model" and "run" items only (no "train" item): a model that
    was not trained here (`kdjax import`), readable by every RunReader user; not resumable."""
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory, item_handlers={
        "model": ocp.StandardCheckpointHandler(), "run": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    try:
        manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave({"params": params, "model_state": model_state}),
            run=ocp.args.JsonSave(run)))
        manager.wait_until_finished()
    finally:
        manager.close()
    return os.path.join(directory, str(step))


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


class RunReader:
    """Read-only access to the checkpoints of a run (a teacher, `kdjax eval`, `kdjax export`).

    Never writes or deletes anything, so it may read a run that is still training. `what` names
    the argument the workdir came from, for error messages.
    """

    def __init__(self, workdir: str, *, what: str = "--workdir"):
        _quiet_orbax()
        self.workdir, self.what = workdir, what
        self.directory = checkpoint_dir(workdir)
        self.manager = None
        if os.path.isdir(self.directory):
            self.manager = ocp.CheckpointManager(
                self.directory, item_handlers=_handlers(),
                options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                     save_interval_steps=0))
        if self.manager is None or self.manager.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint in {self.directory}: {what}={workdir!r} is not a kdjax workdir "
                f"with a saved run (train a model there first with `kdjax train`, or import a "
                f"PyTorch checkpoint there with `kdjax import`)")

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def resolve_step(self, which: str | int = "latest") -> int:
        """"latest", "best" (by the run's checkpoint.best_metric) or a saved step number."""
        steps = list(self.manager.all_steps())
        if which == "latest":
            return steps[-1]
        if which == "best":
            checkpoint_config = self.run_meta(steps[-1])["config"]["checkpoint"]
            if not checkpoint_config["keep_best"]:
                raise ValueError(f"step='best' needs a run saved with checkpoint.keep_best > 0; "
                                 f"{self.what}={self.workdir!r} kept none (saved steps: {steps})")
            metric = checkpoint_config["best_metric"]
            best = ocp.CheckpointManager(self.directory, item_handlers=_handlers(),
                                         options=ocp.CheckpointManagerOptions(
                                             read_only=True, create=False, save_interval_steps=0,
                                             best_fn=lambda m: m[metric],
                                             best_mode=checkpoint_config["best_mode"]))
            step = best.best_step()
            best.close()
            if step is None:
                raise ValueError(f"step='best': no checkpoint of {self.what}={self.workdir!r} was "
                                 f"saved with eval metrics (saved steps: {steps})")
            return step
        try:
            step = int(which)
        except ValueError:
            step = None
        if step not in steps:
            raise ValueError(f"step={which!r} is not a saved checkpoint of {self.what}="
                             f"{self.workdir!r}; use 'latest', 'best' or one of {steps}")
        return step

    def run_meta(self, step: int) -> dict[str, Any]:
        """The checkpoint's "run" record: config, model spec, preprocessing."""
        try:
            run = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))
            return dict(run["run"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"the checkpoint {self.path(step)} is unreadable "
                                  f"({_first_line(e)})") from e

    def model_spec(self, step: int) -> ModelSpec:
        return ModelSpec.from_json(self.run_meta(step)["model"])

    def load_model(self, step: int, spec: ModelSpec, *, mesh: Mesh | None = None,
                   shardings_for: Callable[[Any], Any] | None = None,
                   what: str = "the model") -> nnx.Module:
        """Rebuild `spec` with the weights of checkpoint `step`, replicated on `mesh` (or placed
        as `shardings_for` says: see `restore_model`).

        Raises CheckpointMismatchError listing every differing parameter path and shape when the
        checkpoint does not hold that architecture, CheckpointError when it cannot be read.
        """
        path = self.path(step)
        try:
            saved = self.manager.item_metadata(step)["model"].tree
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"the checkpoint {path} is unreadable ({_first_line(e)})") from e
        if "lora" in self.run_meta(step):  # adapters: on their base, merged into `spec`'s model
            return lora.merged(self.load_lora(step, spec, mesh=mesh, what=what), spec)
        return restore_model(spec, saved, lambda target: self.manager.restore(
            step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))["model"],
            mesh=mesh, shardings_for=shardings_for, where=path, what=what)

    def load_lora(self, step: int, spec: ModelSpec, *, mesh: Mesh | None = None,
                  what: str = "the model") -> nnx.Module:
        """The LoRA student of checkpoint `step` unmerged: its base rebuilt from the run's
        init.workdir (verified by hash) and the checkpoint's adapters on it (kdjax.lora)."""
        path = self.path(step)
        saved = self.manager.item_metadata(step)["model"].tree

        def read(target):
            placed = sharding.abstract(target, sharding.replicated(mesh or sharding.make_mesh()))
            lines = mismatches(saved, placed)
            if lines:
                raise CheckpointMismatchError(f"{path} does not match {what}'s LoRA adapters:\n  "
                                              + "\n  ".join(lines))
            return self.manager.restore(step, args=ocp.args.Composite(
                model=ocp.args.StandardRestore(placed)))["model"]

        return lora.rebuild(self.run_meta(step), spec, read)

    def close(self) -> None:
        self.manager.close()


class SavedModel(NamedTuple):
    """A run's model as `read_model` reads it: the checkpoint's step and path, its "run"
    record (config, ModelSpec, preprocessing) and the model rebuilt from that spec."""

    step: int
    path: str
    run: dict[str, Any]
    spec: ModelSpec
    model: nnx.Module


def read_model(workdir: str, step: str | int = "latest", *, what: str = "--workdir"
               ) -> SavedModel:
    """The model of `workdir`'s checkpoint `step` ("latest", "best" or a number)."""
    reader = RunReader(workdir, what=what)
    try:
        n = reader.resolve_step(step)
        run = reader.run_meta(n)
        spec = ModelSpec.from_json(run["model"])
        return SavedModel(n, reader.path(n), run, spec, reader.load_model(n, spec))
    finally:
        reader.close()


def restore_model(spec: ModelSpec, saved_metadata: Any, read, *, mesh: Mesh | None, where: str,
                  what: str, shardings_for: Callable[[Any], Any] | None = None) -> nnx.Module:
    """Check the saved arrays against `spec`'s model, then `read(target)` them onto `mesh`.

    Shared by checkpoints and exports: `saved_metadata` is the saved {"params", "model_state"}
    tree's metadata and `read` restores that tree onto an abstract target. The arrays are
    replicated on `mesh`, or, with `shardings_for` (mapping {"params", "model_state"} to their
    NamedShardings, e.g. `kdjax.sharding.tree_shardings` with a mesh and rule), read straight onto
    their devices, whatever mesh wrote them: a large teacher is never whole on one device.
    """
    graphdef, params, model_state = nnx.split(spec.abstract(), nnx.Param, ...)
    tree = {"params": params, "model_state": model_state}
    shardings = (shardings_for(tree) if shardings_for is not None
                 else sharding.replicated(mesh or sharding.make_mesh()))
    target = sharding.abstract(tree, shardings)
    lines = mismatches(saved_metadata, target)
    if lines:
        raise CheckpointMismatchError(
            f"{where} does not match {what} (model {spec.name!r}, kwargs {spec.kwargs}, "
            f"{spec.num_classes} classes, input {tuple(spec.input_shape)}): "
            f"{len(lines)} mismatched parameter(s):\n  " + "\n  ".join(lines))
    try:
        with _quiet_abandoned_reads():
            restored = read(target)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where} is unreadable ({_first_line(e)})") from e
    return nnx.merge(graphdef, restored["params"], restored["model_state"])
