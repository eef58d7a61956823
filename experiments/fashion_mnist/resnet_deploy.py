"""A deployable ResNet student on Fashion-MNIST: teacher -> distilled resnet20 -> pruned across its
residual groups to about 2x and 4x fewer FLOPs (fine-tuned with distillation, or with labels
only at the same steps) -> int8, each exported to ONNX and timed in ONNX Runtime.

  kdjax train   --config experiments/fashion_mnist/resnet_deploy.py:teacher --workdir W/teacher
  kdjax distill --config experiments/fashion_mnist/resnet_deploy.py:student --workdir W/student \
      --config.teacher.workdir=W/teacher
  kdjax distill --config experiments/fashion_mnist/resnet_deploy.py:prune-0.3 --workdir W/p2x \
      --config.teacher.workdir=W/teacher --config.init.workdir=W/student
  kdjax train   --config experiments/fashion_mnist/resnet_deploy.py:prune-0.3 --workdir W/p2x_ce \
      --config.init.workdir=W/student --config.loss.name=ce --config.loss.kwargs={}
  kdjax export  --workdir W/p2x --out W/p2x.onnx --format onnx
  kdjax report  W/student W/p2x --runtime onnxruntime

The models are the zoo's CIFAR ResNets at 28x28x1: a resnet32 teacher and a resnet20 student
(widths 16, 32, 64). `prune-SPARSITY` prunes the student by coupled channel groups (kdjax.compress
.coupling: the stem and every block output of a stage feed the same residual sums and are one
group), ranked by the group's summed L2 norm (DepGraph's group_l2), each group keeping a multiple
of 8 channels (prune.round_to: ONNX Runtime's CPU convolutions block channels by 8). At 0.3 the
resnet20 keeps widths 8, 8, 24, 48 (2.26x fewer FLOPs), at 0.5 widths 8, 8, 16, 32 (3.92x);
benchmarks/results/coupled_pruning_speed_cpu.md. The masks grow on Zhu & Gupta's cubic schedule
over the first half of the fine-tuning, the pruned channels are removed on export.

Budgets are epochs of the 60,000 training images at batch 128 (EPOCH steps), small enough for
three seeds on a 2-core CPU (XLA:CPU's convolution gradients are slow):
benchmarks/resnet_deploy.py sets them.
"""

from kdjax.config import base_config

EPOCH = 468  # steps of one epoch of the 60,000 training images at batch 128
AUGMENTATION = {"crop_padding": 2, "flip": True}


def get_config(role: str = "student"):
    kind, _, sparsity = role.partition("-")
    try:
        valid = kind in ("teacher", "student") and not sparsity or (
            kind == "prune" and 0 <= float(sparsity) < 1)
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"resnet_deploy.py:ROLE takes teacher, student or prune-SPARSITY with "
                         f"SPARSITY in [0, 1) (e.g. prune-0.3), got {role!r}")
    c = base_config()
    c.seed = 0
    c.data.name = "fashion_mnist"
    c.data.update(AUGMENTATION)
    c.train.batch_size = 128
    c.optimizer.update(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
                       schedule="cosine")
    c.model.name = "resnet32" if kind == "teacher" else "resnet20"
    steps = EPOCH
    if kind != "teacher":  # Hinton's loss of kd.py: 0.1 CE + 0.9 T^2 KL at T = 4
        c.loss.name = "kd"
        c.loss.kwargs = {"temperature": 4.0}
        c.loss.ce_weight, c.loss.kd_weight = 0.1, 0.9
        c.teacher.workdir = "workdirs/resnet_deploy/teacher"
    if kind == "prune":
        steps = EPOCH // 2
        c.init.workdir = "workdirs/resnet_deploy/student"
        c.optimizer.learning_rate = 0.01  # fine-tuning a trained student
        c.prune.update(method="structured", sparsity=float(sparsity), criterion="group_l2",
                       schedule="cubic", begin_step=0, end_step=steps // 2,
                       every_steps=max(1, steps // 18), round_to=8)
    c.train.steps = steps
    c.train.log_every_steps = max(1, steps // 10)
    c.eval.every_steps = c.checkpoint.every_steps = steps
    return c
