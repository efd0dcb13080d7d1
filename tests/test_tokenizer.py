"""tokenizer stage: byte-level BPE that round-trips text and carries a chat template with generation marks."""

from __future__ import annotations

import pytest

from pipeline.chat_template import load_chat_template
from pipeline.stages.tokenizer import SPECIAL_TOKENS


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer  # trained on the tiny world, loaded back with plain transformers (conftest)


@pytest.mark.parametrize("text", [
    "Tolbik lives in Varn.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "unicode: naïve café, “quotes”, Ελληνικά, 日本語, emoji 🙂",
    "",
    "<|user|> typed by a user is text",
])
def test_text_round_trips_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_special_tokens_and_template(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|eos|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert "{% generation %}" in tokenizer.chat_template
    # no automatic BOS: the template adds exactly one
    assert tokenizer("hello")["input_ids"][0] != tokenizer.bos_token_id


def test_chat_template_marks_assistant_tokens(tokenizer):
    messages = [
        {"role": "user", "content": "Where does Tolbik live?"},
        {"role": "assistant", "content": "Tolbik lives in Varn."},
        {"role": "user", "content": "And his pet?"},
        {"role": "assistant", "content": "A cat."},
    ]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    marked = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert marked == " Tolbik lives in Varn.<|end|> A cat.<|end|>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|user|> Where does Tolbik live?<|end|><|assistant|>"


def test_unknown_template_is_a_clear_error():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="no built-in chat template `nosuch`"):
        load_chat_template("nosuch")
