"""(c) Iterative prune-distill cycles: prune a little, distil to recover, repeat.

  prev=workdirs/demo/student_kd
  for k in 1 2 3; do
    kdjax distill --config experiments/fashion_mnist/compress_cycles.py:$k \
        --workdir workdirs/compress/cycle$k --config.init.workdir=$prev
    prev=workdirs/compress/cycle$k
  done

Cycle k starts from cycle k-1's student (cycle 1 from kd.py's) and prunes it at its first step
(one-shot, by magnitude) to SPARSITIES[k-1] of its weights, then distils for a third of an epoch;
weights pruned in a cycle are 0 in the next one's initial weights and stay pruned (magnitude).
Three cycles cost one epoch, as compress_prune_after.py's single one.
"""

import compress_prune_after

SPARSITIES = (0.5, 0.75, 0.9)


def get_config(cycle: str = "1"):
    k = int(cycle)
    c = compress_prune_after.get_config(f"magnitude-{SPARSITIES[k - 1]}")
    c.train.steps = 156
    c.eval.every_steps = c.checkpoint.every_steps = 156
    c.prune.schedule = "one_shot"
    c.prune.begin_step = 0
    return c
