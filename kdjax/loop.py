"""The step loop of every run: kdjax.trainer's skeleton (image and language-model tasks) and the
data-free ZSKT game (kdjax.datafree.run).

One call of the compiled step advances `per_call` steps; the loop only dispatches and, on the
schedules of the config (train.log_every_steps, eval.every_steps, checkpoint.every_steps and
keep_best), logs, evaluates and saves. Metrics stay on the device until a log fetches them in one
transfer. What a caller differs in is passed in as `Hooks`: the step call (streamed batches bound
to it), the evaluation, the train metrics' reduction and the run record saved with each
checkpoint.

Failure handling is the same for all: NaN/Inf found at the next log, eval or save boundary
(`check_finite`: train.nan_policy="stop" raises before anything non-finite is saved);
SIGTERM/SIGINT save the current step, then raise `errors.Interrupted`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

import kdjax
from kdjax import checkpoint, distributed, metrics as metrics_lib
from kdjax import preemption, progress as progress_lib, sharding
from kdjax.errors import Interrupted, NonFiniteError
from kdjax.models import ModelSpec
from kdjax.step import TrainState, nonfinite_terms


def check_finite(state: TrainState, pending: list, logged_at: int, per_call: int,
                 ckpt: checkpoint.Checkpointer, nan_policy: str) -> None:
    """Raise NonFiniteError if a step since the last check went non-finite (nan_policy="stop").

    Reads two scalars the step keeps on the device: called where the loop syncs anyway.
    """
    bad_step, bad_terms = (int(x) for x in jax.device_get((state.bad_step, state.bad_terms)))
    if not bad_step or nan_policy != "stop":
        return
    host = jax.device_get(list(pending))
    # pending[i] holds the metrics of steps logged_at + i*per_call + 1 .. (i+1)*per_call.
    at = (bad_step - logged_at - 1) // per_call
    entry = host[at] if 0 <= at < len(host) else {}
    names = nonfinite_terms(bad_terms, entry.keys()) if entry else [f"bitmask {bad_terms:#b}"]
    values = ", ".join(f"{n}={float(entry[n])}" for n in names if n in entry)
    ckpt.wait()  # a save still in flight is of a state checked finite: let it complete
    good = ckpt.latest_step()
    kept = (f"the last good checkpoint, {ckpt.path(good)}, is kept and rerunning the command "
            f"resumes from it" if good is not None else "no checkpoint was saved before it")
    raise NonFiniteError(
        f"step {bad_step} went non-finite in: {', '.join(names)}"
        + (f" ({values}{', mean over the steps of that call' if per_call > 1 else ''})"
           if values else "")
        + f". Stopped without saving a non-finite state (train.nan_policy='stop'); {kept}. "
        f"Lower optimizer.learning_rate or add optimizer.warmup_steps, or set "
        f"train.nan_policy='skip' to skip such steps")


def crossed(every: int, before: int, after: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]: a call of several steps still
    logs, evaluates and saves on its schedule."""
    return every > 0 and after // every > before // every


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What a trainer's loop does that the other's does not.

    Attributes:
      step: one call of the compiled step, `state -> (state, metrics)` (`per_call` steps).
      evaluate: the eval metrics of a state, {"eval/...": float}.
      record: `(pending, last_train) -> dict`, the run record saved with a checkpoint.
      means: the train metrics of the pending steps' on-device metrics (one host sync).
      items_per_step: examples (images, or token positions) one step trains on.
      rate: the throughput's name, "images" or "tokens" (logged as train/<rate>_per_s).
      postfix: train metrics shown on the progress bar.
      on_log: called with each log's train metrics and the state (e.g. a warning).
      checkpointed: the TrainState inside the loop's state, which is checked for NaN/Inf and
        checkpointed (the state itself for a distillation run; the student's inside a game
        that also trains a generator, as data-free ZSKT does).
    """

    step: Callable[[TrainState], tuple[TrainState, Any]]
    evaluate: Callable[[TrainState], dict[str, float]]
    record: Callable[[list, dict[str, float]], dict[str, Any]]
    means: Callable[[list], dict[str, float]]
    items_per_step: float
    rate: str
    postfix: tuple[str, ...] = ("loss",)
    on_log: Callable[[dict[str, float], TrainState], None] | None = None
    checkpointed: Callable[[Any], TrainState] = lambda state: state


@dataclasses.dataclass
class Outcome:
    """Where the loop ended: the state, its step, the last eval and train metrics, and the
    training throughput (items per second of device-bound time: the first call's compile and
    the evals excluded; None when no call was timed)."""

    state: Any  # the loop's state (Hooks.checkpointed gives its TrainState)
    step: int
    eval_metrics: dict[str, float]
    last_train: dict[str, float]
    items_per_s: float | None


def run(plan: Any, state: Any, hooks: Hooks, *,
        ckpt: checkpoint.Checkpointer, workdir: str, per_call: int, pending: list,
        last_train: dict[str, float], progress: bool) -> Outcome:
    """Train from `state` to plan.train.steps in calls of `per_call` steps.

    `pending` and `last_train` are a resumed run's (its checkpoint's record) or empty. Saves the
    final state with its eval metrics; stopped by a signal, saves the current one and raises
    `errors.Interrupted`. `progress` False: no bar, even on a terminal (kdjax.progress: a line
    per log period and per phase instead).
    """
    total, nan_policy = plan.train.steps, plan.train.nan_policy
    step = start = int(jax.device_get(hooks.checkpointed(state).step))
    logged_at = start - len(pending) * per_call
    primary = distributed.is_primary()
    writer = metrics_lib.MetricWriter(workdir, start_step=start, active=primary)
    eval_metrics: dict[str, float] = {}
    show = progress_lib.Progress(total=total, start=step, rate=hooks.rate, shown=hooks.postfix,
                                 bar=None if progress else False, active=primary)
    t_train, t_mark, items_timed, steps_timed = 0.0, None, 0.0, 0
    try:
        with preemption.StopSignals() as signals:
            if step < total:
                show.start_phase(f"compiling the train step and running its first call "
                                 f"(steps {step + 1}-{step + per_call} of {total})")
            while step < total and signals.received is None:
                state, m = hooks.step(state)
                pending.append(m)
                before, step = step, step + per_call
                if t_mark is None:  # compile + first call: excluded from throughput
                    jax.block_until_ready(state)
                    t_mark = time.perf_counter()
                    show.end_phase("compiled; first call done")
                else:
                    items_timed += per_call * hooks.items_per_step
                    steps_timed += per_call
                log = crossed(plan.train.log_every_steps, before, step) or step == total
                evaluate = crossed(plan.eval.every_steps, before, step) or step == total
                # With keep_best every evaluated model is a candidate for the best N.
                save = step < total and (crossed(plan.checkpoint.every_steps, before, step)
                                         or (plan.checkpoint.keep_best > 0 and evaluate))
                if log or evaluate or save:
                    check_finite(hooks.checkpointed(state), pending, logged_at, per_call, ckpt,
                                 nan_policy)
                if log:
                    last_train = hooks.means(pending)  # the one host sync per log period
                    pending, logged_at = [], step
                    now = time.perf_counter()
                    t_train, t_mark = t_train + (now - t_mark), now
                    rate = items_timed / t_train if t_train > 0 else 0.0
                    writer.write(step, {**last_train, f"train/{hooks.rate}_per_s": rate})
                    show.log(step, last_train, rate,
                             steps_timed / t_train if t_train > 0 and steps_timed else None)
                    if hooks.on_log is not None:
                        hooks.on_log(last_train, state)
                if evaluate:
                    eval_metrics = _evaluate(hooks, state, step, show)
                    writer.write(step, eval_metrics)
                    t_mark = time.perf_counter()
                if save:
                    ckpt.save(hooks.checkpointed(state), hooks.record(pending, last_train),
                              metrics=eval_metrics if evaluate else None)
                    show.say(f"kdjax: saving step {step} to {ckpt.path(step)} (in the "
                             f"background)")
                show.advance(per_call)
            if step < total:  # stopped by a signal: save this step, then stop
                check_finite(hooks.checkpointed(state), pending, logged_at, per_call, ckpt,
                             nan_policy)
                ckpt.save(hooks.checkpointed(state), hooks.record(pending, last_train))
                ckpt.wait()
                name = signal.Signals(signals.received).name
                raise Interrupted(signals.received, (
                    f"{name} received: saved a checkpoint at step {step} of {total} in "
                    f"{ckpt.path(step)} and stopped; run the same command again to resume"))
            if not eval_metrics:  # resumed at the end: still report the model's quality
                eval_metrics = _evaluate(hooks, state, step, show)
            show.start_phase(f"saving the final checkpoint, step {step}")
            ckpt.save(hooks.checkpointed(state), hooks.record(pending, last_train),
                      metrics=eval_metrics)
            ckpt.wait()
            show.end_phase(f"saved {ckpt.path(step)}")
    finally:
        show.close()
        writer.close()
    return Outcome(state, step, eval_metrics, last_train,
                   items_timed / t_train if t_train > 0 else None)


def _evaluate(hooks: Hooks, state: Any, step: int, show: progress_lib.Progress
              ) -> dict[str, float]:
    show.start_phase(f"evaluating at step {step}")
    metrics = hooks.evaluate(state)
    show.evaluated(step, metrics)
    return metrics


def recorder(plan: Any, student: ModelSpec, **extra: Any
             ) -> Callable[[list, dict[str, float]], dict[str, Any]]:
    """`Hooks.record` for a run: what a checkpoint carries besides the state (kdjax's version,
    the config, the student's ModelSpec, the train metrics not yet logged, the last logged
    ones) and the task's `extra` fields (the input normalisation, a language model's tokenizer
    and dataset)."""
    config_json = json.loads(plan.to_json())

    def record(pending: list, last_train: dict[str, float]) -> dict[str, Any]:
        return {"kdjax_version": kdjax.__version__, "config": config_json,
                "model": student.to_json(), **extra,
                "pending_train_metrics": metrics_lib.pending_to_json(pending),
                "last_train": last_train}

    return record


def run_facts(done: Outcome, *, start: int, per_call: int, mesh: jax.sharding.Mesh,
              t_start: float) -> dict[str, Any]:
    """The summary's facts of how a run went: its steps, time, devices and bytes per device."""
    return {"steps": done.step, "steps_this_run": done.step - start,
            "skipped_steps": int(jax.device_get(done.state.skipped_steps)),
            "wall_time_s": time.perf_counter() - t_start, "steps_per_call": per_call,
            "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
            "num_processes": jax.process_count(), "mesh": dict(mesh.shape),
            # What sharding buys: bytes one device holds (the largest over devices).
            "param_bytes_per_device": sharding.bytes_per_device(done.state.params),
            "opt_state_bytes_per_device": sharding.bytes_per_device(done.state.opt_state)}


def skipped_steps_warning(skipped_at_start: int
                          ) -> Callable[[dict[str, float], TrainState], None]:
    """An `on_log` hook: warn on stderr when train.nan_policy="skip" has skipped steps beyond
    the `skipped_at_start` a resumed run had already reported."""
    reported = [skipped_at_start]

    def on_log(last_train: dict[str, float], state: TrainState) -> None:
        skipped = int(last_train.get("train/skipped_steps", 0))
        if skipped > reported[0]:
            reported[0] = skipped
            print(f"kdjax: warning: {skipped} step(s) skipped so far for non-finite values "
                  f"(train.nan_policy='skip'), the first at step {int(state.bad_step)}",
                  file=sys.stderr, flush=True)

    return on_log
