"""Any PyTorch model in kdjax: a torch `nn.Module` as a JAX function and as a Flax NNX model
(`bridge`), a Hugging Face causal LM as a language-model teacher (`causal_lm`), imported as a teacher run (`kdjax import --torch`). Needs the `torch` extra:
pip install 'kdjax[torch]'."""

from kdjax.torchbridge.bridge import (Buffer, TorchModel, TorchOpError, build_module,
                                      from_module, load_factory, state_arrays)
from kdjax.torchbridge.causal_lm import TorchCausalLM

__all__ = ["Buffer", "TorchCausalLM", "TorchModel", "TorchOpError", "build_module",
           "from_module", "load_factory", "state_arrays"]
