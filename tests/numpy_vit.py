"""An independent NumPy ViT forward pass, written straight from the checkpoint arrays.

It shares no code with dmlora_jax: the conv patch embedding is an explicit loop over
patches, attention is per head, LoRA is W + (alpha / r) A B folded by hand. SSF is applied to
the activations, y * gamma + beta after each op, as the official code's `ssf_ada` (the JAX
model too, with q/k/v fused and each LayerNorm's scale folded with its gamma); VPT-deep's
prompts are concatenated after the class token and replaced before every later block, as the
official `forward_deep_prompt`, and kept through the final LayerNorm (the JAX model drops them
first: the class token is the same).
"""

import math

import numpy as np


def gelu(x, approximate=True):
  if approximate:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def forward(flat, images, patch, num_heads, depth, lora=None, approximate=True, ssf=None, prompts=None):
  """flat: {'embedding/kernel': ..., ...} float64 arrays; images (B, H, W, 3).

  ssf: optional {module_path: (gamma, beta)}: the output of that module (a projection, a
    LayerNorm, 'embedding') becomes y * gamma + beta (gamma and beta flattened).
  prompts: optional (depth, N, D): VPT-deep prompt tokens of each block.

  lora: optional {module_path: (A, B, alpha[, m])}: one branch, A (d_in, r) and B (r, d_out),
    or K branches, A (K, d_in, r) and B (K, r, d_out) with keep multipliers m (K,) (all 1 if
    absent): the kernel becomes W + (alpha / r) sum_k m_k A_k B_k.
  """
  p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
  ssf = {k: (np.asarray(g, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1))
         for k, (g, b) in (ssf or {}).items()}

  def ss(path, y):
    if path not in ssf:
      return y
    g, b = ssf[path]
    return y * g + b

  def ln(x, path):
    return ss(path, layer_norm(x, p[path + "/scale"], p[path + "/bias"]))

  x = np.asarray(images, np.float64)
  b, h, w, _ = x.shape
  kernel = p["embedding/kernel"]  # (P, P, 3, D)
  tokens = []
  for i in range(h // patch):
    for j in range(w // patch):
      win = x[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch, :]
      tokens.append(np.einsum("bhwc,hwcd->bd", win, kernel) + p["embedding/bias"])
  x = ss("embedding", np.stack(tokens, axis=1))
  cls = np.repeat(p["cls"], b, axis=0)
  x = np.concatenate([cls, x], axis=1) + p["Transformer/posembed_input/pos_embedding"]

  def kernel_of(path, d_in):
    k = p[path + "/kernel"]
    mat = k.reshape(d_in, -1)
    if lora and path in lora:
      a, bb, alpha, *m = lora[path]
      a, bb = np.asarray(a, np.float64), np.asarray(bb, np.float64)
      if a.ndim == 2:
        a, bb = a[None], bb[None]
      m = np.asarray(m[0], np.float64) if m else np.ones(a.shape[0])
      r = a.shape[-1]
      for k in range(a.shape[0]):
        mat = mat + alpha / r * m[k] * (a[k] @ bb[k])
    return mat

  for i in range(depth):
    pre = f"Transformer/encoderblock_{i}"
    d = x.shape[-1]
    if prompts is not None:
      n = prompts.shape[1]
      pr = np.repeat(np.asarray(prompts[i], np.float64)[None], b, axis=0)
      x = np.concatenate([x[:, :1], pr, x[:, 1 + (n if i else 0):]], axis=1)
    y = ln(x, pre + "/LayerNorm_0")
    att = pre + "/MultiHeadDotProductAttention_1"
    q, k, v = (ss(f"{att}/{n}", y @ kernel_of(f"{att}/{n}", d) + p[f"{att}/{n}/bias"].reshape(-1))
               for n in ("query", "key", "value"))
    dh = d // num_heads
    heads = []
    for hd in range(num_heads):
      sl = slice(hd * dh, (hd + 1) * dh)
      wts = softmax(q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / np.sqrt(dh))
      heads.append(wts @ v[..., sl])
    o = np.concatenate(heads, axis=-1)
    x = x + ss(f"{att}/out", o @ kernel_of(f"{att}/out", d) + p[f"{att}/out/bias"])
    y = ln(x, pre + "/LayerNorm_2")
    mlp = pre + "/MlpBlock_3"
    y = gelu(ss(f"{mlp}/Dense_0", y @ kernel_of(f"{mlp}/Dense_0", d) + p[f"{mlp}/Dense_0/bias"]), approximate)
    x = x + ss(f"{mlp}/Dense_1", y @ kernel_of(f"{mlp}/Dense_1", y.shape[-1]) + p[f"{mlp}/Dense_1/bias"])
  x = ln(x, "Transformer/encoder_norm")
  x = x[:, 0]
  if "pre_logits/kernel" in p:
    x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
  return x @ p["head/kernel"] + p["head/bias"]
