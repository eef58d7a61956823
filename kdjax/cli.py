"""The `kdjax` command line.

  kdjax train   --config experiments/fashion_mnist/teacher.py --workdir workdirs/teacher
  kdjax distill --config experiments/fashion_mnist/kd.py --workdir workdirs/kd --config.train.steps=200
  kdjax eval    --workdir workdirs/kd            (reads the run's config.json)
  kdjax prepare fashion_mnist --from /usr/share/datasets/fashion-mnist

Several hosts: the same command on every host, plus --coordinator HOST:PORT --num-processes N
--process-id I unless SLURM, Open MPI or a TPU pod provides them (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdjax", description="Knowledge distillation in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("train", "supervised training (a teacher, or a baseline student)"),
                       ("distill", "distil a student from teacher.workdir's model"),
                       ("eval", "evaluate a workdir's latest checkpoint")):
        c = sub.add_parser(name, help=text,
                           epilog="Override any config key with --config.KEY=VALUE, e.g. "
                                  "--config.train.steps=200 --config.loss.kwargs={'temperature':2.0}")
        c.add_argument("--config", required=name != "eval",
                       help="experiment file with get_config() (eval: default WORKDIR/config.json)")
        c.add_argument("--workdir", required=True, help="where the run's outputs go")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        multi = c.add_argument_group(
            "multi-host", "every process runs the same command (docs/scaling.md); under SLURM, "
            "Open MPI or on a TPU pod these are detected and may be left out")
        multi.add_argument("--coordinator", metavar="HOST:PORT",
                           help="address of process 0's coordinator service")
        multi.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
        multi.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    prep = sub.add_parser("prepare", help="prepare a dataset offline from files you copied in")
    prep.add_argument("name", help="dataset name, e.g. fashion_mnist")
    prep.add_argument("--from", dest="source", required=True, help="folder with the source files")
    prep.add_argument("--data-dir", default=None,
                      help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    prep.add_argument("--skip-checksums", action="store_true",
                      help="accept files whose checksums differ from the official ones")
    prep.add_argument("--max-examples", type=int, default=None,
                      help="keep only the first N examples of each split (quick demos, tests)")
    summ = sub.add_parser("summary", help="print the summary.json of finished runs side by side")
    summ.add_argument("workdirs", nargs="+")
    return p


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key.startswith("eval/"):
        return f"{v:.2%}"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:,.0f}"
    return str(v)


def summary_table(workdirs: Sequence[str]) -> str:
    """One row per run: the numbers a distillation comparison is judged by."""
    cols = (("run", None), ("model", "model"), ("params", "num_params"),
            ("seed", "seed"), ("accuracy", "eval/accuracy"), ("top5", "eval/top5_accuracy"),
            ("agree_w_teacher", "eval/teacher_agreement"), ("steps", "steps"),
            ("img/s", "images_per_s"), ("device", "device_kind"))
    rows = []
    for w in workdirs:
        path = os.path.join(w, "summary.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {w!r} has no finished run")
        with open(path) as f:
            s = json.load(f)
        row = [w if key is None else _fmt(key, s.get(key)) for _, key in cols]
        rows.append(row)
    widths = [max(len(t), *(len(r[i]) for r in rows)) for i, (t, _) in enumerate(cols)]
    lines = ["  ".join(t.ljust(w) for (t, _), w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _load_config(args: argparse.Namespace, overrides: Sequence[str]):
    from kdjax import config as config_lib, trainer

    if args.config:
        return config_lib.load(args.config, overrides)
    config = trainer.read_run_config(args.workdir)
    for item in overrides:
        config_lib.apply_override(config, item)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = _parser().parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
        _parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "prepare":
        if overrides:
            _parser().error("kdjax prepare takes no --config overrides")
        from kdjax import data

        path = data.prepare(args.name, args.source, data_dir=args.data_dir,
                            verify_checksums=not args.skip_checksums,
                            max_examples_per_split=args.max_examples)
        print(f"kdjax: prepared {args.name} in {path}")
        return 0

    if args.command == "summary":
        print(summary_table(args.workdirs))
        return 0
    from kdjax import distributed

    # Before any JAX computation: afterwards jax.devices() spans every process.
    how = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if how:
        import jax

        print(f"kdjax: process {jax.process_index()} of {jax.process_count()} ({how}), "
              f"{jax.device_count()} devices", flush=True)
    config = _load_config(args, overrides)
    from kdjax import trainer

    if args.command == "eval":
        result = trainer.evaluate(config, args.workdir)
    else:
        result = trainer.train(config, args.workdir, distill=args.command == "distill",
                               progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def entry() -> None:
    """Console-script entry point: user errors print one clear line, not a traceback."""
    try:
        sys.exit(main())
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("KDJAX_TRACEBACK"):
            raise
        print(f"kdjax: error: {e}\n(set KDJAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
