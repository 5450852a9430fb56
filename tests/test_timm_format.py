"""timm's ViT naming (.safetensors) in and out: a file written in timm's layout by hand loads
and gives the logits of timm's forward written in NumPy (fused qkv, (out, in) weights, NCHW
patch conv); conversions round-trip bit for bit; other layouts and families fail in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from dmlora_jax import npz, timm_format, vit
from dmlora_jax.pytrees import flatten

D, DEPTH, HEADS, MLP, P, IMG, C = 32, 2, 2, 64, 4, 16, 5  # tiny/4 at 16 px, 5 classes


def timm_weights(seed=0) -> dict[str, np.ndarray]:
  """Random weights in timm's VisionTransformer state-dict naming and shapes."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
  n = (IMG // P) ** 2 + 1
  sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, n, D), "patch_embed.proj.weight": r(D, 3, P, P),
        "patch_embed.proj.bias": r(D), "norm.weight": 1 + r(D), "norm.bias": r(D), "head.weight": r(C, D),
        "head.bias": r(C)}
  for i in range(DEPTH):
    b = f"blocks.{i}."
    sd |= {b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
           b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
           b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(MLP, D),
           b + "mlp.fc1.bias": r(MLP), b + "mlp.fc2.weight": r(D, MLP), b + "mlp.fc2.bias": r(D)}
  return sd


def timm_forward(sd, x_nchw):
  """timm's VisionTransformer.forward (class token, exact GELU, LayerNorm eps 1e-6) in NumPy."""
  x = x_nchw.astype(np.float64)
  n, _, h, w = x.shape
  patches = x.reshape(n, 3, h // P, P, w // P, P).transpose(0, 2, 4, 1, 3, 5).reshape(n, -1, 3 * P * P)
  t = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
  t = np.concatenate([np.broadcast_to(sd["cls_token"], (n, 1, D)), t], 1) + sd["pos_embed"]

  def ln(v, name):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]

  def lin(v, name):
    return v @ sd[name + ".weight"].T + sd[name + ".bias"]

  hd = D // HEADS
  for i in range(DEPTH):
    b = f"blocks.{i}."
    qkv = lin(ln(t, b + "norm1"), b + "attn.qkv").reshape(n, -1, 3, HEADS, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(n, -1, D)
    t = t + lin(o, b + "attn.proj")
    m = lin(ln(t, b + "norm2"), b + "mlp.fc1")
    m = 0.5 * m * (1 + erf(m / np.sqrt(2)))
    t = t + lin(m, b + "mlp.fc2")
  return lin(ln(t, "norm")[:, 0], "head")


def _model():
  model = vit.ViT(vit.parse_variant("tiny/4", C, gelu_approximate=False), None)
  params = model.init(jax.random.key(0), jnp.zeros((1, IMG, IMG, 3)))["params"]
  return model, params


def test_timm_safetensors_loads_and_gives_timms_logits(tmp_path):
  sd = timm_weights()
  path = str(tmp_path / "timm_vit.safetensors")
  save_file(sd, path)
  model, init = _model()
  params, fp = npz.load_pretrained(init, path)
  x = np.random.default_rng(1).standard_normal((3, 3, IMG, IMG)).astype(np.float32)  # NCHW, as timm
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, timm_forward(sd, x), atol=1e-5)
  assert fp == npz.fingerprint(timm_format.to_public(sd, HEADS))


def test_conversions_round_trip_bit_for_bit():
  sd = timm_weights(3)
  public = timm_format.to_public(sd, HEADS)
  back = timm_format.from_public(public)
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
  _, init = _model()
  flat = {k: np.asarray(v) for k, v in flatten(init).items()}
  again = timm_format.to_public(timm_format.from_public(flat), HEADS)
  assert sorted(again) == sorted(flat) and all(np.array_equal(again[k], flat[k]) for k in flat)


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.update({"blocks.0.ls1.gamma": np.ones(D, np.float32)}), "blocks.0.ls1.gamma is LayerScale"),
    (lambda sd: sd.update({"reg_token": np.ones((1, 4, D), np.float32)}), "reg_token is register tokens"),
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "blocks.1.mlp.fc2.bias is missing"),
    (lambda sd: sd.update({"blocks.0.attn.q_norm.weight": np.ones(D, np.float32)}),
     "blocks.0.attn.q_norm.weight has no place in this ViT"),
])
def test_a_timm_file_this_vit_cannot_hold_is_one_line_that_names_the_key(tmp_path, change, message):
  sd = timm_weights()
  change(sd)
  path = str(tmp_path / "x.safetensors")
  save_file(sd, path)
  with pytest.raises(npz.CheckpointError, match=message) as e:
    npz.load_pretrained(_model()[1], path)
  assert "\n" not in str(e.value) and path in str(e.value)


def test_a_safetensors_file_in_another_naming_lists_what_was_expected(tmp_path):
  path = str(tmp_path / "clip.safetensors")
  save_file({"visual.conv1.weight": np.zeros((D, 3, P, P), np.float32)}, path)  # open_clip naming
  with pytest.raises(npz.CheckpointError, match="unknown layout .* expected timm's ViT naming") as e:
    npz.load_pretrained(_model()[1], path)
  assert "\n" not in str(e.value)


def hf_weights(sd) -> dict[str, np.ndarray]:
  """timm_weights in transformers' ViTForImageClassification naming, renamed by hand."""
  hf = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
  for i in range(DEPTH):
    t, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
    for p in ("weight", "bias"):
      for j, n in enumerate(("query", "key", "value")):
        hf[h + f"attention.attention.{n}.{p}"] = sd[t + f"attn.qkv.{p}"][j * D:(j + 1) * D]
      hf[h + f"attention.output.dense.{p}"] = sd[t + f"attn.proj.{p}"]
      hf[h + f"layernorm_before.{p}"] = sd[t + f"norm1.{p}"]
      hf[h + f"layernorm_after.{p}"] = sd[t + f"norm2.{p}"]
      hf[h + f"intermediate.dense.{p}"] = sd[t + f"mlp.fc1.{p}"]
      hf[h + f"output.dense.{p}"] = sd[t + f"mlp.fc2.{p}"]
  return {k: np.ascontiguousarray(v) for k, v in hf.items()}


def test_transformers_vit_safetensors_loads_and_gives_timms_logits(tmp_path):
  sd = timm_weights(5)
  path = str(tmp_path / "model.safetensors")
  save_file(hf_weights(sd), path)
  model, init = _model()
  params, _ = npz.load_pretrained(init, path)
  x = np.random.default_rng(2).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, timm_forward(sd, x), atol=1e-5)


def test_dinov2_naming_is_refused_in_one_line_naming_layerscale(tmp_path):
  hf = hf_weights(timm_weights())
  hf["vit.encoder.layer.0.layer_scale1.lambda1"] = np.ones(D, np.float32)
  path = str(tmp_path / "dinov2.safetensors")
  save_file(hf, path)
  with pytest.raises(npz.CheckpointError, match="layer_scale1.lambda1 belongs to DINOv2's naming") as e:
    npz.load_pretrained(_model()[1], path)
  assert "\n" not in str(e.value)
