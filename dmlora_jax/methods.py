"""What each method is, in one table: its adapter, its branch dropout, its stages and the
parameter labels trained in each stage. The config (`config.method`), the trainer, the train
step, the optimizers, the sweep, the report and the bench read it; nothing else decides.

The ablation rows of the method are methods too: `multibranch` (K branches, never dropped),
`dropout` (K branches with the drop schedule, no 2S-LS) and `dmlora` (the full method), so
that each row of a results table is one `config.method`.

The comparison methods SSF and VPT-deep have no branches: their own leaves (label PEFT) are
switched on in the ViT by `model_fields` (ssf.py, vpt.py), with their settings in config.ssf
and config.vpt. VPT's prompts are not a weight update, so it has no merged export (`merges`).
"""

import dataclasses

from dmlora_jax import dmlora
from dmlora_jax.partition import BRANCHES, FROZEN, HEAD, PEFT, SCALE


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  summary: str
  branches: str  # "none": no adapter | "one": K = 1 (LoRA) | "K": dmlora.num_branches
  drop: bool  # branch dropout p(t) in stage 1 (dmlora.drop_*)
  two_stage: bool  # 2S-LS: stage 2 learns the per-layer scales (stage2.*)
  stage1: frozenset  # labels trained in stage 1
  stage1_of: str = ""  # the method whose stage 1 this one's is ("" = its own)
  settings: tuple = ()  # (config key, value) pairs the method fixes, e.g. the 2S-LS granularity
  config_block: str = "dmlora"  # the config block of its adapter: rank, alpha, targets, init
  dora: bool = False  # DoRA's magnitude/direction split on the one branch (dora.py)
  adalora: bool = False  # AdaLoRA's SVD form and budgeted rank allocation (adalora.py)
  module: str = ""  # a module of its own in the ViT: "ssf" (ssf.py) | "vpt" (vpt.py); "" = none
  merges: bool = True  # its trained params fold into a plain ViT (merged.npz, merged.safetensors)

  @property
  def stage1_key(self) -> str:
    """Methods with the same stage1_key train bit-identical first stages (same config)."""
    return self.stage1_of or self.name

  def trained(self, stage: int, train_head: bool = False) -> frozenset:
    """The labels that receive gradients in a stage."""
    if stage == 1:
      return self.stage1
    if not self.two_stage:
      raise ValueError(f"method {self.name} has no stage 2")
    return frozenset({SCALE, HEAD} if train_head else {SCALE})

  @property
  def owned(self) -> frozenset:
    """Labels of the leaves the method ever trains: those in the train state and checkpoints.
    Adapter methods own their scales too (saved, merged, reported) even without stage 2."""
    return self.stage1 | ({SCALE} if self.branches != "none" else frozenset())

  def model_fields(self, config) -> dict:
    """The vit.ViTConfig fields that switch the method's own module on (config.ssf, config.vpt)."""
    if self.module == "ssf":
      return {"ssf": True, "ssf_init_std": float(config.ssf.init_std)}
    if self.module == "vpt":
      return {"vpt_prompts": int(config.vpt.num_prompts)}
    return {}

  def stage2_epochs(self, config) -> int:
    return config.stage2.epochs if self.two_stage else 0

  def adapter(self, config) -> dmlora.AdapterSpec | None:
    """The branch layout from config.dmlora; LoRA is one branch of the full rank."""
    if self.branches == "none":
      return None
    d = config[self.config_block]
    k = 1 if self.branches == "one" else d.num_branches
    rank = d.rank // k if k > 1 and d.split_rank else d.rank
    return dmlora.AdapterSpec(num_branches=k, rank=rank, alpha=d.alpha, targets=tuple(d.targets),
                              init=d.get("init", "kaiming_uniform"), dora=self.dora, adalora=self.adalora)


_ADAPTER = frozenset({BRANCHES, HEAD})
METHODS = {m.name: m for m in [
    Method("full", "full fine-tuning: every weight trains", "none", False, False, frozenset({FROZEN, HEAD})),
    Method("linear", "linear probe: only the head trains", "none", False, False, frozenset({HEAD})),
    Method("lora", "LoRA: one branch, no dropout, no 2S-LS", "one", False, False, _ADAPTER),
    Method("multibranch", "K branches trained together, never dropped, no 2S-LS", "K", False, False, _ADAPTER),
    Method("dropout", "K branches with the branch-drop schedule p(t), no 2S-LS", "K", True, False, _ADAPTER),
    Method("dmlora", "DMLoRA: K branches with branch dropout, then 2S-LS (one scale per module)", "K", True, True,
           _ADAPTER, stage1_of="dropout"),
    Method("dmlora_block", "DMLoRA with one 2S-LS scale per encoder block", "K", True, True, _ADAPTER,
           stage1_of="dropout", settings=(("stage2.granularity", "block"),)),
    Method("dora", "DoRA: one LoRA branch on the direction, a trained magnitude per output unit", "one", False,
           False, _ADAPTER, config_block="dora", dora=True),
    Method("adalora", "AdaLoRA: an SVD-form update whose triplets are pruned to a budget by importance", "one",
           False, False, _ADAPTER, config_block="adalora", adalora=True),
    Method("ssf", "SSF: a learned scale and shift after every linear layer, LayerNorm and the patch embedding",
           "none", False, False, frozenset({PEFT, HEAD}), module="ssf"),
    Method("vpt_deep", "VPT-deep: learned prompt tokens at every block's input (no merged model)", "none", False,
           False, frozenset({PEFT, HEAD}), module="vpt", merges=False),
]}


def get(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"config.method: unknown method {name!r}; choose from {', '.join(METHODS)}")
  return METHODS[name]


def continues_stage1(name: str) -> str | None:
  """The method whose stage-1 runs this one can start from (the sweep reuses them), or None."""
  m = METHODS[name]
  return m.stage1_of if m.stage1_of and m.stage1_of != name else None
