"""DeepSpeed config derived from ours, and the learning-rate schedule.

One source of truth for batch sizes: `train.micro_batch_size` (per worker) and `train.grad_accum`;
DeepSpeed's `train_batch_size` is derived from them and the world size, never set separately.
"""

from __future__ import annotations

import math
from typing import Any

from tailorlm.config import TrainConfig


def deepspeed_config(tc: TrainConfig, world_size: int, model_type: str | None = None) -> dict[str, Any]:
    ds = tc.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": tc.use_gpu}
    if ds.stage == 3:
        # gather the full weights when saving, so a checkpoint is one consolidated file
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    opt_type = "Lion" if tc.optimizer == "lion" else "AdamW"
    opt_params: dict[str, Any] = {"lr": tc.lr, "weight_decay": tc.weight_decay, "betas": [0.9, 0.999]}
    if opt_type == "AdamW":
        opt_params["eps"] = 1e-8
        if not tc.use_gpu and not ds.offload_optimizer:
            opt_params["torch_adam"] = True  # FusedAdam is CUDA-only; plain torch AdamW on CPU
    extra: dict[str, Any] = {}
    if tc.moe.expert_parallel > 1:
        from tailorlm.train.expert_parallel import ds_section

        extra["expert_parallel"] = ds_section(model_type or "", tc.moe.expert_parallel)
    return {
        **extra,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world_size,
        "gradient_clipping": tc.grad_clip if tc.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "optimizer": {"type": opt_type, "params": opt_params},
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16", "initial_scale_power": 12},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(tc: TrainConfig, total_steps: int):
    """Multiplier of the base lr at a step: linear warmup, then cosine / linear decay or constant."""
    warm = min(tc.warmup_steps, max(0, total_steps - 1))

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if tc.scheduler == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        progress = min(1.0, progress)
        if tc.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def steps_for(tc: TrainConfig, n_rows: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for n_rows training sequences."""
    per_worker = n_rows // world_size
    per_epoch = per_worker // (tc.micro_batch_size * tc.grad_accum)
    if per_epoch == 0:
        raise ValueError(
            f"train: {n_rows} training sequences are fewer than one global batch "
            f"(micro_batch_size {tc.micro_batch_size} x grad_accum {tc.grad_accum} x "
            f"num_workers {world_size}); lower train.micro_batch_size or add data"
        )
    return per_epoch, tc.max_steps or per_epoch * tc.epochs
