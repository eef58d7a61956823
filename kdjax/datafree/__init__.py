"""Data-free distillation: the student's training inputs synthesised from the teacher.

`deepinversion` optimises images against the teacher's BatchNorm statistics and outputs (Yin et
al., CVPR 2020); `generator` trains a generator adversarially against the student (ZSKT,
Micaelli & Storkey, NeurIPS 2019, with DAFL's generator and optional priors); `bn_stats` reads
the BatchNorm statistics both use; `run` is `kdjax distill` with datafree.method.
"""

from kdjax.datafree import bn_stats, deepinversion, generator

__all__ = ["bn_stats", "deepinversion", "generator"]
