"""A model's hyperparameters in a GGUF file, as llama.cpp reads them: the rules `pipeline export --gguf` writes by
and the base stage's GGUF import reads back by (`complete_config`; `complete_gguf_tokenizer` does the same for the
special tokens and chat template transformers' GGUF tokenizer loader can drop).

llama.cpp is what a GGUF file means (the keys are its converter's), and its loader fills in what a file leaves out
with its own defaults (src/models/gemma2.cpp, gemma3.cpp: a sliding period of 2 or 6, soft caps 50 and 30, a
sliding rope base of 10,000). transformers' GGUF loader (5.x) maps only the sizes, the window and the global rope
base onto the config and takes its class defaults for the rest. Those defaults are Gemma-3 270M/1B's and Gemma-2
2B/9B's, so without `complete_config` the other Gemma files would load as other models, silently: Gemma-3 4B and
larger scale their global layers' positions by 8 (`rope.scaling`), the 27B models scale attention scores by
hidden/heads instead of head_dim, and a file may carry its own sliding layout, sliding rope base or soft caps.
Its Phi-3 mapping reads neither the rotary width (Phi-4-mini turns 3/4 of each head) nor the long-context rope
(Phi-3.5, Phi-3 128k, Phi-4-mini), so those would load with a full-width, unscaled rope; no mapping reads a YaRN
scaling (Qwen2.5 and Qwen3's long-context files) or Llama 3.1's per-dimension factors.
"""

from __future__ import annotations

import math

from pipeline.errors import PipelineError

GEMMA = ("gemma2", "gemma3_text")  # transformers' model types
# llama.cpp knows the 27B models by their layer count and scales their scores by 1/sqrt(hidden / heads)
TWENTY_SEVEN_B_LAYERS = {"gemma2": 46, "gemma3_text": 62}
DEFAULT_SLIDING_PERIOD = {"gemma2": 2, "gemma3_text": 6}  # llama.cpp's, where a file names no pattern


def llama_score_dim(config) -> int:
    """The d of the 1/sqrt(d) llama.cpp scales Gemma's attention scores by: head_dim, but hidden size / heads for
    the 27B models."""
    if TWENTY_SEVEN_B_LAYERS.get(config.model_type) == config.num_hidden_layers:
        return config.hidden_size // config.num_attention_heads
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_pattern(layer_types: list[str]) -> int | list[bool]:
    """Which layers slide, as llama.cpp reads it: a period p (layers slide but every p-th, Gemma's own layouts, which
    older llama.cpp versions read as their only form) where there is one, else one flag per layer."""
    sliding = [kind == "sliding_attention" for kind in layer_types]
    for period in range(1, len(sliding) + 2):  # period 1: none slides; len + 1: all do
        if sliding == [(index + 1) % period != 0 for index in range(len(sliding))]:
            return period
    return sliding


def layer_types(pattern: int | list, layers: int) -> list[str]:
    """sliding_pattern read back as llama.cpp does (llama_hparams::set_swa_pattern): one flag per layer, or a period
    p where layer i slides unless i % p == p - 1 (p = 0: every layer slides)."""
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise PipelineError(f"GGUF: the sliding-window pattern names {len(pattern)} layers, the model has {layers}")
        sliding = [bool(flag) for flag in pattern]
    else:
        sliding = [pattern == 0 or index % pattern < pattern - 1 for index in range(layers)]
    return ["sliding_attention" if flag else "full_attention" for flag in sliding]


# tensors by which llama.cpp rescales the rope per dimension (Llama 3.1+, DeciLM, Phi-3 long context) and
# transformers' GGUF loader drops; Gemma-4's rope_freqs encodes the proportional rope its config builds itself
ROPE_FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
ROPE_FROM_CONFIG = {"gemma4": ("rope_freqs.weight",)}
ROPE_READ_BY_TRANSFORMERS = ("gpt-oss", "gpt_oss")  # its loader rebuilds their rope scaling itself


def linear_rope_factor(architecture: str, fields: dict) -> float | None:
    """The factor llama.cpp divides positions by, or None: `rope.scaling.factor` (or the older `rope.scale_linear`)
    under a scaling type that is linear, as a file without a type is."""
    factor = fields.get(f"{architecture}.rope.scaling.factor") or fields.get(f"{architecture}.rope.scale_linear")
    linear = fields.get(f"{architecture}.rope.scaling.type", "linear") == "linear"
    return float(factor) if linear and factor and factor != 1 else None


# transformers configs that take a "yarn" rope, whose llama.cpp graphs scale a file's YaRN rope with llama.cpp's own
# beta_fast 32, beta_slow 1 and attention factor 0.1 ln(factor) + 1 (a file's yarn_* keys are not read for them):
# transformers' yarn with its defaults computes the same (Qwen2.5 and Qwen3's long-context files; tested on Llama)
YARN_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen2moe", "qwen3", "qwen3moe")  # general.architecture names


def file_yarn_rope(architecture: str, fields: dict) -> dict | None:
    """A file's YaRN scaling (`rope.scaling.type` yarn) as transformers' "yarn" rope, or None. As llama.cpp reads
    it: the original context defaults to the file's context length, and a factor of 1 or less turns nothing."""
    if architecture not in YARN_ARCHITECTURES or fields.get(f"{architecture}.rope.scaling.type") != "yarn":
        return None
    factor = fields.get(f"{architecture}.rope.scaling.factor") or fields.get(f"{architecture}.rope.scale_linear")
    if not factor or factor <= 1:
        return {"rope_type": "default"}
    original = fields.get(f"{architecture}.rope.scaling.original_context_length") \
        or fields.get(f"{architecture}.context_length")
    if not original:
        return None
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original)}


def llama3_rope_factors(rope: dict, dim: int) -> list[float]:
    """The per-dimension factors llama.cpp divides the rotary frequencies by (its rope_freqs tensor) for a "llama3"
    rope (Llama 3.1 and later), as its converter computes them (LlamaModel.generate_extra_tensors)."""
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    context = float(rope["original_max_position_embeddings"])
    factors = []
    for pair in range(dim // 2):
        wavelength = 2 * math.pi * float(rope["rope_theta"]) ** (2 * pair / dim)
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def llama3_rope_from_factors(factors: list[float], base: float, dim: int) -> dict | None:
    """The "llama3" rope parameters whose factors (llama3_rope_factors) are the file's rope_freqs, or None where no
    llama3 rope gives them (another model's per-dimension rope). The formula depends on the original context and the
    two band edges only through their ratios, so the context is the one that makes low_freq_factor 1, as Llama 3.1
    to 3.3 have it (8192 for all): their files come back with their configs' own parameters (tested)."""
    factor = max(factors, default=1.0)
    if len(factors) != dim // 2 or factor <= 1:
        return None
    # 1 / wavelength per pair (falling from the first pair, the fastest, to the last); in the band between the edges
    # the factor's inverse rises linearly in it from 1 / factor (at the low edge) to 1 (at the high edge)
    inverse = [1 / (2 * math.pi * base ** (2 * pair / dim)) for pair in range(dim // 2)]
    band = [(x, (1 / f - 1 / factor) / (1 - 1 / factor)) for x, f in zip(inverse, factors)
            if not math.isclose(f, 1, rel_tol=1e-5) and not math.isclose(f, factor, rel_tol=1e-5)]
    if len(band) >= 2:  # the line through the band's points: smooth = (x - low_edge) / (high_edge - low_edge)
        (x0, s0), (x1, s1) = band[0], band[-1]
        slope = (s1 - s0) / (x1 - x0)
        if slope <= 0:
            return None
        low_edge, high_edge = x0 - s0 / slope, x0 + (1 - s0) / slope
    else:  # no band (or one point): edges between the last scaled pair and the first unscaled one
        scaled = [x for x, f in zip(inverse, factors) if not math.isclose(f, 1, rel_tol=1e-5)]
        unscaled = [x for x, f in zip(inverse, factors) if math.isclose(f, 1, rel_tol=1e-5)]
        if not scaled or not unscaled or band:
            return None
        gap = min(unscaled) - max(scaled)
        low_edge, high_edge = max(scaled) + gap / 3, max(scaled) + gap * 2 / 3
    context = round(1 / low_edge)
    rope = {"rope_type": "llama3", "rope_theta": base, "factor": round(factor, 4),  # the file's float32 rounding off
            "low_freq_factor": round(context * low_edge, 4), "high_freq_factor": round(context * high_edge, 4),
            "original_max_position_embeddings": context}
    rebuilt = llama3_rope_factors(rope, dim)
    return rope if all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(rebuilt, factors)) else None


def _rotary_dims(architecture: str, fields: dict) -> int | None:
    """How many of a head's dimensions a file's rope turns: `rope.dimension_count`, else the whole head."""
    hidden, heads = fields.get(f"{architecture}.embedding_length"), fields.get(f"{architecture}.attention.head_count")
    dims = fields.get(f"{architecture}.rope.dimension_count") or (hidden // heads if hidden and heads else None)
    return int(dims) if dims else None


def longrope_attention_factor(scale: float, original: int) -> float:
    """The attention factor longrope scales the rope's output by where a config names none: what transformers
    computes and llama.cpp's converter writes, sqrt(1 + ln(scale) / ln(original context))."""
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


def file_llama3_rope(architecture: str, fields: dict, rope_factors: dict | None) -> dict | None:
    """A Llama file's llama3 rope (llama3_rope_from_factors of its rope_freqs), or None."""
    factors = (rope_factors or {}).get("rope_freqs.weight")
    dim = _rotary_dims(architecture, fields)
    if architecture != "llama" or factors is None or not dim:
        return None
    return llama3_rope_from_factors(factors, float(fields.get("llama.rope.freq_base", 10000.0)), dim)


def file_longrope(architecture: str, fields: dict, rope_factors: dict | None) -> dict | None:
    """A Phi-3 file's "longrope" (Phi-3.5, Phi-3 128k, Phi-4-mini): its long and short factor tensors, the original
    context llama.cpp switches between them at, and the attention factor where it is not the one transformers
    computes itself; None where the file has no such rope."""
    factors = rope_factors or {}
    long, short = factors.get("rope_factors_long.weight"), factors.get("rope_factors_short.weight")
    original = fields.get("phi3.rope.scaling.original_context_length")
    rotary = _rotary_dims(architecture, fields)
    if architecture != "phi3" or long is None or short is None or not original or not rotary \
            or not len(long) == len(short) == rotary // 2:
        return None
    rope = {"rope_type": "longrope", "rope_theta": float(fields.get("phi3.rope.freq_base", 10000.0)),
            "long_factor": long, "short_factor": short, "original_max_position_embeddings": int(original)}
    default = longrope_attention_factor(fields.get("phi3.context_length", original) / original, int(original))
    stored = fields.get("phi3.rope.scaling.attn_factor", 1.0)  # llama.cpp's where the file names none
    if not math.isclose(stored, default, rel_tol=1e-6):  # the file's float32 rounding off
        rope["attention_factor"] = float(stored)
    return rope


def partial_rotary_factor(architecture: str, fields: dict) -> float | None:
    """The share of each head the rope turns where a file says it is not all of it (`rope.dimension_count`)."""
    hidden, heads = fields.get(f"{architecture}.embedding_length"), fields.get(f"{architecture}.attention.head_count")
    rotary = fields.get(f"{architecture}.rope.dimension_count")
    if not (hidden and heads and rotary) or rotary == hidden // heads:
        return None
    share = rotary / (hidden // heads)
    if int(hidden // heads * share) != rotary:  # transformers turns int(head_dim * share) dimensions
        raise PipelineError(f"GGUF: this {architecture} file turns {rotary} of each head's {hidden // heads} "
                            "dimensions, which transformers' share of the head cannot give exactly")
    return share


def require_readable_rope(architecture: str, fields: dict, tensor_names, where: str = "GGUF",
                          rope_factors: dict | None = None) -> None:
    """One line for a GGUF file whose rope transformers' GGUF loader would drop and a config cannot be completed
    with: a scaling other than linear (or YaRN on the architectures file_yarn_rope reads), or llama.cpp's
    per-dimension factors unless they are a llama3 rope's or a Phi-3 longrope's (`rope_factors`: the file's factor
    tensors' values)."""
    if architecture in ROPE_READ_BY_TRANSFORMERS:
        return
    scaling = fields.get(f"{architecture}.rope.scaling.type", "linear")
    dropped = [name for name in ROPE_FACTOR_TENSORS
               if name in tensor_names and name not in ROPE_FROM_CONFIG.get(architecture, ())
               and not (name == "rope_freqs.weight" and file_llama3_rope(architecture, fields, rope_factors))
               and not (name != "rope_freqs.weight" and file_longrope(architecture, fields, rope_factors))]
    attention = fields.get(f"{architecture}.rope.scaling.attn_factor", 1.0)
    if attention != 1.0 and architecture != "phi3":  # llama.cpp multiplies every rope by it
        raise PipelineError(f"{where}: this {architecture} file scales its rope's output by {attention} "
                            "(rope.scaling.attn_factor), which transformers' GGUF loader does not read; give "
                            "base.path the model's hub id or safetensors folder instead")
    if (scaling in ("none", "linear") or file_yarn_rope(architecture, fields)) and not dropped:
        return
    what = f"rope scaling {scaling!r}" if scaling not in ("none", "linear") else \
        f"per-dimension rope factors ({dropped[0]}; a Llama file's are read where they are a llama3 rope's, a " \
        "Phi-3 file's where it has both the long and the short ones)"
    raise PipelineError(f"{where}: this {architecture} file scales its rope with {what}, which transformers' GGUF "
                        "loader does not read; give base.path the model's hub id or safetensors folder instead")


def complete_config(config, fields: dict, tensor_names: set[str], rope_factors: dict | None = None):
    """`config` (transformers' reading of a GGUF file) with what its loader leaves out taken from the file's header
    `fields` (and its rope factor tensors' values, `rope_factors`) as llama.cpp reads them; a one-line PipelineError
    for a rope scaling transformers cannot represent."""
    model_type = config.model_type
    arch = fields.get("general.architecture") or {"gemma3_text": "gemma3"}.get(model_type, model_type)

    def field(key, default=None):
        return fields.get(f"{arch}.{key}", default)

    require_readable_rope(arch, fields, tensor_names, rope_factors=rope_factors)
    if arch in ROPE_READ_BY_TRANSFORMERS:
        return config
    key_length = field("attention.key_length")
    if key_length and getattr(config, "head_dim", None) not in (None, key_length):
        config.head_dim = int(key_length)  # Qwen3's loader mapping leaves its class default, 128
    llama3 = file_llama3_rope(arch, fields, rope_factors)
    if llama3:  # Llama 3.1+: transformers' loader drops the rope_freqs tensor and would run an unscaled rope
        if linear_rope_factor(arch, fields) or file_yarn_rope(arch, fields):
            raise PipelineError("GGUF: this llama file scales its rope twice (rope_freqs and a rope.scaling "
                                "factor), which transformers cannot represent")
        config.rope_parameters = llama3
        return config
    factor = linear_rope_factor(arch, fields)
    if arch == "phi3":  # sliding_window stays unset: llama.cpp's Phi-3 attends to the whole context
        partial = partial_rotary_factor(arch, fields)
        longrope = file_longrope(arch, fields, rope_factors)
        if longrope and factor:
            raise PipelineError("GGUF: this phi3 file scales its rope twice (long-context factors and a linear "
                                "factor), which transformers cannot represent")
        config.rope_parameters = {**(config.rope_parameters or {}), **(longrope or {}),
                                  **({"partial_rotary_factor": partial} if partial else {})}
        if longrope:
            config.original_max_position_embeddings = longrope["original_max_position_embeddings"]
    linear = {"rope_type": "linear", "factor": factor} if factor else None
    if model_type not in GEMMA:
        scaling = linear or file_yarn_rope(arch, fields)  # the loader maps neither
        if scaling:
            config.rope_parameters = {**(config.rope_parameters or {}), **scaling}
        return config

    base = float(field("rope.freq_base", 10000.0))
    swa = field("attention.sliding_window") if model_type == "gemma3_text" else field("attention.sliding_window", 4096)
    pattern = field("attention.sliding_window_pattern", DEFAULT_SLIDING_PERIOD[model_type]) if swa else 1
    config.layer_types = layer_types(pattern, config.num_hidden_layers)
    if swa:
        config.sliding_window = int(swa)
    if model_type == "gemma2":
        if field("rope.freq_base_swa", base) != base:
            raise PipelineError("GGUF: this gemma2 file gives its sliding layers their own rope base, which "
                                "transformers' Gemma-2 cannot represent")
        config.rope_parameters = {"rope_type": "default", "rope_theta": base, **(linear or {})}
        config.attn_logit_softcapping = float(field("attn_logit_softcapping", 50.0))
        config.final_logit_softcapping = float(field("final_logit_softcapping", 30.0))
    else:
        config.rope_parameters = {
            "full_attention": {"rope_type": "default", "rope_theta": base, **(linear or {})},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(field("rope.freq_base_swa", 10000.0))}}
        softcap = field("final_logit_softcapping")
        config.final_logit_softcapping = float(softcap) if softcap else None
    # the file's queries are scaled for llama.cpp's 1/sqrt(d) (gguf_export folds any other scale into them)
    config.query_pre_attn_scalar = llama_score_dim(config)
    return config


GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
                       "unk_token": "unknown_token_id"}


def complete_gguf_tokenizer(tokenizer, fields: dict) -> None:
    """What transformers' GGUF tokenizer loader can leave out, from the file's header where the tokenizer has none:
    the begin/end/padding/unknown tokens (dropped for a byte-level BPE file, such as `pipeline export --gguf`
    writes) and the chat template (which `check` reports the run will use)."""
    for name, key in GGUF_SPECIAL_TOKENS.items():
        index = fields.get(f"tokenizer.ggml.{key}")
        if getattr(tokenizer, name) is None and index is not None and index < len(tokenizer):
            tokenizer.add_special_tokens({name: tokenizer.convert_ids_to_tokens(index)})  # in the vocabulary: same id
    if not tokenizer.chat_template:
        tokenizer.chat_template = fields.get("tokenizer.chat_template")
