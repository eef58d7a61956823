"""Fashion-MNIST student trained from the labels alone: the baseline distillation must beat.

  kdjax train --config experiments/fashion_mnist/student_scratch.py --workdir workdirs/demo/student_scratch

Same model, data, steps and optimizer as kd.py; only the loss differs.
"""

from kdjax.config import base_config

STUDENT_HIDDEN = (32,)  # 784-32-10: ~25k parameters, ~94x smaller than the teacher


def get_config():
    c = base_config()
    c.seed = 0
    c.data.name = "fashion_mnist"
    c.model.name = "mlp"
    c.model.kwargs = {"hidden": STUDENT_HIDDEN}
    c.train.steps = 4680
    c.train.batch_size = 128
    c.train.log_every_steps = 234
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "cosine"
    c.loss.name = "ce"
    c.eval.every_steps = 2340
    c.checkpoint.every_steps = 2340
    return c
