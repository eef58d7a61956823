"""PATE's teacher ensemble on Fashion-MNIST: 100 MLPs (784-128-10), each trained on its own
600-example slice of the training split (disjoint: one private example is seen by one teacher).

  kdjax train --config experiments/fashion_mnist/pate_teachers.py --workdir workdirs/pate/teachers

WORKDIR/teacher_<k> is teacher k's ordinary kdjax run (config.json records its slice,
data.train_split='train[600k:600(k+1)]'); WORKDIR/pate.json records the partition. Small models
and few steps: 100 teachers train in minutes on 2 CPU cores. `--config.pate.teachers=N` picks
another ensemble size (more teachers: stronger consensus, less data each).
"""

from kdjax.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.data.name = "fashion_mnist"
    c.pate.teachers = 100
    c.model.name = "mlp"
    c.model.kwargs = {"hidden": (128,)}
    c.train.steps = 120  # 10 epochs of 600 examples at batch 50
    c.train.batch_size = 50
    c.train.log_every_steps = 60
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "cosine"
    c.loss.name = "ce"
    c.eval.every_steps = 120
    c.checkpoint.every_steps = 120
    c.checkpoint.max_to_keep = 1
    return c
