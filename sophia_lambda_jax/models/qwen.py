"""Qwen2 decoder-only language model in Flax NNX.

The architecture follows the reference Qwen2 implementation (Qwen2 technical report,
arXiv:2407.10671; HuggingFace `Qwen2ForCausalLM`):

    h_0   = E[ids]                                        token embedding
    a_l   = h_{l-1} + o_proj(Attn(rope(q), rope(k), v))   q, k, v = {q,k,v}_proj(rms(h_{l-1}))
    h_l   = a_l + down(silu(gate(rms(a_l))) * up(rms(a_l)))
    logits = rms(h_L) @ E^T        (tied; an untied `lm_head` is supported)

with RMSNorm rms(x) = x / sqrt(mean(x^2) + eps) * scale (eps 1e-6), rotary embeddings
(theta 1e6) applied to the two halves of each head (x1, x2) -> (x1 cos - x2 sin,
x2 cos + x1 sin), grouped-query attention (num_kv_heads key/value heads shared by
num_heads / num_kv_heads query heads each), biases on q/k/v only, and a SwiGLU MLP
without biases.

Parameter paths (`nnx.State.to_pure_dict`, joined with "/") are the ones `slj.labels`
parses:

    embed/embedding                       (vocab, hidden)
    layers/<i>/attn/{q,k,v}_proj/{kernel,bias}, layers/<i>/attn/o_proj/kernel
    layers/<i>/mlp/{gate,up,down}_proj/kernel
    layers/<i>/input_norm/scale, layers/<i>/post_attn_norm/scale
    final_norm/scale, lm_head/kernel (untied only)

With `scan_layers=True` the L blocks are one module created with `nnx.vmap` (its
parameters carry a leading axis of length L) and run by a scan over that axis (the
`nnx.split` / `nnx.merge` form of `nnx.scan`: one block is traced and compiled, whatever
L); the integer disappears from the path ("layers/attn/q_proj/kernel", shape
(L, hidden, heads*head_dim)). Both layouts hold the same numbers: stacking the unrolled
leaves along a new axis 0 gives the scanned ones. Kernels are stored (in, out), i.e.
transposed with respect to PyTorch's `nn.Linear.weight`.

Attention runs as cuDNN's fused kernel on GPUs (bfloat16, no packed documents) and
otherwise as query chunks under `jax.checkpoint`: either way its backward pass keeps q, k, v
and the output, never the (queries x keys) scores (`attention_kernel`, `causal_attention`).
`remat` wraps each block in `jax.checkpoint` ("full": keep only the block inputs;
"dots": also keep the weight-matmul outputs), trading recomputation for activation memory.

Parameters are float32; `compute_dtype="bfloat16"` casts them to bf16 at use (matmuls,
residual stream) while RMSNorm statistics, rotary angles, softmax and the logits stay in
float32.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = ("none", "full", "dots")
_ATTENTION = ("auto", "xla")
_INIT_STD = 0.02  # HuggingFace Qwen2 `initializer_range`.


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Shape and numerics of a Qwen2 model.

  Attributes:
    vocab_size: rows of the token embedding (and columns of the LM head).
    hidden_size: width of the residual stream.
    num_layers: number of transformer blocks L.
    num_heads: query heads per block.
    num_kv_heads: key/value heads (grouped-query attention); divides num_heads.
    head_dim: width of one head (even, for the half-split rotary embedding).
    intermediate_size: SwiGLU width.
    rope_theta: rotary base.
    rms_norm_eps: RMSNorm epsilon.
    tie_embeddings: LM head is the transposed embedding (no `lm_head` parameter).
    max_seq_len: longest sequence the model is meant for (checked by `sampler.generate`).
    compute_dtype: "float32" or "bfloat16"; parameters stay float32 either way.
    scan_layers: stack the blocks and run them with a scan (one compiled block, fast
      compiles of deep models) instead of unrolling them.
    remat: activation checkpointing of each block: "none"; "full" (recompute the whole
      block in the backward pass); "dots" (save the outputs of the weight matmuls, i.e.
      `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`, recompute the rest).
      Attention and the output layer recompute their scores and logits whatever it says.
    attention: the causal attention of training and evaluation: "auto" (cuDNN's fused
      kernel where it applies, `attention_kernel`; else "xla") or "xla" (query chunks on
      XLA ops, `causal_attention`: any backend, differentiable to any order, as Sophia-H's
      forward-over-reverse Hessian-vector products need).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = True
  max_seq_len: int = 2048
  compute_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "auto"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "intermediate_size", "max_seq_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"QwenConfig.{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"QwenConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads}) for grouped-query attention")
    if self.head_dim % 2:
      raise ValueError(f"QwenConfig.head_dim must be even for rotary embeddings, got "
                       f"{self.head_dim}")
    if not (np.isfinite(self.rope_theta) and self.rope_theta > 0):
      raise ValueError(f"QwenConfig.rope_theta must be a positive number, got "
                       f"{self.rope_theta!r}")
    if not (np.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
      raise ValueError(f"QwenConfig.rms_norm_eps must be a positive number, got "
                       f"{self.rms_norm_eps!r}")
    if self.compute_dtype not in _COMPUTE_DTYPES:
      raise ValueError(f"QwenConfig.compute_dtype must be one of {sorted(_COMPUTE_DTYPES)}, "
                       f"got {self.compute_dtype!r}")
    if self.remat not in _REMAT_POLICIES:
      raise ValueError(f"QwenConfig.remat must be one of {_REMAT_POLICIES}, got "
                       f"{self.remat!r}")
    if self.attention not in _ATTENTION:
      raise ValueError(f"QwenConfig.attention must be one of {_ATTENTION}, got "
                       f"{self.attention!r}")

  @property
  def dtype(self):
    """The jnp dtype of the computation."""
    return _COMPUTE_DTYPES[self.compute_dtype]


# qwen-134m follows the way the Qwen2 family scales: heads of 64, half as many KV heads as
# query heads, SwiGLU width 3 x hidden (8/3 x hidden rounded up to a multiple of 512), and
# the full 151,936-token vocabulary with tied embeddings. Its parameter count:
#   embedding        151,936 * 512                                   =  77,791,232
#   per block        q  512*512 + 512    = 262,656
#                    k  512*256 + 256    = 131,328
#                    v  512*256 + 256    = 131,328
#                    o  512*512          = 262,144
#                    gate/up/down 3*512*1536 = 2,359,296
#                    2 RMSNorm scales 2*512 = 1,024                   =   3,147,776
#   18 blocks        18 * 3,147,776                                  =  56,659,968
#   final RMSNorm                                                    =         512
#   total                                                            = 134,451,712
PRESETS: dict[str, QwenConfig] = {
    "qwen-tiny": QwenConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, intermediate_size=192,
                            max_seq_len=256),
    "qwen-cpu": QwenConfig(vocab_size=8192, hidden_size=128, num_layers=4, num_heads=4,
                           num_kv_heads=2, head_dim=32, intermediate_size=384,
                           max_seq_len=512),
    "qwen-134m": QwenConfig(vocab_size=151936, hidden_size=512, num_layers=18, num_heads=8,
                            num_kv_heads=4, head_dim=64, intermediate_size=1536,
                            max_seq_len=2048),
    # Qwen/Qwen2.5-0.5B config.json (494,032,768 parameters).
    "qwen2.5-0.5b": QwenConfig(vocab_size=151936, hidden_size=896, num_layers=24,
                               num_heads=14, num_kv_heads=2, head_dim=64,
                               intermediate_size=4864, rope_theta=1e6, rms_norm_eps=1e-6,
                               tie_embeddings=True, max_seq_len=32768),
}


def get_config(name: str, **overrides) -> QwenConfig:
  """The preset `name` with `overrides` applied (e.g. `compute_dtype="bfloat16"`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(QwenConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown QwenConfig field(s) {unknown} in overrides for {name!r}; "
                     f"expected some of {sorted(fields)}")
  return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (as the reference)."""

  def __init__(self, dim: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * self.scale[...].astype(self.dtype)


def _linear(din, dout, bias, config, rngs):
  return nnx.Linear(din, dout, use_bias=bias, dtype=config.dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.normal(_INIT_STD),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def rope_angles(positions, head_dim: int, theta: float):
  """cos, sin of positions * theta^(-2i/head_dim), i < head_dim/2; float32 (..., head_dim/2)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """Half-split rotation of x (batch, seq, heads, head_dim) by angles (batch, seq, d/2)."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def _attention(q, k, v, mask):
  """softmax(q k^T / sqrt(d) + mask) v with num_heads/num_kv_heads queries per KV head.

  q: (B, S, H, D); k, v: (B, T, K, D); mask: (B, S, T) bool, True = may attend.
  Returns (B, S, H*D). Scores and softmax are float32.

  The G = H/K query heads that share a KV head are laid out as one (G*S)-row matrix per
  (batch, KV head), so both products are plain batched matmuls with leading batch dims;
  XLA:CPU runs the equivalent 5-d einsum ("bskgd,btkd->bkgst") markedly slower
  (docs/decisions.md).
  """
  batch, seq, heads, dim = q.shape
  slots, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  q = q.reshape(batch, seq, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, groups * seq, dim)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, T, D)
  scores = jnp.einsum("bkqd,bktd->bkqt", q, k, preferred_element_type=jnp.float32)
  scores = scores.reshape(batch, kv_heads, groups, seq, slots) * (dim ** -0.5)
  # A finite fill keeps rows well defined; every row has its own token unmasked anyway.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  probs = probs.reshape(batch, kv_heads, groups * seq, slots)
  out = jnp.einsum("bkqt,bktd->bkqd", probs, v).reshape(batch, kv_heads, groups, seq, dim)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads * dim)


_CAUSAL_QUERY_CHUNKS = 4


def _grouped(x, kv_heads: int):
  """(B, S, H, D) -> (B, K, G*S, D): the G = H/K query heads of each KV head as one matrix."""
  batch, seq, heads, dim = x.shape
  groups = heads // kv_heads
  x = x.reshape(batch, seq, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
  return x.reshape(batch, kv_heads, groups * seq, dim)


def _ungrouped(x, seq: int):
  """(B, K, G*S, D) -> (B, S, K*G, D), the inverse of `_grouped`."""
  batch, kv_heads, rows, dim = x.shape
  x = x.reshape(batch, kv_heads, rows // seq, seq, dim).transpose(0, 3, 1, 2, 4)
  return x.reshape(batch, seq, -1, dim)


def _chunk_mask(segment_ids, start: int, end: int):
  """(B or 1, 1, 1, end - start, end) bool: query start + i may attend to key j."""
  mask = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, start:end, None] == segment_ids[:, None, :end])
  return mask[:, None, None]


def _after(x, previous):
  """x, made to depend on `previous`, so that XLA computes it only once `previous` exists.

  XLA:CPU runs work as early as its operands allow (independent attention chunks at once,
  each with its (queries x keys) temporaries; a backward pass's recomputation during the
  forward pass) and drops optimization barriers; it does not fold 0 * y for floats, so
  this data dependency holds (docs/decisions.md).
  """
  return x + (0.0 * previous.reshape(-1)[0]).astype(x.dtype)


def _chunks(seq: int) -> list[tuple[int, int]]:
  """[start, end) of the `_CAUSAL_QUERY_CHUNKS` equal query chunks of a sequence (one chunk
  if they do not divide it)."""
  count = _CAUSAL_QUERY_CHUNKS if seq % _CAUSAL_QUERY_CHUNKS == 0 else 1
  size = seq // count
  return [(i * size, (i + 1) * size) for i in range(count)]


def _causal_forward(q, k, v, segment_ids):
  """Output (B, S, H*D) and the logsumexp of every query's scores (B, S, H), float32."""
  batch, seq, heads, dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, D)
  outs, lses = [], []
  for start, end in _chunks(seq):
    qg = _grouped(q[:, start:end], kv_heads)
    if outs:
      qg = _after(qg, outs[-1])
    scores = jnp.einsum("bkqd,bktd->bkqt", qg, kg[:, :, :end],
                        preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, kv_heads, groups, end - start, end) * (dim ** -0.5)
    # A finite floor keeps rows well defined (every row has its own token unmasked anyway),
    # added rather than selected: XLA:CPU materialises a select's constant at full size.
    floor = jnp.where(_chunk_mask(segment_ids, start, end), 0.0, jnp.finfo(jnp.float32).min)
    scores = scores + floor
    top = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
    unnormalized = jnp.exp(scores - top)
    total = unnormalized.sum(-1, keepdims=True)
    probs = (unnormalized / total).astype(v.dtype).reshape(batch, kv_heads, -1, end)
    out = jnp.einsum("bkqt,bktd->bkqd", probs, vg[:, :, :end])
    outs.append(_ungrouped(out, end - start))
    lse = (top + jnp.log(total))[..., 0]  # (B, K, G, S')
    lses.append(lse.transpose(0, 3, 1, 2).reshape(batch, end - start, heads))
  def concat(xs):
    return jnp.concatenate(xs, axis=1) if len(xs) > 1 else xs[0]

  return concat(outs).reshape(batch, seq, heads * dim), concat(lses)


@jax.custom_vjp
def _causal_attention(q, k, v, segment_ids):
  return _causal_forward(q, k, v, segment_ids)[0]


def _causal_attention_fwd(q, k, v, segment_ids):
  out, lse = _causal_forward(q, k, v, segment_ids)
  return out, (q, k, v, segment_ids, out, lse)


def _causal_attention_bwd(residuals, dout):
  """FlashAttention's backward pass (Dao 2023, "FlashAttention-2", Algorithm 2) per query
  chunk, from q, k, v, the output O and the logsumexp: P = exp(S - lse), dV = P^T dO,
  dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d); each
  chunk against the keys up to its end, in the transposed layout (keys x queries).

  The recomputed S^T = K Q^T takes q through `_after(q, dO)`: XLA:CPU drops the barriers
  that keep a recomputation apart, merges identical expressions and runs work as early as
  its operands allow, so scores computed from q and k alone would be computed during the
  forward pass and held (docs/decisions.md). Each chunk also waits for the previous one.
  """
  q, k, v, segment_ids, out, lse = residuals
  batch, seq, heads, dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  scale = dim ** -0.5
  kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, D)
  dout = dout.reshape(batch, seq, heads, dim)
  out = out.reshape(batch, seq, heads, dim)
  lse = lse.reshape(batch, seq, kv_heads, groups).transpose(0, 2, 3, 1)  # (B, K, G, S)
  dq, dk, dv = [], jnp.zeros(kg.shape, jnp.float32), jnp.zeros(vg.shape, jnp.float32)
  for start, end in _chunks(seq):
    qg = _grouped(q[:, start:end], kv_heads)
    dog = _grouped(dout[:, start:end], kv_heads).astype(q.dtype)
    if dq:
      dog = _after(dog, dq[-1])
    k_end, v_end = kg[:, :, :end], vg[:, :, :end]
    scores_t = jnp.einsum("bktd,bkqd->bktq", k_end, _after(qg, dog),
                          preferred_element_type=jnp.float32)
    dprobs_t = jnp.einsum("bktd,bkqd->bktq", v_end, dog, preferred_element_type=jnp.float32)
    mask_t = jnp.swapaxes(_chunk_mask(segment_ids, start, end), -1, -2)
    mask_t = jnp.broadcast_to(mask_t, mask_t.shape[:2] + (groups, end, end - start))
    mask_t = mask_t.transpose(0, 1, 3, 2, 4).reshape(mask_t.shape[0], 1, end, -1)
    lse_g = lse[..., start:end].reshape(batch, kv_heads, -1)
    # The floor is added before the exponential, as in the forward pass: a future key's
    # score may exceed the row's logsumexp by more than float32's exp range, and exp(.) = inf
    # times a zero mask is NaN.
    floor_t = jnp.where(mask_t, 0.0, jnp.finfo(jnp.float32).min)
    probs_t = jnp.exp(scores_t * scale - lse_g[:, :, None, :] + floor_t)
    dv = dv.at[:, :, :end].add(jnp.einsum("bktq,bkqd->bktd", probs_t.astype(v.dtype), dog,
                                          preferred_element_type=jnp.float32))
    og = _grouped(out[:, start:end], kv_heads)
    rowsum = jnp.sum(dog.astype(jnp.float32) * og.astype(jnp.float32), -1)
    # dS^T without the 1/sqrt(d), applied to the (much smaller) dQ and dK instead.
    dscores_t = (probs_t * (dprobs_t - rowsum[:, :, None, :])).astype(q.dtype)
    dq.append(_ungrouped(jnp.einsum("bktq,bktd->bkqd", dscores_t, k_end,
                                    preferred_element_type=jnp.float32) * scale, end - start))
    dk = dk.at[:, :, :end].add(jnp.einsum("bktq,bkqd->bktd", dscores_t, qg,
                                          preferred_element_type=jnp.float32) * scale)
  dq = jnp.concatenate(dq, axis=1) if len(dq) > 1 else dq[0]
  return (dq.astype(q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype),
          dv.transpose(0, 2, 1, 3).astype(v.dtype), None)


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def causal_attention(q, k, v, segment_ids=None):
  """Causal self-attention (S = T) on XLA ops, whose backward pass keeps only q, k, v, the
  output and the logsumexp.

  Query chunk i of `_CAUSAL_QUERY_CHUNKS` only scores the keys up to its own end, the rest
  being masked anyway: 3/8 of the score matrix and its softmax are never computed
  (timings: docs/decisions.md). The backward pass (`_causal_attention_bwd`) recomputes
  each chunk's probabilities from its logsumexp, so no chunk's (queries x keys) scores
  outlive its own forward or backward computation. Its derivative is itself made of
  differentiable operations: forward-over-reverse (Hessian-vector products) goes through
  it. q: (B, S, H, D); k, v: (B, S, K, D); segment_ids: None or int (B, S) document ids.
  Returns (B, S, H*D).
  """
  return _causal_attention(q, k, v, segment_ids)


def cudnn_attention(q, k, v):
  """Causal self-attention by cuDNN's fused kernel (flash attention: its backward pass keeps
  q, k, v, the output and the softmax statistics). q: (B, S, H, D); k, v: (B, S, K, D) in
  bfloat16 or float16. Returns (B, S, H*D)."""
  out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  return out.reshape(q.shape[0], q.shape[1], -1)


def attention_kernel(attention: str, backend: str, dtype, head_dim: int,
                     segments: bool) -> str:
  """"cudnn" or "xla": the causal attention `QwenConfig.attention` picks for a backend, the
  compute dtype, the head width and whether rows hold packed documents (segment ids).

  cuDNN's kernel takes a GPU, bfloat16 or float16 operands, heads of at most 128 in
  multiples of 8, and no mask array: packed documents need one, so they use "xla". "auto"
  also requires the kernel to compile for the shapes at hand (`_cudnn_compiles`).
  """
  if (attention == "xla" or backend != "gpu" or segments
      or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      or head_dim % 8 or head_dim > 128):
    return "xla"
  return "cudnn"


@functools.lru_cache(maxsize=None)
def _cudnn_compiles(shape_q: tuple, shape_kv: tuple, dtype_name: str) -> bool:
  """Whether cuDNN's attention and its gradient compile for these shapes on this device;
  says why not on stderr, once per shape."""
  q = jax.ShapeDtypeStruct(shape_q, jnp.dtype(dtype_name))
  kv = jax.ShapeDtypeStruct(shape_kv, jnp.dtype(dtype_name))

  def loss(*a):
    return cudnn_attention(*a).astype(jnp.float32).sum()

  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
  except Exception as e:  # any failure of the kernel's lowering or compile
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"warning: cuDNN attention does not compile for q {shape_q} {dtype_name} "
          f"({message}); using the XLA attention", file=sys.stderr)
    return False
  return True


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings; q/k/v biased, o_proj not."""

  def __init__(self, config: QwenConfig, rngs: nnx.Rngs):
    hidden, dim = config.hidden_size, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (
        config.num_heads, config.num_kv_heads, dim)
    self.attention = config.attention
    self.q_proj = _linear(hidden, config.num_heads * dim, True, config, rngs)
    self.k_proj = _linear(hidden, config.num_kv_heads * dim, True, config, rngs)
    self.v_proj = _linear(hidden, config.num_kv_heads * dim, True, config, rngs)
    self.o_proj = _linear(config.num_heads * dim, hidden, False, config, rngs)

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    """x (B*S, hidden) -> (B*S, hidden); with `cache` = (k, v, index) also the new (k, v).

    Batch and sequence sizes come from the rotary angles cos, sin (B, S, head_dim/2).
    Without a cache the S tokens attend causally among themselves (within their documents
    when segment_ids (B, S) is given). With a cache, the new keys/values are written at
    slots [index, index + S) of the (B, T, K, D) buffers and query i attends to the slots
    up to index + i.
    """
    batch, seq, _ = cos.shape
    q = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_cache = None
    if cache is not None:
      k_cache, v_cache, index = cache
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      new_cache = (k, v)
      mask = jnp.arange(k.shape[1])[None, :] <= index + jnp.arange(seq)[:, None]
      out = _attention(q, k, v, jnp.broadcast_to(mask, (batch, seq, k.shape[1])))
    elif (attention_kernel(self.attention, jax.default_backend(), q.dtype, self.head_dim,
                           segment_ids is not None) == "cudnn"
          and _cudnn_compiles(q.shape, k.shape, jnp.dtype(q.dtype).name)):
      out = cudnn_attention(q, k, v)
    else:
      out = causal_attention(q, k, v, segment_ids)
    out = out.reshape(batch * seq, self.num_heads * self.head_dim)
    return self.o_proj(out), new_cache


@jax.custom_vjp
def _swiglu(gate, up):
  """silu(gate) * up, whose backward pass keeps only gate and up."""
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  # Not _swiglu itself: forward-over-reverse (Sophia-H) differentiates this function.
  return jax.nn.silu(gate) * up, (gate, up)


def _swiglu_bwd(residuals, dout):
  """d silu(g) / dg = s (1 + g (1 - s)), s = sigmoid(g), recomputed from g. Made to depend
  on dout (`_after`): two backward passes (a GNB refresh) would otherwise share it, and
  XLA:CPU then computes it once, early, and holds it for every layer."""
  gate, up = residuals
  gate = _after(gate, dout)
  sig = jax.nn.sigmoid(gate)
  dgate = dout * up * sig * (1 + gate * (1 - sig))
  return dgate.astype(gate.dtype), (dout * gate * sig).astype(up.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, config: QwenConfig, rngs: nnx.Rngs):
    hidden, inner = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(hidden, inner, False, config, rngs)
    self.up_proj = _linear(hidden, inner, False, config, rngs)
    self.down_proj = _linear(inner, hidden, False, config, rngs)

  def __call__(self, x):
    return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.)); x (B*S, hidden)."""

  def __init__(self, config: QwenConfig, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
    self.attn = Attention(config, rngs)
    self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
    self.mlp = MLP(config, rngs)

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    h, new_cache = self.attn(self.input_norm(x), cos, sin, segment_ids, cache)
    x = x + h
    return x + self.mlp(self.post_attn_norm(x)), new_cache


# ----------------------------------------------------------------------------- model


class KVCache(NamedTuple):
  """Keys/values of every layer, (L, B, T, num_kv_heads, head_dim), and slots filled."""

  k: jax.Array
  v: jax.Array
  index: jax.Array  # int32 scalar: the next free slot (= tokens seen so far)


def init_cache(config: QwenConfig, batch_size: int, max_len: int) -> KVCache:
  """An empty cache for `batch_size` sequences of at most `max_len` tokens."""
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
  zeros = jnp.zeros(shape, config.dtype)
  return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


def _stacked_blocks(config: QwenConfig, rngs: nnx.Rngs) -> Block:
  """L blocks as one Block whose parameters have a leading axis of length L."""

  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return Block(config, rngs)

  return make(rngs)


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  saveable = (None if policy == "full"
              else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return jax.checkpoint(fn, policy=saveable, prevent_cse=False)


def _block_fn(graphdef):
  """Pure (state, x, cos, sin, segment_ids, cache) -> (x, cache) for one block."""

  def run(state, x, cos, sin, segment_ids, cache):
    return nnx.merge(graphdef, state)(x, cos, sin, segment_ids, cache)

  return run


def segment_positions(segment_ids):
  """Positions restarting at 0 at every change of segment id along the last axis."""
  seq = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[..., :1], bool),
       segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


class Qwen(nnx.Module):
  """Qwen2 causal language model (see the module docstring for the equations)."""

  def __init__(self, config: QwenConfig, rngs: nnx.Rngs | None = None):
    if not isinstance(config, QwenConfig):
      raise ValueError(f"config must be a QwenConfig, got {type(config).__name__}")
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                           param_dtype=jnp.float32,
                           embedding_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)
    if config.scan_layers:
      self.layers = _stacked_blocks(config, rngs)
    else:
      self.layers = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
    if not config.tie_embeddings:
      self.lm_head = _linear(config.hidden_size, config.vocab_size, False, config, rngs)

  def __call__(self, input_ids, positions=None, segment_ids=None):
    """Logits (batch, seq, vocab) float32 of int tokens (batch, seq).

    Args:
      input_ids: int (batch, seq).
      positions: int (batch, seq) rotary positions; default 0..seq-1, or restarting at 0
        at the start of every document when `segment_ids` is given.
      segment_ids: int (batch, seq) document ids of packed rows: a token attends only to
        earlier tokens with the same id (documents are contiguous runs of one id).
    """
    hidden, head = self.features(input_ids, positions, segment_ids)
    batch, seq, width = hidden.shape
    logits = jnp.dot(hidden.reshape(batch * seq, width), head,
                     preferred_element_type=jnp.float32)
    return logits.reshape(batch, seq, -1)

  def features(self, input_ids, positions=None, segment_ids=None):
    """(hidden, head) with `__call__(...) == dot(hidden, head)` accumulated in float32.

    hidden: the final-normed hidden states (batch, seq, hidden_size); head: the output
    matrix (hidden_size, vocab), the embedding's transpose when tied; both in the compute
    dtype. A train step that differentiates the head product itself uses this form (see
    `train.step`: its GNB gradient then needs no second pass through the head). Arguments
    as for `__call__`.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must have shape (batch, seq), got {input_ids.shape}")
    batch, seq = input_ids.shape
    if segment_ids is None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    else:
      segment_ids = jnp.asarray(segment_ids)
      if segment_ids.shape != input_ids.shape:
        raise ValueError(f"segment_ids shape {segment_ids.shape} must equal input_ids "
                         f"shape {input_ids.shape}")
      if positions is None:
        positions = segment_positions(segment_ids)
    positions = jnp.asarray(positions)
    if positions.shape != input_ids.shape:
      raise ValueError(f"positions shape {positions.shape} must equal input_ids shape "
                       f"{input_ids.shape}")
    hidden, _ = self._hidden(input_ids, positions, segment_ids, None)
    return hidden.reshape(batch, seq, -1), self._head()

  def decode(self, input_ids, cache: KVCache):
    """Runs `input_ids` (batch, s) as the next s tokens after those in `cache`.

    Returns (logits (batch, s, vocab) float32, updated cache). Token i sits at position
    cache.index + i and attends to every cached token and to new tokens up to itself.
    """
    input_ids = jnp.asarray(input_ids)
    batch, seq = input_ids.shape
    query_pos = cache.index + jnp.arange(seq, dtype=jnp.int32)
    positions = jnp.broadcast_to(query_pos, (batch, seq))
    hidden, (k, v) = self._hidden(input_ids, positions, None, cache)
    logits = jnp.dot(hidden, self._head(), preferred_element_type=jnp.float32)
    return logits.reshape(batch, seq, -1), KVCache(k, v, cache.index + seq)

  def _head(self):
    if self.config.tie_embeddings:
      return self.embed.embedding[...].astype(self.config.dtype).T
    return self.lm_head.kernel[...].astype(self.config.dtype)

  def _hidden(self, input_ids, positions, segment_ids, cache):
    """Final-normed hidden states (batch * seq, hidden) and the new (k, v) when cached."""
    config = self.config
    # The residual stream is kept as (batch*seq, hidden): XLA:CPU runs the weight matmuls
    # and their fusions faster on 2-d operands than on (batch, seq, hidden) ones.
    x = jnp.take(self.embed.embedding[...], input_ids.reshape(-1), axis=0)
    x = x.astype(config.dtype)
    cos, sin = rope_angles(positions, config.head_dim, config.rope_theta)
    new_k, new_v = None, None
    if config.scan_layers:
      graphdef, state = nnx.split(self.layers)
      block = _remat(_block_fn(graphdef), config.remat)
      if cache is None:
        def body(x, layer_state):
          return block(layer_state, x, cos, sin, segment_ids, None)[0], None
        x, _ = jax.lax.scan(body, x, state)
      else:
        def body(x, layer):
          layer_state, k, v = layer
          x, kv = block(layer_state, x, cos, sin, None, (k, v, cache.index))
          return x, kv
        x, (new_k, new_v) = jax.lax.scan(body, x, (state, cache.k, cache.v))
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.index)
        if config.remat == "none":
          x, kv = layer(x, cos, sin, segment_ids, layer_cache)
        else:
          graphdef, state = nnx.split(layer)
          x, kv = _remat(_block_fn(graphdef), config.remat)(
              state, x, cos, sin, segment_ids, layer_cache)
        if kv is not None:
          ks.append(kv[0])
          vs.append(kv[1])
      if cache is not None:
        new_k, new_v = jnp.stack(ks), jnp.stack(vs)
    return self.final_norm(x), (new_k, new_v)


# ----------------------------------------------------------------------------- functional


def split_params(model: Qwen):
  """(graphdef_and_rest, params): params a pure nested dict of arrays (integer layer keys).

  `apply(graphdef_and_rest, params, ids)` is then a pure function of params, the form a
  train step differentiates, shards and checkpoints.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # The model keeps nothing but parameters, so `rest` is normally empty; None then keeps
  # graphdef_and_rest hashable (usable as a static jit argument) and leafless.
  rest = rest if jax.tree.leaves(rest) else None
  return (graphdef, rest), nnx.to_pure_dict(params)


def _merge(graphdef_and_rest, params) -> Qwen:
  graphdef, rest = graphdef_and_rest
  return nnx.merge(graphdef, params) if rest is None else nnx.merge(graphdef, params, rest)


def apply(graphdef_and_rest, params, input_ids, positions=None, segment_ids=None):
  """Logits of the model rebuilt from `split_params` output with parameters `params`."""
  return _merge(graphdef_and_rest, params)(input_ids, positions=positions,
                                           segment_ids=segment_ids)


def features(graphdef_and_rest, params, input_ids, positions=None, segment_ids=None):
  """`Qwen.features` (hidden, head) of the model rebuilt from `split_params` output."""
  return _merge(graphdef_and_rest, params).features(input_ids, positions=positions,
                                                    segment_ids=segment_ids)


def abstract_params(config: QwenConfig) -> dict:
  """Pure dict of jax.ShapeDtypeStruct with the model's parameter tree (no allocation)."""
  model = nnx.eval_shape(lambda: Qwen(config, nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def count_params(config: QwenConfig | str) -> int:
  """Number of parameters, from shapes only (`jax.eval_shape`)."""
  if isinstance(config, str):
    config = get_config(config)
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config))))


# Logical axes of each parameter by (module, parameter) name; the training script maps
# these names onto mesh axes ("embed" -> fsdp, say).
_LOGICAL_AXES = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv"),
    ("k_proj", "bias"): ("kv",),
    ("v_proj", "kernel"): ("embed", "kv"),
    ("v_proj", "bias"): ("kv",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("input_norm", "scale"): ("embed",),
    ("post_attn_norm", "scale"): ("embed",),
    ("final_norm", "scale"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
}


def logical_axes(config: QwenConfig) -> dict:
  """Pure dict like the params; each leaf a tuple of logical axis names, one per dim.

  Names: "vocab", "embed", "mlp", "heads" (query heads x head_dim), "kv" (KV heads x
  head_dim), "layers" (the stacking axis of scanned layers), or None.
  """

  def axes(path, leaf):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    names = _LOGICAL_AXES[(keys[-2], keys[-1])]
    if config.scan_layers and keys[0] == "layers":
      names = ("layers",) + names
    assert len(names) == len(leaf.shape), (keys, names, leaf.shape)
    return names

  return jax.tree_util.tree_map_with_path(axes, abstract_params(config))


