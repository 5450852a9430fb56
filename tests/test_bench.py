"""The benchmark command on the tiny variant: every field of the JSON is there and sane."""

import json
import math

from dmlora_jax import bench

FIELDS = ("train_images_per_s", "eval_images_per_s", "compile_s", "peak_memory_bytes", "trainable_params",
          "total_params", "step_flops", "achieved_flops_per_s")


def test_bench_json_has_every_field_with_sane_values(tmp_path):
  path = tmp_path / "bench.json"
  bench.main(["--variant", "tiny/4", "--image_size", "16", "--batch_size", "4", "--steps", "2",
              "--eval_steps", "1", "--methods", "full,linear,lora,dmlora", "--num_branches", "2", "--rank", "2",
              "--per_branch_lora", "0", "--matmul_size", "128", "--in_process", "1", f"--json={path}"])
  res = json.loads(path.read_text())
  rows = res["methods"]
  assert set(rows) == {"full", "linear", "lora", "dmlora"}
  for name, m in rows.items():
    for f in FIELDS:
      assert isinstance(m[f], (int, float)) and math.isfinite(m[f]) and m[f] > 0, (name, f, m[f])
    assert isinstance(m["trainable_params"], int) and isinstance(m["total_params"], int)
    assert len(m["train_step_times_s"]) == 2
    faults = m["train_step_minor_faults"]
    assert len(faults) == 2 and all(isinstance(f, int) and f >= 0 for f in faults), (name, faults)
    assert m["achieved_flops_per_s"] == m["step_flops"] / m["train_step_s"]
  assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
  for name in ("linear", "lora", "dmlora"):
    assert rows[name]["trainable_params"] < rows[name]["total_params"]
  assert rows["linear"]["trainable_params"] < rows["lora"]["trainable_params"]
  # LoRA defaults to DMLoRA's total rank (K * r = 4): the same adapter parameter count.
  assert rows["lora"]["rank"] == 4 and rows["lora"]["trainable_params"] == rows["dmlora"]["trainable_params"]
  # Skipping frozen weight gradients shows in XLA's FLOP count.
  assert rows["lora"]["step_flops"] < rows["full"]["step_flops"]

  d = rows["dmlora"]
  assert d["merged_eval_images_per_s"] > 0 and d["plain_eval_images_per_s"] > 0
  assert d["merged_is_plain_program"] is True
  assert d["programs"]["merged"]["compiled_hlo_sha256"] == d["programs"]["plain"]["compiled_hlo_sha256"]
  assert d["programs"]["unmerged_adapter"]["compiled_hlo_sha256"] != d["programs"]["plain"]["compiled_hlo_sha256"]
  assert res["matmul"]["flops_per_s"] > 0
  assert res["hardware"]["cpu_count"] >= 1
  assert set(res["targets"]) >= {"merged_is_plain_program", "dmlora_step_over_lora_step", "merged_eval_over_plain_eval"}


def test_gelu_tanh_custom_vjp_matches_autodiff_of_the_formula():
  # vit.gelu_tanh saves only x for the backward pass (a speed change measured by bench);
  # its value and gradient must be those of jax.nn.gelu(approximate=True).
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dmlora_jax import vit
  x = jnp.linspace(-6.0, 6.0, 1001, dtype=jnp.float32)
  ref = lambda x: jnp.sum(jnp.sin(x) * jax.nn.gelu(x, approximate=True))
  got = lambda x: jnp.sum(jnp.sin(x) * vit.gelu_tanh(x))
  np.testing.assert_array_equal(vit.gelu_tanh(x), jax.nn.gelu(x, approximate=True))
  np.testing.assert_allclose(jax.grad(got)(x), jax.grad(ref)(x), rtol=1e-5, atol=1e-5)


def test_attention_custom_vjp_matches_autodiff_of_softmax_attention():
  # vit.attention defers the softmax normalisation and has a hand-written backward pass;
  # value and gradients must be those of softmax(q k^T) v, here with large logits (stability).
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dmlora_jax import vit

  def ref(q, k, v):
    w = jax.nn.softmax(jnp.einsum("nqd,nkd->nqk", q, k), axis=-1)
    return jnp.einsum("nqk,nkd->nqd", w, v)

  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q, k, v = (4.0 * jax.random.normal(key, (6, 17, 8)) for key in (kq, kk, kv))
  g = jax.random.normal(kg, (6, 17, 8))
  np.testing.assert_allclose(vit.attention(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  got = jax.vjp(vit.attention, q, k, v)[1](g)
  want = jax.vjp(ref, q, k, v)[1](g)
  for name, a, b in zip("qkv", got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()), err_msg=f"d{name}")
