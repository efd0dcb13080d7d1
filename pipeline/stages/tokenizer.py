"""tokenizer stage: train a byte-level BPE on the corpus and save it with a chat template.

Byte-level means every string is representable (no unknown token) and decoding the ids
gives back the exact text. There is no prefix space, so a word at a line start ("Varn")
differs from one mid-sentence (" Varn"); our chat template puts each message's text right
after its role marker, i.e. in the line-start form, which the built-in corpus also uses.
"""

from __future__ import annotations

from pipeline.chat_template import load_chat_template
from pipeline.data.readers import read_records
from pipeline.recipe import TokenizerConfig

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
END_OF_TURN = "<|end|>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_MARKERS, END_OF_TURN]


def iter_corpus(files: list[str]):
    for file in files:
        for record in read_records(file, "text").records:
            yield record["text"]


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int, chat_template: str, show_progress=True):
    """A transformers fast tokenizer around a freshly trained byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # ids 0..6, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=show_progress,
    )
    bpe.train_from_iterator(texts, trainer, length=len(texts))
    # No post-processor: BOS comes from the chat template or from the packing code, never twice.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[*ROLE_MARKERS, END_OF_TURN],
        model_max_length=1_000_000,  # the model's context decides, not the tokenizer
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def run(cfg: TokenizerConfig, ctx) -> dict:
    chat_template = load_chat_template(cfg.chat_template)
    texts = list(iter_corpus(cfg.corpus))
    ctx.log(f"training a byte-level BPE of {cfg.vocab_size} tokens on {len(texts):,} documents")
    if ctx.is_main:
        tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency, chat_template)
        tokenizer.save_pretrained(ctx.out_dir)
    ctx.accelerator.wait_for_everyone()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ctx.out_dir)
    sample = texts[: min(len(texts), 2000)]
    n_tokens = sum(len(ids) for ids in tokenizer(sample)["input_ids"])
    n_chars = sum(len(t) for t in sample)
    metrics = {
        "vocab_size": len(tokenizer),
        "documents": len(texts),
        "chars_per_token": round(n_chars / max(n_tokens, 1), 3),
        "special_tokens": SPECIAL_TOKENS,
    }
    ctx.log(f"vocabulary {len(tokenizer)}; {metrics['chars_per_token']} characters per token on the corpus")
    return metrics
