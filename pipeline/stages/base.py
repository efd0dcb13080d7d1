"""base stage: bring the recipe's pretrained model into the run folder, ready for every later stage.

A GGUF file is dequantized once and saved as a plain Hugging Face folder (safetensors in float32,
the exact dequantized values; no quantization block), and the saved folder's logits are checked
against the in-memory GGUF load. A hub id or a local folder is not copied: the stage saves the
tokenizer (with the chat template the run uses) and a lineage.json naming the source and how to
load it (revision, remote code, attention, dtype), so sft, dpo, eval and chat load it the same way.
"""

from __future__ import annotations

import dataclasses
import re
import time

import torch

from pipeline.chat_template import ChatRenderer, load_chat_template
from pipeline.errors import PipelineError
from pipeline.generation import stop_token_ids
from pipeline.lineage import folder_record, write_lineage
from pipeline.models import (
    base_embedding_rows,
    count_parameters,
    hub_commit,
    load_base_model,
    load_base_tokenizer,
    resolve_dtype,
)
from pipeline.recipe import BaseModelConfig

PROBE = "The capital of France is Paris. The capital of Italy is"


def choose_chat_template(tokenizer, cfg: BaseModelConfig) -> tuple[str, str]:
    """(template text, where it came from): the recipe's choice, else the tokenizer's own."""
    if cfg.chat_template:
        return load_chat_template(cfg.chat_template), f"ours: {cfg.chat_template}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, "the base tokenizer's own"
    raise PipelineError("base.chat_template: the base tokenizer has no chat template; name one of ours "
                        "(e.g. base.chat_template=gemma) or a .jinja file")


# The shapes of control tokens: <|fim_prefix|>, <|vision_start|> (Qwen, Phi), <start_of_image> (Gemma). A tokenizer
# may keep such a token as a plain added entry, which transformers matches in any text, special or not; added
# entries of other shapes are text (Gemma's "\n\n", <table>, <strong>) and stay as they are.
CONTROL_SHAPE = re.compile(r"<\|[^|<>\s]+\|>|<(?:start|end)_of_[a-z_]+>")


def mark_control_tokens(tokenizer, template: str) -> list[str]:
    """Tokens the template writes as markup (<start_of_turn>, <end_of_turn>) that the vocabulary has
    but does not call special (a GGUF tokenizer keeps them as plain entries), and added tokens shaped as control
    tokens (CONTROL_SHAPE): registered as special, ids unchanged, so decoding drops them and user text can never
    produce them."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    shaped = {t.content for t in tokenizer.added_tokens_decoder.values() if CONTROL_SHAPE.fullmatch(t.content)}
    markup = sorted({m for m in re.findall(r"<[^<>\s{}'\"]+>", template) if m in vocab} | shaped)
    markup = [m for m in markup if m not in special]
    if markup:
        tokenizer.add_special_tokens({"additional_special_tokens": markup}, replace_extra_special_tokens=False)
    return markup


def require_rows_for_fed_tokens(tokenizer, renderer: ChatRenderer, rows: int | None) -> None:
    """Every token the stages feed the model (the chat template's markup, bos, eos, padding) has an embedding row.

    A tokenizer can be longer than the weights' embedding: transformers' GGUF tokenizer for some architectures adds
    its class default (e.g. a '<|endoftext|>' pad) when the file's vocabulary lacks it. Such an id would stop sft at
    its first batch with an index error inside torch; here it is one line naming the tokens."""
    chat = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    fed = set(renderer.render(chat).input_ids) | set(renderer.render(chat[:1], add_generation_prompt=True).input_ids)
    fed |= {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, renderer.end_of_turn}
    missing = sorted(i for i in fed if i is not None and rows is not None and i >= rows)
    if missing:
        named = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i})" for i in missing)
        raise PipelineError(f"base: the tokenizer gives {named} past the model's {rows} embedding rows: the tokenizer "
                            f"does not fit these weights (its length {len(tokenizer)})")


@torch.no_grad()
def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer(PROBE).input_ids])
    return model(input_ids=ids, use_cache=False).logits[0].float()


def run(cfg: BaseModelConfig, ctx) -> dict:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    kind, location = cfg.source()
    dtype = resolve_dtype(cfg.dtype, device_type)
    if kind == "hub":
        # the commit a branch or tag names now: every later stage, eval, chat and export load that one, not
        # wherever the branch has moved since sft trained on it
        cfg = dataclasses.replace(cfg, revision=hub_commit(cfg))
        ctx.log(f"hub base {location} at commit {cfg.revision}")
    tokenizer = load_base_tokenizer(cfg)
    template, template_source = choose_chat_template(tokenizer, cfg)
    tokenizer.chat_template = template
    marked = mark_control_tokens(tokenizer, template)
    renderer = ChatRenderer(tokenizer)
    ctx.log(f"{kind} base {location}; chat template: {template_source}; end of turn "
            f"{tokenizer.convert_ids_to_tokens(renderer.end_of_turn)}")
    options = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
               "attn_implementation": cfg.attn_implementation, "dtype": str(dtype).removeprefix("torch.")}
    if kind == "folder":  # what it holds now: eval, chat and export refuse to load it if it changes later
        options["folder_contents"] = folder_record(location)
    metrics = {"source": kind, "location": location, "revision": cfg.revision, "chat_template": template_source,
               "control_tokens_marked": marked, "vocab_size": len(tokenizer), "dtype": options["dtype"]}

    if kind == "gguf":
        # float32: the dequantized values exactly; later stages cast to `dtype` when they load. The default
        # attention: flash attention (the recipe's, for training) refuses float32 on the CPU, where this probe runs
        model = load_base_model(dataclasses.replace(cfg, attn_implementation=None), torch.float32) \
            if ctx.is_main else None
        if ctx.is_main:
            require_rows_for_fed_tokens(tokenizer, renderer, model.get_input_embeddings().num_embeddings)
            model.generation_config.eos_token_id = stop_token_ids(tokenizer, renderer)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(ctx.out_dir, safe_serialization=True)
            reloaded = AutoModelForCausalLM.from_pretrained(ctx.out_dir, dtype=torch.float32, use_safetensors=True)
            gguf_logits = probe_logits(model, tokenizer)
            difference = (gguf_logits - probe_logits(reloaded, tokenizer)).abs().max().item()
            largest = gguf_logits.abs().max().item()
            # relative to the logits' size: two fp32 forwards of the same weights differ by summation order
            # (seen: 1.1e-3 on Gemma's logits of ~30 when the machine was busy); a wrong import differs by O(1)
            if difference > 1e-4 * max(1.0, largest):
                raise PipelineError(f"base: the imported folder's logits differ from the GGUF load by {difference} "
                                    f"(largest logit {largest:.1f})")
            rope = getattr(model.config, "rope_parameters", None) or {}
            metrics.update(parameters=count_parameters(model)[1], import_max_logit_difference=difference,
                           architecture=model.config.model_type, rope_parameters=rope)
            ctx.log(f"imported {metrics['parameters'] / 1e6:.0f}M parameters ({model.config.model_type}, rope "
                    f"{_rope_kinds(rope)}) into {ctx.out_dir}; logits equal the GGUF load (max difference "
                    f"{difference:.1e})")
            del model, reloaded
        source = ctx.out_dir
    else:
        require_rows_for_fed_tokens(tokenizer, renderer, base_embedding_rows(cfg))
        source = location  # not copied: the lineage names it
    if ctx.is_main:
        tokenizer.save_pretrained(ctx.out_dir)
        if kind != "gguf":
            from transformers import GenerationConfig

            generation = GenerationConfig(eos_token_id=stop_token_ids(tokenizer, renderer),
                                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
            generation.save_pretrained(ctx.out_dir)
        write_lineage(ctx.out_dir, str(source), [], options, note="the base model this run fine-tunes")
    ctx.accelerator.wait_for_everyone()
    metrics["import_s"] = round(time.perf_counter() - started, 2)
    return metrics


def _rope_kinds(rope: dict) -> str:
    """'llama3 x8.0', or per layer type 'full_attention linear x8.0, sliding_attention default': the rope the file
    was read with (pipeline/gguf_hparams.py), said where a user can see a scaling was kept."""
    def one(params: dict) -> str:
        kind = params.get("rope_type", "default")
        return f"{kind} x{params['factor']}" if params.get("factor") and kind != "default" else kind

    per_layer_type = {name: params for name, params in rope.items() if isinstance(params, dict)}
    return ", ".join(f"{name} {one(params)}" for name, params in per_layer_type.items()) or one(rope)
