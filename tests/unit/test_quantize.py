"""Quantization: GPTQ beats round-to-nearest on the layer's own inputs, and both write
compressed-tensors checkpoints whose weights sit exactly on the quantization grid."""

import pytest
import torch

from tailorlm.export.gptq import gptq_weight


def _args(preset: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(preset, ["Linear"]).weights


def _inputs(n=512, d=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=g) / d**0.5
    return (
        torch.randn(n, 32, generator=g) @ torch.randn(32, d, generator=g) + 0.1 * torch.randn(n, d, generator=g) @ basis
    )


@pytest.mark.parametrize("preset,qmax", [("W4A16", 7), ("W8A8", 127)])
def test_gptq_lowers_output_error_and_stays_on_the_grid(preset, qmax):
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _args(preset)
    X = _inputs()
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    H = 2.0 / X.shape[0] * X.double().T @ X.double()
    Q, scale, zero = gptq_weight(W, H, args)
    group = args.group_size or 256
    assert scale.shape == (64, 256 // group) and zero.shape == scale.shape
    ints = Q.reshape(64, -1, group) / scale.unsqueeze(-1)
    assert torch.allclose(ints, ints.round(), atol=1e-3) and ints.abs().max() <= qmax + 1

    w = W.reshape(64, -1, group)  # round-to-nearest with min/max scales, the baseline
    s, _ = calculate_qparams(w.amin(-1), w.amax(-1), args)
    rtn = ((w / s.unsqueeze(-1)).round().clamp(-qmax - 1, qmax) * s.unsqueeze(-1)).reshape(64, 256)
    err = lambda q: ((X @ (W - q).T) ** 2).sum().item()  # noqa: E731
    assert err(Q) < 0.8 * err(rtn), (err(Q), err(rtn))


def test_gptq_checkpoint_decompresses_to_grid_weights_that_beat_rtn(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from tailorlm.demo_data import document, planets
    from tailorlm.export.quantize import quantize
    from tailorlm.models import load_model, load_tokenizer

    texts = [" ".join(document(p)) for p in planets(24)]
    quantize(tiny_model_path, str(tmp_path / "gptq"), "w4a16", "gptq", texts, calib_len=128)
    quantize(tiny_model_path, str(tmp_path / "rtn"), "w4a16", "rtn")
    ref = load_model(tiny_model_path, dtype="float32").eval()
    kw = {"quantization_config": CompressedTensorsConfig(run_compressed=False), "dtype": torch.float32}
    models = {m: AutoModelForCausalLM.from_pretrained(tmp_path / m, **kw).eval() for m in ("gptq", "rtn")}
    name = next(n for n, mod in ref.named_modules() if n.endswith("mlp.down_proj"))
    W = dict(ref.named_modules())[name].weight
    Wq = {m: dict(mod.named_modules())[name].weight for m, mod in models.items()}
    assert not torch.equal(Wq["gptq"], Wq["rtn"])  # GPTQ chose other integers
    tok = load_tokenizer(tiny_model_path)
    ids = tok(texts[0], return_tensors="pt")["input_ids"][:, :128]
    captured = {}
    handle = dict(ref.named_modules())[name].register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    with torch.no_grad():
        ref(input_ids=ids)
    handle.remove()
    x = captured["x"].reshape(-1, W.shape[1])
    err = {m: ((x @ (W - q).T) ** 2).sum().item() for m, q in Wq.items()}
    assert err["gptq"] < err["rtn"], err
