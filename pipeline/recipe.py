"""Recipes: YAML mapped onto small typed dataclasses, one per concern.

Precedence: dataclass defaults < recipe YAML < command-line `key=value` overrides.
Every field has a default (or is required) and a one-line doc; `pipeline check --explain` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml

from pipeline.config_schema import Reads, apply_override, build, closest, data_paths, option, printable
from pipeline.data.formats import FORMATS
from pipeline.errors import PipelineError

# AdamW moves every weight by about the learning rate each step, whatever the gradient's size
LR_WHY = "an AdamW step moves each weight by about the learning rate: above 1 training only destroys the model"
# sft, dpo and reward: TRL's collators pad each micro-batch up to this multiple
PAD_TO_MULTIPLE_OF_DOC = ("pad each micro-batch's length up to a multiple of this (0 = to its longest row). Fewer "
                          "distinct shapes mean fewer cached kernels: on a bf16 CPU 8 saved 50-85 MB of peak memory "
                          "at the same speed (bench)")

# reward stands beside dpo (both start from the SFT model); it comes after dpo so existing runs keep their order.
# rl starts from the SFT model too, and comes after reward because it may score its replies with the reward model.
# how each stage reads the files its data fields name (`check`, and every run before its first stage, read them
# the same way, so a bad record in a later stage's data stops the run before hours of earlier stages)
TEXT = Reads("text")
CONVERSATIONS = Reads("conversation")
TRAIN_CONVERSATIONS = Reads("conversation", fmt="format", on_bad="on_bad_record")
TRAIN_PAIRS = Reads("preference", fmt="format", on_bad="bad_pairs")
HELD_OUT_PAIRS = Reads("preference", on_bad="drop")  # pair stages and eval drop (and count) bad held-out pairs
STAGE_ORDER = ("tokenizer", "pretrain", "base", "sft", "dpo", "reward", "rl", "eval")
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

# transformers' scheduler names (`transformers.trainer_utils.SchedulerType`, 5.x). Importing transformers takes
# seconds, so `check` uses this copy; tests/test_bad_inputs.py pins it equal to the installed library's list.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
# ... and the ones the sft/dpo stages cannot drive: they need trainer settings the stages do not pass
_NEEDS_EVAL = "it needs an evaluation strategy, and the stage evaluates only before and after training"
_NEEDS_KWARGS = "it needs {} in lr_scheduler_kwargs, which recipes do not pass"
LR_SCHEDULERS_REFUSED = {
    "reduce_lr_on_plateau": _NEEDS_EVAL,
    "greedy": _NEEDS_EVAL,
    "cosine_with_min_lr": _NEEDS_KWARGS.format("min_lr or min_lr_rate"),
    "cosine_warmup_with_min_lr": _NEEDS_KWARGS.format("min_lr or min_lr_rate"),
    "warmup_stable_decay": _NEEDS_KWARGS.format("num_decay_steps"),
}
# TRL's DPO loss types (1.16: the list DPOTrainer accepts); tests/test_bad_inputs.py pins it to the installed trl
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

# transformers' attention implementations (5.x: ALL_ATTENTION_FUNCTIONS and "eager"; pinned by a test). A hub
# kernel ("kernels-community/flash-attn") or a paged variant ("paged|sdpa") is passed on unchecked.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                        "flash_attention_4")


def check_attn_implementation(key: str, value: str | None) -> None:
    if value is None or value in ATTN_IMPLEMENTATIONS or "/" in value or value.startswith("paged|"):
        return
    raise PipelineError(f"{key}: unknown attention implementation {value!r} (choose from "
                        f"{', '.join(ATTN_IMPLEMENTATIONS)}, or a hub kernel id){closest(value, ATTN_IMPLEMENTATIONS)}")


def data_formats(kind: str):
    """The names a stage's `format` key accepts for records of `kind`: "auto" and the readers' registry."""
    return lambda: ("auto", *FORMATS[kind])


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def chat_template_problem(name_or_path: str) -> str | None:
    """Why `tokenizer.chat_template` cannot be loaded, or None (the rule of stages/tokenizer.load_chat_template:
    no suffix = a built-in name, else a path to a file)."""
    from pipeline.data.readers import path_kind

    if not Path(name_or_path).suffix:
        if path_kind(TEMPLATES_DIR / f"{name_or_path}.jinja") == "file":
            return None
        known = builtin_templates()
        return (f"no built-in chat template `{printable(name_or_path)}` (built-in: {', '.join(known)}; "
                f"or give a path to a .jinja file){closest(name_or_path, known)}")
    if path_kind(name_or_path) == "file":
        return None
    folder = " (it is a folder)" if path_kind(name_or_path) == "dir" else ""
    return f"chat template file not found: {printable(name_or_path)}{folder}"


@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step's global batch is cut: processes x micro-batch x accumulation."""

    global_batch: int
    processes: int
    micro_batch: int
    accumulation: int

    def describe(self, unit: str) -> str:
        return (f"{self.global_batch} {unit} per step = {self.processes} process(es) x {self.micro_batch} x "
                f"{self.accumulation} accumulation")


def split_batch(prefix: str, global_batch: int, micro_ceiling: int, processes: int) -> BatchSplit:
    """The largest micro-batch of at most `micro_ceiling` that splits the global batch evenly.

    micro_batch_size is a memory ceiling, not a promise: the recipe fixes the global batch (what
    the optimizer sees), and the same recipe must run on 1, 2 or 8 processes. Only a global batch
    that does not divide by the number of processes has no split.
    """
    if global_batch % processes:
        fits = [n for n in (global_batch - global_batch % processes, global_batch + processes - global_batch % processes) if n]
        raise PipelineError(
            f"{prefix}.global_batch_size ({global_batch}) cannot be split evenly over {processes} processes; "
            f"use a multiple of {processes} (e.g. {' or '.join(map(str, fits))})"
        )
    per_process = global_batch // processes
    micro = max(d for d in range(1, min(micro_ceiling, per_process) + 1) if per_process % d == 0)
    return BatchSplit(global_batch, processes, micro, per_process // micro)


def ceiling_note(split: BatchSplit, micro_ceiling: int) -> str:
    """Said when the derived micro-batch is smaller than the recipe's ceiling, so nobody is surprised."""
    if split.micro_batch == micro_ceiling:
        return ""
    return f" (micro_batch_size {micro_ceiling} is a ceiling; {split.micro_batch} is the largest that splits the batch)"


# ---------------------------------------------------------------- model sources


@dataclass
class BaseModelConfig:
    """A pretrained model to fine-tune instead of the tokenizer and pretrain stages."""

    path: str = option("", "hub id (google/gemma-2-2b), local folder of a transformers model, or a .gguf file "
                           "(dequantized and imported into the run folder once)")
    revision: Optional[str] = option(None, "hub revision (branch, tag or commit); ignored for local folders")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weights dtype; auto = bfloat16 where the hardware has it, else float32"
    )
    attn_implementation: Optional[str] = option(
        None, "eager | sdpa | flash_attention_2; default: eager for Gemma-2 (logit soft-capping), else sdpa"
    )
    trust_remote_code: bool = option(False, "run Python code shipped with the model (only for sources you trust)")
    chat_template: Optional[str] = option(None, "our template (name in pipeline/templates/, e.g. gemma, or a .jinja "
                                          "path) instead of the base tokenizer's own; needed where it has none")

    def source(self) -> tuple[str, str]:
        """(kind, location): ("gguf", file), ("folder", path) or ("hub", id), the one rule for check,
        the base stage and the loaders. A path that does not exist and is not shaped like a hub id
        is an error naming the key."""
        from pipeline.data.readers import path_kind

        path = Path(self.path).expanduser()
        if path.suffix.lower() == ".gguf":
            if path_kind(path) != "file":
                raise PipelineError(f"base.path: GGUF file not found: {printable(self.path)}")
            return "gguf", str(path)
        if path_kind(path) == "dir":
            return "folder", str(path)
        if path_kind(path) is not None or self.path.startswith((".", "/", "~")) or self.path.count("/") != 1:
            raise PipelineError(f"base.path: no such model folder or GGUF file, and not a hub id (owner/name): "
                                f"{printable(self.path)}")
        return "hub", self.path

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise PipelineError(f"{prefix}.path: name a hub id, a local model folder or a .gguf file")
        if self.chat_template and not Path(self.chat_template).suffix:  # a path is checked with the data files
            problem = chat_template_problem(self.chat_template)
            if problem:
                raise PipelineError(f"{prefix}.chat_template: {problem}")
        check_attn_implementation(f"{prefix}.attn_implementation", self.attn_implementation)


@dataclass
class ModelConfig:
    """Architecture of a model built from scratch (a standard transformers config)."""

    architecture: Literal["llama", "gemma2"] = option("llama", "transformers architecture: llama or gemma2")
    hidden_size: int = option(256, "width of the residual stream", min=1)
    num_layers: int = option(4, "number of transformer blocks", min=1)
    num_heads: int = option(4, "attention heads", min=1)
    num_kv_heads: int = option(4, "key/value heads (fewer than num_heads gives grouped-query attention)", min=1)
    intermediate_size: int = option(768, "hidden width of the MLP", min=1)
    max_position_embeddings: int = option(512, "longest sequence the model supports", min=1)
    rope_theta: float = option(10000.0, "RoPE base frequency", min_exclusive=0)
    tie_word_embeddings: bool = option(True, "share the input embedding and output projection")
    attn_implementation: Optional[str] = option(None, "eager | sdpa; default: sdpa for llama, eager for gemma2")

    def validate(self, prefix: str) -> None:
        check_attn_implementation(f"{prefix}.attn_implementation", self.attn_implementation)
        # num_heads and num_kv_heads are at least 1 here: `build` checks the field ranges before validate runs
        if self.hidden_size % self.num_heads:
            raise PipelineError(f"{prefix}.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise PipelineError(f"{prefix}.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise PipelineError(f"{prefix}.hidden_size / num_heads ({self.hidden_size} / {self.num_heads} = "
                                f"{self.hidden_size // self.num_heads}) must be even: RoPE rotates pairs of dimensions")


# ---------------------------------------------------------------- stages


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained on the pretraining corpus, saved with a chat template."""

    corpus: list[str] = option([], "text files (.jsonl with a text field, or .txt) to learn merges from", data=TEXT)
    vocab_size: int = option(2048, "vocabulary size including special tokens", min=300, max=1_000_000,
                             why="256 bytes + the special tokens at least; past a million the embeddings alone "
                                 "take gigabytes")
    min_frequency: int = option(2, "a pair must occur this often to be merged", min=1)
    chat_template: str = option("chatml", "template name in pipeline/templates/ or a path to a .jinja file")

    def validate(self, prefix: str) -> None:
        if not self.corpus:
            raise PipelineError(f"{prefix}.corpus: list at least one text file")
        if not Path(self.chat_template).suffix:  # a built-in name; a path is checked with the data files
            problem = chat_template_problem(self.chat_template)
            if problem:
                raise PipelineError(f"{prefix}.chat_template: {problem}")


@dataclass
class PretrainConfig:
    """Train a small causal transformer from scratch with next-token cross-entropy on packed blocks."""

    train_data: list[str] = option([], "text files (.jsonl with a text field, or .txt) to train on", data=TEXT)
    eval_data: list[str] = option([], "held-out text files for perplexity; empty: hold out eval_fraction of train_data",
                                  data=TEXT)
    chat_data: list[str] = option([], "conversation files rendered with the chat template and mixed in, "
                                  "so the chat control tokens are trained", data=CONVERSATIONS)
    eval_fraction: float = option(0.02, "share of training documents held out when eval_data is empty",
                                  min=0, max=0.5)
    model: ModelConfig = option(ModelConfig, "architecture of the model built from scratch")
    seq_len: int = option(256, "tokens per packed block", min=2, why="next-token prediction needs two tokens")
    global_batch_size: int = option(16, "blocks per optimizer step, summed over all processes", min=1)
    micro_batch_size: int = option(16, "most blocks per forward pass on one process (a memory ceiling): the largest "
                                       "micro-batch up to it that splits the global batch is used, accumulation derived",
                                   min=1)
    max_steps: int = option(600, "optimizer steps", min=1)
    learning_rate: float = option(2e-3, "peak learning rate (AdamW)", min_exclusive=0, max=1, why=LR_WHY)
    min_lr_ratio: float = option(0.1, "final learning rate as a share of the peak (cosine decay)", min=0, max=1)
    warmup_steps: int = option(30, "linear warmup steps", min=0)
    decay_steps: int = option(0, "0: cosine decay over every step after warmup; N: hold the peak, then cosine decay "
                                 "over the last N steps (warmup-stable-decay)", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not on norms and biases)", min=0)
    adam_beta1: float = option(0.9, "AdamW beta1", min=0, max_exclusive=1)
    adam_beta2: float = option(0.95, "AdamW beta2", min=0, max_exclusive=1)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)", min=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "auto = bf16 autocast where the hardware runs it fast (CUDA, or a CPU with AMX/AVX512-BF16)"
    )
    compile: bool = option(False, "torch.compile the training step's model (inductor; a C++ compiler on the CPU): "
                           "1.5x faster steps in bf16, 1.2x in fp32 on 2 cores, ~20 s of compiling first; not "
                           "bit-reproducible: two runs of the same seed differ in the last digits")
    eval_every: int = option(100, "evaluate held-out loss every this many steps (and at the end)", min=1)
    eval_max_blocks: int = option(256, "at most this many held-out blocks per evaluation", min=1)
    checkpoint_every: int = option(100, "save a resumable checkpoint every this many steps", min=1)
    keep_checkpoints: int = option(2, "newest checkpoints kept; older ones are deleted", min=1,
                                   why="a killed stage resumes from its newest checkpoint")
    log_every: int = option(10, "write metrics.jsonl and TensorBoard every this many steps", min=1)

    def validate(self, prefix: str) -> None:
        if not self.train_data:
            raise PipelineError(f"{prefix}.train_data: list at least one text file")
        if self.warmup_steps > self.max_steps:
            raise PipelineError(f"{prefix}.warmup_steps: {self.warmup_steps} is more than max_steps "
                                f"({self.max_steps}); lower warmup_steps or raise max_steps")
        if self.decay_steps > self.max_steps - self.warmup_steps:
            raise PipelineError(
                f"{prefix}.decay_steps: {self.decay_steps} is more than the {self.max_steps - self.warmup_steps} "
                f"steps after warmup (max_steps {self.max_steps} - warmup_steps {self.warmup_steps})")
        if self.seq_len > self.model.max_position_embeddings:
            raise PipelineError(
                f"{prefix}.seq_len ({self.seq_len}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )


@dataclass
class LoraArgs:
    """LoRA adapters: W x + (alpha/r) B A x, with B zero at the start so the model starts equal to its base."""

    r: int = option(16, "rank of the A and B matrices", min=1)
    alpha: int = option(32, "scale numerator: the update is multiplied by alpha / r", min=1)
    dropout: float = option(0.0, "dropout on the adapter input", min=0, max_exclusive=1)
    target_modules: list[str] = option(["all-linear"], "module names to adapt; all-linear = every linear layer but the output head")
    modules_to_save: list[str] = option([], "modules trained fully and saved with the adapter (e.g. embed_tokens)")


@dataclass
class SftConfig:
    """Instruction fine-tuning with LoRA on chat data (TRL's SFTTrainer), loss on assistant tokens only."""

    train_data: list[str] = option([], "conversation files (messages, ShareGPT, Alpaca, prompt/completion)",
                                   data=TRAIN_CONVERSATIONS)
    format: str = option("auto", "data format; auto detects it from the fields of the first record",
                         choices=data_formats("conversation"))
    eval_data: list[str] = option([], "held-out conversations; records with an `answer` field are scored",
                                  data=CONVERSATIONS)
    eval_limit: int = option(200, "at most this many held-out conversations are answered before and after", min=0)
    eval_split: float = option(0.0, "share of train_data held out for evaluation when eval_data is empty (chosen by "
                                    "a seeded hash of each prompt, so dpo holds out the same prompts)", min=0,
                               max_exclusive=1)
    on_bad_record: Literal["error", "drop"] = option("error", "a malformed record stops the stage, or is dropped and counted")
    duplicates: Literal["keep", "drop"] = option("keep", "exact duplicate conversations are kept or dropped (counted either way)")
    too_long: Literal["drop", "truncate"] = option("drop", "conversations longer than max_length are dropped or cut (counted)")
    max_length: int = option(512, "longest rendered conversation in tokens", min=1)
    lora: LoraArgs = option(LoraArgs, "adapter shape")
    quantization: Literal["none", "4bit"] = option("none", "4bit = QLoRA (bitsandbytes NF4 base), CUDA only")
    epochs: float = option(5.0, "passes over the training conversations (ignored when max_steps > 0)",
                           min_exclusive=0)
    max_steps: int = option(0, "optimizer steps; 0 = use epochs", min=0)
    global_batch_size: int = option(16, "conversations per optimizer step, summed over processes", min=1)
    micro_batch_size: int = option(8, "most conversations per forward pass on one process (a ceiling; the split "
                                      "is derived from the global batch and the processes). 8 is TRL's default; "
                                      "smaller bounds peak memory but costs speed (bench, bf16 CPU: 2 gave 0.58x "
                                      "the tokens/s of 8)", min=1)
    fp32_micro_batch_size: int = option(2, "the ceiling instead when sft trains in fp32 on a CPU (precision fp32, or "
                                           "auto without bf16 hardware): fp32 activations take twice the memory, and "
                                           "there 2 ran as fast as 8 in 0.58x the memory (bench, AVX2 kernels)",
                                        min=1)
    batching: Literal["group_by_length", "random"] = option("group_by_length", "group_by_length = batches of similar lengths (far less padding); random = plain shuffle")
    pad_to_multiple_of: int = option(8, PAD_TO_MULTIPLE_OF_DOC, min=0)
    padding_free: bool = option(False, "each micro-batch as one row of its conversations end to end, with per-conversation "
                                       "position ids (no padding; attention kept within each conversation)")
    learning_rate: float = option(1e-3, "peak learning rate", min_exclusive=0, max=1, why=LR_WHY)
    warmup_ratio: float = option(0.05, "share of steps with linear warmup", min=0, max_exclusive=1,
                                 why="transformers reads 1 or more as a number of steps")
    lr_scheduler: str = option("cosine", "transformers scheduler name", choices=LR_SCHEDULERS,
                               refused=LR_SCHEDULERS_REFUSED)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option("auto", "auto = bf16 where the hardware runs it fast")
    logging_steps: int = option(10, "log the training loss every this many steps", min=1)
    save_steps: int = option(100, "checkpoint every this many steps (resumed after a crash)", min=1)
    max_new_tokens: int = option(48, "tokens generated per held-out answer", min=1)
    generation_batch_size: int = option(32, "held-out prompts answered per generate call; halved automatically "
                                            "when memory runs out", min=1)

    def validate(self, prefix: str) -> None:
        if not self.train_data:
            raise PipelineError(f"{prefix}.train_data: list at least one conversation file")


@dataclass
class DpoConfig:
    """Direct Preference Optimization of the SFT model (TRL's DPOTrainer); the reference is the SFT model."""

    train_data: list[str] = option([], "preference files (prompt/chosen/rejected, HH-RLHF, LLaMA-Factory, "
                                       "Alpaca-style)",
                                   data=TRAIN_PAIRS)
    format: str = option("auto", "data format; auto detects it from the fields of the first record",
                         choices=data_formats("preference"))
    eval_data: list[str] = option([], "held-out preference pairs: preference accuracy and reward margins",
                                  data=HELD_OUT_PAIRS)
    answer_data: list[str] = option([], "held-out questions with an `answer` field: accuracy and habit rate",
                                    data=CONVERSATIONS)
    eval_limit: int = option(200, "at most this many held-out pairs / questions / KL prompts", min=0)
    eval_split: float = option(0.0, "share of train_data held out as evaluation pairs when eval_data is empty "
                                    "(a seeded hash of each prompt: the same prompts sft holds out)", min=0,
                               max_exclusive=1)
    bad_pairs: Literal["error", "drop"] = option("drop", "identical, empty or mismatched pairs stop the stage, or are dropped and counted")
    trainable: Literal["lora", "lm_head"] = option(
        "lora", "lora = a fresh LoRA adapter (reference: the adapter switched off); lm_head = only the output "
                "projection, untied from the input embeddings (reference: a frozen copy of the SFT model; `lora` is "
                "ignored; the stage saves a full model)")
    beta: float = option(0.1, "strength of the KL-style pull towards the reference (higher = stay closer)",
                         min_exclusive=0, why="beta < 0 turns the loss around (the rejected answers win) and beta = 0 "
                                              "removes the pull towards the reference: nothing is learned")
    loss_type: list[str] = option(["sigmoid"], "TRL loss types; several are summed with loss_weights",
                                  choices=DPO_LOSS_TYPES)
    loss_weights: list[float] = option([], "one weight per loss_type; empty = all 1", min=0)
    label_smoothing: float = option(0.0, "assumed label noise for the robust / smoothed sigmoid losses",
                                    min=0, max_exclusive=0.5, why="at 0.5 the labels are noise")
    precompute_ref_log_probs: bool = option(True, "compute the reference log-probs once before training instead of "
                                                   "once per epoch (same numbers, fewer forward passes)")
    max_length: int = option(512, "longest prompt + response in tokens; longer pairs are dropped and counted",
                             min=1)
    share_prompt: bool = option(True, "score chosen and rejected in one row with their prompt computed once (a mask "
                                      "keeps them apart; same loss, fewer tokens); false = TRL's two padded rows")
    lora: LoraArgs = option(LoraArgs, "shape of the fresh DPO adapter")
    epochs: float = option(2.0, "passes over the pairs (ignored when max_steps > 0)", min_exclusive=0)
    max_steps: int = option(0, "optimizer steps; 0 = use epochs", min=0)
    global_batch_size: int = option(16, "pairs per optimizer step, summed over processes", min=1)
    micro_batch_size: int = option(8, "most pairs per forward pass on one process (a ceiling; the split is derived "
                                      "from the global batch and the processes)", min=1)
    fp32_micro_batch_size: int = option(4, "the ceiling instead when dpo trains in fp32 on a CPU (precision fp32, or "
                                           "auto without bf16 hardware): fp32 activations take twice the memory; there "
                                           "4 peaked 40 MB lower than 8 (7%) for ~15% of the speed (bench, AVX2 "
                                           "kernels); set it to micro_batch_size for speed",
                                        min=1)
    batching: Literal["group_by_length", "random"] = option("group_by_length", "group_by_length = batches of similar lengths (far less padding); random = plain shuffle")
    # 32, not 8 as in sft: one row per pair (share_prompt) varies more in width, and 32 cut the bench's peak
    # memory by ~40 MB at the same speed on a bf16 CPU
    pad_to_multiple_of: int = option(32, PAD_TO_MULTIPLE_OF_DOC, min=0)
    learning_rate: float = option(2e-4, "peak learning rate", min_exclusive=0, max=1, why=LR_WHY)
    warmup_ratio: float = option(0.1, "share of steps with linear warmup", min=0, max_exclusive=1,
                                 why="transformers reads 1 or more as a number of steps")
    lr_scheduler: str = option("cosine", "transformers scheduler name", choices=LR_SCHEDULERS,
                               refused=LR_SCHEDULERS_REFUSED)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option("auto", "auto = bf16 where the hardware runs it fast")
    logging_steps: int = option(1, "log loss, rewards and log-probs every this many steps", min=1)
    save_steps: int = option(100, "checkpoint every this many steps (resumed after a crash)", min=1)
    stuck_after_steps: int = option(10, "stop loudly if the reward margin is still exactly zero after this many steps",
                                    min=1)
    max_new_tokens: int = option(48, "tokens generated per held-out answer", min=1)
    generation_batch_size: int = option(32, "held-out prompts answered per generate call; halved automatically "
                                            "when memory runs out", min=1)

    def validate(self, prefix: str) -> None:
        if not self.train_data:
            raise PipelineError(f"{prefix}.train_data: list at least one preference file")
        if not self.loss_type:
            raise PipelineError(f"{prefix}.loss_type: name at least one loss type (e.g. [sigmoid])")
        if self.loss_weights and len(self.loss_weights) != len(self.loss_type):
            raise PipelineError(f"{prefix}.loss_weights needs one weight per loss_type ({len(self.loss_type)})")
        if self.loss_weights and not any(self.loss_weights):
            raise PipelineError(f"{prefix}.loss_weights: at least one weight must be above 0")
        if "exo_pair" in self.loss_type and self.label_smoothing == 0:
            raise PipelineError(f"{prefix}.label_smoothing must be above 0 for the exo_pair loss "
                                "(the EXO paper recommends 1e-3)")


@dataclass
class RewardConfig:
    """A reward model on the SFT model: Bradley-Terry loss on the preference pairs (TRL's RewardTrainer), a LoRA
    plus a scalar head on the last token, saved as a sequence-classification adapter."""

    train_data: list[str] = option([], "preference files (prompt/chosen/rejected, HH-RLHF, LLaMA-Factory, "
                                       "Alpaca-style)",
                                   data=TRAIN_PAIRS)
    format: str = option("auto", "data format; auto detects it from the fields of the first record",
                         choices=data_formats("preference"))
    eval_data: list[str] = option([], "held-out preference pairs: pairwise accuracy and mean margin",
                                  data=HELD_OUT_PAIRS)
    answer_data: list[str] = option([], "held-out questions with an `answer` field (tiny world): how often the right "
                                        "fact outscores a wrong one", data=CONVERSATIONS)
    eval_limit: int = option(200, "at most this many held-out pairs / questions", min=0)
    eval_split: float = option(0.0, "share of train_data held out as evaluation pairs when eval_data is empty "
                                    "(the same seeded hash of each prompt as sft and dpo)", min=0, max_exclusive=1)
    bad_pairs: Literal["error", "drop"] = option("drop", "identical, empty or mismatched pairs stop the stage, or are dropped and counted")
    max_length: int = option(512, "longest prompt + response in tokens; longer pairs are dropped and counted", min=1)
    lora: LoraArgs = option(LoraArgs, "shape of the reward adapter (the `score` head is always trained and saved "
                                      "with it)")
    epochs: float = option(2.0, "passes over the pairs (ignored when max_steps > 0)", min_exclusive=0)
    max_steps: int = option(0, "optimizer steps; 0 = use epochs", min=0)
    global_batch_size: int = option(16, "pairs per optimizer step, summed over processes", min=1)
    micro_batch_size: int = option(8, "most pairs per forward pass on one process (a ceiling; the split is derived "
                                      "from the global batch and the processes)", min=1)
    batching: Literal["group_by_length", "random"] = option("group_by_length", "group_by_length = batches of similar lengths (far less padding); random = plain shuffle")
    pad_to_multiple_of: int = option(8, PAD_TO_MULTIPLE_OF_DOC, min=0)
    learning_rate: float = option(2e-4, "peak learning rate", min_exclusive=0, max=1, why=LR_WHY)
    warmup_ratio: float = option(0.1, "share of steps with linear warmup", min=0, max_exclusive=1,
                                 why="transformers reads 1 or more as a number of steps")
    lr_scheduler: str = option("cosine", "transformers scheduler name", choices=LR_SCHEDULERS,
                               refused=LR_SCHEDULERS_REFUSED)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option("auto", "auto = bf16 where the hardware runs it fast")
    logging_steps: int = option(1, "log loss, accuracy and margin every this many steps", min=1)
    save_steps: int = option(100, "checkpoint every this many steps (resumed after a crash)", min=1)

    def validate(self, prefix: str) -> None:
        if not self.train_data:
            raise PipelineError(f"{prefix}.train_data: list at least one preference file")


@dataclass
class RlRewardArgs:
    """What scores a sampled reply: a weighted sum of a rule and the reward stage's model (weight 0 leaves one out)."""

    rule: float = option(1.0, "weight of the rule a training record declares in its `scorer` field (tiny_world: 1 if "
                              "the reply states the right fact, else 0, minus habit_penalty when the habit's preamble "
                              "is there); records that declare none are scored by the model alone, or left out of "
                              "training when `model` is 0", min=0)
    model: float = option(0.0, "weight of the reward stage's model, which scores prompt + reply (needs a `reward` "
                               "section)", min=0)
    habit_penalty: float = option(0.5, "what the tiny_world rule subtracts when the reply carries the habit's "
                                       "preamble", min=0)

    def validate(self, prefix: str) -> None:
        if not (self.rule or self.model):
            raise PipelineError(f"{prefix}: give `rule` or `model` a weight above 0; nothing would score the replies")


@dataclass
class RlConfig:
    """Online RL from the SFT model (TRL's GRPOTrainer): each prompt is answered num_generations times, each reply is
    scored by the reward, the group's mean is the baseline, and a KL penalty (beta) keeps the policy near SFT."""

    train_data: list[str] = option([], "preference files whose prompts are answered (the pairs dpo reads; the "
                                       "chosen and rejected replies are not used)", data=TRAIN_PAIRS)
    format: str = option("auto", "data format; auto detects it from the fields of the first record",
                         choices=data_formats("preference"))
    eval_data: list[str] = option([], "held-out preference pairs: preference accuracy, and the KL prompts",
                                  data=HELD_OUT_PAIRS)
    answer_data: list[str] = option([], "held-out questions with an `answer` field: accuracy, habit rate and the "
                                        "reward of the greedy replies", data=CONVERSATIONS)
    eval_limit: int = option(200, "at most this many held-out pairs / questions / KL prompts", min=0)
    eval_split: float = option(0.0, "share of train_data held out as evaluation pairs when eval_data is empty "
                                    "(a seeded hash of each prompt: the same prompts sft and dpo hold out)", min=0,
                               max_exclusive=1)
    bad_pairs: Literal["error", "drop"] = option("drop", "malformed pairs stop the stage, or are dropped and counted")
    max_prompt_length: int = option(512, "longest rendered prompt in tokens; longer prompts are dropped and counted",
                                     min=1)
    trainable: Literal["lora", "lm_head"] = option(
        "lora", "lora = a fresh LoRA adapter (reference: the adapter switched off); lm_head = only the output "
                "projection, untied from the input embeddings (reference: a frozen copy of the SFT model; `lora` is "
                "ignored; the stage saves a full model)")
    lora: LoraArgs = option(LoraArgs, "shape of the fresh rl adapter")
    reward: RlRewardArgs = option(RlRewardArgs, "what scores the replies")
    beta: float = option(0.05, "weight of the KL penalty to the SFT model in the loss; 0 = unregularised (no "
                               "reference forward passes, no KL logged during training)", min=0)
    num_generations: int = option(4, "replies sampled per prompt (the group whose mean reward is the baseline)", min=2,
                                  why="a lone reply has no group to be compared with: its advantage is always 0")
    max_new_tokens: int = option(48, "longest sampled reply in tokens (also the held-out answers)", min=1)
    temperature: float = option(1.0, "sampling temperature of the replies (also divides the logits in the loss, as "
                                     "TRL does)", min_exclusive=0)
    epochs: float = option(1.0, "passes over the prompts (ignored when max_steps > 0)", min_exclusive=0)
    max_steps: int = option(0, "optimizer steps; 0 = use epochs", min=0)
    global_batch_size: int = option(16, "replies per optimizer step, summed over processes: global_batch_size / "
                                        "num_generations prompts, each answered num_generations times", min=1)
    micro_batch_size: int = option(8, "most replies per forward pass on one process (a ceiling; the split is derived "
                                      "from the global batch and the processes)", min=1)
    learning_rate: float = option(1e-4, "peak learning rate", min_exclusive=0, max=1, why=LR_WHY)
    warmup_ratio: float = option(0.0, "share of steps with linear warmup", min=0, max_exclusive=1,
                                 why="transformers reads 1 or more as a number of steps")
    lr_scheduler: str = option("constant", "transformers scheduler name", choices=LR_SCHEDULERS,
                               refused=LR_SCHEDULERS_REFUSED)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option("auto", "auto = bf16 where the hardware runs it fast")
    logging_steps: int = option(1, "log reward, KL, reply length and tied groups every this many steps", min=1)
    save_steps: int = option(100, "checkpoint every this many steps (resumed after a crash)", min=1)
    generation_batch_size: int = option(32, "held-out prompts answered per generate call; halved automatically "
                                            "when memory runs out", min=1)

    def validate(self, prefix: str) -> None:
        if not self.train_data:
            raise PipelineError(f"{prefix}.train_data: list at least one preference file (its prompts are answered)")
        if self.global_batch_size % self.num_generations:
            raise PipelineError(f"{prefix}.global_batch_size ({self.global_batch_size}) must be a multiple of "
                                f"num_generations ({self.num_generations}): each prompt's replies form one group")
        if self.trainable == "lora" and self.lora.dropout > 0:
            raise PipelineError(f"{prefix}.lora.dropout ({self.lora.dropout}) must be 0: rl compares the policy's "
                                "log-probabilities with those it sampled under and with the reference token by token, "
                                "so every dropout is off (TRL's disable_dropout)")


@dataclass
class EvalConfig:
    """Every stage's model side by side on held-out data; by default the files the other stages name."""

    text_data: list[str] = option([], "held-out text for perplexity (default: pretrain.eval_data)", data=TEXT)
    answer_data: list[str] = option([], "held-out questions with an `answer` field (default: sft.eval_data)",
                                    data=CONVERSATIONS)
    preference_data: list[str] = option([], "held-out preference pairs (default: dpo.eval_data)", data=HELD_OUT_PAIRS)
    limit: int = option(200, "at most this many examples of each kind", min=1)
    max_new_tokens: int = option(48, "tokens generated per answer", min=1)
    generation_batch_size: int = option(32, "held-out prompts answered per generate call; halved automatically "
                                            "when memory runs out", min=1)
    kl_prompts: int = option(100, "prompts used for each stage's KL estimate from the model it started from", min=1)
    transcripts: int = option(5, "questions shown with every stage's answer side by side in report.md", min=0)


# ---------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    """One staged pipeline: which stages run, on what, into which run folder."""

    name: str = option("", "run name; outputs go to <output_dir>/<name>/")
    description: str = option("", "free text shown in reports")
    output_dir: str = option("runs", "parent folder of run folders")
    seed: int = option(0, "seed for model init, data order and sampling", min=0, max=2**32 - 1,
                       why="numpy's seed range")
    base: Optional[BaseModelConfig] = option(None, "start from this model instead of tokenizer + pretrain")
    tokenizer: Optional[TokenizerConfig] = option(None, "train a byte-level BPE tokenizer")
    pretrain: Optional[PretrainConfig] = option(None, "pretrain a small model from scratch")
    sft: Optional[SftConfig] = option(None, "instruction fine-tuning with LoRA adapters")
    dpo: Optional[DpoConfig] = option(None, "preference optimisation against the SFT model")
    reward: Optional[RewardConfig] = option(None, "a reward model (scalar head) trained on preference pairs from the "
                                                  "SFT model")
    rl: Optional[RlConfig] = option(None, "online RL from the SFT model (GRPO): sampled replies scored by a rule and/or "
                                          "the reward model, with a KL penalty to the SFT model")
    eval: Optional[EvalConfig] = option(None, "evaluate every stage side by side (report, transcripts, plots)")

    def validate(self, prefix: str) -> None:
        if not self.name:
            raise PipelineError("recipe: missing required key `name`")
        # the run folder is <output_dir>/<name>: a name with a path in it (../x, a/b) puts it elsewhere
        if self.name in (".", "..") or any(sep in self.name for sep in ("/", "\\")):
            raise PipelineError(f"name: `{self.name}` is a path; a name is one folder's name (letters, digits, - _ .); "
                                "set output_dir for where run folders go")
        if not self.output_dir.strip():
            raise PipelineError("output_dir: empty; give the parent folder of run folders (default: runs)")
        if self.base and (self.tokenizer or self.pretrain):
            raise PipelineError("recipe: `base` replaces the tokenizer and pretrain stages; use one or the other")
        if self.pretrain and not self.tokenizer:
            raise PipelineError("recipe: the pretrain stage needs a `tokenizer` section to train its tokenizer")
        if self.sft and not (self.pretrain or self.base):
            raise PipelineError("recipe: the sft stage needs a model: a `pretrain` section or a `base` model")
        if self.dpo and not self.sft:
            raise PipelineError("recipe: the dpo stage starts from the SFT model; add an `sft` section")
        if self.reward and not self.sft:
            raise PipelineError("recipe: the reward stage starts from the SFT model; add an `sft` section")
        if self.rl and not self.sft:
            raise PipelineError("recipe: the rl stage starts from the SFT model; add an `sft` section")
        if self.rl and self.rl.reward.model and not self.reward:
            raise PipelineError("recipe: rl.reward.model scores replies with the reward stage's model; add a `reward` "
                                "section, or set rl.reward.model: 0")
        if not self.stages and not self.base:
            raise PipelineError("recipe: no stages; add a section such as `tokenizer:` and `pretrain:`")

    @property
    def stages(self) -> list[str]:
        """The stages this recipe runs, in pipeline order."""
        return [s for s in STAGE_ORDER if getattr(self, s, None) is not None]

    def batch_splits(self, processes: int) -> dict[str, BatchSplit]:
        """Each training stage's batch split on this many processes; a PipelineError where none exists."""
        splits = {}
        for stage in self.stages:
            cfg = getattr(self, stage)
            if hasattr(cfg, "global_batch_size"):
                splits[stage] = split_batch(stage, cfg.global_batch_size, cfg.micro_batch_size, processes)
        return splits

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.name  # `~/runs` is the home's, not a folder named ~

    def data_files(self) -> dict[str, list[str]]:
        """Data files each stage reads (every field declared with `data`), for `check` and fingerprints."""
        return {stage: data_paths(getattr(self, stage)) for stage in self.stages}

    def input_paths(self, stage: str) -> list[str]:
        """Every file or folder whose contents decide a stage's output: its data files, the chat template
        file the tokenizer stage reads, and a local base model for the stages that load it."""
        paths = list(self.data_files().get(stage, []))
        template = {"tokenizer": self.tokenizer and self.tokenizer.chat_template,
                    "base": self.base and self.base.chat_template}.get(stage)
        if template:
            paths.append(template if Path(template).suffix else str(TEMPLATES_DIR / f"{template}.jinja"))
        if stage == "base" and Path(self.base.path).expanduser().exists():
            paths.append(str(Path(self.base.path).expanduser()))
        return paths


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last one silently, so a
    second `sft:` section would replace the first without a word."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, whose keys this mapping may override
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in first_line:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key `{key}` appears twice in one mapping (first on line {first_line[key]})",
                            key_node.start_mark)
                    first_line[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    """The recipe file as a dict, with YAML syntax errors (and keys given twice) reported by line."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(str(p) for p in path.glob("*.y*ml"))
        examples = f", e.g. {', '.join(inside[:4])}" if inside else ""
        raise PipelineError(f"{path} is a folder; give a recipe file{examples}")
    if not path.is_file():
        nearby = [p.name for p in path.parent.glob("*.y*ml")] if path.parent.is_dir() else []
        near = closest(path.name, nearby)
        raise PipelineError(f"recipe not found: {path}" + (near.replace("`", f"`{path.parent}/", 1) if near else ""))
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PipelineError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text (byte {exc.start}); a recipe is a YAML text file") from None
    except (RecursionError, ValueError) as exc:  # nesting thousands deep; an integer of thousands of digits
        raise PipelineError(f"{path}: not a usable recipe ({type(exc).__name__}: {str(exc)[:80]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate. Errors name the file and the dotted key."""
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    data.setdefault("name", Path(path).stem)
    if isinstance(data.get("base"), str):  # `base: google/gemma-2-2b` is short for `base: {path: ...}`
        data["base"] = {"path": data["base"]}
    try:
        recipe = build(Recipe, data)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    recipe.source = str(path)  # the file this run comes from: a run folder belongs to one recipe file
    return recipe


def _run_from_hint(file: str, source: str | Path) -> str:
    """Where a relative data path would be found: beside the recipe or in the folder above it (a repository root),
    for a user who ran the recipe from another directory."""
    if Path(file).is_absolute():
        return ""
    recipe_dir = Path(source).resolve().parent
    for folder in (recipe_dir, recipe_dir.parent):
        if (folder / file).exists():
            return (f" (data paths are relative to the directory you run from, {Path.cwd()}; it is in {folder}: run "
                    f"from there)")
    return ""


def check_data_files(recipe: Recipe, source: str | Path = "recipe") -> None:
    """Every data file a stage names must exist, and so must a chat template given as a path. Hub dataset ids
    are left to the loader, but a missing path under a local folder (data/sft_trian) is not taken for one."""
    from pipeline.data.readers import missing_path_hint

    for stage, files in recipe.data_files().items():
        for file in files:
            hint = missing_path_hint(file)
            if hint is not None:
                raise PipelineError(f"{source}: {stage}: data file not found: {printable(file)}"
                                    f"{_run_from_hint(file, source) or hint}")
    for key, template in (("tokenizer.chat_template", recipe.tokenizer and recipe.tokenizer.chat_template),
                          ("base.chat_template", recipe.base and recipe.base.chat_template)):
        problem = template and chat_template_problem(template)
        if problem:
            raise PipelineError(f"{source}: {key}: {problem}")
    if recipe.base is not None:
        check_base(recipe.base, source)


def read_data_files(recipe: Recipe, stages: list[str], source: str | Path = "recipe") -> tuple[int, int, list[str]]:
    """Read every local data file of these stages as the stage itself will (each field's Reads: kind, format, bad-
    record policy), so a malformed record in the sft data stops `check`, or the run before pretraining, instead of
    the sft stage after it. Returns (files read, records kept, one note per file whose bad records its stage will
    drop and count, and per hub dataset id: that is left to its stage, as reading it here would download it)."""
    from pipeline.config_schema import data_fields
    from pipeline.data.readers import path_kind, read_records

    files_read, records, notes = 0, 0, []
    for stage in stages:
        section = getattr(recipe, stage, None)
        for name, files, (kind, fmt, on_bad) in data_fields(section) if section is not None else []:
            for file in files:
                if path_kind(file) is None:  # check_data_files found no such local path: a hub id
                    notes.append(f"{stage}.{name}: {file}: a hub dataset, read (and downloaded) by its stage")
                    continue
                try:
                    result = read_records(file, kind, fmt, on_bad=on_bad)
                except PipelineError as exc:
                    raise PipelineError(f"{source}: {stage}.{name}: {exc}") from None
                files_read, records = files_read + 1, records + len(result.records)
                if result.dropped:
                    reasons = ", ".join(f"{reason} {count}" for reason, count in result.dropped.items())
                    notes.append(f"{stage}.{name}: {file}: {sum(result.dropped.values())} of "
                                 f"{sum(result.dropped.values()) + len(result.records)} records will be dropped "
                                 f"({reasons}); first: {result.problems[0]}")
    return files_read, records, notes


def check_base(cfg: BaseModelConfig, source) -> str:
    """A local base is there and loadable as far as can be told without loading it (a GGUF file's
    header: whole, of an architecture transformers loads), and some chat template will apply.
    Returns which template the run will use."""
    from pipeline.data.readers import path_kind

    try:
        kind, location = cfg.source()
    except PipelineError as exc:
        raise PipelineError(f"{source}: {exc}") from None
    path, own = Path(location), None
    if kind == "gguf":
        from pipeline.gguf_header import check_gguf

        try:
            own = check_gguf(path).chat_template
        except PipelineError as exc:
            raise PipelineError(f"{source}: base.path: {exc}") from None
        where = "the GGUF file"
    elif kind == "folder":
        if path_kind(path / "config.json") != "file":
            raise PipelineError(f"{source}: base.path: {printable(cfg.path)} is not a transformers model folder "
                                f"(no config.json)")
        tokenizer_config = path / "tokenizer_config.json"
        own = (path / "chat_template.jinja").is_file() or (
            tokenizer_config.is_file() and "chat_template" in tokenizer_config.read_text(errors="replace"))
        where = "the model folder"
    else:
        where = "the hub"
    if cfg.chat_template:
        return f"ours: {cfg.chat_template} (base.chat_template)"
    if own:
        return f"the base tokenizer's own (from {where})"
    if where == "the hub":
        return "the base tokenizer's own (checked when the base stage downloads it; name one with base.chat_template)"
    raise PipelineError(f"{source}: base.chat_template: the base tokenizer ({where}) has no chat template; name one "
                        f"of ours ({', '.join(builtin_templates())}) or a .jinja file")


def stage_help(stage: str) -> str:
    """A hint for a stage name in --only / --from that the recipe lacks: how to add it, or the nearest name."""
    if stage in STAGE_ORDER:
        return (f"; add the section `{stage}:` to the recipe to run it (`pipeline check RECIPE --explain` lists "
                "its keys)")
    return closest(stage, STAGE_ORDER)
