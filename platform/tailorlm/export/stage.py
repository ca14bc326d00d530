"""The export stage: merge LoRA, quantize, evaluate every variant, register a version.

    tailorlm export jobs/configs/tiny_cpu.yaml export.quantize=[w8a8,w4a16]

Writes `<run>/export/<version>/<variant>/` (HF folders vLLM loads: bf16 and each quantized scheme
that passed the quality gate), `<version>/manifest.json` (metrics, sizes, lineage) and appends
the version to `<run>/registry.json`. A variant whose perplexity is worse than bf16's by more
than export.max_ppl_increase is refused (not published) or, with on_quality_fail: warn, published
with a warning.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tailorlm.config import PipelineConfig
from tailorlm.export.registry import next_version, register
from tailorlm.runs import RunDir, StageDir


def merged_bf16(cfg: PipelineConfig, model_dir: str, out_dir: str) -> str:
    """The finetuned model as one bf16 HF folder: LoRA adapters merged into the base (peft)."""
    import torch

    from tailorlm.families import patch_for_vllm
    from tailorlm.models import load_adapter, load_model, load_tokenizer, resolve_base

    if os.path.exists(os.path.join(model_dir, "adapter_config.json")):
        base = load_model(resolve_base(cfg.model, cfg.run.storage), dtype="bfloat16")
        model = load_adapter(base, model_dir).merge_and_unload()
    else:
        model = load_model(model_dir, dtype="bfloat16")
    model.to(torch.bfloat16).save_pretrained(out_dir)
    patch_for_vllm(out_dir)
    load_tokenizer(model_dir).save_pretrained(out_dir)
    return out_dir


def compare_variants(
    ref_dir: str, variants: dict[str, str], rows: list[dict], max_len: int, n_prompts: int = 16, new_tokens: int = 24
) -> dict[str, dict[str, Any]]:
    """Perplexity on the eval rows and greedy agreement with the bf16 reference, per variant.

    Quantized weights are decompressed (exact quantized values); activation quantization (the A8
    of W8A8) is not simulated here, so W8A8's cost is measured by greedy agreement in serving."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from tailorlm.export.moe_quant import dequantized_folder
    from tailorlm.families import is_moe_config
    from tailorlm.models import load_tokenizer
    from tailorlm.train.evaluate import perplexity, token_loss
    from tailorlm.train.formats import encode_sft, encode_text

    tok = load_tokenizer(ref_dir)
    encoded, prompts = [], []
    for r in rows:
        msgs = json.loads(r["messages"]) if isinstance(r.get("messages"), str) else None
        encoded.append(encode_sft(tok, msgs, max_len) if msgs else encode_text(tok, r["text"], max_len))
        if msgs and len(prompts) < n_prompts:
            prompts.append(
                tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
            )

    moe = is_moe_config(json.loads((Path(ref_dir) / "config.json").read_text()))

    def load(path: str, quantized: bool):
        if quantized and moe:  # transformers cannot load quantized experts: decompress them first
            with tempfile.TemporaryDirectory() as tmp:
                return AutoModelForCausalLM.from_pretrained(dequantized_folder(path, tmp), dtype=torch.float32)
        kw = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if quantized else {}
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)

    def run(path: str, quantized: bool):
        model = load(path, quantized).eval()
        loss, _ = token_loss(model, encoded)
        with torch.no_grad():
            gens = [
                model.generate(
                    **p,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )[0, p["input_ids"].shape[1] :]
                for p in prompts
            ]
        return perplexity(loss), gens

    ref_ppl, ref_gen = run(ref_dir, quantized=False)
    out = {"bf16": {"perplexity": ref_ppl, "greedy_agreement": 1.0}}
    for name, path in variants.items():
        ppl, gen = run(path, quantized=True)
        agree = sum(int((a == b).sum()) for a, b in zip(gen, ref_gen)) / max(1, sum(len(a) for a in ref_gen))
        out[name] = {"perplexity": ppl, "greedy_agreement": agree, "ppl_increase": ppl / ref_ppl - 1}
    return out


def calibration_texts(model_dir: str, rows: list[dict], n: int, seed: int) -> list[str]:
    """A seeded sample of train rows, rendered as the model sees them (chat rows via its template)."""
    import random

    from tailorlm.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    out = []
    for r in random.Random(seed).sample(rows, min(n, len(rows))):
        msgs = json.loads(r["messages"]) if isinstance(r.get("messages"), str) else None
        out.append(tok.apply_chat_template(msgs, tokenize=False) if msgs else r["text"])
    return out


def merge_task(cfg: PipelineConfig, trained_uri: str, sdir: StageDir, name: str) -> int:
    """merged_bf16 as a task on any node: reads the trained model from storage, writes the bf16
    variant into the stage folder; returns its weights' size."""
    from tailorlm.export.quantize import weights_size
    from tailorlm.models import local_model

    with tempfile.TemporaryDirectory() as tmp:
        out = merged_bf16(cfg, local_model(trained_uri), os.path.join(tmp, "bf16"))
        sdir.put(out, name)
        return weights_size(out)


def quantize_task(
    bf16_uri: str, sdir: StageDir, name: str, scheme: str, ec, train_rows: list[dict], seed: int, max_len: int
) -> int:
    """One quantized variant as a task on any node (calibration texts drawn there: the same seeded
    sample in every task); returns its weights' size."""
    from tailorlm.export.quantize import quantize, weights_size
    from tailorlm.models import local_model

    bf16 = local_model(bf16_uri)
    calib = calibration_texts(bf16, train_rows, ec.calibration_samples, seed) if ec.method == "gptq" else None
    with tempfile.TemporaryDirectory() as tmp:
        out = quantize(bf16, os.path.join(tmp, scheme), scheme, ec.method, calib, max_len)
        sdir.put(out, name)
        return weights_size(out)


def compare_task(bf16_uri: str, variants: dict[str, str], rows: list[dict], max_len: int) -> dict[str, dict[str, Any]]:
    from tailorlm.models import local_model

    return compare_variants(local_model(bf16_uri), {n: local_model(u) for n, u in variants.items()}, rows, max_len)


def run(cfg: PipelineConfig, run_dir: RunDir, sdir: StageDir) -> dict[str, Any]:
    trained = run_dir.stage("train").marker() or {}  # finished: the pipeline checks needs
    training = f"{trained.get('inputs')}@{trained.get('finished')}"  # which training run this exports
    version = next_version(run_dir, training)
    try:
        return export_version(cfg, run_dir, sdir, version, training)
    except BaseException:  # the stage keeps version folders on a rerun (stages.py): not a half-written one
        if sdir.fs.exists(f"{sdir.path}/{version}"):
            sdir.fs.rm(f"{sdir.path}/{version}", recursive=True)
        raise


def export_version(cfg: PipelineConfig, run_dir: RunDir, sdir: StageDir, version: str, training: str) -> dict:
    """Write <version>/ (every variant, its metrics, the manifest) and register it."""
    import ray

    from tailorlm.data.splits import splits_rows

    ec = cfg.export
    train, data = run_dir.stage("train"), run_dir.stage("data")
    rows = splits_rows(data.sub("kept"))
    # Each step is a task on whichever node has a CPU free; they hand models to each other through
    # the stage folder (storage every node reaches), never through this driver's disk. Every
    # variant is written to <version>/<variant>; the ones the quality gate refuses are removed.
    task = ray.remote(num_cpus=1)
    bf16_uri = sdir.sub(f"{version}/bf16")
    sizes = {"bf16": ray.get(task(merge_task).remote(cfg, train.sub("model"), sdir, f"{version}/bf16"))}
    train_rows = splits_rows(data.sub("kept"), "train") if ec.method == "gptq" else []
    seed, max_len = cfg.run.seed, cfg.train.max_seq_len
    quantized = {s: sdir.sub(f"{version}/{s}") for s in ec.quantize}
    refs = {
        s: task(quantize_task).remote(bf16_uri, sdir, f"{version}/{s}", s, ec, train_rows, seed, max_len)
        for s in quantized
    }
    sizes.update(dict(zip(refs, ray.get(list(refs.values())))))
    metrics = ray.get(task(compare_task).remote(bf16_uri, quantized, rows, max_len))
    variants: dict[str, dict[str, Any]] = {}
    for name, uri in {"bf16": bf16_uri, **quantized}.items():
        m = {**metrics[name], "size_bytes": sizes[name]}
        worse = m.get("ppl_increase", 0.0) > ec.max_ppl_increase
        status = ("refused" if ec.on_quality_fail == "refuse" else "published_with_warning") if worse else "published"
        if status == "refused":
            sdir.fs.rm(f"{sdir.path}/{version}/{name}", recursive=True)
        variants[name] = {**m, "status": status, "uri": uri if status != "refused" else None}
        if worse:
            print(
                f"[export] {name}: perplexity +{m['ppl_increase']:.1%} exceeds the "
                f"{ec.max_ppl_increase:.0%} limit: {status}"
            )
    manifest = {
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run": cfg.run.name,
        "variants": variants,
        "lineage": {
            "data": data.marker(),
            "train": train.marker(),
            "config_hash": cfg.section_hash("model", "data", "train", "export"),
            "base_model": str(cfg.model.base if isinstance(cfg.model.base, str) else cfg.model.base.model_dump()),
        },
    }
    sdir.write_json(f"{version}/manifest.json", manifest)
    register(
        run_dir,
        {k: manifest[k] for k in ("version", "created", "variants")}
        | {"manifest": sdir.sub(f"{version}/manifest.json"), "training": training},
    )
    print(summary(variants, version))
    return {
        "version": version,
        "variants": {k: v["status"] for k, v in variants.items()},
        "perplexity": {k: v["perplexity"] for k, v in variants.items()},
    }


def summary(variants: dict[str, dict], version: str) -> str:
    lines = [
        f"export {version}",
        f"{'variant':<8}{'perplexity':>12}{'vs bf16':>9}{'greedy agree':>14}{'size MB':>9}  status",
        "-" * 70,
    ]
    for name, v in variants.items():
        lines.append(
            f"{name:<8}{v['perplexity']:>12.3f}{v.get('ppl_increase', 0):>+9.1%}"
            f"{v['greedy_agreement']:>14.1%}{v['size_bytes'] / 1e6:>9.2f}  {v['status']}"
        )
    return "\n".join(lines)


def recap(s: dict[str, Any]) -> str:
    """One line for the end of `tailorlm run`."""
    return f"version {s['version']}: " + ", ".join(
        f"{k} ppl {s['perplexity'][k]:.2f} ({v})" for k, v in s["variants"].items()
    )
