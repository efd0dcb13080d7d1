"""One render path: assistant masks, exactly one BOS, and user text never becomes control tokens."""

from __future__ import annotations

import pytest

from pipeline.chat_template import ChatRenderer

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where does Tolbik live?"},
    {"role": "assistant", "content": "Tolbik lives in Varn."},
    {"role": "user", "content": "And his pet?"},
    {"role": "assistant", "content": "Tolbik has a pet cat."},
]


def test_mask_covers_exactly_assistant_text_and_end_of_turn(tiny_tokenizer):
    rendered = ChatRenderer(tiny_tokenizer).render(CONVERSATION)
    ids, mask = rendered.input_ids, rendered.assistant_mask
    spans, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert [tiny_tokenizer.decode(s) for s in spans] == [" Tolbik lives in Varn.<|end|>", " Tolbik has a pet cat.<|end|>"]
    end = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    assert [s[-1] for s in spans] == [end, end]  # the model learns to stop
    assert ids.count(tiny_tokenizer.bos_token_id) == 1 and ids[0] == tiny_tokenizer.bos_token_id


def test_render_matches_the_tokenizers_own_template_on_plain_text(tiny_tokenizer):
    ours = ChatRenderer(tiny_tokenizer).render(CONVERSATION)
    theirs = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
    assert ours.input_ids == theirs["input_ids"]
    assert ours.assistant_mask == theirs["assistant_masks"]


def test_a_reply_passed_back_with_its_generated_space_renders_as_in_training(tiny_tokenizer):
    """The model writes the space after a role marker itself (" Tolbik"); llama.cpp returns a reply with that space,
    and a client passes it back so. The template adds its space only where the text has none, so the history renders
    as training rendered it, not with two spaces; our renderer and the tokenizer's template agree on both."""
    renderer = ChatRenderer(tiny_tokenizer)
    spaced = [dict(m, content=" " + m["content"]) if m["role"] == "assistant" else m for m in CONVERSATION]
    assert renderer.render(spaced).input_ids == renderer.render(CONVERSATION).input_ids
    assert tiny_tokenizer.apply_chat_template(spaced, tokenize=False) == \
        tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    for conversation in (spaced, [{"role": "user", "content": "  two spaces"}, {"role": "assistant", "content": ""}]):
        theirs = tiny_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
        ours = renderer.render(conversation)
        assert (ours.input_ids, ours.assistant_mask) == (theirs["input_ids"], theirs["assistant_masks"])


def test_prompt_ids_are_a_prefix_of_the_training_render(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    full = renderer.render(CONVERSATION[:3]).input_ids
    prompt = renderer.prompt_ids(CONVERSATION[:2])
    assert full[: len(prompt)] == prompt
    assert tiny_tokenizer.decode(full[len(prompt):]) == " Tolbik lives in Varn.<|end|>"


@pytest.mark.parametrize("special", ["<|end|>", "<|assistant|>", "<|bos|>", "<|eos|>", "<|pad|>", "<|system|>",
                                     "<|user|>", "<start_of_turn>", "<|im_end|>"])
def test_special_token_strings_in_user_text_stay_text(tiny_tokenizer, special):
    renderer = ChatRenderer(tiny_tokenizer)
    clean = renderer.render([{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "ok"}])
    injected = renderer.render([{"role": "user", "content": f"hi {special} there"},
                                {"role": "assistant", "content": f"ok {special}"}])
    control = set(tiny_tokenizer.all_special_ids)
    assert sum(t in control for t in injected.input_ids) == sum(t in control for t in clean.input_ids)
    assert special in tiny_tokenizer.decode(injected.input_ids)


def test_gemma_template_folds_the_system_message(gemma_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_folder)
    renderer = ChatRenderer(tokenizer)
    assert not renderer.system_ok
    rendered = renderer.render(CONVERSATION)
    text = tokenizer.decode(rendered.input_ids)
    assert text.startswith("<|bos|><start_of_turn>user\nAnswer briefly.\n\nWhere does Tolbik live?<end_of_turn>")
    masked = tokenizer.decode([t for t, m in zip(rendered.input_ids, rendered.assistant_mask) if m])
    assert masked == "Tolbik lives in Varn.<end_of_turn>Tolbik has a pet cat.<end_of_turn>"


def test_added_tokens_shaped_as_control_tokens_are_marked_and_stay_text_in_user_text(tiny_tokenizer):
    """A base's tokenizer may keep control tokens as plain added entries (Qwen's <|fim_prefix|>, Gemma's
    <start_of_image>), which transformers would match in user text; the base stage marks them special. Added
    entries shaped as text (Gemma's <table>) keep matching."""
    import copy

    from pipeline.stages.base import mark_control_tokens

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens(["<|fim_prefix|>", "<start_of_image>", "<table>"])
    fim, image, table = tokenizer.convert_tokens_to_ids(["<|fim_prefix|>", "<start_of_image>", "<table>"])
    chat = [{"role": "user", "content": "a <|fim_prefix|> b <start_of_image> c <table>"}]
    assert {fim, image, table} <= set(ChatRenderer(tokenizer).render(chat, add_generation_prompt=True).input_ids)

    assert mark_control_tokens(tokenizer, tokenizer.chat_template) == ["<start_of_image>", "<|fim_prefix|>"]
    ids = ChatRenderer(tokenizer).render(chat, add_generation_prompt=True).input_ids
    assert fim not in ids and image not in ids and table in ids
    assert tokenizer.convert_tokens_to_ids(["<|fim_prefix|>", "<start_of_image>"]) == [fim, image]  # ids unchanged
    assert "<|fim_prefix|> b <start_of_image> c <table>" in tokenizer.decode(ids)
