"""The per-worker training loop: an explicit DeepSpeed loop, read top to bottom.

Runs inside each Ray Train worker (TorchTrainer has already set up torch.distributed: gloo on
CPU, NCCL on GPU). Every evaluation reports metrics and a safetensors checkpoint to Ray Train,
which keeps the best k by eval loss and hands the latest back after a failure or a rerun.

A Tune trial on the fast path (tune/stage.py) runs this same loop in Ray Train's local mode
(ScalingConfig(num_workers=0): the train function runs in the Tune trial's own process, a world of
one). There `ranks` > 1 stands in for that many Train workers: the loop reads every rank's fixed
shard, interleaved, and accumulates them into one optimizer step (grad_accum x ranks micro-batches),
which is the step the data-parallel run takes; metrics go straight to Tune (`report: tune`), as
local mode's ray.train.report only keeps the last one.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from typing import Any

from tailorlm.config import PipelineConfig


def build_shm_comm_once() -> None:
    """DeepSpeed JIT-builds its CPU shared-memory comm op on first use; two workers building it
    at once crashed a run, so build it under a file lock before deepspeed.initialize."""
    from filelock import FileLock

    from tailorlm.models import cache_root

    cache_root().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_root() / "deepspeed_shm_comm.lock")):
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        ShareMemCommBuilder().load(verbose=False)


def build_model(cfg: PipelineConfig, base_path: str):
    import torch

    from tailorlm.families import is_moe_config
    from tailorlm.models import load_model
    from tailorlm.train.moe import apply_lora

    tc = cfg.train
    torch.manual_seed(cfg.run.seed)  # identical LoRA init on every rank
    model = load_model(base_path, dtype="float32")  # DeepSpeed casts to bf16/fp16 and keeps fp32 masters
    moe = is_moe_config(model.config)
    if moe and hasattr(model.config, "router_aux_loss_coef"):
        from tailorlm.train.moe import set_router_aux_coef

        set_router_aux_coef(model, tc.moe.aux_loss_coef)  # the model adds its own aux loss
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if tc.method == "lora":
        model = apply_lora(model, tc.lora, moe)
        if tc.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


class MoeStep:
    """The training loss of a Mixture-of-Experts model: the LM loss plus `train.moe.aux_loss_coef`
    times the load-balancing loss (the model's own where it computes one, else train/moe.py's
    Switch form), and the experts' use counted from the same router logits."""

    def __init__(self, top_k: int, coef: float, own_aux: bool):
        from tailorlm.train.moe import ExpertUse

        self.top_k, self.coef, self.own_aux = top_k, coef, own_aux
        self.use, self.last_aux = ExpertUse(top_k), 0.0
        self.tap = None  # expert_parallel.RouterTap under expert parallelism

    @classmethod
    def for_model(cls, model, coef: float) -> "MoeStep | None":
        from tailorlm.families import is_moe_config

        config = model.config
        if not is_moe_config(config):
            return None
        return cls(int(config.num_experts_per_tok), coef, own_aux=hasattr(config, "router_aux_loss_coef"))

    def loss(self, out):
        """(loss to backpropagate, LM loss alone)."""
        from tailorlm.train.moe import switch_aux_loss

        router_logits = tuple(r for r in (out.router_logits or ()) if r is not None)
        if not router_logits and self.tap:  # AutoEP's DeepSeek layer returns none: its hooks kept them
            router_logits = self.tap.take()
        self.use.add(router_logits)
        if self.own_aux:  # transformers added router_aux_loss_coef (set to ours) * aux_loss
            aux = out.aux_loss
            lm = out.loss - self.coef * aux
            total = out.loss
        else:
            aux = switch_aux_loss(router_logits, self.top_k)
            lm, total = out.loss, out.loss + self.coef * aux
        self.last_aux = float(aux)
        return total, lm.detach()

    def metrics(self) -> dict:
        """Expert use summed over every rank since the last call."""
        import torch.distributed as dist

        if self.use.counts is not None and dist.is_initialized():
            dist.all_reduce(self.use.counts)
        metrics = self.use.metrics()
        self.use.reset()
        return metrics


def evaluate(engine, shard, pad_id: int, batch_size: int) -> dict[str, float]:
    """Token-weighted eval loss over this worker's eval shard (or list of shards), summed across workers."""
    import torch
    import torch.distributed as dist

    from tailorlm.train.evaluate import perplexity
    from tailorlm.train.formats import IGNORE, collate

    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    shards = shard if isinstance(shard, list) else [shard]
    with torch.no_grad():
        for batch in (b for s in shards for b in s.iter_batches(batch_size=batch_size, batch_format="numpy")):
            b = {k: v.to(engine.device) for k, v in collate(batch, pad_id).items()}
            n = (b["labels"][:, 1:] != IGNORE).sum()
            loss = engine(**b).loss
            sums += torch.tensor([loss.item() * n.item(), n.item()], dtype=torch.float64)
    engine.train()
    if dist.is_initialized():
        t = sums.to(engine.device)
        dist.all_reduce(t)
        sums = t.cpu()
    loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
    return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": int(sums[1].item())}


def interleaved(shards: list, **kwargs):
    """Batch i of every shard in turn (rank 0's, rank 1's, ...): the micro-batches that ranks 0..n-1
    of a data-parallel run would train on at their i-th micro-step."""
    if len(shards) == 1:
        yield from shards[0].iter_batches(**kwargs)
        return
    for batches in zip(*(s.iter_batches(**kwargs) for s in shards)):
        yield from batches


def progress_line(tag: str, step: int, total: int, metrics: dict, history: list[dict]) -> str:
    """One evaluation on the console: step, eval loss, the last train loss and tokens/s."""
    last = next((h for h in reversed(history) if "train_loss" in h), None)
    line = f"{tag} step {step}/{total} eval_loss {metrics['eval_loss']:.4f} ppl {metrics['eval_ppl']:.2f}"
    if last:
        line += f"; train_loss {last['train_loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s"
    if "moe_experts_used" in metrics:
        line += (
            f"; experts used {metrics['moe_experts_used']:.0%}, max/mean load {metrics['moe_load_max_over_mean']:.2f}"
        )
    return line


def train_loop_per_worker(config: dict[str, Any]) -> None:
    t_fn = time.time()  # start-up breakdown: where a run's seconds go before its first step
    phases = dict(config.get("phases") or {})
    if config.get("t_fit"):
        phases["start_s"] = t_fn - config["t_fit"]  # Train controller and worker group start, dataset set-up
    from tailorlm.models import skip_sklearn_import

    skip_sklearn_import()
    import deepspeed
    import psutil
    import ray.train
    import torch
    from ray.train import Checkpoint

    from tailorlm.train import checkpoint as ckpt_io
    from tailorlm.train.ds_config import deepspeed_config, lr_lambda
    from tailorlm.train.formats import IGNORE, collate

    cfg = PipelineConfig.model_validate(config["cfg"])
    tc = cfg.train
    total_steps, pad_id = config["total_steps"], config["pad_id"]
    ranks = config.get("ranks", 1)  # data-parallel ranks this one process stands in for (local mode)
    to_tune = config.get("report") == "tune"
    if to_tune:  # local mode inside a Tune trial: ray.train's context calls refuse to run in Tune's session
        rank, world, restored = 0, 1, None  # (and nothing to resume: the fast path keeps no checkpoints)
    else:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        restored = ray.train.get_checkpoint()
    checkpoints = config.get("checkpoints", True)
    t = time.time()
    phases["import_s"] = t - t_fn
    if not tc.use_gpu:
        build_shm_comm_once()

    # -- model, DeepSpeed engine, schedule ------------------------------------------------------
    model = build_model(cfg, config["base_path"])
    t, phases["model_s"] = time.time(), time.time() - t
    moe = MoeStep.for_model(model, tc.moe.aux_loss_coef)  # None on a dense model
    if moe and tc.deepspeed.stage == 3:
        from tailorlm.train.moe import set_zero3_leaves

        leaves = set_zero3_leaves(model)
        if rank == 0:
            print(f"[train] ZeRO-3 leaf modules: {', '.join(leaves)}")
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(tc, world, model.config.model_type),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc, total_steps)),
    )
    t, phases["ds_init_s"] = time.time(), time.time() - t
    if moe and tc.moe.expert_parallel > 1:  # AutoEP has replaced the MoE blocks
        from tailorlm.train.expert_parallel import RouterTap, ep_layers

        moe.tap = RouterTap(engine.module)
        if rank == 0:
            layers = len(ep_layers(engine.module))
            print(f"[train] expert parallel over {tc.moe.expert_parallel} ranks: {layers} MoE layers")
    torch.manual_seed(cfg.run.seed + rank)  # dropout differs per rank, reproducibly

    # -- resume ---------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "history": []}
    if restored:
        with restored.as_directory() as d:
            state = ckpt_io.load(engine, d, rank, world, tc.deepspeed.stage)
        ckpt_io.restore_scheduler(scheduler, state["scheduler"])
        engine.global_steps = state["step"]
        engine.micro_steps = state["step"] * tc.grad_accum
        if rank == 0:
            print(
                f"[train] resumed at step {state['step']} (epoch {state['epoch']}, "
                f"micro-batch {state['micro_in_epoch']})"
            )
    history: list[dict] = state["history"]
    step, epoch = state["step"], state["epoch"]

    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(config["tensorboard_dir"])

    if "ranks" in config:  # local mode names every stood-in rank's shard, one rank included
        train_shard = [ray.train.get_dataset_shard(f"train_{r}") for r in range(ranks)]
        eval_shard = [ray.train.get_dataset_shard(f"eval_{r}") for r in range(ranks)]
    else:
        train_shard = [ray.train.get_dataset_shard("train")]
        eval_shard = ray.train.get_dataset_shard("eval")
    proc = psutil.Process()
    phases.update(eval_s=0.0, ckpt_s=0.0)

    def eval_and_checkpoint(final: bool) -> None:
        t_eval = time.time()
        metrics = evaluate(engine, eval_shard, pad_id, tc.micro_batch_size)
        if moe:
            metrics.update(moe.metrics())  # expert use over the steps since the last evaluation
        phases["eval_s"] += time.time() - t_eval
        # loop_s: seconds in this loop (steps and evals, not checkpoint writes) over all attempts;
        # what a sweep would cost with no start-up or scheduling overhead (the tune benchmark's "ideal")
        loop_s = loop_s0 + time.time() - t_loop - phases["ckpt_s"]
        metrics.update(step=step, epoch=epoch, final=final, loop_s=loop_s)
        history.append({k: v for k, v in metrics.items() if k != "final"})
        metrics.update({f"phase_{k}": v for k, v in phases.items()})  # (not in the history)
        state.update(step=step, epoch=epoch, micro_in_epoch=micro, history=history, scheduler=scheduler.state_dict())
        if rank == 0:  # before the report: a scheduler that stops the trial stops it there
            print(progress_line(config.get("tag", "[train]"), step, total_steps, metrics, history))
        t_ckpt = time.time()
        if not checkpoints:  # a Tune trial on the fast path: nothing resumes it (see tune/stage.py)
            report(metrics)
        else:
            with tempfile.TemporaryDirectory() as d:
                ckpt_io.save(engine, d, rank, world, tc.deepspeed.stage, state)
                report(metrics, checkpoint=Checkpoint.from_directory(d))
        phases["ckpt_s"] += time.time() - t_ckpt
        if writer:
            for k in ("eval_loss", "eval_ppl"):
                writer.add_scalar(k, metrics[k], step)

    def report(metrics, checkpoint=None):
        if to_tune:
            from ray import tune

            tune.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics, checkpoint=checkpoint)

    # -- the loop ---------------------------------------------------------------------------------
    micro = state["micro_in_epoch"]
    loop_s0 = max((h.get("loop_s", 0.0) for h in history), default=0.0)
    tokens, t_last = 0, time.time()
    t_loop = t_last
    while step < total_steps:
        batches = interleaved(
            train_shard,
            batch_size=tc.micro_batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=256,
            local_shuffle_seed=cfg.run.seed + epoch,
        )
        for i, batch in enumerate(batches):
            if i < micro:  # resuming mid-epoch: skip what the checkpointed run already consumed
                continue
            if "first_batch_s" not in phases:
                phases["first_batch_s"] = time.time() - t_loop
            b = {k: v.to(engine.device) for k, v in collate(batch, pad_id).items()}
            if moe:
                loss, lm_loss = moe.loss(engine(**b, output_router_logits=True))
            else:
                loss = lm_loss = engine(**b).loss
            engine.backward(loss)
            engine.step()
            micro = i + 1
            tokens += int((b["labels"] != IGNORE).sum())
            if micro % tc.grad_accum:  # engine.step() only stepped the optimizer at the boundary
                continue
            step += 1
            if rank == 0 and step % tc.log_every == 0:  # the record; TensorBoard is one more sink
                dt = max(time.time() - t_last, 1e-9)
                record = {
                    "step": step,
                    "train_loss": lm_loss.item(),
                    **({"aux_loss": moe.last_aux} if moe else {}),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens * world / dt,
                    # this worker's peak resident memory so far (Linux: ru_maxrss in KiB)
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
                history.append(record)
                if writer:
                    grad_norm = engine.get_global_grad_norm()
                    for k in ("train_loss", "lr", "tokens_per_s"):
                        writer.add_scalar(k, record[k], step)
                    writer.add_scalar("rss_mib", proc.memory_info().rss / 2**20, step)
                    if grad_norm is not None:
                        writer.add_scalar("grad_norm", float(grad_norm), step)
                tokens, t_last = 0, time.time()
            if step % tc.eval_every == 0 or step == total_steps:
                eval_and_checkpoint(final=step == total_steps)
            if step >= total_steps:
                break
        else:
            epoch, micro = epoch + 1, 0
            continue
        break

    if writer:
        writer.close()


def write_history(history: list[dict], uri: str) -> None:
    import fsspec

    with fsspec.open(uri, "w") as fh:
        for h in history:
            fh.write(json.dumps(h) + "\n")
