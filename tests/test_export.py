"""`pipeline export`: the merged folder gives the adapter chain's logits and loads with plain transformers.

Equality is checked in fp32 on held-out conversations (the tiny world's sft_heldout.jsonl, rendered
as training renders them) with max |exported - chain| < 1e-4: merging W + (alpha/r) B A into W
changes only the order of the additions, so the two differ by float32 rounding (~1e-6 here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main

TOLERANCE = 1e-4
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "lineage.json")

# Run in a fresh interpreter: imports transformers and torch only, and says so.
PLAIN_LOAD = """
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
out, ids = Path(sys.argv[1]), json.loads(sys.argv[2])
assert not [n for n in {peft} if (out / n).exists()], "adapter files in a merged export"
config = json.loads((out / "config.json").read_text())
assert "quantization_config" not in config
model = AutoModelForCausalLM.from_pretrained(out).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits
assert not [m for m in sys.modules if m.split(".")[0] == "pipeline"], "our package was imported"
print(json.dumps({{"sum": logits.double().sum().item(), "last": logits[0, -1, :8].tolist()}}))
""".format(peft=repr(PEFT_FILES))


@pytest.fixture(scope="module")
def base_run(gemma_folder, tiny_world, tmp_path_factory) -> Path:
    """`base:` (a tiny Gemma-2 folder) -> sft -> dpo, two steps each."""
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    from .conftest import dpo_section, sft_section

    tmp = tmp_path_factory.mktemp("export_base")
    path = tmp / "base.yaml"
    path.write_text(json.dumps({
        "name": "b", "output_dir": str(tmp / "runs"), "seed": 0,
        "base": {"path": str(gemma_folder), "dtype": "float32"},
        "sft": sft_section(tiny_world, max_steps=2, eval_limit=0),
        "dpo": dpo_section(tiny_world, max_steps=2, eval_limit=0),
    }))
    records = run_recipe(load_recipe(path))
    assert all(r["status"] == "done" for r in records.values())
    return load_recipe(path).run_dir


def held_out_ids(world: Path, tokenizer, count: int = 4) -> list[list[int]]:
    from pipeline.chat_template import ChatRenderer

    renderer = ChatRenderer(tokenizer)
    records = [json.loads(line) for line in (world / "sft_heldout.jsonl").read_text().splitlines()[:count]]
    return [renderer.render(r["messages"]).input_ids for r in records]


@torch.no_grad()
def logits_of(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts]  # (T, V) each


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def export(*args: str) -> int:
    return main(["export", *map(str, args)])


def check_merged_export(stage_dir: Path, out: Path, world: Path) -> None:
    """Exported logits == the chain's (last adapter unmerged); a fresh process loads the folder alone."""
    from transformers import AutoModelForCausalLM

    from pipeline.chat_template import ChatRenderer
    from pipeline.models import load_stage_model

    assert export(stage_dir, out) == 0
    assert not [n for n in PEFT_FILES if (out / n).exists()] and (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))

    chain, tokenizer = load_stage_model(stage_dir, dtype=torch.float32)  # PeftModel with the last adapter
    prompts = held_out_ids(world, tokenizer)
    expected = logits_of(chain, prompts)
    with chain.disable_adapter():
        without_last = logits_of(chain, prompts)
    assert max_difference(expected, without_last) > 1e-3  # the adapter changed something worth exporting
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert max_difference(logits_of(exported, prompts), expected) < TOLERANCE

    generation = json.loads((out / "generation_config.json").read_text())
    assert ChatRenderer(tokenizer).end_of_turn in generation["eos_token_id"]

    result = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), json.dumps(prompts[0])], cwd=out.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["sum"] == pytest.approx(expected[0].double().sum().item(), rel=1e-5, abs=1e-2)
    assert plain["last"] == pytest.approx(expected[0][-1, :8].tolist(), abs=TOLERANCE)


def test_pretrain_sft_dpo_chain_exports_to_one_plain_model(dpo_run, tiny_world, tmp_path):
    run_dir, _ = dpo_run
    out = tmp_path / "exports" / "dpo"  # a parent folder that does not exist yet is made
    check_merged_export(run_dir / "dpo", out, tiny_world)
    card = (out / "README.md").read_text()
    assert "stage `pretrain` of this run -> adapter `sft` -> adapter `dpo`" in card
    for stage in ("tokenizer", "pretrain", "sft", "dpo"):
        assert f"### {stage}" in card
    assert str(tiny_world / "dpo_train.jsonl") in card and "reward_accuracy" in card and "eval_perplexity" in card


def test_base_chain_exports_to_one_plain_model(base_run, gemma_folder, tiny_world, tmp_path):
    out = tmp_path / "gemma-dpo"
    check_merged_export(base_run / "dpo", out, tiny_world)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma2"
    card = (out / "README.md").read_text()
    assert f"`{gemma_folder.resolve()}` -> adapter `sft` -> adapter `dpo`" in card and "### base" in card


def test_adapter_only_keeps_the_adapter_and_its_true_parent(dpo_run, tiny_world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_stage_model

    run_dir, _ = dpo_run
    out = tmp_path / "dpo-adapter"
    assert export(run_dir / "dpo", out, "--adapter-only") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out.resolve() / "parent")
    trained = (run_dir / "dpo" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter_model.safetensors").read_bytes() == trained  # unchanged, byte for byte
    assert not (out / "model.safetensors").exists() and (out / "parent" / "model.safetensors").is_file()

    chain, tokenizer = load_stage_model(run_dir / "dpo", dtype=torch.float32)
    prompts = held_out_ids(tiny_world, tokenizer)
    parent = AutoModelForCausalLM.from_pretrained(out / "parent", dtype=torch.float32)
    # the parent is pretrain with the sft adapter merged: the model dpo trained on, not the base
    sft_merged, _ = load_stage_model(run_dir / "sft", dtype=torch.float32, merge_all=True)
    assert max_difference(logits_of(parent, prompts), logits_of(sft_merged, prompts)) < TOLERANCE
    plain = PeftModel.from_pretrained(parent, out)
    assert max_difference(logits_of(plain, prompts), logits_of(chain, prompts)) < TOLERANCE


def test_dtype_option_sets_the_weights_dtype(dpo_run, tmp_path):
    from safetensors import safe_open

    run_dir, _ = dpo_run
    assert export(run_dir / "sft", tmp_path / "bf16", "--dtype", "bfloat16") == 0
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    assert "dtype bfloat16" in (tmp_path / "bf16" / "README.md").read_text()


def one_line_error(capsys, *args) -> str:
    code = export(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    return err


def test_bad_inputs_are_one_line_errors(dpo_run, tmp_path, capsys):
    run_dir, _ = dpo_run
    out = tmp_path / "out"
    assert "holds no model" in one_line_error(capsys, run_dir / "tokenizer", out)
    assert "no such stage folder" in one_line_error(capsys, run_dir / "nope", out)
    assert "not a stage folder (no stage.json)" in one_line_error(capsys, tmp_path, out)
    assert "no adapter" in one_line_error(capsys, run_dir / "pretrain", out, "--adapter-only")

    fake = tmp_path / "run"
    for stage, status in (("eval", "done"), ("sft", "failed"), ("dpo", "done")):
        (fake / stage).mkdir(parents=True)
        (fake / stage / "stage.json").write_text(json.dumps({"stage": stage, "status": status}))
    assert "the eval stage holds no model" in one_line_error(capsys, fake / "eval", out)
    assert "stage sft is not finished (status failed)" in one_line_error(capsys, fake / "sft", out)
    assert "stage dpo holds no model (no config.json" in one_line_error(capsys, fake / "dpo", out)

    (tmp_path / "a_file").write_text("x")
    assert "cannot make the folder" in one_line_error(capsys, run_dir / "dpo", tmp_path / "a_file" / "sub" / "out")

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists and is not empty" in one_line_error(capsys, run_dir / "dpo", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob("out.tmp-*"))

    with pytest.raises(SystemExit) as exit_info:  # argparse's choices
        export(run_dir / "dpo", tmp_path / "x", "--dtype", "int8")
    assert exit_info.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


def test_a_crash_leaves_no_half_written_folder(dpo_run, tmp_path, monkeypatch):
    import pipeline.export

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline.export, "model_card", crash)
    run_dir, _ = dpo_run
    with pytest.raises(RuntimeError):
        export(run_dir / "sft", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- GGUF

def gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return {**fields, "tensor_types": {t.name: t.tensor_type.name for t in reader.tensors}}


def test_gguf_export_reads_back_with_the_same_logits_tokens_and_chat_template(dpo_run, tiny_world, tmp_path):
    """transformers' GGUF loader (which undoes llama.cpp's q/k row order and rebuilds the vocabulary from the
    file) gives the chain's logits and the tokenizer's ids; the file's chat template renders what ours does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat_template import ChatRenderer
    from pipeline.models import load_stage_model

    run_dir, _ = dpo_run
    out = tmp_path / "gguf"
    assert export(run_dir / "dpo", out, "--gguf") == 0
    assert (out / "model.safetensors").is_file() and "model.gguf" in (out / "README.md").read_text()

    chain, tokenizer = load_stage_model(run_dir / "dpo", dtype=torch.float32)
    prompts = held_out_ids(tiny_world, tokenizer)
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    assert max_difference(logits_of(from_gguf, prompts), logits_of(chain, prompts)) < TOLERANCE

    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    for text in ("Where does Nozan live? Nozan lives in Varn.", "naïve café 😀  two  spaces\nand a line",
                 "3 plus 4 is 7.", " leading space"):
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text

    fields = gguf_fields(out / "model.gguf")
    renderer = ChatRenderer(tokenizer)
    assert fields["general.architecture"] == "llama" and fields["general.name"] == f"{run_dir.name}-dpo"
    assert fields["tokenizer.ggml.eot_token_id"] == renderer.end_of_turn
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    control = [fields["tokenizer.ggml.tokens"][i] for i, kind in enumerate(fields["tokenizer.ggml.token_type"])
               if kind == 3]
    assert set(control) == set(tokenizer.all_special_tokens)  # user text can never become one in llama.cpp
    template = fields["tokenizer.chat_template"]
    assert "{% generation" not in template and "endgeneration" not in template  # tags only TRL knows
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does Nozan live?"},
                {"role": "assistant", "content": "Nozan lives in Varn."}, {"role": "user", "content": "And Bela?"}]
    assert tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True) \
        == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert set(fields["tensor_types"].values()) == {"F32"} and "output.weight" not in fields["tensor_types"]  # tied


def test_an_exported_gguf_is_a_base_a_recipe_can_start_from(dpo_run, tiny_world, tmp_path, capsys):
    """The file as a recipe's `base:`: the base stage imports the chain's model with the chat template the file
    carries (transformers' GGUF tokenizer loader drops it; `check` already promised it), ready for sft."""
    from pipeline.cli import main
    from pipeline.models import load_stage_model

    run_dir, _ = dpo_run
    assert export(run_dir / "dpo", tmp_path / "gguf", "--gguf") == 0
    recipe = tmp_path / "again.yaml"
    recipe.write_text(json.dumps({"name": "again", "base": {"path": str(tmp_path / "gguf" / "model.gguf")}}))
    assert main(["check", str(recipe)]) == 0
    assert "chat template: the base tokenizer's own (from the GGUF file)" in capsys.readouterr().out
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'runs'}"]) == 0
    base, tokenizer = load_stage_model(tmp_path / "runs" / "again" / "base", dtype=torch.float32)
    chain, chain_tokenizer = load_stage_model(run_dir / "dpo", dtype=torch.float32)
    messages = [{"role": "user", "content": "Where does Nozan live?"}]
    text = chain_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == \
        chain_tokenizer(text, add_special_tokens=False)["input_ids"]  # the role markers as their control tokens
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == \
        (chain_tokenizer.bos_token, chain_tokenizer.eos_token, chain_tokenizer.pad_token)
    prompts = held_out_ids(tiny_world, chain_tokenizer)
    assert max_difference(logits_of(base, prompts), logits_of(chain, prompts)) < TOLERANCE


@pytest.mark.parametrize("dtype, kind", [("float16", "F16"), ("bfloat16", "BF16")])
def test_gguf_export_writes_the_asked_dtype(dpo_run, tmp_path, dtype, kind):
    """Matrices in the dtype asked for, norms in float32 as llama.cpp keeps them; the weights read back exactly."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run_dir, _ = dpo_run
    out = tmp_path / dtype
    assert export(run_dir / "sft", out, "--gguf", "--dtype", dtype) == 0
    types = gguf_fields(out / "model.gguf")["tensor_types"]
    assert types["blk.0.attn_q.weight"] == kind and types["token_embd.weight"] == kind
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    state = from_gguf.state_dict()
    with safe_open(out / "model.safetensors", "pt") as weights:
        for name in weights.keys():
            assert torch.equal(weights.get_tensor(name).float(), state[name]), name


def test_gguf_export_quantized_to_q8_0_reads_back_close_to_the_chain(dpo_run, tiny_world, tmp_path):
    """--gguf-quant q8_0: every matrix in 8-bit blocks (norms float32), the file about half a float16 one, and the
    logits transformers' GGUF loader gets from it within the rounding of 8 bits of the chain's (scale ~15)."""
    import numpy as np

    from pipeline.models import load_stage_model

    run_dir, _ = dpo_run
    assert export(run_dir / "dpo", tmp_path / "q8", "--gguf-quant", "q8_0") == 0
    assert export(run_dir / "dpo", tmp_path / "f16", "--gguf", "--dtype", "float16") == 0
    types = gguf_fields(tmp_path / "q8" / "model.gguf")["tensor_types"]
    matrices = {kind for name, kind in types.items() if not name.endswith("norm.weight")}
    assert matrices == {"Q8_0"} and types["blk.0.attn_norm.weight"] == "F32"
    size = (tmp_path / "q8" / "model.gguf").stat().st_size / (tmp_path / "f16" / "model.gguf").stat().st_size
    assert 0.5 < size < 0.6, size
    assert "Q8_0" in (tmp_path / "q8" / "README.md").read_text()

    from transformers import AutoModelForCausalLM

    chain, tokenizer = load_stage_model(run_dir / "dpo", dtype=torch.float32)
    prompts = held_out_ids(tiny_world, tokenizer)
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "q8", gguf_file="model.gguf", dtype=torch.float32)
    expected, got = logits_of(chain, prompts), logits_of(from_gguf, prompts)
    difference = max_difference(got, expected)
    assert 1e-4 < difference < 0.2, difference  # quantized (not the float weights), and close
    agree = np.mean([float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(got, expected)])
    assert agree > 0.95, agree


def test_gguf_export_refuses_what_it_cannot_write_in_one_line(dpo_run, tmp_path, capsys):
    run_dir, _ = dpo_run
    assert "does not go with --adapter-only" in one_line_error(capsys, run_dir / "dpo", tmp_path / "a", "--gguf",
                                                               "--adapter-only")
    # an architecture it does not write: refused from config.json, before any weights are loaded or written
    other = tmp_path / "run" / "pretrain"
    other.mkdir(parents=True)
    (other / "stage.json").write_text(json.dumps({"stage": "pretrain", "status": "done"}))
    (other / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    err = one_line_error(capsys, other, tmp_path / "b", "--gguf")
    assert "this model is falcon" in err and "convert_hf_to_gguf.py" in err
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("b.tmp-*"))


def test_gguf_export_of_a_gemma2_model_stores_what_llama_cpp_computes_with(base_run, tmp_path):
    """Gemma-2 (a Gemma-2 base with a byte-level vocabulary, then sft): norms as 1 + w, queries scaled by
    sqrt(head_dim / query_pre_attn_scalar) (llama.cpp scales scores by 1/sqrt(head_dim)), the softcaps and window."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    out = tmp_path / "gemma2"
    assert export(base_run / "sft", out, "--gguf") == 0
    config = AutoConfig.from_pretrained(out)
    assert config.query_pre_attn_scalar != config.head_dim  # the case the scaling is for

    reader = gguf.GGUFReader(str(out / "model.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "gemma2" and fields["gemma2.attention.key_length"] == config.head_dim
    assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(config.attn_logit_softcapping)
    assert fields["gemma2.final_logit_softcapping"] == pytest.approx(config.final_logit_softcapping)
    assert fields["gemma2.attention.sliding_window"] == config.sliding_window
    stored = {t.name: torch.from_numpy(t.data.copy()).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    with safe_open(out / "model.safetensors", "pt") as weights:
        norm = weights.get_tensor("model.layers.0.input_layernorm.weight").float()
        query = weights.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
        key = weights.get_tensor("model.layers.0.self_attn.k_proj.weight").float()
    assert torch.equal(stored["blk.0.attn_norm.weight"], norm + 1)
    scale = (config.head_dim / config.query_pre_attn_scalar) ** 0.5
    assert torch.allclose(stored["blk.0.attn_q.weight"], query * scale)
    assert torch.equal(stored["blk.0.attn_k.weight"], key)  # no rotary permutation: llama.cpp's NEOX order


@pytest.mark.parametrize("chain", ["llama: pretrain, sft, dpo", "gemma2: base, sft"])
def test_llama_cpp_runs_the_gguf_export_like_transformers(chain, request, tmp_path):
    """llama.cpp itself (through llama-cpp-python) on the exported file: the tokenizer's ids, logits within float
    rounding of transformers' (llama.cpp keeps its attention cache in float16) on a prompt and llama.cpp's own greedy
    reply, and a chat completion through the file's chat template that stops at the end-of-turn token."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install llama-cpp-python "
                                    "(builds llama.cpp from source, about 8 minutes on 2 cores)")
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat_template import ChatRenderer

    stage = request.getfixturevalue("dpo_run")[0] / "dpo" if chain.startswith("llama") \
        else request.getfixturevalue("base_run") / "sft"
    out = tmp_path / "gguf"
    assert export(stage, out, "--gguf") == 0
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), logits_all=True, n_ctx=256, verbose=False)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    for text in ("Where does Nozan live? Nozan lives in Varn.", "naïve café 😀  two  spaces\nand a line"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]

    messages = [{"role": "user", "content": "Where does Nozan live?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt  # control tokens whole
    reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=12)["choices"][0]
    reply_ids = tokenizer(reply["message"]["content"])["input_ids"][:12]
    sequence = prompt + reply_ids
    llm.reset()
    llm.eval(sequence)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([sequence])).logits[0].numpy()
    assert np.abs(np.array(llm.scores[: len(sequence)]) - expected).max() < 1e-2
    if reply["finish_reason"] == "stop":  # it ended the turn: transformers' next token there is the end of turn
        assert expected[-1].argmax() in (ChatRenderer(tokenizer).end_of_turn, tokenizer.eos_token_id)


# what tells Llama 3's splitting from GPT-2's: digits in threes, contractions in any case, runs of newlines and spaces
SPLIT_TEXTS = ("I'LL say it's 1234567 DON'T", "naïve café 😀  two  spaces\nand a line", "x\n\n\n  y\t\tz  ",
               "    indented   code\n\n\n\tx = 1  # tab", "ünïcödé ∑ 日本語 テスト 2024-12-02", "a" + " " * 17 + "b\r\n")


def split_like(tokenizer, folder: Path, name: str, normalizer: dict | None = None, ignore_merges: bool | None = None):
    """`tokenizer` with the splitting llama.cpp calls `name` ("llama-bpe": Llama 3's, "qwen2": Qwen's, or a regex):
    the regex in a Split before a ByteLevel that does not split, and the merging, as their tokenizer.json have it
    (Llama 3 takes a word the vocabulary holds whole, ignore_merges), saved to and loaded from `folder`."""
    from transformers import AutoTokenizer

    from pipeline.gguf_export import SPLIT_PRE_TOKENIZERS

    regex = next((regex for regex, known in SPLIT_PRE_TOKENIZERS.items() if known == name), name)
    tokenizer.save_pretrained(folder)
    backend = json.loads((folder / "tokenizer.json").read_text())
    backend["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    backend["normalizer"] = normalizer
    backend["model"]["ignore_merges"] = name == "llama-bpe" if ignore_merges is None else ignore_merges
    (folder / "tokenizer.json").write_text(json.dumps(backend))
    return AutoTokenizer.from_pretrained(folder)


def test_gguf_export_names_the_splitting_and_refuses_splittings_it_does_not_know(dpo_run, tmp_path):
    """A byte-level BPE that splits with Llama 3's or Qwen's regex goes in as llama.cpp's "llama-bpe" or "qwen2"
    pre-tokenizer (the tokenizer stage's own, GPT-2's, as "gpt-2"); another regex, another merging or a normalizer
    other than Qwen's NFC is refused in one line rather than written as a splitting llama.cpp would not reproduce."""
    from transformers import AutoTokenizer

    from pipeline.errors import PipelineError
    from pipeline.gguf_export import SPLIT_PRE_TOKENIZERS, write_gguf

    tokenizer = AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer")
    model = sharp_llama(len(tokenizer), {"rope_type": "default", "rope_theta": 10000.0})
    for name, normalizer in (("llama-bpe", None), ("qwen2", {"type": "NFC"})):
        split = split_like(tokenizer, tmp_path / f"{name}-tok", name, normalizer)
        assert any(split(text)["input_ids"] != tokenizer(text)["input_ids"] for text in SPLIT_TEXTS)  # another one
        write_gguf(model, split, tmp_path / f"{name}.gguf", split.eos_token_id, "tiny")
        assert gguf_fields(tmp_path / f"{name}.gguf")["tokenizer.ggml.pre"] == name
    write_gguf(model, tokenizer, tmp_path / "ours.gguf", tokenizer.eos_token_id, "tiny")
    assert gguf_fields(tmp_path / "ours.gguf")["tokenizer.ggml.pre"] == "gpt-2"
    (llama3_regex,) = [regex for regex, name in SPLIT_PRE_TOKENIZERS.items() if name == "llama-bpe"]
    pairs = llama3_regex.replace("\\p{N}{1,3}", "\\p{N}{1,2}")  # digits in pairs: no llama.cpp splitting
    for other, named in [(split_like(tokenizer, tmp_path / "pairs-tok", pairs), "splits text otherwise"),
                         (split_like(tokenizer, tmp_path / "merging-tok", "llama-bpe", ignore_merges=False),
                          "splits text otherwise"),
                         (split_like(tokenizer, tmp_path / "nfkc-tok", "llama-bpe", {"type": "NFKC"}), "normalizer")]:
        with pytest.raises(PipelineError, match=named) as refused:
            write_gguf(model, other, tmp_path / "refused.gguf", other.eos_token_id, "tiny")
        assert len(str(refused.value).splitlines()) == 1


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2"])
def test_llama_cpp_splits_text_like_transformers(name, dpo_run, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install llama-cpp-python")
    from transformers import AutoTokenizer

    from pipeline.gguf_export import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer")
    split = split_like(tokenizer, tmp_path / "tok", name, {"type": "NFC"} if name == "qwen2" else None)
    model = sharp_llama(len(tokenizer), {"rope_type": "default", "rope_theta": 10000.0})
    write_gguf(model, split, tmp_path / "model.gguf", split.eos_token_id, "tiny")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), logits_all=True, n_ctx=256, verbose=False)
    for text in SPLIT_TEXTS:  # all in NFC, which llama.cpp does not apply itself
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            split(text, add_special_tokens=False)["input_ids"], text


def tiny_qwen(kind: str, vocab_size: int):
    """A 2-layer Qwen2 (attention biases, tied embeddings, as Qwen2.5-0.5B) or Qwen3 (q/k norms, a head_dim of 32
    that is not hidden / heads) with weights large enough for logits of tens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **sizes)) if kind == "qwen2" \
        else Qwen3ForCausalLM(Qwen3Config(head_dim=32, tie_word_embeddings=False, **sizes))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.mul_(next((v for key, v in {"q_proj": 8, "k_proj": 8, "lm_head": 20, "embed": 20,
                                                  "norm": 1}.items() if key in name), 2))
            if name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_a_qwen_gguf_export_imports_back_and_runs_in_llama_cpp_like_transformers(kind, dpo_run, tmp_path):
    """Qwen2 and Qwen3 models export with their biases, q/k norms and own head size (which transformers' Qwen3 GGUF
    mapping leaves at 128: the import reads key_length), their tokenizer's splitting as llama.cpp's "qwen2"; the
    import gives the model's logits exactly, llama.cpp to float rounding (float32 cache), where it is installed."""
    from transformers import AutoTokenizer

    from pipeline.gguf_export import write_gguf
    from pipeline.models import load_base_model
    from pipeline.recipe import BaseModelConfig

    tokenizer = split_like(AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer"), tmp_path / "tok", "qwen2",
                           {"type": "NFC"})
    model = tiny_qwen(kind, len(tokenizer))
    write_gguf(model, tokenizer, tmp_path / "model.gguf", tokenizer.eos_token_id, "tiny")
    ids = tokenizer("Where does Nozan live? Nozan lives in Varn. " * 4)["input_ids"]
    imported = load_base_model(BaseModelConfig(path=str(tmp_path / "model.gguf")), torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert np.abs(imported(input_ids=torch.tensor([ids])).logits[0].numpy() - expected).max() \
            < 1e-4 * np.abs(expected).max()
    try:
        import llama_cpp
    except ImportError:
        return  # the llama.cpp half needs llama-cpp-python
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), logits_all=True, n_ctx=256, verbose=False,
                          type_k=f32, type_v=f32)
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[: len(ids)]) - expected).max() < 1e-4 * np.abs(expected).max()


def test_llama_cpp_renders_a_reply_passed_back_as_it_returned_it_like_training(dpo_run, tmp_path):
    """llama.cpp returns a reply with the space the model wrote after <|assistant|>; a client that passes it back as
    returned gets the history our training rendered (not two spaces, which threw the quickstart's model back onto its
    first answer for the second question)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install llama-cpp-python")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from pipeline.chat_template import ChatRenderer

    out = tmp_path / "gguf"
    assert export(dpo_run[0] / "dpo", out, "--gguf") == 0
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=256, verbose=False)
    messages = [{"role": "user", "content": "Where does Nozan live?"}]
    # the reply as llama.cpp returns it: the tokens the model wrote, " Nozan" first, detokenized with their space
    returned = llm.detokenize(llm.tokenize(b" Nozan lives in Varn.", add_bos=False, special=False)).decode()
    assert returned == " Nozan lives in Varn."
    messages += [{"role": "assistant", "content": returned}, {"role": "user", "content": "What is Nozan's job?"}]
    tokenizer = AutoTokenizer.from_pretrained(out)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=tokenizer.eos_token,
                                    bos_token=tokenizer.bos_token, add_generation_prompt=True)
    prompt = formatter(messages=messages).prompt
    trained = [dict(m, content=m["content"].strip()) for m in messages]  # what serve and chat pass back
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ChatRenderer(tokenizer).prompt_ids(trained)


def test_llama_cpp_reads_grouped_query_heads_attention_biases_and_an_untied_head(dpo_run, tmp_path):
    """Shapes pretrain does not build by default, through the same writer: 2 key/value heads for 4 query heads
    (q and k rows permuted by their own head counts), q/k/v biases (permuted too), lm_head separate from the
    embeddings (written as output.weight), positions scaled linearly (factor 4). transformers' GGUF loader drops
    attention biases, so llama.cpp judges."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install llama-cpp-python")
    import numpy as np
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.gguf_export import write_gguf

    run_dir, _ = dpo_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False, max_position_embeddings=128,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()  # a zero bias would hide a missed permutation
    write_gguf(model, tokenizer, tmp_path / "model.gguf", tokenizer.eos_token_id, "shapes")
    ids = tokenizer("Where does Nozan live? Nozan lives in Varn.")["input_ids"]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), logits_all=True, n_ctx=64, verbose=False)
    llm.eval(ids)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(llm.scores[: len(ids)]) - expected).max() < 1e-3


def sharp_llama(vocab_size: int, rope: dict):
    """A 1-layer Llama with sharp attention and logits of tens, so that where the rope puts a position shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, rope_parameters=rope))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = {"q_proj": 20, "k_proj": 20, "lm_head": 50, "norm": 1}
            parameter.mul_(next((v for key, v in scale.items() if key in name), 4))
    return model.eval()


# Llama 3.1's rope shape at a 16-wide head: three of its eight frequency pairs in the smoothed band
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0,
               "original_max_position_embeddings": 256, "rope_theta": 10000.0}


def test_a_llama3_rope_travels_through_gguf_as_llama_cpps_rope_freqs(dpo_run, tmp_path, monkeypatch, capsys):
    """Llama 3.1 and later scale their rope per frequency ("llama3"); llama.cpp's converter writes that as a
    rope_freqs tensor, which transformers' GGUF loader drops (the model would run unscaled). The export writes the
    converter's factors, and the import reads the llama3 parameters back from them: the same logits as the model
    exported, not the unscaled ones. Factors no llama3 rope gives are refused by `check` in one line."""
    import gguf
    from transformers import AutoTokenizer

    from pipeline.gguf_export import write_gguf
    from pipeline.gguf_hparams import llama3_rope_factors
    from pipeline.models import load_base_model
    from pipeline.recipe import BaseModelConfig

    tokenizer = AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer")
    model = sharp_llama(len(tokenizer), LLAMA3_ROPE)
    write_gguf(model, tokenizer, tmp_path / "llama3.gguf", tokenizer.eos_token_id, "llama3")
    reader = gguf.GGUFReader(str(tmp_path / "llama3.gguf"))
    stored = next(tensor.data for tensor in reader.tensors if tensor.name == "rope_freqs.weight")
    assert np.allclose(stored, [1.0, 1.1845339, 2.4769745, 3.7818423, 4, 4, 4, 4])  # llama.cpp's converter's
    assert not any(key.startswith("llama.rope.scaling") for key in reader.fields)

    imported = load_base_model(BaseModelConfig(path=str(tmp_path / "llama3.gguf")), torch.float32).eval()
    assert imported.config.rope_parameters == LLAMA3_ROPE
    ids = torch.tensor([tokenizer("Where does Nozan live? Nozan lives in Varn. " * 4)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert (imported(input_ids=ids).logits - expected).abs().max() < 1e-4 * expected.abs().max()
        unscaled = sharp_llama(len(tokenizer), {"rope_type": "default", "rope_theta": 10000.0})(input_ids=ids).logits
        assert (unscaled - expected).abs().max() > 1 < expected.abs().max()
    recipe = tmp_path / "base.yaml"  # the base stage says which rope it read, and keeps it in stage.json
    recipe.write_text(json.dumps({"name": "l3", "base": {"path": str(tmp_path / "llama3.gguf"),
                                                          "chat_template": "chatml"}}))
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'runs'}"]) == 0
    assert "(llama, rope llama3 x4.0)" in capsys.readouterr().out
    stage = json.loads((tmp_path / "runs" / "l3" / "base" / "stage.json").read_text())
    assert stage["metrics"]["rope_parameters"] == LLAMA3_ROPE

    monkeypatch.setattr("pipeline.gguf_export.llama3_rope_factors",  # a per-dimension rope of another shape
                        lambda rope, dim: [1.0, 3.0, 1.5, 4.0, 2.0, 4.0, 4.0, 4.0])
    write_gguf(model, tokenizer, tmp_path / "other.gguf", tokenizer.eos_token_id, "other")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "g", "base": {"path": str(tmp_path / "other.gguf"),
                                                         "chat_template": "chatml"}}))
    capsys.readouterr()
    assert main(["check", str(recipe)]) == 2
    out = capsys.readouterr().err.strip()
    assert len(out.splitlines()) == 1 and "per-dimension rope factors (rope_freqs.weight" in out, out
    assert llama3_rope_factors(LLAMA3_ROPE, 16) != [1.0, 3.0, 1.5, 4.0, 2.0, 4.0, 4.0, 4.0]


# a YaRN rope (Qwen2.5 / Qwen3's long context) over sharp_llama's 2,048 positions, 512 of them the original context
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}


def test_a_yarn_rope_travels_through_gguf_as_llama_cpp_reads_it(dpo_run, tmp_path):
    """YaRN goes in as llama.cpp's converter writes it (scaling type, factor, original context), which transformers'
    GGUF loader does not map; the import reads it back: the model's logits, not the unscaled rope's."""
    from transformers import AutoTokenizer

    from pipeline.gguf_export import write_gguf
    from pipeline.models import load_base_model
    from pipeline.recipe import BaseModelConfig

    tokenizer = AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer")
    model = sharp_llama(len(tokenizer), YARN_ROPE)
    write_gguf(model, tokenizer, tmp_path / "yarn.gguf", tokenizer.eos_token_id, "yarn")
    fields = gguf_fields(tmp_path / "yarn.gguf")
    assert fields["llama.rope.scaling.type"] == "yarn" and fields["llama.rope.scaling.factor"] == 4.0
    assert fields["llama.rope.scaling.original_context_length"] == 512
    imported = load_base_model(BaseModelConfig(path=str(tmp_path / "yarn.gguf")), torch.float32).eval()
    assert {**imported.config.rope_parameters} == YARN_ROPE
    ids = torch.tensor([tokenizer("Where does Nozan live? Nozan lives in Varn. " * 4)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert (imported(input_ids=ids).logits - expected).abs().max() < 1e-4 * expected.abs().max()
        unscaled = sharp_llama(len(tokenizer), {"rope_type": "default", "rope_theta": 10000.0})(input_ids=ids).logits
        assert (unscaled - expected).abs().max() > 1


def sharp_phi3(vocab_size: int, rope: dict, original: int = 256):
    """A 1-layer Phi-3 (fused qkv and gate-up matrices) with sharp attention, 1,024 positions of which `original`
    are the original context longrope switches to its long factors after."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=1024, original_max_position_embeddings=original,
                                       rope_parameters=dict(rope), pad_token_id=0, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = {"qkv_proj": 20, "lm_head": 50, "norm": 1}
            parameter.mul_(next((v for key, v in scale.items() if key in name), 4))
    return model.eval()


# Phi-3.5 / Phi-4-mini's rope at a 16-wide head: longrope's short and long factors (float32-exact, as a file keeps
# them) on the half of each head the rope turns (Phi-4-mini turns 3/4)
PHI3_ROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.25, 1.5, 2.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
             "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 256}


def test_a_phi3_longrope_travels_through_gguf_as_llama_cpp_reads_it(dpo_run, tmp_path, capsys):
    """Phi-3.5, Phi-3 128k and Phi-4-mini scale their rope per frequency ("longrope": one set of factors up to the
    original context, another past it) and may turn only part of each head; llama.cpp's converter writes both factor
    sets as tensors, the original context and longrope's attention factor, and transformers' GGUF loader drops all of
    it (and the rotary width). The export writes them, and the import reads them back: the model's logits, not the
    unscaled full-width rope's. Factor sets that do not pair up are refused by `check` in one line."""
    import gguf
    from transformers import AutoTokenizer

    from pipeline.gguf_export import write_gguf
    from pipeline.models import load_base_model
    from pipeline.recipe import BaseModelConfig

    tokenizer = AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer")
    model = sharp_phi3(len(tokenizer), PHI3_ROPE)
    write_gguf(model, tokenizer, tmp_path / "phi3.gguf", tokenizer.eos_token_id, "tiny")
    fields = gguf_fields(tmp_path / "phi3.gguf")
    assert fields["phi3.rope.dimension_count"] == 8 and fields["phi3.rope.scaling.original_context_length"] == 256
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(256)) ** 0.5)
    stored = {tensor.name: tensor.data.tolist() for tensor in gguf.GGUFReader(str(tmp_path / "phi3.gguf")).tensors}
    assert stored["rope_factors_short.weight"] == PHI3_ROPE["short_factor"]
    assert stored["rope_factors_long.weight"] == PHI3_ROPE["long_factor"]
    assert "blk.0.attn_qkv.weight" in stored and "blk.0.ffn_up.weight" in stored  # fused, as llama.cpp reads them

    imported = load_base_model(BaseModelConfig(path=str(tmp_path / "phi3.gguf")), torch.float32).eval()
    assert imported.config.rope_parameters == {**PHI3_ROPE}
    ids = torch.tensor([tokenizer("Where does Nozan live? Nozan lives in Varn. " * 4)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert (imported(input_ids=ids).logits - expected).abs().max() < 1e-4 * expected.abs().max()
        for other in ({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                      {**PHI3_ROPE, "partial_rotary_factor": 1.0, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}):
            assert (sharp_phi3(len(tokenizer), other)(input_ids=ids).logits - expected).abs().max() > 1
    recipe = tmp_path / "base.yaml"  # the base stage says which rope it read
    recipe.write_text(json.dumps({"name": "p3", "base": {"path": str(tmp_path / "phi3.gguf"),
                                                          "chat_template": "chatml"}}))
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'runs'}"]) == 0
    assert "(phi3, rope longrope)" in capsys.readouterr().out

    model.config.rope_parameters["short_factor"] = [1.0, 1.25, 1.5]  # a long and a short set that do not pair up
    write_gguf(model, tokenizer, tmp_path / "odd.gguf", tokenizer.eos_token_id, "odd")
    recipe.write_text(json.dumps({"name": "o", "base": {"path": str(tmp_path / "odd.gguf"),
                                                         "chat_template": "chatml"}}))
    assert main(["check", str(recipe)]) == 2
    out = capsys.readouterr().err.strip()
    assert len(out.splitlines()) == 1 and "per-dimension rope factors (rope_factors_long.weight" in out, out


@pytest.mark.parametrize("kind", ["llama3", "yarn", "phi3 longrope"])
def test_llama_cpp_runs_a_scaled_rope_export_like_transformers(kind, dpo_run, tmp_path):
    """llama.cpp's own rope on the exported file: Llama 3.1's per-dimension factors, YaRN with llama.cpp's betas and
    attention factor, Phi-3's short factors (within the original context) scaled by longrope's attention factor over
    half of each head; the attention cache in float32, so the match is to float rounding."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install llama-cpp-python")
    from transformers import AutoTokenizer

    from pipeline.gguf_export import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer")
    model = {"llama3": lambda: sharp_llama(len(tokenizer), LLAMA3_ROPE),
             "yarn": lambda: sharp_llama(len(tokenizer), YARN_ROPE),
             "phi3 longrope": lambda: sharp_phi3(len(tokenizer), PHI3_ROPE)}[kind]()
    write_gguf(model, tokenizer, tmp_path / "model.gguf", tokenizer.eos_token_id, "tiny")
    ids = tokenizer("Where does Nozan live? Nozan lives in Varn. " * 4)["input_ids"]
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), logits_all=True, n_ctx=256, verbose=False,
                          type_k=f32, type_v=f32)
    llm.eval(ids)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(llm.scores[: len(ids)]) - expected).max() < 1e-4 * np.abs(expected).max()


def test_gguf_export_writes_linear_rope_scaling_and_refuses_scalings_llama_cpp_would_not_apply(dpo_run, tmp_path):
    """Linear scaling (positions divided by the factor) goes in as llama.cpp's rope.scaling keys, which it applies to
    every layer but Gemma-3's sliding ones, and the GGUF import reads it back: other scalings, and scaled sliding
    layers, are refused in one line, on export and on import."""
    import gguf
    from transformers import AutoTokenizer

    from pipeline.errors import PipelineError
    from pipeline.gguf_export import write_gguf
    from pipeline.gguf_hparams import complete_config
    from pipeline.models import load_base_model
    from pipeline.recipe import BaseModelConfig

    tokenizer = AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer")

    def llama(rope):
        return sharp_llama(len(tokenizer), rope)

    scaled = llama({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    write_gguf(scaled, tokenizer, tmp_path / "linear.gguf", tokenizer.eos_token_id, "linear")
    fields = {name: field.contents() for name, field in gguf.GGUFReader(str(tmp_path / "linear.gguf")).fields.items()}
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0
    # and a `base:` GGUF import reads the scaling back (transformers' GGUF loader alone drops it)
    imported = load_base_model(BaseModelConfig(path=str(tmp_path / "linear.gguf")), torch.float32).eval()
    ids = torch.tensor([tokenizer("Where does Nozan live? Nozan lives in Varn.")["input_ids"]])
    with torch.no_grad():
        expected = scaled(input_ids=ids).logits
        assert (imported(input_ids=ids).logits - expected).abs().max() < 1e-4 * expected.abs().max()
        unscaled = llama({"rope_type": "default", "rope_theta": 10000.0})(input_ids=ids).logits  # the same weights
        assert (unscaled - expected).abs().max() > 1 < expected.abs().max()
    for fields, tensors, named in [({"llama.rope.scaling.type": "longrope"}, set(), "rope scaling 'longrope'"),
                                   ({"llama.rope.scaling.attn_factor": 1.5}, set(), "scales its rope's output by 1.5"),
                                   ({}, {"rope_freqs.weight"}, "per-dimension rope factors")]:  # Llama 3.1's
        with pytest.raises(PipelineError, match=named):
            complete_config(scaled.config, {"general.architecture": "llama", **fields}, tensors)
    write_gguf(llama({"rope_type": "default", "rope_theta": 10000.0}), tokenizer, tmp_path / "plain.gguf",
               tokenizer.eos_token_id, "plain")
    assert not any(key.startswith("llama.rope.scaling") for key in gguf.GGUFReader(str(tmp_path / "plain.gguf")).fields)

    dynamic = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    scaled_sliding = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                      "sliding_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10.0}}
    for model, named in [(llama(dynamic), "rope scaling 'dynamic' is not written"),
                         (llama({**YARN_ROPE, "beta_fast": 16.0}), "YaRN rope has beta_fast 16.0"),
                         (llama({**YARN_ROPE, "attention_factor": 1.0}), "YaRN rope has attention_factor 1.0"),
                         (tiny_gemma("gemma3", len(tokenizer), rope_parameters=scaled_sliding),
                          "rope scaling 'linear' on the sliding attention layers is not written")]:
        with pytest.raises(PipelineError, match=named):
            write_gguf(model, tokenizer, tmp_path / "refused.gguf", tokenizer.eos_token_id, "refused")


# ---------------------------------------------------------------- GGUF of a Gemma base (SentencePiece vocabulary)

WHITESPACE_TEXTS = ("naïve café 😀  two  spaces\nand a line", "    indented   code\n\n\n\tx = 1  # tab",
                    "a" + " " * 17 + "b\r\n", " leading space", "ünïcödé ∑ 日本語 テスト", "def f(x):\n        return x")


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_gguf):
    """The real Gemma-3 tokenizer (262,144 tokens, built by transformers from the package's GGUF, as the base stage
    builds it) with our gemma chat template, and the path of that GGUF: its vocabulary is the reference."""
    from transformers import AutoTokenizer

    path = gemma_gguf
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.chat_template = (Path(__file__).parents[1] / "pipeline" / "templates" / "gemma.jinja").read_text()
    return tokenizer, path


def tiny_gemma(kind: str, vocab_size: int, **overrides):
    """A 3-layer Gemma-2 or Gemma-3 with the real vocabulary, built so that what llama.cpp must get right shows in
    the logits: norms far from 0 (stored as 1 + w), sharp attention, a window of 8 tokens, a query_pre_attn_scalar
    unlike head_dim (the score scale), a global and a sliding layer pattern with their own rope bases, the global
    layers' positions scaled as Gemma-3 4B and larger scale them (linear, factor 8) (Gemma-3)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=20,
                    sliding_window=8, max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if kind == "gemma3":
        settings.update(layer_types=["full_attention", "sliding_attention", "sliding_attention"],  # no period
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})
    else:
        settings.update(attn_logit_softcapping=5.0, final_logit_softcapping=30.0)
    settings.update(overrides)
    torch.manual_seed(0)
    model = (Gemma3ForCausalLM(Gemma3TextConfig(**settings)) if kind == "gemma3"
             else Gemma2ForCausalLM(Gemma2Config(**settings)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(0, 0.3)
            elif "embed" in name:
                parameter.mul_(40)  # logits of tens, not of 0.02
            else:
                parameter.mul_(4)
    return model.eval()


def test_gguf_export_of_gemma3_writes_its_sentencepiece_vocabulary_and_layer_pattern(gemma_tokenizer, tmp_path):
    """A Gemma base's vocabulary as llama.cpp's "llama" tokenizer: tokens, types and merge-ordering scores as the
    Gemma-3 GGUF Google's converter wrote (but 30 runs of spaces, which transformers' tokenizer spells with '▁'
    and merges); Gemma-3's per-layer window pattern, rope bases and linear rope scaling; norms (q/k norms too) as
    1 + w, the score scale in q_norm. transformers' GGUF loader rebuilds the tokenizer from the file with the same
    ids."""
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.gguf_export import write_gguf

    tokenizer, reference_path = gemma_tokenizer
    model = tiny_gemma("gemma3", len(tokenizer))
    write_gguf(model, tokenizer, tmp_path / "model.gguf", tokenizer.convert_tokens_to_ids("<end_of_turn>"), "tiny")
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))  # opening a 262k vocabulary takes seconds: once
    ours = {name: field.contents() for name, field in reader.fields.items()}
    reference = {name: field.contents() for name, field in gguf.GGUFReader(str(reference_path)).fields.items()}

    tokens, reference_tokens = ours["tokenizer.ggml.tokens"], reference["tokenizer.ggml.tokens"]
    changed = [i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b]
    assert len(tokens) == len(reference_tokens) == 262144 and len(changed) == 30
    assert all(set(reference_tokens[i]) == {" "} and tokens[i] == "▁" * len(reference_tokens[i]) for i in changed)
    types = np.array(ours["tokenizer.ggml.token_type"])
    reference_types = np.array(reference["tokenizer.ggml.token_type"])
    assert np.array_equal(np.delete(types, changed), np.delete(reference_types, changed))
    scores, reference_scores = np.array(ours["tokenizer.ggml.scores"]), np.array(reference["tokenizer.ggml.scores"])
    normal = np.flatnonzero((types == 1) & (reference_types == 1))  # NORMAL: the scores order llama.cpp's merges
    assert np.array_equal(np.argsort(-scores[normal]), np.argsort(-reference_scores[normal]))  # no ties among them
    assert np.array_equal(scores[types != 1], reference_scores[types != 1])  # bytes 0, control/user-defined -1000
    for key in ("model", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
                "add_space_prefix"):
        assert ours[f"tokenizer.ggml.{key}"] == reference[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<end_of_turn>")

    assert ours["general.architecture"] == "gemma3" and ours["gemma3.attention.key_length"] == 32
    assert ours["gemma3.attention.sliding_window_pattern"] == [False, True, True]  # True: a sliding layer
    assert ours["gemma3.rope.freq_base"] == 1e6 and ours["gemma3.rope.freq_base_swa"] == 10.0
    assert ours["gemma3.rope.scaling.type"] == "linear" and ours["gemma3.rope.scaling.factor"] == 8.0
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    layer = model.model.layers[0]
    assert torch.equal(stored["blk.0.attn_norm.weight"], layer.input_layernorm.weight + 1)
    assert torch.equal(stored["blk.0.attn_k_norm.weight"], layer.self_attn.k_norm.weight + 1)
    assert torch.allclose(stored["blk.0.attn_q_norm.weight"], (layer.self_attn.q_norm.weight + 1) * (32 / 20) ** 0.5)

    from_file = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in WHITESPACE_TEXTS:
        assert from_file(text)["input_ids"] == tokenizer(text)["input_ids"], text


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_llama_cpp_runs_a_gemma_export_with_its_sentencepiece_vocabulary(kind, gemma_tokenizer, tmp_path):
    """llama.cpp on a Gemma file: the tokenizer's ids on whitespace-heavy and non-Latin text, the chat prompt's
    control tokens whole, the begin-of-text token added to raw text as transformers adds it, and logits within float
    rounding, where the window, the score scale and (Gemma-3) the sliding layers' rope base and the global layers'
    rope scaling each move them by more than a logit."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install llama-cpp-python")
    import numpy as np

    from pipeline.gguf_export import write_gguf

    tokenizer, _ = gemma_tokenizer
    model = tiny_gemma(kind, len(tokenizer))
    write_gguf(model, tokenizer, tmp_path / "model.gguf", tokenizer.convert_tokens_to_ids("<end_of_turn>"), "tiny")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), logits_all=True, n_ctx=256, verbose=False)
    for text in WHITESPACE_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert llm.tokenize(b"Hi", add_bos=True) == tokenizer("Hi")["input_ids"]  # <bos> first, once

    messages = [{"role": "user", "content": "Where does Nozan live? " * 3}, {"role": "assistant", "content": "Varn."},
                {"role": "user", "content": "And Bela?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids and len(ids) > 3 * 8

    def logits(variant):
        with torch.no_grad():
            return variant(input_ids=torch.tensor([ids])).logits[0].numpy()

    expected = logits(model)
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[: len(ids)]) - expected).max() < 0.05 < 1 < np.abs(expected).max()
    variants = {"no window": {"sliding_window": 4096}, "score scale": {"query_pre_attn_scalar": 32}}
    if kind == "gemma3":
        full, sliding = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, {"rope_type": "default",
                                                                                   "rope_theta": 10.0}
        variants["sliding rope base"] = {"rope_parameters": {"full_attention": full,
                                                             "sliding_attention": {**sliding, "rope_theta": 1e4}}}
        variants["rope scaling"] = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                        "sliding_attention": sliding}}
    for name, change in variants.items():  # what the test would catch, were the file wrong there
        assert np.abs(logits(tiny_gemma(kind, len(tokenizer), **change)) - expected).max() > 1, name


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_a_gemma_gguf_imports_as_the_model_llama_cpp_runs(kind, dpo_run, tmp_path):
    """A `base:` GGUF is imported as llama.cpp reads it, where transformers' GGUF loader would take its class
    defaults: the sliding layout, the sliding rope base, the global layers' rope scaling (Gemma-3 4B and larger), the
    score scale (the 27B models'), the soft caps. Round trip: the tiny Gemma of the llama.cpp test above, whose
    every one of those settings moves the logits by more than 1, exported to F32 and imported by the base stage's
    loader, gives the original logits back (with the quickstart's small vocabulary: the real one only costs time)."""
    from transformers import AutoTokenizer

    from pipeline.gguf_export import write_gguf
    from pipeline.models import load_base_model
    from pipeline.recipe import BaseModelConfig

    tokenizer = AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer")
    changes = {"attn_logit_softcapping": 7.0, "final_logit_softcapping": 20.0} if kind == "gemma2" else {
        "final_logit_softcapping": 20.0}
    if kind == "gemma2":  # Gemma-2 scales every layer (llama.cpp applies the factor to its sliding layers too)
        changes["rope_parameters"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}
    model = tiny_gemma(kind, len(tokenizer), **changes)
    write_gguf(model, tokenizer, tmp_path / "model.gguf", tokenizer.eos_token_id, "tiny")
    imported = load_base_model(BaseModelConfig(path=str(tmp_path / "model.gguf"), attn_implementation="eager"),
                               torch.float32).eval()
    ids = torch.tensor([tokenizer("Where does Nozan live? " * 4)["input_ids"]])  # past the window of 8
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, imported(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    assert imported.config.layer_types == model.config.layer_types


def test_a_27b_gemma_gguf_imports_with_llama_cpps_score_scale(dpo_run, tmp_path):
    """llama.cpp knows Gemma-3 27B by its 62 layers and scales its scores by 1/sqrt(hidden / heads), not head_dim
    (the export folds any other scale into the queries: checked in llama.cpp on a 62-layer tiny model, logits within
    0.02); the import's config says so, where transformers' GGUF loader leaves its default of 256. Only the config
    is read: importing 62 layers' tensors takes transformers 40 s, and the round trip above covers the rest."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.gguf_export import write_gguf
    from pipeline.gguf_header import read_gguf_header
    from pipeline.gguf_hparams import complete_config

    tokenizer = AutoTokenizer.from_pretrained(dpo_run[0] / "tokenizer")
    for layers, score_dim in [(62, 32), (3, 16)]:  # hidden 64 / 2 heads = 32; head_dim 16
        kinds = ["full_attention" if index % 6 == 5 else "sliding_attention" for index in range(layers)]
        write_gguf(tiny_gemma("gemma3", len(tokenizer), num_hidden_layers=layers, head_dim=16, layer_types=kinds),
                   tokenizer, tmp_path / f"{layers}.gguf", tokenizer.eos_token_id, "tiny")
        config = AutoConfig.from_pretrained(tmp_path, gguf_file=f"{layers}.gguf")
        header = read_gguf_header(tmp_path / f"{layers}.gguf")
        completed = complete_config(config, header.fields, header.tensor_names)
        assert completed.query_pre_attn_scalar == score_dim and completed.layer_types == kinds


@contextmanager
def sentencepiece_prefix(tokenizer, normalizer=None, pre_tokenizer=None):
    """The Gemma tokenizer with another way of putting '▁' before the text, as Llama-2's (a Prepend normalizer) or
    newer Llama and Mistral tokenizer.json files (a Metaspace pre-tokenizer) do; restored afterwards."""
    backend = tokenizer.backend_tokenizer
    saved = backend.normalizer, backend.pre_tokenizer
    backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
    try:
        yield tokenizer
    finally:
        backend.normalizer, backend.pre_tokenizer = saved


@pytest.mark.parametrize("change, named", [
    ({"pre_tokenizer": "metaspace first"}, "Metaspace pre-tokenizer adds"),
    ({"pre_tokenizer": "digits"}, "pre-tokenizer Digits"),
    ({"normalizer": "nfkc"}, "normalizer NFKC"),
])
def test_gguf_export_refuses_text_handling_llama_cpp_would_not_copy(gemma_tokenizer, tmp_path, change, named):
    """A SentencePiece-style vocabulary whose tokenizer.json does more to the text than llama.cpp's tokenizer does
    (a Metaspace prefix skipped after a space or a control token, digits split, Unicode normalized) is refused in one
    line, before a file that would tokenize otherwise is written."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.errors import PipelineError
    from pipeline.gguf_export import write_gguf

    tokenizer, _ = gemma_tokenizer
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64))
    parts = {"metaspace first": pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
             "digits": pre_tokenizers.Digits(individual_digits=True),
             "nfkc": normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])}
    with sentencepiece_prefix(tokenizer, **{key: parts[value] for key, value in change.items()}), \
            pytest.raises(PipelineError) as refusal:
        write_gguf(model, tokenizer, tmp_path / "model.gguf", None, "refused")
    assert named in str(refusal.value) and "convert_hf_to_gguf.py" in str(refusal.value)


def test_which_layers_slide_is_written_as_llama_cpp_reads_it():
    """A period where the layout has one (Gemma's: every p-th layer global; older llama.cpp reads only this form),
    else one flag per layer; and an untied head Gemma-2 in llama.cpp has no tensor for is refused."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from pipeline.errors import PipelineError
    from pipeline.gguf_export import write_gguf
    from pipeline.gguf_hparams import layer_types, sliding_pattern

    def layout(*kinds):
        return [{"S": "sliding_attention", "F": "full_attention"}[k] for k in kinds]

    assert sliding_pattern(layout(*"SSSSSF" * 3)) == 6  # Gemma-3 270M
    assert sliding_pattern(layout(*"SF" * 13)) == 2  # Gemma-2
    assert sliding_pattern(layout(*"FFF")) == 1 and sliding_pattern(layout(*"SSS")) == 4
    assert sliding_pattern(layout(*"SFS")) == 2 and sliding_pattern(layout(*"FSS")) == [False, True, True]
    for kinds in ("SSSSSF" * 3, "SF" * 13, "FFF", "SSS", "SFS", "FSS"):  # read back as llama.cpp reads it
        assert layer_types(sliding_pattern(layout(*kinds)), len(kinds)) == layout(*kinds)
    assert layer_types(0, 3) == layout(*"SSS")  # llama.cpp's period 0: every layer slides
    untied = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                            tie_word_embeddings=False))
    with pytest.raises(PipelineError, match="untied"):
        write_gguf(untied, None, Path("unused.gguf"), None, "untied")


def test_llama_cpp_tokenizes_a_llama2_style_sentencepiece_vocabulary_like_transformers(gemma_tokenizer, tmp_path):
    """Llama with a SentencePiece vocabulary whose normalizer puts '▁' before every text (Llama-2's tokenizer.json):
    the file says add_space_prefix, and llama.cpp gives transformers' ids, the chat prompt's control tokens whole."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install llama-cpp-python")
    from tokenizers import normalizers
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.gguf_export import write_gguf

    tokenizer, _ = gemma_tokenizer
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64))
    prepend = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    with sentencepiece_prefix(tokenizer, normalizer=prepend):
        write_gguf(model, tokenizer, tmp_path / "model.gguf", None, "llama2")
        llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), vocab_only=True, verbose=False)
        for text in (*WHITESPACE_TEXTS, "Hello world", "<start_of_turn>user\nHi there<end_of_turn>"):
            special = text.startswith("<start_of_turn>")
            assert llm.tokenize(text.encode(), add_bos=False, special=special) == \
                tokenizer(text, add_special_tokens=False)["input_ids"], text


# ---------------------------------------------------------------- ollama's Modelfile

CONVERSATIONS = [
    [{"role": "user", "content": "Where does Nozan live?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again? {{ .Content }} \"quoted\" 😀"}],
    [{"role": "user", "content": " leading and trailing \n\n"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "<|end|> <end_of_turn> as text"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "An empty system message"}],
]


def render_go_templates(template: str, conversations: list[list[dict]]) -> list[str]:
    """The template rendered by Go's text/template (ollama's engine) for each conversation."""
    import shutil

    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go; .ci/run does): it renders ollama's templates")
    source = Path(__file__).parent / "fixtures" / "render_go_template.go"
    cases = [{"template": template, "messages": messages} for messages in conversations]
    result = subprocess.run(["go", "run", str(source)], input=json.dumps(cases), capture_output=True, text=True,
                            timeout=300, check=True)
    return json.loads(result.stdout)


def modelfile_template(folder: Path) -> tuple[str, str]:
    """(TEMPLATE, the stop PARAMETER) of the Modelfile in `folder`."""
    text = (folder / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    stop = text.split('PARAMETER stop "', 1)[1].split('"', 1)[0]
    return template, stop


def test_gguf_export_writes_an_ollama_modelfile_whose_template_renders_ours(dpo_run, tmp_path):
    """ollama does not run the GGUF's Jinja template; the Modelfile's Go template, rendered by Go itself, gives the
    prompt our template gives (the begin-of-text token included: this file's add_bos is false), and stops at <|end|>."""
    from transformers import AutoTokenizer

    run_dir, _ = dpo_run
    out = tmp_path / "gguf"
    assert export(run_dir / "dpo", out, "--gguf") == 0
    template, stop = modelfile_template(out)
    assert stop == "<|end|>" and "ollama create my-model -f OUT/Modelfile" in (out / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                for messages in CONVERSATIONS]
    assert render_go_templates(template, CONVERSATIONS) == expected


def test_ollama_modelfile_of_a_gemma_export_renders_gemmas_turns(gemma_tokenizer, tmp_path):
    """Gemma's Go template folds a system message into the next user turn as gemma.jinja does, and leaves out <bos>
    (the file's add_bos is true: llama.cpp adds it, and would not drop a second one ollama's template wrote)."""
    from pipeline.gguf_export import adds_bos
    from pipeline.ollama import modelfile

    tokenizer, _ = gemma_tokenizer
    assert adds_bos(tokenizer)
    text = modelfile("model.gguf", tokenizer.chat_template, tokenizer.bos_token, not adds_bos(tokenizer),
                     "<end_of_turn>")
    (tmp_path / "Modelfile").write_text(text)
    template, stop = modelfile_template(tmp_path)
    assert stop == "<end_of_turn>"
    expected = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                for messages in CONVERSATIONS]
    assert all(prompt.startswith("<bos>") for prompt in expected)
    assert render_go_templates(template, CONVERSATIONS) == [prompt.removeprefix("<bos>") for prompt in expected]
    assert modelfile("model.gguf", "{{ messages }}", "<bos>", False, "<end_of_turn>") is None  # not our template
    no_bos = modelfile("model.gguf", tokenizer.chat_template, None, True, "<end_of_turn>")  # Jinja writes "" then
    assert 'TEMPLATE """{{- $system' in no_bos
