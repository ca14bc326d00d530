"""Expert parallelism (DeepSpeed AutoEP) keeps our checkpoints the transformers model's: on two
gloo ranks, every family with an AutoEP preset gathers its sharded experts back to exactly the
original weights and names, cuts each rank's part back out (a resume), and still yields router
logits for the aux loss. Walks expert_parallel.PRESETS, not a hand list."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tailorlm.config import TinyModelSpec
from tailorlm.train.expert_parallel import PRESETS

SCRIPT = r"""
import json, os, sys, torch
import torch.multiprocessing as mp

def main(rank, port, folders):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    import deepspeed
    deepspeed.init_distributed("gloo")
    from tailorlm.models import load_model
    from tailorlm.train import expert_parallel as xp
    from tailorlm.train.checkpoint import gathered_trainable
    from tailorlm.train.loop import MoeStep
    out = {}
    for folder in folders:
        torch.manual_seed(0)
        model = load_model(folder, dtype="float32")
        family = model.config.model_type
        ref = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "zero_optimization": {"stage": 2},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
               "expert_parallel": xp.ds_section(family, 2), "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
        layers = xp.ep_layers(engine.module)
        full = gathered_trainable(engine, 2)
        local = xp.local_state(engine.module, family, full)
        mine = dict(engine.module.named_parameters())
        moe = MoeStep.for_model(engine.module, 0.01)
        moe.tap = xp.RouterTap(engine.module)
        x = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(rank))
        moe.loss(engine(input_ids=x, labels=x, output_router_logits=True))
        out[family] = {
            "ep_layers": len(layers),
            "local_experts": [layer.num_local_experts for layer in layers.values()],
            "same_names": sorted(full) == sorted(ref),
            "full_equal": all(torch.equal(full[n], ref[n]) for n in ref if n in full),
            "local_equal": all(torch.equal(local[n], mine[n].detach()) for n in local),
            "aux": moe.last_aux,
            "counted_layers": int(moe.use.counts.shape[0]),
        }
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)

if __name__ == "__main__":
    mp.spawn(main, args=(sys.argv[1], sys.argv[2:]), nprocs=2)
"""


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_autoep_experts_gather_to_the_transformers_weights_and_split_back(tmp_path):
    from tailorlm.models import ensure_tiny_model

    folders = [
        str(ensure_tiny_model(TinyModelSpec(factory=f, hidden_size=128, num_layers=2, vocab_size=512), tmp_path / f))
        for f in PRESETS
    ]
    (tmp_path / "ep.py").write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "ep.py"), _free_port(), *folders],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads(line[7:])
    assert sorted(got) == sorted(PRESETS)
    for family, r in got.items():
        assert r["ep_layers"] >= 1 and all(n == 4 for n in r["local_experts"]), (family, r)  # 8 experts / 2 ranks
        assert r["same_names"] and r["full_equal"] and r["local_equal"], (family, r)
        assert r["aux"] > 0 and r["counted_layers"] == r["ep_layers"], (family, r)


def test_expert_parallel_settings_that_cannot_work_are_refused():
    from tailorlm.config import load_config

    with pytest.raises(ValueError, match="expert_parallel=3 must divide train.num_workers=2"):
        load_config(None, ["train.moe.expert_parallel=3"])
    with pytest.raises(ValueError, match="needs train.deepspeed.stage 0-2"):
        load_config(None, ["train.moe.expert_parallel=2", "train.deepspeed.stage=3"])
    with pytest.raises(ValueError, match="needs train.method=full"):  # peft renames the blocks AutoEP looks for
        load_config(None, ["train.moe.expert_parallel=2", "train.method=lora"])
    from tailorlm.train.expert_parallel import ds_section

    with pytest.raises(ValueError, match="no preset for 'qwen2_moe'"):
        ds_section("qwen2_moe", 2)


def test_preflight_refuses_expert_parallel_the_model_cannot_take(tiny_model_path, tmp_path):
    """Checked in the driver (trainer.preflight), not after max_failures worker restarts."""
    from tailorlm.config import load_config
    from tailorlm.models import ensure_tiny_model
    from tailorlm.train.trainer import preflight

    ep2 = load_config(None, ["train.moe.expert_parallel=2", "train.method=full"])
    with pytest.raises(ValueError, match="has no experts"):
        preflight(ep2, tiny_model_path)
    qwen2_moe = ensure_tiny_model(TinyModelSpec(factory="qwen2_moe", hidden_size=128, num_layers=2), tmp_path / "q")
    with pytest.raises(ValueError, match="no preset for 'qwen2_moe'"):
        preflight(ep2, str(qwen2_moe))
    six = ensure_tiny_model(
        TinyModelSpec(factory="mixtral", hidden_size=128, num_layers=2, num_experts=6), tmp_path / "m"
    )
    ep4 = load_config(None, ["train.moe.expert_parallel=4", "train.num_workers=4", "train.method=full"])
    with pytest.raises(ValueError, match="must divide the model's 6 experts"):
        preflight(ep4, str(six))
    preflight(ep2, str(six))  # 6 experts over 2 ranks
