"""The project against timm and transformers themselves, without torch: tiny ViTs of each
family, written and run once by those libraries (tools/make_torch_fixtures.py, versions in
tests/fixtures/torch/versions.json), load from their safetensors files and give the same
logits to 1e-5; and they go out again in timm's naming bit for bit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmlora_jax import npz, timm_format, vit
from dmlora_jax.pytrees import flatten

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torch")
META = json.load(open(os.path.join(FIXTURES, "versions.json")))
ARRAYS = np.load(os.path.join(FIXTURES, "logits.npz"))
X = ARRAYS["x_nchw"].transpose(0, 2, 3, 1)  # NHWC

# Each file and the ViTConfig fields that say its family (what its keys cannot say included).
CASES = {
    "plain": ("plain.safetensors", dict(num_classes=5)),
    "dinov2_reg": ("dinov2_reg.safetensors", dict(num_classes=5, layer_scale=True, num_registers=2, no_embed_class=True)),
    "clip": ("clip.safetensors", dict(num_classes=5, pre_norm=True, activation="quick_gelu", patch_bias=False,
                                      layer_norm_eps=1e-5)),
    "gap": ("gap.safetensors", dict(num_classes=5, pool="avg")),
    "map": ("map.safetensors", dict(num_classes=5, pool="map")),
    "hf_vit": ("hf_vit/model.safetensors", dict(num_classes=5)),
    # the features: a head of width 32 set to the identity below
    "hf_dinov2_reg": ("hf_dinov2_reg/model.safetensors", dict(num_classes=32, layer_scale=True, num_registers=2,
                                                              no_embed_class=True)),
}


def test_the_fixtures_cover_every_family_they_were_generated_for():
  assert sorted(CASES) == sorted(META["families"]) and META["versions"]["timm"]


def _load(name):
  file, kw = CASES[name][0], dict(CASES[name][1])
  num_classes = kw.pop("num_classes")
  model = vit.ViT(vit.parse_variant("tiny/4", num_classes, gelu_approximate=False, **kw))
  init = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  params, _ = npz.load_pretrained(init, os.path.join(FIXTURES, file), posemb_prefix=model.cfg.posemb_prefix)
  return model, params


@pytest.mark.parametrize("name", list(CASES))
def test_a_torch_made_vit_loads_and_gives_its_libraries_logits(name):
  model, params = _load(name)
  if name == "hf_dinov2_reg":  # Dinov2Model has no head: compare the class token's features
    params["head"] = {"kernel": np.eye(32, dtype=np.float32), "bias": np.zeros(32, np.float32)}
  got = np.asarray(model.apply({"params": params}, jnp.asarray(X)))
  want = ARRAYS[f"logits_{name}"]
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["plain", "dinov2_reg", "clip", "gap", "map"])
def test_timms_file_goes_out_again_bit_for_bit(name):
  sd = timm_format.load_safetensors(os.path.join(FIXTURES, CASES[name][0]))
  _, params = _load(name)
  back = timm_format.from_public({k: np.asarray(v) for k, v in flatten(params).items()})
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
