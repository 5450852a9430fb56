"""model.variant=auto (the model a checkpoint describes) and hf-hub: names (through the
Hugging Face cache; nothing is downloaded here: the hub is offline and the cache is made by
hand in the layout huggingface_hub uses)."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmlora_jax import checkpoint_source, config_base, npz, setup, vit
from trainer_utils import tiny_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torch")
ARRAYS = np.load(os.path.join(FIXTURES, "logits.npz"))


def _auto(path, num_classes, **over):
  c = config_base.resolve(tiny_config(**{"model.variant": "auto", "model.init_checkpoint": path,
                                         "model.gelu_approximate": False, **over}))
  return c, setup.vit_config(c, num_classes)


def test_a_transformers_dinov2_with_registers_describes_itself_and_gives_its_features():
  c, cfg = _auto(os.path.join(FIXTURES, "hf_dinov2_reg", "model.safetensors"), 32)
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size) == (32, 2, 2, 64, 4)
  assert cfg.layer_scale and cfg.num_registers == 2 and cfg.no_embed_class and cfg.pool == "token"
  model = vit.ViT(cfg)
  params, _ = setup.init_params(model, c, 16)
  params["head"] = {"kernel": np.eye(32, dtype=np.float32), "bias": np.zeros(32, np.float32)}
  x = jnp.asarray(ARRAYS["x_nchw"].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(model.apply({"params": params}, x), ARRAYS["logits_hf_dinov2_reg"], atol=1e-5)


def test_a_timm_file_says_all_but_its_head_count_which_the_error_asks_for():
  path = os.path.join(FIXTURES, "clip.safetensors")
  with pytest.raises(config_base.ConfigError, match=r"config.model.num_heads: .*clip.safetensors does not say") as e:
    _auto(path, 5)
  assert "\n" not in str(e.value)
  c, cfg = _auto(path, 5, **{"model.num_heads": 2, "model.activation": "quick_gelu", "model.layer_norm_eps": 1e-5})
  assert cfg.pre_norm and not cfg.patch_bias and not cfg.layer_scale and cfg.num_registers == 0
  model = vit.ViT(cfg)
  params, _ = setup.init_params(model, c, 16)
  x = jnp.asarray(ARRAYS["x_nchw"].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(model.apply({"params": params}, x), ARRAYS["logits_clip"], atol=1e-5)


def test_the_public_npz_says_its_heads(tmp_path):
  model = vit.ViT(vit.parse_variant("tiny/4", 5, pool="avg", num_registers=3))
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  npz.save_npz(str(tmp_path / "m.npz"), params)
  _, cfg = _auto(str(tmp_path / "m.npz"), 5)
  want = model.cfg
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.pool, cfg.num_registers) == \
      (want.width, want.depth, want.num_heads, want.mlp_dim, want.patch_size, "avg", 3)


def test_auto_without_a_checkpoint_is_a_config_error():
  with pytest.raises(config_base.ConfigError, match="model.variant='auto' reads the model from model.init_checkpoint"):
    config_base.validate(config_base.resolve(tiny_config(**{"model.variant": "auto"})))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """An offline hub whose cache holds one repository, laid out as huggingface_hub caches."""
  from huggingface_hub import constants
  cache = tmp_path / "hub"
  snap = cache / "models--someone--tiny-dinov2" / "snapshots" / ("0" * 40)
  snap.mkdir(parents=True)
  for f in ("model.safetensors", "config.json"):
    shutil.copy(os.path.join(FIXTURES, "hf_dinov2_reg", f), snap / f)
  (cache / "models--someone--tiny-dinov2" / "refs").mkdir()
  (cache / "models--someone--tiny-dinov2" / "refs" / "main").write_text("0" * 40)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  return cache


def test_an_hf_hub_name_reads_the_cache_and_builds_the_model(offline_hub):
  path = checkpoint_source.resolve("hf-hub:someone/tiny-dinov2")
  assert path.startswith(str(offline_hub)) and path.endswith("model.safetensors")
  _, cfg = _auto("hf-hub:someone/tiny-dinov2", 32)
  assert cfg.num_heads == 2 and cfg.num_registers == 2


def test_offline_without_the_file_the_error_says_what_to_place_where(offline_hub):
  with pytest.raises(npz.CheckpointError) as e:
    npz.load_checkpoint("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", 12)
  msg = str(e.value)
  assert "\n" not in msg and "https://huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k/resolve/main/" \
      "model.safetensors" in msg and str(offline_hub) in msg and "model.init_checkpoint" in msg
