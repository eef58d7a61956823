"""Be Your Own Teacher (Zhang et al., ICCV 2019) on the CNN student of kd_cnn.py (cnn_tiny), no
teacher: a bottleneck classifier ("exit") on each of its stages learns from the labels, from the
deepest classifier's soft targets (T=3) and from a hint towards its embedding, in the same step.

  kdjax distill --config experiments/fashion_mnist/byot.py --workdir workdirs/demo/student_byot

Loss (the authors' code): 0.9 * (CE of the deepest classifier + CE of each exit)
+ 0.1 * sum_exits T^2 KL(q_deep || q_exit) + feature_weight * sum_exits hint. The reference's
beta=1e-6 weighs a hint summed over a batch of 128; kdjax averages it over the batch, hence
1.28e-4. Evaluation reports every exit's accuracy (eval/exit_stage1/accuracy, ...); the export is
the student alone, without its exits.
"""

import student_scratch  # the shared student recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = student_scratch.get_config("cnn_tiny")
    c.loss.update(name="byot", ce_weight=0.9, kd_weight=0.1, feature_weight=1.28e-4,
                  student_taps=("stage1", "stage2"))
    c.loss.kwargs = {"temperature": 3.0}
    return c
