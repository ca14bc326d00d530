"""The train stage: DeepSpeed finetuning on Ray Train, then the final model and a before/after report.

    tailorlm train jobs/configs/tiny_cpu.yaml train.method=lora train.lora.r=8

Reads `<run>/data/kept/` (rows with split train/eval). Writes in the stage folder:
  ray/            Ray Train run state and checkpoints (kept on failure: a rerun resumes from them)
  model/          the final model in HF format (LoRA: the adapter) with tokenizer and chat template
  merged/         base + adapter merged (train.merge_adapter: true)
  metrics.jsonl   train/eval metric history; loss.png; tensorboard/ (local storage)
  eval.json       base vs finetuned: perplexity and answer metrics on the eval split
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from tailorlm.config import PipelineConfig
from tailorlm.runs import RunDir, StageDir
from tailorlm.train.trainer import make_trainer, prepare

RESUMABLE = ("ray", "ray_inputs.json")


def export_model(cfg: PipelineConfig, base_path: str, checkpoint, sdir: StageDir) -> None:
    """Apply the checkpoint's weights to the base and write `model/` (and `merged/`) in HF format
    (safetensors) into the stage folder. Runs as a task on whichever node has a CPU free, so it
    fetches the checkpoint and writes the model through storage, never the driver's disk."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tailorlm.families import patch_for_vllm
    from tailorlm.models import load_tokenizer, local_model
    from tailorlm.train.loop import build_model

    model = build_model(cfg, base_path)
    # trained in float32 (DeepSpeed's masters); saved as the base was: a float32 model/ was twice
    # the size of the bf16 base, and vLLM serves it in the dtype it finds
    base_dtype = AutoConfig.from_pretrained(local_model(base_path)).dtype or torch.float32
    base_dtype = getattr(torch, base_dtype) if isinstance(base_dtype, str) else base_dtype
    with checkpoint.as_directory() as ckpt_dir:
        weights = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"checkpoint {checkpoint.path} lacks {len(missing)} trained tensors, e.g. {missing[0]}")
    params = dict(model.named_parameters())
    for n, t in weights.items():
        params[n].data.copy_(t.to(params[n].dtype))
    tok = load_tokenizer(base_path, cfg.model.chat_template)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = os.path.join(tmp, "model")
        if cfg.train.method == "full":
            model.to(base_dtype)
        model.save_pretrained(out_dir)  # LoRA: adapter_model.safetensors + adapter_config.json only
        patch_for_vllm(out_dir)  # no config.json in an adapter folder: nothing to do there
        tok.save_pretrained(out_dir)
        sdir.put(out_dir, "model")
        if cfg.train.merge_adapter and cfg.train.method == "lora":
            merged_dir = os.path.join(tmp, "merged")
            model.merge_and_unload().to(base_dtype).save_pretrained(merged_dir)
            patch_for_vllm(merged_dir)
            tok.save_pretrained(merged_dir)
            sdir.put(merged_dir, "merged")


def loss_plot(history: list[dict], path: str) -> None:
    """Train and eval loss over steps; on a Mixture-of-Experts model a second panel shows the
    experts' use at each evaluation (share used, busiest over mean load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moe = [h for h in history if "moe_experts_used" in h]
    fig, axes = plt.subplots(1, 2 if moe else 1, figsize=(12 if moe else 7, 4), squeeze=False)
    ax = axes[0][0]
    tr = [h for h in history if "train_loss" in h]
    ev = [h for h in history if "eval_loss" in h]
    ax.plot([h["step"] for h in tr], [h["train_loss"] for h in tr], label="train loss", alpha=0.7)
    ax.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if moe:
        use = axes[0][1]
        steps = [h["step"] for h in moe]
        use.plot(steps, [h["moe_experts_used"] for h in moe], "o-", label="share of experts used")
        use.plot(steps, [h["moe_router_entropy"] for h in moe], "s-", label="router load entropy / max")
        use.set_ylim(0, 1.05)
        use.set_xlabel("optimizer step")
        twin = use.twinx()
        twin.plot(steps, [h["moe_load_max_over_mean"] for h in moe], "^--", color="tab:red", label="max/mean load")
        twin.set_ylabel("max/mean load")
        use.legend(loc="lower left")
        twin.legend(loc="lower right")
        use.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: PipelineConfig, run_dir: RunDir, sdir: StageDir) -> dict[str, Any]:
    import ray

    from tailorlm.runs import local_path
    from tailorlm.train.evaluate import answer_table, evaluate_model
    from tailorlm.train.loop import write_history

    tc = cfg.train
    data = run_dir.stage("data")  # finished: the pipeline checks a stage's needs (stages.py)
    # checkpoints from a run with other inputs must not be resumed
    inputs = cfg.section_hash("run", "model", "data", "train")
    stale = sdir.fs.exists(sdir.sub("ray_inputs.json")) and sdir.read_json("ray_inputs.json")["inputs"] != inputs
    if stale and sdir.fs.exists(sdir.sub("ray")):
        sdir.fs.rm(sdir.sub("ray"), recursive=True)
    sdir.write_json("ray_inputs.json", {"inputs": inputs})

    prep = prepare(cfg, data.sub("kept"))
    base_path, total_steps = prep["base_path"], prep["total_steps"]
    local_stage = local_path(sdir.uri)
    trainer = make_trainer(
        cfg,
        prep,
        storage_uri=sdir.uri,
        name="ray",
        tensorboard_dir=os.path.join(local_stage, "tensorboard") if local_stage and cfg.train.tensorboard else None,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    best_ckpt, best_metrics = min(result.best_checkpoints, key=lambda cm: cm[1]["eval_loss"])

    from tailorlm.data.splits import splits_rows

    eval_rows = splits_rows(data.sub("kept"))
    with best_ckpt.filesystem.open_input_stream(f"{best_ckpt.path}/state.json") as f:  # not the whole checkpoint
        state = json.load(f)
    ray.get(ray.remote(num_cpus=1)(export_model).remote(cfg, base_path, best_ckpt, sdir))
    history = state["history"]
    write_history(history, sdir.sub("metrics.jsonl"))
    with tempfile.TemporaryDirectory() as tmp:
        loss_plot(history, os.path.join(tmp, "loss.png"))
        sdir.put(os.path.join(tmp, "loss.png"), "loss.png")
    # before/after on the eval split: the untrained base against the finetuned model
    remote_eval = ray.remote(num_cpus=1, num_gpus=1 if tc.use_gpu else 0)(evaluate_model)
    adapter = sdir.sub("model") if tc.method == "lora" else None
    finetuned_path = base_path if adapter else sdir.sub("model")
    before, after = ray.get(
        [
            remote_eval.remote(base_path, base_path, eval_rows, tc.max_seq_len, chat_template=cfg.model.chat_template),
            remote_eval.remote(
                finetuned_path,
                base_path,
                eval_rows,
                tc.max_seq_len,
                adapter_path=adapter,
                chat_template=cfg.model.chat_template,
            ),
        ]
    )
    previous = previous_eval(cfg, remote_eval, base_path, finetuned_path, adapter)  # continual: forgetting
    answers = answer_table(before, after)
    for m in (before, after):  # eval.json keeps a few samples per model; `answers` pairs them up
        m["samples"] = m["samples"][:5]
    report = {
        "base": before,
        "finetuned": after,
        "answers": answers,
        "best_checkpoint_step": state["step"],
        "best_eval_loss": best_metrics["eval_loss"],
        "total_steps": total_steps,
    }
    if previous:
        report["previous_eval"] = previous
    sdir.write_json("eval.json", report)
    print(summary(report))
    print(f"model:   {sdir.sub('model')}\nmetrics: {sdir.sub('metrics.jsonl')}\nplot:    {sdir.sub('loss.png')}")
    return {
        "model": sdir.sub("model"),
        "method": tc.method,
        "steps": total_steps,
        "base_perplexity": before["perplexity"],
        "perplexity": after["perplexity"],
        "base_f1": before.get("f1"),
        "f1": after.get("f1"),
        "base_fact_em": before.get("fact_exact_match"),
        "fact_em": after.get("fact_exact_match"),
        "fact_scored": after.get("fact_scored"),
        **({"forgetting": previous["forgetting"], "old_fact_em": previous["finetuned"]} if previous else {}),
    }


def previous_eval(cfg: PipelineConfig, remote_eval, base_path: str, finetuned_path: str, adapter) -> dict | None:
    """With continual.from_run: the served run's own eval set, before (the promoted model this run
    starts from) and after finetuning, and the forgetting, the relative drop of its fact exact
    match (the issue's limit: 2%)."""
    if not cfg.continual.from_run:
        return None
    import ray

    from tailorlm.data.splits import splits_rows

    prev = RunDir(cfg.run.storage, cfg.continual.from_run).stage("data")
    rows, tc = splits_rows(prev.sub("kept")), cfg.train
    kw = {"chat_template": cfg.model.chat_template}
    b, a = ray.get(
        [
            remote_eval.remote(base_path, base_path, rows, tc.max_seq_len, **kw),
            remote_eval.remote(finetuned_path, base_path, rows, tc.max_seq_len, adapter_path=adapter, **kw),
        ]
    )
    before, after = b.get("fact_exact_match"), a.get("fact_exact_match")
    out = {"run": cfg.continual.from_run, "base": before, "finetuned": after, "rows": len(rows)}
    out["forgetting"] = forgetting(before, after)
    print(
        f"[train] the previous run's eval set ({cfg.continual.from_run}): fact exact match {before} -> {after}, "
        f"forgetting {out['forgetting']}"
    )
    return out


def forgetting(before: float | None, after: float | None) -> float | None:
    """Relative drop of a metric (0 when it held or rose); None without both."""
    if before is None or after is None:
        return None
    return max(0.0, (before - after) / before) if before > 0 else 0.0


def summary(report: dict) -> str:
    b, a = report["base"], report["finetuned"]
    lines = [
        f"{'eval split':<18}{'base':>12}{'finetuned':>12}",
        "-" * 42,
        f"{'perplexity':<18}{b['perplexity']:>12.2f}{a['perplexity']:>12.2f}",
    ]
    for k in ("fact_exact_match", "exact_match", "f1", "rouge_l"):
        if k in a:
            lines.append(f"{k:<18}{b.get(k, 0):>12.3f}{a[k]:>12.3f}")
    for r in report.get("answers", [])[:3]:
        mark = {True: "right", False: "wrong"}
        lines.append(
            f"Q: {r['question']}   (fact: {r['fact']})\n   base:      {r['base']!r} ({mark[r['base_correct']]})\n"
            f"   finetuned: {r['finetuned']!r} ({mark[r['finetuned_correct']]})"
        )
    return "\n".join(lines)


def recap(s: dict[str, Any]) -> str:
    """One line for the end of `tailorlm run`."""
    head = f"{s['method']}, {s['steps']} steps: eval perplexity {s['base_perplexity']:.1f} -> {s['perplexity']:.1f}"
    if s.get("fact_em") is not None:
        n = f" on {s['fact_scored']} held-out questions" if s.get("fact_scored") else ""
        head += f", fact exact match {s.get('base_fact_em') or 0:.2f} -> {s['fact_em']:.2f}{n}"
    if s.get("f1") is not None:
        head += f", answer F1 {s['base_f1']:.2f} -> {s['f1']:.2f}"
    if s.get("forgetting") is not None:
        head += f"; previous eval set {s['old_fact_em']:.2f}, forgetting {s['forgetting']:.1%}"
    return head
