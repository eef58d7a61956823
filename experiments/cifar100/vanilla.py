"""CIFAR-100 with the CRD paper's recipe (Tian et al., 2020; RepDistiller): the shared settings,
and supervised training of one model (a teacher, or the "Student" baseline of its Table 1).

  kdjax train --config experiments/cifar100/vanilla.py:resnet32x4 \
      --workdir workdirs/cifar100/resnet32x4

Recipe: 240 epochs of SGD (momentum 0.9, weight decay 5e-4, batch 64), learning rate 0.05 (0.01
for MobileNetV2), divided by 10 at epochs 150, 180 and 210; random crop (padding 4) and flip.
The distillation configs beside this file (kd.py, crd.py, ...) take a teacher-student pair,
e.g. `--config experiments/cifar100/crd.py:resnet32x4-resnet8x4`, and expect the teacher's
vanilla run in workdirs/cifar100/<teacher> (override with --config.teacher.workdir=...).
"""

from kdjax.config import base_config

# The pairs of experiments/README.md (teacher-student, as in the CRD paper's Table 1).
PAIRS = {
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "resnet56-resnet20": ("resnet56", "resnet20"),
    "vgg13-vgg8": ("vgg13", "vgg8"),
    "resnet110-resnet32": ("resnet110", "resnet32"),
}
DEFAULT_PAIR = "resnet32x4-resnet8x4"
EPOCHS, BATCH, TRAIN_EXAMPLES = 240, 64, 50_000
STEPS_PER_EPOCH = TRAIN_EXAMPLES // BATCH  # the last partial batch of an epoch is dropped
LEARNING_RATE = {"mobilenetv2": 0.01}  # RepDistiller: 0.01 for MobileNetV2/ShuffleNet, else 0.05


def get_config(model: str = "resnet32x4"):
    c = base_config()
    c.seed = 0
    c.data.name = "cifar100"
    c.data.crop_padding = 4
    c.data.flip = True
    c.model.name = model
    c.train.steps = EPOCHS * STEPS_PER_EPOCH
    c.train.batch_size = BATCH
    c.train.log_every_steps = STEPS_PER_EPOCH
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = LEARNING_RATE.get(model, 0.05)
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "step"
    c.optimizer.decay_boundaries = tuple(e * STEPS_PER_EPOCH for e in (150, 180, 210))
    c.optimizer.decay_factor = 0.1
    c.loss.name = "ce"
    c.eval.every_steps = 10 * STEPS_PER_EPOCH
    c.checkpoint.every_steps = 10 * STEPS_PER_EPOCH
    return c


def distill_config(pair: str):
    """The student's recipe, distilling from the pair's teacher (the loss is set by the caller)."""
    if pair not in PAIRS:
        raise ValueError(f"unknown teacher-student pair {pair!r}; valid: {sorted(PAIRS)}")
    teacher, student = PAIRS[pair]
    c = get_config(student)
    c.teacher.workdir = f"workdirs/cifar100/{teacher}"
    return c


def repdistiller(pair: str, method: str, beta: float):
    """RepDistiller's feature-method recipe: CE (-r 1) + beta * the method's loss, no KD (-a 0)."""
    c = distill_config(pair)
    c.loss.update(name=method, ce_weight=1.0, kd_weight=0.0, feature_weight=beta)
    return c
