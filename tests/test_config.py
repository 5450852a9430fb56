"""The one check of a config: every mistake is a one-line ConfigError that names the key, the
value and what is allowed, raised before any data is read. Also the dotted-key override and
the stage-1 fingerprint."""

import pytest

from dmlora_jax import config_base, methods
from dmlora_jax.config_base import ConfigError


def _config(**over):
  c = config_base.get_base_config()
  for k, v in over.items():
    config_base.override(c, k, v)
  return c


# (overrides, text the one line must hold)
MISTAKES = [
    ({"method": "dmlroa"}, "config.method='dmlroa' is not one of full, linear, lora, multibranch, dropout, dmlora"),
    ({"dmlora.targets": ("query", "qeury")}, "config.dmlora.targets=('query', 'qeury'): unknown target(s) ['qeury']; "
                                              "choose from query, key, value, out, Dense_0, Dense_1"),
    ({"dmlora.num_branches": 0}, "config.dmlora.num_branches=0: must be >= 1"),
    ({"dmlora.rank": 0}, "config.dmlora.rank=0: must be >= 1"),
    ({"dmlora.alpha": -1.0}, "config.dmlora.alpha=-1.0: must be > 0"),
    ({"dmlora.drop_schedule": "exponential"}, "config.dmlora.drop_schedule='exponential' is not one of constant, "
                                              "linear, cosine, step"),
    ({"dmlora.drop_end": 1.0}, "config.dmlora.drop_end=1.0: must be in [0, 1)"),
    ({"dmlora.drop_start": -0.1}, "config.dmlora.drop_start=-0.1: must be in [0, 1)"),
    ({"dmlora.min_active": 5}, "config.dmlora.min_active=5: must be in [0, num_branches=4]"),
    ({"dmlora.split_rank": True, "dmlora.rank": 6}, "rank 6 is not divisible by num_branches 4"),
    ({"model.variant": "X/16"}, "config.model.variant 'X/16' is not NAME/PATCH"),
    ({"model.dtype": "float16"}, "config.model.dtype='float16' is not one of float32, bfloat16"),
    ({"model.attention": "flash"}, "config.model.attention='flash' is not one of auto, cpu_kernel, xla, "
                                   "dot_product_attention, cudnn, pallas_tpu_flash"),
    ({"data.normalization": "clip"}, "config.data.normalization='clip' is not one of imagenet, inception"),
    ({"data.source": "folder"}, "config.data.source='folder' is not one of vtab1k_folder, fgvc_json, tfds, demo"),
    ({"data.protocol": "best"}, "config.data.protocol='best' is not one of final, tune"),
    ({"model.init_checkpoint": "/no/such/ViT-B_16.npz"}, "config.model.init_checkpoint='/no/such/ViT-B_16.npz': "
                                                         "no such file"),
    ({"data.image_size": 100}, "config.data.image_size=100: must be a positive multiple of the patch size 16"),
    ({"stage1.lr": 0.0}, "config.stage1.lr=0.0: must be > 0"),
    ({"stage1.warmup_epochs": 200}, "config.stage1.warmup_epochs=200: must be in [0, stage1.epochs=100]"),
    ({"stage2.lr": 0.0}, "config.stage2.lr=0.0: must be > 0 (or stage2.epochs=0 to skip 2S-LS)"),
    ({"stage2.granularity": "layer"}, "config.stage2.granularity='layer' is not one of module, block"),
    ({"batch_size": 0}, "config.batch_size=0: must be > 0"),
    ({"parallel": "pjit"}, "config.parallel='pjit' is not one of pmap, jit"),
]


@pytest.mark.parametrize("over,text", MISTAKES, ids=[next(iter(o)) for o, _ in MISTAKES])
def test_each_config_mistake_is_one_line_naming_key_and_choices(over, text):
  with pytest.raises(ConfigError) as e:
    config_base.validate(_config(**over))
  msg = str(e.value)
  assert text in msg and "\n" not in msg


def test_the_defaults_and_every_method_validate():
  for name in methods.METHODS:
    config_base.validate(_config(method=name))


def test_settings_of_methods_without_them_are_not_checked():
  # Full fine-tuning has no branches: their settings cannot be wrong for it.
  config_base.validate(_config(method="full", **{"dmlora.rank": 0, "dmlora.drop_end": 2.0}))
  config_base.validate(_config(method="lora", **{"dmlora.drop_schedule": "nope", "stage2.lr": 0.0}))


def test_resolve_applies_what_a_method_fixes():
  c = config_base.resolve(_config(method="dmlora_block"))
  assert c.stage2.granularity == "block"
  assert config_base.resolve(_config(method="dmlora")).stage2.granularity == "module"


def test_override_parses_the_old_type_and_names_a_misspelt_key():
  c = config_base.get_base_config()
  config_base.override(c, "dmlora.targets", "query,value")
  config_base.override(c, "batch_size", "32")
  config_base.override(c, "dmlora.rescale", "false")
  assert c.dmlora.targets == ("query", "value") and c.batch_size == 32 and c.dmlora.rescale is False
  with pytest.raises(ConfigError, match=r"config.dmlora.rnak: no such config key. Did you mean dmlora.rank\?"):
    config_base.override(c, "dmlora.rnak", "4")
  with pytest.raises(ConfigError, match=r"config.batch_size=many: .*invalid literal"):
    config_base.override(c, "batch_size", "many")


def test_stage1_fingerprint_ignores_stage2_and_paths_and_sees_the_rest():
  fp = config_base.stage1_fingerprint
  base = fp(_config(method="dropout"))
  assert fp(_config(method="dmlora")) == base  # dmlora's stage 1 is dropout's
  assert fp(_config(method="dropout", **{"stage2.lr": 0.5, "data.root": "/x", "log_every": 3})) == base
  assert fp(_config(method="dropout", **{"stage1.lr": 3e-3})) != base
  assert fp(_config(method="multibranch")) != base
