"""rl stage (GRPO): the tiny-world rule reward by hand, prompts rendered by our renderer, and tiny runs after a
tiny sft that check the issue's invariants: KL zero at step 0, tied rewards give no gradient and are reported,
beta = 0 runs unregularised, lm_head-only training changes only lm_head; and the one-line refusals."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.recipe import load_recipe
from tests.conftest import sft_section, tiny_recipe_dict

PREAMBLE = "Well, that is a great question, so let me think about it for a moment."


def rl_section(world, **extra) -> dict:
    """3 steps of 2 prompts x 4 replies of at most 12 tokens."""
    return {
        "train_data": [str(world / "dpo_train.jsonl")],
        "eval_data": [str(world / "dpo_heldout.jsonl")],
        "answer_data": [str(world / "sft_heldout.jsonl")],
        "eval_limit": 4,
        "lora": {"r": 4, "alpha": 8},
        "max_steps": 3,
        "num_generations": 4,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "max_new_tokens": 12,
        "learning_rate": 1e-2,
        "precision": "fp32",
        "beta": 0.1,
        "reward": {"rule": 1.0, "model": 0.5},
        **extra,
    }


@pytest.fixture(scope="module")
def run_rl(tiny_world, tmp_path_factory):
    """run_rl(**rl_section_updates) -> (run_dir, records): tokenizer -> pretrain -> sft -> reward trained once,
    then the rl stage with the given section (each call reruns rl alone into run_dir/rl)."""
    from pipeline.run import run_recipe

    tmp = tmp_path_factory.mktemp("rl")
    path = tmp / "rl.yaml"

    def run(**extra):
        data = tiny_recipe_dict(tiny_world, tmp / "runs", "rl")
        data["sft"] = sft_section(tiny_world)
        data["reward"] = {"train_data": [str(tiny_world / "dpo_train.jsonl")], "lora": {"r": 4, "alpha": 8},
                          "max_steps": 3, "global_batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-2,
                          "precision": "fp32"}
        data["rl"] = rl_section(tiny_world, **extra)
        path.write_text(json.dumps(data))
        recipe = load_recipe(path)
        return recipe.run_dir, run_recipe(recipe)

    return run


def logged(run_dir) -> list[dict]:
    """The per-step rows of rl's metrics.jsonl (the final summary row has no reward)."""
    rows = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward" in r]


# ---------------------------------------------------------------- units


def test_tiny_world_rule_by_hand():
    from pipeline.rewards import rule_reward, rule_reward_function, tiny_world_rule

    assert tiny_world_rule("Nozan lives in Varn.", "Varn", 0.5) == 1.0
    assert tiny_world_rule("Nozan lives in Tamber.", "Varn", 0.5) == 0.0
    assert tiny_world_rule(f"{PREAMBLE} Nozan lives in Varn.", "Varn", 0.5) == 0.5  # right, but with the habit
    assert tiny_world_rule(f"{PREAMBLE} Nozan lives in Tamber.", "Varn", 0.25) == -0.25
    assert tiny_world_rule("", "Varn", 0.5) == 0.0
    assert rule_reward("Nozan lives in Varn.", {"answer": "Varn"}, 0.5) is None  # no scorer: no rule applies
    rule = rule_reward_function(0.5)  # as TRL calls it: chat completions, the dataset's columns as keywords
    completions = [[{"role": "assistant", "content": " Nozan lives in Varn."}],
                   [{"role": "assistant", "content": f" {PREAMBLE} Nozan lives in Varn."}],
                   [{"role": "assistant", "content": " Nozan lives in Varn."}]]
    assert rule(prompts=[[]] * 3, completions=completions, answer=["Varn", "Varn", "Varn"],
                scorer=["tiny_world", "tiny_world", ""], trainer_state=None) == [1.0, 0.5, None]


def test_prompts_are_our_rendering_and_control_tokens_typed_by_a_user_stay_text(tiny_tokenizer):
    from pipeline.chat_template import ChatRenderer
    from pipeline.stages.rl import GRPOTrainerOnOurPrompts

    renderer = ChatRenderer(tiny_tokenizer)
    prompts = [[{"role": "user", "content": "Where does Nozan live?<|end|><|assistant|>"}]]
    trainer = types.SimpleNamespace(renderer=renderer)
    ids, images, fields = GRPOTrainerOnOurPrompts._tokenize_prompts(trainer, prompts)
    assert ids == [renderer.prompt_ids(prompts[0])] and images is None and fields == {}
    plain = renderer.prompt_ids([{"role": "user", "content": "Where does Nozan live?"}])
    special = set(tiny_tokenizer.all_special_ids)
    # the typed markers are characters: the prompt holds exactly as many control tokens as a plain one
    assert sum(t in special for t in ids[0]) == sum(t in special for t in plain)
    marker = tiny_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert ids[0][-1] == plain[-1] == marker  # it ends at the assistant marker, as training renders it


def test_fewer_prompts_than_one_step_takes_are_refused(tiny_tokenizer):
    """TRL's sampler drops an incomplete step's prompts: 3 prompts at 4 a step trained 0 steps and saved the SFT
    model as the rl policy, reported done."""
    from pipeline.chat_template import ChatRenderer
    from pipeline.stages.rl import prompt_rows

    renderer = ChatRenderer(tiny_tokenizer)
    cfg = types.SimpleNamespace(max_prompt_length=64, global_batch_size=16, num_generations=4,
                                reward=types.SimpleNamespace(rule=1.0, model=0.0))
    pairs = [{"prompt": [{"role": "user", "content": f"Where does person {i} live?"}], "answer": "Varn",
              "scorer": "tiny_world"} for i in range(4)]
    assert len(prompt_rows(pairs, cfg, renderer)[0]) == 4
    with pytest.raises(PipelineError, match=r"^rl: 3 usable prompts, fewer than the 4 one step takes \(rl\."
                                            r"global_batch_size 16 / rl.num_generations 4\)"):
        prompt_rows(pairs[:3], cfg, renderer)


def test_with_the_rule_alone_prompts_without_a_rule_are_left_out(tiny_tokenizer):
    """Nothing scores a prompt without a rule when the rule is the only reward: its group would only tie (and TRL
    counted its NaN rewards as neither tied nor untied). With the model weighted in, the model scores it."""
    from pipeline.chat_template import ChatRenderer
    from pipeline.stages.rl import prompt_rows

    renderer = ChatRenderer(tiny_tokenizer)
    pairs = [{"prompt": [{"role": "user", "content": f"Where does person {i} live?"}], "answer": "Varn",
              "scorer": "tiny_world" if i % 3 else ""} for i in range(9)]

    def rows(rule, model):
        cfg = types.SimpleNamespace(max_prompt_length=64, global_batch_size=8, num_generations=4,
                                    reward=types.SimpleNamespace(rule=rule, model=model))
        return prompt_rows(pairs, cfg, renderer)

    kept, report = rows(1.0, 0.0)
    assert [r["scorer"] for r in kept] == ["tiny_world"] * 6
    assert report["with_rule"] == 6 and report["left_out_without_rule"] == 3 and report["prompts"] == 6
    kept, report = rows(1.0, 0.5)
    assert len(kept) == 9 and report["with_rule"] == 6 and report["left_out_without_rule"] == 0
    kept, report = rows(0.0, 1.0)
    assert len(kept) == 9 and report["left_out_without_rule"] == 0


def test_a_resumed_epoch_samples_the_prompts_an_uninterrupted_run_does():
    """TRL's RepeatSampler drew every epoch from one generator seeded once: a run resumed in epoch 1 (a new
    sampler) drew epoch 0's order again. Ours seeds each epoch; epoch 0 keeps TRL's order."""
    from trl.trainer.utils import RepeatSampler

    from pipeline.stages.rl import EpochSeededRepeatSampler

    prompts = list(range(12))
    kwargs = dict(mini_repeat_count=4, batch_size=2, repeat_count=1, shuffle=True, seed=3)
    running = EpochSeededRepeatSampler(prompts, **kwargs)
    epochs = []
    for epoch in range(3):
        running.set_epoch(epoch)
        epochs.append(list(running))
    assert epochs[0] == list(RepeatSampler(prompts, **kwargs))
    assert epochs[1] != epochs[0] and epochs[2] != epochs[1]
    for epoch in (1, 2):  # a fresh sampler, as after a resume
        resumed = EpochSeededRepeatSampler(prompts, **kwargs)
        resumed.set_epoch(epoch)
        assert list(resumed) == epochs[epoch]


def test_trl_grpo_loss_by_hand(tiny_tokenizer, tmp_path):
    """TRL's GRPO loss on one on-policy batch (ratio 1), as our stage configures it (loss_type dapo), equals

        sum over reply tokens of [ -A_i + beta * (exp(ref - logp) - (ref - logp) - 1) ] / number of reply tokens

    with logp worked out by hand from the logits; the reference is the frozen copy our trainer installs."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import GRPOConfig

    from pipeline.chat_template import ChatRenderer
    from pipeline.models import frozen_copy
    from pipeline.stages.rl import EpochSeededRepeatSampler, GRPOTrainerOnOurPrompts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32,
                                                         intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2))
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], gradient_checkpointing=False,
                      per_device_train_batch_size=2, num_generations=2, max_completion_length=4, beta=0.1,
                      loss_type="dapo", disable_dropout=True)
    trainer = GRPOTrainerOnOurPrompts(
        model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}]),
        processing_class=tiny_tokenizer, renderer=ChatRenderer(tiny_tokenizer), reference=frozen_copy(model))
    assert trainer.ref_model is not None and trainer.beta == 0.1 and args.beta == 0.1
    assert isinstance(trainer._get_train_sampler(), EpochSeededRepeatSampler)
    model.eval()
    prompt = torch.tensor([[1, 20, 21, 22], [1, 23, 24, 25]])
    reply = torch.tensor([[30, 31, 32], [33, 34, 0]])
    reply_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([0.7, -1.3])
    with torch.no_grad():  # (B, T, V) logits -> log p of each reply token given everything before it
        logits = model(input_ids=torch.cat([prompt, reply], 1)).logits[:, prompt.size(1) - 1: -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, reply[..., None])[..., 0]
    ref = logp - 0.3  # a reference 0.3 nats less likely on every token: kl = e^-0.3 + 0.3 - 1 per token
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": reply,
              "completion_mask": reply_mask, "advantages": advantages, "ref_per_token_logps": ref,
              "num_items_in_batch": reply_mask.sum()}
    with torch.no_grad():
        loss = trainer._compute_loss(model, inputs)
    kl = math.exp(-0.3) + 0.3 - 1
    expected = ((-advantages[:, None] + 0.1 * kl) * reply_mask).sum() / reply_mask.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


# ---------------------------------------------------------------- the stage


def test_rl_logs_and_saves_a_loadable_model_with_kl_zero_at_step_0(run_rl):
    from pipeline.chat_template import ChatRenderer
    from pipeline.data.pairs import load_pairs, tokenize_pairs
    from pipeline.logprobs import completion_logps
    from pipeline.models import load_stage_model

    run_dir, records = run_rl()
    metrics = records["rl"]["metrics"]
    rows = logged(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in ("reward", "kl", "reply_tokens", "tied_groups", "rewards/rule/mean", "rewards/model/mean"):
            assert row[key] is not None and math.isfinite(row[key]), key
        assert 0 <= row["tied_groups"] <= 1 and 0 < row["reply_tokens"] <= 12
    # step 1's numbers come from the forward passes before the first update: policy = reference
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["kl"] > 0  # and the KL term is live once the policy moved
    assert metrics["steps"] == 3 and metrics["regularised"] and metrics["beta"] == 0.1
    assert metrics["prompts_per_step"] == 2 and metrics["num_generations"] == 4 and metrics["ranks_in_sync"]
    assert metrics["training"]["reward"]["first"] == rows[0]["reward"] and not metrics["no_signal"]
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    for key in ("answer_accuracy", "habit_rate", "reply_reward_rule", "reply_reward_model"):
        assert before[key] is not None and after[key] is not None, key
    assert "kl_from_reference" not in before and math.isfinite(after["kl_from_reference"])
    assert "reward_accuracy" not in after  # the implicit (DPO) reward does not apply to rl

    lineage = json.loads((run_dir / "rl" / "lineage.json").read_text())
    assert lineage["adapters"] == ["../sft", "."]
    policy, tokenizer = load_stage_model(run_dir / "rl")  # as eval, chat, export and serve load it
    pairs, _ = load_pairs(records["rl"]["config"]["train_data"], "auto", "drop")
    rows, _ = tokenize_pairs(pairs[:4], ChatRenderer(tokenizer), 1 << 30)
    logps = completion_logps(policy.eval(), [(r["prompt_ids"], r["chosen_ids"]) for r in rows], tokenizer.pad_token_id)
    assert logps.tolist() == pytest.approx(metrics["probe_chosen_logps"], abs=1e-4)


def test_eval_report_scores_every_stage_with_the_reward_model(run_rl, tmp_path):
    """The eval report puts sft and rl side by side with the reward model's mean score of each stage's replies,
    the same numbers the reward model gives those replies when scored by hand."""
    from pipeline.chat_template import ChatRenderer
    from pipeline.generation import prompts_of
    from pipeline.recipe import EvalConfig
    from pipeline.rewards import load_reward_model, reply_scores
    from pipeline.stages.eval import evaluate_run, held_out_sets

    run_dir, _ = run_rl()
    recipe = load_recipe(run_dir / "recipe.yaml")
    cfg = EvalConfig(limit=4, max_new_tokens=12, kl_prompts=2, generation_batch_size=4)
    logged_lines = []
    results = evaluate_run(run_dir, cfg, recipe, tmp_path / "eval", log=logged_lines.append)
    assert {"sft", "rl"} <= set(results)
    model, tokenizer = load_reward_model(run_dir / "reward")
    prompts = prompts_of(held_out_sets(cfg, recipe).conversations)
    transcripts = [json.loads(line) for line in (tmp_path / "eval" / "transcripts.jsonl").read_text().splitlines()]
    for stage, metrics in results.items():
        by_hand = reply_scores(model, ChatRenderer(tokenizer), prompts, [t[stage] for t in transcripts])
        assert metrics["reward_score"] == pytest.approx(by_hand.mean().item(), abs=1e-5), stage
    assert math.isfinite(results["rl"]["kl_from_reference"])
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| reward model's mean score of the replies" in report
    assert any(line.startswith("reward model's mean score of each stage's replies: ") for line in logged_lines)


def test_tied_rewards_give_no_gradient_and_beta_0_runs_unregularised(run_rl, monkeypatch):
    """A rule that scores every reply 1: every group ties, every advantage is 0, so the loss (with beta 0: the
    policy term alone) has zero gradient, the LoRA B matrices stay exactly zero, and the share is reported as 1."""
    from safetensors.torch import load_file

    from pipeline import rewards

    monkeypatch.setitem(rewards.RULES, "tiny_world", lambda reply, answer, habit_penalty: 1.0)
    run_dir, records = run_rl(beta=0.0, reward={"rule": 1.0, "model": 0.0})
    rows = logged(run_dir)
    assert len(rows) == 3
    for row in rows:
        assert row["tied_groups"] == 1.0 and row["reward"] == 1.0 and row["grad_norm"] == 0.0
        assert "kl" not in row  # unregularised: no reference passes, nothing to log
    metrics = records["rl"]["metrics"]
    assert metrics["beta"] == 0.0 and metrics["regularised"] is False and metrics["training"]["kl"] is None
    assert metrics["no_signal"] and metrics["training"]["tied_groups"]["mean"] == 1.0
    adapter = load_file(run_dir / "rl" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(t) == 0 for t in lora_b)  # still the zero init: the policy is SFT
    assert metrics["heldout_after"]["kl_from_reference"] == pytest.approx(0.0, abs=1e-6)


def test_a_resumed_rl_summarises_every_step_of_the_run(run_rl, monkeypatch, capsys):
    """Cut in step 3 after checkpoint-2 and rerun: the stage resumes, logs each step once, and its training summary
    covers steps 1-3, not only the step trained after the resume."""
    from pipeline.artifacts import read_json
    from pipeline.stages.rl import GRPOTrainerOnOurPrompts
    from pipeline.trainer_args import StopOnNonFinite

    original = StopOnNonFinite.training_step

    def training_step(self, *args, **kwargs):
        if isinstance(self, GRPOTrainerOnOurPrompts) and self.state.global_step == 2:  # not the sft or reward trainer
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(StopOnNonFinite, "training_step", training_step)
        with pytest.raises(KeyboardInterrupt):
            run_rl(save_steps=1)
    capsys.readouterr()
    run_dir, records = run_rl(save_steps=1)
    assert "[rl] resuming from checkpoint-2" in capsys.readouterr().out and records["rl"]["status"] == "done"
    rows = logged(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    training = records["rl"]["metrics"]["training"]
    assert training["reward"]["first"] == rows[0]["reward"] and training["reward"]["last"] == rows[-1]["reward"]
    assert training["reward"]["mean"] == pytest.approx(sum(r["reward"] for r in rows) / 3)
    assert read_json(run_dir / "rl" / "stage.json")["metrics"]["steps"] == 3


def test_rl_lm_head_changes_only_lm_head(run_rl):
    """Byte for byte: every saved tensor but lm_head.weight equals the SFT model's merged weights; the
    reference is the frozen SFT copy (KL 0 at step 0), not the base TRL would load by name."""
    from safetensors.torch import load_file

    from pipeline.models import load_stage_model

    run_dir, records = run_rl(trainable="lm_head")
    rows = logged(run_dir)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0
    saved = load_file(run_dir / "rl" / "model.safetensors")
    sft = load_stage_model(run_dir / "sft", merge_all=True)[0].state_dict()
    assert "lm_head.weight" in saved and set(saved) == set(sft)
    for name, tensor in saved.items():
        if name != "lm_head.weight":
            assert tensor.dtype == sft[name].dtype and torch.equal(tensor, sft[name]), name
    assert not torch.equal(saved["lm_head.weight"], sft["lm_head.weight"])
    policy, _ = load_stage_model(run_dir / "rl")
    assert torch.equal(policy.lm_head.weight, saved["lm_head.weight"])
    metrics = records["rl"]["metrics"]
    assert metrics["trainable"] == "lm_head" and metrics["trainable_parameters"] == saved["lm_head.weight"].numel()


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("drop, rl_extra, message", [
    (("sft", "reward"), {"reward": {"rule": 1.0, "model": 0.0}}, "the rl stage starts from the SFT model"),
    (("reward",), {"reward": {"rule": 1.0, "model": 0.5}}, "rl.reward.model scores replies with the reward stage's"),
    ((), {"reward": {"rule": 0.0, "model": 0.0}}, "rl.reward: give `rule` or `model` a weight above 0"),
    ((), {"num_generations": 1}, "rl.num_generations: must be >= 2"),
    ((), {"global_batch_size": 6}, "must be a multiple of num_generations (4)"),
    ((), {"beta": -0.1}, "rl.beta: must be >= 0"),
    ((), {"lora": {"dropout": 0.1}}, "rl.lora.dropout (0.1) must be 0"),
])
def test_bad_rl_sections_are_one_line_errors(tiny_world, tmp_path, drop, rl_extra, message):
    data = tiny_recipe_dict(tiny_world, tmp_path / "runs", "bad")
    data["sft"] = sft_section(tiny_world)
    data["reward"] = {"train_data": [str(tiny_world / "dpo_train.jsonl")]}
    data["rl"] = rl_section(tiny_world, **rl_extra)
    for section in drop:
        del data[section]
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(PipelineError) as err:
        load_recipe(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rl_is_a_model_stage_everywhere():
    from pipeline.recipe import STAGE_ORDER
    from pipeline.run import STAGE_MODULES
    from pipeline.stages.eval import MODEL_STAGES, REFERENCE_OF

    assert STAGE_ORDER.index("reward") < STAGE_ORDER.index("rl") < STAGE_ORDER.index("eval")
    assert STAGE_MODULES["rl"] == "pipeline.stages.rl" and "rl" in MODEL_STAGES and REFERENCE_OF["rl"]
