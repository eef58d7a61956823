"""Quantization-aware distillation: the distilled student fine-tuned with a fake-quantized int8
forward (Qwix: int8 weights and activations, straight-through gradients), the float teacher in
the same compiled step; its export stores int8 weights and scales.

  kdjax distill --config experiments/fashion_mnist/compress_qat.py --workdir workdirs/compress/qat
  kdjax export --workdir workdirs/compress/qat --out exports/qat_int8 \
      --config.data.data_dir=data/tfds

Post-training quantization of the same student, for comparison (calibrated on 512 training
images, quant.calibration_examples):

  kdjax export --workdir workdirs/demo/student_kd --out exports/student_kd_int8 \
      --config.quant.mode=ptq --config.data.data_dir=data/tfds

The label-only QAT baseline at the same cost: `kdjax train` this file with
--config.loss.name=ce --config.loss.kwargs={}.
"""

import kd


def get_config():
    c = kd.get_config()
    c.init.workdir = "workdirs/demo/student_kd"
    c.quant.mode = "qat"
    c.train.steps = 468
    c.eval.every_steps = c.checkpoint.every_steps = 468
    c.optimizer.learning_rate = 0.01
    return c
