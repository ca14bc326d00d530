"""The one pipeline config: strict typed models, YAML loading and dotted overrides.

Every key is declared; an unknown or mistyped key is an error naming the key and what is allowed.
The CLI (`train.lr=3e-4`) and Tune (sampled values) change the config through `apply_overrides`,
so there is one way to change a setting. Only pydantic and yaml are imported here: parsing a config
must not pull in torch, deepspeed or vllm.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key, the value and what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- run
class RunConfig(Strict):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run folder name")
    storage: str = Field("./runs", description="local path or fsspec/pyarrow URI (s3://bucket/prefix)")
    seed: int = Field(0, description="one seed for data splits, model init and training order")
    storage_timeout_s: float = Field(
        60,
        gt=0,
        description="remote run.storage (s3:// etc.) that answers no request for this long fails the "
        "running stage, naming the storage (else Ray would retry the stage's tasks until it is back)",
    )


# ----------------------------------------------------------------------------- model
class TinyModelSpec(Strict):
    """A small causal LM built from a config with a locally trained BPE tokenizer."""

    factory: Literal["llama", "qwen2", "deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral"] = Field(
        "llama",
        description="architecture of the tiny random-init model (families.py); the last five are Mixture-of-Experts",
    )
    hidden_size: int = Field(128, ge=32, description="model width")
    num_layers: int = Field(2, ge=1, description="transformer blocks")
    num_heads: int = Field(4, ge=1, description="attention heads; hidden_size / num_heads >= 32 for vLLM on CPU")
    num_kv_heads: int | None = Field(None, ge=1, description="defaults to num_heads (no GQA)")
    intermediate_size: int | None = Field(None, ge=1, description="defaults to 4 * hidden_size")
    vocab_size: int = Field(2048, ge=300, description="upper bound of the trained BPE vocabulary")
    max_position_embeddings: int = Field(1024, ge=64, description="longest sequence the model accepts")
    tokenizer_corpus: str = Field(
        "demo", description="'demo' (the generated domain corpus) or a text/JSONL file to train BPE on"
    )
    seed: int = Field(0, description="seed of the random initialization")
    # Mixture-of-Experts families only (refused on a dense factory)
    num_experts: int | None = Field(None, ge=2, description="MoE: routed experts per layer (default 8)")
    experts_per_token: int | None = Field(None, ge=1, description="MoE: experts each token is routed to (default 2)")
    shared_experts: int | None = Field(
        None, ge=0, description="MoE: always-on shared experts (DeepSeek, Qwen2-MoE; default 1)"
    )
    first_dense_layers: int | None = Field(
        None, ge=0, description="MoE: leading layers with a dense MLP instead of experts (default 1 for DeepSeek)"
    )
    moe_intermediate_size: int | None = Field(None, ge=1, description="MoE: width of one expert (default hidden_size)")

    @model_validator(mode="after")
    def _check_moe(self) -> "TinyModelSpec":
        from tailorlm.families import FAMILIES

        moe_keys = ("num_experts", "experts_per_token", "shared_experts", "first_dense_layers", "moe_intermediate_size")
        if not FAMILIES[self.factory].moe:
            given = [k for k in moe_keys if getattr(self, k) is not None]
            if given:
                raise ValueError(f"model.base.{given[0]}: only for Mixture-of-Experts factories, not {self.factory}")
            return self
        no_shared = self.factory in ("qwen3_moe", "mixtral")
        if no_shared and self.shared_experts:
            raise ValueError(f"model.base.shared_experts: {self.factory} has no shared experts")
        defaults = {"num_experts": 8, "experts_per_token": 2, "shared_experts": 0 if no_shared else 1}
        defaults["first_dense_layers"] = 1 if self.factory.startswith("deepseek") and self.num_layers > 1 else 0
        for k, v in defaults.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"model.base.experts_per_token={self.experts_per_token} exceeds num_experts={self.num_experts}"
            )
        if self.first_dense_layers >= self.num_layers:
            raise ValueError(
                f"model.base.first_dense_layers={self.first_dense_layers} leaves no MoE layer of {self.num_layers}"
            )
        if self.factory == "qwen2_moe" and self.shared_experts != 1:
            raise ValueError(
                f"model.base.shared_experts={self.shared_experts}: qwen2_moe has exactly one (gated) shared expert; "
                "set its width with moe_intermediate_size"
            )
        if self.factory == "mixtral" and self.intermediate_size is not None:
            raise ValueError("model.base.intermediate_size: mixtral has no dense MLP; use moe_intermediate_size")
        if self.factory == "mixtral" and self.first_dense_layers:
            raise ValueError("model.base.first_dense_layers: mixtral has experts in every layer")
        return self

    @model_validator(mode="after")
    def _check_heads(self) -> "TinyModelSpec":
        if self.factory.startswith("deepseek"):
            # MLA: per-head sizes are the factory's (families.py), not hidden_size / num_heads.
            # vLLM's CPU MLA decode gave wrong tokens after the first with 4 or 8 heads, right
            # ones with 16 (seen on every trained tiny DeepSeek model)
            if "num_heads" not in self.model_fields_set:
                self.num_heads = 16
            if self.num_heads % 16:
                raise ValueError(
                    f"model.base.num_heads={self.num_heads}: {self.factory} (MLA) needs a multiple of 16; "
                    "vLLM's CPU MLA decode answers wrong with fewer heads"
                )
            if self.num_kv_heads not in (None, self.num_heads):
                raise ValueError(f"model.base.num_kv_heads: {self.factory} (MLA) has no grouped-query attention")
            return self
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        head = self.hidden_size // self.num_heads
        if head < 32:
            raise ValueError(
                f"attention head size hidden_size/num_heads = {head}; it must be >= 32 (vLLM's CPU backend rejects 16)"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={kv}")
        return self


# A mapping is a factory spec, anything else a hub id or path: one error path, not two.
BaseSpec = Annotated[
    Union[Annotated[TinyModelSpec, Tag("TinyModelSpec")], Annotated[str, Tag("Str")]],
    Discriminator(lambda v: "TinyModelSpec" if isinstance(v, (dict, TinyModelSpec)) else "Str"),
]


class ModelConfig(Strict):
    base: BaseSpec = Field(
        default_factory=lambda: TinyModelSpec(factory="llama"),
        description="hub id (Qwen/Qwen2.5-0.5B), a local HF folder, or a tiny-model factory spec",
    )
    chat_template: str | None = Field(None, description="Jinja chat template overriding the model's")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype to load weights in (auto: the checkpoint's)"
    )


# ----------------------------------------------------------------------------- data
class SourceConfig(Strict):
    path: str = Field(..., description="file, folder, glob or URI")
    format: Literal["auto", "jsonl", "json", "parquet", "text"] = Field(
        "auto", description="file format; auto: from the extension"
    )
    kind: Literal["auto", "text", "alpaca", "chat"] = Field(
        "auto", description="row shape; auto: from the fields (text | instruction/output | messages)"
    )


class FilterConfig(Strict):
    min_chars: int = Field(20, ge=0, description="shorter rows are dropped")
    max_chars: int = Field(100_000, ge=1, description="longer rows are dropped")
    min_tokens: int = Field(32, ge=0, description="rows with fewer tokens are dropped (0: off, no tokenizing)")
    max_tokens: int | None = Field(
        2048, ge=1, description="rows with more tokens are dropped (null: off; with min_tokens 0, no tokenizing)"
    )
    languages: list[str] = Field(default_factory=lambda: ["en", "zh"], description="ISO 639-1; [] = any")
    min_language_score: float = Field(
        0.5, ge=0, le=1, description="fastText language confidence below this drops a row"
    )
    quality: bool = Field(True, description="Gopher-style quality heuristics (the fields below)")
    quality_min_words: int = Field(50, ge=0, description="repetition/stopword rules need this many words (Gopher: 50)")
    max_duplicate_line_fraction: float = Field(
        0.3, ge=0, le=1, description="share of repeated lines above which a row is dropped"
    )
    max_top_ngram_fraction: float = Field(0.2, ge=0, le=1, description="share of text in the most frequent 2-gram")
    max_symbol_ratio: float = Field(0.1, ge=0, le=1, description="symbols (#, ...) per word")
    min_mean_word_length: float = Field(3.0, ge=0, description="shortest mean word length kept")
    max_mean_word_length: float = Field(10.0, ge=1, description="longest mean word length kept")
    min_stopwords: int = Field(2, ge=0, description="English only; Gopher uses 2")
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1, description="share of words with a letter")
    domain_keywords: list[str] = Field(default_factory=list, description="TF-IDF relevance; [] = off")
    domain_reference: str | None = Field(None, description="reference corpus file for TF-IDF relevance")
    min_domain_score: float = Field(
        0.05, ge=0, le=1, description="TF-IDF similarity to domain_reference below which a row is dropped"
    )
    max_perplexity: float | None = Field(
        None,
        gt=1,
        description="drop rows whose perplexity under perplexity_model is above this (CCNet-style); null = off",
    )
    perplexity_model: str | None = Field(
        None, description="HF causal LM (path or hub id) for the perplexity filter; default: the pipeline's base model"
    )
    perplexity_max_tokens: int = Field(256, ge=2, description="score only each document's first N tokens")


class PIIConfig(Strict):
    enabled: bool = Field(True, description="find and redact personal data")
    kinds: list[Literal["email", "phone", "ip", "credit_card", "id_number"]] = Field(
        default_factory=lambda: ["email", "phone", "ip", "credit_card", "id_number"],
        description="kinds of personal data to find",
    )


class NearDedupConfig(Strict):
    """Defaults from `python -m tailorlm.bench.dedup quality --sweep` (10k documents, 1000 planted
    copies): Jaccard 0.5 on word 5-grams with 32 x 4 bands finds copies with up to ~5% of their
    words substituted, inserted, deleted or swapped, shuffled blocks and truncations up to 40%
    (planted recall 0.80 at precision 1.000; 0.8 on 5-grams with 16 x 8 bands: 0.51; datatrove's and
    Data-Juicer's unverified 16 x 8 buckets: 0.67). Copies with 10% of their words changed (5-gram
    Jaccard ~0.45) are mostly kept: templated documents that differ in a few facts score the same."""

    enabled: bool = Field(True, description="MinHash-LSH near-duplicate removal")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (>= bands x rows)")
    bands: int = Field(
        32,
        ge=1,
        description="LSH bands: a pair with Jaccard J becomes a candidate with probability "
        "1-(1-J^rows)^bands (32 x 4: 0.87 at J 0.5, 0.99 at 0.6; 16 x 8: 0.06 at 0.5); more bands find "
        "lower J at the cost of more candidate pairs",
    )
    rows: int = Field(4, ge=1, description="rows per LSH band (fewer rows = more candidates at low Jaccard)")
    threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="shingle Jaccard at or above which two rows are duplicates; 0.5 on word 5-grams is about "
        "5% of the words substituted, inserted or deleted (0.8: about 2%; 0.4: about 10%, and templated "
        "documents that differ in a few facts start to merge)",
    )
    ngram: int = Field(
        5,
        ge=1,
        description="word n-gram size (CJK text uses character n-grams); a smaller n gives edited copies, and "
        "templated documents alike, a higher Jaccard",
    )
    cjk_ngram: int = Field(5, ge=1, description="character n-gram size for text without spaces (CJK)")
    verify: Literal["exact", "estimated"] = Field(
        "exact",
        description="check candidate pairs against the exact shingle Jaccard after the MinHash "
        "estimate (NeMo Curator's false-positive check: precision and recall near the threshold), or "
        "against the estimate alone (no second look at the candidates' text)",
    )

    @model_validator(mode="after")
    def _check_banding(self) -> "NearDedupConfig":
        if self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"bands*rows = {self.bands}*{self.rows} = {self.bands * self.rows} exceeds num_perm={self.num_perm}"
            )
        return self


class DedupConfig(Strict):
    exact: bool = Field(True, description="drop exact copies (after normalization)")
    near: NearDedupConfig = Field(default_factory=NearDedupConfig)


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(path="demo")],
        description="inputs: files, globs, folders or URIs; 'demo' = the generated set",
    )
    normalize: bool = Field(True, description="repair text (ftfy), normalize Unicode and whitespace")
    filters: FilterConfig = Field(default_factory=FilterConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontaminate: bool = Field(True, description="drop training rows that near-duplicate an eval row")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of rows held out for evaluation")
    tokenizer: str | None = Field(None, description="tokenizer for token-length filters; default: the model's")
    in_process_max_mb: float = Field(
        8.0,
        ge=0,
        description="inputs up to this size (MB; gzip counted 4x) run in the driver process, without "
        "Ray Data, whose start-up outweighs their work; 0: always Ray Data",
    )


# ----------------------------------------------------------------------------- train
class LoraConfig(Strict):
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="adapter scaling (alpha / r)")
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="dropout on the adapter's input; null: 0.05, or 0 with target_experts (peft refuses it there)",
    )
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear",
        description="modules that get adapters; all-linear on a MoE: attention, dense and shared-expert MLPs, "
        "no router",
    )
    target_experts: bool = Field(
        False, description="MoE: adapt the routed experts' fused weights too (peft target_parameters)"
    )

    @model_validator(mode="after")
    def _dropout_fits(self) -> "LoraConfig":
        if self.target_experts and self.dropout:
            raise ValueError(
                f"train.lora.dropout={self.dropout}: peft's expert adapters (target_experts) take no dropout; "
                "set 0 or leave it null"
            )
        return self


def lora_dropout(lora: LoraConfig) -> float:
    """The dropout peft gets: as set, else 0.05, or 0 where adapters wrap expert parameters."""
    if lora.dropout is not None:
        return lora.dropout
    return 0.0 if lora.target_experts else 0.05


class MoeTrainConfig(Strict):
    aux_loss_coef: float = Field(
        0.01,
        ge=0,
        description="weight of the load-balancing loss on Mixture-of-Experts models (the model's own on "
        "Qwen-MoE/Mixtral, the Switch form from router logits on DeepSeek); 0: off",
    )
    expert_parallel: int = Field(
        1,
        ge=1,
        description="ranks each MoE layer's routed experts are sharded over (DeepSpeed AutoEP; "
        "DeepSeek-V2/V3, Qwen3-MoE, Mixtral); 1: every rank holds every expert",
    )


class DeepSpeedConfig(Strict):
    stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 (DDP-like) to 3 (parameters sharded)")
    offload_optimizer: bool = Field(False, description="optimizer state in CPU memory")
    offload_params: bool = Field(False, description="parameters in CPU memory (ZeRO-3)")

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> "DeepSpeedConfig":
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage: 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs stage 1, 2 or 3")
        return self


class TrainConfig(Strict):
    method: Literal["lora", "full"] = Field("lora", description="lora: train an adapter; full: every weight")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    moe: MoeTrainConfig = Field(default_factory=MoeTrainConfig)
    format: Literal["auto", "text", "sft"] = Field(
        "auto", description="text: learn every token; sft: only the answers; auto: from the rows"
    )
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="training precision")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on GPU nodes)")
    use_gpu: bool = Field(False, description="train on GPUs")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs each worker reserves")
    micro_batch_size: int = Field(8, ge=1, description="sequences per worker per step")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_seq_len: int = Field(256, ge=16, description="longer sequences are truncated")
    packing: bool = Field(False, description="pack short sequences into max_seq_len rows")
    epochs: int = Field(1, ge=1, description="passes over the training split (unless max_steps)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    optimizer: Literal["adamw", "lion"] = Field("adamw", description="optimizer")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate schedule after warm-up"
    )
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clipping (0: off)")
    gradient_checkpointing: bool = Field(False, description="recompute activations (less memory, more time)")
    eval_every: int = Field(
        50,
        ge=1,
        description="optimizer steps between evaluations; each evaluation also "
        "writes a checkpoint (the one resume and the best-model choice use)",
    )
    log_every: int = Field(
        1, ge=1, description="optimizer steps between train-loss records in metrics.jsonl (and TensorBoard when on)"
    )
    tensorboard: bool = Field(True, description="also write TensorBoard event files (local run storage only)")
    keep_checkpoints: int = Field(2, ge=1, description="best checkpoints kept (by eval loss)")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from")
    merge_adapter: bool = Field(False, description="lora: also save the adapter merged into the base")

    @property
    def global_batch_size(self) -> int:
        """The one derived batch size: micro batch x gradient accumulation x workers."""
        return self.micro_batch_size * self.grad_accum * self.num_workers

    @model_validator(mode="after")
    def _expert_parallel_fits(self) -> "TrainConfig":
        ep = self.moe.expert_parallel
        if ep > 1 and self.num_workers % ep:
            raise ValueError(f"train.moe.expert_parallel={ep} must divide train.num_workers={self.num_workers}")
        if ep > 1 and self.deepspeed.stage == 3:
            raise ValueError(
                "train.moe.expert_parallel needs train.deepspeed.stage 0-2: our checkpoints gather "
                "AutoEP's experts, not ZeRO-3's partitions of them"
            )
        if ep > 1 and self.method == "lora":
            raise ValueError(
                "train.moe.expert_parallel needs train.method=full: AutoEP finds MoE blocks by their "
                "transformers names, which peft's wrapper changes (use ZeRO-3 with LoRA instead)"
            )
        return self


# ----------------------------------------------------------------------------- tune
DIMENSION_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


class Dimension(BaseModel):
    """One axis of the search space: `train.lr: {loguniform: [1.0e-4, 3.0e-3]}` parsed once."""

    model_config = ConfigDict(frozen=True)
    key: str  # a dotted config key, applied through the same override path as the CLI
    kind: Literal["loguniform", "uniform", "randint", "choice", "grid"]
    values: tuple[Any, ...]  # [low, high] for the ranges, the options for choice and grid

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"


class TuneConfig(Strict):
    enabled: bool = Field(False, description="sweep before training; train then uses the best trial")
    num_samples: int = Field(8, ge=1, description="trials (per grid point)")
    searcher: Literal["random", "grid", "optuna"] = Field("random", description="how trials are sampled")
    scheduler: Literal["asha", "median", "none"] = Field("asha", description="early stopping of weak trials")
    metric: Literal["eval_loss", "eval_ppl"] = Field(
        "eval_loss", description="what trials are ranked and stopped by (both measured on the eval split)"
    )
    mode: Literal["min", "max"] = Field("min", description="min: lower is better (both metrics are losses)")
    max_concurrent_trials: int = Field(1, ge=1, description="trials at once")
    grace_period: int = Field(1, ge=1, description="evaluations before ASHA may stop a trial")
    trial_max_steps: int | None = Field(
        None, ge=1, description="train.max_steps for each trial (short proxy runs); default: the full training length"
    )
    search_space: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="dotted key -> {loguniform|uniform: [lo, hi]} | {randint: [lo, hi]} | "
        "{choice: [...]} | {grid: [...]}",
    )

    def dimensions(self) -> list[Dimension]:
        """The search space as typed axes (validated when the config is)."""
        return [
            Dimension(key=key, kind=kind, values=tuple(values))
            for key, spec in self.search_space.items()
            for kind, values in spec.items()
        ]

    @model_validator(mode="after")
    def _check_space(self) -> "TuneConfig":
        for key, spec in self.search_space.items():
            if len(spec) != 1 or next(iter(spec)) not in DIMENSION_KINDS:
                raise ValueError(
                    f"search_space.{key}: expected one of {list(DIMENSION_KINDS)} with its values, got {spec}"
                )
            ((kind, values),) = spec.items()
            if not isinstance(values, list) or not values:
                raise ValueError(f"search_space.{key}.{kind}: expected a non-empty list, got {values!r}")
            if kind in ("loguniform", "uniform", "randint") and len(values) != 2:
                raise ValueError(f"search_space.{key}.{kind}: expected [low, high], got {values!r}")
        if self.mode != "min":
            raise ValueError(f"mode: {self.metric} is a loss: lower is better, so mode must be min")
        if self.searcher == "grid" and any(d.kind not in ("grid", "choice") for d in self.dimensions()):
            raise ValueError("searcher: grid needs every search_space entry to be a grid or choice list")
        return self


# ----------------------------------------------------------------------------- export
class ExportConfig(Strict):
    quantize: list[Literal["w8a8", "w4a16", "fp8"]] = Field(
        default_factory=lambda: ["w8a8", "w4a16"], description="compressed-tensors schemes to export besides bf16"
    )
    method: Literal["rtn", "gptq"] = Field(
        "gptq",
        description="gptq: calibrated on train rows of the data stage "
        "(integer schemes; fp8 stays round-to-nearest); rtn: round-to-nearest",
    )
    calibration_samples: int = Field(64, ge=1, description="train rows GPTQ calibrates on")
    max_ppl_increase: float = Field(0.02, ge=0, description="relative perplexity increase allowed")
    on_quality_fail: Literal["refuse", "warn"] = Field(
        "refuse", description="a variant over the perplexity limit: refuse or warn"
    )


# ----------------------------------------------------------------------------- serve
class GuardConfig(Strict):
    """serve.guard: who may call the endpoint, what one request may cost, what it may say."""

    api_keys_env: str = Field(
        "TAILORLM_API_KEYS",
        description="environment variable with comma-separated API "
        "keys; read by the CLI before Ray starts, never passed to Ray workers",
    )
    api_keys: list[str] = Field(default_factory=list, description="prefer api_keys_env; never logged")
    require_api_key: bool | None = Field(None, description="default: required when host is not localhost")
    allow_ips: list[str] = Field(
        default_factory=list, description="client address CIDRs allowed (checked before the key); empty: any address"
    )
    rate_limit_per_minute: int = Field(600, ge=1, description="requests per minute per API key (else per address)")
    tokens_per_minute: int = Field(
        200_000,
        ge=1,
        description="token budget per minute per API key: each request "
        "is charged its worst-case cost, prompt tokens + prompts x n x max output tokens",
    )
    auth_failures_per_minute: int = Field(
        20,
        ge=1,
        description="wrong API keys one client address may send "
        "per minute; beyond, 429 with Retry-After before any key is compared",
    )
    max_tokens_cap: int = Field(
        512,
        ge=1,
        description="cap on each output-length field (max_tokens, "
        "max_completion_tokens); a request that sets none gets it",
    )
    max_n: int = Field(4, ge=1, le=128, description="most choices (n) per request")
    max_prompts: int = Field(8, ge=1, description="most prompts in one /v1/completions request")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_json_depth: int = Field(32, ge=4, le=256, description="deepest nesting of a request body")
    body_timeout_s: float = Field(10, gt=0, description="a request body not received within this time gets 408")
    blocklist: list[str] = Field(default_factory=list, description="regexes; a matching prompt is rejected (400)")
    response_blocklist: list[str] = Field(
        default_factory=list,
        description="regexes; a matching answer is withheld (content_filter error; streams end at the match)",
    )
    openapi_schema: bool = Field(
        False,
        description="serve /openapi.json (the allow-listed routes only, behind "
        "the key); vLLM's /docs and its own schema are never served",
    )

    @model_validator(mode="after")
    def _check(self) -> "GuardConfig":
        for cidr in self.allow_ips:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"allow_ips: {cidr!r} is not an IP address or CIDR: {exc}") from exc
        for pattern in self.blocklist + self.response_blocklist:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"blocklist: invalid regex {pattern!r}: {exc}") from exc
        return self


class AbConfig(Strict):
    """serve.ab: an A/B split of requests for serve.model_id between hosted models."""

    split: dict[str, float] = Field(
        default_factory=dict, description="hosted model -> weight, e.g. {demo: 0.9, demo-w4a16: 0.1}; empty: no split"
    )
    sticky: bool = Field(True, description="a client (API key, else address) always gets the same model")


class CaptureConfig(Strict):
    """serve.capture: served traffic written to <run>/capture/ as Parquet (for `tailorlm monitor`
    and continual training), off the request path, PII redacted before anything is written."""

    enabled: bool = Field(False, description="record requests and responses, and accept POST /v1/feedback")
    sample_rate: float = Field(1.0, ge=0, le=1, description="share of generating requests recorded")
    batch_rows: int = Field(256, ge=1, le=100_000, description="rows per Parquet file at most (rotation by size)")
    flush_s: float = Field(5.0, gt=0, le=3600, description="pending rows are written at least this often (by time)")
    queue_rows: int = Field(
        10_000, ge=1, description="rows held in memory awaiting a write; beyond, rows are dropped and counted"
    )
    max_text_chars: int = Field(20_000, ge=100, description="prompt and answer text kept per row, at most")


class ShadowConfig(Strict):
    """serve.shadow: a candidate version answering a copy of live requests, never returned."""

    version: str | None = Field(
        None, description="a registered version (e.g. 1.1.0) hosted beside the served one as <model_id>-shadow"
    )
    share: float = Field(0.1, ge=0, le=1, description="share of requests for model_id mirrored to it")


class EngineConfig(Strict):
    """serve.engine: how vLLM runs each hosted model."""

    max_model_len: int = Field(1024, ge=64, description="context length (prompt + output tokens)")
    use_gpu: bool = Field(False, description="one GPU per hosted model")
    memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM gpu_memory_utilization; on CPU the fraction of RAM vLLM reserves. "
        "default: 0.9 on GPU, 0.15 on CPU",
    )
    max_lora_rank: int = Field(16, ge=1, description="largest LoRA rank among serve.lora_adapters")
    args: dict[str, Any] = Field(
        default_factory=dict, description="backend vllm: further `vllm serve` flags, e.g. {enable-prefix-caching: true}"
    )

    def dtype(self) -> str:
        return "auto" if self.use_gpu else "bfloat16"

    def memory_share(self) -> float:
        """vLLM's gpu_memory_utilization; on CPU vLLM reads it as the share of RAM to reserve (its
        default, 0.92, is a whole machine)."""
        return self.memory_utilization or (0.9 if self.use_gpu else 0.15)


class ReplicasConfig(Strict):
    """serve.replicas: how many replicas, and how much each takes on."""

    min: int = Field(1, ge=0, description="fewest replicas the autoscaler keeps")
    max: int = Field(1, ge=1, description="most replicas; more than 1 needs Serve's proxy (no direct ingress)")
    target_ongoing_requests: int = Field(8, ge=1, description="the autoscaler's target per replica")
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests one replica's engine runs at once (the guard admits this + max_queued_requests)"
    )
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="requests per replica waiting beside the running ones; beyond both, 503 with Retry-After at once",
    )
    cpus: float = Field(
        1, ge=0, description="CPUs each replica reserves (backend vllm; vLLM's engine process runs beside it)"
    )


class ServeConfig(Strict):
    model_id: str = Field("demo", description="the name clients ask for (the first variant)")
    host: str = Field("127.0.0.1", description="address to bind; beyond localhost, API keys become mandatory")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the endpoint")
    variants: list[Literal["bf16", "w8a8", "w4a16", "fp8"]] = Field(
        default_factory=lambda: ["bf16"],
        description="exported variants to host; the first is model_id, the others model_id-<variant>",
    )
    keep_serving: bool = Field(
        False, description="true: serve until interrupted; false: answer the sample request and shut down"
    )
    backend: Literal["vllm", "ray_llm"] = Field(
        "vllm",
        description="vllm: one replica runs vLLM's OpenAI app around AsyncLLM (fastest; local LoRA "
        "adapters); ray_llm: ray.serve.llm (engines spread over several GPUs)",
    )
    lora_adapters: dict[str, str] = Field(
        default_factory=dict,
        description="backend vllm: LoRA adapters served on model_id, as {name: local peft folder}; addressed by name",
    )
    stream_batching_ms: float = Field(
        0,
        ge=0,
        description="streamed chunks that come faster than one per "
        "this many ms leave the replica merged (fewer messages through the Ray "
        "Serve proxy); backend vllm sends the first chunks and any after a pause "
        "at once, ray_llm batches from the first (adds to time to first token); "
        "0 sends every chunk as it comes",
    )
    controller_loop_s: float = Field(
        0.5,
        gt=0,
        le=10,
        description="period of the Ray Serve controller's control loop when `tailorlm serve` "
        "starts the controller (Ray's default: 0.1). Each pass queries the GCS; at 0.1 s the controller and "
        "GCS took ~5% of a core that token generation needed on 2 CPUs. Replica starts, health and "
        "autoscaling decisions are noticed up to this much later",
    )
    direct_ingress: bool | None = Field(
        None,
        description="the replica answers HTTP on serve.port itself, without the hop through Ray "
        "Serve's proxy (Ray's direct ingress; `tailorlm serve` only, the proxy moves to port + 1); null: on "
        "for backend vllm with replicas.max 1, the only case where no proxy is needed to spread load",
    )
    guard: GuardConfig = Field(default_factory=GuardConfig)
    ab: AbConfig = Field(default_factory=AbConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    replicas: ReplicasConfig = Field(default_factory=ReplicasConfig)

    def guard_capacity(self) -> int:
        """Requests the guard admits into one replica at once: those the engine runs plus those it
        queues. Beyond, it answers 503 with Retry-After at once (Ray Serve's own limits are set
        above this, so its text/plain 503 never comes first)."""
        return self.replicas.max_ongoing_requests + self.replicas.max_queued_requests

    def uses_direct_ingress(self) -> bool:
        if self.direct_ingress is not None:
            return self.direct_ingress
        return self.backend == "vllm" and self.replicas.max == 1

    def hosted_ids(self) -> list[str]:
        """Model names the endpoint serves: model_id for the first variant, model_id-<variant> after."""
        return [self.model_id] + [f"{self.model_id}-{v}" for v in self.variants[1:]]

    def shadow_id(self) -> str | None:
        """The model name the shadow candidate is hosted under (clients may also ask it directly)."""
        return f"{self.model_id}-shadow" if self.shadow.version else None

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.shadow.version and not self.capture.enabled:
            raise ValueError(
                "shadow.version: the shadow's answers are recorded by serve.capture; set serve.capture.enabled=true"
            )
        for model, weight in self.ab.split.items():
            if model not in self.hosted_ids():
                raise ValueError(
                    f"ab.split: {model!r} is not a hosted model; hosted: {self.hosted_ids()} "
                    f"(add its variant to serve.variants)"
                )
            if weight <= 0:
                raise ValueError(f"ab.split.{model}: weight must be > 0, got {weight}")
        if self.lora_adapters and self.backend != "vllm":
            raise ValueError(
                "lora_adapters: local adapters need serve.backend=vllm (ray.serve.llm loads "
                "adapters from s3/gs/azure only)"
            )
        if self.direct_ingress and (self.backend != "vllm" or self.replicas.max > 1):
            raise ValueError(
                f"direct_ingress: true needs serve.backend=vllm and serve.replicas.max=1 (got "
                f"{self.backend} and {self.replicas.max}): several replicas need the proxy to "
                "spread requests; set direct_ingress: false"
            )
        return self


# ----------------------------------------------------------------------------- root


EXECUTION_ONLY = {("data", "in_process_max_mb"), ("run", "storage_timeout_s")}


# ----------------------------------------------------------------------------- continual
class ContinualConfig(Strict):
    """continual: the next training slice from a served run (continual.py), read by the data stage
    where data.sources names `continual`."""

    from_run: str | None = Field(None, description="the served run (in run.storage) whose traffic and data to use")
    min_score: float = Field(1.0, description="captured answers with a feedback score at least this are kept")
    corrections: str | None = Field(
        None, description="JSONL of corrected rows ({messages} or {prompt, answer}) to learn as well"
    )
    replay_share: float = Field(
        0.5, ge=0, lt=1, description="share of the slice made of the previous run's training rows (against forgetting)"
    )


# ----------------------------------------------------------------------------- monitor
class MonitorConfig(Strict):
    """monitor: served traffic (serve.capture) against the training data (`tailorlm monitor`)."""

    enabled: bool = Field(False, description="`tailorlm run` runs the monitor after serve (`tailorlm monitor` always)")
    window_rows: int = Field(500, ge=1, description="the newest captured requests one check compares")
    min_rows: int = Field(20, ge=1, description="fewer captured requests than this: the check refuses to judge")
    kl_alert: float = Field(
        0.15,
        gt=0,
        description="alert when the window's unigram KL to training, above a same-size training sample's, "
        "reaches this (nats)",
    )
    smoothing: float = Field(0.1, gt=0, description="additive smoothing of both word distributions")
    baseline_samples: int = Field(
        5, ge=1, le=100, description="same-size samples of training prompts that estimate the KL of no drift"
    )
    quality: bool = Field(
        False, description="also ask the live endpoint the held-out eval questions and track fact exact match"
    )
    endpoint: str | None = Field(None, description="the endpoint's /v1 URL for quality; null: serve.host:serve.port")
    eval_rows: int = Field(64, ge=1, description="held-out questions one quality check asks")
    quality_drop: float = Field(
        0.02, ge=0, lt=1, description="relative drop below the promoted model's score that counts"
    )
    quality_checks: int = Field(3, ge=1, description="consecutive low checks before a quality alert")
    max_p95_ratio: float = Field(
        1.1, gt=0, description="promotion rule: the shadow's p95 latency at most this times the live model's"
    )
    auto_promote: bool = Field(False, description="promote the shadow version when it passes the promotion rule")


class PipelineConfig(Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)

    @model_validator(mode="after")
    def _moe_serving(self) -> "PipelineConfig":
        from tailorlm.families import FAMILIES

        base = self.model.base
        if isinstance(base, TinyModelSpec) and FAMILIES[base.factory].moe:
            if self.serve.lora_adapters and not self.serve.engine.use_gpu:
                raise ValueError(
                    f"serve.lora_adapters: vLLM's CPU build cannot serve LoRA on a Mixture-of-Experts base "
                    f"({base.factory}); serve the merged model (train.merge_adapter: true) instead"
                )
            quantized = [v for v in self.serve.variants if v != "bf16"]
            if base.factory.startswith("deepseek") and quantized and not self.serve.engine.use_gpu:
                raise ValueError(
                    f"serve.variants: {', '.join(quantized)} of {base.factory} cannot be served by vLLM's CPU "
                    "build (its int8/int4 MoE kernels route only softmax top-k, not DeepSeek's routing); "
                    "serve bf16 on CPU, or set serve.engine.use_gpu"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections, to tell whether a finished stage's inputs changed. Fields
        that only say how a stage runs (EXECUTION_ONLY) are left out: changing them changes no output."""
        d = self.to_dict()
        picked = {s: {k: v for k, v in d[s].items() if (s, k) not in EXECUTION_ONLY} for s in sections}
        blob = json.dumps(picked, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- errors
def _models_in(tp: Any) -> list[type[BaseModel]]:
    """Pydantic model classes inside a type annotation (through Union, Annotated, list, dict)."""
    from typing import get_args

    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in get_args(tp) for m in _models_in(arg)]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field path `loc`, to list its allowed keys."""
    model: type[BaseModel] | None = PipelineConfig
    for part in loc:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return model
        found = _models_in(field.annotation)
        model = found[0] if found else None
    return model


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: the dotted key, what was given and what is allowed."""
    lines = []
    seen = set()
    for e in err.errors():
        # Union members add their class name to loc ('TinyModelSpec'); drop it for the dotted key.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p[:1].isupper()))
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?)" if close else ""
            msg = f"unknown key '{key}'{hint}; allowed keys here: {', '.join(allowed)}"
        else:
            given = e.get("input")
            given_s = "" if isinstance(given, dict) else f" (got {given!r})"
            msg = f"'{key}': {e['msg']}{given_s}"
        if msg not in seen:
            seen.add(msg)
            lines.append(msg)
    return "invalid config:\n  " + "\n  ".join(lines)


# ----------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ('train.lr', 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from None
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating intermediate dicts; validation happens afterwards."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"override {key}: '{prefix}' is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Return a copy of a raw config dict with dotted overrides applied (CLI strings or a dict)."""
    out = copy.deepcopy(raw)
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else overrides.items()
    for key, value in items:
        set_dotted(out, key, value)
    return out


def validate(raw: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {p} must be a mapping of sections ({', '.join(PipelineConfig.model_fields)})")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Load YAML (or defaults when path is None), apply dotted overrides, validate strictly."""
    raw = read_yaml(path) if path else {}
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate(raw)


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
