"""Training checkpoints in safetensors only: no pickled weights anywhere.

DeepSpeed's own `save_checkpoint` pickles (torch.save), so we write:
  model.safetensors        trainable weights, consolidated (ZeRO-3 gathers them); LoRA: adapter only
  optim_rank{R}.safetensors  each rank's base-optimizer partition: its fp32 master tensors and their
                           state (Adam moments); rank R restores its own partition, so a resume
                           needs the same world size and ZeRO stage (checked)
  state.json               step, epoch, position in the epoch, scheduler, metric history
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO / bf16 wrappers hold the torch optimizer inside


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _ep_size(engine) -> int:
    from tailorlm.train.expert_parallel import ep_layers

    return next((layer.ep_size for layer in ep_layers(engine.module).values()), 1)


def gathered_trainable(engine, stage: int) -> dict[str, torch.Tensor]:
    """Full trainable weights on every rank, under the transformers model's names (ZeRO-3 shards
    them, expert parallelism splits the experts; everyone must call this)."""
    import deepspeed

    from tailorlm.train import expert_parallel

    named = _trainable(engine)
    if expert_parallel.ep_layers(engine.module):
        return expert_parallel.full_state(engine.module, engine.module.config.model_type, named)
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().clone().cpu().contiguous() for n, p in named}
    return {n: p.detach().cpu().contiguous() for n, p in named}


def save(engine, path: str, rank: int, world: int, stage: int, state: dict[str, Any]) -> None:
    os.makedirs(path, exist_ok=True)
    weights = gathered_trainable(engine, stage)
    if rank == 0:
        save_file(weights, os.path.join(path, "model.safetensors"))
        meta = {**state, "world_size": world, "zero_stage": stage, "expert_parallel": _ep_size(engine)}
        with open(os.path.join(path, "state.json"), "w") as fh:
            json.dump(meta, fh)
    base = _base_optimizer(engine)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for g, group in enumerate(base.param_groups):
        for i, p in enumerate(group["params"]):
            tensors[f"param.{g}.{i}"] = p.detach().cpu().contiguous()
            for k, v in base.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"state.{g}.{i}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars[f"state.{g}.{i}.{k}"] = v
    save_file(tensors, os.path.join(path, f"optim_rank{rank}.safetensors"), metadata={"scalars": json.dumps(scalars)})


def load(engine, path: str, rank: int, world: int, stage: int) -> dict[str, Any]:
    """Restore weights and this rank's optimizer partition; returns the saved training state."""
    import deepspeed
    from safetensors import safe_open

    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    saved = (state["world_size"], state["zero_stage"], state.get("expert_parallel", 1))
    if saved != (world, stage, _ep_size(engine)):
        raise ValueError(
            f"checkpoint {path} was written by {saved[0]} workers with ZeRO stage {saved[1]} and expert "
            f"parallel {saved[2]}; this run has {world} workers, stage {stage}, expert parallel {_ep_size(engine)}"
        )
    from tailorlm.train import expert_parallel

    weights = load_file(os.path.join(path, "model.safetensors"))
    named = _trainable(engine)
    if expert_parallel.ep_layers(engine.module):  # this rank's experts, under AutoEP's names
        weights = expert_parallel.local_state(engine.module, engine.module.config.model_type, weights)
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
            if rank == 0:
                for n, p in named:
                    p.data.copy_(weights[n])
    else:
        for n, p in named:
            p.data.copy_(weights[n])
    base = _base_optimizer(engine)
    opt_file = os.path.join(path, f"optim_rank{rank}.safetensors")
    tensors = load_file(opt_file)
    with safe_open(opt_file, "pt") as fh:
        scalars = json.loads(fh.metadata()["scalars"])
    for g, group in enumerate(base.param_groups):
        for i, p in enumerate(group["params"]):
            p.data.copy_(tensors[f"param.{g}.{i}"])
            prefix = f"state.{g}.{i}."
            st = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            st.update({k[len(prefix) :]: v for k, v in scalars.items() if k.startswith(prefix)})
            if st:
                base.state[p] = st
    return state


def restore_scheduler(scheduler, saved: dict) -> None:
    """The lr schedule where the checkpoint left it. `load_state_dict` restores the step count
    but leaves the optimizer's lr at its value from construction (step 0's warmup), so the first
    step after a resume ran at the wrong lr and the run drifted from the uninterrupted one (1.7%
    in eval loss on the multi-node fault test). The lr is set from the restored schedule."""
    scheduler.load_state_dict(saved)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
