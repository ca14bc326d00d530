"""Expert parallelism (`train.moe.expert_parallel: N`): DeepSpeed AutoEP shards each MoE layer's
routed experts over N ranks and sends tokens to the rank holding their expert (all-to-all).

AutoEP replaces each transformers MoE block by its own layer, whose parameters have other names
and hold only this rank's experts (`mlp.experts.w1` [E/N, I, H] for `mlp.experts.gate_up_proj`
[E, 2I, H]). Our checkpoints and `model/` must stay the transformers model's, so this module maps
both ways: `full_state` gathers every rank's experts into transformers names and shapes (what a
checkpoint stores, whatever the parallelism), `local_state` cuts this rank's part back out of it
(a resume). `RouterTap` records router logits where the replaced DeepSeek block returns none, so
the aux loss and expert-use counts work as without EP.
"""

from __future__ import annotations

# the families DeepSpeed ships an AutoEP preset for (deepspeed/module_inject/auto_ep_presets)
PRESETS = ("deepseek_v2", "deepseek_v3", "mixtral", "qwen3_moe")


def ds_section(model_type: str, size: int) -> dict:
    """The DeepSpeed config's `expert_parallel` section."""
    if model_type not in PRESETS:
        raise ValueError(
            f"train.moe.expert_parallel: DeepSpeed AutoEP has no preset for {model_type!r} (has: {', '.join(PRESETS)})"
        )
    return {"enabled": True, "autoep_size": size, "preset_model": model_type}


def ep_layers(module) -> dict:
    """name -> AutoEP layer."""
    return {n: m for n, m in module.named_modules() if getattr(m, "_is_autoep_layer", False)}


def _preset(model_type: str):
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

    return PRESET_MODELS[model_type]


def _hf_name(prefix: str, rest: str, preset) -> str | None:
    """transformers name of an AutoEP layer's non-expert parameter (router, shared experts)."""
    if rest.startswith("router."):
        return f"{prefix}.{preset.router_pattern}.{rest[len('router.') :].split('.', 1)[1]}"
    if rest.startswith("shared_experts."):
        return f"{prefix}.{preset.shared_experts_pattern}.{rest[len('shared_experts.') :]}"
    return None


def _gather_experts(layer, local):
    """[E, ...] from every EP rank's [E/N, ...], in expert order."""
    import torch
    import torch.distributed as dist
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

    size = dist.get_world_size(group=layer.ep_group)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=layer.ep_group)
    full = torch.full((layer.num_experts, *local.shape[1:]), float("nan"), dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        full[list(autoep_experts_for_rank(layer.expert_placement_descriptor, r))] = part
    if full.isnan().any():
        raise RuntimeError(f"expert parallel: the EP ranks' experts do not cover all {layer.num_experts}")
    return full


def full_state(module, model_type: str, named: list) -> dict:
    """The trainable parameters `named` [(name, param)] under transformers names, experts
    gathered from every rank (every rank must call this)."""
    import torch

    layers, preset, out = ep_layers(module), _preset(model_type), {}
    params = dict(named)
    for name, p in named:
        prefix = next((pre for pre in layers if name.startswith(pre + ".")), None)
        if prefix is None:
            out[name] = p.detach().cpu().contiguous()
            continue
        rest = name[len(prefix) + 1 :]
        if rest.startswith("experts."):
            continue  # below, per layer
        out[_hf_name(prefix, rest, preset)] = p.detach().cpu().contiguous()
    for prefix, layer in layers.items():
        w = {k: params.get(f"{prefix}.experts.{k}") for k in ("w1", "w2", "w3")}
        if any(v is None for v in w.values()):
            continue  # frozen experts: not trainable, so not in a checkpoint
        full = {k: _gather_experts(layer, v.detach()).cpu() for k, v in w.items()}
        out[f"{prefix}.{preset.experts_pattern}.{preset.expert_w1}"] = torch.cat(
            [full["w1"], full["w3"]], 1
        ).contiguous()
        out[f"{prefix}.{preset.experts_pattern}.{preset.expert_w2}"] = full["w2"].contiguous()
    return out


def local_state(module, model_type: str, weights: dict) -> dict:
    """This rank's parameters (AutoEP names) cut from a full_state dict."""
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

    layers, preset, out = ep_layers(module), _preset(model_type), {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        prefix = next((pre for pre in layers if name.startswith(pre + ".")), None)
        if prefix is None:
            out[name] = weights[name]
            continue
        rest = name[len(prefix) + 1 :]
        if not rest.startswith("experts."):
            out[name] = weights[_hf_name(prefix, rest, preset)]
            continue
        layer = layers[prefix]
        mine = list(autoep_experts_for_rank(layer.expert_placement_descriptor, layer.ep_rank))
        gate_up = weights[f"{prefix}.{preset.experts_pattern}.{preset.expert_w1}"][mine]
        half = gate_up.shape[1] // 2
        out[name] = {
            "w1": gate_up[:, :half],
            "w3": gate_up[:, half:],
            "w2": weights[f"{prefix}.{preset.experts_pattern}.{preset.expert_w2}"][mine],
        }[rest.split(".")[1]]
    return out


class RouterTap:
    """Router logits of every AutoEP layer, recorded by forward hooks on its router's linear
    map: the DeepSeek AutoEP layer computes them but returns none to transformers."""

    def __init__(self, module):
        self.logits: dict[str, object] = {}
        for name, layer in ep_layers(module).items():
            layer.router.gate.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def fn(_module, _inputs, output):
            self.logits[name] = output  # the latest forward's (a second call in one forward is the same)

        return fn

    def take(self) -> tuple:
        out = tuple(self.logits.values())  # model order: the layers' hooks fire in it
        self.logits = {}
        return out
