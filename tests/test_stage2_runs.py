"""2S-LS in the trainer, on scikit-learn's digits (offline): stage 2 can start from another
run's stage 1 (a dropout run's, bit-identical to training both stages in one dmlora run), and
results.json reports the learned alpha_l, their spread and the stage-2 loss curve."""

import json
import os

import numpy as np
import pytest

from dmlora_jax import config_base, npz, trainer


def digits_config(stage2_epochs: int, **over):
  c = config_base.get_base_config()
  c.model.variant = "tiny/4"
  c.data.source, c.data.task, c.data.image_size, c.data.num_workers = "demo", "digits", 16, 2
  c.batch_size = 50
  c.stage1.epochs, c.stage1.warmup_epochs, c.stage1.lr = 2, 0, 3e-3
  c.stage2.epochs, c.stage2.lr = stage2_epochs, 0.05
  c.dmlora.num_branches, c.dmlora.rank = 3, 2
  c.log_every, c.checkpoint_every, c.data.protocol = 4, 1000, "tune"
  for k, v in over.items():
    config_base.override(c, k, v)
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("stage2")
  wd = {n: str(root / n) for n in ("stage1_only", "both", "continued")}
  # The dropout method is dmlora's stage 1 (methods.py): its run can start dmlora's stage 2.
  out = {"stage1_only": trainer.train_and_evaluate(digits_config(2, method="dropout"), wd["stage1_only"]),
         "both": trainer.train_and_evaluate(digits_config(2), wd["both"]),
         "continued": trainer.train_and_evaluate(digits_config(2, **{"stage2.init_from": wd["stage1_only"]}),
                                                 wd["continued"])}
  return wd, out


def test_stage2_from_another_runs_stage1_equals_one_run_of_both_stages(runs):
  wd, res = runs
  a = npz.load_npz(os.path.join(wd["both"], "merged.npz"))
  b = npz.load_npz(os.path.join(wd["continued"], "merged.npz"))
  assert set(a) == set(b)
  for k in a:
    assert a[k].tobytes() == b[k].tobytes(), k
  assert res["continued"]["accuracy"] == res["both"]["accuracy"]
  assert res["continued"]["scales"] == res["both"]["scales"]
  # The continued run trained stage 2 only.
  logged = [json.loads(l) for l in open(os.path.join(wd["continued"], "metrics.jsonl"))]
  assert logged and {m["stage"] for m in logged} == {2}


def test_results_report_alpha_l_their_spread_and_the_stage2_loss(runs):
  _, res = runs
  r = res["both"]
  alphas = np.array(list(r["scales"].values()))
  assert len(alphas) == 2 * 3 and np.all(alphas > 0)
  spread = r["scale_spread"]
  assert spread["min"] == pytest.approx(alphas.min()) and spread["max"] == pytest.approx(alphas.max())
  assert spread["std_log"] == pytest.approx(np.log(alphas).std())
  assert spread["std_log"] > 1e-3  # stage 2 at lr 0.05 moved the scales apart
  steps = [s for s, _ in r["stage2_loss"]]
  assert steps == list(range(r["stage1_steps"] + 4, r["steps"] + 1, 4))  # every log_every in stage 2
  # Without stage 2 the scales stay at alpha.
  s1 = res["stage1_only"]
  assert s1["stage2_loss"] == [] and s1["scale_spread"]["std_log"] == 0.0
  np.testing.assert_allclose(list(s1["scales"].values()), 8.0, rtol=1e-6)


def test_stage2_from_a_different_stage1_is_refused(runs, tmp_path):
  wd, _ = runs
  other = digits_config(2, **{"stage2.init_from": wd["stage1_only"], "stage1.lr": 1e-3})
  with pytest.raises(trainer.ResumeError, match="stage2.init_from=.*stage 1 was run with another configuration"):
    trainer.train_and_evaluate(other, str(tmp_path / "a"))
  missing = digits_config(2, **{"stage2.init_from": str(tmp_path / "nowhere")})
  with pytest.raises(trainer.ResumeError, match="no checkpoints/ folder"):
    trainer.train_and_evaluate(missing, str(tmp_path / "b"))
