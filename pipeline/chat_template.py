"""One way to turn a conversation into token ids: used by training, evaluation and chat alike.

The tokenizer's own Jinja template decides the layout, but message text is never parsed for
control tokens: each message's content is rendered as a unique placeholder, the rendered text
is split at the placeholders, template pieces are tokenized with their control tokens, and
content pieces are tokenized with `split_special_tokens=True`. So a user who types
"<|end|>" or "<start_of_turn>" gets those characters as text.

The assistant mask covers each assistant message's content and the end-of-turn token that
closes it, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

# Checked in order; the first one the tokenizer knows closes a turn.
END_OF_TURN_CANDIDATES = ("<|end|>", "<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
_PLACEHOLDER = "\ue000{}\ue001"  # private-use code points: never in real text, never merged by a template


@dataclass
class Rendered:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 where the loss applies

    def __len__(self) -> int:
        return len(self.input_ids)


def load_chat_template(name_or_path: str) -> str:
    """A template by name (pipeline/templates/<name>.jinja) or by path to a .jinja file."""
    from pipeline.recipe import TEMPLATES_DIR, chat_template_problem

    problem = chat_template_problem(name_or_path)
    if problem:
        raise PipelineError(problem)
    path = Path(name_or_path) if Path(name_or_path).suffix else TEMPLATES_DIR / f"{name_or_path}.jinja"
    return path.read_text()


def end_of_turn_id(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_CANDIDATES:
        if token in vocab:
            return vocab[token]
    if tokenizer.eos_token_id is None:
        raise PipelineError("the tokenizer has neither an end-of-turn token nor an eos token")
    return tokenizer.eos_token_id


def supports_system_role(tokenizer) -> bool:
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      tokenize=False)
        return True
    except Exception:  # jinja's raise_exception: the template refuses a system turn (Gemma-2)
        return False


def fold_system(messages: list[dict]) -> list[dict]:
    """Gemma-2 has no system role: put the system text at the top of the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return rest
    return [{"role": "user", "content": system}, *rest]


def _own_space(text: str) -> str:
    return " " if text.startswith(" ") else ""


class ChatRenderer:
    """Render conversations for one tokenizer; caches what it learns about the template."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise PipelineError("the tokenizer has no chat template; a chat stage needs one")
        self.tokenizer = tokenizer
        self.end_of_turn = self._template_end_of_turn()
        self.system_ok = supports_system_role(tokenizer)

    def _template_end_of_turn(self) -> int:
        """The control token the template writes right after an assistant's text, else a known one."""
        marker = _PLACEHOLDER.format(0)
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": marker}], tokenize=False)
        after = self._tokenize(text.split(marker, 1)[1], as_content=False)
        if after and after[0] in set(self.tokenizer.all_special_ids):
            return after[0]
        return end_of_turn_id(self.tokenizer)

    def _tokenize(self, text: str, as_content: bool) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=as_content)["input_ids"]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        if not self.system_ok:
            messages = fold_system(messages)
        # a placeholder opens with the text's own leading space, so that a template which adds a space only where the
        # text has none (chatml.jinja) treats it as it treats the text
        placeholders = [{"role": m["role"], "content": _own_space(m["content"]) + _PLACEHOLDER.format(i)}
                        for i, m in enumerate(messages)]
        text = self.tokenizer.apply_chat_template(placeholders, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        mask: list[int] = []
        cursor = 0
        close_turn = False  # the next template piece starts with an assistant's end-of-turn
        for i, message in enumerate(messages):
            marker = _PLACEHOLDER.format(i)
            at = text.index(marker, cursor)
            before, lead = text[cursor:at], ""
            if _own_space(message["content"]) and before.endswith(" "):
                before = before[:-1]  # the placeholder's own space: the text's, tokenized with it below
            if before.endswith(" "):
                # a space the template puts before the text belongs to the text's first word,
                # exactly as tokenizing the whole rendered string would merge it (" Nozan")
                before, lead = before[:-1], " "
            piece = self._tokenize(before, as_content=False)
            ids += piece
            mask += self._closing_mask(piece, close_turn)
            content = self._tokenize(lead + message["content"], as_content=True)
            is_assistant = message["role"] == "assistant"
            ids += content
            mask += [int(is_assistant)] * len(content)
            close_turn = is_assistant
            cursor = at + len(marker)
        tail = self._tokenize(text[cursor:], as_content=False)
        ids += tail
        mask += self._closing_mask(tail, close_turn)
        return Rendered(ids, mask)

    def _closing_mask(self, piece: list[int], after_assistant: bool) -> list[int]:
        """Train on the end-of-turn token right after an assistant's text, and nothing else of the template."""
        mask = [0] * len(piece)
        if after_assistant and piece and piece[0] == self.end_of_turn:
            mask[0] = 1
        return mask

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids that end where the assistant's answer begins (for generation)."""
        return self.render(messages, add_generation_prompt=True).input_ids
