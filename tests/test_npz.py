"""Loading and exporting checkpoints in the public .npz layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmlora_jax import dmlora, npz, vit
from dmlora_jax.merge import merge_params
from dmlora_jax.pytrees import flatten
from test_model import images, make, randomize


def test_export_reads_back_identical_and_reproduces_logits(tmp_path):
  adapter = dmlora.AdapterSpec(num_branches=2, rank=2)
  model, params = make(adapter)
  params = randomize(params)
  merged = merge_params(params)
  path = str(tmp_path / "merged.npz")
  npz.save_npz(path, merged)
  back = npz.load_npz(path)
  assert set(back) == set(flatten(merged))
  for k, v in flatten(merged).items():
    np.testing.assert_array_equal(back[k], np.asarray(v))
    assert back[k].dtype == np.asarray(v).dtype
  plain, fresh = make(None, seed=9)
  loaded, fp = npz.load_pretrained(fresh, path)
  x = images()
  np.testing.assert_allclose(plain.apply({"params": loaded}, x), model.apply({"params": params}, x), atol=1e-5)
  assert fp == npz.fingerprint(back) and len(fp) == 16


def test_adapter_leaves_keep_init_when_loading_a_plain_checkpoint(tmp_path):
  plain, p = make(None)
  path = str(tmp_path / "base.npz")
  npz.save_npz(path, randomize(p))
  model, init = make(dmlora.AdapterSpec(num_branches=2, rank=2), seed=3)
  loaded, _ = npz.load_pretrained(init, path)
  fl, fi, fb = flatten(loaded), flatten(init), npz.load_npz(path)
  for k in fl:
    if k.rsplit("/", 1)[-1] in dmlora.ADAPTER_LEAVES:
      np.testing.assert_array_equal(fl[k], fi[k])
    else:
      np.testing.assert_array_equal(fl[k], fb[k])


def test_wrong_shape_checkpoint_names_param_and_both_shapes(tmp_path):
  _, p = make(None)
  flat = {k: np.asarray(v) for k, v in flatten(p).items()}
  bad = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
  flat[bad] = np.zeros((32, 48), np.float32)
  path = str(tmp_path / "bad.npz")
  np.savez(path, **flat)
  with pytest.raises(npz.CheckpointError,
                     match=r"shape mismatch for Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel: "
                           r"checkpoint \(32, 48\) vs model \(32, 64\)"):
    npz.load_pretrained(p, path)


def test_missing_and_unknown_params_are_named(tmp_path):
  _, p = make(None)
  flat = {k: np.asarray(v) for k, v in flatten(p).items()}
  del flat["Transformer/encoder_norm/scale"]
  np.savez(tmp_path / "a.npz", **flat)
  with pytest.raises(npz.CheckpointError, match="Transformer/encoder_norm/scale .* missing"):
    npz.load_pretrained(p, str(tmp_path / "a.npz"))
  flat = {k: np.asarray(v) for k, v in flatten(p).items()}
  flat["Transformer/encoderblock_7/LayerNorm_0/scale"] = np.ones(32, np.float32)
  np.savez(tmp_path / "b.npz", **flat)
  with pytest.raises(npz.CheckpointError, match="encoderblock_7/LayerNorm_0/scale .* not in the model"):
    npz.load_pretrained(p, str(tmp_path / "b.npz"))
  with pytest.raises(npz.CheckpointError, match="not found: .*nope.npz"):
    npz.load_pretrained(p, str(tmp_path / "nope.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(npz.CheckpointError, match="cannot read checkpoint"):
    npz.load_pretrained(p, str(tmp_path / "junk.npz"))


def test_head_replaced_and_pre_logits_dropped(tmp_path):
  _, src = make(None, num_classes=21, representation_size=32)
  src = randomize(src)
  path = str(tmp_path / "in21k.npz")
  npz.save_npz(path, src)
  _, init = make(None, num_classes=5)
  loaded, _ = npz.load_pretrained(init, path)
  fl = flatten(loaded)
  assert "pre_logits/kernel" not in fl
  np.testing.assert_array_equal(fl["head/kernel"], flatten(init)["head/kernel"])  # fresh head
  assert fl["head/kernel"].shape == (32, 5)
  np.testing.assert_array_equal(fl["cls"], flatten(src)["cls"])


def test_posemb_resample_on_a_hand_computed_grid():
  # 2x2 grid [[0, 1], [2, 3]] upsampled to 4x4 with half-pixel bilinear interpolation:
  # along one axis [a, b] -> [a, .75a+.25b, .25a+.75b, b].
  d = 1
  cls = np.array([[[7.0]]])
  grid = np.array([0.0, 1.0, 2.0, 3.0]).reshape(1, 4, d)
  out = npz.resample_posemb(np.concatenate([cls, grid], axis=1), 1 + 16)
  w = np.array([[1, 0], [.75, .25], [.25, .75], [0, 1]])
  want = w @ np.array([[0.0, 1.0], [2.0, 3.0]]) @ w.T
  assert out[0, 0, 0] == 7.0  # class token kept
  np.testing.assert_allclose(out[0, 1:, 0].reshape(4, 4), want, atol=1e-6)


def test_posemb_resampled_when_loading_at_another_image_size(tmp_path):
  _, p = make(None)  # 16 px, patch 4 -> 4x4 grid
  path = str(tmp_path / "ckpt.npz")
  npz.save_npz(path, randomize(p))
  cfg = vit.parse_variant("tiny/4", 5)
  init = vit.ViT(cfg).init(jax.random.key(0), jnp.zeros((1, 24, 24, 3)))["params"]  # 6x6 grid
  loaded, _ = npz.load_pretrained(init, path)
  pe = flatten(loaded)["Transformer/posembed_input/pos_embedding"]
  assert pe.shape == (1, 37, 32)
  src = npz.load_npz(path)["Transformer/posembed_input/pos_embedding"]
  np.testing.assert_array_equal(pe[0, 0], src[0, 0])
  np.testing.assert_allclose(pe[0, 1:].mean(0), src[0, 1:].mean(0), atol=0.05)
