"""What a model's config says about its size, and how much memory is free: the one place both are read, for the
engine's batch sizes and the loader's fit check."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dimensions:
    """The sizes of a decoder-only transformer, from its config under any of the usual key names."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    experts: int
    expert_intermediate: int
    gated: bool
    tied: bool

    @property
    def parameters(self) -> int:
        """Embeddings + attention + MLPs (every expert and any dense MLP sized by the config), no weights loaded."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        per_mlp = (3 if self.gated else 2) * self.hidden
        mlp = per_mlp * (self.experts * self.expert_intermediate if self.experts else self.intermediate)
        return self.layers * (attn + mlp) + self.vocab * self.hidden * (1 if self.tied else 2)


def dimensions(config) -> Dimensions:
    """Read the sizes of the text model of `config`."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    first = lambda *keys, default=0: next((getattr(cfg, k) for k in keys if getattr(cfg, k, None)), default)
    hidden = first("hidden_size", "n_embd", "d_model", default=1024)
    heads = first("num_attention_heads", "n_head", default=1)
    inter = first("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    experts = first("num_local_experts", "num_experts", "n_routed_experts")
    return Dimensions(hidden=hidden, intermediate=inter, heads=heads, kv_heads=first("num_key_value_heads", default=heads),
                      head_dim=first("head_dim", default=hidden // max(heads, 1)),
                      layers=first("num_hidden_layers", "n_layer"), vocab=first("vocab_size"), experts=experts,
                      expert_intermediate=first("moe_intermediate_size", default=inter),
                      gated=hasattr(cfg, "intermediate_size"), tied=getattr(cfg, "tie_word_embeddings", True))


def free_bytes(device: torch.device) -> int:
    """Free memory on the device (system RAM for a CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available
