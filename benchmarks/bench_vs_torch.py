"""msnet's jitted VGG-16 and CIFAR ResNet-18 beside the same architectures in PyTorch CPU, interleaved in one process.

  python benchmarks/bench_vs_torch.py            # full run (~5 min): CIFAR bs32/bs128 fwd+train, 224 bs8 fwd+train
  python benchmarks/bench_vs_torch.py --quick    # smoke run: 2 rounds, 224 forward only
  python benchmarks/bench_vs_torch.py --reps 9 --reps224 3 [--no-train224] [--out PATH]
  python benchmarks/bench_vs_torch.py --cases resnet18 --out benchmarks/results/vs_torch_resnet18.json

Needs the optional extra `pip install torch==2.13.0` (a CPU wheel; benchmarks only). Issue 6 asks whether
msnet loses to what a user would otherwise pick; the machine is shared and noisy (up to 2x swings, see
../shared/reference/cpu-performance.md), so only ratios measured in one run mean anything: every round
times each jax case next to its torch twin and a 2048x2048 jitted matmul (the fp32 peak of this run),
and the figures are medians over rounds.

Both sides: float32, random uint8 images normalised inside the timed call as (x/255 - 0.5)/0.25, VGG-16
(13 conv 3x3 + ReLU, 5 max pools, no norm), head 512-512-10 at 32x32 and 4096-4096-1000 at 224x224;
train step = softmax cross-entropy, SGD(lr 0.01, momentum 0.9). torch uses 2 threads, NCHW (its default).
msnet runs its measured CPU conv policy (CPU_POLICY). GFLOP/s from msnet.models.flops_per_image
(2 x MAC, padding taps counted), train = 3 x forward.

ResNet-18 (issue 21): msnet's CIFAR pre-activation ResNet-18 at width 1 (64-512 channels), GroupNorm with
msnet's group counts (`group_count`: 32 groups) on both sides, no conv biases, batch 128, the same loss and
optimizer; torch's twin is written here with torch.nn (no torchvision).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import model_steps  # noqa: E402
from common import write_results  # noqa: E402  (the jitted steps; shared with bench_models)

from msnet import config  # noqa: E402
from msnet.models import CPU_POLICY, build_slave, flops_per_image, resnet  # noqa: E402
from msnet.models.layers import group_count  # noqa: E402
from msnet.models.vgg import BLOCKS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vs_torch.json")
# (arch, variant, image size, batch, num classes, fc width): the cases issues 6 (VGG-16) and 21 (ResNet-18) name.
CASES = [("vgg16", "cifar", 32, 32, 10, 512), ("vgg16", "cifar", 32, 128, 10, 512),
         ("vgg16", "imagenet", 224, 8, 1000, 4096), ("resnet18", "cifar", 32, 128, 10, 512)]
TORCH_THREADS = 2
MATMUL_N = 2048


def slave_cfg(arch: str, variant: str, fc_width: int):
  """The model config of a case (width 1.0 as in the torch twin; VGG-16 without norm, ResNet-18 GroupNorm)."""
  cfg = config.base_config().model
  cfg.arch, cfg.variant, cfg.width, cfg.fc_width = arch, variant, 1.0, fc_width
  cfg.norm = "none" if arch == "vgg16" else "group"
  cfg.trunk_layers = 1
  return cfg


def forward_gflop(arch: str, variant: str, size: int, classes: int, fc_width: int) -> float:
  """Analytic forward GFLOP/image of the K=1 slave (params by shape only, nothing allocated)."""
  model = build_slave(slave_cfg(arch, variant, fc_width), classes, 1, policy=CPU_POLICY)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return flops_per_image(model, shapes, size) / 1e9


def torch_vgg16(size: int, classes: int, fc_width: int):
  """VGG-16 in torch.nn, as msnet builds it (module docstring)."""
  from torch import nn

  class VGG16(nn.Module):
    def __init__(self) -> None:
      super().__init__()
      layers: list[nn.Module] = []
      cin = 3
      for channels, n in BLOCKS:
        for _ in range(n):
          layers += [nn.Conv2d(cin, channels, 3, padding=1), nn.ReLU(inplace=True)]
          cin = channels
        layers.append(nn.MaxPool2d(2, 2))
      self.features = nn.Sequential(*layers)
      s = size // 32
      self.classifier = nn.Sequential(nn.Linear(512 * s * s, fc_width), nn.ReLU(inplace=True),
                                      nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True),
                                      nn.Linear(fc_width, classes))

    def forward(self, x):
      x = (x.float() / 255.0 - 0.5) / 0.25
      return self.classifier(self.features(x).flatten(1))

  return VGG16()


def torch_resnet18(size: int, classes: int, fc_width: int):
  """msnet's CIFAR pre-activation ResNet-18 (msnet/models/resnet.py) in torch.nn, GroupNorm with its groups."""
  from torch import nn

  def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(c), c, eps=resnet.EPSILON)

  class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
      super().__init__()
      self.norm1, self.norm2 = norm(cin), norm(cout)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
      pre = nn.functional.relu(self.norm1(x))
      short = x if self.shortcut is None else self.shortcut(pre)
      return self.conv2(nn.functional.relu(self.norm2(self.conv1(pre)))) + short

  class ResNet18(nn.Module):
    def __init__(self) -> None:
      super().__init__()
      self.stem = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      blocks, cin = [], 64
      for stage, (cout, n) in enumerate(zip(resnet.WIDTHS, resnet.DEPTHS["resnet18"][1])):
        for i in range(n):
          blocks.append(Block(cin, cout, 2 if stage > 0 and i == 0 else 1))
          cin = cout
      self.blocks = nn.Sequential(*blocks)
      self.fc_norm, self.fc = norm(cin), nn.Linear(cin, classes)

    def forward(self, x):
      x = self.blocks(self.stem((x.float() / 255.0 - 0.5) / 0.25))
      return self.fc(nn.functional.relu(self.fc_norm(x)).mean((2, 3)))

  return ResNet18()


TORCH_NETS = {"vgg16": torch_vgg16, "resnet18": torch_resnet18}


def torch_steps(arch: str, size: int, batch: int, classes: int, fc_width: int) -> tuple[Callable, Callable]:
  """(forward, train step) closures of the same network in PyTorch (no torchvision), warmed up."""
  import torch
  from torch import nn

  torch.manual_seed(0)
  model = TORCH_NETS[arch](size, classes, fc_width)
  rng = np.random.default_rng(0)  # the same images as the jax side, NCHW
  x = torch.from_numpy(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
  x = x.contiguous()
  y = torch.from_numpy(rng.integers(0, classes, batch)).long()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

  def forward():
    model.eval()
    with torch.inference_mode():
      return model(x)

  def train():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss

  return forward, train


def timed(fn: Callable, is_jax: bool) -> float:
  """Seconds of one call; a short sleep first so the other framework's spinning threads go idle."""
  time.sleep(0.05)
  t = time.perf_counter()
  out = fn()
  if is_jax:
    jax.block_until_ready(out)
  return time.perf_counter() - t


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="2 rounds, 224 forward only")
  ap.add_argument("--reps", type=int, help="interleaved rounds (default 9; 2 with --quick)")
  ap.add_argument("--reps224", type=int, help="rounds that include the 224 cases (default 3; 1 with --quick)")
  ap.add_argument("--no-train224", action="store_true", help="skip the 224 train step (slow: ~5 s a step)")
  ap.add_argument("--cases", default="vgg16,resnet18", help="comma-separated archs of CASES to run")
  ap.add_argument("--out", default=RESULTS)
  a = ap.parse_args()
  archs = a.cases.split(",")
  if unknown := sorted(set(archs) - {c[0] for c in CASES}):
    ap.error(f"--cases: {unknown} not among {sorted({c[0] for c in CASES})}")
  reps = a.reps or (2 if a.quick else 9)
  reps224 = min(reps, a.reps224 or (1 if a.quick else 3))
  train224 = not (a.no_train224 or a.quick)

  import torch
  torch.set_num_threads(TORCH_THREADS)
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; {reps} rounds ({reps224} with 224)",
        flush=True)

  mm_a = jnp.asarray(np.random.default_rng(1).normal(size=(MATMUL_N, MATMUL_N)), jnp.float32)
  mm_b = jnp.asarray(np.random.default_rng(2).normal(size=(MATMUL_N, MATMUL_N)), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(mm_a, mm_b))

  # (case key, mode) -> {"jax": fn, "torch": fn}; compiled / warmed before any timing.
  runs: dict[tuple[str, str], dict[str, Callable]] = {}
  meta: dict[str, dict] = {}
  for arch, variant, size, batch, classes, fc in CASES:
    if arch not in archs:
      continue
    key = f"{variant}{size}_bs{batch}" if arch == "vgg16" else f"{arch}_{variant}{size}_bs{batch}"
    t = time.perf_counter()
    if variant == "cifar":  # compiled and warmed there
      jfwd, jtrain = model_steps(1.0, batch, 1, CPU_POLICY, model_cfg=slave_cfg(arch, variant, fc))
    else:
      jfwd, jtrain = model_steps(1.0, batch, 1, CPU_POLICY, variant="imagenet", size=size, classes=classes,
                                 fc_width=fc, model_cfg=slave_cfg(arch, variant, fc))
      jax.block_until_ready(jfwd())
      if train224:
        jax.block_until_ready(jtrain())
    compile_s = time.perf_counter() - t
    tfwd, ttrain = torch_steps(arch, size, batch, classes, fc)
    tfwd()
    if variant == "cifar" or train224:
      ttrain()
    meta[key] = dict(arch=arch, variant=variant, image_size=size, batch=batch, classes=classes, fc_width=fc,
                     forward_gflop_per_image=forward_gflop(arch, variant, size, classes, fc),
                     jax_compile_and_warmup_s=compile_s)
    runs[(key, "forward")] = {"jax": jfwd, "torch": tfwd}
    if variant == "cifar" or train224:
      runs[(key, "train")] = {"jax": jtrain, "torch": ttrain}
    print(f"built {key} (jax compile+warm-up {compile_s:.1f} s)", flush=True)

  times: dict[str, list[float]] = {f"{k}/{m}/{fw}": [] for (k, m) in runs for fw in ("jax", "torch")}
  peak: list[float] = []
  for r in range(reps):
    best = min(timed(lambda: matmul(mm_a, mm_b), True) for _ in range(3))  # peak: best of 3 calls
    peak.append(2 * MATMUL_N ** 3 / best / 1e9)
    for (key, mode), fns in runs.items():
      if meta[key]["image_size"] != 32 and r >= reps224:
        continue
      order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")  # alternate who goes first
      for fw in order:
        times[f"{key}/{mode}/{fw}"].append(timed(fns[fw], fw == "jax"))
    print(f"round {r + 1}/{reps} done (matmul {peak[-1]:.0f} GFLOP/s)", flush=True)

  peak_gflops = statistics.median(peak)
  rows = []
  for (key, mode) in runs:
    m = meta[key]
    gflop = m["forward_gflop_per_image"] * (3 if mode == "train" else 1)
    row = dict(case=key, mode=mode, batch=m["batch"], image_size=m["image_size"], gflop_per_image=gflop)
    for fw in ("jax", "torch"):
      t = statistics.median(times[f"{key}/{mode}/{fw}"])
      row[f"{fw}_img_s"] = m["batch"] / t
      row[f"{fw}_gflop_s"] = m["batch"] * gflop / t
      row[f"{fw}_frac_peak"] = row[f"{fw}_gflop_s"] / peak_gflops
      row[f"{fw}_times_s"] = times[f"{key}/{mode}/{fw}"]
    row["ratio_jax_torch"] = row["jax_img_s"] / row["torch_img_s"]
    rows.append(row)

  print(f"\n# fp32 matmul peak (jax.jit {MATMUL_N}x{MATMUL_N}, best of 3 per round, median of {reps} rounds): "
        f"{peak_gflops:.0f} GFLOP/s (range {min(peak):.0f}-{max(peak):.0f})")
  print(f"{'case':<16}{'mode':<9}{'jax img/s':>10}{'torch img/s':>12}{'jax/torch':>10}"
        f"{'jax GF/s':>10}{'torch GF/s':>11}{'jax %pk':>8}{'torch %pk':>10}")
  for row in rows:
    print(f"{row['case']:<16}{row['mode']:<9}{row['jax_img_s']:>10.1f}{row['torch_img_s']:>12.1f}"
          f"{row['ratio_jax_torch']:>10.2f}{row['jax_gflop_s']:>10.0f}{row['torch_gflop_s']:>11.0f}"
          f"{100 * row['jax_frac_peak']:>7.0f}%{100 * row['torch_frac_peak']:>9.0f}%")

  write_results(a.out, dict(archs=archs, reps=reps, reps224=reps224, train224=train224, jax=jax.__version__,
                            torch=torch.__version__, torch_threads=TORCH_THREADS, cpus=os.cpu_count(),
                            machine=platform.processor() or platform.machine(), matmul_n=MATMUL_N,
                            matmul_gflop_s=peak, peak_gflop_s=peak_gflops, cases=meta, rows=rows,
                            time="median over rounds; img/s = batch / median seconds per call"))


if __name__ == "__main__":
  main()
