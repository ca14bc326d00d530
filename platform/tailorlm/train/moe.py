"""Mixture-of-Experts training pieces: what LoRA adapts, the load-balancing loss, expert use.

LoRA targets are chosen here explicitly rather than by peft's "all-linear", whose reach differs
by family on transformers-5 MoE models (attention + routed experts + router on DeepSeek,
Mixtral and Qwen3-MoE; the shared expert and no routed expert on Qwen2-MoE). Routed experts are
fused 3-D parameters, not nn.Linear, so they are adapted through peft's `target_parameters`;
routers stay frozen.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

# a router's module names in the families we build: a gate that picks experts, not an MLP
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


@contextmanager
def exact_targets():
    """peft 0.21 rewrites LoRA targets on transformers-5 MoE models as if they were written for
    transformers 4: any `gate_proj`/`up_proj`/`down_proj` target (DeepSeek's shared experts, its
    dense first layers, Qwen3-MoE's) silently becomes the fused routed experts too, and `gate` the
    router. Our targets are already v5 names, chosen by peft_lora_kwargs, so that remap is off
    while they are applied and while an adapter we saved is loaded (models.load_adapter)."""
    import peft.utils.transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def expert_parameters(model) -> list[str]:
    """Names (suffixes peft matches) of the fused routed-expert weights: `mlp.experts.gate_up_proj`..."""
    names = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.dim() == 3 and "experts" in parts:
            i = parts.index("experts")
            names.add(".".join(parts[i - 1 :]))
    return sorted(names)


def dense_linear_targets(model) -> list[str]:
    """Every nn.Linear but the output head and the routers, by its last two name parts
    (`self_attn.q_proj`, `shared_experts.up_proj`, `mlp.down_proj` in a dense first layer)."""
    import torch

    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and parts[-1] not in ROUTER_NAMES and parts[-1] != "lm_head":
            names.add(".".join(parts[-2:]))
    return sorted(names)


def peft_lora_kwargs(model, lora, moe: bool) -> dict[str, Any]:
    """peft LoraConfig arguments for `train.lora` on this model."""
    from tailorlm.config import lora_dropout

    kwargs: dict[str, Any] = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora_dropout(lora))
    if lora.target_modules != "all-linear":
        kwargs["target_modules"] = list(lora.target_modules)
    elif moe:
        kwargs["target_modules"] = dense_linear_targets(model)
    else:
        kwargs["target_modules"] = "all-linear"
    if lora.target_experts:
        experts = expert_parameters(model)
        if not experts:
            raise ValueError("train.lora.target_experts: this model has no fused expert weights to adapt")
        kwargs["target_parameters"] = experts
    return kwargs


def apply_lora(model, lora, moe: bool):
    """The model with `train.lora`'s adapters (peft), its targets exactly as chosen here."""
    from peft import LoraConfig, get_peft_model

    with exact_targets():
        return get_peft_model(model, LoraConfig(**peft_lora_kwargs(model, lora, moe), task_type="CAUSAL_LM"))


def set_router_aux_coef(model, coef: float) -> None:
    """The weight the Qwen-MoE and Mixtral classes give their own aux loss. They copy
    `router_aux_loss_coef` from the config when built, so setting the config after loading
    changed nothing (0 did not turn it off): set it on the model and the config."""
    model.config.router_aux_loss_coef = coef
    for module in model.modules():
        if hasattr(module, "router_aux_loss_coef"):
            module.router_aux_loss_coef = coef


def moe_block_classes(model) -> list[type]:
    """The classes of the sparse MoE blocks (a module holding both `experts` and its router
    `gate`): DeepseekV3MoE, Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock..."""
    return sorted(
        {type(m) for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")}, key=lambda t: t.__name__
    )


def set_zero3_leaves(model) -> list[str]:
    """Under ZeRO-3, DeepSpeed gathers each submodule's parameters as it runs; tokens routed
    differently on each rank make ranks enter different experts and wait on each other's
    gathers. Marking the whole MoE block as a leaf gathers its parameters at once on every rank
    (DeepSpeed's documented remedy for MoE models). Returns the class names marked."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = moe_block_classes(model)
    if classes:
        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


def switch_aux_loss(router_logits: tuple, top_k: int):
    """Switch-Transformer load-balancing loss over the layers' router logits, the form the
    Qwen-MoE and Mixtral classes use: E * sum_e f_e * P_e, with f_e the share of routed slots
    expert e received and P_e its mean router probability; 1.0 when the load is uniform. Used
    for the DeepSeek classes, which return router logits but no aux loss (DeepSeek-V3 balances
    with a bias instead); softmax probabilities as DeepSeek-V2's router."""
    import torch

    losses = []
    for logits in router_logits:
        logits = logits.reshape(-1, logits.shape[-1]).float()
        experts = logits.shape[-1]
        probs = logits.softmax(-1)
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, experts).sum(1).float()
        share = chosen.mean(0) / top_k
        losses.append(experts * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


class ExpertUse:
    """Tokens routed to each expert of each MoE layer, accumulated over steps (top-k of the
    router logits, as the router picks them)."""

    def __init__(self, top_k: int):
        self.top_k, self.counts = top_k, None

    def add(self, router_logits: tuple) -> None:
        import torch

        rows = []
        for logits in router_logits:
            logits = logits.detach().reshape(-1, logits.shape[-1]).float()
            idx = logits.topk(self.top_k, dim=-1).indices.reshape(-1)
            rows.append(torch.bincount(idx, minlength=logits.shape[-1]))
        counts = torch.stack(rows).double()
        self.counts = counts if self.counts is None else self.counts + counts

    def metrics(self, floor: float = 0.1) -> dict[str, float]:
        """moe_experts_used: share of (layer, expert) slots with more than `floor` of a uniform
        load; moe_load_max_over_mean: the busiest expert's load over the mean (1.0 is even);
        moe_router_entropy: entropy of the load per layer, over its maximum log(E)."""
        import math

        if self.counts is None:
            return {}
        c = self.counts
        mean = c.mean(1, keepdim=True).clamp_min(1e-9)
        p = c / c.sum(1, keepdim=True).clamp_min(1e-9)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(c.shape[1])
        return {
            "moe_experts_used": float((c > floor * mean).double().mean()),
            "moe_load_max_over_mean": float((c.max(1).values / mean.squeeze(1)).max()),
            "moe_router_entropy": float(entropy.mean()),
            "moe_tokens_per_expert": c.tolist(),
        }

    def reset(self) -> None:
        self.counts = None
