"""Models as a user writes them, outside kdjax's zoo: importable as `_user_models:NAME` (tests/ is
on sys.path under pytest), e.g. `--config.model.name=_user_models:TinyNet`."""

import flax.linen as linen
import jax
from flax import nnx


class TinyNet(nnx.Module):
    """A plain NNX MLP: no features(), no train argument; logits from __call__."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([nnx.Linear(in_features, hidden, rngs=rngs),
                                nnx.Linear(hidden, hidden, rngs=rngs)])
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for block in self.blocks:
            x = nnx.relu(block(x))
        return self.head(x)


class SharedLayer(nnx.Module):
    """One Linear applied twice (its weights shared between two calls)."""

    def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(in_features, 12, rngs=rngs)
        self.mix = nnx.Linear(12, 12, rngs=rngs)
        self.head = nnx.Linear(12, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.fc(x.reshape(x.shape[0], -1)))
        return self.head(nnx.relu(self.mix(nnx.relu(self.mix(x)))))


class NormNet(nnx.Module):
    """BatchNorm and Dropout switched by NNX's train()/eval(), not by a train argument."""

    def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(in_features, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.drop(nnx.relu(self.bn(self.fc(x.reshape(x.shape[0], -1)))))
        return self.head(x)


class WrongOutput(nnx.Module):
    """Returns 5 scores per image whatever the data's class count."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(in_features, 5, rngs=rngs)

    def __call__(self, x):
        return self.fc(x.reshape(x.shape[0], -1))


class LinenMLP(linen.Module):
    """A Flax Linen model with BatchNorm, used through Flax's NNX bridge."""

    num_classes: int
    hidden: int = 24

    @linen.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        x = linen.Dense(self.hidden)(x)
        x = linen.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return linen.Dense(self.num_classes)(jax.nn.relu(x))


def make_tiny(in_features: int, num_classes: int, *, rngs: nnx.Rngs) -> TinyNet:
    """A factory function, not a class, also importable as a model."""
    return TinyNet(in_features, num_classes, hidden=8, rngs=rngs)


class PoolResNet(nnx.Module):
    """A user's small CNN with what ResNets are made of: convolution, BatchNorm (switched by
    NNX's train()/eval()), an overlapping padded max-pool and a residual addition."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=0.5, rngs=rngs)
        self.conv = nnx.Conv(width, width, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(width, momentum=0.5, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = nnx.relu(x + self.bn2(self.conv(x)))
        return self.head(x.mean(axis=(1, 2)))
