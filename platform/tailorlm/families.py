"""The tiny factory's model families, and what each needs to train and serve.

One record per family: its transformers classes, how a `TinyModelSpec` becomes its config, and
the config keys vLLM needs that transformers does not write. Dense families are Llama and Qwen2;
the Mixture-of-Experts ones are the DeepSeek family (MLA attention, routed + shared experts),
Qwen2-MoE, Qwen3-MoE and Mixtral. The rest of the code asks this table, never a family's name.
No torch here: config parsing imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# vLLM's CPU MLA backend supports one latent size, 576 = kv_lora_rank 512 + qk_rope_head_dim 64
# ("Head dimension 96 is not supported by MLA"); the factory's DeepSeek models use exactly it
MLA_KV_LORA_RANK, MLA_ROPE_HEAD_DIM = 512, 64


@dataclass(frozen=True)
class Family:
    config_class: str  # transformers class names, imported when a model is built
    model_class: str
    moe: bool
    shape: Callable[[Any], dict] = field(repr=False)  # TinyModelSpec -> family-specific config keys


def _dense(spec) -> dict:
    return {"intermediate_size": spec.intermediate_size or 4 * spec.hidden_size}


def _expert_width(spec) -> int:
    return spec.moe_intermediate_size or spec.hidden_size


def _deepseek(spec, v3: bool) -> dict:
    head = max(32, spec.hidden_size // spec.num_heads)  # >= 32: vLLM's CPU attention rejects 16
    keys = {
        "intermediate_size": spec.intermediate_size or 4 * spec.hidden_size,  # the dense first layers
        "moe_intermediate_size": _expert_width(spec),
        "n_routed_experts": spec.num_experts,
        "num_experts_per_tok": spec.experts_per_token,
        "n_shared_experts": spec.shared_experts,
        "first_k_dense_replace": spec.first_dense_layers,
        "kv_lora_rank": MLA_KV_LORA_RANK,
        "qk_rope_head_dim": MLA_ROPE_HEAD_DIM,
        "qk_nope_head_dim": head,
        "v_head_dim": head,
        "q_lora_rank": None,  # DeepSeek-V2-Lite's choice: q projected directly
        "num_key_value_heads": spec.num_heads,  # MLA has no GQA
        # vLLM's DeepSeek loads lm_head from its own tensor and ignores tying: a tied model
        # served an all-zero head (every answer token 0); real DeepSeek models are untied too
        "tie_word_embeddings": False,
        # one expert group: the group-limited routing of the 256-expert models needs groups of
        # at least experts_per_token experts (transformers' topk within a group fails otherwise)
        "n_group": 1,
        "topk_group": 1,
    }
    if v3:
        keys.update(norm_topk_prob=True, routed_scaling_factor=1.0)
    return keys


def _qwen_moe(spec, shared: bool) -> dict:
    keys = {
        "intermediate_size": spec.intermediate_size or 4 * spec.hidden_size,  # mlp_only_layers
        "moe_intermediate_size": _expert_width(spec),
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.experts_per_token,
        "mlp_only_layers": list(range(spec.first_dense_layers)),
        "norm_topk_prob": True,
    }
    if shared:
        keys["shared_expert_intermediate_size"] = _expert_width(spec)  # one shared expert (validated)
    else:
        keys["head_dim"] = spec.hidden_size // spec.num_heads
    return keys


def _mixtral(spec) -> dict:
    return {
        "intermediate_size": _expert_width(spec),  # Mixtral's experts use intermediate_size
        "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.experts_per_token,
    }


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM", False, _dense),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", False, _dense),
    "deepseek_v3": Family("DeepseekV3Config", "DeepseekV3ForCausalLM", True, lambda s: _deepseek(s, v3=True)),
    "deepseek_v2": Family("DeepseekV2Config", "DeepseekV2ForCausalLM", True, lambda s: _deepseek(s, v3=False)),
    "qwen3_moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM", True, lambda s: _qwen_moe(s, shared=False)),
    "qwen2_moe": Family("Qwen2MoeConfig", "Qwen2MoeForCausalLM", True, lambda s: _qwen_moe(s, shared=True)),
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM", True, _mixtral),
}


def vllm_config_keys(config: dict) -> dict:
    """Keys to add to a saved config.json so vLLM loads it as transformers does (only keys the
    file lacks or has empty). transformers 5 writes neither `topk_method` nor `scoring_func` for
    DeepSeek-V3, whose router is sigmoid + a correction bias: vLLM then defaults to softmax and
    fails on `e_score_correction_bias` (real V3 configs carry both keys). vLLM's CPU router
    asserts `topk_group` on DeepSeek V2/V3, which transformers leaves null for V2."""
    model_type = config.get("model_type")
    want: dict = {}
    if model_type == "deepseek_v3":
        want = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1}
    elif model_type == "deepseek_v2":
        want = {"n_group": 1, "topk_group": 1}
    return {k: v for k, v in want.items() if config.get(k) is None}


def patch_for_vllm(folder) -> dict:
    """Write `vllm_config_keys` into `folder/config.json` (every model folder we save goes
    through this); returns what was added."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    added = vllm_config_keys(config)
    if added:
        path.write_text(json.dumps({**config, **added}, indent=2, sort_keys=True))
    return added


def is_moe_config(config) -> bool:
    """A loaded transformers config (or its dict) describes a Mixture-of-Experts model."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return any(get(k) for k in ("n_routed_experts", "num_experts", "num_local_experts"))
