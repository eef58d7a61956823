"""How far each teacher preparation moves a trained teacher from its float32 self.

  python -m benchmarks.teacher_precision --teacher workdirs/teacher_cnn [--data-dir data/tfds]

For each preparation (BatchNorm folded or not, float32 or bfloat16 weights and compute), the
top-1 agreement with the float32 teacher as trained, and the largest logit difference, over the
whole eval split of the teacher's dataset: what `kdjax distill` checks on its first
`teacher.agreement_examples` examples before training. Writes
benchmarks/results/teacher_precision_<platform>.{json,md}, naming the device and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax

from benchmarks import common
from benchmarks.suite import _versions
from kdjax import classification, data, plan as plan_lib, sharding, teacher as teacher_lib

VARIANTS = (("float32", True), ("bfloat16", False), ("bfloat16", True))


def measure(teacher_workdir: str, data_dir: str | None = None) -> dict:
    config = plan_lib.read_run(teacher_workdir)
    if data_dir:
        config = config.replace(data={"data_dir": data_dir})
    spec = data.dataset_info(config.data.name, data_dir=data_dir or None)
    mesh = sharding.make_mesh()
    arrays = data.load_arrays(config.data.name, config.data.eval_split, data_dir=data_dir or None)
    rows = []
    for dtype, fold in VARIANTS:
        task = classification.ImageTask(config.replace(teacher={
            "workdir": teacher_workdir, "compute_dtype": dtype, "fold_batchnorm": fold}))
        preprocess = classification.preprocess_of(config.data, spec.image_shape[-1])
        task.preprocess = preprocess
        t = task.load_teacher(teacher_workdir, classification.model_spec(config.model, spec), mesh)
        agree = teacher_lib.agreement(
            t.reference, t.model, task.eval_input(mesh, arrays)(), preprocess,
            max_examples=len(arrays["label"]))
        rows.append({"compute_dtype": dtype, "fold_batchnorm": fold,
                     **dataclasses.asdict(t.preparation), **dataclasses.asdict(agree)})
    host = common.host_info()
    platform = jax.default_backend()
    device = f"CPU ({host['cpu']})" if platform == "cpu" else jax.devices()[0].device_kind
    return {"teacher": teacher_workdir, "dataset": f"{config.data.name} {config.data.eval_split}",
            "model": config.model.name, "device": device, "platform": platform,
            "software": _versions(), "date": host["date"], "host": host, "rows": rows}


def markdown(result: dict) -> str:
    sw = ", ".join(f"{k} {v}" for k, v in result["software"].items() if v)
    lines = [f"# Teacher preparation vs the float32 teacher ({result['device']})", "",
             f"Teacher `{result['model']}` from {result['teacher']}, on {result['dataset']}; "
             f"{result['device']} ({result['platform']}); {sw}; {result['date']}.", "",
             "| weights and compute | BatchNorm folded | examples | top-1 agreement | "
             "max abs logit difference |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {r['folded']} of {r['batchnorms']} | {r['examples']:,} | "
                     f"{100 * r['top1']:.2f}% | {r['max_abs_logit_diff']:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the workdir of the run that trained it")
    p.add_argument("--data-dir", default="", help="where its dataset is prepared")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    result = measure(args.teacher, args.data_dir)
    stem = os.path.join(args.out, f"teacher_precision_{result['platform']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
