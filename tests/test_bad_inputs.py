"""Every bad value is refused in one line (exit code 2), never a traceback and never accepted.

A table of bad recipe values (as `key=value` overrides to `pipeline check`) and bad data files (to
`pipeline data check`), each run through `pipeline.cli.main` in-process; a few also through a real
`python -m pipeline` subprocess for the exit code end to end.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import assemble_gemma_gguf, dpo_section, sft_section, tiny_recipe_dict

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


# ---------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (tiny recipe path, tmp folder) -> argv for main()
    names: str  # the key, file or field the one-line error must name


def recipe_case(override: str, names: str | None = None, *, quickstart: bool = False) -> Case:
    """`pipeline check RECIPE override` on the tiny recipe (or on recipes/quickstart.yaml, run from the repo)."""
    key = names or override.split("=", 1)[0]

    def argv(recipe: Path, tmp: Path) -> list[str]:
        return ["check", str(QUICKSTART if quickstart else recipe), override]

    return Case(("quickstart: " if quickstart else "") + override, argv, key)


def data_case(id: str, name: str, content: bytes | Callable[[Path], None], *args: str,
              names: str | None = None) -> Case:
    """`pipeline data check FILE args` on a file written into the test's folder (names the file by default)."""

    def argv(recipe: Path, tmp: Path) -> list[str]:
        path = tmp / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        return ["data", "check", str(path), *args]

    return Case(id, argv, names or name)


def jsonl(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def chat(*contents) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]}


GOOD = chat("hi", "hello")
PAIR = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
DEEP = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _parquet(rows: list[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)

    return write


def _torn_parquet(path: Path) -> None:
    _parquet([GOOD] * 20)(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _directory(path: Path) -> None:
    path.mkdir()


RECIPE_CASES = [
    # where the run folder goes: <output_dir>/<name>
    recipe_case("name=../elsewhere"),
    recipe_case("name=a/b"),
    recipe_case("output_dir=''", "output_dir"),
    # model shape
    recipe_case("pretrain.model.num_heads=0"),
    recipe_case("pretrain.model.num_kv_heads=0"),
    recipe_case("pretrain.model.num_layers=0"),
    recipe_case("pretrain.model.hidden_size=-64"),
    recipe_case("pretrain.model.intermediate_size=0"),
    recipe_case("pretrain.model.max_position_embeddings=-1"),
    recipe_case("pretrain.model.rope_theta=0"),
    recipe_case("pretrain.model.rope_theta=.nan"),
    recipe_case("pretrain.model.num_heads=3", "pretrain.model.hidden_size"),
    recipe_case("pretrain.model.num_layers=1.5"),
    recipe_case("pretrain.model.attn_implementation=spda"),
    recipe_case("pretrain.model.hidden_size=68", "pretrain.model.hidden_size"),  # head size 17: odd, RoPE fails
    # pretrain
    recipe_case("pretrain.micro_batch_size=0"),
    recipe_case("pretrain.global_batch_size=0"),
    recipe_case("pretrain.global_batch_size=-8"),
    recipe_case("pretrain.seq_len=0"),
    recipe_case("pretrain.max_steps=0"),
    recipe_case("pretrain.learning_rate=-0.01"),
    recipe_case("pretrain.learning_rate=0"),
    recipe_case("pretrain.learning_rate=.nan"),
    recipe_case("pretrain.learning_rate=.inf"),
    recipe_case("pretrain.learning_rate=1e400"),
    recipe_case("pretrain.learning_rate=abc"),
    recipe_case("pretrain.min_lr_ratio=1.5"),
    recipe_case("pretrain.min_lr_ratio=-0.1"),
    recipe_case("pretrain.warmup_steps=-1"),
    recipe_case("pretrain.weight_decay=-0.1"),
    recipe_case("pretrain.adam_beta1=1.0"),
    recipe_case("pretrain.adam_beta2=-0.5"),
    recipe_case("pretrain.grad_clip=-1"),
    recipe_case("pretrain.eval_fraction=1.5"),
    recipe_case("pretrain.eval_every=0"),
    recipe_case("pretrain.eval_max_blocks=0"),
    recipe_case("pretrain.checkpoint_every=-5"),
    recipe_case("pretrain.keep_checkpoints=0"),
    recipe_case("pretrain.log_every=0"),
    recipe_case("pretrain.precision=fp64"),
    # tokenizer
    recipe_case("tokenizer.vocab_size=100000000"),
    recipe_case("tokenizer.vocab_size=0"),
    recipe_case("tokenizer.vocab_size=1e8"),
    recipe_case("tokenizer.min_frequency=0"),
    recipe_case("tokenizer.chat_template=chatlm", "tokenizer.chat_template"),
    recipe_case("tokenizer.chat_template=/nope/template.jinja", "/nope/template.jinja"),
    # sft
    recipe_case("sft.epochs=0"),
    recipe_case("sft.epochs=-1"),
    recipe_case("sft.max_steps=-1"),
    recipe_case("sft.max_length=0"),
    recipe_case("sft.micro_batch_size=0"),
    recipe_case("sft.global_batch_size=0"),
    recipe_case("sft.learning_rate=-0.01"),
    recipe_case("sft.learning_rate=.nan"),
    recipe_case("sft.learning_rate=1e12"),  # finished `done` with uniform output before
    recipe_case("sft.warmup_ratio=1.5"),
    recipe_case("sft.lr_scheduler=bogus"),
    recipe_case("sft.lora.r=0"),
    recipe_case("sft.lora.alpha=0"),
    recipe_case("sft.lora.dropout=2.0"),
    recipe_case("sft.lora.dropout=-0.1"),
    recipe_case("sft.weight_decay=-1"),
    recipe_case("sft.logging_steps=0"),
    recipe_case("sft.save_steps=0"),
    recipe_case("sft.max_new_tokens=0"),
    recipe_case("sft.eval_limit=-1"),
    recipe_case("sft.format=bogus"),
    recipe_case("sft.format=hh_rlhf"),
    recipe_case("sft.lora.r=true"),
    # dpo
    recipe_case("dpo.beta=-1"),
    recipe_case("dpo.beta=0"),
    recipe_case("dpo.beta=.nan"),
    recipe_case("dpo.loss_type=[bogus]"),
    recipe_case("dpo.loss_type=[sigmoid, sigmod]"),
    recipe_case("dpo.loss_type=[]"),
    recipe_case("dpo.loss_type=[exo_pair]", "dpo.label_smoothing"),
    recipe_case("dpo.loss_weights=[1.0, -1.0]", "dpo.loss_weights"),
    recipe_case("dpo.label_smoothing=0.7"),
    recipe_case("dpo.learning_rate=-0.01"),
    recipe_case("dpo.lr_scheduler=cosin"),
    recipe_case("dpo.micro_batch_size=0"),
    recipe_case("dpo.max_length=0"),
    recipe_case("dpo.epochs=0"),
    recipe_case("dpo.stuck_after_steps=0"),
    recipe_case("dpo.format=alpaca"),
    recipe_case("dpo.lora.dropout=1.0"),
    # eval and the recipe itself
    recipe_case("eval.limit=0"),
    recipe_case("eval.max_new_tokens=-1"),
    recipe_case("eval.kl_prompts=-1"),
    recipe_case("eval.transcripts=-1"),
    recipe_case("seed=-1"),
    recipe_case("pretrain=5"),
    recipe_case("pretrain.max_steps.x=3", "max_steps"),
    # quickstart, run from the repository root: mistyped local paths are not hub ids
    recipe_case("sft.train_data=[data/sft_trian]", "data/sft_trian", quickstart=True),
    recipe_case("sft.train_data=[data/tiny_world/sft_trian.jsonl]", "data/tiny_world/sft_trian.jsonl", quickstart=True),
    recipe_case("tokenizer.corpus=[data/tiny_wrld/pretrain.jsonl]", "data/tiny_wrld/pretrain.jsonl", quickstart=True),
    recipe_case("dpo.train_data=[nowhere/prefs.jsonl]", "nowhere/prefs.jsonl", quickstart=True),
    recipe_case("pretrain.micro_batch_size=0", quickstart=True),
    recipe_case("dpo.loss_type=[sigmoid, bogus]", "dpo.loss_type", quickstart=True),
]

DATA_CASES = [
    data_case("deeply nested jsonl line", "deep.jsonl", DEEP.encode() + b"\n"),
    data_case("deeply nested json file", "deep.json", ("[" + DEEP + "]").encode()),
    data_case("deeply nested line, all dropped", "deep_drop.jsonl", jsonl(DEEP, '{"text": 1}'), "--kind", "text",
              names="deep_drop.jsonl line 1"),
    data_case("lone surrogate", "surrogate.jsonl", jsonl('{"messages": [{"role": "user", "content": "a\\ud800"}, '
                                                         '{"role": "assistant", "content": "b"}]}'),
              "--on-bad", "error", names="messages[0].content"),
    data_case("huge integer", "huge.jsonl", jsonl('{"messages": ' + "1" * 5000 + "}")),
    data_case("huge integer in json", "huge.json", ('[{"messages": ' + "1" * 5000 + "}]").encode()),
    data_case("not utf-8", "latin1.jsonl", jsonl(GOOD) + b'{"text": "caf\xe9"}\n'),
    data_case("not utf-8 txt", "latin1.txt", b"caf\xe9\n", "--kind", "text"),
    data_case("torn jsonl", "torn.jsonl", jsonl(GOOD, GOOD)[:-20], "--on-bad", "error", names="torn.jsonl line 2"),
    data_case("torn json", "torn.json", json.dumps([GOOD, GOOD]).encode()[:-20]),
    data_case("torn jsonl.gz", "torn.jsonl.gz", gzip.compress(jsonl(GOOD) * 50)[:-30]),
    data_case("torn parquet", "torn.parquet", _torn_parquet),
    data_case("content is an int", "int.jsonl", jsonl({"messages": [{"role": "user", "content": 3}]}),
              "--on-bad", "error", names="messages[0].content"),
    data_case("messages is a string", "str.jsonl", jsonl({"messages": "hi"}), names="messages"),
    data_case("role is an int", "role.jsonl", jsonl({"messages": [{"role": 1, "content": "x"}]}), names="role"),
    data_case("record is a list", "list.jsonl", jsonl([1, 2]), names="list.jsonl line 1"),
    data_case("record is NaN", "nan.jsonl", jsonl("NaN"), names="nan.jsonl line 1"),
    data_case("unknown format", "fmt.jsonl", jsonl(GOOD), "--format", "bogus", names="bogus"),
    data_case("empty file", "empty.jsonl", b""),
    data_case("whitespace only", "blank.jsonl", b"\n \n\t\n"),
    data_case("a directory", "folder.jsonl", _directory),
    data_case("unsupported type", "data.csv", b"a,b\n1,2\n"),
    data_case("txt as conversations", "plain.txt", b"hello\n", "--kind", "conversation"),
    data_case("identical pair", "same.jsonl", jsonl({"prompt": "hi", "chosen": "a", "rejected": "a"}),
              "--kind", "preference", "--on-bad", "error", names="chosen"),
    data_case("chosen without content", "nochosen.jsonl",
              jsonl({"prompt": "hi", "chosen": {"role": "assistant"}, "rejected": "b"}),
              "--kind", "preference", "--on-bad", "error", names="chosen.content"),
    data_case("json with two lists", "two.json", json.dumps({"a": [GOOD], "b": [GOOD]}).encode()),
    data_case("parquet wrong types", "types.parquet", _parquet([{"messages": 3}]), names="messages"),
    data_case("tokenizer folder missing", "ok.jsonl", jsonl(GOOD), "--tokenizer", "/nope", names="/nope"),
    data_case("preference for a conversation format", "pref.jsonl", jsonl(PAIR), "--format", "messages",
              "--on-bad", "error", names="messages"),
]


def test_the_table_is_big_enough():
    assert len(RECIPE_CASES) + len(DATA_CASES) >= 60
    assert len({c.id for c in RECIPE_CASES + DATA_CASES}) == len(RECIPE_CASES) + len(DATA_CASES)


# ---------------------------------------------------------------------------- running a case


def full_recipe(world: Path, folder: Path) -> Path:
    """The tests' tiny recipe with every section: tokenizer, pretrain, sft, dpo and eval."""
    data = tiny_recipe_dict(world, folder / "runs", "tiny")
    data["sft"] = sft_section(world)
    data["dpo"] = dpo_section(world)
    data["eval"] = {"limit": 8}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def outcome(argv: list[str], capsys) -> tuple[str, int | None, str]:
    """("traceback" | "accepted" | "refused", exit code, stderr) of `pipeline ARGV` in this process."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    except BaseException:  # noqa: BLE001 - a traceback is exactly what is being counted
        return "traceback", None, traceback.format_exc()
    err = capsys.readouterr().err
    if "Traceback" in err:
        return "traceback", code, err
    return ("accepted" if code == 0 else "refused"), code, err


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.chdir(REPO)  # quickstart names data paths relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("case", RECIPE_CASES + DATA_CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_2(case, tiny_world, tmp_path, capsys, offline):
    recipe = full_recipe(tiny_world, tmp_path)
    kind, code, err = outcome(case.argv(recipe, tmp_path), capsys)
    assert kind == "refused", f"{case.id}: {kind} (exit {code})\n{err}"
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.names in lines[0], lines[0]


def test_the_untouched_recipes_pass(tiny_world, tmp_path, capsys, offline):
    """The table's base recipes are good: each case fails because of its own value."""
    assert outcome(["check", str(full_recipe(tiny_world, tmp_path))], capsys)[:2] == ("accepted", 0)
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    if not assemble_gemma_gguf():
        recipes = [path for path in recipes if path.name != "gemma3-270m.yaml"]
    for path in recipes:
        assert outcome(["check", str(path)], capsys)[:2] == ("accepted", 0), path


@pytest.mark.parametrize("override, names", [
    ("pretrain.micro_batch_size=0", "pretrain.micro_batch_size"),
    ("sft.lr_scheduler=bogus", "sft.lr_scheduler"),
    ("sft.train_data=[data/sft_trian]", "data/sft_trian"),
])
def test_exit_code_end_to_end(override, names, cli_env):
    result = subprocess.run([sys.executable, "-m", "pipeline", "check", str(QUICKSTART), override],
                            capture_output=True, text=True, env=cli_env, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content, extra, names", [
    (DEEP, [], "deep.jsonl line 1: unreadable JSON: nested too deeply"),
    (json.dumps(GOOD), ["--tokenizer", "/nope"], "--tokenizer /nope"),
])
def test_data_check_exit_code_end_to_end(tmp_path, cli_env, content, extra, names):
    path = tmp_path / "deep.jsonl"
    path.write_text(content + "\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "data", "check", str(path), *extra],
                            capture_output=True, text=True, env=cli_env, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], result.stderr


# ---------------------------------------------------------------------------- the ranges themselves


def _config_classes():
    from pipeline import recipe as R

    return [R.Recipe, R.BaseModelConfig, R.ModelConfig, R.TokenizerConfig, R.PretrainConfig, R.LoraArgs,
            R.SftConfig, R.DpoConfig, R.EvalConfig]


def test_every_numeric_field_has_a_range_and_its_default_is_in_it():
    import dataclasses
    import typing

    from pipeline.config_schema import check_value, range_text

    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            numeric = tp in (int, float) or tp in (list[int], list[float])
            if numeric:
                assert range_text(f.metadata), f"{cls.__name__}.{f.name} declares no range"
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if not dataclasses.is_dataclass(default):
                check_value(default, f.metadata, f"{cls.__name__}.{f.name}")  # raises when out of range


def test_scheduler_names_are_the_installed_transformers_list():
    from transformers.trainer_utils import SchedulerType

    from pipeline.recipe import LR_SCHEDULERS, LR_SCHEDULERS_REFUSED

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(LR_SCHEDULERS_REFUSED) < set(LR_SCHEDULERS)


def test_attention_implementations_are_the_installed_transformers_list():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pipeline.recipe import ATTN_IMPLEMENTATIONS

    assert set(ATTN_IMPLEMENTATIONS) == {k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if "|" not in k} | {"eager"}


def test_dpo_loss_types_are_the_installed_trl_list():
    """The list DPOTrainer accepts, read from the installed trl's source (importing trl takes seconds)."""
    import ast
    import importlib.util
    import re

    from pipeline.recipe import DPO_LOSS_TYPES

    source = Path(importlib.util.find_spec("trl").origin).parent / "trainer" / "dpo_trainer.py"
    message = re.search(r"Unknown loss type: \{loss_type\}\. Should be one of (\[.*?\])\"\s*\)",
                        re.sub(r'"\s*\n\s*"', "", source.read_text()), re.S)
    assert message, f"the accepted loss types are no longer listed in {source}"
    assert set(DPO_LOSS_TYPES) == set(ast.literal_eval(message.group(1)))


def test_data_formats_come_from_the_readers_registry():
    from pipeline.config_schema import choices_of
    from pipeline.data.formats import FORMATS
    from pipeline.recipe import DpoConfig, SftConfig

    assert choices_of(SftConfig.__dataclass_fields__["format"].metadata) == ("auto", *FORMATS["conversation"])
    assert choices_of(DpoConfig.__dataclass_fields__["format"].metadata) == ("auto", *FORMATS["preference"])


def test_refused_scheduler_says_why(tiny_world, tmp_path, capsys, offline):
    kind, code, err = outcome(["check", str(full_recipe(tiny_world, tmp_path)), "sft.lr_scheduler=greedy"], capsys)
    assert (kind, code) == ("refused", 2)
    assert "sft.lr_scheduler: 'greedy' cannot be used here: it needs an evaluation strategy" in err
    assert "usable: linear, cosine" in err


def test_closest_choice_is_suggested(tiny_world, tmp_path, capsys, offline):
    err = outcome(["check", str(full_recipe(tiny_world, tmp_path)), "dpo.loss_type=[sigmod]"], capsys)[2]
    assert "did you mean `sigmoid`?" in err


def test_explain_shows_ranges_and_choices(capsys, offline):
    assert main(["check", str(QUICKSTART), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "pretrain.learning_rate: 0.002  # peak learning rate (AdamW); valid: (0, 1]\n" in out
    assert "sft.lora.dropout: 0.0  # dropout on the adapter input; valid: [0, 1)\n" in out
    assert "tokenizer.vocab_size: 2048  # vocabulary size including special tokens; valid: [300, 1000000]\n" in out
    assert "dpo.loss_type: ['sigmoid']  # TRL loss types; several are summed with loss_weights; one of: sigmoid, " in out
    assert "greedy" not in next(line for line in out.splitlines() if line.startswith("sft.lr_scheduler"))


def test_check_imports_no_heavy_library(cli_env):
    code = ("import sys; from pipeline.cli import main; assert main(['check', 'recipes/quickstart.yaml']) == 0; "
            "heavy = {'torch', 'transformers', 'trl', 'datasets'} & set(sys.modules); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- paths and readers


def test_hub_ids_stay_hub_ids_unless_the_owner_is_a_local_folder(tmp_path, monkeypatch):
    from pipeline.data.readers import missing_path_hint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft_train.jsonl").write_text("{}\n")
    assert missing_path_hint("Anthropic/hh-rlhf") is None  # no local folder Anthropic/: a hub id
    assert missing_path_hint("data/sft_train.jsonl") is None  # exists
    assert missing_path_hint("data/sft_trian") == (" (did you mean `data/sft_train.jsonl`?) "
                                                   "(not read as a hub dataset id: data/ is a local folder)")
    assert missing_path_hint("data/nothing_like_it") == " (not read as a hub dataset id: data/ is a local folder)"
    assert missing_path_hint("data/sft_trian.jsonl") == " (did you mean `data/sft_train.jsonl`?)"
    assert missing_path_hint("dta/sft_train.jsonl") == " (did you mean `data/sft_train.jsonl`?)"


def test_bad_json_lines_are_dropped_and_counted(tmp_path):
    from pipeline.data.readers import read_records

    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl(GOOD, DEEP, '{"messages": ' + "1" * 5000 + "}", GOOD,
                           '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}'))
    result = read_records(path, "conversation", on_bad="drop")
    assert len(result.records) == 2 and result.dropped == {"bad_json": 2, "bad_text": 1}
    assert [p.split(": ")[0].rsplit(" ", 1)[1] for p in result.problems] == ["2", "3", "5"]


def test_data_check_marks_control_tokens(tiny_tokenizer, tmp_path, capsys):
    folder = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(folder)
    data = tmp_path / "typed.jsonl"
    data.write_bytes(jsonl(chat("please type <|end|> for me", "here: <|end|>")))
    assert main(["data", "check", str(data), "--tokenizer", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\u27e8...\u27e9 is one control token" in out
    shown = out.rsplit("it stays text):\n", 1)[1]
    assert "please type <|end|> for me" in shown  # typed: characters, shown bare
    assert shown.count("\u27e8<|end|>\u27e9") == 2  # the real end-of-turn tokens, one per message
    assert "\u27e8<|assistant|>\u27e9[[ here: <|end|>\u27e8<|end|>\u27e9]]" in shown  # typed, then the real one


def test_data_check_names_a_folder_without_a_tokenizer(tmp_path, capsys):
    data = tmp_path / "ok.jsonl"
    data.write_bytes(jsonl(GOOD))
    (tmp_path / "empty").mkdir()
    kind, code, err = outcome(["data", "check", str(data), "--tokenizer", str(tmp_path / "empty")], capsys)
    assert (kind, code) == ("refused", 2), err
    assert len(err.strip().splitlines()) == 1 and f"--tokenizer {tmp_path / 'empty'}: cannot load a tokenizer" in err
