"""How a run ends when it does not finish, and the `kdjax` exit code of each ending.

  0    finished.
  1    RunError: stopped during training: a step went non-finite (NonFiniteError), a checkpoint
       could not be written or read (CheckpointError). The message says what was kept.
  2    refused before any training: a bad config, argument, workdir, dataset or teacher (a
       ValueError, TypeError or FileNotFoundError; CheckpointMismatchError is a ValueError).
  128+N  Interrupted by signal N (143: SIGTERM, 130: SIGINT) after saving a checkpoint; running
       the same command again resumes. (A shell reports a process killed by that signal the same
       way, so job scripts treat the run as not finished.)
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A run stopped before its end; the message says why and what is kept."""

    exit_code = 1


class CheckpointError(RunError):
    """A checkpoint could not be written or read; the message says what is intact."""


class NonFiniteError(RunError):
    """A training step produced NaN or Inf (train.nan_policy="stop")."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds arrays of other paths or shapes than the model it is restored into."""


class Interrupted(RunError):
    """The run stopped on SIGTERM/SIGINT after saving its checkpoint; rerunning resumes it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
