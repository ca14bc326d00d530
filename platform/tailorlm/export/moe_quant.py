"""Quantize a Mixture-of-Experts checkpoint by its saved tensors: experts quantized, routers not.

transformers 5 holds a MoE's routed experts as fused 3-D parameters, which compressed-tensors
(it quantizes nn.Linear modules) never reaches, while the checkpoint it saves, and vLLM's loader,
name one 2-D projection per expert (`mlp.experts.3.down_proj.weight`). So the quantizer works on
the checkpoint: every 2-D projection under `layers` becomes an nn.Linear in a module tree shaped
like the checkpoint (attention, dense and shared-expert MLPs, each routed expert), the usual
scheme is attached to it, and ModelCompressor packs it. The routers (`gate`, `shared_expert_gate`)
and the head stay in the base dtype and are listed in the config's `ignore`: a router's few
weights decide which experts run, and quantizing them moves tokens between experts.

`dequantized_folder` is the way back, for the quality gate: transformers cannot load quantized
experts (its loader quantizes Linear modules, and experts are not), so the gate decompresses
the same tree and loads a plain bf16 folder of the exact quantized values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# checkpoint module names of routers in the MoE families we build and load
ROUTERS = ("gate", "router", "shared_expert_gate")


def read_tensors(folder: str) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def is_quantizable(key: str, tensor) -> bool:
    """A 2-D projection weight inside the decoder layers that is not a router."""
    parts = key.split(".")
    return tensor.dim() == 2 and parts[-1] == "weight" and "layers" in parts and parts[-2] not in ROUTERS


def _place(root, dotted: str, module) -> None:
    """Put `module` at `dotted` in the tree, creating the empty parents on the way."""
    import torch

    *path, leaf = dotted.split(".")
    parent = root
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, torch.nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, module)


def _copy_side_files(src: str, out_dir: str, skip: tuple[str, ...]) -> None:
    """Tokenizer, generation config and the like: every file but the weights and `skip`."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
            shutil.copy(f, out_dir)


def linear_tree(tensors: dict, dtype=None):
    """(module tree of nn.Linear at the checkpoint's names, the tensors left as they are)."""
    import torch

    root, rest = torch.nn.Module(), {}
    for key, t in tensors.items():
        if t.dim() > 2 and "layers" in key.split("."):
            # vLLM would expect them quantized (the "Linear" target reaches its fused MoE layer)
            raise ValueError(
                f"export.quantize: {key} is a fused {t.dim()}-D expert tensor in the checkpoint; this "
                "quantizer needs experts saved one 2-D projection each (as transformers saves them)"
            )
        if not is_quantizable(key, t):
            rest[key] = t
            continue
        linear = torch.nn.Linear(t.shape[1], t.shape[0], bias=False, dtype=dtype or t.dtype)
        linear.weight.data = t.to(dtype or t.dtype)
        _place(root, key[: -len(".weight")], linear)
    return root, rest


def ignored_modules(rest: dict) -> list[str]:
    """Modules vLLM must not expect quantized weights for: every 2-D weight left unquantized
    (routers, the head; the embedding too, which vLLM's "Linear" target never reaches anyway)."""
    return sorted(k[: -len(".weight")] for k, t in rest.items() if k.endswith(".weight") and t.dim() == 2)


def save_tree(root, rest: dict, src: str, out_dir: str, compressor) -> None:
    """The compressed tree and the other tensors as one safetensors file, the source folder's
    other files (tokenizer, generation config) beside it, the quantization config in config.json."""
    from safetensors.torch import save_file

    _copy_side_files(src, out_dir, skip=("model.safetensors.index.json",))
    tensors = {k: v.contiguous() for k, v in root.state_dict().items()}
    save_file({**tensors, **rest}, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    compressor.update_config(out_dir)
    path = Path(out_dir) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["ignore"] = sorted(
        set(config["quantization_config"].get("ignore", [])) | set(ignored_modules(rest))
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def dequantized_folder(qdir: str, out_dir: str) -> str:
    """A bf16 copy of a quantized MoE folder written by save_tree, its weights the exact
    quantized values: the tree is rebuilt from the compressed tensors and decompressed by
    ModelCompressor, the library that compressed it."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from safetensors.torch import save_file

    config = json.loads((Path(qdir) / "config.json").read_text())
    qconfig = config.pop("quantization_config")
    tensors = read_tensors(qdir)
    quantized = {k.rpartition(".")[0] for k in tensors if k.endswith(".weight_scale")}
    modules: dict[str, dict] = {}
    rest = {}
    for key, t in tensors.items():
        module, _, part = key.rpartition(".")
        if module in quantized and part.startswith("weight"):  # a bias stays as it is
            modules.setdefault(module, {})[part] = t
        else:
            rest[key] = t
    root = torch.nn.Module()
    for name, parts in modules.items():
        out_f, in_f = parts["weight_shape"].tolist() if "weight_shape" in parts else parts["weight"].shape
        _place(root, name, torch.nn.Linear(int(in_f), int(out_f), bias=False, dtype=torch.bfloat16))
    scheme_keys = {k: v for k, v in qconfig.items() if k in QuantizationConfig.model_fields}
    quantization = QuantizationConfig.model_validate(scheme_keys)
    apply_quantization_config(root, quantization)
    for name, parts in modules.items():
        module = root.get_submodule(name)
        if "weight" not in parts:  # packed formats store weight_packed instead
            del module.weight
        for part, t in parts.items():
            module.register_parameter(part, torch.nn.Parameter(t, requires_grad=False))
        module.quantization_status = QuantizationStatus.COMPRESSED
    compressor = ModelCompressor(quantization_config=quantization)
    compressor.decompress_model(root)
    dense = {f"{name}.weight": root.get_submodule(name).weight.data.to(torch.bfloat16).contiguous() for name in modules}
    _copy_side_files(qdir, out_dir, skip=("config.json", "model.safetensors.index.json"))
    save_file({**dense, **rest}, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir
