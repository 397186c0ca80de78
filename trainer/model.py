"""Gemma2, exactly as transformers' Gemma2ForCausalLM computes it, for packed rows of documents.

Per layer: RMSNorm in float32 scaled by (1 + w); attention with grouped KV heads, RoPE, scores scaled by
query_pre_attn_scalar^-0.5 and soft-capped by cap·tanh(s/cap), a sliding window on even layers and global
attention on odd ones; post-attention RMSNorm; pre/post feed-forward RMSNorm around a GeGLU MLP (tanh GELU);
embeddings scaled by sqrt(hidden) cast to the compute dtype; tied LM head; final logits soft-capped.

Parameter names are Hugging Face's without the leading "model." (see trainer/hf.py). Nothing distributed,
no optimizer and no data code lives here: trainer/parallelize.py checkpoints, compiles and shards a built
model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.linear_cross_entropy import linear_cross_entropy
from trainer import attention as attn


@dataclass
class Gemma2Config:
    vocab_size: int = 256_000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_layers: int = 26
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: int = 256
    sliding_window: int = 4096
    attn_softcap: float | None = 50.0
    final_softcap: float | None = 30.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 8192
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "sliding_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @staticmethod
    def is_sliding(layer: int) -> bool:
        """Gemma2 alternates: a sliding-window layer first (0, 2, 4, ...), then a global one."""
        return layer % 2 == 0

    @classmethod
    def preset(cls, name: str, **overrides) -> "Gemma2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_parameters(self) -> int:
        """Parameter count (the LM head is tied to the embedding, so it adds nothing)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 4 * h
        return self.vocab_size * h + self.num_layers * per_layer + h


PRESETS: dict[str, Gemma2Config] = {
    # Published shapes (google/gemma-2-{2b,9b,27b} config.json).
    "gemma2-2b": Gemma2Config(),
    "gemma2-9b": Gemma2Config(hidden_size=3584, intermediate_size=14336, num_layers=42, num_heads=16,
                              num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gemma2-27b": Gemma2Config(hidden_size=4608, intermediate_size=36864, num_layers=46, num_heads=32,
                               num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    # Test presets: every Gemma2 feature (GQA, windows shorter than a row, both soft-caps,
    # query_pre_attn_scalar != head_dim) at sizes that train on a CPU in seconds.
    "tiny": Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=32,
                         max_position_embeddings=1024),
    "small": Gemma2Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=6, num_heads=4,
                          num_kv_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=128,
                          max_position_embeddings=2048),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics even under bfloat16 compute (float64 stays float64); (1 + w) applied before the cast
        # back, as Gemma does.
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.to(dtype))).type_as(x)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [B, S, 1, head_dim], computed in float32 and cast to the compute dtype (as transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.int64).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: Gemma2Config, *, sliding: bool) -> None:
        super().__init__()
        self.config = config
        self.sliding = sliding
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], masks: attn.AttentionMasks,
                kv_cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        B, S, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(B, S, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(B, S, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(B, S, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # [B, T, Hkv, D]: everything cached so far plus this chunk
        out = attn.attend(q, k, v, masks, sliding=self.sliding, scale=c.query_pre_attn_scalar ** -0.5,
                          softcap=c.attn_softcap)  # [B, S, H, D]
        return self.o_proj(out.reshape(B, S, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Gemma2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.sliding = config.is_sliding(layer)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config, sliding=self.sliding)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x, rope, masks, kv_cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, masks, kv_cache,
                                                             self.layer))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2(nn.Module):
    def __init__(self, config: Gemma2Config, *, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        # padding_idx as transformers: lookups of the pad token send no gradient to its row.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @torch.no_grad()
    def init_weights(self, *, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation (for a model built on the meta device and then `to_empty`)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.zero_()

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                      kv_cache: "KVCache | None" = None) -> torch.Tensor:
        """Final-normed hidden states [B, S, hidden] (the LM head's input)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if kv_cache is not None:
            if position_ids is None:
                position_ids = kv_cache.position_ids(S)
            masks = kv_cache.masks(position_ids, sliding_window=self.config.sliding_window)
        else:
            if position_ids is None:
                position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
            masks = attn.build_masks(position_ids, backend=self.attention_backend,
                                     sliding_window=self.config.sliding_window)
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} differs from input_ids shape "
                             f"{tuple(input_ids.shape)}; give one position per token")
        x = self.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the compute dtype, as transformers does; a 0-dim CPU tensor enters a CUDA kernel
        # as a scalar argument (no host-to-device copy, no sync), and compiled code folds it into a constant.
        x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)
        rope = rope_cos_sin(self._rope_positions(position_ids, kv_cache), self.config.head_dim,
                            self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, masks, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(S)
        return self.norm(x)

    @staticmethod
    def _rope_positions(position_ids: torch.Tensor, kv_cache) -> torch.Tensor:
        # A row that continues a long document starts at a large position. Attention only sees relative offsets
        # within a segment, so shifting that first segment to start at 0 changes nothing mathematically and keeps
        # the float32 RoPE angles as precise as in a fresh document.
        if kv_cache is not None:
            return position_ids
        first_segment = attn.document_ids(position_ids) == 0
        return position_ids - torch.where(first_segment, position_ids[:, :1], 0)

    def lm_head(self, hidden: torch.Tensor, *, labels: torch.Tensor | None = None,
                logits_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tied LM head and the final soft-cap on final hidden states [..., hidden]: the only place they live.

        Without `labels`: logits [..., vocab], soft-capped in `logits_dtype` when given (scoring and generation
        ask for float32: a 256k vocabulary in bfloat16 loses ~3 significant digits of log-probability), else in
        the matmul's dtype. With `labels` [...] (-100 = not scored): the float32 SUM of the token losses, in row
        chunks so that the logits never exist (kernels/linear_cross_entropy.py).

        Under FSDP2 the tied embedding must be unsharded here: call it from `forward`, or right after
        `hidden_states` registered as an FSDP forward method (the root group stays gathered until backward).
        """
        weight = self.embed_tokens.weight
        cap = self.config.final_softcap
        if labels is not None:
            return linear_cross_entropy(hidden, weight, labels, softcap=cap)
        logits = F.linear(hidden, weight)
        if logits_dtype is not None:
            logits = logits.to(logits_dtype)
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        """Logits [B, S, vocab] after the final soft-cap; with `labels`, the summed cross entropy instead.

        `position_ids` [B, S]: each restart at 0 begins a new document and attention stays inside documents.
        Without it every row is one document. With `kv_cache`, `input_ids` continue the cached rows.
        `labels` [B, S] (already shifted; -100 = not scored): returns the float32 SUM of token losses, computed in
        row chunks so that the [B, S, vocab] logits never exist (kernels/linear_cross_entropy.py). It runs inside
        forward so that, under FSDP, the tied embedding is still unsharded when the head uses it.
        """
        return self.lm_head(self.hidden_states(input_ids, position_ids, kv_cache=kv_cache), labels=labels)


class KVCache:
    """Keys and values of every layer for incremental decoding of B rows (one document per row).

    Rows of different prompt lengths are left-padded: `pad_lengths[b]` leading slots of row b are padding that no
    query attends to, and positions in row b count from its first real token.
    """

    def __init__(self, config: Gemma2Config, *, batch_size: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str, pad_lengths: torch.Tensor | None = None) -> None:
        shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.max_length = max_length
        self.length = 0
        self.pad_lengths = (torch.zeros(batch_size, dtype=torch.long, device=device) if pad_lengths is None
                            else pad_lengths.to(device=device, dtype=torch.long))

    def position_ids(self, new_tokens: int) -> torch.Tensor:
        index = torch.arange(self.length, self.length + new_tokens, device=self.pad_lengths.device)
        return (index[None, :] - self.pad_lengths[:, None]).clamp(min=0)

    def masks(self, position_ids: torch.Tensor, *, sliding_window: int) -> attn.AttentionMasks:
        new = position_ids.shape[1]
        if self.length + new > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {self.length} used, {new} more requested")
        device = self.pad_lengths.device
        key_index = torch.arange(self.length + new, device=device)
        query_index = torch.arange(self.length, self.length + new, device=device)
        # Padding slots form their own "document" so that their (unused) queries still see one key.
        key_doc = torch.where(key_index[None, :] >= self.pad_lengths[:, None], 0, -1)
        query_doc = torch.where(query_index[None, :] >= self.pad_lengths[:, None], 0, -1)
        return attn.eager_masks(query_doc, key_doc, query_index, key_index, sliding_window=sliding_window)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


def __getattr__(name: str):
    # load_pretrained / save_pretrained live in trainer/hf.py (which imports this module); re-exported lazily so
    # `from trainer.model import load_pretrained` works without a circular import.
    if name in ("load_pretrained", "save_pretrained"):
        from trainer import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
