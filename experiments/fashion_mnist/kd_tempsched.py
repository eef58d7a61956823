"""kd.py with a temperature schedule: T follows a cosine from 8 down to 2 over the run, instead of
the fixed T=4 (kdjax.temperature; the value of each step is computed inside the compiled step,
logged as train/temperature).

  kdjax distill --config experiments/fashion_mnist/kd_tempsched.py \
      --workdir workdirs/demo/student_kd_tempsched --config.teacher.workdir=workdirs/demo/teacher

Softer targets early (more of the teacher's dark knowledge), sharper ones late (closer to the
labels). 8 -> 2 is this recipe's choice, not a published one; linear, step and constant schedules
are the same keys (see kdjax/config.py's loss.temperature_schedule).
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.kwargs = {}  # the schedule sets the temperature
    c.loss.temperature_schedule.update(name="cosine", init_value=8.0, end_value=2.0,
                                       begin_step=0, steps=0)  # steps 0: until train.steps
    return c
