"""Input normalisation, applied on device inside the jitted step."""

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("imagenet", "inception")


def normalize(images, mode: str):
  """uint8 images -> float32.

  imagenet: (x / 255 - mean) / std (timm / NOAH-style repositories);
  inception: x / 127.5 - 1, i.e. [-1, 1] (the original Google ViT checkpoints).
  """
  x = jnp.asarray(images).astype(jnp.float32)
  if mode == "imagenet":
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x / 255.0 - mean) / std
  if mode == "inception":
    return x / 127.5 - 1.0
  raise ValueError(f"unknown normalization {mode!r}; expected one of {MODES}")
