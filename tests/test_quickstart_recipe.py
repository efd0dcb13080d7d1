"""The quickstart's must-show, end to end: recipes/quickstart.yaml as committed, on its world and on the
same-size worlds of two other seeds (the recipe is not tuned to one world).

Pretraining stores the facts of 100 people and never answers a question; SFT asks about 75 of them; the
other 25 are held out. Held-out answer accuracy must start at most 0.10 and reach at least 0.90 after SFT;
DPO then removes the habit (at most 0.01, greedy) with preference accuracy at least 0.90 and answers kept
(within 2 points of SFT's). About 4 minutes per world on a 2-core CPU with bf16 hardware, so the test is not
part of the default run:

    PIPELINE_LONG_TESTS=1 python -m pytest -q tests/test_quickstart_recipe.py

The recipe's header records the numbers of its last runs.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline.artifacts import read_json
from pipeline.data.world import world_options, write_world
from pipeline.recipe import load_recipe
from pipeline.run import run_recipe

ROOT = Path(__file__).resolve().parents[1]
WORLD = "data/quickstart_world"
# the keys of recipes/quickstart.yaml that name files of its world
DATA_KEYS = {"tokenizer.corpus": ["pretrain.jsonl"], "pretrain.train_data": ["pretrain.jsonl"],
             "pretrain.chat_data": ["pretrain_chat.jsonl"], "pretrain.eval_data": ["pretrain_heldout.jsonl"],
             "sft.train_data": ["sft_train.jsonl"], "sft.eval_data": ["sft_heldout.jsonl"],
             "dpo.train_data": ["dpo_train.jsonl", "reward_facts.jsonl"], "dpo.eval_data": ["dpo_heldout.jsonl"],
             "dpo.answer_data": ["sft_heldout.jsonl"]}


def test_data_keys_name_every_world_file_the_recipe_reads():
    """The seed variants below swap these keys; a key added to the recipe must be added here."""
    text = (ROOT / "recipes" / "quickstart.yaml").read_text()
    assert text.count(WORLD + "/") == sum(map(len, DATA_KEYS.values()))
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    for key, files in DATA_KEYS.items():
        section, field = key.split(".")
        assert getattr(getattr(recipe, section), field) == [f"{WORLD}/{file}" for file in files], key


@pytest.mark.skipif(not os.environ.get("PIPELINE_LONG_TESTS"),
                    reason="runs recipes/quickstart.yaml on three worlds, about 4 minutes each on 2 CPU cores with bf16 hardware; "
                           "set PIPELINE_LONG_TESTS=1 to run it")
@pytest.mark.parametrize("world_seed", [0, 1, 2])
def test_quickstart_shows_every_stage_doing_its_job(world_seed, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's data paths are relative to the repository
    overrides = [f"output_dir={tmp_path}"]
    if world_seed:
        facts = json.loads((ROOT / WORLD / "world.json").read_text())
        world = tmp_path / f"world_{world_seed}"
        write_world(world, seed=world_seed, people=facts["size"], **world_options(facts))
        overrides += [f"{key}=[{','.join(str(world / file) for file in files)}]" for key, files in DATA_KEYS.items()]
    run_recipe(load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides))
    run_dir = tmp_path / "quickstart"

    sft = read_json(run_dir / "sft" / "stage.json")["metrics"]
    before, after = sft["heldout_before"], sft["heldout_after"]
    assert before["scored"] == after["scored"] == 125
    assert before["answer_accuracy"] <= 0.10, before["accuracy_by_attribute"]
    assert after["answer_accuracy"] >= 0.90, after["accuracy_by_attribute"]

    dpo = read_json(run_dir / "dpo" / "stage.json")["metrics"]["heldout_after"]
    assert dpo["habit_rate"] <= 0.01, dpo
    assert dpo["reward_accuracy"] >= 0.90 - 1e-6, dpo  # 45 of 50 pairs is 0.9 in float32, 0.8999999762
    assert dpo["answer_accuracy"] >= after["answer_accuracy"] - 0.02, dpo

    # the report's transcripts show answers, not one memorised sentence: sft's replies differ and name the
    # expected value as often as the sft bar asks (one transcript per held-out question). A wrong answer may
    # repeat a right one (another question about the same person answered with this fact), so "differ" means
    # at least as many distinct replies as the bar asks right answers.
    rows = [json.loads(line) for line in (run_dir / "eval" / "transcripts.jsonl").read_text().splitlines()]
    assert len(rows) == 125 and len({row["sft"] for row in rows}) >= 0.90 * len(rows)
    assert sum(row["answer"] in row["sft"] for row in rows) >= 0.90 * len(rows)


@pytest.mark.skipif(not os.environ.get("PIPELINE_LONG_TESTS"),
                    reason="pretrains the quickstart's model (about 2.5 minutes on 2 CPU cores with bf16 hardware), "
                           "then sft and rl; set PIPELINE_LONG_TESTS=1 to run it")
def test_rl_with_the_rule_alone_raises_held_out_accuracy_where_sft_is_often_wrong(tmp_path, monkeypatch):
    """Issue 16: with the world's rule as its only reward (the right fact, no preamble), rl raises held-out answer
    accuracy above its SFT model's where that model is often wrong: SFT trained 1 epoch instead of 10. The rl
    prompts are about the seen people only, so the gain is on people no stage trained on. Measured (2026-12-02,
    family-26 EPYC, bf16): seed 0 0.320 -> 0.696, seed 1 0.424 -> 0.792; from 2 and 3 epochs 0.552 -> 0.832,
    0.696 -> 0.968 (seed 0) and 0.512 -> 0.992, 0.608 -> 1.000 (seed 1); from the recipe's 10, 0.976 -> 1.000."""
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    del recipe["dpo"], recipe["eval"]
    recipe["sft"]["epochs"] = 1
    recipe["rl"] = {"train_data": [f"{WORLD}/dpo_train.jsonl"], "eval_data": [f"{WORLD}/dpo_heldout.jsonl"],
                    "answer_data": [f"{WORLD}/sft_heldout.jsonl"], "beta": 0.05, "num_generations": 4,
                    "max_new_tokens": 40, "max_steps": 80, "global_batch_size": 16, "learning_rate": 5.0e-4}
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_recipe(load_recipe(path, [f"output_dir={tmp_path}"]))

    sft = read_json(tmp_path / "quickstart" / "sft" / "stage.json")["metrics"]["heldout_after"]
    rl = read_json(tmp_path / "quickstart" / "rl" / "stage.json")["metrics"]
    assert sft["answer_accuracy"] <= 0.6, sft  # often wrong, as asked
    assert rl["heldout_after"]["answer_accuracy"] >= sft["answer_accuracy"] + 0.2, rl["heldout_after"]
    assert rl["heldout_after"]["habit_rate"] <= 0.01, rl["heldout_after"]
    assert rl["heldout_before"]["answer_accuracy"] == sft["answer_accuracy"]  # rl starts from that model
