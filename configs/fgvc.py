r"""DMLoRA on one FGVC set of the VPT protocol (ViT-B/16, ImageNet-21k).

Command (final protocol: train+val -> test):

  python -m dmlora_jax.main --config=configs/fgvc.py:dataset=cub --workdir=runs/fgvc_cub \
      --config.data.root=data/fgvc --config.model.init_checkpoint=checkpoints/ViT-B_16.npz

- `dataset=` is cub (200 classes), nabirds (555), oxford_flowers (102), stanford_dogs (120) or
  stanford_cars (196): a folder `<config.data.root>/<dataset>/` holding VPT's train.json,
  val.json, test.json and the images (CUB, NABirds: images/; Stanford Dogs: Images/; Oxford
  Flowers, Stanford Cars: the folder itself). See the README section "Preparing VTAB-1k and FGVC".
- Hyper-parameter search: add `--config.data.protocol=tune` (train -> val; test never read).
- `:dataset=cub,runlocal` shrinks the run to a tiny-model smoke test.

Recipe: the VTAB-1k recipe of config_base (AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs with
10 warm-up, cosine; 224 px, bicubic, ImageNet mean/std) plus 10 epochs of 2S-LS.
Expected time: the FGVC train sets hold 1.6k (Oxford Flowers) to 22k (NABirds) images, so
100 epochs are ~0.2M-2.2M image-steps of ViT-B/16: roughly 0.5 h (flowers) to 4 h (nabirds)
on one A100/H100-class GPU (estimated from the VTAB-1k figure in configs/vtab1k.py, not
measured here); impractical on a CPU.
Reproduces: the DMLoRA row of the FGVC table (published means for other methods are in
../shared/PROTOCOL.md: full fine-tuning 88.5, VPT-deep 89.1, SSF 90.7).
"""

from dmlora_jax import config_base
from dmlora_jax.data import fgvc



def get_config(arg=None):
  a = config_base.parse_arg(arg, dataset="cub", variant="B/16", method="dmlora", runlocal=False)
  if a.dataset not in fgvc.DATASETS:
    raise ValueError(f"unknown FGVC dataset {a.dataset!r}; known: {', '.join(fgvc.DATASETS)}")
  c = config_base.get_base_config()
  c.method = a.method
  c.model.variant = a.variant
  c.model.init_checkpoint = "checkpoints/ViT-B_16.npz"
  c.data.source = "fgvc_json"
  c.data.root = "data/fgvc"
  c.data.task = a.dataset
  c.data.num_classes = fgvc.DATASETS[a.dataset].num_classes
  if a.runlocal:
    config_base.apply_runlocal(c)
  return c
