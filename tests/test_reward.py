"""reward stage and dpo's lm_head-only training: the Bradley-Terry loss pinned by hand, a tiny run that
learns, a saved model that plain transformers + peft load, and last-layer DPO that changes only lm_head."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.recipe import load_recipe
from tests.conftest import dpo_section, sft_section, tiny_recipe_dict, tiny_word_model


def reward_section(world, **extra) -> dict:
    """6 steps of 8 pairs at lr 1e-2: held-out accuracy 0.83-0.92 (12 pairs) across the settings tried."""
    return {
        "train_data": [str(world / "dpo_train.jsonl")],
        "eval_data": [str(world / "dpo_heldout.jsonl")],
        "answer_data": [str(world / "sft_heldout.jsonl")],
        "eval_limit": 12,
        "lora": {"r": 4, "alpha": 8},
        "max_steps": 6,
        "global_batch_size": 8,
        "micro_batch_size": 8,
        "learning_rate": 1e-2,
        "precision": "fp32",
        **extra,
    }


@pytest.fixture(scope="module")
def aligned_run(tiny_world, tmp_path_factory):
    """tokenizer -> pretrain -> sft -> dpo (trainable: lm_head) -> reward on the tiny world, tiny sizes."""
    from pipeline.run import run_recipe

    tmp = tmp_path_factory.mktemp("reward")
    data = tiny_recipe_dict(tiny_world, tmp / "runs", "reward")
    data["sft"] = sft_section(tiny_world)
    data["dpo"] = dpo_section(tiny_world, trainable="lm_head")
    data["reward"] = reward_section(tiny_world)
    path = tmp / "reward.yaml"
    path.write_text(json.dumps(data))
    records = run_recipe(load_recipe(path))
    return load_recipe(path).run_dir, records


def test_trl_reward_loss_is_bradley_terry_by_hand():
    """TRL's loss on one batch equals -log sigmoid(r_chosen - r_rejected), with r = score . h(last token)
    worked out by hand on each unpadded sequence; and our score model starts at ln 2 (zero head)."""
    from datasets import Dataset
    from trl import RewardConfig
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from pipeline.rewards import reward_model_from
    from pipeline.stages.reward import RewardTrainerOnOurRows

    torch.manual_seed(0)
    tokenizer, causal = tiny_word_model()
    model = reward_model_from(causal, pad_token_id=0)
    assert model.model is causal.model  # the causal LM's own backbone, not a copy
    rows = [{"chosen_ids": [2, 3, 4, 5, 6, 1], "rejected_ids": [2, 3, 4, 7, 1]},
            {"chosen_ids": [8, 9, 10, 11, 12, 1], "rejected_ids": [8, 9, 13, 14, 15, 16, 1]}]
    batch = DataCollatorForPreference(pad_token_id=0)(rows)  # chosen rows first, then rejected; right-padded
    args = RewardConfig(output_dir="/tmp/unused-reward", use_cpu=True, bf16=False, report_to=[], max_length=None,
                        per_device_train_batch_size=2, gradient_checkpointing=False)
    trainer = RewardTrainerOnOurRows(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tokenizer)
    model.eval()
    with torch.no_grad():
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(math.log(2), abs=1e-6)  # zero head
        model.score.weight.normal_(0, 1.0)

        def by_hand(ids: list[int]) -> torch.Tensor:
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]  # (H,) the last token
            return hidden @ model.score.weight[0]

        r_chosen = torch.stack([by_hand(r["chosen_ids"]) for r in rows])
        r_rejected = torch.stack([by_hand(r["rejected_ids"]) for r in rows])
        expected = -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()
        loss = trainer.compute_loss(model, dict(batch))
    assert abs(expected.item() - math.log(2)) > 1e-3  # not trivially at ln 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_recipe_adapter_dropout_survives_trls_disable_dropout():
    """TRL's reward (and DPO) trainer turns every nn.Dropout off after peft adds the adapters; the stage turns the
    adapters' own back to lora.dropout (it once did nothing: 8 reward epochs with dropout 0.1 gave the same held-out
    numbers to the digit as without)."""
    from datasets import Dataset
    from trl import RewardConfig

    from pipeline.models import lora_config, restore_adapter_dropout
    from pipeline.recipe import LoraArgs
    from pipeline.rewards import reward_model_from
    from pipeline.stages.reward import RewardTrainerOnOurRows

    tokenizer, causal = tiny_word_model()
    rows = [{"chosen_ids": [2, 3, 4, 1], "rejected_ids": [2, 3, 5, 1]}]
    args = RewardConfig(output_dir="/tmp/unused-reward", use_cpu=True, bf16=False, report_to=[], max_length=None)
    trainer = RewardTrainerOnOurRows(model=reward_model_from(causal, pad_token_id=0), args=args,
                                     train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                     peft_config=lora_config(LoraArgs(r=4, alpha=8, dropout=0.1), task_type="SEQ_CLS",
                                                             also_save=("score",)))
    dropouts = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts)  # TRL's disable_dropout
    assert restore_adapter_dropout(trainer.model, 0.1) == 14  # 2 layers x 7 linear layers
    assert all(m.p == 0.1 for m in dropouts)


def test_reward_stage_learns_and_reports(aligned_run):
    run_dir, records = aligned_run
    metrics = records["reward"]["metrics"]
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    # the zero head ties every pair at step 0: chance exactly, as dpo starts at ln 2
    assert before["pairwise_accuracy"] == 0.5 and before["mean_margin"] == 0.0 and before["fact_ranking"] == 0.5
    assert after["pairs"] == 12 and after["fact_questions"] > 0
    assert after["pairwise_accuracy"] >= 0.75 and after["mean_margin"] > 0
    for key in ("pairwise_accuracy", "mean_margin", "chosen_reward", "rejected_reward", "fact_ranking", "fact_margin"):
        assert math.isfinite(after[key]), key
    # per attribute: every question counted once, and the shares weigh back to the overall ranking
    by_attribute = after["fact_ranking_by_attribute"]
    assert set(by_attribute) <= {"town", "job", "pet", "colour", "best_friend"} and len(by_attribute) >= 2
    assert sum(a["questions"] for a in by_attribute.values()) == after["fact_questions"]
    weighted = sum(a["ranking"] * a["questions"] for a in by_attribute.values()) / after["fact_questions"]
    assert weighted == pytest.approx(after["fact_ranking"], abs=1e-6)
    assert all(a["ranking"] == 0.5 for a in before["fact_ranking_by_attribute"].values())  # the zero head ties
    assert metrics["steps"] == 6 and math.isfinite(metrics["train_loss"]) and metrics["train_loss"] < math.log(2)
    assert 0 < metrics["trainable_parameters"] and metrics["ranks_in_sync"]
    logs = [json.loads(line) for line in (run_dir / "reward" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in logs if "loss" in r)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_reward_stage_reports_the_sft_models_own_fact_ranking(aligned_run):
    """The same held-out fact pairs ranked by the SFT model's log-likelihood of each reply, recomputed here one
    sequence at a time with plain transformers + peft (the stage batches and pads through pipeline/logprobs.py)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat_template import ChatRenderer
    from pipeline.data.world import wrong_fact_pairs
    from pipeline.evaluation import read_scored_questions

    run_dir, records = aligned_run
    config = records["reward"]["config"]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft")
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "pretrain"), run_dir / "sft").eval()
    renderer = ChatRenderer(tokenizer)

    def reply_logp(prompt, reply) -> float:
        prompt_ids = renderer.prompt_ids(prompt)
        ids = renderer.render([*prompt, *reply]).input_ids
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logps = sft(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        return sum(logps[i - 1, ids[i]].item() for i in range(len(prompt_ids), len(ids)))

    answers = read_scored_questions(config["answer_data"], config["eval_limit"])
    pairs = wrong_fact_pairs(answers, records["reward"]["seed"])
    margins = [reply_logp(p["prompt"], p["chosen"]) - reply_logp(p["prompt"], p["rejected"]) for p in pairs]
    expected = sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins)
    reported = records["reward"]["metrics"]["sft_likelihood"]["likelihood_fact_ranking"]
    assert len(pairs) == records["reward"]["metrics"]["heldout_after"]["fact_questions"]
    assert reported == pytest.approx(expected, abs=1e-6)  # a float32 mean


def test_reward_model_loads_with_plain_transformers_and_peft(aligned_run):
    """The recipe lineage.json and pipeline/rewards.py give: the base, the SFT adapter merged, the score class on
    its backbone, the reward adapter. It gives the numbers the stage had in memory, and scores a pair."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.chat_template import ChatRenderer
    from pipeline.data.pairs import load_pairs, tokenize_pairs
    from pipeline.models import load_stage_model
    from pipeline.rewards import load_reward_model, reward_scores

    run_dir, records = aligned_run
    lineage = json.loads((run_dir / "reward" / "lineage.json").read_text())
    assert lineage["head"] == "sequence-classification" and lineage["adapters"] == ["../sft", "."]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "reward")
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "pretrain"),
                                    run_dir / "sft").merge_and_unload()
    rm = AutoModelForSequenceClassification.from_pretrained(run_dir / "pretrain", num_labels=1)
    rm.model = sft.model
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm = PeftModel.from_pretrained(rm, run_dir / "reward").eval()

    pairs, _ = load_pairs(records["reward"]["config"]["train_data"], "auto", "drop")
    rows, _ = tokenize_pairs(pairs[:4], ChatRenderer(tokenizer), 512)
    chosen = [r["prompt_ids"] + r["chosen_ids"] for r in rows]
    probe = records["reward"]["metrics"]["probe_chosen_rewards"]
    assert reward_scores(rm, chosen).tolist() == pytest.approx(probe, abs=1e-5)
    ours, _ = load_reward_model(run_dir / "reward")
    assert reward_scores(ours, chosen).tolist() == pytest.approx(probe, abs=1e-5)
    with torch.no_grad():  # one pair, as a user would score it: the trained head is not zero
        row = rows[0]
        pair = tokenizer.pad([{"input_ids": row["prompt_ids"] + row["chosen_ids"]},
                              {"input_ids": row["prompt_ids"] + row["rejected_ids"]}], return_tensors="pt")
        scores = rm(**pair).logits[:, 0]
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]
    with pytest.raises(PipelineError, match="reward model"):
        load_stage_model(run_dir / "reward")  # not a language model: chat, export and eval refuse it


def test_reward_model_exports_to_one_sequence_classification_folder(aligned_run, tmp_path):
    """`pipeline export RUN/reward OUT`: transformers alone loads it and scores as the stage did; the card's
    snippet (the tokenizer's own chat template) renders what the stage rendered."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.chat_template import ChatRenderer
    from pipeline.data.pairs import load_pairs
    from pipeline.export import export_stage
    from pipeline.rewards import reward_scores

    run_dir, records = aligned_run
    out = export_stage(run_dir / "reward", tmp_path / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert "AutoModelForSequenceClassification" in (out / "README.md").read_text()
    pairs, _ = load_pairs(records["reward"]["config"]["train_data"], "auto", "drop")
    messages = [[*pair["prompt"], *pair["chosen"]] for pair in pairs[:4]]
    as_trained = [ChatRenderer(tokenizer).render(m).input_ids for m in messages]
    by_template = [tokenizer.apply_chat_template(m, return_dict=True)["input_ids"] for m in messages]
    assert by_template == as_trained
    probe = records["reward"]["metrics"]["probe_chosen_rewards"]
    assert reward_scores(model, as_trained).tolist() == pytest.approx(probe, abs=1e-5)
    with pytest.raises(PipelineError, match="already its adapter"):
        export_stage(run_dir / "reward", tmp_path / "rm-adapter", adapter_only=True)


def test_dpo_lm_head_changes_only_lm_head(aligned_run):
    """Byte for byte: every saved tensor but lm_head.weight equals the SFT model's merged weights."""
    from safetensors.torch import load_file

    from pipeline.models import load_stage_model

    run_dir, records = aligned_run
    saved = load_file(run_dir / "dpo" / "model.safetensors")
    sft = load_stage_model(run_dir / "sft", merge_all=True)[0].state_dict()
    assert "lm_head.weight" in saved and set(saved) == set(sft)  # untied: both matrices are saved
    for name, tensor in saved.items():
        if name != "lm_head.weight":
            assert tensor.dtype == sft[name].dtype and torch.equal(tensor, sft[name]), name
    assert not torch.equal(saved["lm_head.weight"], sft["lm_head.weight"])
    policy, _ = load_stage_model(run_dir / "dpo")  # later stages, eval and chat load it the usual way
    assert policy.lm_head.weight is not policy.model.embed_tokens.weight
    assert torch.equal(policy.lm_head.weight, saved["lm_head.weight"])
    metrics = records["dpo"]["metrics"]
    assert metrics["trainable"] == "lm_head" and metrics["trainable_parameters"] == saved["lm_head.weight"].numel()
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0  # the frozen copy is the policy at 0
    assert math.isfinite(after["kl_from_reference"]) and after["kl_from_reference"] > 0


def test_held_out_pairs_longer_than_the_context_are_left_out_and_counted(tiny_tokenizer):
    """A model with learned positions (GPT-2, 24 of them) fails outright on a longer row: the held-out pair
    scorers (dpo's log-likelihoods, the reward model's scores) leave such a pair out and say how many."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from pipeline.chat_template import ChatRenderer
    from pipeline.evaluation import Settings, preference_metrics
    from pipeline.rewards import pairwise_metrics

    renderer = ChatRenderer(tiny_tokenizer)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=24, n_embd=16, n_layer=1, n_head=2, num_labels=1,
                        pad_token_id=tiny_tokenizer.pad_token_id)
    short = {"prompt": [{"role": "user", "content": "Where does Nozan live?"}],
             "chosen": [{"role": "assistant", "content": "Varn."}],
             "rejected": [{"role": "assistant", "content": "Tamber."}]}
    long = {**short, "chosen": [{"role": "assistant", "content": "Nozan lives in Varn, " * 10}]}
    torch.manual_seed(0)
    metrics = preference_metrics(GPT2LMHeadModel(config).eval(), renderer, [short, long, short],
                                 tiny_tokenizer.pad_token_id, Settings())
    assert metrics["pairs"] == 2 and metrics["pairs_too_long"] == 1 and math.isfinite(metrics["chosen_logp"])
    scored = pairwise_metrics(GPT2ForSequenceClassification(config).eval(), renderer, [long, short])
    assert scored["pairs"] == 1 and scored["pairs_too_long"] == 1 and math.isfinite(scored["mean_margin"])
    assert preference_metrics(GPT2LMHeadModel(config).eval(), renderer, [short], 0, Settings())["pairs"] == 1
    assert "pairs_too_long" not in pairwise_metrics(GPT2ForSequenceClassification(config).eval(), renderer, [short])


def test_reward_without_sft_is_one_line_error(tiny_world, tmp_path):
    data = tiny_recipe_dict(tiny_world, tmp_path / "runs", "nosft")
    data["reward"] = reward_section(tiny_world)
    path = tmp_path / "nosft.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(PipelineError) as err:
        load_recipe(path)
    assert "reward stage starts from the SFT model" in str(err.value) and "\n" not in str(err.value)


def test_check_explain_lists_the_reward_section():
    from pipeline.config_schema import describe
    from pipeline.recipe import Recipe

    lines = "\n".join(describe(Recipe))
    for key in ("reward.train_data", "reward.eval_split", "reward.lora.r", "reward.learning_rate",
                "dpo.trainable"):
        assert f"\n{key}:" in lines, key
