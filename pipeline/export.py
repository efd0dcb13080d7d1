"""`pipeline export`: a stage's model as one folder that other tools load without this package.

The adapter chain is rebuilt by the loader training, eval and chat use (models.load_stage_model),
so the exported weights are the ones those saw. Two layouts:

- merged (default): base + every adapter merged, saved as a plain transformers folder
  (config.json, model.safetensors, tokenizer with its chat template, generation_config.json that
  stops at the end-of-turn token, README.md). `AutoModelForCausalLM.from_pretrained(OUT)` loads it.
- adapter only: the stage's own adapter, byte for byte, plus the model it was trained on top of
  (base + earlier adapters merged) in OUT/parent/. The adapter's base_model_name_or_path names
  OUT/parent, which is the truth: the dpo adapter was trained on sft-merged weights, not on the base.

A reward stage exports merged only, as a sequence-classification folder (the SFT backbone with the
reward LoRA merged, and the trained score head): `AutoModelForSequenceClassification.from_pretrained(OUT)`
scores a rendered prompt + reply at its last token that is not padding, as the reward stage did.

With `gguf`, the merged folder also holds model.gguf, the same weights for llama.cpp, ollama and
LM Studio (pipeline/gguf_export.py), and for our chat templates an ollama Modelfile (pipeline/ollama.py).

OUT is built in a sibling folder and renamed into place, so a crash never leaves half of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from pipeline.artifacts import atomic_write_text, fsync_tree, read_json
from pipeline.chat_template import ChatRenderer
from pipeline.errors import PipelineError
from pipeline.generation import stop_token_ids
from pipeline.gguf_export import require_writable, write_gguf
from pipeline.lineage import lineage_head
from pipeline.models import lineage_of, load_stage_model
from pipeline.ollama import modelfile
from pipeline.rewards import HEAD as REWARD_HEAD
from pipeline.rewards import load_reward_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NO_MODEL = ("tokenizer", "eval")  # stages whose folder holds no model
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"  # ollama's: the chat template in its own language (pipeline/ollama.py)


def export_stage(stage_dir: str | Path, out: str | Path, dtype: str | None = None, adapter_only: bool = False,
                 gguf: bool = False, gguf_quantization: str | None = None) -> Path:
    """Write the stage's model to `out` (see the module doc); `dtype` None keeps the dtype the run loads it in;
    `gguf_quantization` ("q8_0") quantizes the GGUF's matrices and implies `gguf`."""
    stage_dir, out = Path(stage_dir), Path(out)
    record = finished_model_stage(stage_dir)
    gguf = gguf or gguf_quantization is not None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineError(f"{out} already exists and is not empty; give a new folder (nothing is overwritten)")
    base, adapters, _ = lineage_of(stage_dir)
    reward = lineage_head(stage_dir) == REWARD_HEAD
    if adapter_only and reward:
        raise PipelineError(f"{stage_dir}: a reward stage's folder is already its adapter (LoRA + score head on the "
                            "SFT model; its lineage.json says how to load it): export it merged, without "
                            "--adapter-only")
    if gguf and (adapter_only or reward):
        raise PipelineError(f"{stage_dir}: --gguf writes a merged causal LM; " + (
            "it does not go with --adapter-only" if adapter_only else "a reward stage's score model has no GGUF form "
            "here: export it without --gguf"))
    if gguf and (Path(base) / "config.json").is_file():  # known before loading: refused without a wait
        require_writable(str((read_json(Path(base) / "config.json") or {}).get("model_type")))
    if adapter_only and not adapters:
        raise PipelineError(f"{stage_dir}: stage {record['stage']} is a full model with no adapter; "
                            "export it without --adapter-only")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, a read-only mount
        raise PipelineError(f"cannot make the folder {out.parent} for the export: {exc.strerror} ({exc.filename}); "
                            "give OUT inside a folder you can write") from None
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if adapter_only:
            # the last adapter stays a PeftModel; unload() takes its layers out unmerged, leaving its parent
            model, tokenizer = load_stage_model(stage_dir, dtype=DTYPES.get(dtype))
            _save_full(model.unload(), tokenizer, tmp / "parent")
            config = json.loads((adapters[-1] / "adapter_config.json").read_text())
            # an absolute path: peft resolves it from the working directory, not from the adapter folder
            config["base_model_name_or_path"] = str(out.resolve() / "parent")
            config["revision"] = None
            atomic_write_text(tmp / "adapter_config.json", json.dumps(config, indent=2) + "\n")
            shutil.copyfile(adapters[-1] / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
            tokenizer.save_pretrained(tmp)  # the chat template travels with the adapter too
        elif reward:
            model, tokenizer = load_reward_model(stage_dir)
            # merging puts the trained score head in place of the zero one the class was built with
            model = model.merge_and_unload().to(DTYPES.get(dtype, model.dtype))
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        else:
            model, tokenizer = load_stage_model(stage_dir, dtype=DTYPES.get(dtype), merge_all=True)
            tmp.mkdir(parents=True)
            if gguf:  # first: a model it cannot write is refused before the folder's gigabytes are
                end_of_turn = ChatRenderer(tokenizer).end_of_turn
                add_bos = write_gguf(model, tokenizer, tmp / GGUF_FILE, end_of_turn, quantization=gguf_quantization,
                                     name=f"{stage_dir.resolve().parent.name}-{record['stage']}")
                ollama = modelfile(GGUF_FILE, tokenizer.chat_template, tokenizer.bos_token, not add_bos,
                                   tokenizer.convert_ids_to_tokens(end_of_turn))
                if ollama:
                    atomic_write_text(tmp / MODELFILE, ollama)
            _save_full(model, tokenizer, tmp)
        card = model_card(stage_dir, record, base, adapters, str(model.dtype).removeprefix("torch."), adapter_only,
                          reward, gguf, gguf_quantization, (tmp / MODELFILE).is_file())
        atomic_write_text(tmp / "README.md", card)
        fsync_tree(tmp)
        try:
            os.replace(tmp, out)  # replaces an empty folder; refuses one that filled up meanwhile
        except OSError as exc:
            raise PipelineError(f"cannot move the export into {out}: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def finished_model_stage(stage_dir: Path) -> dict:
    """The stage.json of a finished stage that holds a model; anything else is refused in one line."""
    if not stage_dir.is_dir():
        raise PipelineError(f"{stage_dir}: no such stage folder; give RUN/STAGE, e.g. runs/quickstart/dpo")
    try:
        record = read_json(stage_dir / "stage.json")
    except (ValueError, UnicodeDecodeError):
        raise PipelineError(f"{stage_dir / 'stage.json'}: corrupt (not JSON); rerun that stage") from None
    if not isinstance(record, dict):
        raise PipelineError(f"{stage_dir}: not a stage folder (no stage.json); give RUN/STAGE, "
                            "e.g. runs/quickstart/dpo")
    record.setdefault("stage", stage_dir.name)
    name = record["stage"]
    if name in NO_MODEL:
        raise PipelineError(f"{stage_dir}: the {name} stage holds no model; export a model stage "
                            "(pretrain, base, sft, dpo, reward or rl)")
    if record.get("status") != "done":
        raise PipelineError(f"{stage_dir}: stage {name} is not finished (status {record.get('status')}); "
                            "finish it first: pipeline run RECIPE")
    if not (stage_dir / "lineage.json").is_file() and not (stage_dir / "config.json").is_file():
        raise PipelineError(f"{stage_dir}: stage {name} holds no model (no config.json or lineage.json)")
    return record


def _save_full(model, tokenizer, folder: Path) -> None:
    """A plain transformers folder: safetensors, tokenizer and chat template, eos = end of turn."""
    if getattr(model.config, "quantization_config", None):
        raise PipelineError("the model is quantized; adapters cannot be merged into it for a plain export")
    # (other tools stop at generation_config's eos; the renderer knows which token closes a turn)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, ChatRenderer(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- model card


def model_card(stage_dir: Path, record: dict, base: str, adapters: list[Path], dtype: str, adapter_only: bool,
               reward: bool = False, gguf: bool = False, gguf_quantization: str | None = None,
               ollama_modelfile: bool = False) -> str:
    """README.md: where the weights come from (base, adapters in order), and each stage's data and metrics."""
    run_dir = stage_dir.resolve().parent
    hub_base = not Path(base).exists()
    name = record["stage"]
    base_line = f"`{base}` (hub)" if hub_base else _in_run(Path(base), run_dir)
    chain = " -> ".join([base_line, *(f"adapter `{a.name}`" for a in adapters)])
    lines = ["---", "library_name: " + ("peft" if adapter_only else "transformers"),
             *([f"base_model: {base}"] if hub_base else []), "tags:", "  - pipeline-export", "---", "",
             f"# {run_dir.name}/{name}", "",
             f"Exported by `pipeline export` from `{stage_dir.resolve()}`, dtype {dtype}.", "",
             "## Lineage", "", f"{chain}", ""]
    if adapter_only:
        lines += ["This folder holds the last adapter only. `parent/` is the model it was trained on: the base "
                  "with every earlier adapter merged in.", "",
                  "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("OUT/parent"), "OUT")',
                  "```", ""]
    elif reward:
        lines += ["A reward model: every adapter is merged and the trained score head kept; the folder loads with "
                  "transformers alone. It scores a prompt and reply rendered with the tokenizer's chat template, at "
                  "the last token that is not padding (`config.pad_token_id`).", "",
                  "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                  'model = AutoModelForSequenceClassification.from_pretrained("OUT")',
                  'tokenizer = AutoTokenizer.from_pretrained("OUT")',
                  "# messages: the user's turn(s) and the assistant's reply",
                  'ids = tokenizer.apply_chat_template(messages, return_dict=True, return_tensors="pt")["input_ids"]',
                  "reward = model(ids).logits[0, 0]", "```", ""]
    else:
        lines += ["Every adapter is merged: the folder loads with transformers alone.", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("OUT")',
                  'tokenizer = AutoTokenizer.from_pretrained("OUT")  # with its chat template', "```", "",
                  "`generation_config.json` stops at the end-of-turn token.", ""]
        if gguf:
            weights = f"weights ({gguf_quantization.upper()}: 8-bit matrices)" if gguf_quantization else "weights"
            lines += [f"`{GGUF_FILE}` holds the same {weights}, vocabulary and chat template for llama.cpp, ollama and "
                      "LM Studio; generation ends at the end-of-turn token (the file's end-of-turn id).", "",
                      "```sh", f"llama-cli -m OUT/{GGUF_FILE} -cnv          # llama.cpp, with the chat template",
                      f"ollama create my-model -f OUT/{MODELFILE}   # its chat template in ollama's language"
                      if ollama_modelfile else
                      f"printf 'FROM ./{GGUF_FILE}\\n' > OUT/{MODELFILE} && ollama create my-model -f OUT/{MODELFILE}",
                      "```", ""]
            if not ollama_modelfile:
                lines += ["ollama does not run the file's Jinja template: it uses the known template closest to it. "
                          "Where that is not this model's, give the Modelfile a TEMPLATE.", ""]
    lines += ["## Stages", ""]
    for stage in [*(record.get("upstream") or {}), name]:
        stage_record = record if stage == name else read_json(run_dir / stage / "stage.json") or {}
        lines += _stage_section(stage, stage_record)
    return "\n".join(lines)


def _in_run(path: Path, run_dir: Path) -> str:
    path = path.resolve()
    return f"stage `{path.name}` of this run" if path.parent == run_dir else f"`{path}`"


def _stage_section(stage: str, record: dict) -> list[str]:
    lines = [f"### {stage}", "", f"- run id `{record.get('run_id')}`, finished {record.get('finished_at')}, "
             f"fingerprint `{record.get('fingerprint')}`"]
    for path, digest in (record.get("data") or {}).items():
        lines.append(f"- data: `{path}` (sha256 {str(digest)[:12]})")
    metrics = record.get("metrics") or {}
    scalars = _scalars(metrics)
    if scalars:
        lines.append(f"- metrics: {scalars}")
    for key in ("heldout_before", "heldout_after"):
        if isinstance(metrics.get(key), dict):
            lines.append(f"- {key.replace('_', ' ')}: {_scalars(metrics[key])}")
    return lines + [""]


def _scalars(metrics: dict) -> str:
    """The numbers and words of a metrics dict, one line; nested records (examples, per-file counts) left out."""
    def show(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{k} {show(v)}" for k, v in metrics.items() if isinstance(v, (int, float, str, bool)))
