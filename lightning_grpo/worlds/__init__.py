"""The worlds: small synthetic domains with a vocabulary, a renderer, prompt templates, a
compositional train / held-out split and a pixel verifier, where GRPO can be watched learning on a
CPU. `lightning_grpo.worlds.shapes` (images) and `lightning_grpo.worlds.moving_shapes` (clips).

Not part of the library core: nothing in `lightning_grpo` outside this package imports it (configs
name its classes by class path).
"""
