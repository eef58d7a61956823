"""Teacher LM of the demo: a Llama-style lm_small (4 layers, d_model 128, ~0.85M parameters with
the byte-level vocabulary) trained with next-token cross-entropy on the Python standard library's
own sources (`make demo-lm` prepares them as the text dataset "pystdlib").

  kdjax train --config experiments/lm/teacher.py --workdir workdirs/lm/teacher
"""

from kdjax.config import base_config

PROMPTS = ("def __init__(self", "import os\nimport ", "    for i in range(", "class ")


def get_config():
    c = base_config()
    c.seed = 0
    c.data.name = "pystdlib"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.model.name = "lm_small"
    c.train.steps = 800
    c.train.batch_size = 32
    c.train.log_every_steps = 100
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 100
    c.loss.name = "ce"
    c.eval.every_steps = 800
    c.eval.batch_size = 64
    c.checkpoint.every_steps = 400
    c.checkpoint.best_metric = "eval/loss"
    c.checkpoint.best_mode = "min"
    c.lm.prompts = PROMPTS
    c.lm.generate_tokens = 48
    return c
