"""The `pipeline` command. Heavy libraries are imported inside the verbs, so --help and check are fast."""

from __future__ import annotations

import argparse
import errno
import math
import sys

from pipeline.errors import Interrupted, PipelineError, StageFailed

# errnos of a file system that refuses a write: the user's to fix, said in one line
FILE_SYSTEM_REFUSALS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}

EXAMPLES = """examples:
  accelerate launch -m pipeline run recipes/quickstart.yaml      all stages, resumable
  pipeline run recipes/quickstart.yaml pretrain.max_steps=50     key=value overrides
  pipeline run recipes/quickstart.yaml --only pretrain           one stage (its inputs must exist)
  pipeline check recipes/quickstart.yaml --explain               validate; list every key with its doc
  pipeline data generate --out data/tiny_world --seed 0          regenerate the built-in data
  pipeline eval runs/quickstart                                  every stage side by side: report.md, plots
  pipeline chat runs/quickstart/dpo --greedy                     talk to a stage's model
  pipeline serve runs/quickstart --port 8000                     OpenAI-style API; / compares two stages
  pipeline score runs/quickstart/pretrain "Kunfo lives in Quenby." "Kunfo lives in Varn."
  pipeline export runs/quickstart/dpo exports/quickstart-dpo     one merged model folder for other tools
  pipeline data check data/my_chats.jsonl --tokenizer runs/quickstart/tokenizer   audit a data file
"""


def _cmd_run(args) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe
    from pipeline.warnings_filter import quiet_known_noise

    quiet_known_noise()
    recipe = load_recipe(args.recipe, args.overrides)
    records = run_recipe(recipe, only=args.only, from_stage=args.from_stage, force=args.force)
    _print_summary(recipe, records)
    return 0


def _print_summary(recipe, records) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    print(f"\nrun folder: {recipe.run_dir}")
    for stage, record in records.items():
        metrics = record.get("metrics") or {}
        line = f"  {stage:<10} {record.get('status')}  {recipe.run_dir / stage}"
        if "eval_perplexity" in metrics:
            line += (f"  held-out perplexity {metrics['eval_perplexity']:.3f} "
                     f"(unigram {metrics['unigram_perplexity']:.1f}, bigram {metrics['bigram_perplexity']:.2f})")
        line += _held_out_change(metrics)
        if (recipe.run_dir / stage / "report.md").is_file():
            line += "  side by side in report.md"
        if record.get("wall_time_total_s") is not None:  # resumed: this attempt's time and the stage's in all
            line += f"  [{record['wall_time_s']:.0f}s; {record['wall_time_total_s']:.0f}s with the attempts it resumed]"
        elif record.get("wall_time_s") is not None:
            line += f"  [{record['wall_time_s']:.0f}s]"
        print(line)


# what each training stage's held-out evaluation shows it did, in the order the summary names them
SUMMARY_METRICS = (("answer_accuracy", "answer accuracy"), ("habit_rate", "habit"),
                   ("reward_accuracy", "preference accuracy"), ("kl_from_reference", "KL from reference"),
                   ("pairwise_accuracy", "pairwise accuracy"), ("fact_ranking", "right fact over wrong"))


def _held_out_change(metrics: dict) -> str:
    """'  held-out answer accuracy 0.056 -> 0.976, habit 0.000 -> 0.296' from a stage's held-out evaluation before and
    after training (response perplexity where the data has no scorer), or '' for a stage without one."""
    before, after = metrics.get("heldout_before") or {}, metrics.get("heldout_after") or {}
    names = [(key, name) for key, name in SUMMARY_METRICS if isinstance(after.get(key), float)]
    if not names and isinstance(after.get("response_perplexity"), float):
        names = [("response_perplexity", "reply perplexity")]
    parts = [f"{name} {before[key]:.3f} -> {after[key]:.3f}" if isinstance(before.get(key), float)
             else f"{name} {after[key]:.3f}" for key, name in names]
    return "  held-out " + ", ".join(parts) if parts else ""


def _cmd_check(args) -> int:
    from pipeline.config_schema import describe
    from pipeline.recipe import Recipe, check_base, check_data_files, load_recipe, read_data_files

    if args.explain:
        print("\n".join(describe(Recipe)))
    recipe = load_recipe(args.recipe, args.overrides)
    check_data_files(recipe, args.recipe)
    files, records, notes = read_data_files(recipe, recipe.stages, args.recipe)
    try:
        splits = {n: recipe.batch_splits(n) for n in args.processes}
    except PipelineError as exc:
        raise PipelineError(f"{args.recipe}: {exc}") from None
    print(f"{args.recipe}: ok; stages: {', '.join(recipe.stages)}; outputs in {recipe.run_dir}")
    print(f"  data: {files} file(s) read as their stages read them, {records:,} records"
          + "".join(f"\n  {note}" for note in notes))
    if recipe.base is not None:
        print(f"  base: {recipe.base.path}; chat template: {check_base(recipe.base, args.recipe)}")
    for processes, by_stage in splits.items():
        for stage, split in by_stage.items():
            unit = {"pretrain": "blocks", "sft": "conversations", "dpo": "pairs", "reward": "pairs",
                    "rl": "replies"}.get(stage, "examples")
            print(f"  {stage}: {split.describe(unit)}{_fp32_split_note(recipe, stage, processes)}")
    return 0


def _fp32_split_note(recipe, stage: str, processes: int) -> str:
    """Where a stage caps its micro-batch lower when it trains in fp32 on a CPU (fp32_micro_batch_size), the split
    it runs there. Said beside the usual split rather than decided here: knowing whether this machine trains in
    fp32 would import torch, and check stays light."""
    from pipeline.recipe import split_batch

    cfg = getattr(recipe, stage)
    ceiling = getattr(cfg, "fp32_micro_batch_size", cfg.micro_batch_size)
    if ceiling >= cfg.micro_batch_size:
        return ""
    split = split_batch(stage, cfg.global_batch_size, ceiling, processes)
    return (f"; in fp32 on a CPU {split.micro_batch} x {split.accumulation} accumulation "
            f"({stage}.fp32_micro_batch_size {ceiling})")


def _cmd_data_generate(args) -> int:
    from pathlib import Path

    from pipeline.data.world import files_it_would_replace, write_world

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise PipelineError(f"--out {args.out}: a file, not a folder; give the folder to write the world into")
    theirs = [] if args.force else files_it_would_replace(args.out)
    if theirs:
        raise PipelineError(f"{args.out} already holds {', '.join(theirs)}, which no generated world wrote (there is "
                            "no world.json beside them); writing the world there would replace them. Choose a new "
                            "--out, or pass --force to replace them")
    try:
        counts = write_world(args.out, seed=args.seed, people=args.people, held_out=args.held_out,
                             refusals=args.refusals, lead_ins=args.lead_ins, value_first=args.value_first)
    except ValueError as error:
        raise PipelineError(f"pipeline data generate: {error}") from None
    except (FileExistsError, NotADirectoryError) as error:  # a file where a folder of the path should be
        raise PipelineError(f"--out {args.out}: cannot make the folder: {error.strerror}: {error.filename}") from None
    for name, count in counts.items():
        print(f"  {args.out}/{name}: {count} records")
    return 0


def _cmd_data_check(args) -> int:
    from pipeline.data.readers import describe, missing_path_hint, path_kind, read_records

    tokenizer = args.tokenizer
    if tokenizer:  # a wrong --tokenizer is refused before a large file is read
        hint = missing_path_hint(tokenizer)
        if hint is not None:
            raise PipelineError(f"--tokenizer {tokenizer}: no such tokenizer folder{hint}")
        if path_kind(tokenizer) not in (None, "dir"):  # None here: a hub model id
            raise PipelineError(f"--tokenizer {tokenizer}: not a folder; give the tokenizer's folder "
                                "(e.g. runs/x/tokenizer) or a hub model id")
    result = read_records(args.file, args.kind, args.format, on_bad=args.on_bad)
    print(describe(result))
    if tokenizer and result.kind != "text":
        marked = render_marked(result.records[0], result.kind, tokenizer)
        print("\nfirst record as the model sees it; [[...]] is what the loss trains on, and ⟨...⟩ is one "
              "control token (text typed to look like one, e.g. <|end|> in a message, is shown bare: it stays text):")
        print(marked)
    elif result.kind != "text":
        print("\n(pass --tokenizer DIR, e.g. runs/quickstart/tokenizer, to see the tokens the loss covers)")
    return 0


def render_marked(record: dict, kind: str, tokenizer_dir: str) -> str:
    """The rendered conversation with trained spans wrapped in [[ ]], token by token, and each control token
    (a special token of the tokenizer) in ⟨ ⟩, so a typed "<|end|>" (characters) and the real one differ."""
    from transformers import AutoTokenizer

    from pipeline.chat_template import ChatRenderer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:  # OSError, ValueError, ... from a folder that holds no tokenizer
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise PipelineError(f"--tokenizer {tokenizer_dir}: cannot load a tokenizer: {type(exc).__name__}: {first}") from None
    messages = record["messages"] if kind == "conversation" else record["prompt"] + record["chosen"]
    rendered = ChatRenderer(tokenizer).render(messages)
    control = set(tokenizer.all_special_ids)
    control |= {i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False)}
    out, inside = [], False
    for token, trained in zip(rendered.input_ids, rendered.assistant_mask):
        if trained != inside:
            out.append("[[" if trained else "]]")
            inside = bool(trained)
        if token in control:
            out.append(f"⟨{tokenizer.convert_ids_to_tokens(token)}⟩")
        else:
            out.append(tokenizer.decode([token]))
    return "".join(out) + ("]]" if inside else "")


def _cmd_chat(args) -> int:
    from pipeline.chat import Sampling, run_chat
    from pipeline.warnings_filter import quiet_known_noise

    quiet_known_noise()
    sampling = Sampling(max_new_tokens=args.max_new_tokens, greedy=args.greedy or args.temperature == 0,
                        temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return run_chat([args.path, *([args.compare] if args.compare else [])], sampling, args.system)


def _cmd_serve(args) -> int:
    import os

    from pipeline.serve.app import serve
    from pipeline.warnings_filter import quiet_known_noise

    quiet_known_noise()
    key = args.api_key or os.environ.get("PIPELINE_API_KEY") or None  # an empty key is none, as the startup line says
    return serve(args.run, host=args.host, port=args.port, api_key=key)


def _cmd_eval(args) -> int:
    from pathlib import Path

    from pipeline.config_schema import build
    from pipeline.recipe import EvalConfig, Recipe, read_yaml
    from pipeline.run_lock import run_folder_lock
    from pipeline.stages.eval import evaluate_run
    from pipeline.warnings_filter import quiet_known_noise

    quiet_known_noise()
    run_dir = Path(args.run)
    if not (run_dir / "recipe.yaml").is_file():
        raise PipelineError(f"{run_dir}: not a run folder (no recipe.yaml); run a recipe first")
    recipe = build(Recipe, read_yaml(run_dir / "recipe.yaml"))
    cfg = recipe.eval or EvalConfig()
    if args.limit:
        cfg.limit = args.limit
    out = Path(args.out) if args.out else run_dir / "eval"
    with run_folder_lock(run_dir):  # not while a `pipeline run` rewrites the stages it reads
        record = out / "stage.json"
        # the eval stage's own folder: its record would vouch for this command's report
        if out.resolve() == (run_dir / "eval").resolve() and record.is_file():
            record.unlink()
            print(f"{out} now holds this command's report, not the eval stage's: its stage.json is removed, so "
                  "`pipeline run` runs the eval stage again")
        evaluate_run(run_dir, cfg, recipe, out)
    print(f"report: {out / 'report.md'}")
    return 0


def _cmd_score(args) -> int:
    from pipeline.models import load_stage_model
    from pipeline.score import format_scores, score_sentences
    from pipeline.warnings_filter import quiet_known_noise

    quiet_known_noise()
    model, tokenizer = load_stage_model(args.path)
    print(format_scores(score_sentences(model, tokenizer, args.texts)))
    return 0


def _cmd_export(args) -> int:
    from contextlib import nullcontext
    from pathlib import Path

    from pipeline.export import export_stage
    from pipeline.run_lock import run_folder_lock
    from pipeline.warnings_filter import quiet_known_noise

    quiet_known_noise()
    run_dir = Path(args.stage).parent
    # not while a `pipeline run` rewrites the chain it merges (a stage outside a run folder has no such writer)
    with run_folder_lock(run_dir) if (run_dir / "recipe.yaml").is_file() else nullcontext():
        out = export_stage(args.stage, args.out, dtype=args.dtype, adapter_only=args.adapter_only, gguf=args.gguf,
                           gguf_quantization=args.gguf_quant)
    said = " (adapter; the model it stands on in parent/)" if args.adapter_only else ""
    if args.gguf or args.gguf_quant:
        ollama = ", Modelfile for ollama" if (out / "Modelfile").is_file() else ""
        said = f" (and {out}/model.gguf for llama.cpp{ollama})"
    print(f"exported {args.stage} to {out}{said}")
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes of at least 1, got {text!r}")
    return int(text)


def _number(kind, low, high=None, low_open=False):
    """An argparse type: `kind` (int or float) from `low` (excluded where low_open) up to `high`."""
    bounds = f"{'over' if low_open else 'at least'} {low}" + (f" and at most {high}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (low_open and value == low) or \
                (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'} {bounds}, "
                                             f"got {text!r}")
        return value

    return parse


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 1 to 65535, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Staged fine-tuning and alignment of causal language models: "
        "tokenizer -> pretrain (or a base model) -> ... Each stage writes Hugging Face artefacts.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="run a recipe's stages in order, skipping finished ones",
                           description="Run every stage of RECIPE in order. A stage whose config and inputs are "
                           "unchanged since it finished is skipped; a stage killed midway resumes from its newest "
                           "checkpoint. Launch under `accelerate launch` for several processes.")
    run.add_argument("recipe", help="path to a recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. pretrain.max_steps=50")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="run just this stage (rerun even if done); earlier stages must be done")
    group.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and every stage after it")
    run.add_argument("--force", action="store_true",
                     help="let this recipe take over a run folder that another recipe file made (same name)")
    run.set_defaults(func=_cmd_run)

    check = verbs.add_parser("check", help="validate a recipe and its data files without training",
                             description="Parse RECIPE with overrides, validate every key and value, and read every "
                             "local data file as its stage will (a malformed record stops here, naming file, line "
                             "and field). Takes a few seconds; trains nothing.")
    check.add_argument("recipe", help="path to a recipe YAML file")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys")
    check.add_argument("--explain", action="store_true", help="print every recipe key with its default and doc")
    check.add_argument("--processes", type=_positive_int, nargs="+", default=[1], metavar="N",
                       help="check that every stage's global batch splits over N processes and print the split "
                       "(default 1; e.g. --processes 1 2 8)")
    check.set_defaults(func=_cmd_check)

    chat = verbs.add_parser("chat", help="talk to a stage's model (reads standard input, so it can be piped)",
                            description="Multi-turn chat with PATH: a full model folder (runs/x/pretrain) or an "
                            "adapter stage (runs/x/sft, runs/x/dpo; its lineage is rebuilt). One message per line; "
                            "replies stream and stop at the end-of-turn token. Commands: /reset, /system TEXT, /help, "
                            "/quit.")
    chat.add_argument("path", help="a stage folder, e.g. runs/quickstart/dpo")
    chat.add_argument("--compare", metavar="PATH", help="a second model answering the same messages, side by side")
    chat.add_argument("--system", help="system message for the conversation")
    chat.add_argument("--max-new-tokens", type=_number(int, 1), default=128, help="reply length limit (default 128)")
    chat.add_argument("--greedy", action="store_true", help="always take the most likely token")
    chat.add_argument("--temperature", type=_number(float, 0), default=0.7,
                      help="sampling temperature (default 0.7; 0 = greedy, as in the server's API)")
    chat.add_argument("--top-k", type=_number(int, 0), default=0,
                      help="sample among the k most likely tokens (0 = all)")
    chat.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=1.0,
                      help="nucleus sampling mass, in (0, 1] (default 1.0 = off)")
    chat.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="sampling seed (default 0)")
    chat.set_defaults(func=_cmd_chat)

    serve = verbs.add_parser("serve", help="a run's stages behind an OpenAI-compatible API, and a page comparing two",
                             description="Serve every finished model stage of RUN (pretrain or base, sft, dpo, rl) as a "
                             "model of an OpenAI-compatible API (GET /v1/models, POST /v1/chat/completions, streaming "
                             "too), and at / a page that streams two stages' replies side by side. Models load on "
                             "first use and stay loaded.")
    serve.add_argument("run", help="a run folder, e.g. runs/quickstart")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $PIPELINE_API_KEY, else none)")
    serve.set_defaults(func=_cmd_serve)

    evaluate = verbs.add_parser("eval", help="evaluate every stage of a run side by side (report, plots)",
                                description="Evaluate each finished stage of RUN (pretrain or base, sft, dpo, rl) on "
                                "the same held-out data: perplexity, answer accuracy, habit rate, preference "
                                "accuracy, KL of dpo and rl from sft. Writes report.md, report.json, transcripts.jsonl "
                                "and plots/*.png into RUN/eval (or --out).")
    evaluate.add_argument("run", help="a run folder, e.g. runs/quickstart")
    evaluate.add_argument("--limit", type=_number(int, 1), help="at most this many examples of each kind")
    evaluate.add_argument("--out", help="report folder (default: RUN/eval)")
    evaluate.set_defaults(func=_cmd_eval)

    score = verbs.add_parser("score", help="log-probability of sentences under a stage's model, token by token",
                             description="Print each TEXT's log-probability under PATH's model and each token's "
                             "probability, e.g. to compare 'The apple and pear salad' with 'The apple and pair salad'.")
    score.add_argument("path", help="a stage folder, e.g. runs/quickstart/pretrain")
    score.add_argument("texts", nargs="+", metavar="TEXT", help="sentences to score")
    score.set_defaults(func=_cmd_score)

    export = verbs.add_parser("export", help="write a stage's model as one folder that plain transformers loads",
                              description="Merge RUN/STAGE's whole adapter chain (base, then each adapter in order) "
                              "into one model folder: model.safetensors, tokenizer with its chat template, "
                              "generation_config.json that stops at the end-of-turn token, and README.md stating "
                              "the lineage, data and metrics of every stage. AutoModelForCausalLM.from_pretrained(OUT) "
                              "loads it; no adapters, no code of ours. OUT must be new or empty; it is written under "
                              "a temporary name and renamed, so a crash leaves nothing half-written.")
    export.add_argument("stage", metavar="RUN/STAGE", help="a finished model stage, e.g. runs/quickstart/dpo")
    export.add_argument("out", metavar="OUT", help="a new (or empty) folder to write")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: the dtype the run loads the model in: the base stage's "
                        "recorded dtype, float32 for a model pretrained here)")
    export.add_argument("--adapter-only", action="store_true",
                        help="keep the stage's own adapter unmerged (OUT: adapter_config.json, "
                        "adapter_model.safetensors) and write the model it was trained on (the base with every "
                        "earlier adapter merged) to OUT/parent, which the adapter's base_model_name_or_path names "
                        "(an absolute path); parent is written even for a single adapter, so OUT is self-contained")
    export.add_argument("--gguf", action="store_true",
                        help="also write OUT/model.gguf: the merged weights (in --dtype; vectors stay float32), the "
                        "vocabulary and the chat template for llama.cpp, ollama and LM Studio (Llama, Gemma-2 and "
                        "Gemma-3: the models pretrained here and such bases; convert other architectures with "
                        "llama.cpp's convert_hf_to_gguf.py)")
    export.add_argument("--gguf-quant", choices=["q8_0"],
                        help="write OUT/model.gguf (implies --gguf) with its matrices quantized: q8_0 = 8 bits per "
                        "weight in blocks of 32 with a scale each, about half of float16's size (llama.cpp's "
                        "`convert_hf_to_gguf.py --outtype q8_0`); for 4- to 6-bit k-quants run llama.cpp's "
                        "llama-quantize on the file")
    export.set_defaults(func=_cmd_export)

    data = verbs.add_parser("data", help="built-in data and data audits")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    generate = data_verbs.add_parser("generate", help="write the tiny-world data set (deterministic from a seed)",
                                     description="Write the built-in tiny world: pretraining corpus, SFT "
                                     "conversations, preference pairs and held-out evaluation sets.")
    generate.add_argument("--out", default="data/tiny_world", help="output folder (default: data/tiny_world)")
    generate.add_argument("--force", action="store_true",
                          help="replace files of the same names in --out that no generated world wrote")
    generate.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    generate.add_argument("--people", type=int, default=200, help="number of invented people (default 200)")
    generate.add_argument("--held-out", type=int, default=None, metavar="N",
                          help="how many of them SFT and DPO never ask about (default: half)")
    generate.add_argument("--refusals", type=float, default=0.0, metavar="SHARE",
                          help="share of the pretraining chats that also hold a question about nobody answered "
                          "'I do not know.' (default 0; the quickstart's world uses 0.8: a small model then "
                          "answers almost no held-out question before SFT)")
    generate.add_argument("--lead-ins", type=float, default=0.0, metavar="SHARE",
                          help="share of the pretraining chats' spelling answers that open with one or two neutral "
                          "sentences before copying the word (default 0; the quickstart's world uses 0.5: a small "
                          "model then copies the asked name after the habit's preamble too)")
    generate.add_argument("--value-first", action="store_true",
                          help="state jobs, pets and colours value-first in two of their five pretraining phrasings "
                          "('Smith is the trade of Nozan' beside 'Smith is the job that Nozan does'), as towns always "
                          "are (default one; the long recipe's world uses it: a reward model then reads held-out "
                          "people's facts better)")
    generate.set_defaults(func=_cmd_data_generate)
    audit = data_verbs.add_parser("check", help="audit a data file: format, counts, bad records, duplicates",
                                  description="Read FILE as the stages would and print what was read: detected "
                                  "format, record counts, bad records by reason (with file and line), duplicates, "
                                  "and one example rendered with the trained tokens marked.")
    audit.add_argument("file", help="a .jsonl, .json, .parquet or .txt file, or a hub dataset id")
    audit.add_argument("--kind", choices=["auto", "conversation", "preference", "text"], default="auto",
                       help="record kind the file should hold (default: auto, from the first record's fields: "
                            "chosen/rejected = preference, messages/instruction/prompt = conversation, text = text)")
    audit.add_argument("--format", default="auto", help="format name; auto detects it from the first record")
    audit.add_argument("--on-bad", choices=["error", "drop"], default="drop",
                       help="stop at the first bad record, or count and list them (default: drop)")
    audit.add_argument("--tokenizer", help="tokenizer folder used to render the example (e.g. runs/x/tokenizer)")
    audit.set_defaults(func=_cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also come after options (`run R --only sft sft.epochs=3`), which
    # argparse leaves unparsed once an option has ended the positional list
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except StageFailed as exc:
        _say_once(f"error: {exc}")
        return 1
    except PipelineError as exc:
        _say_once(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say_once("interrupted; rerun the same command to resume from the newest checkpoint")
        return 130
    except Interrupted as exc:
        _say_once(f"{exc}; rerun the same command to resume from the newest checkpoint")
        return 143
    except BrokenPipeError:  # the reader went away (`pipeline check R | head -1`): not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own advice: no second error at exit
        return 0
    except OSError as exc:  # the file system refused (permissions, a full disk, a read-only mount)
        if exc.errno not in FILE_SYSTEM_REFUSALS:
            raise
        _say_once(f"error: {exc.strerror}: {exc.filename}" if exc.filename else f"error: {exc.strerror}")
        return 2
    finally:
        if "torch" in sys.modules:  # only a verb that imported torch can have started a process group
            from pipeline.distributed import leave_process_group

            leave_process_group()


def _say_once(message: str) -> None:
    """A user-facing error, printed by the main process only: under `accelerate launch` every rank
    meets the same bad recipe or data at the same point, and N copies of one line hide it.

    Under the launcher each rank also writes it to TORCHELASTIC_ERROR_FILE, so the launcher's
    "Root Cause" block repeats our line instead of "To enable traceback see ...". (The launcher's
    own Python traceback above that block is printed by its process, out of our reach.)
    """
    import json
    import os
    import time

    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        info = {"py_callstack": message, "timestamp": str(int(time.time()))}
        try:
            with open(error_file, "w") as handle:
                json.dump({"message": {"message": message, "extraInfo": info}}, handle)
        except OSError:
            pass  # the launcher then says "<N/A>"; the line above was printed all the same
