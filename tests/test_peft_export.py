"""The PEFT adapter export: a DMLoRA model's branch sets as one LoRA per timm Linear.

Checked two ways: against PEFT itself, through tests/fixtures/peft (written by
`tools/timm_check.py write` + `check`: peft 0.21.2 loaded these adapters onto timm 1.0.31's ViT
and gave peft_logits.npy; DoRA's as PEFT's use_dora, AdaLoRA's as PEFT's ADALORA), and against PEFT's LoRA maths written in NumPy here
(W_torch + (lora_alpha / r) B A per target module, r and alpha from rank_pattern/alpha_pattern).
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from dmlora_jax import dmlora, merge, npz, peft_export, timm_format, vit
from dmlora_jax.pytrees import flatten, unflatten
from test_timm_format import timm_forward

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft")
# the families of the fixture (tools/timm_check.py FAMILIES): ViTConfig fields
FIXTURE_FAMILIES = {"plain": dict(gelu_approximate=False),
                    "dinov2_reg": dict(gelu_approximate=False, layer_scale=True, num_registers=2, no_embed_class=True),
                    "dora": dict(gelu_approximate=False),  # DoRA (one branch) on the plain family: PEFT's use_dora
                    "adalora": dict(gelu_approximate=False)}  # AdaLoRA (rank 3): PEFT's ADALORA adapter
ALL = ("query", "key", "value", "out", "Dense_0", "Dense_1")


def _model(family, targets=ALL, k=3, r=2, dora=False, adalora=False):
  return vit.ViT(vit.parse_variant("tiny/4", 10, **family),
                 dmlora.AdapterSpec(num_branches=1 if dora or adalora else k, rank=3 if adalora else r, targets=targets,
                                    dora=dora, adalora=adalora))


@pytest.mark.parametrize("tag", list(FIXTURE_FAMILIES))
def test_peft_on_timm_reproduces_the_adapted_logits(tag, tmp_path):
  d = os.path.join(FIXTURES, tag)
  params = unflatten(npz.load_npz(os.path.join(d, "params.npz")))
  x = np.load(os.path.join(FIXTURES, "x.npy"))
  peft_logits = np.load(os.path.join(d, "peft_logits.npy"))
  ours = np.asarray(_model(FIXTURE_FAMILIES[tag], dora=tag == "dora", adalora=tag == "adalora").apply(
      {"params": params}, jnp.asarray(x)))
  tol = 1e-5 * max(1.0, float(np.abs(peft_logits).max()))  # float32 on both sides
  np.testing.assert_allclose(ours, peft_logits, atol=tol, rtol=0)
  # the merged export (a plain ViT; merged.safetensors is its timm naming) gives them too
  plain = vit.ViT(vit.parse_variant("tiny/4", 10, **FIXTURE_FAMILIES[tag]))
  merged = timm_format.to_public(timm_format.from_public(flatten(merge.merge_params(params))), 2)
  np.testing.assert_allclose(plain.apply({"params": unflatten(merged)}, jnp.asarray(x)), peft_logits, atol=tol, rtol=0)
  # ... and today's exporter writes what PEFT read for those logits.
  peft_export.export_peft(params, str(tmp_path))
  got, want = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
  assert json.load(open(tmp_path / "adapter_config.json")) == json.load(open(os.path.join(d, "adapter", "adapter_config.json")))


def _peft_apply(base_sd, adapter_sd, config):
  """PEFT's LoRA on a timm state dict, in NumPy: W += (alpha / r) B A for each target module,
  r and alpha from rank_pattern / alpha_pattern (keyed by the module name's end); the
  modules_to_save replace the base's."""
  sd = {k: np.asarray(v, np.float64) for k, v in base_sd.items()}
  for key in adapter_sd:
    m = re.fullmatch(r"base_model\.model\.(.+)\.lora_A\.weight", key)
    if not m:
      continue
    name = m.group(1)
    assert re.fullmatch(config["target_modules"], name), name
    end = name.split(".")[-1]
    r, alpha = config["rank_pattern"].get(end, config["r"]), config["alpha_pattern"].get(end, config["lora_alpha"])
    a, b = adapter_sd[key], adapter_sd[key.replace("lora_A", "lora_B")]
    assert a.shape[0] == r
    sd[name + ".weight"] = sd[name + ".weight"] + alpha / r * (b.astype(np.float64) @ a.astype(np.float64))
  for module in config["modules_to_save"] or ():
    for leaf in ("weight", "bias"):
      sd[f"{module}.{leaf}"] = adapter_sd[f"base_model.model.{module}.{leaf}"].astype(np.float64)
  return sd


@pytest.mark.parametrize("targets", [("query", "value", "Dense_1"), ("key",), ALL])
def test_branch_sets_are_one_block_structured_lora_per_timm_linear(targets):
  model = _model(dict(gelu_approximate=False), targets, k=4, r=2)
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, 16, 16, 3)), np.float32)
  params = model.init(jax.random.key(0), x[:1])["params"]
  keys = jax.random.split(jax.random.key(1), len(flatten(params)))
  params = unflatten({k: 0.3 * jax.random.normal(kk, v.shape) + (1.0 if k.endswith("/scale") else 0.0)
                      for kk, (k, v) in zip(keys, flatten(params).items())})
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  sd, config = peft_export.peft_adapter(params)
  qkv = [t for t in targets if t in ("query", "key", "value")]
  if qkv:  # one LoRA of rank (q/k/v targets) * K * r on the fused qkv, zero outside each target's rows
    assert sd["base_model.model.blocks.0.attn.qkv.lora_A.weight"].shape == (len(qkv) * 8, 32)
    b = sd["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    for j, name in enumerate(("query", "key", "value")):
      assert (np.abs(b[j * 32:(j + 1) * 32]).sum() > 0) == (name in qkv)
  base = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] not in dmlora.ADAPTER_LEAVES}
  timm_sd = _peft_apply(timm_format.from_public(base), sd, config)
  want = timm_forward(timm_sd, x.transpose(0, 3, 1, 2))  # timm's ViT forward in NumPy (tiny/4 geometry)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_method_without_branches_has_no_adapter_to_write(tmp_path):
  model = vit.ViT(vit.parse_variant("tiny/4", 10))
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  with pytest.raises(timm_format.FormatError, match="no PEFT adapter: this method has no branches"):
    peft_export.export_peft(params, str(tmp_path / "adapter"))
  assert not os.path.exists(tmp_path / "adapter")
