"""Compression inside the fused step: pruning masks in the optimizer state (prune, schedule,
structured), quantization with Qwix (quantize), compressed exports (encode), and what a training
run's config asks of them (training). README "Compression" shows the recipes."""
