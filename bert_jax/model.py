"""The BERT encoder in Flax Linen: embeddings, post-LN Transformer layers and the pooler.

Shape letters: B batch, T query positions, S key positions, D hidden, N heads, H head dim, F
feed-forward width. Parameters are stored in `config.param_dtype`; matmuls run in
`config.compute_dtype` ("auto": bfloat16 on GPU/TPU, float32 on CPU); softmax and LayerNorm run
in float32. In bfloat16 on CPU the projections go through `cpu_bf16_matmul` (bfloat16 operands,
float32 results), the form XLA:CPU runs on the CPU's bfloat16 matrix units.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.config import BertConfig

Array = jax.Array


def dense_init(config: BertConfig) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=config.initializer_range)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed and returned in float32: (x - mean) / sqrt(var + eps)
  * scale + bias, parameters `scale` and `bias` (nn.LayerNorm's names). The variance is the mean
  of the centred squares (two passes; nn.LayerNorm's default, E[x^2] - E[x]^2, loses digits
  when the mean is large against the spread), and the normalised x is the one [B, T, D] tensor
  the backward pass keeps, where nn.LayerNorm materialises rsqrt(var) * scale broadcast to
  [B, T, D]: the fine-tuning step (L6-H384-A12, 32 x 64) 0.97x the time, median of 6
  alternating pairs (Intel Xeon, 2 cores)."""

  epsilon: float
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    scale = self.param("scale", nn.initializers.ones, x.shape[-1:], self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, x.shape[-1:], self.param_dtype)
    centered = x - x.mean(-1, keepdims=True)
    var = jnp.mean(centered * centered, -1, keepdims=True)
    normed = centered * jax.lax.rsqrt(var + self.epsilon)
    return normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def layer_norm(config: BertConfig, name: str) -> LayerNorm:
  return LayerNorm(config.layer_norm_eps, config.params_dtype, name=name)


def _own_copy(a: Array) -> Array:
  """a as a row-major array of its own. XLA gives a transpose the transposed layout and folds it
  into the dot that reads it; YNNPACK's bfloat16 kernels take row-major operands only, so that
  dot would fall back to Eigen in float32. A flat copy behind an optimization barrier cannot be
  folded away (but loses any sharding: one device only, see `_one_device`)."""
  return jax.lax.optimization_barrier(a.reshape(-1)).reshape(a.shape)


def _row_major_transpose(a: Array) -> Array:
  """a [..., M, N] -> [..., N, M], an `_own_copy` on one device. With several devices the copy
  would lose the batch sharding (XLA would gather it everywhere), so there XLA places the
  transpose itself."""
  t = jnp.swapaxes(a, -1, -2)
  return _own_copy(t) if _one_device() else t


def _one_device() -> bool:
  """Whether the step runs on one device, where a flattened copy keeps no sharding to lose."""
  return jax.device_count() == 1


def _dot_f32(a: Array, b: Array, b_axis: int) -> Array:
  """a's last axis contracted with b's axis `b_axis` (-1 or -2), leading axes batched; bfloat16
  operands, accumulated and returned in float32."""
  batch = tuple(range(a.ndim - 2))
  dims = (((a.ndim - 1,), (b.ndim + b_axis,)), (batch, batch))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _bf16_matmul(transpose_w: bool, x_dtype, w_dtype, x: Array, w: Array) -> Array:
  return _bf16_matmul_fwd(transpose_w, x_dtype, w_dtype, x, w)[0]


def _bf16_matmul_fwd(transpose_w, x_dtype, w_dtype, x, w):
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return _dot_f32(x16, w16, -1 if transpose_w else -2), (x16, w16)


def _bf16_matmul_bwd(transpose_w, x_dtype, w_dtype, residuals, g):
  x16, w16 = residuals
  g16 = g.astype(jnp.bfloat16)
  if transpose_w:  # y = x w^T, w [..., N, K]
    dx = _dot_f32(g16, w16, -2)
    dw = _dot_f32(_row_major_transpose(g16), x16, -2)
  else:  # y = x w, w [..., K, N]
    dx = _dot_f32(g16, w16, -1)
    dw = _dot_f32(_row_major_transpose(x16), g16, -2)
  return dx.astype(x_dtype), dw.astype(w_dtype)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def bf16_on_cpu(dtype: jnp.dtype) -> bool:
  """Whether the projections run through `cpu_bf16_matmul`: bfloat16 compute on CPU."""
  return jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"


def cpu_bf16_matmul(x: Array, w: Array, transpose_w: bool = False) -> Array:
  """x [..., K] times the 2-D w [K, N] (w [N, K] with `transpose_w`) -> [..., N] float32, for
  bfloat16 compute on CPU (`bf16_on_cpu`): bfloat16 operands, float32 accumulation and result,
  and a backward pass of the same form, with the one operand it must transpose materialised
  row-major. XLA:CPU hands exactly these dots to YNNPACK's bfloat16 kernels (AMX-BF16 where the
  CPU has it); a bfloat16 x bfloat16 -> bfloat16 dot, or one with a transposed operand, it runs
  upcast to float32 in Eigen, no faster than float32 itself. On the Intel Xeon (AMX-BF16,
  2 cores) a [4096, 1024] x [1024, 1024] forward and backward takes 24 ms this way against 92 ms
  in float32. The weight gradient accumulates and is returned in float32."""
  y = _bf16_matmul(transpose_w, x.dtype, w.dtype, x.reshape(-1, x.shape[-1]), w)
  return y.reshape(*x.shape[:-1], y.shape[-1])


def cpu_bf16_batched_matmul(x: Array, w: Array, transpose_w: bool = False) -> Array:
  """`cpu_bf16_matmul` for a batch of pairs: x [G, M, K] with w [G, K, N] (or [G, N, K]) -> [G,
  M, N] float32. Both operands must be row-major arrays of their own (see `_heads`)."""
  return _bf16_matmul(transpose_w, x.dtype, w.dtype, x, w)


class Dense(nn.Module):
  """x [..., K] @ kernel [K, features] + bias, in the compute dtype (nn.Dense's parameters and
  arithmetic), or through `cpu_bf16_matmul` in bfloat16 on CPU."""

  config: BertConfig
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    kernel = self.param("kernel", dense_init(cfg), (x.shape[-1], self.features),
                        cfg.params_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), cfg.params_dtype)
    dt = cfg.compute_dtype
    if bf16_on_cpu(dt):
      y = cpu_bf16_matmul(x, kernel)
    else:
      y = jax.lax.dot_general(x.astype(dt), kernel.astype(dt), (((x.ndim - 1,), (0,)), ((), ())))
    # The bias as [1, ..., F], as nn.Dense adds it: with a broadcast from [F] instead, XLA's SPMD
    # partitioner places a sharded bias's reductions inside the gradient accumulation loop.
    return y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))


def dense(config: BertConfig, features: int, name: str) -> Dense:
  return Dense(config, features, name=name)


def gelu(x: Array) -> Array:
  """BERT's GELU, the exact erf form (not the tanh approximation): x/2 (1 + erf(x / sqrt 2)), as
  the original BERT and torch write it. `jax.nn.gelu(approximate=False)` goes through erfc, which
  XLA:CPU expands into exp and range selects; erf is one rational polynomial."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


def hash32(h: Array) -> Array:
  """Chris Wellons's "lowbias32" integer hash, uint32 -> uint32: two multiply-xorshift rounds
  whose every output bit depends on every input bit (avalanche bias about 0.17%)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


class Dropout(nn.Module):
  """Inverted dropout from 16 random bits per element (two elements per 32-bit word), the drop
  probability rounded to a multiple of 2**-16 (0.1 -> 0.100006).

  The bits are a counter-based hash: two 32-bit seeds drawn from the module's `dropout` RNG key,
  then for row r (the leading axis) and word c of the row hash32(hash32(c + s0) ^ hash32(r + s1)),
  so no two rows or calls share a stream, a shard computes its own rows' bits, and the cost is a
  few integer ops per word: 0.5 ms against 3.8 ms for the same [32, 12, 64, 64] mask from
  `jax.random.bits` (threefry), which was 9% of a fine-tuning step (Intel Xeon, 2 cores)."""

  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    s = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
    rows = x.shape[0] if x.ndim > 1 else 1
    per_row = x.size // rows
    words = jax.lax.broadcasted_iota(jnp.uint32, (rows, (per_row + 1) // 2), 1)
    row_ids = jax.lax.broadcasted_iota(jnp.uint32, (rows, 1), 0)
    words = hash32(hash32(words + s[0]) ^ hash32(row_ids + s[1]))
    bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(rows, -1)[:, :per_row]
    keep = bits.reshape(x.shape) >= round(self.rate * 65536)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout -> [B, T, D] float32."""

  config: BertConfig

  def setup(self):
    cfg = self.config
    embed = lambda n, name: nn.Embed(  # noqa: E731
        n, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
        embedding_init=dense_init(cfg), name=name)
    self.word_embeddings = embed(cfg.vocab_size, "word_embeddings")
    self.position_embeddings = embed(cfg.max_position_embeddings, "position_embeddings")
    self.token_type_embeddings = embed(cfg.type_vocab_size, "token_type_embeddings")
    self.layer_norm = layer_norm(cfg, "layer_norm")
    self.dropout = Dropout(cfg.hidden_dropout)

  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool,
               position_ids: Array | None = None) -> Array:
    positions = (jnp.arange(input_ids.shape[-1])[None, :] if position_ids is None
                 else position_ids)
    x = (self.word_embeddings(input_ids).astype(jnp.float32)
         + self.position_embeddings(positions).astype(jnp.float32)
         + self.token_type_embeddings(token_type_ids).astype(jnp.float32))
    return self.dropout(self.layer_norm(x), deterministic=deterministic)

  def attend(self, x: Array) -> Array:
    """Projects [..., D] onto the word embeddings -> [..., vocab] (the tied MLM decoder)."""
    dt = self.config.compute_dtype
    if bf16_on_cpu(dt):
      return cpu_bf16_matmul(x, self.word_embeddings.embedding, transpose_w=True)
    return self.word_embeddings.attend(x.astype(dt))


class Einsum(nn.Module):
  """A projection written as a named einsum, with a bias: parameters `kernel`, `bias`."""

  config: BertConfig
  equation: str
  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    kernel = self.param("kernel", dense_init(cfg), self.kernel_shape, cfg.params_dtype)
    bias = self.param("bias", nn.initializers.zeros, self.bias_shape, cfg.params_dtype)
    dt = cfg.compute_dtype
    if not bf16_on_cpu(dt):
      return jnp.einsum(self.equation, x.astype(dt), kernel.astype(dt)) + bias.astype(dt)
    # The same contraction as one 2-D matmul: "BTD,DNH->BTNH" and "BTNH,NHD->BTD" contract
    # the kernel's leading axes (those the bias, shaped like the output features, lacks) with
    # x's trailing ones.
    n = len(self.kernel_shape) - len(self.bias_shape)
    lead = x.shape[:x.ndim - n]
    y = cpu_bf16_matmul(x.reshape(*lead, -1), kernel.reshape(math.prod(kernel.shape[:n]), -1))
    return y.reshape(*lead, *kernel.shape[n:]) + bias.astype(y.dtype)


def gather_positions(x: Array, positions: Array) -> Array:
  """x [B, T, ...], positions [B, P] int -> [B, P, ...]."""
  idx = positions.astype(jnp.int32).reshape(*positions.shape, *(1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _heads(a: Array) -> Array:
  """[B, T, N, H] -> [B N, T, H] bfloat16, an `_own_copy` (the batched dot's row-major operand)."""
  B, T, N, H = a.shape
  return _own_copy(jnp.transpose(a.astype(jnp.bfloat16), (0, 2, 1, 3))).reshape(B * N, T, H)


def _fused_attention(q: Array, k: Array, v: Array, mask: Array, scale: float,
                     implementation: str) -> Array:
  """jax.nn.dot_product_attention of q [B, T, N, H] over k, v [B, S, N, H] -> [B, T, N, H], with
  the mask in the forms cuDNN's kernel takes: a [B, S] mask as key lengths, a [B, T, S] one
  (packed rows) as a mask, which cuDNN turns into a bias. With a bias its training kernel wants
  T and S even, so an odd T gets one more query (a copy of the last, its output dropped) and an
  odd S one more key that no query sees. The sparse last layer's queries (1 + 20 in
  pretraining at 128, the [CLS]s of a packed row) are often odd in number."""
  if mask.ndim == 2:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation,
                                        key_value_seq_lengths=mask.sum(-1, dtype=jnp.int32))
  T, S = q.shape[1], k.shape[1]
  mask = mask.astype(bool)
  if T % 2:
    q = jnp.concatenate([q, q[:, -1:]], axis=1)
    mask = jnp.concatenate([mask, mask[:, -1:]], axis=1)
  if S % 2:
    k, v = (jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0))) for a in (k, v))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 1)))
  ctx = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask[:, None],
                                     implementation=implementation)
  return ctx[:, :T]


class SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention with padding masked out.

  Attributes of the call: x [B, S, D]; mask [B, S] (1 = real token, 0 = padding) or, for packed
  rows, [B, T, S] (True where query t may see key s); queries [B, T, D], the rows whose outputs
  are wanted (default x itself, T = S). Returns [B, T, D] in the compute dtype.
  With `config.attention == "dot_product"` a [B, T] mask must be real tokens first, then padding
  (as every batch of bert_jax.data is): the fused kernel takes the per-row count of real tokens
  as the key length.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               queries: Array | None = None) -> Array:
    cfg = self.config
    D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    x = x.astype(cfg.compute_dtype)
    xq = x if queries is None else queries.astype(cfg.compute_dtype)
    project = lambda a, n: Einsum(cfg, "BTD,DNH->BTNH", (D, N, H), (N, H), name=n)(a)  # noqa: E731
    q, k, v = project(xq, "query"), project(x, "key"), project(x, "value")
    # bfloat16 on one CPU: the batched dots as cpu_bf16_batched_matmul on [B N, T, H] copies.
    on_cpu = bf16_on_cpu(cfg.compute_dtype) and cfg.attention == "einsum" and _one_device()
    B, T, S = xq.shape[0], xq.shape[1], x.shape[1]
    pairs = mask.ndim == 3
    if cfg.attention == "dot_product":  # attention_dropout is 0 (BertConfig checks)
      ctx = _fused_attention(q, k, v, mask, H**-0.5, cfg.attention_implementation)
    else:
      if on_cpu:
        scores = cpu_bf16_batched_matmul(_heads(q), _heads(k), transpose_w=True)
        scores = scores.reshape(B, N, T, S) * H**-0.5
      else:
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k).astype(jnp.float32) * H**-0.5
      big_neg = jnp.finfo(jnp.float32).min
      visible = mask[:, None] if pairs else mask[:, None, None, :].astype(bool)
      scores = jnp.where(visible, scores, big_neg)
      probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # float32 under cpu_bf16_matmul
      probs = Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
      if on_cpu:
        ctx = cpu_bf16_batched_matmul(probs.reshape(B * N, T, S), _heads(v))
        ctx = jnp.transpose(ctx.reshape(B, N, T, H), (0, 2, 1, 3))
      else:
        ctx = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    return Einsum(cfg, "BTNH,NHD->BTD", (N, H, D), (D,), name="output")(ctx)


class FeedForward(nn.Module):
  """Dense(F) -> GELU -> Dense(D): [B, T, D] -> [B, T, D]."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    h = gelu(dense(cfg, cfg.intermediate_size, "intermediate")(x))
    return dense(cfg, cfg.hidden_size, "output")(h)


class EncoderLayer(nn.Module):
  """Post-LN Transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)). [B, T, D] float32.

  With positions [B, P] it computes the outputs at those positions only, [B, P, D]: keys and
  values from every position, queries, residuals and the feed-forward at the P."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               positions: Array | None = None) -> Array:
    cfg = self.config
    drop = Dropout(cfg.hidden_dropout)
    xq = None
    if positions is not None:
      xq = gather_positions(x, positions)
      mask = gather_positions(mask, positions) if mask.ndim == 3 else mask
    h = SelfAttention(cfg, name="attention")(x, mask, deterministic, xq)
    x = x if xq is None else xq
    x = layer_norm(cfg, "attention_layer_norm")(x + drop(h, deterministic=deterministic))
    h = FeedForward(cfg, name="ffn")(x)
    return layer_norm(cfg, "ffn_layer_norm")(x + drop(h, deterministic=deterministic))


LAYERS = "layers"  # the name of the scanned layer stack: params encoder/layers/..., [L, ...]


def _remat_layer(config: BertConfig) -> type[EncoderLayer]:
  """EncoderLayer rematerialised as `config.remat` says (REMAT_POLICIES in config.py)."""
  if config.remat == "none":
    return EncoderLayer
  policy = None if config.remat == "full" else getattr(jax.checkpoint_policies, config.remat)
  # scan itself keeps XLA from merging the recomputation into the forward pass.
  return nn.remat(EncoderLayer, static_argnums=(3,), policy=policy,
                  prevent_cse=not config.scan_layers)


def _scan_then_last(layer: EncoderLayer, stacked: dict, x: Array, mask: Array,
                    deterministic: bool, positions: Array, rng: Array | None) -> Array:
  """The scanned encoder with a sparse last layer: layers 0 ... L-2 in a scan over the stacked
  params [L, ...] (each step indexes its layer's slice, nothing is copied), then layer L-1 at
  `positions` only. Each layer's dropout key is one of `rng` split L ways."""
  num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  keys = None if rng is None else jax.random.split(rng, num_layers)

  def run(i, x, at=None):
    params = jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)
    rngs = {} if keys is None else {"dropout": keys[i]}
    return layer.apply({"params": params}, x, mask, deterministic, at, rngs=rngs)

  x, _ = jax.lax.scan(lambda x, i: (run(i, x), None), x, jnp.arange(num_layers - 1))
  return run(num_layers - 1, x, positions)


class Encoder(nn.Module):
  """`num_layers` EncoderLayers, unrolled (params `layer_0` ... `layer_{L-1}`) or scanned
  (params `layers`, each leaf with a leading [L] axis): [B, T, D] -> [B, T, D].

  With positions [B, P] it returns the output at those positions, [B, P, D]; with
  `config.sparse_last_layer` the last layer computes only them (nothing else reads it). Scanned,
  that runs as `_scan_then_last` on the stacked params that `nn.scan` created at init."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               positions: Array | None = None) -> Array:
    cfg = self.config
    layer_cls = _remat_layer(cfg)
    sparse = positions is not None and cfg.last_layer_runs_sparse
    if cfg.scan_layers and sparse and not self.is_initializing():
      rng = None if deterministic or cfg.hidden_dropout == cfg.attention_dropout == 0 else (
          self.make_rng("dropout"))
      return _scan_then_last(layer_cls(cfg), self.variables["params"][LAYERS], x, mask,
                             deterministic, positions, rng)
    if cfg.scan_layers:
      body = lambda layer, x, mask, deterministic: (layer(x, mask, deterministic), None)
      stack = nn.scan(body, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers)
      x, _ = stack(layer_cls(cfg, name=LAYERS), x, mask, deterministic)
      return x if positions is None else gather_positions(x, positions)
    for i in range(cfg.num_layers):
      last = sparse and i == cfg.num_layers - 1
      x = layer_cls(cfg, name=f"layer_{i}")(x, mask, deterministic, positions if last else None)
    return x if positions is None or sparse else gather_positions(x, positions)


class Pooler(nn.Module):
  """tanh(Dense(cls)): the [CLS] summary, the encoder output at [CLS] [..., D] -> [..., D]."""

  config: BertConfig

  @nn.compact
  def __call__(self, cls: Array) -> Array:
    return jnp.tanh(dense(self.config, self.config.hidden_size, "dense")(cls))


def packed_attention_mask(example_ids: Array) -> Array:
  """example_ids [B, T] (0 = padding, k = the row's k-th example) -> [B, T, S] bool: a query
  sees the keys of its own example only (block-diagonal). Padding sees padding, so that no row
  of the mask is empty (fused kernels may return NaN for a query that sees nothing)."""
  return example_ids[:, :, None] == example_ids[:, None, :]


class BertModel(nn.Module):
  """The BERT encoder with its pooler.

  Call with input_ids [B, T] int, token_type_ids [B, T] (default zeros), attention_mask [B, T]
  (1 = real, default all ones). Returns {"sequence_output": [B, T, D], "pooled_output": [B, D]},
  float32.

  Packed rows (bert_jax.packing) also pass position_ids [B, T] (restarting at each example) and
  cls_positions [B, K] (each example's [CLS]); attention_mask then numbers the examples of a row
  (0 = padding, 1..K), attention is block-diagonal, and pooled_output is [B, K, D].

  output_positions [B, P] (P may be 0) asks for the sequence output at those positions only:
  "sequence_output" is then [B, P, D], and with `config.sparse_last_layer` the last layer runs
  at them and the [CLS]s alone (the masked-LM head and the classifier read nothing else).
  """

  config: BertConfig

  def setup(self):
    self.embeddings = Embeddings(self.config)
    self.encoder = Encoder(self.config)
    self.pooler = Pooler(self.config)

  def __call__(self, input_ids: Array, token_type_ids: Array | None = None,
               attention_mask: Array | None = None, position_ids: Array | None = None,
               cls_positions: Array | None = None, output_positions: Array | None = None, *,
               deterministic: bool = True) -> dict[str, Array]:
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if cls_positions is not None:
      attention_mask = packed_attention_mask(attention_mask)
    x = self.embeddings(input_ids, token_type_ids, deterministic, position_ids)
    if output_positions is None:
      x = self.encoder(x, attention_mask, deterministic).astype(jnp.float32)
      at_cls = x[:, :1] if cls_positions is None else gather_positions(x, cls_positions)
    else:  # the [CLS]s first (position 0 of each row, or of each packed example)
      cls = (jnp.zeros((x.shape[0], 1), jnp.int32) if cls_positions is None
             else cls_positions.astype(jnp.int32))
      wanted = jnp.concatenate([cls, output_positions.astype(jnp.int32)], axis=1)
      y = self.encoder(x, attention_mask, deterministic, wanted).astype(jnp.float32)
      x, at_cls = y[:, cls.shape[1]:], y[:, :cls.shape[1]]
    pooled = self.pooler(at_cls).astype(jnp.float32)
    pooled = pooled[:, 0] if cls_positions is None else pooled
    return {"sequence_output": x, "pooled_output": pooled}

  def attend(self, x: Array) -> Array:
    return self.embeddings.attend(x)


Decoder = Callable[[Array], Array]
