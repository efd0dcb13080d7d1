"""A causal LM as one GGUF file, the format llama.cpp, ollama and LM Studio run.

Written with the `gguf` package (llama.cpp's own writer); the tensor names come from its name map.
What is by hand, and why: llama.cpp's converter (convert_hf_to_gguf.py) is a script in its
repository, not a package, so the few steps it takes for the architectures we train are repeated here:
- Llama's q_proj and k_proj rows are reordered from transformers' rotate-half rotary layout to
  the interleaved pairs llama.cpp rotates (`_permute`; transformers' GGUF loader undoes it);
- Gemma's norms are stored as 1 + w (llama.cpp multiplies by the stored weight), and its queries carry the
  difference between transformers' 1/sqrt(query_pre_attn_scalar) score scale and llama.cpp's (1/sqrt(head_dim)
  but for the 27B models); which layers slide goes in as a period (Gemma's layouts) or layer by layer, Gemma-3's
  sliding layers get their own rope base, and linear rope scaling (Gemma-3 4B and larger, on the global layers) the
  factor llama.cpp applies; Llama 3.1's "llama3" rope goes in as the per-dimension factors its converter computes
  (the rope_freqs tensor), a Llama's YaRN rope as its scaling type, factor and original context (llama.cpp scales it
  with the betas and attention factor transformers' yarn defaults to, so other ones are refused); Phi-3's fused qkv
  and gate-up matrices go in whole (llama.cpp splits them), and its long-context "longrope" as the long and short
  factor tensors, the original context and the attention factor
  (Phi3MiniModel in the converter), the rotary width as `rope.dimension_count` (Phi-4-mini rotates 3/4 of a head);
- the vocabulary goes in as the tokenizer is built: a byte-level BPE (what the tokenizer stage trains, Llama 3's,
  Qwen's) as llama.cpp's "gpt2" with its merges and the pre-tokenizer named by its split regex, a BPE with byte
  fallback (Gemma's and Llama-2's SentencePiece vocabulary) as its "llama" with the scores that order its merges;
  special tokens are control tokens, so text never turns into one; the end-of-turn token is the end-of-generation
  token, and the chat template travels in the file.

Llama, Gemma-2, Gemma-3 (the architectures `pretrain` builds and the Gemma bases), Phi-3, Qwen2 and Qwen3 are written;
anything else gets a clear error naming llama.cpp's converter, which handles the rest from the merged folder
`pipeline export` writes.
tests/test_export.py reads files back with transformers' GGUF loader and, where llama-cpp-python is installed, runs
them in llama.cpp (ids, logits, a chat reply through the file's template).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.gguf_hparams import (
    GEMMA,
    llama3_rope_factors,
    llama_score_dim,
    longrope_attention_factor,
    sliding_pattern,
)

# transformers model_type -> gguf.MODEL_ARCH member
ARCHITECTURES = {"llama": "LLAMA", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3", "phi3": "PHI3", "qwen2": "QWEN2",
                 "qwen3": "QWEN3"}
NEOX = ("phi3", "qwen2", "qwen3")  # rotary in transformers' own rotate-half order in llama.cpp: no permutation
# the dtype asked for -> what the 2-D weights are written as (vectors, such as norms, stay float32 as llama.cpp
# keeps them)
TENSOR_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}
# what `quantization` may ask for: the types gguf's own quantizer writes that llama.cpp's converter offers (its
# --outtype); the k-quants (Q4_K_M, ...) are llama.cpp's llama-quantize tool's job, run on the file this writes
QUANTIZATIONS = {"q8_0": "Q8_0"}
# the split regex of a byte-level BPE whose tokenizer.json splits with a Split before a ByteLevel that does not
# (Llama 3's, Qwen's) -> llama.cpp's pre-tokenizer with that regex (src/llama-vocab.cpp). llama.cpp's converter recognises a
# tokenizer by hashing its output on a test text; the regex itself is matched here, so another one is refused, not
# split otherwise
SPLIT_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
}


def require_writable(model_type: str) -> None:
    """One clear line for an architecture this module does not write."""
    if model_type not in ARCHITECTURES:
        raise PipelineError(f"GGUF export writes {', '.join(ARCHITECTURES)} models (what pretrain builds, the "
                            f"Gemma bases, Phi-3 and Qwen); this model is {model_type}. Export it without --gguf and "
                            "convert that folder with llama.cpp's convert_hf_to_gguf.py")


def write_gguf(model, tokenizer, path: Path, end_of_turn_id: int | None, name: str,
               quantization: str | None = None) -> bool:
    """Write `model` (a merged causal LM) and its tokenizer to `path`, its matrices in the model's dtype or, with
    `quantization` ("q8_0"), quantized (a matrix whose rows do not split into 32-value blocks stays in the dtype);
    `name` is what llama.cpp and ollama show as the model's name. Returns the file's add_bos (`adds_bos`)."""
    import gguf

    config = model.config
    require_writable(config.model_type)
    arch_name = ARCHITECTURES[config.model_type]
    tensor_type = TENSOR_TYPES.get(model.dtype)
    if tensor_type is None:
        raise PipelineError(f"GGUF export writes float32, float16 or bfloat16 weights, not {model.dtype}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise PipelineError(f"GGUF export quantizes to {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    quantized = getattr(gguf.GGMLQuantizationType, QUANTIZATIONS[quantization]) if quantization else None
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    if not getattr(config, "tie_word_embeddings", False) and gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[arch]:
        raise PipelineError(f"GGUF export: llama.cpp's {arch_name.lower()} reads its output layer from the embeddings, "
                            "and this model's lm_head is its own (untied); the file would compute other logits")
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    file_type = FILE_TYPES[quantized.name if quantized is not None else tensor_type]
    _hyperparameters(writer, config, getattr(gguf.LlamaFileType, file_type))
    add_bos = _vocabulary(writer, tokenizer, config.vocab_size, end_of_turn_id)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in _tensors(model):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PipelineError(f"GGUF export: no GGUF name for the tensor {hf_name}")
        data = tensor.detach().to("cpu")
        block = gguf.GGML_QUANT_SIZES[quantized][0] if quantized is not None else 0
        if data.ndim == 2 and block and data.shape[-1] % block == 0:
            # a few thousand rows at a time: quantize's float32 temporaries of a whole 256k-row embedding are GBs
            chunks = [gguf.quants.quantize(rows.float().numpy(), quantized) for rows in data.split(4096)]
            writer.add_tensor(gguf_name, np.concatenate(chunks), raw_dtype=quantized)
        elif data.ndim == 1 or tensor_type == "F32":
            writer.add_tensor(gguf_name, data.float().numpy())
        elif tensor_type == "F16":
            writer.add_tensor(gguf_name, data.half().numpy())
        else:  # numpy has no bfloat16: the raw 16-bit words, typed BF16
            writer.add_tensor(gguf_name, data.bfloat16().view(torch.int16).numpy(),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp's converter writes Llama 3.1's rope as per-dimension factors
        factors = np.array(llama3_rope_factors(rope, _head_dim(config)), dtype=np.float32)
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
    elif rope.get("rope_type") == "longrope":  # Phi-3's: llama.cpp picks one set by the context it runs with
        for kind, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                          (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")):
            writer.add_tensor(gguf.TENSOR_NAMES[kind] + ".weight", np.array(rope[key], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return add_bos


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> tuple[float, float | None, float | None]:
    """(rope base of the global layers, of the sliding ones or None, linear scaling factor or None). Linear scaling
    (positions divided by the factor; Gemma-3 4B and larger scale their global layers by 8) is what llama.cpp reads
    from the file, as `rope.scaling.factor`, and applies to every layer but Gemma-3's sliding ones, so that is what is
    written; Llama's "llama3" rope goes in as a tensor (write_gguf); other scalings, or scaled sliding layers, are
    refused."""
    rope = getattr(config, "rope_parameters", None) or {}
    per_layer_type = {key: value for key, value in rope.items() if isinstance(value, dict)}  # Gemma-3's layout
    scaled = per_layer_type.get("full_attention", rope)  # the layers llama.cpp scales
    for layers, params in (per_layer_type or {"": rope}).items():
        kind = params.get("rope_type", "default")
        # written as tensors by write_gguf: Llama 3.1's rope_freqs, Phi-3's long and short factors
        as_tensors = (kind, config.model_type) in (("llama3", "llama"), ("longrope", "phi3"))
        if kind == "yarn" and config.model_type in ("llama", "qwen2", "qwen3"):
            _require_llama_cpps_yarn(params)
            continue
        if kind != "default" and not (kind == "linear" and params is scaled) and not as_tensors:
            where = f" on the {layers.replace('_', ' ')} layers" if layers else ""
            raise PipelineError(f"GGUF export: rope scaling {kind!r}{where} is not written; export without --gguf "
                                "and convert with llama.cpp's convert_hf_to_gguf.py")
    factor = float(scaled["factor"]) if scaled.get("rope_type") == "linear" else None
    if per_layer_type:
        return (float(per_layer_type["full_attention"]["rope_theta"]),
                float(per_layer_type["sliding_attention"]["rope_theta"]) if "sliding_attention" in per_layer_type
                else None, factor)
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))), None, factor


def _hyperparameters(writer, config, file_type) -> None:
    import gguf

    head_dim = _head_dim(config)
    rope_base, sliding_rope_base, rope_factor = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(_rotary_dim(config))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_base)
    if rope_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_factor)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "yarn":  # as llama.cpp's converter writes it (TextModel.set_gguf_parameters)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    if config.model_type == "phi3":
        _phi3_hyperparameters(writer, config)
    elif config.model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        raise PipelineError(f"GGUF export: this {config.model_type} model slides its attention window, which "
                            "llama.cpp's does not; it would compute other logits there")
    elif config.model_type == "gemma2":  # what llama.cpp's Gemma2Model writes besides
        unset = [key for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window")
                 if not getattr(config, key, None)]
        if unset:  # llama.cpp puts its own defaults (50, 30, 4096) where the file names none: other logits
            raise PipelineError(f"GGUF export: this Gemma-2 model has no {', '.join(unset)}, which llama.cpp "
                                "always applies; it would compute other logits there")
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern(sliding_pattern(config.layer_types))
    elif config.model_type == "gemma3_text":
        if getattr(config, "attn_logit_softcapping", None) or getattr(config, "use_bidirectional_attention", False):
            raise PipelineError("GGUF export: llama.cpp's Gemma-3 has no attention softcap and attends causally; "
                                "this model has " + ("an attention softcap" if config.attn_logit_softcapping
                                                     else "bidirectional attention"))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if any(kind == "sliding_attention" for kind in config.layer_types):
            writer.add_sliding_window(config.sliding_window)
            writer.add_sliding_window_pattern(sliding_pattern(config.layer_types))
            writer.add_rope_freq_base_swa(sliding_rope_base or rope_base)
    if config.model_type in (*GEMMA, "qwen3"):  # a head_dim of its own (Qwen3: 128 whatever hidden / heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _require_llama_cpps_yarn(params: dict) -> None:
    """A YaRN rope llama.cpp's Llama computes: it applies beta_fast 32, beta_slow 1, the attention factor
    0.1 ln(factor) + 1 and truncated correction dimensions whatever a file says, as transformers' yarn does by
    default; a rope that sets them otherwise would run differently there."""
    others = {key: params[key] for key in ("attention_factor", "mscale", "mscale_all_dim") if params.get(key)}
    others.update({key: params[key] for key, default in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True))
                   if params.get(key) is not None and params[key] != default})
    if others or not params.get("factor") or not params.get("original_max_position_embeddings"):
        what = ", ".join(f"{key} {value}" for key, value in others.items()) or "no factor or original context"
        raise PipelineError(f"GGUF export: this model's YaRN rope has {what}, which llama.cpp's llama does not "
                            "apply; export without --gguf")


def _rotary_dim(config) -> int:
    """How many of a head's dimensions the rope turns (llama.cpp's n_rot): Phi-3's share of it (Phi-4-mini: 3/4);
    the whole head for the others, whose transformers classes turn it all whatever the config says."""
    if config.model_type != "phi3":
        return _head_dim(config)
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor") or 1.0
    return int(_head_dim(config) * partial)


def _phi3_hyperparameters(writer, config) -> None:
    """What llama.cpp's Phi3MiniModel writes besides: the original context (where longrope switches to its long
    factors), the sliding window (0 for none) and longrope's attention factor (the one transformers computes where the
    config names none). llama.cpp's Phi-3 ignores the window (it attends to the whole context and says so when it
    loads the file), as its converter's files have it: Phi-3-mini-4k's 2,047-token window makes a difference only
    past 2,047 tokens."""
    rope = config.rope_parameters or {}
    original = rope.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None) or config.max_position_embeddings
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    if rope.get("rope_type") == "longrope":
        default = longrope_attention_factor(rope.get("factor") or config.max_position_embeddings / original, original)
        writer.add_rope_scaling_attn_factors(float(rope.get("attention_factor") or default))


def _tensors(model):
    """(transformers name, tensor) in file order, as llama.cpp computes with them; no tied output copy."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tied = getattr(config, "tie_word_embeddings", False)
    gemma = config.model_type in GEMMA
    # llama.cpp scales the scores by 1/sqrt(llama_score_dim); transformers by 1/sqrt(query_pre_attn_scalar): the
    # queries carry the difference, so the scores (and Gemma-2's softcap on them) come out the same. Gemma-3 norms
    # its queries (q_norm) before the scale, so the factor goes there; Gemma-2 has no q_norm and takes it in q_proj.
    query_scale = (llama_score_dim(config) / config.query_pre_attn_scalar) ** 0.5 if gemma else 1.0
    query_tensors = ("self_attn.q_norm.weight",) if config.model_type == "gemma3_text" \
        else ("self_attn.q_proj.weight", "self_attn.q_proj.bias")
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the embedding matrix when the file has no output.weight
        if gemma:
            if name.endswith("norm.weight"):
                tensor = tensor.float() + 1  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by the stored w
            if name.endswith(query_tensors) and query_scale != 1.0:
                tensor = tensor * query_scale
            yield name, tensor  # rotary in llama.cpp's NEOX order, which is transformers' own: no permutation
            continue
        if config.model_type in NEOX:  # Phi-3's qkv_proj and gate_up_proj stay fused as llama.cpp reads them
            yield name, tensor
            continue
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            tensor = _permute(tensor, heads)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            tensor = _permute(tensor, kv_heads)
        yield name, tensor


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from (first halves, second halves) to interleaved pairs, as llama.cpp's converter does."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _vocabulary(writer, tokenizer, vocab_size: int, end_of_turn_id: int | None) -> bool:
    """Write the vocabulary and its special ids; returns the add_bos written."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = backend["model"], backend.get("pre_tokenizer") or {}
    byte_level = _byte_level(backend)
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise PipelineError("GGUF export writes a byte-level BPE that splits text as GPT-2 (what the tokenizer stage "
                            "trains), Llama 3 or Qwen do, or a BPE with byte fallback (Gemma's, Llama-2's); this tokenizer "
                            f"is a {model.get('type')} that splits text otherwise (pre-tokenizer {pre.get('type')}), "
                            "which llama.cpp is not known here to reproduce; export without --gguf")
    # NFC (Qwen's): llama.cpp does not apply it, as in the files its converter writes; text already in NFC, as
    # typed text almost always is, splits the same, a decomposed accent does not
    if byte_level and backend.get("normalizer") and backend["normalizer"] != {"type": "NFC"}:
        raise PipelineError(f"GGUF export: this tokenizer's normalizer {json.dumps(backend['normalizer'])[:80]}, "
                            "which llama.cpp's byte-level BPE does not apply (it would split text into other ids); "
                            "export without --gguf")
    added_tokens = backend.get("added_tokens") or []
    ids = [*model["vocab"].values(), *(added["id"] for added in added_tokens)]
    if max(ids) >= vocab_size:
        raise PipelineError(f"GGUF export: the tokenizer has token id {max(ids)}, past the model's {vocab_size} "
                            "embedding rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows the vocabulary does not fill, as llama.cpp pads them
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in added_tokens:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, list) else m.split(" ", 1) for m in model.get("merges") or []]  # pairs
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(byte_level)  # the split regex by llama.cpp's name for it
        writer.add_token_merges([" ".join(pair) for pair in merges])
    else:
        for index, token in enumerate(tokens):
            if types[index] == gguf.TokenType.NORMAL and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                types[index] = gguf.TokenType.BYTE  # what byte fallback spells a byte as
        writer.add_tokenizer_model("llama")  # llama.cpp's SentencePiece-style tokenizer
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_merge_scores(tokens, types, merges))
        writer.add_add_space_prefix(_adds_space_prefix(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (end_of_turn_id, writer.add_eot_token_id)):
        if token_id is not None:
            add(token_id)
    add_bos = adds_bos(tokenizer, backend)
    writer.add_add_bos_token(add_bos)
    if tokenizer.chat_template:
        # {% generation %} only marks the trained tokens for TRL; llama.cpp's template engine does not know the tag
        writer.add_chat_template(re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tokenizer.chat_template))
    return add_bos


def _byte_level(backend: dict) -> str | None:
    """llama.cpp's pre-tokenizer for a byte-level BPE's splitting: "gpt-2" for a ByteLevel pre-tokenizer that
    splits with GPT-2's regex (what the tokenizer stage trains), a SPLIT_PRE_TOKENIZERS name for a known Split regex
    before a ByteLevel that does not split (Llama 3's, Qwen's); None for anything else."""
    pre = backend.get("pre_tokenizer") or {}
    # llama.cpp's llama-bpe takes a word the vocabulary holds whole (ignore_merges), its gpt-2 merges it
    ignores_merges = bool((backend.get("model") or {}).get("ignore_merges"))
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2" if not ignores_merges else None
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated" \
            and not parts[0].get("invert") and parts[1].get("type") == "ByteLevel" \
            and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space"):
        name = SPLIT_PRE_TOKENIZERS.get((parts[0].get("pattern") or {}).get("Regex"))
        return name if name and ignores_merges == (name == "llama-bpe") else None
    return None


def adds_bos(tokenizer, backend: dict | None = None) -> bool:
    """The file's add_bos: whether llama.cpp puts the begin-of-text token before a prompt. Not for the byte-level
    vocabulary the tokenizer stage trains (our chat template writes it); for another as transformers adds it to raw
    text (Llama 3's and SentencePiece ones; llama.cpp drops a chat template's own copy then)."""
    if _byte_level(backend or json.loads(tokenizer.backend_tokenizer.to_str())) == "gpt-2":
        return False
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def _merge_scores(tokens: list[str], types: list, merges: list[list[str]]) -> list[float]:
    """Scores for llama.cpp's SentencePiece-style tokenizer, which repeatedly merges the adjacent pair whose union has
    the highest score: ordered as tokenizer.json's merges produce the tokens (the earliest merge scores highest), so
    it splits text as transformers does. Tokens no merge produces (single characters) follow, in id order; bytes
    score 0 and control or user-defined tokens -1000, as SentencePiece's own GGUFs have them (a Gemma GGUF's scores
    are exactly these)."""
    import gguf

    first_merge: dict[str, int] = {}
    for rank, pair in enumerate(merges):
        first_merge.setdefault("".join(pair), rank)
    normal = [index for index, kind in enumerate(types) if kind == gguf.TokenType.NORMAL]
    normal.sort(key=lambda index: (first_merge.get(tokens[index], len(merges)), index))
    scores = [0.0 if kind == gguf.TokenType.BYTE else -1000.0 for kind in types]
    for order, index in enumerate(normal):
        scores[index] = -float(order)
    return scores


def _adds_space_prefix(backend: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text as SentencePiece does, which llama.cpp's add_space_prefix
    repeats: always (Llama-2's Prepend normalizer) or never (Gemma). A Metaspace pre-tokenizer that prepends (newer
    Llama and Mistral tokenizer.json files) skips text that already starts with a space and text after a special
    token, which llama.cpp does not: refused, or a chat prompt would reach the model as other ids."""
    def parts(component):
        if not component:
            return []
        nested = [part for key in ("normalizers", "pretokenizers") for part in component.get(key) or []]
        return nested if component.get("type") == "Sequence" else [component]

    def refuse(what: str):
        raise PipelineError(f"GGUF export: this tokenizer's {what}, which llama.cpp's SentencePiece-style tokenizer "
                            "does not copy (it would split text into other ids); export without --gguf and convert "
                            "with llama.cpp's convert_hf_to_gguf.py (it reads tokenizer.model)")

    for part in parts(backend.get("normalizer")):  # what llama.cpp does: spaces to '▁', and the prefix
        spaces = part.get("type") == "Replace" and part.get("pattern") == {"String": " "} and part.get("content") == "▁"
        if not spaces and not (part.get("type") == "Prepend" and part.get("prepend") == "▁"):
            refuse(f"normalizer {part.get('type')} {json.dumps(part)[:80]}")
    for part in parts(backend.get("pre_tokenizer")):
        kind = part.get("type")
        prepends = part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
        if kind == "Metaspace" and prepends:
            refuse(f"Metaspace pre-tokenizer adds '▁' before the text ({part.get('prepend_scheme', 'always')!r}, "
                   "not before text that starts with a space)")
        if kind == "Metaspace" and part.get("split", True):
            refuse("Metaspace pre-tokenizer splits the text at spaces")
        if kind not in ("Metaspace", "Split") or kind == "Split" and part.get("pattern") != {"String": " "}:
            refuse(f"pre-tokenizer {kind} {json.dumps(part)[:80]}")  # Gemma's Split(" ") sees no space after '▁'
    return any(part.get("type") == "Prepend" for part in parts(backend.get("normalizer")))
