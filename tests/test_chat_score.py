"""chat and score: the chat renders prompts as training did, decoding options agree, scores add up."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys

import pytest
import torch

from pipeline.chat import ChatSession, Sampling, TooLong
from pipeline.chat_template import ChatRenderer
from pipeline.errors import PipelineError
from pipeline.models import load_stage_model
from pipeline.score import score_sentences


@pytest.fixture(scope="module")
def dpo_model(dpo_run):
    run_dir, _ = dpo_run
    model, tokenizer = load_stage_model(run_dir / "dpo")
    return run_dir, model.eval(), tokenizer


def test_chat_prompt_ids_equal_the_training_render(dpo_model):
    _, model, tokenizer = dpo_model
    session = ChatSession(model, tokenizer, Sampling(greedy=True, max_new_tokens=8), system="Be brief.")
    first = session.reply("Where does Tolbik live?")
    prompt = session.prompt_ids("And his pet?")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does Tolbik live?"},
                    {"role": "assistant", "content": first}, {"role": "user", "content": "And his pet?"},
                    {"role": "assistant", "content": "x"}]
    rendered = ChatRenderer(tokenizer).render(conversation)
    answer_start = rendered.assistant_mask.index(1, len(prompt) - 1)
    assert prompt == rendered.input_ids[:answer_start]


def test_near_zero_temperature_and_top_k_1_equal_greedy(dpo_model):
    _, model, tokenizer = dpo_model
    question = "What is Tolbik's job?"
    greedy = ChatSession(model, tokenizer, Sampling(greedy=True, max_new_tokens=16)).reply(question)
    cold = ChatSession(model, tokenizer, Sampling(temperature=1e-4, max_new_tokens=16, seed=1)).reply(question)
    top1 = ChatSession(model, tokenizer, Sampling(temperature=1.5, top_k=1, max_new_tokens=16, seed=2)).reply(question)
    assert greedy == cold == top1


def test_chat_through_a_pipe_answers_and_exits(dpo_run, cli_env):
    run_dir, _ = dpo_run
    stdin = ("Where does Tolbik live?\n/system Answer briefly.\nWhat is 2 plus 3?\n/systematic\n/help\n/system\n/quit\n"
             "never read\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "chat", str(run_dir / "dpo"), "--greedy",
                             "--max-new-tokens", "8"], input=stdin, capture_output=True, text=True, env=cli_env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("assistant> ") == 2
    assert "(system message set; new conversation)" in result.stdout
    assert "unknown command /systematic" in result.stdout  # not a system message "atic"
    assert "\ncommands: /reset" in result.stdout and "unknown command /help" not in result.stdout
    assert "(system message cleared; new conversation)" in result.stdout


def test_chat_leaves_out_the_oldest_exchanges_and_refuses_a_message_longer_than_the_context(dpo_model):
    _, model, tokenizer = dpo_model
    session = ChatSession(model, tokenizer, Sampling(greedy=True, max_new_tokens=16))
    assert session.context == model.config.max_position_embeddings == 128
    shown = io.StringIO()
    question = "Where does Tolbik live, and what is the job of the person who lives in the next town?"
    for _ in range(6):
        session.reply(question, stream=shown)
        ids, _ = session.fitted_prompt(question)
        assert len(ids) + 16 <= session.context  # the reply always has its max_new_tokens
    assert 2 <= len(session.history) < 12
    assert "oldest exchange(s) no longer fit the model's 128-token context and were left out" in shown.getvalue()
    kept = list(session.history)
    with pytest.raises(TooLong, match=r"that message takes \d+ tokens .* context is 128: shorten it"):
        session.reply("word " * 200)
    assert session.history == kept  # a refused message loses nothing


@pytest.mark.parametrize("option, value, expected", [
    ("--max-new-tokens", "0", "expected a whole number at least 1, got '0'"),
    ("--temperature", "-1", "expected a number at least 0, got '-1'"),
    ("--temperature", "inf", "expected a number at least 0, got 'inf'"),
    ("--top-p", "0", "expected a number over 0 and at most 1, got '0'"),
    ("--top-p", "1.5", "expected a number over 0 and at most 1, got '1.5'"),
    ("--top-k", "-3", "expected a whole number at least 0, got '-3'"),
    ("--seed", "x", "expected a whole number at least 0 and at most 4294967295, got 'x'"),
])
def test_chat_sampling_options_out_of_range_are_usage_errors(option, value, expected, capsys):
    """generate() raised a ValueError traceback for each of these."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "runs/any/dpo", option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: {expected}" in capsys.readouterr().err


def test_a_run_folder_or_a_missing_path_given_for_a_model_says_which(dpo_run, tmp_path):
    """Both said "neither a model folder (config.json) nor an adapter stage (lineage.json)"."""
    run_dir, _ = dpo_run
    stages = ", ".join(str(run_dir / name) for name in ("dpo", "pretrain", "sft"))  # not tokenizer, not eval
    with pytest.raises(PipelineError, match=re.escape(f"{run_dir} is a run folder; give one of its model stages "
                                                      f"({stages})")):
        load_stage_model(run_dir)
    with pytest.raises(PipelineError, match=re.escape(f"{tmp_path / 'nope'}: no such folder")):
        load_stage_model(tmp_path / "nope")


def test_score_refuses_text_longer_than_the_context(dpo_model):
    _, model, tokenizer = dpo_model
    with pytest.raises(PipelineError, match=r"text 2 is \d+ tokens, but this model's context is 128"):
        score_sentences(model, tokenizer, ["Tolbik lives in Varn.", "word " * 200])


def test_score_sums_to_the_sequence_log_likelihood(dpo_model):
    _, model, tokenizer = dpo_model
    texts = ["Tolbik lives in Varn.", "Tolbik lives in Varn Varn Varn."]
    scores = score_sentences(model, tokenizer, texts)
    for text, score in zip(texts, scores):
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        direct = sum(logits[i].log_softmax(-1)[ids[i + 1]].item() for i in range(len(ids) - 1))
        assert score.logprob == pytest.approx(direct, abs=1e-4)
        assert len(score.tokens) == len(ids) - 1
        assert all(lp <= 0 for lp in score.token_logprobs)
    assert math.isfinite(scores[0].logprob)


def test_eval_report_numbers_are_recomputable(dpo_run, tmp_path):
    """report.json's numbers for the sft stage equal an independent recomputation."""
    from pipeline.config_schema import build
    from pipeline.data.readers import read_records
    from pipeline.data.world import answer_correct, has_habit
    from pipeline.generation import generate_replies, prompts_of
    from pipeline.recipe import EvalConfig, Recipe, read_yaml
    from pipeline.stages.eval import evaluate_run

    run_dir, records = dpo_run
    recipe = build(Recipe, read_yaml(run_dir / "recipe.yaml"))
    cfg = EvalConfig(limit=10, max_new_tokens=12, kl_prompts=4, transcripts=3)
    results = evaluate_run(run_dir, cfg, recipe, tmp_path / "eval", log=lambda *_: None)
    for name in ("report.md", "report.json", "transcripts.jsonl", "plots/loss_pretrain.png", "plots/loss_sft.png",
                 "plots/loss_dpo.png", "plots/dpo_rewards.png", "plots/metrics_by_stage.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    assert set(results) == {"pretrain", "sft", "dpo"}
    assert "| held-out answer accuracy (tiny world) |" in (tmp_path / "eval" / "report.md").read_text()

    # recompute the sft column by hand
    model, tokenizer = load_stage_model(run_dir / "sft")
    questions = read_records(recipe.sft.eval_data[0], "conversation", keep=("answer",)).records[:10]
    replies = generate_replies(model, tokenizer, prompts_of(questions), max_new_tokens=12, seed=recipe.seed)
    accuracy = sum(answer_correct(r, q["answer"]) for r, q in zip(replies, questions)) / len(questions)
    habit = sum(map(has_habit, replies)) / len(replies)
    report = __import__("json").loads((tmp_path / "eval" / "report.json").read_text())["stages"]["sft"]
    assert report["answer_accuracy"] == accuracy and report["habit_rate"] == habit
    assert report["text_perplexity"] > 1.0 and results["dpo"]["kl_from_reference"] >= 0
    assert results["sft"]["kl_from_reference"] >= 0 and "kl_from_reference" not in results["pretrain"]
    text = (tmp_path / "eval" / "report.md").read_text()
    assert "Metrics that apply to this data: text_perplexity, response_perplexity, eot_rate" in text


def test_answer_scores_break_down_by_attribute():
    from pipeline.evaluation import tiny_world_scores as score_answers

    records = [{"answer": "Ostrel", "attribute": "town"}, {"answer": "Varn", "attribute": "town"},
               {"answer": "baker", "attribute": "job"}, {"messages": []}]
    replies = ["Nozan lives in Ostrel.", "Nozan lives in Fennick.", "Nozan works as a baker.", "Hello."]
    scores = score_answers(records, replies)
    assert scores["answer_accuracy"] == 2 / 3 and scores["scored"] == 3
    assert scores["accuracy_by_attribute"] == {"job": 1.0, "town": 0.5}


def test_generation_halves_its_batch_when_memory_runs_out(tiny_tokenizer, capsys):
    """A batch that does not fit is split and retried; greedy replies are those of an unbroken run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.generation import generate_replies

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         initializer_range=0.5)).eval()
    prompts = [[{"role": "user", "content": f"Where does person {i} live?"}] for i in range(7)]
    state = torch.random.get_rng_state()
    expected = generate_replies(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=8)
    assert torch.equal(torch.random.get_rng_state(), state)  # its seeding does not leak into training
    real_generate, widths = model.generate, []

    def generate(**kwargs):  # "memory" for at most 2 prompts at a time
        widths.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
        return real_generate(**kwargs)

    model.generate = generate
    assert generate_replies(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=8) == expected
    assert widths == [7, 4, 2, 2, 2, 1]
    assert "retrying with batches of 2" in capsys.readouterr().out
