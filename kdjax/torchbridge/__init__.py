"""Any PyTorch model in kdjax: a torch `nn.Module` as a JAX function and as a Flax NNX model
(`bridge`), imported as a teacher run (`kdjax import --torch`). Needs the `torch` extra:
pip install 'kdjax[torch]'."""

from kdjax.torchbridge.bridge import (Buffer, TorchModel, TorchOpError, build_module,
                                      from_module, load_factory, state_arrays)

__all__ = ["Buffer", "TorchModel", "TorchOpError", "build_module", "from_module",
           "load_factory", "state_arrays"]
