"""Tiny models from a config, and one loading path for hub ids, local folders and factory specs.

No model can be downloaded on our machines, so the factory trains a byte-level BPE tokenizer on a
local corpus, builds a small causal LM of a families.py family (dense or MoE) from a config, adds
a ChatML chat template, and saves it in Hugging Face format with safetensors. `resolve_base` turns `model.base` into
something `from_pretrained` accepts, so the same code loads `Qwen/Qwen2.5-0.5B` on a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from tailorlm.config import ModelConfig, TinyModelSpec

# ChatML, as Qwen2 uses: one template for training, export and serving, saved with the tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
READY = "_READY"


def cache_root() -> Path:
    return Path(os.environ.get("TAILORLM_CACHE", Path.home() / ".cache" / "tailorlm"))


def spec_hash(spec: TinyModelSpec) -> str:
    key = spec.model_dump(mode="json")
    if spec.tokenizer_corpus == "demo":
        from tailorlm.demo_data import VERSION

        key["demo_version"] = VERSION
    else:  # a corpus file: its content decides the tokenizer
        key["corpus_sha"] = hashlib.sha256(Path(spec.tokenizer_corpus).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _corpus(spec: TinyModelSpec) -> Iterable[str]:
    if spec.tokenizer_corpus == "demo":
        from tailorlm.demo_data import corpus_texts

        return corpus_texts(seed=spec.seed)
    path = Path(spec.tokenizer_corpus)
    if not path.is_file():
        raise FileNotFoundError(f"model.base.tokenizer_corpus: {path} is not a file (or use 'demo')")
    if path.suffix == ".jsonl":
        texts = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            texts.append(" ".join(str(v) for v in rec.values() if isinstance(v, str)))
        return texts
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (the GPT-2/Qwen family's scheme) trained on texts, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )


def build_tiny_model(spec: TinyModelSpec, out_dir: str | Path) -> Path:
    """Train the tokenizer, build the model from the spec, save both in HF format (safetensors)."""
    import torch
    import transformers
    from transformers import GenerationConfig

    from tailorlm.families import FAMILIES, patch_for_vllm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_corpus(spec), spec.vocab_size)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eos,
        pad_token_id=eot,
        dtype="bfloat16",
    )
    family = FAMILIES[spec.factory]
    config = getattr(transformers, family.config_class)(**{**common, **family.shape(spec)})
    torch.manual_seed(spec.seed)
    model = getattr(transformers, family.model_class)(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[eos, eot], pad_token_id=eot, bos_token_id=eot)
    model.save_pretrained(out)
    patch_for_vllm(out)
    tokenizer.save_pretrained(out)
    (out / "tailorlm_spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    return out


def ensure_tiny_model(spec: TinyModelSpec, root: Path | None = None) -> Path:
    """Build the factory model once per spec into the local cache; later calls reuse it."""
    out = (root or cache_root() / "models") / f"{spec.factory}-{spec_hash(spec)}"
    if (out / READY).exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    build_tiny_model(spec, tmp)
    (tmp / READY).write_text("ok")
    try:
        tmp.rename(out)
    except OSError:  # another process built it first; theirs is identical (same spec and seed)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base(model: ModelConfig, storage: str | None = None) -> str:
    """`model.base` -> a local folder, a hub id or a storage URI; `load_model`/`load_tokenizer`
    take each of them on any node. A factory model is built here once; with remote run storage
    (`run.storage`, s3:// and the like) it is published there, since the processes that load it
    may run on other nodes, whose disks do not hold this one's cache."""
    base = model.base
    if isinstance(base, TinyModelSpec):
        from tailorlm.runs import is_remote

        if storage is not None and is_remote(storage):
            return publish_model(base, storage)
        return str(ensure_tiny_model(base))
    if base.startswith("promoted:"):  # a served run's promoted export (continual.py)
        from tailorlm.continual import promoted_base

        return promoted_base(base, storage)
    if Path(base).expanduser().is_dir():
        return str(Path(base).expanduser().resolve())
    if base.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model.base: local folder {base} does not exist")
    return base  # a hub id: transformers resolves (and caches) it


def publish_model(spec: TinyModelSpec, storage: str) -> str:
    """The factory model in `<storage>/_models/<name>/`, built and uploaded by the first process
    that needs it; `_READY` goes last, so a folder without it is an upload cut short, redone."""
    from fsspec.core import url_to_fs

    from tailorlm.runs import join

    uri = join(storage, "_models", f"{spec.factory}-{spec_hash(spec)}")
    fs, path = url_to_fs(uri)
    if not fs.exists(join(path, READY)):
        folder = ensure_tiny_model(spec)
        fs.put([str(f) for f in sorted(folder.iterdir()) if f.name != READY], path + "/", recursive=True)
        fs.pipe(join(path, READY), b"ok")
    return uri


def local_model(uri: str) -> str:
    """A local folder or hub id as it is; a model folder in remote storage copied into this
    node's cache (transformers and vLLM load local folders). The copy is named by the remote
    files' sizes and ETags/mtimes, not just the URI: a rerun that overwrites `train/model/`
    must not be served from the copy of the old one."""
    from tailorlm.runs import is_remote, local_path

    if not is_remote(uri):
        return local_path(uri) if "://" in uri else uri
    import shutil

    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri)
    files = fs.find(path, detail=True)
    if not files:
        raise FileNotFoundError(f"{uri}: no model files there")
    stamp = sorted(
        (n, i.get("size"), str(i.get("ETag") or i.get("mtime") or i.get("LastModified") or i.get("created")))
        for n, i in files.items()
    )
    digest = hashlib.sha256(json.dumps([uri, stamp], default=str).encode()).hexdigest()[:16]
    dest = cache_root() / "remote" / f"{path.strip('/').rsplit('/', 1)[-1]}-{digest}"
    if dest.exists():
        return str(dest)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
    try:
        tmp.rename(dest)
    except OSError:  # another process on this node copied it first: the same files
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def load_tokenizer(path: str, chat_template: str | None = None):
    from transformers import AutoTokenizer

    return finish_tokenizer(AutoTokenizer.from_pretrained(local_model(path)), chat_template)


def finish_tokenizer(tok, chat_template: str | None = None):
    """What every loaded tokenizer gets: the configured chat template (else its own, else ChatML)
    and a pad token (its eos when it has none)."""
    if chat_template:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def skip_sklearn_import() -> None:
    """Keep transformers from importing scikit-learn in a training process: its model classes
    import generation/candidate_generator, which imports sklearn.metrics (for assisted decoding's
    confidence threshold, which no training run uses) whenever sklearn is installed, and we
    install it for the data stage's TF-IDF. That import was 0.9 s of every trial and Train
    worker start (measured on the demo's sweep). Call before the first transformers model import;
    later it changes nothing. tests/test_models checks that it still takes effect."""
    import sys

    if "transformers.generation" in sys.modules:
        return
    import transformers.utils

    transformers.utils.is_sklearn_available = lambda: False


def load_model(path: str, dtype: str = "auto"):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(local_model(path), dtype=torch_dtype)


def load_adapter(model, path: str):
    """A LoRA adapter we saved, on its base model (local folder or storage URI), with the
    targets it was trained with (train/moe.exact_targets)."""
    from peft import PeftModel

    from tailorlm.train.moe import exact_targets

    with exact_targets():
        return PeftModel.from_pretrained(model, local_model(path))
