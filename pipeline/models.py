"""Where models come from: built from scratch from a config; a recipe's base (hub id, local folder or
GGUF file); or a stage's output (a full model folder, or a base plus a chain of LoRA adapters).

Weights are loaded from safetensors only, and remote code only runs when the recipe says so.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.gguf_header import read_gguf_header
from pipeline.gguf_hparams import complete_config, complete_gguf_tokenizer
from pipeline.lineage import folder_change, lineage_head, read_lineage, require_current
from pipeline.recipe import BaseModelConfig, ModelConfig

# oneDNN instruction sets that have bf16 dot products (AVX512-BF16, AVX10, AMX); `ONEDNN_MAX_CPU_ISA` below these
# leaves bf16 matmuls to slow emulation even on a CPU that has the instructions
BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
             "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on the CPU, unless oneDNN is told
    not to use them (ONEDNN_MAX_CPU_ISA, e.g. AVX2 to reproduce an AVX2-only machine)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in BF16_ISAS:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cuda_has_bf16() -> bool:
    """bf16 in hardware (Ampere and later). torch's default check also says yes where it only emulates bf16
    (V100, T4: several times slower than their fp16), which made `auto` pick emulated bf16 there."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise PipelineError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    # auto
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def auto_precision(device: torch.device) -> str:
    """What `precision: auto` (and a base's `dtype: auto`) means on this machine: "bf16", "fp16" or "fp32"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype("auto", device), "fp32")


def build_config(cfg: ModelConfig, tokenizer):
    """A standard transformers config (LlamaConfig or Gemma2Config) for a model trained from scratch."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,  # for generation; training passes use_cache=False
    )
    if cfg.architecture == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(rope_theta=cfg.rope_theta, **common)
        config._attn_implementation = cfg.attn_implementation or "sdpa"
    else:
        from transformers import Gemma2Config

        config = Gemma2Config(head_dim=cfg.hidden_size // cfg.num_heads, rope_theta=cfg.rope_theta, **common)
        # Gemma-2's logit soft-capping only works with eager attention on the CPU (sdpa refuses it).
        config._attn_implementation = cfg.attn_implementation or "eager"
    return config


def build_model(cfg: ModelConfig, tokenizer, seed: int):
    from transformers import AutoModelForCausalLM

    config = build_config(cfg, tokenizer)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)


def lora_config(args, task_type: str = "CAUSAL_LM", also_save: tuple[str, ...] = ()):
    """A peft LoraConfig from the recipe's LoraArgs (W x + (alpha/r) B A x, B zero at the start).
    `also_save`: modules trained fully and saved with the adapter besides the recipe's (a reward head)."""
    from peft import LoraConfig

    targets = args.target_modules
    to_save = [*args.modules_to_save, *(m for m in also_save if m not in args.modules_to_save)]
    return LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        # with SEQ_CLS, all-linear leaves the `score` head out (peft), as it leaves lm_head out for CAUSAL_LM
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=to_save or None,
        task_type=task_type,
    )


def require_lora_targets(model, args, stage: str) -> None:
    """Every name in the recipe's lora.target_modules and lora.modules_to_save names a module of this model, the
    way peft matches it (the whole dotted name or its last parts): otherwise a one-line error with the nearest
    name and the model's linear layers, before the stage evaluates or trains (peft would raise from deep inside
    the trainer's set-up, after the held-out evaluation)."""
    from pipeline.config_schema import closest

    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    for field, targets in (("target_modules", [t for t in args.target_modules if t != "all-linear"]),
                           ("modules_to_save", args.modules_to_save)):
        for target in targets:
            if not any(name == target or name.endswith("." + target) for name in names):
                last_parts = {name.rsplit(".", 1)[-1] for name in names}
                raise PipelineError(f"{stage}.lora.{field}: `{target}` names no module of this model"
                                    f"{closest(target, last_parts)}; its linear layers: {', '.join(linear)}")


def restore_adapter_dropout(model, p: float) -> int:
    """Set every LoRA adapter's input dropout back to the recipe's `lora.dropout`; the number of layers set.

    TRL's DPO and reward trainers switch every nn.Dropout in the model off (their `disable_dropout`, on by default)
    after peft has added the adapters, so the recipe's adapter dropout would silently do nothing. The model's own
    dropout stays off, as TRL means it to."""
    from peft.tuners.lora import LoraLayer

    layers = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for dropout in module.lora_dropout.values():
                if isinstance(dropout, torch.nn.Dropout):
                    dropout.p = p
                    layers += 1
    return layers


def train_only_lm_head(model) -> None:
    """Freeze everything but the output projection, untied from the input embeddings.

    With tied weights (the tiny llama, Gemma) lm_head.weight IS embed_tokens.weight: training it
    would move the input embeddings too, and the model would no longer be "the SFT model with a new
    last layer". So lm_head gets its own copy (a clone of the shared matrix, the same numbers) and
    the config says untied, so the saved model keeps both matrices and reloads untied. The input
    embeddings stay the SFT model's, byte for byte.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise PipelineError("trainable: lm_head (dpo, rl): this model has no output projection")
    if head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    for param in model.parameters():
        param.requires_grad = False
    if head.weight.dtype == torch.float16:
        _train_in_fp32(head)
    head.weight.requires_grad = True


def _train_in_fp32(head) -> None:
    """An fp16 model's trained matrix kept in fp32, as peft keeps adapters on an fp16 base: loss scaling (fp16 on a
    GPU without bf16) refuses fp16 gradients ("Attempting to unscale FP16 gradients"), and fp16 weights drop small
    updates. The input is cast to the head's dtype, so it also runs outside autocast (KL, generation); the logits
    come out fp32, and the saved lm_head.weight is fp32 (loading in fp16 casts it back)."""
    head.weight = torch.nn.Parameter(head.weight.detach().float())
    head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))


def frozen_copy(model):
    """The reference for lm_head training (dpo, rl): the SFT model as it is now, in eval mode, never trained
    (with no adapter to switch off, the reference has to be a copy)."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = _weights_in(param)
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def _weights_in(param) -> int:
    """The weights a parameter stands for, counted as peft counts them: ZeRO-3 leaves an empty stub (ds_numel is
    the real count), and bitsandbytes packs two 4-bit weights into each byte of a Params4bit's storage."""
    count = param.numel()
    if count == 0 and hasattr(param, "ds_numel"):
        count = param.ds_numel
    if type(param).__name__ == "Params4bit":
        count *= 2 * param.element_size()
    return count


def resolve_dtype(name: str, device_type: str = "cpu") -> torch.dtype:
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if cuda_has_bf16() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_attention(config, requested: str | None) -> str:
    """The recipe's choice, else eager where the model soft-caps attention logits (Gemma-2: sdpa is
    refused on the CPU), else sdpa."""
    return requested or ("eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa")


# ---------------------------------------------------------------- a recipe's `base:` model


def _loading(cfg: BaseModelConfig, kind: str, location: str) -> tuple[str, dict]:
    """(source, from_pretrained keyword arguments) shared by the config, tokenizer and model loads."""
    if kind == "gguf":
        file = Path(location)
        return str(file.parent), {"gguf_file": file.name}
    return location, {"revision": cfg.revision if kind == "hub" else None, "trust_remote_code": cfg.trust_remote_code}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _base_part(cfg: BaseModelConfig, from_pretrained, part: str):
    """`from_pretrained` (AutoTokenizer's, AutoConfig's) of the base, or one line naming `part` when it fails."""
    kind, location = cfg.source()
    source, kwargs = _loading(cfg, kind, location)
    try:
        return from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"base.path: cannot load the {part} of {cfg.path}: {_first_line(exc)}") from None


def load_base_tokenizer(cfg: BaseModelConfig):
    from transformers import AutoTokenizer

    tokenizer = _base_part(cfg, AutoTokenizer.from_pretrained, "tokenizer")
    kind, location = cfg.source()
    if kind == "gguf":
        complete_gguf_tokenizer(tokenizer, read_gguf_header(location).fields)
    return tokenizer


def hub_commit(cfg: BaseModelConfig) -> str:
    """The commit of a hub base that `base.revision` (a branch, tag or commit; default main) names now, from the
    download of its config.json (or the local cache where HF_HUB_OFFLINE=1): snapshots/<commit>/config.json."""
    from transformers.utils import cached_file

    try:
        path = cached_file(cfg.path, "config.json", revision=cfg.revision)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"base.path: cannot load the config of {cfg.path}: {_first_line(exc)} (no network here? "
                            "set HF_HUB_OFFLINE=1 and use a local folder)") from None
    if path is None:  # transformers answers None, not an error, for a file the repository lacks
        raise PipelineError(f"base.path: {cfg.path} has no config.json at {cfg.revision or 'main'}: not a transformers "
                            "model repository (a GGUF-only one? download the .gguf file and name it)")
    return Path(path).parent.name


def base_embedding_rows(cfg: BaseModelConfig) -> int | None:
    """How many token ids a hub or folder base's embedding has rows for, from its config alone (no weights); None
    where the config names no vocab_size (remote-code configs may call it otherwise)."""
    from transformers import AutoConfig

    return getattr(_base_part(cfg, AutoConfig.from_pretrained, "config").get_text_config(), "vocab_size", None)


def load_base_model(cfg: BaseModelConfig, dtype: torch.dtype, quantization=None):
    """The pretrained model a recipe names: hub id, local folder, or GGUF file (dequantized).

    Weights come from safetensors only (or the GGUF file itself); remote code runs only when the
    recipe says so. A GGUF-loaded model keeps transformers' quantizer object although its weights
    are plain tensors: it is dropped here so the model saves and trains like any other.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, location = cfg.source()
    source, kwargs = _loading(cfg, kind, location)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        if kind == "gguf":  # what transformers' GGUF loader leaves at its defaults, as llama.cpp reads the file
            header = read_gguf_header(location)
            config = complete_config(config, header.fields, header.tensor_names, header.rope_factors)
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype,
            attn_implementation=default_attention(config, cfg.attn_implementation),
            quantization_config=quantization, **({} if kind == "gguf" else {"use_safetensors": True}), **kwargs)
    except (OSError, ValueError) as exc:
        offline = " (no network here? set HF_HUB_OFFLINE=1 and use a local folder)" if kind == "hub" else ""
        raise PipelineError(f"base.path: cannot load {cfg.path}: {_first_line(exc)}{offline}") from None
    if kind == "gguf":
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    return model


# ---------------------------------------------------------------- a stage's model


def not_a_model_folder(path: Path) -> str:
    """Why `path` holds no model, said as the user can act on it: it does not exist, it is a run folder
    (name its model stages), or it is some other folder."""
    if not path.exists():
        return f"{path}: no such folder"
    if (path / "run.json").is_file() or (path / "recipe.yaml").is_file():
        stages = sorted(p.name for p in path.iterdir() if lineage_head(p) == "causal-lm"
                        and ((p / "lineage.json").is_file() or (p / "config.json").is_file()))
        named = ", ".join(str(path / name) for name in stages) or "none finished yet"
        return f"{path} is a run folder; give one of its model stages ({named})"
    return f"{path}: neither a model folder (config.json) nor an adapter stage (lineage.json)"


def load_stage_model(stage_dir: str | Path, dtype: torch.dtype | None = None, quantization=None,
                     merge_all: bool = False):
    """A stage's model and tokenizer: a full model folder, or base + chain of adapters (lineage.json).

    Every later stage, eval, chat and score load through here. The base is loaded exactly as the
    base stage recorded (revision, remote code, attention, dtype unless `dtype` is given). Earlier
    adapters are merged into the weights in order, as training saw them; the last stays a
    PeftModel (so `disable_adapter()` gives that stage's reference), or is merged too with
    `merge_all` (the model a new adapter is trained on). `quantization` (QLoRA) applies to a
    chain without adapters only: a 4-bit base cannot take merged adapters.
    """
    from transformers import AutoTokenizer

    stage_dir = Path(stage_dir)
    require_current(stage_dir)
    if lineage_head(stage_dir) != "causal-lm":
        raise PipelineError(f"{stage_dir} holds a reward model (a score head, not a language model): it scores "
                            f"replies and cannot generate; load it with pipeline.rewards.load_reward_model")
    if not (stage_dir / "lineage.json").is_file() and not (stage_dir / "config.json").is_file():
        raise PipelineError(not_a_model_folder(stage_dir))
    base, adapters, options = read_lineage(stage_dir) if (stage_dir / "lineage.json").is_file() \
        else (str(stage_dir), [], {})
    model = load_chain(stage_dir, base, adapters, options, dtype, quantization, merge_all)
    return model, AutoTokenizer.from_pretrained(stage_dir)


def gpu_placement() -> dict:
    """from_pretrained's device_map for this process's GPU. Without it a loaded model stayed on the CPU of a GPU
    machine until a trainer moved it: chat, serve, score, the eval stage and the held-out passes before training
    ran there (and flash attention, which takes CUDA tensors only, failed). Empty without CUDA, and under FSDP or
    DeepSpeed, whose trainers shard the model from the CPU: a whole copy on every GPU first might not fit."""
    if not torch.cuda.is_available():
        return {}
    if any(os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() == "true" for kind in ("FSDP", "DEEPSPEED")):
        return {}
    from accelerate import PartialState

    return {"device_map": {"": PartialState().device}}


def load_chain(stage_dir: Path, base: str, adapters: list[Path], options: dict, dtype: torch.dtype | None = None,
               quantization=None, merge_all: bool = False):
    """The causal LM of a lineage: the base, then each adapter merged in order; the last stays a
    PeftModel unless `merge_all` (see load_stage_model). stage_dir only names the stage in errors."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    if quantization is not None and adapters:
        raise PipelineError(f"{stage_dir}: a 4-bit base cannot take merged adapters; quantize the first adapter stage only")
    change = folder_change(base, options.get("folder_contents"))
    if change:
        raise PipelineError(f"{stage_dir}: its base folder {base} changed since the base stage read it ({change}): the "
                            "adapters were trained on other weights. Restore the folder, or retrain on it as it is "
                            "now: pipeline run RECIPE")
    kwargs = {k: options[k] for k in ("revision", "trust_remote_code") if options.get(k) is not None}
    if Path(base).is_dir():
        kwargs.pop("revision", None)
    if dtype is None:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(options.get("dtype"), torch.float32)
    placement = {} if quantization is not None else gpu_placement()  # bitsandbytes places a 4-bit model itself
    try:
        config = AutoConfig.from_pretrained(base, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype, use_safetensors=True, quantization_config=quantization,
            attn_implementation=default_attention(config, options.get("attn_implementation")), **placement, **kwargs)
    except OSError as exc:
        raise PipelineError(f"{stage_dir}: cannot load its base {base}: {_first_line(exc)}") from None
    for adapter in adapters[: None if merge_all else -1]:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if adapters and not merge_all:
        model = PeftModel.from_pretrained(model, adapters[-1])
    return model


def save_aligned_policy(policy, tokenizer, renderer, out_dir: Path, sft_dir: Path, trainable: str, stage: str,
                        state_dict: dict | None = None) -> None:
    """A preference stage's policy (dpo, rl) trained on the SFT model: its adapter on top of the SFT
    chain (`trainable: lora`), or a full model folder (`lm_head`); the tokenizer; a generation config
    that stops at the end of the assistant's turn; and the lineage that rebuilds it."""
    from pipeline.generation import stop_token_ids
    from pipeline.lineage import write_lineage

    policy.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)  # whole_state_dict's
    tokenizer.save_pretrained(out_dir)
    generation = policy.generation_config
    generation.eos_token_id = stop_token_ids(tokenizer, renderer)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out_dir)
    base, adapters, options = lineage_of(sft_dir)
    if trainable == "lora":
        write_lineage(out_dir, base, [*adapters, out_dir], options,
                      note=f"merge the earlier adapters into the base, then load the {stage} adapter on top")
    else:  # a full model folder: its own base, loaded with the SFT base's options (dtype, attention)
        write_lineage(out_dir, out_dir, [], options,
                      note="a full model: the SFT model with only lm_head trained (untied from the embeddings)")


def lineage_of(stage_dir: Path) -> tuple[str, list[Path], dict]:
    """(base, adapters, base options) of any model stage; a full model folder is its own base."""
    if (stage_dir / "lineage.json").is_file():
        return read_lineage(stage_dir)
    return str(stage_dir.resolve()), [], {}
