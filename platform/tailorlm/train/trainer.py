"""One training run's set-up, shared by the train stage and every Tune trial: the tokenized
splits as Ray Datasets, the resolved base model, the step count, and the TorchTrainer that runs
train/loop.py on Ray Train with DeepSpeed.
"""

from __future__ import annotations

from typing import Any

from tailorlm.config import PipelineConfig

KEPT_COLUMNS = ["id", "split", "text", "messages"]
BATCH_ROWS = 1024  # Ray Data's default map_batches batch size (ray.data.context.LEGACY_DEFAULT_BATCH_SIZE)


def kept_files(kept_uri: str):
    """(filesystem, parquet files) of the kept rows, in the order Ray Data's read_parquet reads them
    (sorted; names starting with . or _ left out)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(kept_uri)
    root = root.rstrip("/")
    files = [f for f in fs.find(root) if not any(part.startswith((".", "_")) for part in f[len(root) :].split("/"))]
    return fs, sorted(files)


def from_tables(tables: list):
    """ray.data.from_arrow_refs([ray.put(t) for t in tables]), each block's metadata computed here
    instead of in one Ray task per block: a small prepare's tasks (pandas blocks to Arrow, metadata)
    waited ~1 s on a cold worker, and now run none."""
    import ray
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.from_operators import FromArrow
    from ray.data._internal.stats import DatasetStats
    from ray.data._internal.util import get_table_block_metadata_schema
    from ray.data.context import DataContext
    from ray.data.dataset import MaterializedDataset

    refs = [ray.put(t) for t in tables]
    meta = [get_table_block_metadata_schema(t) for t in tables]
    ctx = DataContext.get_current().copy()
    return MaterializedDataset(
        LogicalPlan(FromArrow(refs, meta), ctx), ctx, DatasetStats(metadata={"FromArrow": meta}, parent=None)
    )


def tokenized_here(cfg: PipelineConfig, kept_uri: str, tokenizer_path: str):
    """tokenized_splits without Ray Data, for a small input: the same Tokenize over the same rows in
    the same order, in batches of Ray Data's default 1024 rows (packing packs within a batch; Ray
    Data's batches can also end at a block boundary, so with packing the two may pack a few rows
    differently: same on the test data), held as Ray Datasets. Ray Data's start-up (tokenizing
    actors, their imports) took ~15 s of a prepare on the demo's rows or the tune benchmark's 1024,
    paid by every training run and, before, every Tune trial."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.data.block import BlockAccessor

    from tailorlm.train.formats import Tokenize

    tc = cfg.train
    fs, files = kept_files(kept_uri)
    tables = [pq.read_table(f, filesystem=fs, columns=KEPT_COLUMNS) for f in files]
    df = pa.concat_tables(tables).to_pandas() if tables else None
    tok = Tokenize(tokenizer_path, tc.format, tc.max_seq_len, tc.packing, cfg.model.chat_template)
    out = {}
    for split in ("train", "eval"):
        rows = df[df["split"] == split].reset_index(drop=True) if df is not None else None
        parts = (
            [tok(rows.iloc[i : i + BATCH_ROWS]) for i in range(0, len(rows), BATCH_ROWS)] if rows is not None else []
        )
        # as Ray Data's to_arrow_refs converts them (BlockAccessor.to_arrow), here
        parts = [BlockAccessor.for_block(p).to_arrow() for p in parts if len(p)]
        out[split] = from_tables(parts) if parts else ray.data.from_items([])
    return out


def small_input(cfg: PipelineConfig, kept_uri: str) -> bool:
    """Tokenize in the driver (tokenized_here): kept rows within data.in_process_max_mb."""
    limit = cfg.data.in_process_max_mb
    if limit <= 0:
        return False
    try:
        fs, files = kept_files(kept_uri)
        return sum(fs.size(f) for f in files) <= limit * 1e6
    except (OSError, ValueError):
        return False


def tokenized_splits(cfg: PipelineConfig, kept_uri: str, tokenizer_path: str, cpus: int):
    import ray

    from tailorlm.train.formats import Tokenize

    if small_input(cfg, kept_uri):
        return tokenized_here(cfg, kept_uri, tokenizer_path)
    tc = cfg.train
    kept = ray.data.read_parquet(kept_uri, columns=KEPT_COLUMNS)
    # Rows leave the tokenizing actors in the order they finish unless told otherwise; then
    # rank_shards' seeded permutation would permute a different input on every run
    kept.context.execution_options.preserve_order = True
    out = {}
    for split in ("train", "eval"):
        ds = kept.filter(expr=f"split == '{split}'")
        ds = ds.map_batches(
            Tokenize,
            fn_constructor_kwargs=dict(
                tokenizer_path=tokenizer_path,
                fmt=tc.format,
                max_len=tc.max_seq_len,
                packing=tc.packing,
                chat_template=cfg.model.chat_template,
            ),
            concurrency=(1, max(1, cpus)),
            batch_format="pandas",
        )
        out[split] = ds.materialize()  # before training: workers must not wait on CPU for tokenizing
    return out


BLOCK_ROWS = 1024  # rows per block of a rank's part: a fixed size, not whatever Ray Data made


def rank_shards(splits: dict, world: int, seed: int) -> dict[str, list]:
    """Each split cut into one fixed part per Train rank, held by the driver. Ray Train's default
    streaming_split hands each block to whichever worker asks first, so a restarted worker group
    (a lost node, a rerun) sees other rows per rank than the attempt it resumes, and the loop's
    mid-epoch skip then skips rows it never trained on. Here the train rows are permuted by the
    seed on the driver and cut into equal parts of fixed-size blocks, so the result depends on the
    rows and their order only, not on the block sizes Ray Data chose (those differ with the
    cluster's CPUs and the driver's DataContext: a pipeline job and a train job cut differently;
    seen on the multi-node test cluster). Equal parts, as streaming_split's equal=True: every rank
    runs the same number of batches (ZeRO-3's collective forward needs it), leaving out at most
    world - 1 rows. The driver holds the rows anyway (held_by_driver's reason). Not yet with
    train.packing: Tokenize packs within a batch, so packed rows still follow Ray Data's blocks."""
    import numpy as np
    import ray
    from ray.data._internal.arrow_ops.transform_pyarrow import concat

    out = {}
    for name, ds in splits.items():
        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
        if not tables:
            out[name] = [held_by_driver(part) for part in ds.split(world, equal=True)]
            continue
        # Ray's concat, not pyarrow's: a block whose rows all have one length holds a fixed-shape
        # tensor column, others a variable-shaped one, and pa.concat_tables refuses the mix
        table = concat(tables)
        if name == "train":
            table = table.take(np.random.default_rng(seed).permutation(table.num_rows))
        per = table.num_rows // world
        out[name] = [
            from_tables(
                [table.slice(r * per + i, min(BLOCK_ROWS, per - i)) for i in range(0, per, BLOCK_ROWS)]
                or [table.slice(0, 0)]
            )
            for r in range(world)
        ]
    return out


def held_by_driver(ds):
    """The dataset's blocks copied into objects this driver puts, so they live in its node's object
    store (spilled to its disk beyond it). Blocks left where the tokenizing tasks made them die with
    that worker node, and Ray's reconstruction then needs a CPU, which the restarted training
    worker group holds: a lost node deadlocked the restart (seen on the multi-node test cluster)."""
    import ray

    return ray.data.from_arrow_refs([ray.put(t) for t in ray.get(ds.to_arrow_refs())])


def fixed_shards(shards: dict[str, list]):
    """A DataConfig that gives rank i the i-th part of rank_shards, in every attempt."""
    from ray.train import DataConfig

    class FixedShards(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out: list[dict] = [{} for _ in range(world_size)]
            for name in datasets:
                parts = shards[name]
                if len(parts) != world_size:
                    raise ValueError(f"{name}: cut for {len(parts)} ranks, the run has {world_size} workers")
                for rank, part in enumerate(parts):
                    out[rank][name] = part.iterator()
            return out

    return FixedShards()


def preflight(cfg: PipelineConfig, base_path: str) -> None:
    """Build the model as the workers will (train/loop.build_model's LoRA through the same
    apply_lora), on the meta device: no weights, no memory, seconds even for a large model. A
    config or model error (a target module the model lacks, an adapter peft refuses) then fails
    the stage here with its message; inside the workers Ray Train would retry it max_failures
    times, each attempt restarting the worker group to hit the same error."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tailorlm.families import is_moe_config
    from tailorlm.models import local_model
    from tailorlm.train.moe import apply_lora

    config = AutoConfig.from_pretrained(local_model(base_path))
    ep = cfg.train.moe.expert_parallel
    if ep > 1:
        from tailorlm.train.expert_parallel import ds_section

        experts = next(
            (
                getattr(config, k, None)
                for k in ("n_routed_experts", "num_experts", "num_local_experts")
                if getattr(config, k, None)
            ),
            None,
        )
        if not experts:
            raise ValueError(f"train.moe.expert_parallel={ep}: {config.model_type} ({base_path}) has no experts")
        if experts % ep:
            raise ValueError(f"train.moe.expert_parallel={ep} must divide the model's {experts} experts")
        ds_section(config.model_type, ep)  # a family without an AutoEP preset fails here, by name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if cfg.train.method == "lora":
            try:
                apply_lora(model, cfg.train.lora, is_moe_config(config))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"train.lora does not fit {config.model_type} ({base_path}): {e}") from None


def prepare(cfg: PipelineConfig, kept_uri: str, build_comm: bool = True, check_model: bool = True) -> dict[str, Any]:
    """Everything a training run needs before the trainer starts: base model, tokenized splits, steps.
    build_comm False leaves DeepSpeed's CPU comm op (and its import) to the process that trains
    (a fast-path Tune trial builds it there); check_model False leaves preflight to it too (its torch
    and transformers model imports were ~4 s of a sweep's prepare, in a driver that needs neither)."""
    import ray

    from tailorlm.models import resolve_base
    from tailorlm.train.ds_config import steps_for
    from tailorlm.train.formats import load_tokenizer_light
    from tailorlm.train.loop import build_shm_comm_once

    tc = cfg.train
    cpus = int(ray.cluster_resources().get("CPU", 1))
    base_path = resolve_base(cfg.model, cfg.run.storage)
    if check_model:
        preflight(cfg, base_path)
    tok = load_tokenizer_light(base_path, cfg.model.chat_template)
    shards = rank_shards(tokenized_splits(cfg, kept_uri, base_path, cpus), tc.num_workers, cfg.run.seed)
    # what Train is given by name; the rows each rank reads come from the shards (fixed_shards)
    splits = {name: parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0] for name, parts in shards.items()}
    n_train = sum(p.count() for p in shards["train"])  # from the parts' block metadata: no Ray Data run
    steps_per_epoch, total_steps = steps_for(tc, n_train, tc.num_workers)
    n_eval = sum(p.count() for p in shards["eval"])
    print(
        f"[train] {n_train} train / {n_eval} eval sequences; {steps_per_epoch} steps per "
        f"epoch, {total_steps} steps; global batch {tc.global_batch_size}"
    )
    if build_comm and not tc.use_gpu:
        build_shm_comm_once()
    return {
        "splits": splits,
        "shards": shards,
        "base_path": base_path,
        "pad_id": tok.pad_token_id,
        "total_steps": total_steps,
        "n_train": n_train,
    }


def make_trainer(
    cfg: PipelineConfig,
    prep: dict[str, Any],
    storage_uri: str,
    name: str,
    tensorboard_dir: str | None = None,
    callbacks: list | None = None,
    local_ranks: int = 0,
    checkpoints: bool = True,
    phases: dict | None = None,
    tag: str = "[train]",
):
    """The TorchTrainer for one training run (the train stage, or one Tune trial).

    local_ranks > 0: Ray Train's local mode (num_workers=0), the loop in this process reporting
    to Tune, standing in for that many workers over prep's rank shards (a fast-path Tune trial;
    cfg then has num_workers 1 and grad_accum x local_ranks, see tune/stage.py)."""
    import time

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tailorlm.train.loop import train_loop_per_worker

    tc = cfg.train
    loop_config = {
        "cfg": cfg.to_dict(),
        "base_path": prep["base_path"],
        "total_steps": prep["total_steps"],
        "pad_id": prep["pad_id"],
        "tensorboard_dir": tensorboard_dir,
        "checkpoints": checkpoints,
        "t_fit": time.time(),  # the loop's start-up breakdown counts from here
        "phases": phases or {},  # seconds the caller spent before (the tune benchmark's breakdown)
        "tag": tag,  # the loop's progress lines start with it (a Tune trial names itself)
    }
    if local_ranks:
        # Ray Train's base trainer, not TorchTrainer: TorchTrainer's local mode destroys the
        # torch.distributed world at the end of every fit, which a reused Tune process needs kept
        # (tune/stage.world_of_one makes it once)
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        return DataParallelTrainer(
            train_loop_per_worker,
            train_loop_config={**loop_config, "ranks": local_ranks, "report": "tune"},
            scaling_config=ScalingConfig(num_workers=0),
            run_config=RunConfig(name=name, storage_path=storage_uri),
            datasets={f"{n}_{r}": part for n, parts in prep["shards"].items() for r, part in enumerate(parts)},
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_uri,
            callbacks=callbacks,
            # Ray starts workers at niceness 15; training workers would then yield
            # to any normal-priority process on the node (Ray's own agents included)
            worker_runtime_env={"env_vars": {"RAY_worker_niceness": "0"}},
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.keep_checkpoints, checkpoint_score_attribute="eval_loss", checkpoint_score_order="min"
            ),
        ),
        datasets=prep["splits"],
        dataset_config=fixed_shards(prep["shards"]),
    )
