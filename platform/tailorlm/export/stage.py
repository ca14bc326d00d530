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
from typing import Any

from tailorlm.config import PipelineConfig
from tailorlm.export.registry import next_version, register
from tailorlm.runs import RunDir, StageDir


def merged_bf16(cfg: PipelineConfig, model_dir: str, out_dir: str) -> str:
    """The finetuned model as one bf16 HF folder: LoRA adapters merged into the base (peft)."""
    import torch

    from tailorlm.models import load_model, load_tokenizer, resolve_base

    if os.path.exists(os.path.join(model_dir, "adapter_config.json")):
        from peft import PeftModel

        base = load_model(resolve_base(cfg.model), dtype="bfloat16")
        model = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    else:
        model = load_model(model_dir, dtype="bfloat16")
    model.to(torch.bfloat16).save_pretrained(out_dir)
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

    def run(path: str, quantized: bool):
        kw = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if quantized else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
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


def run(cfg: PipelineConfig, run_dir: RunDir, sdir: StageDir) -> dict[str, Any]:
    import ray

    from tailorlm.data.splits import splits_rows
    from tailorlm.export.quantize import quantize, weights_size

    ec = cfg.export
    train, data = run_dir.stage("train"), run_dir.stage("data")  # finished: the pipeline checks needs
    version = next_version(run_dir)
    rows = splits_rows(data.sub("kept"))
    variants: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "trained")
        train.fs.get(train.path + "/model", src, recursive=True)
        bf16 = os.path.join(tmp, "bf16")
        task = ray.remote(num_cpus=1)
        ray.get(task(merged_bf16).remote(cfg, src, bf16))
        quantized = {s: os.path.join(tmp, s) for s in ec.quantize}
        calib = (
            calibration_texts(bf16, splits_rows(data.sub("kept"), "train"), ec.calibration_samples, cfg.run.seed)
            if ec.method == "gptq"
            else None
        )
        ray.get(
            [
                task(quantize).remote(bf16, path, s, ec.method, calib, cfg.train.max_seq_len)
                for s, path in quantized.items()
            ]
        )
        metrics = ray.get(task(compare_variants).remote(bf16, quantized, rows, cfg.train.max_seq_len))
        for name, path in {"bf16": bf16, **quantized}.items():
            m = {**metrics[name], "size_bytes": weights_size(path)}
            worse = m.get("ppl_increase", 0.0) > ec.max_ppl_increase
            status = (
                ("refused" if ec.on_quality_fail == "refuse" else "published_with_warning") if worse else "published"
            )
            uri = sdir.put(path, f"{version}/{name}") if status != "refused" else None
            variants[name] = {**m, "status": status, "uri": uri}
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
        | {"manifest": sdir.sub(f"{version}/manifest.json")},
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
