"""A model's hyperparameters in a GGUF file, as llama.cpp reads them: the rules `pipeline export --gguf` writes by
and the base stage's GGUF import reads back by.

llama.cpp is what a GGUF file means (the keys are its converter's), and its loader fills in what a file leaves out
with its own defaults (src/models/gemma2.cpp, gemma3.cpp: a sliding period of 2 or 6, soft caps 50 and 30, a
sliding rope base of 10,000). transformers' GGUF loader (5.x) maps only the sizes, the window and the global rope
base onto the config and takes its class defaults for the rest. Those defaults are Gemma-3 270M/1B's and Gemma-2
2B/9B's, so without `complete_config` the other Gemma files would load as other models, silently: Gemma-3 4B and
larger scale their global layers' positions by 8 (`rope.scaling`), the 27B models scale attention scores by
hidden/heads instead of head_dim, and a file may carry its own sliding layout, sliding rope base or soft caps.
"""

from __future__ import annotations

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


def require_readable_rope(architecture: str, fields: dict, tensor_names, where: str = "GGUF") -> None:
    """One line for a GGUF file whose rope transformers' GGUF loader would drop and a config cannot be completed
    with: a scaling other than linear, or llama.cpp's per-dimension factors (Llama 3.1's rope_freqs tensor)."""
    scaling = fields.get(f"{architecture}.rope.scaling.type")
    if scaling not in (None, "none", "linear") or "rope_freqs.weight" in tensor_names:
        what = f"rope scaling {scaling!r}" if scaling not in (None, "none", "linear") else \
            "per-dimension rope factors (a rope_freqs tensor, as Llama 3.1 and later files have)"
        raise PipelineError(f"{where}: this {architecture} file scales its rope with {what}, which transformers' GGUF "
                            "loader does not read; give base.path the model's hub id or safetensors folder instead")


def complete_config(config, fields: dict, tensor_names: set[str]):
    """`config` (transformers' reading of a GGUF file) with what its loader leaves out taken from the file's header
    `fields` as llama.cpp reads them; a one-line PipelineError for a rope scaling transformers cannot represent."""
    model_type = config.model_type
    arch = {"gemma3_text": "gemma3"}.get(model_type, model_type)

    def field(key, default=None):
        return fields.get(f"{arch}.{key}", default)

    require_readable_rope(arch, fields, tensor_names)
    scaling, factor = field("rope.scaling.type"), field("rope.scaling.factor")
    linear = {"rope_type": "linear", "factor": float(factor)} if scaling == "linear" and factor else None
    if model_type not in GEMMA:
        if linear:
            config.rope_parameters = {**(config.rope_parameters or {}), **linear}
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
