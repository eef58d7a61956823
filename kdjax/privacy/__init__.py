"""Private teachers: PATE (Papernot et al., ICLR 2017 and 2018).

`partitions` trains a teacher ensemble on disjoint slices of the private data, `aggregation`
releases noisy votes of it (GNMax, Confident-GNMax) on the device, `rdp` prices the release
with Rényi-DP accounting, and `pate` runs a student's distillation from those votes.
"""

from kdjax.privacy import aggregation, partitions, rdp

__all__ = ["aggregation", "partitions", "rdp"]
