"""A student taught by pate_teachers.py's ensemble through Confident-GNMax (Papernot et al. 2018).

  kdjax distill --config experiments/fashion_mnist/pate_student.py --workdir workdirs/pate/student \
      --config.teacher.workdir=workdirs/pate/teachers [--config.pate.sigma=20]

The public data is the first half of Fashion-MNIST's test split, test[:5000]: the student sends
its first 1000 images to the ensemble, the ones whose top vote count passes the noisy threshold
get a noisy argmax label, and the student trains on those alone. It is evaluated on the other
half, test[5000:], which was never queried. summary.json holds privacy/epsilon (data-independent
RDP, at privacy/delta) and privacy/answered. The non-private baseline is the same run with
--config.teacher.aggregation=plurality (the exact vote on every query; epsilon infinite).
"""

from kdjax.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.data.name = "fashion_mnist"
    c.data.eval_split = "test[5000:]"
    c.data.crop_padding = 2
    c.data.flip = True
    c.teacher.workdir = "workdirs/pate/teachers"
    c.teacher.aggregation = "gnmax"
    c.pate.public_split = "test[:5000]"
    c.pate.queries = 1000
    c.pate.threshold = 80.0  # of 100 teacher votes
    c.pate.sigma1 = 40.0
    c.pate.sigma = 20.0
    c.pate.delta = 1e-5  # below 1/60000, the private examples
    c.model.name = "mlp"
    c.model.kwargs = {"hidden": (128,)}
    c.loss.name = "ce"  # the student learns the released labels; no soft targets exist
    c.train.steps = 600
    c.train.batch_size = 64
    c.train.log_every_steps = 100
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "cosine"
    c.eval.every_steps = 600
    c.checkpoint.every_steps = 600
    return c
