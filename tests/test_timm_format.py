"""timm's ViT naming (.safetensors) in and out: a file written in timm's layout by hand loads
and gives the logits of timm's forward written in NumPy (fused qkv, (out, in) weights, NCHW
patch conv); conversions round-trip bit for bit; other layouts and families fail in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from dmlora_jax import npz, partition, timm_format, vit
from dmlora_jax.pytrees import flatten

D, DEPTH, HEADS, MLP, P, IMG, C = 32, 2, 2, 64, 4, 16, 5  # tiny/4 at 16 px, 5 classes


# The ViT families timm has and this model implements: ViTConfig fields -> timm's parts.
FAMILIES = {
    "plain": {},
    "dinov2_reg": dict(layer_scale=True, num_registers=2, no_embed_class=True),  # timm's DINOv2-reg
    "clip": dict(pre_norm=True, activation="quick_gelu", patch_bias=False, layer_norm_eps=1e-5),
    "gap": dict(pool="avg"),  # mean patch token, fc_norm, no final norm
    "map": dict(pool="map"),  # attention pooling (SigLIP)
}


def timm_weights(seed=0, layer_scale=False, num_registers=0, no_embed_class=False, pre_norm=False,
                 patch_bias=True, pool="token", **_) -> dict[str, np.ndarray]:
  """Random weights in timm's VisionTransformer state-dict naming and shapes."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
  n = (IMG // P) ** 2 + (0 if no_embed_class else 1 + num_registers)
  sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, n, D), "patch_embed.proj.weight": r(D, 3, P, P),
        "head.weight": r(C, D), "head.bias": r(C)}
  norm = "fc_norm" if pool == "avg" else "norm"
  sd |= {norm + ".weight": 1 + r(D), norm + ".bias": r(D)}
  if patch_bias:
    sd["patch_embed.proj.bias"] = r(D)
  if num_registers:
    sd["reg_token"] = r(1, num_registers, D)
  if pre_norm:
    sd |= {"norm_pre.weight": 1 + r(D), "norm_pre.bias": r(D)}
  if pool == "map":
    a = "attn_pool."
    sd |= {a + "latent": r(1, 1, D), a + "q.weight": r(D, D), a + "q.bias": r(D), a + "kv.weight": r(2 * D, D),
           a + "kv.bias": r(2 * D), a + "proj.weight": r(D, D), a + "proj.bias": r(D), a + "norm.weight": 1 + r(D),
           a + "norm.bias": r(D), a + "mlp.fc1.weight": r(MLP, D), a + "mlp.fc1.bias": r(MLP),
           a + "mlp.fc2.weight": r(D, MLP), a + "mlp.fc2.bias": r(D)}
  for i in range(DEPTH):
    b = f"blocks.{i}."
    sd |= {b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
           b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
           b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(MLP, D),
           b + "mlp.fc1.bias": r(MLP), b + "mlp.fc2.weight": r(D, MLP), b + "mlp.fc2.bias": r(D)}
    if layer_scale:
      sd |= {b + "ls1.gamma": r(D), b + "ls2.gamma": r(D)}
  return sd


def timm_forward(sd, x_nchw, activation="gelu", layer_norm_eps=1e-6, pool="token", **_):
  """timm's VisionTransformer.forward in NumPy (exact GELU): what its family is follows from the
  keys present, as in timm (reg_token, a pos_embed without prefix rows, norm_pre, ls*.gamma,
  fc_norm), plus the three things the keys cannot say (activation, eps, pooling)."""
  x = x_nchw.astype(np.float64)
  n, _, h, w = x.shape
  patches = x.reshape(n, 3, h // P, P, w // P, P).transpose(0, 2, 4, 1, 3, 5).reshape(n, -1, 3 * P * P)
  t = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd.get("patch_embed.proj.bias", 0.0)
  prefix = [np.broadcast_to(sd["cls_token"], (n, 1, D))]
  if "reg_token" in sd:
    prefix.append(np.broadcast_to(sd["reg_token"], (n,) + sd["reg_token"].shape[1:]))
  if sd["pos_embed"].shape[1] == t.shape[1]:  # no_embed_class: add, then prepend
    t = np.concatenate(prefix + [t + sd["pos_embed"]], 1)
  else:
    t = np.concatenate(prefix + [t], 1) + sd["pos_embed"]
  num_prefix = sum(p.shape[1] for p in prefix)

  def ln(v, name):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + layer_norm_eps) * sd[name + ".weight"] + sd[name + ".bias"]

  def lin(v, name):
    return v @ sd[name + ".weight"].T + sd[name + ".bias"]

  def ls(v, name):
    return v * sd[name + ".gamma"] if name + ".gamma" in sd else v

  if "norm_pre.weight" in sd:
    t = ln(t, "norm_pre")
  hd = D // HEADS

  def attend(q, k, v):  # (n, H, Tq, hd), (n, H, Tk, hd) x2 -> (n, Tq, D)
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return (a @ v).transpose(0, 2, 1, 3).reshape(n, -1, D)

  def act(m):
    if activation == "quick_gelu":
      return m / (1 + np.exp(-1.702 * m))
    return 0.5 * m * (1 + erf(m / np.sqrt(2)))

  for i in range(DEPTH):
    b = f"blocks.{i}."
    q, k, v = lin(ln(t, b + "norm1"), b + "attn.qkv").reshape(n, -1, 3, HEADS, hd).transpose(2, 0, 3, 1, 4)
    t = t + ls(lin(attend(q, k, v), b + "attn.proj"), b + "ls1")
    t = t + ls(lin(act(lin(ln(t, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2"), b + "ls2")
  if pool == "avg":
    return lin(ln(t[:, num_prefix:].mean(1), "fc_norm"), "head")
  t = ln(t, "norm")
  if pool == "map":  # timm's AttentionPoolLatent: the latent attends over the patch tokens, then x + mlp(norm(x))
    t = t[:, num_prefix:]
    q = lin(np.broadcast_to(sd["attn_pool.latent"], (n, 1, D)), "attn_pool.q").reshape(n, 1, HEADS, hd).transpose(0, 2, 1, 3)
    k, v = lin(t, "attn_pool.kv").reshape(n, -1, 2, HEADS, hd).transpose(2, 0, 3, 1, 4)
    o = lin(attend(q, k, v), "attn_pool.proj")
    o = o + lin(act(lin(ln(o, "attn_pool.norm"), "attn_pool.mlp.fc1")), "attn_pool.mlp.fc2")
    return lin(o[:, 0], "head")
  return lin(t[:, 0], "head")


def _model(**family):
  model = vit.ViT(vit.parse_variant("tiny/4", C, gelu_approximate=False, **family), None)
  params = model.init(jax.random.key(0), jnp.zeros((1, IMG, IMG, 3)))["params"]
  return model, params


@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_safetensors_loads_and_gives_timms_logits(tmp_path, family):
  kw = FAMILIES[family]
  sd = timm_weights(**kw)
  path = str(tmp_path / "timm_vit.safetensors")
  save_file(sd, path)
  model, init = _model(**kw)
  params, fp = npz.load_pretrained(init, path, posemb_prefix=model.cfg.posemb_prefix)
  x = np.random.default_rng(1).standard_normal((3, 3, IMG, IMG)).astype(np.float32)  # NCHW, as timm
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, timm_forward(sd, x, **kw), atol=1e-5)
  assert fp == npz.fingerprint(timm_format.to_public(sd, HEADS))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_familys_backbone_leaves_are_frozen_and_its_head_trains(family):
  _, params = _model(**FAMILIES[family])
  labels = flatten(partition.labels(params))
  assert {k for k, v in labels.items() if v != partition.FROZEN} == {"head/kernel", "head/bias"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_conversions_round_trip_bit_for_bit(family):
  sd = timm_weights(3, **FAMILIES[family])
  public = timm_format.to_public(sd, HEADS)
  back = timm_format.from_public(public)
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
  _, init = _model(**FAMILIES[family])
  flat = {k: np.asarray(v) for k, v in flatten(init).items()}
  again = timm_format.to_public(timm_format.from_public(flat), HEADS)
  assert sorted(again) == sorted(flat) and all(np.array_equal(again[k], flat[k]) for k in flat)


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.update({"blocks.0.ls1.gamma": np.ones(D, np.float32)}),
     r"Transformer/encoderblock_0/ls1 \(32,\) is not in the model \(check model.layer_scale\)"),
    (lambda sd: sd.update({"reg_token": np.ones((1, 4, D), np.float32)}), r"registers .* \(check model.num_registers\)"),
    (lambda sd: sd.pop("patch_embed.proj.bias"), r"embedding/bias .* missing .* \(check model.patch_bias\)"),
    (lambda sd: sd.update({"attn_pool.latent": np.ones((1, 1, D), np.float32)}), "attn_pool.q.weight is missing"),
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


def hf_weights(sd, naming="v4", prefix="vit.") -> dict[str, np.ndarray]:
  """A timm state dict in transformers' naming, renamed by hand: transformers 4's
  (encoder.layer.N.attention.attention.query, intermediate.dense) or 5's (layers.N.attention.q_proj,
  mlp.fc1); with LayerScale (ls*.gamma) it is DINOv2's (norm1/2, layer_scaleN.lambda1, mlp.fc*)."""
  dinov2 = "blocks.0.ls1.gamma" in sd
  hf = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
  if dinov2:
    hf["embeddings.mask_token"] = np.zeros((1, D), np.float32)
  for i in range(DEPTH):
    t = f"blocks.{i}."
    h = f"encoder.layer.{i}." if naming == "v4" or dinov2 else f"layers.{i}."
    for p in ("weight", "bias"):
      for j, n in enumerate(("query", "key", "value")):
        name = f"attention.attention.{n}" if naming == "v4" else f"attention.{n[0]}_proj"
        hf[h + f"{name}.{p}"] = sd[t + f"attn.qkv.{p}"][j * D:(j + 1) * D]
      hf[h + ("attention.output.dense" if naming == "v4" else "attention.o_proj") + f".{p}"] = sd[t + f"attn.proj.{p}"]
      hf[h + ("norm1" if dinov2 else "layernorm_before") + f".{p}"] = sd[t + f"norm1.{p}"]
      hf[h + ("norm2" if dinov2 else "layernorm_after") + f".{p}"] = sd[t + f"norm2.{p}"]
      v4_mlp = naming == "v4" and not dinov2
      hf[h + ("intermediate.dense" if v4_mlp else "mlp.fc1") + f".{p}"] = sd[t + f"mlp.fc1.{p}"]
      hf[h + ("output.dense" if v4_mlp else "mlp.fc2") + f".{p}"] = sd[t + f"mlp.fc2.{p}"]
    if dinov2:
      hf[h + "layer_scale1.lambda1"], hf[h + "layer_scale2.lambda1"] = sd[t + "ls1.gamma"], sd[t + "ls2.gamma"]
  hf = {prefix + k: np.ascontiguousarray(v) for k, v in hf.items()}
  hf["classifier.weight"], hf["classifier.bias"] = sd["head.weight"], sd["head.bias"]
  return hf


@pytest.mark.parametrize("naming", ["v4", "v5"])
def test_transformers_vit_safetensors_loads_and_gives_timms_logits(tmp_path, naming):
  sd = timm_weights(5)
  path = str(tmp_path / "model.safetensors")
  save_file(hf_weights(sd, naming), path)
  model, init = _model()
  params, _ = npz.load_pretrained(init, path)
  x = np.random.default_rng(2).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, timm_forward(sd, x), atol=1e-5)


@pytest.mark.parametrize("registers", [0, 2])
def test_transformers_dinov2_loads_with_its_layerscale_and_registers(tmp_path, registers):
  """transformers' DINOv2 adds its position embedding to the class token and the patches, and
  not to the registers: the loaded model (no_embed_class, the class row folded into the class
  token) must give the logits of that forward."""
  kw = dict(layer_scale=True, num_registers=registers)
  sd = timm_weights(7, **kw)  # pos_embed covers the class token and the registers
  if registers:  # the same weights as transformers lays them out: pos over [cls, patches]
    pos = np.concatenate([sd["pos_embed"][:, :1], sd["pos_embed"][:, 1 + registers:]], axis=1)
    sd["pos_embed"][:, 1:1 + registers] = 0.0  # registers get no position in transformers' forward
    hf = hf_weights({**sd, "pos_embed": pos}, "v5", prefix="dinov2_with_registers.")
    hf["dinov2_with_registers.embeddings.register_tokens"] = sd["reg_token"]
  else:
    hf = hf_weights(sd, "v5", prefix="dinov2.")
  hf["classifier.weight"] = np.ones((3, 2 * D), np.float32)  # DINOv2's head reads [cls, mean patch]: dropped
  path = str(tmp_path / "dinov2.safetensors")
  save_file(hf, path)
  model, init = _model(**kw, no_embed_class=bool(registers))
  params, _ = npz.load_pretrained(init, path, posemb_prefix=model.cfg.posemb_prefix)
  params["head"] = {"kernel": sd["head.weight"].T, "bias": sd["head.bias"]}
  x = np.random.default_rng(3).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, timm_forward(sd, x), atol=1e-5)


def test_a_swiglu_dinov2_is_refused_in_one_line(tmp_path):
  hf = hf_weights(timm_weights(layer_scale=True), "v5", prefix="dinov2.")
  hf["dinov2.encoder.layer.0.mlp.weights_in.weight"] = np.ones((2 * MLP, D), np.float32)
  path = str(tmp_path / "giant.safetensors")
  save_file(hf, path)
  with pytest.raises(npz.CheckpointError, match="mlp.weights_in.weight is a SwiGLU MLP") as e:
    npz.load_pretrained(_model(layer_scale=True)[1], path)
  assert "\n" not in str(e.value)
