"""Fashion-MNIST teacher: Hinton's 784-1200-1200-10 MLP, trained with plain cross-entropy.

  kdjax train --config experiments/fashion_mnist/teacher.py --workdir workdirs/demo/teacher

An MLP rather than a CNN because the demo runs on 2 CPU cores, where XLA:CPU's convolution
gradients are slow (a small CNN trains ~12x slower per image than this MLP there).
"""

from kdjax.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.data.name = "fashion_mnist"
    c.model.name = "mlp_1200"
    c.train.steps = 4680  # 10 epochs of 60k at batch 128
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
