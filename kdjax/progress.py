"""How a run shows its progress, fitted to where it runs.

- On a terminal: a progress bar (tqdm) with the last logged train metrics and the throughput.
- In a log (stdout to a file or a pipe, or `--no-progress`): one line per log period (step,
  train metrics, images or tokens per second, ETA) instead of a bar, whose carriage-return
  updates would flood the file.
- Both: one line per phase that takes time without advancing the step count (compiling the
  step, evaluating, saving), so a run is never silent for minutes.

Only the first process of a multi-process run shows anything.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence

#: The eval metrics a phase line shows, when the run has them.
EVAL_SHOWN = ("eval/accuracy", "eval/loss", "eval/perplexity", "eval/teacher_agreement")


def duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 1h02m."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """The progress display of one run from step `start` to `total`.

    Args:
      total, start: the run's last step and the step it starts (or resumes) from.
      rate: the throughput's unit ("images", "tokens").
      shown: the train metrics to show (names without "train/").
      bar: a progress bar rather than lines; None = a bar when stderr is a terminal.
      active: show anything at all (False on processes other than the first).
    """

    def __init__(self, *, total: int, start: int, rate: str, shown: Sequence[str],
                 bar: bool | None = None, active: bool = True):
        self.total, self.rate, self.shown, self.active = total, rate, tuple(shown), active
        if bar is None:
            bar = sys.stderr.isatty()
        self.bar = None
        if active and bar:
            from tqdm import tqdm  # noqa: PLC0415  (only a terminal needs it)

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self._phase_started = 0.0

    def say(self, line: str) -> None:
        """Print a line (above the bar, when there is one)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def start_phase(self, what: str) -> None:
        """A phase that takes time without advancing the steps: say so before it starts."""
        self._phase_started = time.perf_counter()
        self.say(f"kdjax: {what} ...")

    def end_phase(self, what: str) -> None:
        self.say(f"kdjax: {what} ({duration(time.perf_counter() - self._phase_started)})")

    def log(self, step: int, train: Mapping[str, float], items_per_s: float,
            steps_per_s: float | None) -> None:
        """The train metrics of a log period: the bar's postfix, or one line with the ETA."""
        # (a window whose steps were all skipped has no loss to show)
        values = {k: train[f"train/{k}"] for k in self.shown if f"train/{k}" in train}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}
                                 | {f"{self.rate[:3]}_s": f"{items_per_s:,.0f}"})
            return
        eta = (f"ETA {duration((self.total - step) / steps_per_s)}" if steps_per_s
               else "ETA after the next log")
        metrics = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.say(f"kdjax: step {step}/{self.total} ({100 * step / self.total:.0f}%) {metrics} | "
                 f"{items_per_s:,.0f} {self.rate}/s | {eta}")

    def evaluated(self, step: int, metrics: Mapping[str, float]) -> None:
        shown = ", ".join(f"{k.removeprefix('eval/')} {metrics[k]:.4f}" for k in EVAL_SHOWN
                          if k in metrics)
        self.end_phase(f"eval at step {step}: {shown}" if shown else f"eval at step {step}")

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
