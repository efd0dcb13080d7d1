"""Readers: every input format from small inline files, the error messages, and the real files in shared/data."""

from __future__ import annotations

import gzip
import json
import re
import sys
import types
from pathlib import Path

import pytest

from pipeline.data.readers import describe, looks_like_hub_id, read_records
from pipeline.errors import PipelineError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# ---------------------------------------------------------------------------- text


def test_text_jsonl_reads_text_or_content(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"content": "two"}, {"text": "one"}])
    result = read_records(path, "text")
    assert result.records == [{"text": "one"}, {"text": "two"}, {"text": "one"}]
    assert (result.format, result.duplicates, result.dropped) == ("text", 1, {})


def test_text_errors_name_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": 3}, {"text": "  "}])
    with pytest.raises(PipelineError, match=r't\.jsonl line 2: field "text": expected a string, got int$'):
        read_records(path, "text")
    result = read_records(path, "text", on_bad="drop")
    assert result.dropped == {"bad_type": 1, "empty_text": 1}
    assert any("line 3" in p and '"text"' in p for p in result.problems)


def test_txt_splits_on_endoftext_lines(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("\nOnce upon a time.\n<|endoftext|>\nThe end.\nMore <|endoftext|> inline.\n<|endoftext|>\n", "utf-8")
    result = read_records(path, "text")
    assert result.format == "txt"
    # the inline marker is not a separator; the empty piece after the last separator is not a document
    assert result.records == [{"text": "Once upon a time."}, {"text": "The end.\nMore <|endoftext|> inline."}]


def test_txt_without_separator_is_one_document(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak.\n", "utf-8")
    assert read_records(path, "text").records == [{"text": "First Citizen:\nBefore we proceed.\n\nAll:\nSpeak."}]


def test_txt_needs_kind_text(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("hello", "utf-8")
    with pytest.raises(PipelineError, match=r"s\.txt: a \.txt file holds plain text"):
        read_records(path, "conversation")


# ---------------------------------------------------------------------------- conversation formats


def test_openai_messages(tmp_path):
    rows = [{"messages": [system("Be brief."), user("Hi"), assistant("Hello"), user("Bye"), assistant("Bye!")], "id": 7}]
    result = read_records(write_jsonl(tmp_path / "c.jsonl", rows), "conversation")
    assert result.format == "messages"
    assert result.records == [{"messages": rows[0]["messages"]}]


def test_conversations_with_role_content_is_messages(tmp_path):
    rows = [{"conversations": [user("Hi"), assistant("Hello")]}]
    result = read_records(write_jsonl(tmp_path / "c.jsonl", rows), "conversation")
    assert result.format == "messages"
    assert result.records == [{"messages": [user("Hi"), assistant("Hello")]}]


def test_message_content_type_error(tmp_path):
    rows = [{"messages": [user("Hi"), assistant("Hello")]}, {"messages": [user("Hi"), assistant(5)]}]
    with pytest.raises(PipelineError) as err:
        read_records(write_jsonl(tmp_path / "x.jsonl", rows), "conversation")
    assert str(err.value).endswith('x.jsonl line 2: field "messages[1].content": expected a string, got int')


def test_sharegpt_roles_and_system_field(tmp_path):
    rows = [{
        "system": "You are Vicuna.",
        "conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "Vicuna."}],
    }]
    result = read_records(write_json(tmp_path / "s.json", rows), "conversation")
    assert result.format == "sharegpt"
    assert result.records[0]["messages"] == [system("You are Vicuna."), user("Who are you?"), assistant("Vicuna.")]


def test_sharegpt_unsupported_role(tmp_path):
    ok = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    tool = {"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{}"},
                              {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "b"}]}
    path = write_json(tmp_path / "g.json", [ok, tool, ok])
    with pytest.raises(PipelineError) as err:
        read_records(path, "conversation")
    message = str(err.value)
    assert "g.json index 1" in message and '"conversations[1].from"' in message and '"function_call"' in message
    result = read_records(path, "conversation", on_bad="drop")
    assert len(result.records) == 2 and result.dropped == {"unknown_role": 1} and result.duplicates == 1


def test_alpaca_input_history_and_system(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"instruction": "And now?", "output": "Done", "history": [["Q1", "A1"], ["Q2", "A2"]], "system": "Sys"},
    ]
    result = read_records(write_json(tmp_path / "a.json", rows), "conversation")
    assert result.format == "alpaca"
    assert result.records[0]["messages"] == [user("Translate.\n\nBonjour"), assistant("Hello")]
    assert result.records[1]["messages"] == [user("Say hi."), assistant("Hi")]
    assert result.records[2]["messages"] == [
        system("Sys"), user("Q1"), assistant("A1"), user("Q2"), assistant("A2"), user("And now?"), assistant("Done"),
    ]


def test_alpaca_errors(tmp_path):
    rows = [
        {"instruction": "x", "input": "", "output": ""},
        {"instruction": "x", "input": "", "output": "y", "history": [["only question"]]},
        {"instruction": "x", "input": ""},
        {"instruction": "x", "input": "", "output": "fine"},
    ]
    path = write_json(tmp_path / "a.json", rows)
    with pytest.raises(PipelineError, match=r'a\.json index 0: field "output": empty assistant message'):
        read_records(path, "conversation")
    result = read_records(path, "conversation", fmt="alpaca", on_bad="drop")
    assert result.dropped == {"empty_response": 1, "bad_type": 1, "missing_field": 1}
    assert 'a.json index 1: field "history[0]": expected a [question, answer] pair, got a list of 1' in result.problems[1]
    assert 'a.json index 2: field "output": missing (fields present: instruction, input)' in result.problems[2]
    with pytest.raises(PipelineError, match="no usable records: all 3 were dropped"):
        read_records(write_json(tmp_path / "b.json", rows[:1] * 3), "conversation", on_bad="drop")


@pytest.mark.parametrize("answer_key", ["completion", "answer"])
def test_prompt_completion(tmp_path, answer_key):
    rows = [{"prompt": "2+2?", answer_key: "4"}]
    result = read_records(write_jsonl(tmp_path / "p.jsonl", rows), "conversation")
    assert result.format == "prompt_completion"
    assert result.records == [{"messages": [user("2+2?"), assistant("4")]}]


def test_role_order(tmp_path):
    rows = [{"messages": [user("a"), user("b"), assistant("c")]}, {"messages": [user("a"), assistant("b"), user("c")]},
            {"messages": [assistant("b")]}, {"messages": [user("a"), assistant("b")]}]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(PipelineError, match=r'r\.jsonl line 1: field "messages": roles must be .* got user, user, assistant'):
        read_records(path, "conversation")
    assert read_records(path, "conversation", on_bad="drop").dropped == {"role_order": 3}


def test_oasst_tree_takes_best_ranked_path(tmp_path):
    tree = {"message_id": "r", "role": "prompter", "text": "Q", "replies": [
        {"message_id": "a", "role": "assistant", "text": "worse", "rank": 1, "replies": []},
        {"message_id": "b", "role": "assistant", "text": "best", "rank": 0, "replies": [
            {"message_id": "c", "role": "prompter", "text": "follow-up with no answer", "replies": []}]},
    ]}
    leaf = {"message_id": "z", "role": "prompter", "text": "unanswered", "replies": []}
    result = read_records(write_jsonl(tmp_path / "o.jsonl", [tree, leaf]), "conversation", on_bad="drop")
    assert result.format == "oasst_tree"
    assert result.records == [{"messages": [user("Q"), assistant("best")]}]
    assert result.dropped == {"no_answer": 1}


# ---------------------------------------------------------------------------- file handling


def test_malformed_jsonl_line(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, '{"text": "b"', "", {"text": "c"}, "[1, 2]"])
    with pytest.raises(PipelineError, match=r"m\.jsonl line 2: invalid JSON: .*column"):
        read_records(path, "text")
    result = read_records(path, "text", on_bad="drop")
    assert [r["text"] for r in result.records] == ["a", "c"]
    assert result.dropped == {"bad_json": 1, "not_an_object": 1}
    assert "m.jsonl line 5: expected a JSON object, got list" in result.problems[1]  # blank line 3 still counted


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n', "utf-8")
    with pytest.raises(PipelineError, match=r"bad\.json line 3 column \d+: invalid JSON"):
        read_records(path, "text", on_bad="drop")


def test_json_object_with_one_list_field(tmp_path):
    path = write_json(tmp_path / "o.json", {"version": 2, "data": [{"text": "a"}, {"text": 1}]})
    with pytest.raises(PipelineError, match=r'o\.json "data" index 1: field "text"'):
        read_records(path, "text")
    with pytest.raises(PipelineError, match="one list field"):
        read_records(write_json(tmp_path / "two.json", {"a": [], "b": []}), "text")


def test_jsonl_gz_and_parquet(tmp_path):
    rows = [{"prompt": "Q", "chosen": "good", "rejected": "bad"}]
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(json.dumps(rows[0]).encode() + b"\n"))
    assert read_records(gz, "preference").records[0]["chosen"] == [assistant("good")]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"messages": [user("Hi"), assistant("Hello")]}, {"messages": [user("Hi")]}])
    pq.write_table(table, tmp_path / "c.parquet")
    result = read_records(tmp_path / "c.parquet", "conversation", on_bad="drop")
    assert result.records == [{"messages": [user("Hi"), assistant("Hello")]}]
    assert result.problems[0].startswith(f'{tmp_path / "c.parquet"} row 1: field "messages": roles must be')
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(PipelineError, match=r"junk\.parquet: cannot read Parquet: "):
        read_records(tmp_path / "junk.parquet", "text")


def test_missing_file_and_bad_arguments(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(PipelineError, match=f"^file not found: {re.escape(str(missing))}$"):
        read_records(missing, "text")
    with pytest.raises(PipelineError, match="^file not found: data/missing.jsonl$"):
        read_records("data/missing.jsonl", "text")
    with pytest.raises(PipelineError, match='unknown data kind "chat"'):
        read_records(missing, "chat")
    with pytest.raises(PipelineError, match='format "sharegpt" is not one for kind "preference"'):
        read_records(missing, "preference", fmt="sharegpt")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(PipelineError, match="unsupported file type"):
        read_records(tmp_path / "d.csv", "text")


def test_hub_ids(monkeypatch):
    assert looks_like_hub_id("Anthropic/hh-rlhf") and looks_like_hub_id("tatsu-lab/alpaca:train[:100]")
    assert not looks_like_hub_id("data/x.jsonl") and not looks_like_hub_id("/abs/x") and not looks_like_hub_id("a/b/c")
    assert looks_like_hub_id("tatsu-lab/alpaca@a1b2c3:train") and looks_like_hub_id("o/n@refs/convert/parquet")
    assert not looks_like_hub_id("o/n.jsonl@v1") and not looks_like_hub_id("o/n@")
    calls = []

    def load_dataset(name, split, **kwargs):
        calls.append((name, split, kwargs))
        if name == "nobody/nothing":
            raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub\nmore detail")
        return [{"text": "from the hub"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = read_records("someone/corpus:validation", "text")
    assert result.records == [{"text": "from the hub"}] and calls == [("someone/corpus", "validation", {})]
    read_records("someone/corpus@v1.2", "text")  # pinned: this revision whatever main holds now
    assert calls[-1] == ("someone/corpus", "train", {"revision": "v1.2"})
    with pytest.raises(PipelineError, match=r"^nobody/nothing: no such local file, and loading it as a hub dataset "
                                            r"failed: FileNotFoundError: Dataset 'nobody/nothing' doesn't exist on the Hub$"):
        read_records("nobody/nothing", "text")


def test_unrecognised_format_lists_fields(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"question_id": 1, "turns": ["a", "b"]}])
    with pytest.raises(PipelineError) as err:
        read_records(path, "conversation")
    message = str(err.value)
    assert "format not recognised" in message and "no answers" in message and "question_id, turns" in message
    assert "\n" not in message


def test_a_preference_pair_is_never_read_as_a_conversation(tmp_path):
    """A tiny-world pair also holds prompt + answer, which would pass for prompt/answer conversations: an sft stage
    pointed at the dpo file would train "question -> bare value". It is refused, saying what the file is for."""
    pair = {"prompt": [user("What is Nozan's job?")], "chosen": [assistant("Nozan works as a smith.")],
            "rejected": [assistant("Well... Nozan works as a smith.")], "answer": "smith"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair])
    with pytest.raises(PipelineError, match=r'format not recognised for kind "conversation": the fields look like '
                                            r"preference data \(format prompt_chosen_rejected\): a file for dpo"):
        read_records(path, "conversation")
    assert read_records(path, "preference").records[0]["chosen"] == [assistant("Nozan works as a smith.")]


def test_kind_auto_takes_the_kind_the_first_record_suggests(tmp_path):
    pair = {"prompt": "q", "chosen": "a", "rejected": "b", "answer": "a"}
    cases = {"pairs.jsonl": ([pair], "preference"), "chats.jsonl": ([{"messages": [user("q"), assistant("a")]}],
                                                                     "conversation"),
             "alpaca.jsonl": ([{"instruction": "q", "output": "a"}], "conversation"),
             "docs.jsonl": ([{"text": "some words"}], "text")}
    for name, (rows, kind) in cases.items():
        assert read_records(write_jsonl(tmp_path / name, rows), "auto").kind == kind, name
    (tmp_path / "plain.txt").write_text("one document")
    assert read_records(tmp_path / "plain.txt", "auto").kind == "text"
    with pytest.raises(PipelineError, match=r"the first record's fields \(foo\) are no known kind of record"):
        read_records(write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}]), "auto")


def test_explicit_format_overrides_detection(tmp_path):
    # a record that has both "messages" and instruction/output: detection picks messages, fmt can pick alpaca
    rows = [{"messages": [user("m"), assistant("n")], "instruction": "i", "output": "o"}]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    assert read_records(path, "conversation").records[0]["messages"][0] == user("m")
    assert read_records(path, "conversation", fmt="alpaca").records[0]["messages"][0] == user("i")


# ---------------------------------------------------------------------------- preference formats


def test_prompt_chosen_rejected_strings_and_lists(tmp_path):
    rows = [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": [system("S"), user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]},
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "good", "rejected": " "},
        {"prompt": [user("Q"), assistant("A")], "chosen": "good", "rejected": "bad"},
    ]
    result = read_records(write_jsonl(tmp_path / "p.jsonl", rows), "preference", on_bad="drop")
    assert result.format == "prompt_chosen_rejected"
    assert result.records == [
        {"prompt": [user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]},
        {"prompt": [system("S"), user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]},
    ]
    assert result.dropped == {"identical_pair": 1, "empty_response": 1, "role_order": 1}
    assert any(p.endswith('p.jsonl line 4: field "rejected": empty response') for p in result.problems)
    assert any(p.startswith(f"{tmp_path / 'p.jsonl'} line 5: field \"prompt\": roles must be") for p in result.problems)


HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken..."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No."


def test_hh_rlhf_dialogues(tmp_path):
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("Hello!", "Hey!")},
        {"chosen": HH_CHOSEN.replace("Why did the chicken...", ""), "rejected": HH_REJECTED},
    ]
    result = read_records(write_jsonl(tmp_path / "hh.jsonl", rows), "preference", on_bad="drop")
    assert result.format == "hh_rlhf"
    assert result.records == [{
        "prompt": [user("Hi there"), assistant("Hello!"), user("Tell me a joke")],
        "chosen": [assistant("Why did the chicken...")],
        "rejected": [assistant("No.")],
    }]
    assert result.dropped == {"prompt_mismatch": 1, "empty_response": 1}
    assert 'hh.jsonl line 2: field "rejected": the dialogue before its last "\\n\\nAssistant:" differs' in result.problems[0]


def test_implicit_prompt_message_lists(tmp_path):
    rows = [{"chosen": [user("Q"), assistant("good")], "rejected": [user("Q"), assistant("bad")]},
            {"chosen": [user("Q"), assistant("good")], "rejected": [user("Other"), assistant("bad")]}]
    result = read_records(write_jsonl(tmp_path / "i.jsonl", rows), "preference", on_bad="drop")
    assert result.records == [{"prompt": [user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}]
    assert result.dropped == {"prompt_mismatch": 1}


def test_llamafactory_and_alpaca_preference(tmp_path):
    rows = [{
        "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
        "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"},
    }, {
        "conversations": [{"from": "human", "value": "Q"}],
        "chosen": {"from": "human", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"},
    }]
    result = read_records(write_json(tmp_path / "lf.json", rows), "preference", on_bad="drop")
    assert result.format == "sharegpt_preference"
    assert result.records == [{"prompt": [system("S"), user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}]
    assert 'lf.json index 1: field "chosen": expected an assistant message, got role user' in result.problems[0]

    rows = [{"instruction": "Fix", "input": "teh", "output": "the", "chosen": "the", "rejected": "teh"}]
    result = read_records(write_json(tmp_path / "ap.json", rows), "preference")
    assert result.format == "alpaca_preference"
    assert result.records == [{"prompt": [user("Fix\n\nteh")], "chosen": [assistant("the")], "rejected": [assistant("teh")]}]


def test_describe_summarises(tmp_path):
    rows = [{"messages": [system("S"), user("a"), assistant("b")]}, {"messages": [user("a"), assistant("")]},
            {"messages": [system("S"), user("a"), assistant("b")]}]
    text = describe(read_records(write_jsonl(tmp_path / "d.jsonl", rows), "conversation", on_bad="drop"))
    assert "format:     messages (kind conversation)" in text
    assert "records:    2 kept, 1 dropped" in text and "dropped:    empty_response 1" in text
    assert "duplicates: 1" in text and "2 with a system message" in text and "system 2, user 2, assistant 2" in text
    assert 'line 2: field "messages[1].content": empty assistant message' in text


# ---------------------------------------------------------------------------- real files (shared/data)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _real(folder: str) -> list[str]:
    return sorted(p.name for p in (DATA / folder).iterdir()) if (DATA / folder).is_dir() else []


# file -> expected: ("load", kept, {dropped}) or ("fail", regex for the message)
REAL = {
    "sft": ("conversation", {
        "alpaca_eval_text_davinci_003_outputs.json": ("load", 803, {"empty_response": 2}),
        "alpaca_seed_tasks.jsonl": ("fail", r"format not recognised .*\"instances\".*Fields in the first record: id, name"),
        "dolly_derivative_triforce.jsonl": ("load", 151, {}),
        "fastchat_dummy_conversation.json": ("load", 500, {}),
        "fastchat_mt_bench_question.jsonl": ("fail", r"format not recognised .*no answers.*question_id, category, turns"),
        "llamafactory_alpaca_en_demo.json": ("load", 999, {}),
        "llamafactory_glaive_toolcall_en_demo.json": ("load", 147, {"unknown_role": 153}),
        "llamafactory_oaast_sft_zh.json": ("load", 689, {}),
        "oasst_en_100_message.jsonl": ("load", 100, {}),
        "rasbt_instruction-data.json": ("load", 1100, {}),
    }),
    "dpo": ("preference", {
        "alpaca_eval_alpaca-7b_vs_davinci003_gpt4_annotations.json": ("fail", r"not recognised .*pairwise judgments.*output_1"),
        "hh-rlhf_harmless-base_test.jsonl.gz": ("load", 2299, {"prompt_mismatch": 5, "empty_response": 4, "role_order": 4}),
        "llamafactory_dpo_en_demo.json": ("load", 300, {}),
        "llamafactory_kto_en_demo.json": ("fail", r"not recognised .*unpaired \(KTO-style\).*Fields in the first record: messages, label"),
        "llamafactory_oaast_rm_zh.json": ("fail", r"not recognised .*ranked list of answers"),
        "rasbt_instruction-data-with-preference.json": ("load", 1094, {"identical_pair": 6}),
    }),
}


def _read_real(folder: str, name: str):
    if not (DATA / folder).is_dir():
        pytest.skip(f"../shared/data is absent (looked in {DATA})")
    return read_records(DATA / folder / name, REAL[folder][0], on_bad="drop")


@pytest.mark.parametrize(("folder", "name"), [(f, n) for f in REAL for n in _real(f)] or [("sft", "absent")])
def test_real_file_loads_or_fails_clearly(folder, name):
    if not (DATA / folder).is_dir():
        pytest.skip(f"../shared/data is absent (looked in {DATA})")
    expected = REAL[folder][1].get(name)
    assert expected is not None, f"new file {folder}/{name}: add its expectation to REAL"
    if expected[0] == "fail":
        with pytest.raises(PipelineError, match=expected[1]) as err:
            _read_real(folder, name)
        assert "\n" not in str(err.value) and name in str(err.value)
        return
    result = _read_real(folder, name)
    assert (len(result.records), result.dropped) == expected[1:]
    assert len(result.problems) == min(20, sum(result.dropped.values()))
    assert all(name in p and "\n" not in p for p in result.problems)


def test_real_hh_rlhf():
    result = _read_real("dpo", "hh-rlhf_harmless-base_test.jsonl.gz")
    assert len(result.records) + sum(result.dropped.values()) == 2312
    assert all(r["prompt"][-1]["role"] == "user" for r in result.records)
    assert all(p.split(": field")[0].rsplit(" line ", 1)[1].isdigit() for p in result.problems)
    first = json.loads(gzip.open(DATA / "dpo" / "hh-rlhf_harmless-base_test.jsonl.gz", "rt").readline())
    prefix = first["chosen"][: first["chosen"].rfind("\n\nAssistant:")]
    assert first["rejected"].startswith(prefix)
    turns = re.findall(r"\n\n(Human|Assistant): (.*?)(?=\n\n(?:Human|Assistant):|$)", prefix, flags=re.S)
    expected = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()} for who, text in turns]
    assert len(expected) == 5 and result.records[0]["prompt"] == expected


def test_real_llamafactory_dpo():
    result = _read_real("dpo", "llamafactory_dpo_en_demo.json")
    assert len(result.records) == 300
    assert sum(r["prompt"][0]["role"] == "system" for r in result.records) == 80
    assert all(r["prompt"][-1]["role"] == "user" for r in result.records)


def test_real_alpaca_en_demo_duplicates():
    result = _read_real("sft", "llamafactory_alpaca_en_demo.json")
    assert len(result.records) == 999 and result.duplicates == 14


def test_real_sft_stop_on_first_bad_record():
    if not DATA.is_dir():
        pytest.skip(f"../shared/data is absent (looked in {DATA})")
    with pytest.raises(PipelineError, match=r'glaive_toolcall_en_demo\.json index 0: field "conversations\[3\]\.from": '
                                            r'unsupported role "function_call"'):
        read_records(DATA / "sft" / "llamafactory_glaive_toolcall_en_demo.json", "conversation")


def test_gzip_without_gz_utf16_and_empty_lists_are_named(tmp_path):
    """These said "not UTF-8 text (invalid byte at offset 1)", "... offset 0" and "the file is empty"."""
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    cases = {
        "packed.jsonl": (gzip.compress(line.encode()), "gzip-compressed, but its name does not end in .gz; "
                                                       "rename it packed.jsonl.gz"),
        "wide.jsonl": (line.encode("utf-16"), "UTF-16 text; convert it to UTF-8: iconv -f UTF-16 -t UTF-8 wide.jsonl"),
        "array.json": (b"[]", "no records (an empty JSON array)"),
        "object.json": (b'{"data": []}', "no records (its list field data is empty)"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PipelineError, match=re.escape(f"{tmp_path / name}: {message}")):
            read_records(tmp_path / name, "conversation")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n")  # a BOM and CRLF are fine
    assert len(read_records(tmp_path / "bom.jsonl", "conversation").records) == 1
