"""Mixture-of-Experts families from the factory: build, LoRA targets (experts too), aux loss,
expert use. Walks every MoE family the factory table holds, not a hand list."""

import json

import pytest
import torch

from tailorlm.config import TinyModelSpec, load_config
from tailorlm.families import FAMILIES, is_moe_config, vllm_config_keys
from tailorlm.models import ensure_tiny_model, load_model
from tailorlm.train.moe import ExpertUse, apply_lora, expert_parameters, peft_lora_kwargs, switch_aux_loss

MOE = sorted(name for name, family in FAMILIES.items() if family.moe)


@pytest.fixture(scope="module", params=MOE)
def moe_folder(request, tmp_path_factory):
    spec = TinyModelSpec(factory=request.param, hidden_size=128, num_layers=2, vocab_size=512)
    return request.param, ensure_tiny_model(spec, tmp_path_factory.mktemp("moe"))


def test_saved_config_is_moe_and_loads_in_vllm_terms(moe_folder):
    family, folder = moe_folder
    config = json.loads((folder / "config.json").read_text())
    assert is_moe_config(config) and config["model_type"] == family
    assert vllm_config_keys(config) == {}  # the factory wrote what vLLM needs (E1, E2)
    assert config["dtype"] == "bfloat16"


def _lora(model, *overrides):
    lora = load_config(None, ["train.lora.r=4", *overrides]).train.lora
    return apply_lora(model, lora, moe=True), peft_lora_kwargs(model, lora, moe=True)


def test_lora_on_experts_changes_the_output_and_leaves_the_router_frozen(moe_folder):
    """An expert adapter that silently does nothing is this ecosystem's known failure: set the
    expert adapters' weights and the logits must move; the router never gets an adapter."""
    _, folder = moe_folder
    torch.manual_seed(0)
    model, kwargs = _lora(load_model(str(folder), dtype="float32"), "train.lora.target_experts=true")
    assert kwargs["lora_dropout"] == 0.0 and kwargs["target_parameters"]
    assert not any(t.split(".")[-1] in ("gate", "router") for t in kwargs["target_modules"])
    expert_lora = [p for n, p in model.named_parameters() if "lora" in n and "experts" in n]
    assert expert_lora and all(p.requires_grad for p in expert_lora)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".gate." in n or "router" in n)
    x = torch.randint(0, 400, (2, 12))
    model.eval()
    before = model(x).logits
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n and "experts" in n:
                p.normal_(0, 0.5)
    assert (model(x).logits - before).abs().max() > 1e-3


def test_aux_loss_backpropagates_and_expert_use_is_counted(moe_folder):
    from tailorlm.train.loop import MoeStep

    _, folder = moe_folder
    from tailorlm.train.moe import set_router_aux_coef

    base = load_model(str(folder), dtype="float32")
    x = torch.randint(0, 400, (2, 12))
    if hasattr(base.config, "router_aux_loss_coef"):  # the model's own aux loss follows our coef
        set_router_aux_coef(base, 0.0)
        assert float(base(input_ids=x, labels=x, output_router_logits=True).loss) == float(
            base(input_ids=x, labels=x).loss
        )
        set_router_aux_coef(base, 0.01)
    model, _ = _lora(base)
    step = MoeStep.for_model(model, coef=0.01)
    total, lm = step.loss(model(input_ids=x, labels=x, output_router_logits=True))
    assert total.requires_grad and step.last_aux > 0 and abs(float(total - lm) - 0.01 * step.last_aux) < 1e-4
    total.backward()
    m = step.metrics()
    experts = (
        model.config.to_dict().get("n_routed_experts")
        or model.config.to_dict().get("num_experts")
        or model.config.num_local_experts
    )
    assert len(m["moe_tokens_per_expert"][0]) == experts
    assert sum(m["moe_tokens_per_expert"][0]) == 2 * 12 * model.config.num_experts_per_tok
    assert 0 < m["moe_experts_used"] <= 1 and m["moe_load_max_over_mean"] >= 1


def test_switch_loss_is_one_when_balanced_and_grows_when_collapsed():
    balanced = torch.zeros(64, 4)  # equal logits: every expert as likely
    balanced[torch.arange(64), torch.arange(64) % 4] = 1e-3  # ties broken evenly
    collapsed = torch.zeros(64, 4)
    collapsed[:, 0] = 10
    assert abs(float(switch_aux_loss((balanced,), 1)) - 1) < 1e-2
    assert float(switch_aux_loss((collapsed,), 1)) > 3
    use = ExpertUse(1)
    use.add((collapsed,))
    assert use.metrics()["moe_experts_used"] == 0.25


def test_dense_factories_refuse_moe_keys_and_lora_dropout_refused_on_experts():
    with pytest.raises(ValueError, match="model.base.num_experts: only for Mixture-of-Experts"):
        TinyModelSpec(factory="llama", num_experts=4)
    with pytest.raises(ValueError, match="qwen3_moe has no shared experts"):
        TinyModelSpec(factory="qwen3_moe", shared_experts=1)
    with pytest.raises(ValueError, match="train.lora.dropout=0.1"):
        load_config(None, ["train.lora.target_experts=true", "train.lora.dropout=0.1"])
    with pytest.raises(ValueError, match=r"num_heads=4: deepseek_v3 \(MLA\) needs a multiple of 16"):
        TinyModelSpec(factory="deepseek_v3", num_heads=4)
    assert TinyModelSpec(factory="deepseek_v2").num_heads == 16
    with pytest.raises(ValueError, match="experts_per_token=9 exceeds num_experts=8"):
        TinyModelSpec(factory="mixtral", experts_per_token=9)


def test_expert_parameters_found_for_every_moe_family(moe_folder):
    _, folder = moe_folder
    names = expert_parameters(load_model(str(folder), dtype="float32"))
    assert names == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    from tailorlm.train.moe import moe_block_classes

    assert len(moe_block_classes(load_model(str(folder)))) == 1  # what ZeRO-3 marks as leaf


def test_preflight_fails_a_lora_config_the_model_refuses_before_any_worker(moe_folder):
    """A deterministic model/config error fails in the driver, named, on the meta device (no
    worker group to restart max_failures times); a fitting config passes."""
    from tailorlm.train.trainer import preflight

    _, folder = moe_folder
    preflight(load_config(None, ["train.method=lora", "train.lora.target_experts=true"]), str(folder))
    bad = load_config(None, ["train.method=lora", "train.lora.target_modules=[no_such_proj]"])
    with pytest.raises(ValueError, match=r"train.lora does not fit .*no_such_proj"):
        preflight(bad, str(folder))


def test_lora_adapters_on_a_moe_base_are_refused_on_cpu_before_an_engine_starts(moe_folder, tmp_path):
    """vLLM's CPU build kills the engine on its first request with LoRA on a MoE base (E4):
    refused at config validation for a factory MoE, and at app build for any MoE folder."""
    from tailorlm.serving.engine import resolve_adapters

    family, folder = moe_folder
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="serve.lora_adapters: vLLM's CPU build cannot serve LoRA"):
        load_config(None, {"model": {"base": {"factory": family}}, "serve": {"lora_adapters": {"a": str(adapter)}}})
    sc = load_config(None, {"serve": {"lora_adapters": {"a": str(adapter)}}}).serve
    with pytest.raises(ValueError, match="is a Mixture-of-Experts model"):
        resolve_adapters(sc, {sc.model_id: str(folder)})
    gpu = sc.model_copy(update={"engine": sc.engine.model_copy(update={"use_gpu": True})})
    assert resolve_adapters(gpu, {sc.model_id: str(folder)}) == {"a": str(adapter.resolve())}


def test_expert_adapters_merge_into_the_base_with_the_same_output(moe_folder, tmp_path):
    """Export merges LoRA (export/stage.merged_bf16): the merged model must answer as the adapter
    did, experts included, after a save and load through models.load_adapter."""
    from tailorlm.models import load_adapter

    _, folder = moe_folder
    torch.manual_seed(0)
    model, _ = _lora(load_model(str(folder), dtype="float32"), "train.lora.target_experts=true")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, 400, (2, 12))
    model.eval()
    with torch.no_grad():
        want = model(x).logits
        merged = load_adapter(load_model(str(folder), dtype="float32"), str(tmp_path / "adapter")).merge_and_unload()
        got = merged.eval()(x).logits
    assert (got - want).abs().max() < 1e-3


def test_factory_settings_a_family_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="qwen2_moe has exactly one"):
        TinyModelSpec(factory="qwen2_moe", shared_experts=2)
    with pytest.raises(ValueError, match="mixtral has no dense MLP"):
        TinyModelSpec(factory="mixtral", intermediate_size=256)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_quantized_moe_quantizes_every_expert_keeps_routers_and_decompresses_to_the_grid(moe_folder, tmp_path, scheme):
    """compressed-tensors quantizes nn.Linear, and a MoE's experts are fused 3-D weights in
    transformers: export/moe_quant.py quantizes the checkpoint's per-expert projections. Every
    expert is quantized, no router is (and vLLM is told so), and the gate's decompressed copy
    holds weights on the grid that answer close to the base model."""
    from tailorlm.export.moe_quant import dequantized_folder, read_tensors
    from tailorlm.export.quantize import quantize

    _, folder = moe_folder
    out = quantize(str(folder), str(tmp_path / scheme), scheme, "rtn")
    q = read_tensors(out)
    base = read_tensors(str(folder))
    experts = {k[: -len(".weight")] for k in base if ".experts." in k}
    routers = {
        k[: -len(".weight")]
        for k in base
        if k.endswith(".weight") and k.split(".")[-2] in ("gate", "shared_expert_gate")
    }
    assert experts and routers
    assert all(f"{e}.weight_scale" in q for e in experts)
    assert all(torch.equal(q[f"{r}.weight"], base[f"{r}.weight"]) for r in routers)
    ignore = json.loads((tmp_path / scheme / "config.json").read_text())["quantization_config"]["ignore"]
    assert routers <= set(ignore)

    deq = read_tensors(dequantized_folder(out, str(tmp_path / "deq")))
    assert deq.keys() == base.keys()
    e = sorted(experts)[0]
    w, scale = deq[f"{e}.weight"].float(), q[f"{e}.weight_scale"].float()
    ints = w.reshape(w.shape[0], scale.shape[1], -1) / scale.unsqueeze(-1)
    off_grid = (ints - ints.round()).abs() - ints.abs() / 128  # bf16 keeps 8 significant bits
    assert off_grid.max() < 0.02 and not torch.equal(w, base[f"{e}.weight"].float())
    x = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        ref = load_model(str(folder), dtype="float32").eval()(x).logits
        got = load_model(str(tmp_path / "deq"), dtype="float32").eval()(x).logits
    assert 0 < (got - ref).abs().max() < 0.5 * ref.abs().max()


def test_quantized_deepseek_variants_are_refused_for_cpu_serving():
    """vLLM's CPU MoE kernels for int8/int4 experts route only softmax top-k; DeepSeek's grouped
    routing needs a GPU: refused at config validation, naming the setting."""
    with pytest.raises(ValueError, match=r"serve.variants: .*w8a8.*deepseek_v3"):
        load_config(None, {"model": {"base": {"factory": "deepseek_v3"}}, "serve": {"variants": ["bf16", "w8a8"]}})
    load_config(None, {"model": {"base": {"factory": "mixtral"}}, "serve": {"variants": ["bf16", "w8a8"]}})
    gpu = {"variants": ["w4a16"], "engine": {"use_gpu": True}}
    load_config(None, {"model": {"base": {"factory": "deepseek_v2"}}, "serve": gpu})


def test_quantized_deepseek_folders_are_refused_at_app_build_on_cpu(tmp_path):
    """The same refusal for any folder (a hub or local DeepSeek base skips the factory check)."""
    from tailorlm.serving.engine import refuse_cpu_quantized_deepseek

    for name, config in {
        "ds-w8a8": {"model_type": "deepseek_v3", "quantization_config": {}},
        "ds-bf16": {"model_type": "deepseek_v3"},
        "mixtral-w8a8": {"model_type": "mixtral", "quantization_config": {}},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    sc = load_config(None).serve
    ok = {n: str(tmp_path / n) for n in ("ds-bf16", "mixtral-w8a8")}
    refuse_cpu_quantized_deepseek(sc, ok)
    with pytest.raises(ValueError, match=r"serve.variants: demo-w8a8 .* DeepSeek model with quantized experts"):
        refuse_cpu_quantized_deepseek(sc, {**ok, "demo-w8a8": str(tmp_path / "ds-w8a8")})
    gpu = sc.model_copy(update={"engine": sc.engine.model_copy(update={"use_gpu": True})})
    refuse_cpu_quantized_deepseek(gpu, {"demo-w8a8": str(tmp_path / "ds-w8a8")})


def _synthetic_checkpoint(folder, tmp, layers: int, experts: int, width: int, seed: int):
    """A MoE checkpoint nobody trained: random per-expert projections, routers, norms and
    biases of the sizes drawn, beside a real tokenizer and config (the quantizer reads both)."""
    import shutil

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(64, width, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = torch.rand(width, generator=g)
        tensors[f"{p}.self_attn.q_proj.weight"] = torch.randn(width, width, generator=g)
        tensors[f"{p}.self_attn.q_proj.bias"] = torch.randn(width, generator=g)
        tensors[f"{p}.mlp.gate.weight"] = torch.randn(experts, width, generator=g)
        for e in range(experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                tensors[f"{p}.mlp.experts.{e}.{proj}.weight"] = torch.randn(width, width, generator=g) * (e + 1)
    out = tmp / f"synthetic-{seed}"
    out.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out, {k: v.to(torch.bfloat16) for k, v in tensors.items()}


def test_moe_quantization_loses_no_tensor_and_is_deterministic(moe_folder, tmp_path_factory):
    """Property: for any layer/expert count and width, quantize -> decompress keeps every tensor
    under its name, leaves every non-projection tensor (routers, norms, biases, embeddings) bit
    for bit, keeps each projection within its quantization step, and two runs write the same bytes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tailorlm.export.moe_quant import dequantized_folder, is_quantizable, read_tensors
    from tailorlm.export.quantize import quantize

    family, folder = moe_folder
    if family != "mixtral":
        pytest.skip("one family is enough for the property: the quantizer reads tensors, not the family")

    @settings(max_examples=6, deadline=None)
    @given(st.integers(1, 2), st.integers(1, 4), st.sampled_from([32, 64]), st.integers(0, 10**6))
    def check(layers, experts, width, seed):
        tmp = tmp_path_factory.mktemp("prop")
        src, base = _synthetic_checkpoint(folder, tmp, layers, experts, width, seed)
        a = quantize(str(src), str(tmp / "a"), "w8a8", "rtn")
        quantize(str(src), str(tmp / "b"), "w8a8", "rtn")
        assert (tmp / "a" / "model.safetensors").read_bytes() == (tmp / "b" / "model.safetensors").read_bytes()
        deq = read_tensors(dequantized_folder(a, str(tmp / "deq")))
        assert deq.keys() == base.keys()
        for k, t in base.items():
            if is_quantizable(k, t):
                step = t.float().abs().amax(1, keepdim=True) / 127  # per-channel int8 scale
                assert ((deq[k].float() - t.float()).abs() <= step * 0.51 + t.float().abs() / 128).all(), k
            else:
                assert torch.equal(deq[k], t), k

    check()
