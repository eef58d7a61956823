"""PyTorch in and out: pretrained weights imported as kdjax runs, students exported for PyTorch
and for serving.

  pth         .pth/.pt files read without running pickled code (a restricted unpickler), and
              written without torch
  state_dict  a flat {name: array} from a .pth or .safetensors file (checkpoint dicts and the
              nn.DataParallel prefix unwrapped), and written back as either
  layouts     the zoo's NNX variables under torchvision's / RepDistiller's (CRD) / kdjax's names,
              with the array conversions (OIHW <-> HWIO, [out, in] <-> [in, out])
  importer    `kdjax import`: a state_dict onto a zoo model, written as a run
  formats     `kdjax export --format safetensors|torch|stablehlo`
  stablehlo   the serialized inference function (jax.export)
"""
