"""Tiny random configs of every causal-LM class in the installed transformers.

`tiny_config(cls)` shrinks a class's default config to 2 layers, width 64, 4 heads, vocabulary
256, 4 experts (top-2) — by field name, so that one rule serves every architecture — and keeps
hybrids hybrid: a per-layer list (layer types, MLP types) keeps its first entry and the first
entry that differs from it. `OVERRIDES` fixes the few configs the generic rule cannot satisfy.
Used by `tools/architectures.py` (the support table) and `tests/test_architectures.py`.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import transformers

VOCAB = 256
LAYERS = 2
WIDTH = 64
HEADS = 4
HEAD_DIM = 16

# field name -> tiny value (only fields the config has are set)
SIZES = {
    # depth
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "decoder_layers": LAYERS, "encoder_layers": LAYERS, "num_decoder_layers": LAYERS, "num_encoder_layers": LAYERS,
    # width
    "hidden_size": WIDTH, "n_embd": WIDTH, "d_model": WIDTH, "emb_dim": WIDTH, "embed_dim": WIDTH,
    "embedding_size": WIDTH, "backbone_hidden_size": WIDTH, "attention_hidden_size": WIDTH,
    "intermediate_size": 2 * WIDTH, "ffn_dim": 2 * WIDTH, "decoder_ffn_dim": 2 * WIDTH,
    "encoder_ffn_dim": 2 * WIDTH, "n_inner": 2 * WIDTH, "ffn_hidden_size": 2 * WIDTH, "dff": 2 * WIDTH,
    "dim_ff": 2 * WIDTH, "prefix_dense_intermediate_size": 2 * WIDTH,
    # attention
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS, "n_heads": HEADS,
    "decoder_attention_heads": HEADS, "encoder_attention_heads": HEADS, "num_decoder_attention_heads": HEADS,
    "num_encoder_attention_heads": HEADS,
    "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM,
    "dim_head": HEAD_DIM, "swa_num_attention_heads": HEADS, "swa_num_key_value_heads": 2,
    "swa_head_dim": HEAD_DIM, "index_n_heads": 2, "index_head_dim": HEAD_DIM, "index_topk": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": HEAD_DIM,
    "linear_value_head_dim": HEAD_DIM, "linear_head_dim": HEAD_DIM, "linear_num_heads": HEADS,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": HEAD_DIM,
    "o_lora_rank": 16, "o_groups": 2,
    # positions and vocabulary
    "vocab_size": VOCAB, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128,
    "max_seq_len": 128, "original_max_position_embeddings": 128, "type_vocab_size": 2,
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "top_k_experts": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "num_dense_layers": 1, "decoder_sparse_step": 1, "moe_layer_start_index": 1,
    # state-space mixers
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 32,
    "mamba_n_groups": 1, "n_groups": 1, "mamba_chunk_size": 16, "chunk_size": 16, "time_step_rank": 8,
    "mamba_dt_rank": 8, "n_mamba_heads": 2, "mamba_d_ssm": 128,
    # periods of hybrid layouts: attention/expert every second layer
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
    "sliding_window_pattern": 2, "global_attn_every_n_layers": 2, "no_rope_layer_interval": 2,
    "layer_group_size": 2, "moe_layer_interval": 1,
}
# decoder-only use of encoder-style classes (BERT, RoBERTa, …)
FLAGS = {"is_decoder": True, "add_cross_attention": False}
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
                   "mask_token_id", "eod_token_id", "forced_eos_token_id", "image_token_id",
                   "bos_index", "eos_index", "pad_index", "unk_index", "mask_index")

# configs the generic rule cannot shrink consistently
OVERRIDES: dict[str, dict] = {
    "codegen": {"rotary_dim": 8},
    "gptj": {"rotary_dim": 8},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    "mamba2": {"head_dim": 32},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "zaya": {"num_experts_per_tok": 1},
    "Gemma4AssistantForCausalLM": {"hidden_size_per_layer_input": 0},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}, "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                  "indexer_compress_ratio": 2, "layer_types": ["linear_attention", "indexed_attention"],
                  "hc_lowrank": 8, "ngram_vocab_size_base": 512, "split_ngram_parts": 4, "heads_per_ngram": 2},
    "cohere_compass_text": {"layer_types": ["sliding_attention", "full_attention"],
                            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                "full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "gemma3n_text": {"num_kv_shared_layers": 0, "layer_types": ["sliding_attention", "full_attention"],
                     "laurel_rank": 8, "activation_sparsity_pattern": [0.0, 0.0]},
}


def config_fields(config_class) -> set[str]:
    try:
        names = {f.name for f in dataclasses.fields(config_class)}
    except TypeError:
        names = set(inspect.signature(config_class.__init__).parameters)
    return names | set(getattr(config_class, "attribute_map", {}) or {})


def _init_fields(config_class) -> list[str]:
    try:
        return [f.name for f in dataclasses.fields(config_class) if f.init]
    except TypeError:
        return list(inspect.signature(config_class.__init__).parameters)


def _layer_count(cfg) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers"):
        v = _attr(cfg, key)
        if isinstance(v, int):
            return v
    return None


def _two_layers(values: list) -> list:
    """The first entry and the first one that differs from it (a hybrid stays hybrid)."""
    first = values[0]
    other = next((v for v in values[1:] if v != first), values[1] if len(values) > 1 else first)
    return [first, other]


def _attr(cfg, key):
    """A config attribute, also where heterogeneous (per-layer) configs refuse a global read."""
    get = getattr(cfg, "_getattr_without_heterogeneous_validation", None)
    try:
        return get(key, None) if get is not None else getattr(cfg, key, None)
    except Exception:  # noqa: BLE001 - a property that cannot be computed on this config
        return None


def _per_layer(default) -> dict | None:
    """Two layers' overrides of a heterogeneous config, with sizes scaled like the global ones."""
    try:
        from transformers.integrations.heterogeneity.configuration_utils import _get_explicit_per_layer_overrides

        overrides = _get_explicit_per_layer_overrides(default)
    except Exception:  # noqa: BLE001 - not a heterogeneous config
        return None
    if not overrides:
        return None
    layers = [overrides[i] for i in sorted(overrides)]
    chosen = _two_layers(layers)
    first = chosen[0]
    out = {}
    for i, layer in enumerate(chosen):
        tiny = {}
        for key, value in layer.items():
            if key in SIZES and isinstance(value, int) and isinstance(first.get(key), int) and first[key]:
                ratio = value / first[key]
                tiny[key] = max(1, int(SIZES[key] * ratio))
            else:
                tiny[key] = value
        if "kv_lora_rank" in tiny and "num_key_value_heads" in tiny:  # latent attention
            tiny["num_key_value_heads"] = tiny.get("num_attention_heads", HEADS)
        out[i] = tiny
    return out


def tiny_config(cls):
    """A 2-layer, width-64 config for the model class `cls` (a `*ForCausalLM` / `*LMHeadModel`)."""
    return _tiny(cls.config_class, cls.__name__)


def _tiny(config_class, name: str = ""):
    fields = config_fields(config_class)
    default = config_class()
    layers = _layer_count(default)
    kw = {k: v for k, v in {**SIZES, **FLAGS}.items() if k in fields}
    for key in _init_fields(config_class):
        value = _attr(default, key)
        if (isinstance(value, (list, tuple)) and layers and layers > LAYERS and len(value) == layers
                and key not in kw):
            kw[key] = _two_layers(list(value))
    for key in TOKEN_ID_FIELDS:
        if key in fields:
            value = _attr(default, key)
            if isinstance(value, int) and value >= VOCAB - 4:
                kw[key] = {"pad": 0, "bos": 1, "eos": 2}.get(key.split("_")[0], 3)
            elif isinstance(value, list):
                kw[key] = [2]
    per_layer = _per_layer(default)
    if per_layer is not None:
        kw["per_layer_config"] = per_layer
    if "kv_lora_rank" in fields:  # latent attention: one key/value per query head
        kw["num_key_value_heads"] = HEADS
    for key in _init_fields(config_class):  # sub-configs (vision towers, patchers): tiny as well
        value = _attr(default, key)
        if isinstance(value, transformers.PreTrainedConfig) and key not in kw:
            try:
                kw[key] = _tiny(type(value))
            except Exception:  # noqa: BLE001 - keep the default sub-config
                pass
    kw.update(OVERRIDES.get(name, {}))
    kw.update(OVERRIDES.get(getattr(config_class, "model_type", ""), {}))
    return config_class(**kw)


def all_classes() -> list[str]:
    """Every `*ForCausalLM` and `*LMHeadModel` class transformers exports."""
    return sorted(n for n in dir(transformers)
                  if (n.endswith("ForCausalLM") or n.endswith("LMHeadModel")) and not n.startswith("Auto"))


def tiny_model(name: str, seed: int = 0, dtype=torch.float32):
    """A random-init tiny model of the class `name`, in eval mode."""
    cls = getattr(transformers, name)
    config = tiny_config(cls)
    torch.manual_seed(seed)
    model = cls(config).eval().to(dtype)
    return model


def tokens(model, batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = emb.num_embeddings if isinstance(emb, torch.nn.Embedding) else VOCAB
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(rows, VOCAB), (batch, length), generator=g)
