"""Training pieces without Ray: DeepSpeed config derivation, schedule, SFT labels, packing."""

import pytest

from tailorlm.config import load_config
from tailorlm.train.ds_config import deepspeed_config, lr_lambda, steps_for
from tailorlm.train.formats import IGNORE, collate, encode_sft, encode_text, pack


def test_deepspeed_batch_sizes_have_one_source():
    tc = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=3", "train.num_workers=8"]).train
    ds = deepspeed_config(tc, world_size=8)
    assert ds["train_batch_size"] == 4 * 3 * 8 == tc.global_batch_size
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3


def test_deepspeed_cpu_and_gpu_settings():
    cpu = deepspeed_config(load_config(None, ["train.deepspeed.stage=3"]).train, 2)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["zero_optimization"]["stage"] == 3
    assert cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    gpu = deepspeed_config(
        load_config(
            None, ["train.use_gpu=true", "train.precision=fp16", "train.deepspeed.offload_optimizer=true"]
        ).train,
        8,
    )
    assert "torch_adam" not in gpu["optimizer"]["params"] and gpu["fp16"]["enabled"]
    assert gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_schedule_warmup_then_cosine_to_zero():
    tc = load_config(None, ["train.warmup_steps=10", "train.scheduler=cosine"]).train
    f = lr_lambda(tc, 100)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0)
    lin = lr_lambda(load_config(None, ["train.warmup_steps=0", "train.scheduler=linear"]).train, 10)
    assert lin(5) == pytest.approx(0.5)


def test_steps_for_and_too_little_data():
    tc = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=2", "train.epochs=3"]).train
    assert steps_for(tc, 100, 2) == (6, 18)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        steps_for(tc, 10, 2)


def test_sft_labels_cover_only_assistant_replies(tiny_model_path):
    from tailorlm.models import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    msgs = [
        {"role": "user", "content": "What is the capital of Ashbrook?"},
        {"role": "assistant", "content": "The capital of Ashbrook is Stonefield."},
        {"role": "user", "content": "And its sky?"},
        {"role": "assistant", "content": "Blue."},
    ]
    ids, labels = encode_sft(tok, msgs, 512)
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert (
        learned == "The capital of Ashbrook is Stonefield.<|im_end|>\nBlue.<|im_end|>\n"
        or learned == "The capital of Ashbrook is Stonefield.<|im_end|>Blue.<|im_end|>"
    )
    assert "capital of Ashbrook?" not in learned and "assistant" not in learned
    short_ids, short_labels = encode_sft(tok, msgs, 8)
    assert len(short_ids) == len(short_labels) == 8
    t_ids, t_labels = encode_text(tok, "plain text", 64)
    assert t_ids == t_labels and t_ids[-1] == tok.eos_token_id


def test_pack_and_collate():
    rows = [([1, 2, 3], [1, 2, 3]), ([4, 5], [IGNORE, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])]
    packed = pack(rows, 5)
    assert packed == [([1, 2, 3, 4, 5], [1, 2, 3, IGNORE, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])]
    b = collate({"input_ids": [p[0] for p in packed], "labels": [p[1] for p in packed]}, pad_id=0)
    assert b["input_ids"].shape == (2, 5) and b["labels"][1, 4].item() == IGNORE
    assert b["attention_mask"].sum().item() == 9


def test_token_loss_is_the_mean_over_learned_tokens():
    """The one evaluation loss (train report, export gate): a token-weighted mean, not a mean of rows."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailorlm.train.evaluate import perplexity, token_loss
    from tailorlm.train.formats import IGNORE

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()
    rows = [([1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, 5]), ([6, 7, 8], [IGNORE, 7, 8]), ([9, 10], [IGNORE, IGNORE])]
    loss, n = token_loss(model, rows)
    losses = []
    with torch.no_grad():
        for ids, labels in rows:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != IGNORE
            losses += F.cross_entropy(logits[keep], target[keep], reduction="none").tolist()
    assert n == 5 == len(losses)
    assert abs(loss - sum(losses) / len(losses)) < 1e-5 and abs(perplexity(loss) - torch.tensor(loss).exp()) < 1e-3


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_a_restored_schedule_steps_at_the_uninterrupted_lr(scheduler):
    """The first optimizer step after a resume must use the lr the uninterrupted run used there
    (load_state_dict alone left step 0's warmup lr in the optimizer)."""
    import torch

    from tailorlm.train.checkpoint import restore_scheduler

    tc = load_config(None, [f"train.scheduler={scheduler}", "train.warmup_steps=3"]).train

    def fresh():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc, 20))

    opt, sched = fresh()
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if len(lrs) == 7:
            saved = sched.state_dict()
    opt2, sched2 = fresh()
    restore_scheduler(sched2, saved)
    resumed = []
    for _ in range(5):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(lrs[7:])
