"""dpo stage: ln 2 at the start, TRL's loss equals the formula, the reference is the SFT model, rebuilds exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.artifacts import read_json
from pipeline.errors import PipelineError
from pipeline.recipe import load_recipe
from tests.conftest import dpo_section, sft_section, tiny_word_model


@pytest.mark.parametrize("share_prompt", [False, True])
def test_trl_dpo_loss_matches_the_formula(share_prompt):
    """-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) by hand, against TRL's loss on one batch, with TRL's
    two rows per pair and with one row per pair sharing the prompt (pipeline/shared_prompt.py)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from pipeline.logprobs import completion_logps
    from pipeline.stages.dpo import DPOTrainerOnOurRows

    torch.manual_seed(0)
    tokenizer, model = tiny_word_model()
    rows = [{"prompt_ids": [2, 3, 4], "chosen_ids": [5, 6, 1], "rejected_ids": [7, 1]},
            {"prompt_ids": [8, 9], "chosen_ids": [10, 11, 12, 1], "rejected_ids": [13, 14, 1]}]
    beta = 0.3
    args = DPOConfig(output_dir="/tmp/unused-dpo", beta=beta, use_cpu=True, bf16=False, report_to=[],
                     per_device_train_batch_size=2, max_length=None, gradient_checkpointing=False)
    trainer = DPOTrainerOnOurRows(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer,
                                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                                  share_prompt=share_prompt)
    policy = trainer.model
    with torch.no_grad():  # move the adapter off zero so policy != reference
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    policy.eval()
    chosen = [(r["prompt_ids"], r["chosen_ids"]) for r in rows]
    rejected = [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    pi_w, pi_l = completion_logps(policy, chosen, 0), completion_logps(policy, rejected, 0)
    with policy.disable_adapter():
        ref_w, ref_l = completion_logps(policy, chosen, 0), completion_logps(policy, rejected, 0)
    by_hand = -torch.nn.functional.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))).mean()
    assert abs(by_hand.item() - math.log(2)) > 1e-3  # the check is not trivially at ln 2

    batch = DataCollatorForPreference(pad_token_id=0)(rows)
    with torch.no_grad():
        trl_loss = trainer._compute_loss(policy, batch, return_outputs=False)
    assert trl_loss.item() == pytest.approx(by_hand.item(), abs=1e-5)
    shared_passes = trainer._shared.shared_batches if share_prompt else 0
    assert shared_passes == (1 if share_prompt else 0)


def test_dpo_starts_at_ln2_and_saves_its_lineage(dpo_run):
    run_dir, records = dpo_run
    logs = [json.loads(line) for line in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in logs if "loss" in r)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    later = [r for r in logs if "rewards/margins" in r][-1]
    assert later["rewards/margins"] != 0.0
    for key in ("rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in first
    metrics = records["dpo"]["metrics"]
    assert metrics["shared_prompt_passes"]["plain"] == 0 and metrics["shared_prompt_passes"]["shared"] > 0
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    assert math.isfinite(after["kl_from_reference"]) and after["kl_from_reference"] >= 0
    assert "kl_from_reference" not in before  # the policy is the reference at step 0
    assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0  # all ties at step 0
    for key in ("reward_accuracy", "reward_margin", "prefers_chosen", "chosen_perplexity", "answer_accuracy",
                "habit_rate", "habit_rate_sampled", "eot_rate", "response_perplexity"):
        assert key in after, key
    lineage = read_json(run_dir / "dpo" / "lineage.json")
    assert (lineage["base"], lineage["adapters"]) == ("../pretrain", ["../sft", "."])  # relative: the folder can move


def test_the_run_summary_shows_what_each_stage_did_on_held_out_data(dpo_run, capsys):
    """The lines `pipeline run` ends with: each training stage's held-out change, read from its stage.json."""
    from pipeline.cli import _print_summary

    run_dir, records = dpo_run
    _print_summary(load_recipe(run_dir.parent.parent / "dpo.yaml"), records)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    sft, dpo = records["sft"]["metrics"], records["dpo"]["metrics"]
    assert "held-out perplexity" in lines["pretrain"] and "held-out" not in lines["tokenizer"]
    assert (f"held-out answer accuracy {sft['heldout_before']['answer_accuracy']:.3f} -> "
            f"{sft['heldout_after']['answer_accuracy']:.3f}, habit ") in lines["sft"]
    assert (f"preference accuracy 0.500 -> {dpo['heldout_after']['reward_accuracy']:.3f}, "
            f"KL from reference {dpo['heldout_after']['kl_from_reference']:.3f}") in lines["dpo"]


def test_rebuilt_policy_equals_in_memory_policy_and_reference_is_sft(dpo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.chat_template import ChatRenderer
    from pipeline.data.pairs import load_pairs, tokenize_pairs
    from pipeline.logprobs import completion_logps
    from pipeline.models import load_stage_model

    run_dir, records = dpo_run
    # plain transformers + peft, as the README shows
    base = AutoModelForCausalLM.from_pretrained(run_dir / "pretrain")
    sft = PeftModel.from_pretrained(base, run_dir / "sft").merge_and_unload()
    policy = PeftModel.from_pretrained(sft, run_dir / "dpo").eval()
    ours, tokenizer = load_stage_model(run_dir / "dpo")
    pairs, _ = load_pairs(records["dpo"]["config"]["train_data"], "auto", "drop")
    rows, _ = tokenize_pairs(pairs[:4], ChatRenderer(tokenizer), 512)
    chosen = [(r["prompt_ids"], r["chosen_ids"]) for r in rows]
    rebuilt = completion_logps(policy, chosen, tokenizer.pad_token_id)
    assert rebuilt.tolist() == pytest.approx(records["dpo"]["metrics"]["probe_chosen_logps"], abs=1e-4)
    assert completion_logps(ours.eval(), chosen, tokenizer.pad_token_id).tolist() == pytest.approx(rebuilt.tolist(), abs=1e-5)

    # the reference (adapter off) is the SFT model, unchanged by DPO
    sft_model, _ = load_stage_model(run_dir / "sft")
    with policy.disable_adapter():
        reference = completion_logps(policy, chosen, tokenizer.pad_token_id)
    assert reference.tolist() == pytest.approx(completion_logps(sft_model.eval(), chosen, tokenizer.pad_token_id).tolist(), abs=1e-4)
    assert (rebuilt - reference).abs().max() > 1e-4  # and DPO did move the policy


def test_pairs_all_longer_than_max_length_say_so(tiny_world, tiny_tokenizer):
    from pipeline.chat_template import ChatRenderer
    from pipeline.data.pairs import training_pair_rows
    from pipeline.recipe import DpoConfig

    cfg = DpoConfig(train_data=[str(tiny_world / "dpo_train.jsonl")], max_length=5)
    pairs = len((tiny_world / "dpo_train.jsonl").read_text().splitlines())
    with pytest.raises(PipelineError, match=rf"^dpo: every one of the {pairs:,} pairs is longer than dpo.max_length "
                                            r"\(5 tokens\); raise it$"):
        training_pair_rows(cfg, ChatRenderer(tiny_tokenizer), 0, "dpo")


def test_zero_beta_is_refused_before_training(tiny_world, tmp_path):
    """beta = 0 would leave the margin at 0 and the loss at ln 2 for ever (the stage's stuck check
    would stop it at run time); the recipe refuses it before anything runs."""
    from tests.conftest import tiny_recipe_dict

    data = tiny_recipe_dict(tiny_world, tmp_path / "runs", "dpo")
    data["sft"] = sft_section(tiny_world)
    data["dpo"] = dpo_section(tiny_world, beta=0.0)
    path = tmp_path / "stuck.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(PipelineError, match="dpo.beta"):
        load_recipe(path)


def test_an_fp16_models_lm_head_trains_in_fp32_under_loss_scaling():
    """`trainable: lm_head` on a GPU without bf16: the fp16 model trains under loss scaling, which refuses fp16
    gradients. The trained head is kept in fp32 (and runs with autocast and without); the rest stays fp16."""
    from pipeline.models import train_only_lm_head

    _, model = tiny_word_model()
    model = model.half()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    train_only_lm_head(model)
    head = model.get_output_embeddings()
    assert head.weight.dtype == torch.float32 and model.get_input_embeddings().weight.dtype == torch.float16
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    assert torch.isfinite(model(ids).logits).all()  # outside autocast, as the KL and generation run
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(ids, labels=ids).loss
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = torch.optim.AdamW([head.weight], lr=1e-2)
    before = head.weight.detach().clone()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # an fp16 head: ValueError "Attempting to unscale FP16 gradients."
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(head.weight, before)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)


def test_lm_head_only_dpo_changes_only_lm_head_with_shared_prompts(dpo_run, tmp_path):
    """`trainable: lm_head`: the reference is a frozen copy, the prompt is still shared, the loss starts at ln 2,
    and byte for byte every saved tensor but lm_head.weight equals the SFT model's merged weights."""
    import shutil

    from safetensors.torch import load_file

    from pipeline.models import load_stage_model
    from pipeline.run import run_recipe

    run_dir, records = dpo_run
    copy = tmp_path / "runs" / run_dir.name
    for stage in ("tokenizer", "pretrain", "sft"):  # the earlier stages, done; dpo runs again beside them
        shutil.copytree(run_dir / stage, copy / stage)
    data = {**json.loads((run_dir.parent.parent / "dpo.yaml").read_text()), "output_dir": str(tmp_path / "runs")}
    data["dpo"] = {**data["dpo"], "trainable": "lm_head"}
    path = tmp_path / "lm_head.yaml"
    path.write_text(json.dumps(data))
    metrics = run_recipe(load_recipe(path), only="dpo")["dpo"]["metrics"]

    assert metrics["trainable"] == "lm_head" and metrics["shared_prompt_passes"]["plain"] == 0
    logs = [json.loads(line) for line in (copy / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in logs if "loss" in r)["loss"] == pytest.approx(math.log(2), abs=1e-4)
    sft = load_stage_model(run_dir / "sft", merge_all=True)[0].state_dict()
    saved = load_file(copy / "dpo" / "model.safetensors")
    assert "lm_head.weight" in saved and set(saved) == set(sft)
    for name, tensor in saved.items():
        if name != "lm_head.weight":
            assert tensor.dtype == sft[name].dtype and torch.equal(tensor, sft[name]), name
    assert not torch.equal(saved["lm_head.weight"], sft["lm_head.weight"])


def test_fp32_on_the_cpu_caps_the_dpo_micro_batch(dpo_run, tmp_path, monkeypatch):
    """dpo.fp32_micro_batch_size applies where dpo trains in fp32 on a CPU, never to bf16 or a GPU, and the stage
    splits its global batch by it (the same global batch, more accumulation)."""
    import shutil

    from pipeline.recipe import DpoConfig
    from pipeline.run import run_recipe
    from pipeline.trainer_args import micro_batch_ceiling

    def ceiling(precision, device="cpu"):
        cfg = DpoConfig(train_data=["x"], precision=precision, micro_batch_size=8, fp32_micro_batch_size=4)
        return micro_batch_ceiling(cfg, "auto", device)

    assert DpoConfig(train_data=["x"]).fp32_micro_batch_size == 4
    assert ceiling("fp32") == 4 and ceiling("bf16") == 8 and ceiling("fp32", device="cuda") == 8
    monkeypatch.setattr("pipeline.models.cpu_has_fast_bf16", lambda: False)
    assert ceiling("auto") == 4  # auto without bf16 hardware trains in fp32

    run_dir, _ = dpo_run
    copy = tmp_path / "runs" / run_dir.name
    for stage in ("tokenizer", "pretrain", "sft"):
        shutil.copytree(run_dir / stage, copy / stage)
    data = {**json.loads((run_dir.parent.parent / "dpo.yaml").read_text()), "output_dir": str(tmp_path / "runs")}
    data["dpo"] = {**data["dpo"], "micro_batch_size": 4, "fp32_micro_batch_size": 1, "max_steps": 1}
    path = tmp_path / "fp32.yaml"
    path.write_text(json.dumps(data))
    metrics = run_recipe(load_recipe(path), only="dpo")["dpo"]["metrics"]
    assert (metrics["micro_batch"], metrics["gradient_accumulation"]) == (1, 4)
