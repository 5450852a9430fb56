"""VPT-deep (Jia et al., ECCV 2022, "Visual Prompt Tuning"): learned prompt tokens at the input
of every encoder block, the backbone frozen.

Block i reads [class token (+ registers), P_i, patches]: layer 0's prompts are inserted after
the prefix tokens, and before every later block the previous block's outputs at the prompt
positions are dropped and replaced by that block's own prompts (the official code's
`forward_deep_prompt`, KMnP/vpt src/models/vit_prompt/vit.py). Prompts carry no position
embedding (they are inserted after it is added). After the last block the prompt positions
are dropped, so the pooling (class token, as the paper; or the mean patch token) sees the
tokens of a plain ViT. The official code keeps them through the final LayerNorm, which is per
token and so changes nothing at the class token.

The leaf is `Transformer/vpt_prompts` (depth, num_prompts, width), initialised as the official
code's "random" initiation: U(-v, v) with v = sqrt(6 / (3 * patch * patch + width)) (xavier
uniform for a patch-embedding-sized fan-in). The prompts are not a weight update: there is no
merged model; a run exports the params with its prompts (prompts.npz).
"""

import math

import jax
import jax.numpy as jnp

PROMPTS = "vpt_prompts"
LEAVES = (PROMPTS,)


def init_bound(patch_size: int, width: int, channels: int = 3) -> float:
  return math.sqrt(6.0 / (channels * patch_size * patch_size + width))


def uniform_init(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def insert(x_BxTxD: jax.Array, prompts_NxD: jax.Array, num_prefix: int, replace: bool) -> jax.Array:
  """[prefix, prompts, rest]; with replace, the N tokens after the prefix (the previous
  block's prompt outputs) are dropped first."""
  b = x_BxTxD.shape[0]
  n = prompts_NxD.shape[0]
  rest = x_BxTxD[:, num_prefix + (n if replace else 0):]
  p = jnp.broadcast_to(prompts_NxD.astype(x_BxTxD.dtype)[None], (b,) + prompts_NxD.shape)
  return jnp.concatenate([x_BxTxD[:, :num_prefix], p, rest], axis=1)


def remove(x_BxTxD: jax.Array, num_prompts: int, num_prefix: int) -> jax.Array:
  """The tokens of a plain ViT: the prompt positions after the prefix dropped."""
  return jnp.concatenate([x_BxTxD[:, :num_prefix], x_BxTxD[:, num_prefix + num_prompts:]], axis=1)
