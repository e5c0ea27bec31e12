"""vitcls: Vision Transformer and BiT image classification in JAX, from configs to reports."""
