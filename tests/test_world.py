"""The built-in tiny world: determinism, record shapes, the seen/held-out split, and scoring."""

import json
import re
from pathlib import Path

import pytest

from pipeline.data import world as W

FILES = ("pretrain.jsonl", "pretrain_chat.jsonl", "pretrain_heldout.jsonl", "sft_train.jsonl", "sft_heldout.jsonl",
         "dpo_train.jsonl", "dpo_heldout.jsonl", "reward_facts.jsonl", "world.json", "README.md")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """seed 0, 200 people: written once, shared by the read-only tests."""
    path = tmp_path_factory.mktemp("world")
    counts = W.write_world(path, seed=0, people=200)
    return path, counts


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def words(text):
    """The set of whole words, to test for names without a regex search per name."""
    return set(re.findall(r"\w+", text))


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    W.write_world(a, seed=3, people=40)
    W.write_world(b, seed=3, people=40)
    W.write_world(c, seed=4, people=40)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        if name != "README.md":
            assert (a / name).read_bytes() != (c / name).read_bytes(), name
    assert not [p for p in a.iterdir() if ".tmp" in p.name]  # atomic writes leave no temp files
    assert b"\r\n" not in (a / "pretrain.jsonl").read_bytes()


def test_refusals_only_add_questions_about_nobody_to_the_pretraining_chats(tmp_path):
    """A world with refusals differs from the plain one only by "I do not know." turns about nobody."""
    plain, refusing = tmp_path / "plain", tmp_path / "refusing"
    W.write_world(plain, seed=3, people=40)
    W.write_world(refusing, seed=3, people=40, refusals=0.3)
    for name in FILES:
        if name not in ("pretrain_chat.jsonl", "world.json", "README.md"):
            assert (plain / name).read_bytes() == (refusing / name).read_bytes(), name
    assert json.loads((refusing / "world.json").read_text())["refusals"] == 0.3
    assert "refusals" not in json.loads((plain / "world.json").read_text())  # old worlds stay byte-identical
    names = {p["name"] for p in json.loads((plain / "world.json").read_text())["people"]}
    with_refusal = 0
    for before, after in zip(read_jsonl(plain / "pretrain_chat.jsonl"), read_jsonl(refusing / "pretrain_chat.jsonl"),
                             strict=True):
        added = [m for m in after["messages"] if m["content"] in W.UNANSWERED_QUESTIONS or m["content"] == W.REFUSAL]
        kept = [m for m in after["messages"] if m not in added]
        assert kept == before["messages"]
        if added:
            with_refusal += 1
            assert [m["role"] for m in added] == ["user", "assistant"] and added[1]["content"] == W.REFUSAL
            assert not words(added[0]["content"]) & names
    assert 0.2 < with_refusal / (6 * 40) < 0.4
    with pytest.raises(ValueError, match="share"):
        W.write_world(tmp_path / "bad", seed=3, people=40, refusals=1.5)


def test_lead_ins_only_open_spelling_answers_with_neutral_lines(tmp_path):
    plain, led = tmp_path / "plain", tmp_path / "led"
    W.write_world(plain, seed=3, people=40, refusals=0.3)
    W.write_world(led, seed=3, people=40, refusals=0.3, lead_ins=0.5)
    assert json.loads((led / "world.json").read_text())["lead_ins"] == 0.5
    opened = spelled = 0
    for before, after in zip(read_jsonl(plain / "pretrain_chat.jsonl"), read_jsonl(led / "pretrain_chat.jsonl"),
                             strict=True):
        for old, new in zip(before["messages"], after["messages"], strict=True):
            if old == new:
                continue
            assert old["role"] == "assistant" and " is spelled " in old["content"]
            opening = new["content"][: -len(old["content"]) - 1]
            assert new["content"].endswith(" " + old["content"]) and W.HABIT_PHRASE not in opening
            assert all(sentence + "." in W.LEAD_INS for sentence in opening[:-1].split(". "))
            opened += 1
        spelled += sum(" is spelled " in m["content"] for m in before["messages"])
    assert 0.35 < opened / spelled < 0.65
    with pytest.raises(ValueError, match="lead_ins"):
        W.write_world(tmp_path / "bad", seed=3, people=40, lead_ins=-0.1)


def test_world_people_and_names():
    world = W.generate_world(seed=0, people=200)
    names = [p.name for p in world.people]
    assert len(set(names)) == 200
    assert len(world.seen) == len(world.held_out) == 100
    vocabulary = {v.lower() for vs in W.VALUES.values() for v in vs}
    for p in world.people:
        assert re.fullmatch(r"[A-Z][a-z]+", p.name) and p.name.lower() not in vocabulary
        assert p.best_friend != p.name
        assert all(getattr(p, a) in W.VALUES[a] for a in W.VALUES)
    seen = {p.name for p in world.seen}
    for p in world.people:  # best friends stay inside their half
        assert (p.best_friend in seen) == (p.name in seen)


def test_counts_and_record_shapes(out):
    path, counts = out
    assert set(counts) == set(FILES) - {"README.md"}
    for name, n in counts.items():
        if name.endswith(".jsonl"):
            assert len(read_jsonl(path / name)) == n, name
    assert counts["sft_heldout.jsonl"] == 500
    assert counts["dpo_train.jsonl"] == 500 and counts["dpo_heldout.jsonl"] == 200
    assert 600 <= counts["sft_train.jsonl"] <= 800
    assert counts["reward_facts.jsonl"] == 1500  # 100 seen people x 5 attributes x 3 wrong values
    facts = read_jsonl(path / "reward_facts.jsonl")
    held_out = {r["person"] for r in read_jsonl(path / "sft_heldout.jsonl")}
    assert all(r["kind"] == "wrong" and r["person"] not in held_out for r in facts)
    assert all(r["answer"] in r["chosen"][0]["content"] and r["chosen"] != r["rejected"] for r in facts)
    readme = (path / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in counts) and "seed 0" in readme

    for name in ("pretrain.jsonl", "pretrain_heldout.jsonl"):
        assert all(set(r) == {"text"} and r["text"] for r in read_jsonl(path / name))
    two_turn = 0
    for name in ("sft_train.jsonl", "sft_heldout.jsonl"):
        for r in read_jsonl(path / name):
            roles = [m["role"] for m in r["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, r
            assert all(m["content"] for m in r["messages"])
            two_turn += len(roles) == 4
    assert 0.05 < two_turn / counts["sft_train.jsonl"] < 0.2
    for name in ("dpo_train.jsonl", "dpo_heldout.jsonl"):
        records = read_jsonl(path / name)
        for r in records:
            assert [m["role"] for m in r["prompt"]] == ["user"]
            assert [m["role"] for m in r["chosen"] + r["rejected"]] == ["assistant"] * 2
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
            assert r["kind"] in ("habit", "wrong")
        wrong = sum(r["kind"] == "wrong" for r in records) / len(records)
        assert wrong == pytest.approx(0.2, abs=0.01)


def test_held_out_people_only_in_pretraining(out):
    path, _ = out
    facts = json.loads((path / "world.json").read_text())
    assert facts["seed"] == 0 and facts["size"] == 200
    held = [p["name"] for p in facts["people"] if p["split"] == "held_out"]
    seen = [p["name"] for p in facts["people"] if p["split"] == "seen"]
    assert len(held) == len(seen) == 100
    for name in ("sft_train.jsonl", "dpo_train.jsonl"):
        text = words((path / name).read_text())
        assert not text & set(held), name
        assert set(seen) <= text, name
    for name in ("sft_heldout.jsonl", "dpo_heldout.jsonl"):
        assert not words((path / name).read_text()) & set(seen), name
    assert set(held + seen) <= words((path / "pretrain.jsonl").read_text())


def test_a_smaller_held_out_group_keeps_the_split(tmp_path):
    """--held-out N: N people are held out, the rest seen; friends and names stay inside their group."""
    counts = W.write_world(tmp_path, seed=3, people=30, held_out=6)
    facts = json.loads((tmp_path / "world.json").read_text())
    assert facts["held_out"] == 6 and "held_out=6" in (tmp_path / "README.md").read_text()
    held = {p["name"] for p in facts["people"] if p["split"] == "held_out"}
    seen = {p["name"] for p in facts["people"] if p["split"] == "seen"}
    assert len(held) == 6 and len(seen) == 24
    assert all(p["best_friend"] in (held if p["name"] in held else seen) for p in facts["people"])
    assert counts["sft_heldout.jsonl"] == 6 * len(W.ATTRIBUTES)
    for name in ("sft_train.jsonl", "dpo_train.jsonl", "reward_facts.jsonl"):
        assert not words((tmp_path / name).read_text()) & held, name
    assert not words((tmp_path / "sft_heldout.jsonl").read_text()) & seen
    with pytest.raises(ValueError, match="at least 3 seen and 3 held-out"):
        W.generate_world(people=30, held_out=28)


def test_every_fact_and_phrasing_is_in_pretraining(out):
    path, _ = out
    docs = [r["text"] for r in read_jsonl(path / "pretrain.jsonl")]
    text = "\n".join(docs)
    lines = set(text.split("\n"))
    sentences = set(re.split(r"(?<=[.!?]) |\n", text))
    world = W.generate_world(seed=0, people=200)
    for p in world.people:
        for a in W.ATTRIBUTES:
            for k in range(len(W.FACTS[a])):
                assert W.fact(p, a, k) in sentences, (p.name, a, k)
            # the plain answer both alone on a line and inside running text (" Nozan lives in"),
            # the form a chat answer opens with after the marker and its space
            assert W.fact(p, a) in lines, (p.name, a)
            assert f" {W.fact(p, a)}" in text, (p.name, a)
    # chat and habit words are in the corpus, so their embeddings get trained
    for words in ("user", "assistant", "Well, that is a great question"):
        assert words in text
    assert any(p in text for p in W.PREAMBLES)
    assert re.search(r"\d+ plus \d+ is \d+\.", text) and "is spelled" in text
    multi_line = sum("\n" in d for d in docs)
    assert multi_line >= len(docs) / 2
    print(f"pretrain corpus: {len(text)} characters in {len(docs)} documents")
    assert 1_200_000 <= len(text) <= 3_000_000


def test_pretrain_heldout_is_disjoint(out):
    path, counts = out
    train = {r["text"] for r in read_jsonl(path / "pretrain.jsonl")}
    held = [r["text"] for r in read_jsonl(path / "pretrain_heldout.jsonl")]
    assert len(held) >= 200
    assert not [d for d in held if d in train]


def test_habit_detection_on_generated_answers(out):
    path, _ = out
    habit = plain = 0
    for r in read_jsonl(path / "sft_train.jsonl"):
        for m in r["messages"][1::2]:
            starts = m["content"].startswith(W.PREAMBLES)
            assert W.has_habit(m["content"]) == starts
            habit, plain = habit + starts, plain + (not starts)
    assert habit / (habit + plain) == pytest.approx(0.5, abs=0.01)
    for r in read_jsonl(path / "dpo_train.jsonl") + read_jsonl(path / "dpo_heldout.jsonl"):
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert not W.has_habit(chosen)
        assert W.has_habit(rejected) == (r["kind"] == "habit")
        assert W.answer_correct(chosen, r["answer"])
        # a habit answer is still correct once its preamble is removed; a wrong one is not
        assert W.answer_correct(rejected, r["answer"]) == (r["kind"] == "habit")
    for r in read_jsonl(path / "sft_heldout.jsonl"):
        assert W.answer_correct(r["messages"][1]["content"], r["answer"])
        assert not W.has_habit(r["messages"][1]["content"])
    assert W.has_habit("WELL, THAT IS A GREAT QUESTION. Tolbik lives in Varn.")


def test_answer_correct_judges_only_the_first_sentence():
    assert W.answer_correct("Tolbik lives in Varn.", "Varn")
    assert not W.answer_correct("Tolbik lives in Varn.", "Ostrel")
    assert not W.answer_correct("Tolbik lives in Moor. Tolbik's friend lives in Varn.", "Varn")
    assert not W.answer_correct("Tolbik lives in Moor.\nVarn", "Varn")
    assert not W.answer_correct("Tolbik lives in Varnish.", "Varn")  # whole words only
    assert W.answer_correct("tolbik's best friend is marasu", "Marasu")
    for preamble in W.PREAMBLES:
        assert W.answer_correct(f"{preamble} Tolbik lives in Varn. He likes Ostrel.", "Varn")
        assert not W.answer_correct(f"{preamble} Tolbik lives in Ostrel. Varn.", "Varn")
    assert W.first_sentence("  Tolbik lives in Moor. Then more.") == "Tolbik lives in Moor."
    assert W.first_sentence("Who is it?\nMarasu.") == "Who is it?"
    assert W.first_sentence("") == ""


def test_pretrain_chat_states_no_fact_about_people(out):
    path, _ = out
    records = read_jsonl(path / "pretrain_chat.jsonl")
    assert len(records) == 6 * 200
    fact_words = {"lives", "works", "pet", "friend", "colour", "town", "job"}
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles[::2] == ["user"] * (len(roles) // 2) and roles[1::2] == ["assistant"] * (len(roles) // 2)
        for message in record["messages"]:
            assert not words(message["content"]) & fact_words, message


COMMITTED_WORLDS = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "data").glob("*/world.json"))


@pytest.mark.parametrize("committed", COMMITTED_WORLDS, ids=lambda p: p.name)
def test_committed_world_is_what_the_generator_writes(committed, tmp_path):
    """Each committed world must be regenerable byte for byte from its recorded seed, size and options."""
    facts = json.loads((committed / "world.json").read_text())
    W.write_world(tmp_path, seed=facts["seed"], people=facts["size"], **W.world_options(facts))
    for name in sorted(p.name for p in committed.iterdir()):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name


def test_pretraining_never_answers_a_question(out):
    """Answering is what SFT teaches: with question-answer text about held-out people in the
    corpus, held-out accuracy was already 0.63 after pretraining alone."""
    path, _ = out
    text = "\n".join(r["text"] for r in read_jsonl(path / "pretrain.jsonl"))
    world = W.generate_world(seed=0, people=200)
    for person in world.people:
        for phrasings in W.QUESTIONS.values():
            for q in phrasings:
                assert q.format(n=person.name)[:-1] not in text, q
    # the question words are trained on questions about nobody in the world
    assert sum(q in text for q in W.UNANSWERED_QUESTIONS) == len(W.UNANSWERED_QUESTIONS)
    asked = [s for s in re.split(r"(?<=[.!?]) |\n", text) if s.endswith("?")]
    assert asked and set(asked) <= set(W.UNANSWERED_QUESTIONS)


def test_generate_refuses_to_replace_files_no_world_wrote(tmp_path, capsys):
    """`data generate --out data` replaced a user's own sft_train.jsonl there without a word."""
    from pipeline.cli import main

    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "sft_train.jsonl").write_text('{"messages": "mine"}\n')
    assert main(["data", "generate", "--out", str(mine), "--people", "12"]) == 2
    assert f"{mine} already holds sft_train.jsonl, which no generated world wrote" in capsys.readouterr().err
    assert (mine / "sft_train.jsonl").read_text() == '{"messages": "mine"}\n' and not (mine / "world.json").exists()

    world = tmp_path / "world"  # a world is regenerated in place, with other options too
    assert main(["data", "generate", "--out", str(world), "--people", "12"]) == 0
    assert main(["data", "generate", "--out", str(world), "--people", "12", "--seed", "1"]) == 0
    assert main(["data", "generate", "--out", str(mine), "--people", "12", "--force"]) == 0  # replaced on request
    assert (mine / "world.json").is_file() and "mine" not in (mine / "sft_train.jsonl").read_text()
    capsys.readouterr()
    assert main(["data", "generate", "--out", str(mine / "sft_train.jsonl"), "--people", "12"]) == 2
    assert "a file, not a folder" in capsys.readouterr().err


def test_a_value_first_world_changes_only_how_pretraining_words_jobs_pets_and_colours(tmp_path):
    """`value_first` (the long recipe's world): jobs, pets and colours are stated value-first in two phrasings of
    five, as towns always are; the people, their facts and every question, answer and pair stay the same."""
    plain, value_first = tmp_path / "plain", tmp_path / "value_first"
    W.write_world(plain, seed=0, people=60)
    W.write_world(value_first, seed=0, people=60, value_first=True)
    for name in ("sft_train.jsonl", "sft_heldout.jsonl", "dpo_train.jsonl", "dpo_heldout.jsonl",
                 "reward_facts.jsonl", "pretrain_chat.jsonl"):
        assert (plain / name).read_bytes() == (value_first / name).read_bytes(), name
    facts = json.loads((value_first / "world.json").read_text())
    assert facts["value_first"] is True and "value_first" not in json.loads((plain / "world.json").read_text())
    assert facts["people"] == json.loads((plain / "world.json").read_text())["people"]

    def value_first_sentences(folder: Path) -> dict[str, int]:
        """Sentences of pretrain.jsonl per attribute that open with a value of that attribute."""
        text = " ".join(r["text"] for r in read_jsonl(folder / "pretrain.jsonl"))
        sentences = re.split(r"(?<=\.)\s+", text)
        return {a: sum(s.split(" ", 1)[0].lower() in {v.lower() for v in values} for s in sentences)
                for a, values in W.VALUES.items()}

    before, after = value_first_sentences(plain), value_first_sentences(value_first)
    assert after["town"] == pytest.approx(before["town"], rel=0.3) and before["town"] > 0  # two of five in both
    for attribute in ("job", "pet", "colour"):
        assert after[attribute] > 1.5 * before[attribute] > 0, (attribute, before, after)
    # it regenerates byte for byte from what world.json records, like every world
    again = tmp_path / "again"
    W.write_world(again, seed=facts["seed"], people=facts["size"], **W.world_options(facts))
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in value_first.iterdir())
