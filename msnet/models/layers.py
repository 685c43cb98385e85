"""Convolution and pooling that are fast on XLA:CPU without changing the math, and the small layers the nets share.

Four things make the CPU fast (each measured in benchmarks/bench_models.py and bench_ablation.py):
- `compiler_options()`: every jit that runs a model compiles its convolutions with Eigen instead of
  YNNPACK (XLA:CPU's default in jaxlib 0.10.2), 1.2-3.6x faster for VGG's 3x3 convs here.
- `conv2d`: XLA:CPU lowers a 3x3 convolution on 2x2 maps to a kernel that runs at ~3 GFLOP/s, ~100x slower
  than the same sum written as one matmul (see ../shared/reference/cpu-performance.md). `conv2d` picks,
  per layer and by the input's spatial size, one of a few formulations of the same stride-1 SAME
  convolution, with a hand-written backward pass (custom VJP) built from the same pieces. Everything else
  (strided, VALID, non-square) goes to `lax.conv_general_dilated`.
- `max_pool`: 2x2/2 pooling as a reshape + max whose gradient is one elementwise pass, instead of XLA:CPU's
  select-and-scatter (4-18x slower backward at VGG's sizes); the same values and gradients, ties included.
- `Conv`: the bias's gradient as a ones-vector dot instead of XLA:CPU's reduction over batch and pixels
  (9x slower at 128x32x32x64).

Formulations (all compute sum_{i,j,c} xpad[b, h+i, w+j, c] * k[i, j, c, d]):
  "xla":    lax.conv_general_dilated.
  "shift":  kh*kw shifted matmuls (einsum per tap), summed.
  "im2col": the kh*kw shifted views concatenated on channels, one [B*H*W, kh*kw*C] @ [kh*kw*C, D] matmul
            (for the kernel gradient: patches^T @ dy, accumulated over batch chunks by a scan).
The CPU policy (with Eigen convs; measured at 32x32 batch 128 and 224x224 batch 8): XLA for every pass,
except im2col for the forward and input gradient on maps <= 2x2. On other backends every conv and pool is
plain XLA. `shift` and the chunked im2col kernel gradient are tested alternatives that win only with
YNNPACK convs (the im2col gradient was the policy before Eigen); Winograd F(2x2,3x3) and F(4x4,3x3) were
measured too and lost to Eigen at every layer, so they are not kept.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_DN = ("NHWC", "HWIO", "NHWC")
IMPLS = ("xla", "shift", "im2col")


@dataclasses.dataclass(frozen=True)
class ConvPolicy:
  """Which formulation runs each pass of a stride-1 SAME conv, by input spatial size (max of H, W), and
  which max pool runs.

  `fwd`, `dx`, `dw` are tuples of (max_size, impl); a pass uses the first entry whose bound is >= the
  map size. `dw_rows`: the im2col kernel gradient runs over batch chunks of about this many output
  pixels (a scan), which keeps the patch matrix in cache. `block_pool`: 2x2/2 max pools by `_block_max`.
  `dot_bias_grad`: conv bias gradients by `_bias_add_dot_grad`. Chosen by measurement
  (benchmarks/bench_models.py, benchmarks/bench_ablation.py).
  """
  fwd: tuple[tuple[int, str], ...] = ((2, "im2col"), (1 << 30, "xla"))
  dx: tuple[tuple[int, str], ...] = ((2, "im2col"), (1 << 30, "xla"))
  dw: tuple[tuple[int, str], ...] = ((1 << 30, "xla"),)
  dw_rows: int = 2048
  block_pool: bool = True
  dot_bias_grad: bool = True

  def pick(self, table: tuple[tuple[int, str], ...], size: int) -> str:
    for bound, impl in table:
      if size <= bound:
        return impl
    return "xla"


CPU_POLICY = ConvPolicy()
XLA_POLICY = ConvPolicy(fwd=((1 << 30, "xla"),), dx=((1 << 30, "xla"),), dw=((1 << 30, "xla"),),
                        block_pool=False, dot_bias_grad=False)

# XLA:CPU (jaxlib 0.10.2) hands convolutions to YNNPACK by default. Eigen's convolutions, which XLA uses
# without it, are faster for every 3x3 conv of the CIFAR VGG-16 on the project CPU: 2.2x forward and 3.6x
# forward+backward at 32x32x64, 1.2-1.3x at 4x4-16x16 (benchmarks/bench_models.py, bench_ablation.py).
# Dots stay on YNNPACK. Passed per jit (`jax.jit(..., compiler_options=compiler_options())`), so nothing
# process-wide changes.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options() -> dict[str, str]:
  """XLA options for every jit that runs a model: Eigen convolutions on CPU; nothing on accelerators."""
  return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}


def default_policy() -> ConvPolicy:
  """The measured CPU policy on CPU; plain XLA convs on accelerators (whose conv kernels are fine)."""
  return CPU_POLICY if jax.default_backend() == "cpu" else XLA_POLICY


def _same_pads(kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)


def _taps(x: Array, kh: int, kw: int) -> list[Array]:
  """The kh*kw shifted views of SAME-padded x, in (i, j) row-major order (matches HWIO reshape)."""
  (pt, pb), (pl, pr) = _same_pads(kh, kw)
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  return [xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)]


def _fwd_impl(impl: str, x: Array, k: Array) -> Array:
  """Stride-1 SAME conv of x [B,H,W,C] with k [kh,kw,C,D] in formulation `impl`."""
  kh, kw, c, d = k.shape
  if impl == "xla":
    return lax.conv_general_dilated(x, k, (1, 1), _same_pads(kh, kw), dimension_numbers=_DN)
  taps = _taps(x, kh, kw)
  if impl == "shift":
    out = jnp.einsum("bhwc,cd->bhwd", taps[0], k[0, 0])
    for t, tap in enumerate(taps[1:], start=1):
      out = out + jnp.einsum("bhwc,cd->bhwd", tap, k[t // kw, t % kw])
    return out
  if impl == "im2col":
    return jnp.einsum("bhwp,pd->bhwd", jnp.concatenate(taps, axis=-1), k.reshape(kh * kw * c, d))
  raise ValueError(f"unknown conv impl {impl!r}; one of {IMPLS}")


def _dw_impl(impl: str, x: Array, dy: Array, kshape: tuple[int, ...], rows: int = 2048) -> Array:
  """Kernel gradient sum_{b,h,w} xpad[b,h+i,w+j,c] * dy[b,h,w,d] of a stride-1 SAME conv (`rows`: output
  pixels per chunk of the im2col scan)."""
  kh, kw, c, d = kshape
  if impl == "xla":
    _, vjp = jax.vjp(lambda k: _fwd_impl("xla", x, k), jnp.zeros(kshape, x.dtype))
    return vjp(dy)[0]
  if impl == "shift":
    taps = _taps(x, kh, kw)
    return jnp.stack([jnp.einsum("bhwc,bhwd->cd", t, dy) for t in taps]).reshape(kshape)
  if impl != "im2col":
    raise ValueError(f"unknown conv impl {impl!r}; one of {IMPLS}")
  b, h, w = x.shape[:3]
  per_chunk = min(b, max(1, -(-rows // (h * w))))
  while b % per_chunk:
    per_chunk += 1

  def chunk(acc: Array, xd: tuple[Array, Array]) -> tuple[Array, None]:
    xc, dyc = xd
    patches = jnp.concatenate(_taps(xc, kh, kw), axis=-1).reshape(-1, kh * kw * c)
    # float32 operands: exact for bf16 inputs, and XLA:CPU has no bf16 x bf16 -> f32 dot.
    return acc + jnp.matmul(patches.T.astype(jnp.float32), dyc.reshape(-1, d).astype(jnp.float32)), None

  acc = jnp.zeros((kh * kw * c, d), jnp.float32)
  if per_chunk == b:
    acc, _ = chunk(acc, (x, dy))
  else:
    g = b // per_chunk
    chunks = (x.reshape(g, per_chunk, *x.shape[1:]), dy.reshape(g, per_chunk, *dy.shape[1:]))
    acc, _ = lax.scan(chunk, acc, chunks)
  return acc.reshape(kshape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_same(x: Array, k: Array, impls: tuple[str, str, str, int]) -> Array:
  return _fwd_impl(impls[0], x, k)


def _conv_same_fwd(x, k, impls):
  return _fwd_impl(impls[0], x, k), (x, k)


def _conv_same_bwd(impls, res, dy):
  x, k = res
  _, dx_impl, dw_impl, rows = impls
  # The input gradient of a stride-1 SAME conv is the SAME conv of dy with the flipped, transposed kernel
  # (exact for odd kernels, whose padding is symmetric).
  k_t = jnp.flip(k, (0, 1)).swapaxes(2, 3)
  return _fwd_impl(dx_impl, dy, k_t), _dw_impl(dw_impl, x, dy, k.shape, rows)


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def conv2d(x: Array, kernel: Array, stride: int = 1, padding: str | int = "SAME",
           policy: ConvPolicy | None = None) -> Array:
  """NHWC x HWIO convolution; stride-1 SAME convs with odd square kernels take the policy's path.

  `padding` is "SAME", "VALID" or an int (symmetric zero padding, torch-style). `policy=None` uses
  `default_policy()`; `XLA_POLICY` is plain `lax.conv_general_dilated` (the reference in tests).
  """
  policy = policy or default_policy()
  kh, kw = kernel.shape[:2]
  pads: Any = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  square_odd = kh == kw and kh % 2 == 1
  same = padding == "SAME" or isinstance(padding, int) and 2 * padding == kh - 1
  if stride != 1 or not same or not square_odd:
    return lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=_DN)
  size = max(x.shape[1], x.shape[2])
  impls = (policy.pick(policy.fwd, size), policy.pick(policy.dx, size), policy.pick(policy.dw, size))
  if impls == ("xla", "xla", "xla"):
    return lax.conv_general_dilated(x, kernel, (1, 1), _same_pads(kh, kw), dimension_numbers=_DN)
  return _conv_same(x, kernel, (*impls, policy.dw_rows))


class Conv(nn.Module):
  """A conv layer with `kernel` [kh,kw,Cin,Cout] (HWIO, like nn.Conv) and `bias`, computed by `conv2d`."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str | int = "SAME"
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  use_bias: bool = True  # False for convs followed by a norm (ResNets), whose bias would be redundant

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    y = conv2d(x.astype(self.dtype), k.astype(self.dtype), self.stride, self.padding, self.policy)
    if not self.use_bias:
      return y
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    if (self.policy or default_policy()).dot_bias_grad:
      return _bias_add_dot_grad(y, b.astype(self.dtype))
    return y + b.astype(self.dtype)


@jax.custom_vjp
def _bias_add_dot_grad(y: Array, b: Array) -> Array:
  """y + b over the last axis; b's gradient is ones @ dy.reshape(-1, C), a dot with f32 accumulation.

  XLA:CPU lowers the plain gradient, dy summed over batch and pixels, to a windowed reduction that
  takes 32 ms at 128x32x32x64 against 3.6 ms as a dot (benchmarks/bench_models.py, "bias gradient"):
  about 95 ms of a CIFAR VGG-16 train step at batch 128.
  """
  return y + b


def _bias_add_dot_grad_fwd(y: Array, b: Array) -> tuple[Array, None]:
  return _bias_add_dot_grad(y, b), None


def _bias_add_dot_grad_bwd(_: None, dy: Array) -> tuple[Array, Array]:
  rows = dy.reshape(-1, dy.shape[-1])
  db = jnp.dot(jnp.ones((rows.shape[0],), dy.dtype), rows, preferred_element_type=jnp.float32)
  return dy, db.astype(dy.dtype)


_bias_add_dot_grad.defvjp(_bias_add_dot_grad_fwd, _bias_add_dot_grad_bwd)


def max_pool(x: Array, window: int, stride: int, padding: str = "VALID", policy: ConvPolicy | None = None) -> Array:
  """Max pooling; with `policy.block_pool`, non-overlapping VALID windows (VGG's 2x2/2) take `_block_max`
  (same values and gradients), everything else `nn.max_pool`."""
  policy = policy or default_policy()
  if policy.block_pool and window == stride and padding == "VALID":
    h, w = x.shape[1] // window * window, x.shape[2] // window * window
    return _block_max(x[:, :h, :w], window)
  return nn.max_pool(x, (window, window), (stride, stride), padding)


def _windows(x: Array, window: int) -> Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // window, window, w // window, window, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _block_max(x: Array, window: int) -> Array:
  """Max over non-overlapping windows as a reshape and a reduction. Its gradient goes to the first maximum
  of each window in row-major order, like XLA's select-and-scatter (the gradient of `nn.max_pool`), but as
  one elementwise pass: XLA:CPU's select-and-scatter is 4-18x slower at VGG's sizes, batch 128
  (benchmarks/bench_models.py, "max pool backward")."""
  return _windows(x, window).max(axis=(2, 4))


def _block_max_fwd(x: Array, window: int) -> tuple[Array, tuple[Array, Array]]:
  y = _block_max(x, window)
  return y, (x, y)


def _block_max_bwd(window: int, res: tuple[Array, Array], dy: Array) -> tuple[Array]:
  x, y = res
  xw = _windows(x, window)
  taken = jnp.zeros(y.shape, bool)
  parts = []
  for i in range(window):
    for j in range(window):
      first = (xw[:, :, i, :, j, :] == y) & ~taken
      taken = taken | first
      parts.append(jnp.where(first, dy, jnp.zeros_like(dy)))
  b, h2, w2, c = y.shape
  dx = jnp.stack(parts, axis=3).reshape(b, h2, w2, window, window, c)
  return (dx.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape),)


_block_max.defvjp(_block_max_fwd, _block_max_bwd)


def group_count(channels: int, max_groups: int = 32) -> int:
  """The largest divisor of `channels` that is <= max_groups (GroupNorm needs groups | channels)."""
  return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


_MEANS = {"caffe": (103.939, 116.779, 123.68), "torch": (0.485, 0.456, 0.406)}
_STDS = {"torch": (0.229, 0.224, 0.225)}


def normalize_input(x: Array, input_norm: str) -> Array:
  """uint8 (or 0-255 float) RGB [B,H,W,3] -> float32 network input.

  "standard": (x/255 - 0.5)/0.25; "caffe": RGB->BGR minus the BGR means on 0-255 (Keras'
  `vgg16.preprocess_input`, what the Keras weights expect); "torch": x/255, ImageNet mean/std (torchvision).
  """
  x = x.astype(jnp.float32)
  if input_norm == "standard":
    return (x / 255.0 - 0.5) / 0.25
  if input_norm == "caffe":
    return x[..., ::-1] - jnp.asarray(_MEANS["caffe"], jnp.float32)
  if input_norm == "torch":
    return (x / 255.0 - jnp.asarray(_MEANS["torch"], jnp.float32)) / jnp.asarray(_STDS["torch"], jnp.float32)
  raise ValueError(f"input_norm {input_norm!r} is not 'standard', 'caffe' or 'torch'")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One row of a network's layer table (VGG-16, AlexNet, the master, the ResNets)."""
  name: str
  kind: str                      # "conv", "pool" or "fc"; ResNets add msnet.models.resnet's row kinds
  features: int = 0              # conv / fc output width
  kernel: int = 1                # conv / pool window
  stride: int = 1
  padding: str | int = "SAME"    # conv: "SAME", "VALID" or int (torch-style); pools: VALID, or int (ResNet's)
  dropout_before: bool = False   # fc: dropout on its input while training
  relu: bool = True              # conv / fc: ReLU after (False for the classifier)


# Convs: torchvision's VGG/AlexNet init (Kaiming normal, fan_out), which trains a plain 13-conv VGG from
# scratch; ReLU FC layers He init, the classifier LeCun init (unit-scale logits at the start).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
HIDDEN_FC_INIT = nn.initializers.he_normal()
OUT_FC_INIT = nn.initializers.lecun_normal()


def apply_table(layers: tuple[LayerSpec, ...], x: Array, train: bool, *, norm: str = "none",
                norm_train: bool = False, dropout: float = 0.0, dtype: Any = jnp.float32,
                policy: ConvPolicy | None = None) -> Array:
  """Runs `layers` on x, creating each weight layer under its table name in the calling compact module.

  `norm_train` is unused (GroupNorm has no running statistics): the signature is the one every runner has.
  """
  del norm_train
  for spec in layers:
    if spec.kind == "conv":
      x = Conv(spec.features, spec.kernel, spec.stride, spec.padding, dtype=dtype, policy=policy,
               kernel_init=CONV_INIT, name=spec.name)(x)
      if norm == "group":
        x = nn.GroupNorm(num_groups=group_count(spec.features), dtype=dtype, name=f"{spec.name}_norm")(x)
      elif norm != "none":
        raise ValueError(f"norm {norm!r} is not 'none' or 'group'")
    elif spec.kind == "pool":
      x = max_pool(x, spec.kernel, spec.stride, policy=policy)
    elif spec.kind == "fc":
      x = x.reshape(x.shape[0], -1)  # NHWC flatten: (h, w, c) order, like Keras
      if spec.dropout_before and dropout > 0:
        x = nn.Dropout(dropout, deterministic=not train)(x)
      init = HIDDEN_FC_INIT if spec.relu else OUT_FC_INIT
      x = nn.Dense(spec.features, dtype=dtype, kernel_init=init, name=spec.name)(x)
    else:
      raise ValueError(f"layer {spec.name}: unknown kind {spec.kind!r}")
    if spec.kind != "pool" and spec.relu:
      x = nn.relu(x)
  return x


class Stack(nn.Module):
  """A slice of a layer table as one module (the slave's trunk, or one branch under nn.vmap), run by `run`:
  `apply_table` for VGG/AlexNet tables, the arch's own runner otherwise (msnet.models.registry)."""
  layers: tuple[LayerSpec, ...]
  norm: str = "none"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None
  run: Callable[..., Array] = apply_table

  @nn.compact
  def __call__(self, x: Array, train: bool = False, norm_train: bool = False) -> Array:
    """`train`: dropout on; `norm_train`: BatchNorm in training mode (batch statistics, running ones updated)."""
    return self.run(self.layers, x, train, norm=self.norm, norm_train=norm_train, dropout=self.dropout,
                    dtype=self.dtype, policy=self.policy)


def scaled(channels: int, width: float) -> int:
  """A conv width times the width multiplier, rounded, at least 8."""
  return max(8, int(round(channels * width)))
