"""dmlora_jax: Dropout-Mixture LoRA (DMLoRA) fine-tuning of Vision Transformers in JAX/Flax."""

__version__ = "0.1.0"
