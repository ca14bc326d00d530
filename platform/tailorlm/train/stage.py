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

RESUMABLE = ("ray", "ray_inputs.json")


def tokenized_splits(cfg: PipelineConfig, kept_uri: str, tokenizer_path: str, cpus: int):
    import ray

    from tailorlm.train.formats import Tokenize

    tc = cfg.train
    kept = ray.data.read_parquet(kept_uri, columns=["id", "split", "text", "messages"])
    out = {}
    for split in ("train", "eval"):
        ds = kept.filter(expr=f"split == '{split}'")
        ds = ds.map_batches(Tokenize, fn_constructor_kwargs=dict(
            tokenizer_path=tokenizer_path, fmt=tc.format, max_len=tc.max_seq_len, packing=tc.packing,
            chat_template=cfg.model.chat_template), concurrency=(1, max(1, cpus)), batch_format="pandas")
        if split == "train":
            ds = ds.random_shuffle(seed=cfg.run.seed)
        out[split] = ds.materialize()  # before training: workers must not wait on CPU for tokenizing
    return out


def prepare(cfg: PipelineConfig, kept_uri: str) -> dict[str, Any]:
    """Everything a training run needs before the trainer starts: base model, tokenized splits, steps."""
    import ray

    from tailorlm.models import load_tokenizer, resolve_base
    from tailorlm.train.ds_config import steps_for
    from tailorlm.train.loop import build_shm_comm_once

    tc = cfg.train
    cpus = int(ray.cluster_resources().get("CPU", 1))
    base_path = resolve_base(cfg.model)
    tok = load_tokenizer(base_path, cfg.model.chat_template)
    splits = tokenized_splits(cfg, kept_uri, base_path, cpus)
    n_train = splits["train"].count()
    steps_per_epoch, total_steps = steps_for(tc, n_train, tc.num_workers)
    print(f"[train] {n_train} train / {splits['eval'].count()} eval sequences; {steps_per_epoch} steps per "
          f"epoch, {total_steps} steps; global batch {tc.global_batch_size}")
    if not tc.use_gpu:
        build_shm_comm_once()
    return {"splits": splits, "base_path": base_path, "pad_id": tok.pad_token_id, "total_steps": total_steps}


def make_trainer(cfg: PipelineConfig, prep: dict[str, Any], storage_uri: str, name: str,
                 tensorboard_dir: str | None = None, callbacks: list | None = None):
    """The TorchTrainer for one training run (the train stage, or one Tune trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tailorlm.train.loop import train_loop_per_worker

    tc = cfg.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "base_path": prep["base_path"], "total_steps": prep["total_steps"],
                           "pad_id": prep["pad_id"], "tensorboard_dir": tensorboard_dir},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_uri, callbacks=callbacks,
                             # Ray starts workers at niceness 15; training workers would then yield
                             # to any normal-priority process on the node (Ray's own agents included)
                             worker_runtime_env={"env_vars": {"RAY_worker_niceness": "0"}},
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints,
                                                                checkpoint_score_attribute="eval_loss",
                                                                checkpoint_score_order="min")),
        datasets=prep["splits"],
    )


def export_model(cfg: PipelineConfig, base_path: str, ckpt_dir: str, out_dir: str, merged_dir: str | None) -> None:
    """Apply the best checkpoint's weights to the base and save it in HF format (safetensors)."""
    from safetensors.torch import load_file

    from tailorlm.models import load_tokenizer
    from tailorlm.train.loop import build_model

    model = build_model(cfg, base_path)
    weights = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"checkpoint {ckpt_dir} lacks {len(missing)} trained tensors, e.g. {missing[0]}")
    params = dict(model.named_parameters())
    for n, t in weights.items():
        params[n].data.copy_(t.to(params[n].dtype))
    tok = load_tokenizer(base_path, cfg.model.chat_template)
    model.save_pretrained(out_dir)  # LoRA: adapter_model.safetensors + adapter_config.json only
    tok.save_pretrained(out_dir)
    if merged_dir and cfg.train.method == "lora":
        merged = model.merge_and_unload()
        merged.save_pretrained(merged_dir)
        tok.save_pretrained(merged_dir)


def loss_plot(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [h for h in history if "train_loss" in h]
    ev = [h for h in history if "eval_loss" in h]
    ax.plot([h["step"] for h in tr], [h["train_loss"] for h in tr], label="train loss", alpha=0.7)
    ax.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: PipelineConfig, run_dir: RunDir, sdir: StageDir) -> dict[str, Any]:
    import ray

    from tailorlm.train.evaluate import evaluate_model
    from tailorlm.runs import local_path
    from tailorlm.train.loop import write_history

    tc = cfg.train
    data = run_dir.stage("data")
    if not data.is_complete():
        raise FileNotFoundError(f"train: no finished data stage at {data.uri}; run `tailorlm data` first")
    # checkpoints from a run with other inputs must not be resumed
    inputs = cfg.section_hash("run", "model", "data", "train")
    stale = sdir.fs.exists(sdir.sub("ray_inputs.json")) and sdir.read_json("ray_inputs.json")["inputs"] != inputs
    if stale and sdir.fs.exists(sdir.sub("ray")):
        sdir.fs.rm(sdir.sub("ray"), recursive=True)
    sdir.write_json("ray_inputs.json", {"inputs": inputs})

    prep = prepare(cfg, data.sub("kept"))
    splits, base_path, total_steps = prep["splits"], prep["base_path"], prep["total_steps"]
    local_stage = local_path(sdir.uri)
    trainer = make_trainer(cfg, prep, storage_uri=sdir.uri, name="ray",
                           tensorboard_dir=os.path.join(local_stage, "tensorboard")
                           if local_stage and cfg.train.tensorboard else None)
    result = trainer.fit()
    if result.error:
        raise result.error
    best_ckpt, best_metrics = min(result.best_checkpoints, key=lambda cm: cm[1]["eval_loss"])

    eval_rows = splits_rows(data.sub("kept"))
    with tempfile.TemporaryDirectory() as tmp:
        with best_ckpt.as_directory() as d:
            state = json.load(open(os.path.join(d, "state.json")))
            model_dir, merged_dir = os.path.join(tmp, "model"), os.path.join(tmp, "merged")
            ray.get(ray.remote(num_cpus=1)(export_model).remote(
                cfg, base_path, d, model_dir, merged_dir if tc.merge_adapter else None))
        history = state["history"]
        write_history(history, sdir.sub("metrics.jsonl"))
        loss_plot(history, os.path.join(tmp, "loss.png"))
        sdir.put(model_dir, "model")
        if tc.merge_adapter and tc.method == "lora":
            sdir.put(merged_dir, "merged")
        sdir.put(os.path.join(tmp, "loss.png"), "loss.png")
        # before/after on the eval split: the untrained base against the finetuned model
        remote_eval = ray.remote(num_cpus=1, num_gpus=1 if tc.use_gpu else 0)(evaluate_model)
        adapter = model_dir if tc.method == "lora" else None
        finetuned_path = base_path if adapter else model_dir
        before, after = ray.get([
            remote_eval.remote(base_path, base_path, eval_rows, tc.max_seq_len, chat_template=cfg.model.chat_template),
            remote_eval.remote(finetuned_path, base_path, eval_rows, tc.max_seq_len, adapter_path=adapter,
                               chat_template=cfg.model.chat_template)])
    report = {"base": before, "finetuned": after, "best_checkpoint_step": state["step"],
              "best_eval_loss": best_metrics["eval_loss"], "total_steps": total_steps}
    sdir.write_json("eval.json", report)
    print(summary(report))
    print(f"model:   {sdir.sub('model')}\nmetrics: {sdir.sub('metrics.jsonl')}\nplot:    {sdir.sub('loss.png')}")
    return {"model": sdir.sub("model"), "method": tc.method, "steps": total_steps,
            "base_perplexity": before["perplexity"], "perplexity": after["perplexity"],
            "base_f1": before.get("f1"), "f1": after.get("f1")}


def splits_rows(kept_uri: str, split: str = "eval") -> list[dict]:
    import pyarrow.dataset as pads
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(kept_uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["split", "text", "messages"])
    return [r for r in table.to_pylist() if r["split"] == split]


def summary(report: dict) -> str:
    b, a = report["base"], report["finetuned"]
    lines = [f"{'eval split':<16}{'base':>12}{'finetuned':>12}", "-" * 40,
             f"{'perplexity':<16}{b['perplexity']:>12.2f}{a['perplexity']:>12.2f}"]
    for k in ("exact_match", "f1", "rouge_l"):
        if k in a:
            lines.append(f"{k:<16}{b.get(k, 0):>12.3f}{a[k]:>12.3f}")
    for s in a.get("samples", [])[:3]:
        lines.append(f"Q: {s['prompt']}\n   reference: {s['reference']}\n   finetuned: {s['answer']}")
    return "\n".join(lines)
