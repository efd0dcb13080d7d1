"""Where models come from: built from scratch from a config, or loaded from a hub id / local folder.

Weights are loaded from safetensors only, and remote code only runs when the recipe says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.lineage import read_lineage, require_current
from pipeline.recipe import BaseModelConfig, ModelConfig


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


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
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


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


def lora_config(args):
    """A peft LoraConfig from the recipe's LoraArgs (W x + (alpha/r) B A x, B zero at the start)."""
    from peft import LoraConfig

    targets = args.target_modules
    return LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=args.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def resolve_dtype(name: str, device_type: str = "cpu") -> torch.dtype:
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_attention(config, requested: str | None) -> str:
    """The recipe's choice, else eager for Gemma (its logit soft-capping; sdpa is refused on the CPU), else sdpa."""
    return requested or ("eager" if config.model_type.startswith("gemma") else "sdpa")


def load_base_model(cfg: BaseModelConfig, device_type: str = "cpu"):
    """A pretrained causal LM and its tokenizer from a local folder or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = Path(cfg.path)
    if not local.exists() and (cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") != 1):
        raise PipelineError(f"base.path: no such folder and not a hub id (owner/name): {cfg.path}")
    source = str(local) if local.exists() else cfg.path
    revision = None if local.exists() else cfg.revision
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=cfg.trust_remote_code)
        attn = default_attention(config, cfg.attn_implementation)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=revision,
            dtype=resolve_dtype(cfg.dtype, device_type),
            attn_implementation=attn,
            use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
        )
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        offline = " (no network here? set HF_HUB_OFFLINE=1 and use a local folder)" if not local.exists() else ""
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"base.path: cannot load {cfg.path}: {first_line}{offline}") from None
    return model, tokenizer


def load_stage_model(stage_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A stage's model and tokenizer: a full model folder, or base + chain of adapters from lineage.json.

    Earlier adapters are merged into the weights in order (as training saw them); the last stays a
    PeftModel, so `disable_adapter()` gives that stage's reference model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage_dir = Path(stage_dir)
    require_current(stage_dir)
    if not (stage_dir / "lineage.json").is_file():
        if not (stage_dir / "config.json").is_file():
            raise PipelineError(f"{stage_dir}: neither a model folder (config.json) nor an adapter stage (lineage.json)")
        model = AutoModelForCausalLM.from_pretrained(stage_dir, dtype=dtype, use_safetensors=True)
        return model, AutoTokenizer.from_pretrained(stage_dir)
    base, adapters, options = read_lineage(stage_dir)
    # the base exactly as training loaded it: same revision, same remote-code permission, same attention
    from transformers import AutoConfig

    options = {k: v for k, v in options.items() if v is not None}
    if Path(base).is_dir():
        options.pop("revision", None)
    config = AutoConfig.from_pretrained(base, revision=options.get("revision"),
                                        trust_remote_code=options.get("trust_remote_code", False))
    options["attn_implementation"] = default_attention(config, options.get("attn_implementation"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True, **options)
    for adapter in adapters[:-1]:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = PeftModel.from_pretrained(model, adapters[-1])
    return model, AutoTokenizer.from_pretrained(stage_dir)
