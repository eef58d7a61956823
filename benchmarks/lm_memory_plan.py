"""Memory of the fused language-model distillation step at real sizes, planned on the CPU.

    python -m benchmarks.lm_memory_plan            (writes benchmarks/results/lm_memory_plan_cpu.md)

Ahead-of-time compilation of kdjax's fused LM step (kdjax.lm.step: the teacher's forward, the
student's forward and backward with the chunked token loss, AdamW) for a Llama-3.1-8B-shaped
teacher and a Llama-3.2-1B-shaped student (vocabulary 128,256), with abstract arrays: no weight
is allocated, XLA's buffer assignment reports what one device would hold
(`Compiled.memory_analysis()`: arguments, outputs, temporaries). The sizes are the CPU
compiler's; a GPU's differ in the fusions (and cuDNN's workspaces) but not in what must be held:
weights, optimizer state, activations kept for the backward pass.

Rows:
  (a) one device: the teacher in bfloat16, the student float32 parameters with bfloat16
      activations and per-block rematerialisation, T = 4096; the batch sizes measured and the
      largest whose total fits 80 GB (extrapolated linearly from two batches, then compiled);
  (b) 8 devices (simulated: XLA_FLAGS=--xla_force_host_platform_device_count=8) with the student
      and the teacher FSDP-sharded, per device;
  (c) one attention layer's forward and backward at T = 8192: the explicit scores against the
      blockwise form (kdjax.lm.attention);
  (d) compile time of a 4- and a 16-layer student's step, layers unrolled and scanned.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import common
from kdjax import sharding
from kdjax.lm import attention
from kdjax.lm.models import LM_MODELS, Transformer
from kdjax.lm.objective import TokenObjective
from kdjax.lm.step import make_lm_step
from kdjax.step import DeviceData, Distillee, freeze, init_train_state

VOCAB = 128_256
# Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B), untied head.
TEACHER = dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
               rope_theta=500_000.0)
STUDENT = LM_MODELS["llama3_1b"]
GB = 1e9


def _abstract(tree, dtype=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)
        else x.dtype), tree)


def step_memory(batch: int, seq_len: int, *, mesh, student_layers: int | None = None,
                teacher: bool = True, remat: str = "full", fsdp: bool = False,
                scan: bool = True) -> dict:
    """Compile the fused step with abstract arrays; its per-device memory and compile time."""
    student_kwargs = {**STUDENT, "remat": remat, "scan_layers": scan}
    if student_layers is not None:
        student_kwargs["num_layers"] = student_layers

    def build_student():
        return Distillee(Transformer(vocab_size=VOCAB, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                                     **student_kwargs))

    tx = optax.adamw(1e-4)
    rows = batch * 2
    graphdef, _ = nnx.split(nnx.eval_shape(build_student))
    state = jax.eval_shape(lambda: init_train_state(build_student(), tx, seed=0,
                                                    num_examples=rows)[1])
    frozen = None
    if teacher:
        t_model = nnx.eval_shape(lambda: Transformer(vocab_size=VOCAB, dtype=jnp.bfloat16,
                                                     rngs=nnx.Rngs(1), scan_layers=scan,
                                                     **TEACHER))
        frozen = freeze(t_model)._replace(variables=_abstract(nnx.state(t_model), jnp.bfloat16))
    rule = "fsdp" if fsdp else "replicated"
    state_sharding = sharding.state_shardings(state, mesh, rule) if mesh.size > 1 else None
    teacher_sharding = ((sharding.tree_shardings(frozen.variables, mesh, rule),)
                        if frozen is not None and mesh.size > 1 else None)
    data = DeviceData({"tokens": jax.ShapeDtypeStruct((rows, seq_len + 1), jnp.int32),
                       "segments": jax.ShapeDtypeStruct((rows, seq_len + 1), jnp.int32)},
                      batch_size=batch)
    if mesh.size > 1:
        data = DeviceData(sharding.put(data.arrays, sharding.replicated(mesh)), batch)
        state = sharding.abstract(state, state_sharding)
    objective = TokenObjective(divergence="forward_kl" if teacher else None,
                               kwargs={"temperature": 1.0} if teacher else {}, chunk_size=1024)
    step = make_lm_step(graphdef, tx, objective, teacher=frozen, data=data, mesh=mesh,
                        state_sharding=state_sharding, teacher_sharding=teacher_sharding)
    t0 = time.perf_counter()
    compiled = step.lower(state).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes \
        - m.alias_size_in_bytes
    return {"batch": batch, "seq_len": seq_len, "devices": mesh.size, "rule": rule,
            "remat": remat, "scan": scan, "student_layers": student_kwargs["num_layers"],
            "teacher": teacher, "argument_gb": m.argument_size_in_bytes / GB,
            "output_gb": m.output_size_in_bytes / GB, "alias_gb": m.alias_size_in_bytes / GB,
            "temp_gb": m.temp_size_in_bytes / GB, "total_gb": total / GB,
            "compile_s": seconds}


def attention_memory(seq_len: int, *, blockwise: bool, block: int = 1024) -> dict:
    """One attention layer (Llama-3.2-1B's heads) forward and backward, batch 1."""
    q = jax.ShapeDtypeStruct((1, seq_len, 32, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, seq_len, 8, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)

    def loss(q, k, v, seg):
        if blockwise:
            out = attention.blockwise(q, k, v, seg, seg, block=block)
        else:
            out = attention.explicit(q, k, v, attention.allowed(seg, seg))[0]
        return out.astype(jnp.float32).sum()

    m = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile() \
        .memory_analysis()
    return {"seq_len": seq_len, "form": f"blockwise ({block})" if blockwise else "explicit",
            "temp_gb": m.temp_size_in_bytes / GB}


def eight_devices(seq_len: int, batch: int) -> dict:
    """Row (b), in a process with 8 simulated devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.lm_memory_plan", "--fsdp-row",
                          str(seq_len), str(batch)], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--fsdp-row", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fsdp_row:
        seq_len, batch = args.fsdp_row
        mesh = sharding.make_mesh(data=1, fsdp=8)
        print(json.dumps(step_memory(batch, seq_len, mesh=mesh, fsdp=True)))
        return
    host = common.host_info()
    mesh = sharding.make_mesh()
    t = args.seq_len
    one = [step_memory(b, t, mesh=mesh) for b in (1, 2)]
    per_row = one[1]["total_gb"] - one[0]["total_gb"]
    fit = int((80.0 - one[0]["total_gb"]) // per_row) + 1 if per_row > 0 else 1
    largest = step_memory(fit, t, mesh=mesh) if fit > 2 else None
    while largest is not None and largest["total_gb"] > 80.0 and fit > 2:
        fit -= 1
        largest = step_memory(fit, t, mesh=mesh)
    fsdp = eight_devices(t, 8)
    attn = [attention_memory(8192, blockwise=False), attention_memory(8192, blockwise=True)]
    depth = [step_memory(1, 512, mesh=mesh, student_layers=n, teacher=False, scan=scan)
             for n in (4, 16) for scan in (False, True)]
    result = {"host": host, "host_after": common.host_info(), "device": "cpu (AOT)",
              "teacher": TEACHER, "student": STUDENT, "vocab": VOCAB, "one_device": one,
              "largest_fit_80gb": largest, "fsdp_8": fsdp, "attention_8192": attn,
              "depth": depth}
    common.write_results("lm_memory_plan_cpu", result, markdown)


def markdown(result: dict) -> str:
    """The results file's tables and lines of `main`'s result."""
    host, one, largest = result["host"], result["one_device"], result["largest_fit_80gb"]
    fsdp, attn, depth = result["fsdp_8"], result["attention_8192"], result["depth"]
    per_row = one[1]["total_gb"] - one[0]["total_gb"]
    fit = int((80.0 - one[0]["total_gb"]) // per_row) + 1 if per_row > 0 else 1
    rows = [*one, *([largest] if largest else []), fsdp]
    lines = ["# The fused LM distillation step at real sizes: memory planned on the CPU", "",
             f"Ahead-of-time compiled with abstract arrays (`python -m benchmarks.lm_memory_plan`"
             f"), {host['cpu']}, {host['date']}: XLA:CPU's buffer assignment, per device. "
             "Teacher: Llama-3.1-8B's shape in bfloat16 (16.1 GB of weights); student: "
             "Llama-3.2-1B's shape, float32 parameters and AdamW state, bfloat16 activations, "
             "each block rematerialised (`remat=\"full\"`); chunked token loss (1024 positions "
             "a chunk); vocabulary 128,256.", "",
             "| devices | sharding | batch | T | arguments GB | temporaries GB | outputs GB "
             "| donated GB | total GB | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['rule']} | {r['batch']} | {r['seq_len']} | "
                     f"{r['argument_gb']:.2f} | {r['temp_gb']:.2f} | {r['output_gb']:.2f} | "
                     f"{r['alias_gb']:.2f} | {r['total_gb']:.2f} | {r['compile_s']:.0f} |")
    lines += ["", "(a) largest batch within 80 GB on one device: "
              + (f"{largest['batch']} ({largest['total_gb']:.1f} GB)" if largest else
                 f"{fit} (from the two measured batches: {per_row:.2f} GB per row)"), "",
              "(c) one attention layer (32 query heads, 8 key/value heads, head 64), forward and "
              "backward, batch 1, T = 8192: temporaries " + ", ".join(
                  f"{a['form']} {a['temp_gb']:.2f} GB" for a in attn) + ".", "",
              "(d) compile time of the student's step (no teacher, T = 512): " + ", ".join(
                  f"{d['student_layers']} layers {'scanned' if d['scan'] else 'unrolled'} "
                  f"{d['compile_s']:.0f} s" for d in depth) + ".", "",
              "Rows (a) and (b) scan the layers (`model.kwargs.scan_layers`).", "",
              f"Load average {host['load_average_1min']:.1f} before, "
              f"{result['host_after']['load_average_1min']:.1f} after (compile times only)."]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
