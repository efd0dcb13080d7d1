"""Record formats: recognise one from a record's fields, convert records into the three kinds, validate them.

The kinds, as plain dicts:
  text          {"text": str}
  conversation  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
                [system], user, assistant, user, assistant, ... ending with assistant
  preference    {"prompt": [messages: [system], user, assistant, ..., ending with user],
                 "chosen": [{"role": "assistant", "content": str}],
                 "rejected": [{"role": "assistant", "content": str}]}

A converter takes (record, loc), where loc names the file and the record ("data/x.jsonl line 12"), and
returns the converted dict or raises BadRecord(reason, message). The message is one line and names loc
and the field: `data/x.jsonl line 12: field "messages[2].content": expected a string, got int`.
Only "role" and "content" of each message are kept; other keys (tool calls, names, weights) are not.
"""

from __future__ import annotations

import re
from typing import Any, Callable

# A message while it is being validated: (role, content, field it came from), so errors can name the field.
Turn = tuple[str, str, str]

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_ROLES_TEXT = "system, user or human, assistant or gpt"


class BadRecord(Exception):
    """One record that cannot be used; `reason` is a short key for counting, `message` names where and why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def shown(text: Any) -> str:
    """Text from a record (a key, a role) as it goes into a message: control characters escaped, so the
    message stays one line whatever the data holds."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


def type_name(value: Any) -> str:
    """JSON-flavoured type names for messages: int, float, bool, null, string, list, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return {"str": "string"}.get(type(value).__name__, type(value).__name__)


# ---------------------------------------------------------------------------- field access


def _get(rec: dict, key: str, loc: str, path: str | None = None) -> Any:
    if key not in rec:
        fields = ", ".join(map(shown, rec)) or "none"
        raise BadRecord("missing_field", f'{loc}: field "{path or key}": missing (fields present: {fields})')
    return rec[key]


def _str(value: Any, loc: str, path: str) -> str:
    if not isinstance(value, str):
        raise BadRecord("bad_type", f'{loc}: field "{path}": expected a string, got {type_name(value)}')
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can spell a lone UTF-16 surrogate ("\ud800"); no tokenizer takes it
            raise BadRecord("bad_text", f'{loc}: field "{path}": not valid Unicode text (a lone surrogate '
                                        f'\\u{ord(value[e.start]):04x} at character {e.start})') from None
    return value


def _opt_str(rec: dict, key: str, loc: str) -> str:
    """An optional string field: absent or null reads as ""."""
    value = rec.get(key)
    return "" if value is None else _str(value, loc, key)


def _turn(item: Any, loc: str, path: str) -> Turn:
    """One message, either {role, content} (OpenAI) or {from, value} (ShareGPT)."""
    if not isinstance(item, dict):
        raise BadRecord("bad_type", f'{loc}: field "{path}": expected a message object, got {type_name(item)}')
    role_key, content_key = ("from", "value") if ("from" in item or "value" in item) else ("role", "content")
    role = _str(_get(item, role_key, loc, f"{path}.{role_key}"), loc, f"{path}.{role_key}")
    if role not in ROLES:
        raise BadRecord("unknown_role", f'{loc}: field "{path}.{role_key}": unsupported role "{shown(role)}" '
                                        f"(supported: {_ROLES_TEXT})")
    content = _str(_get(item, content_key, loc, f"{path}.{content_key}"), loc, f"{path}.{content_key}")
    return ROLES[role], content, f"{path}.{content_key}"


def _turns(items: Any, loc: str, path: str) -> list[Turn]:
    if not isinstance(items, list):
        raise BadRecord("bad_type", f'{loc}: field "{path}": expected a list of messages, got {type_name(items)}')
    return [_turn(item, loc, f"{path}[{i}]") for i, item in enumerate(items)]


def _with_system(rec: dict, turns: list[Turn], loc: str) -> list[Turn]:
    """A top-level "system" string (LLaMA-Factory's Alpaca and ShareGPT variants) becomes a leading system message."""
    system = _opt_str(rec, "system", loc)
    if system and not (turns and turns[0][0] == "system"):
        return [("system", system, "system")] + turns
    return turns


def _check_turns(turns: list[Turn], loc: str, path: str, *, end: str) -> None:
    """[system], then user/assistant alternating from user, ending with `end`; no empty user or assistant text."""
    roles = [t[0] for t in turns]
    body = roles[1:] if roles[:1] == ["system"] else roles
    alternates = all(r == ("user", "assistant")[i % 2] for i, r in enumerate(body))
    if not body or not alternates or body[-1] != end:
        raise BadRecord(
            "role_order",
            f'{loc}: field "{path}": roles must be [system], user, assistant, user, ... ending with {end}; '
            f'got {", ".join(roles) or "no messages"}',
        )
    for role, content, field in turns:
        if role != "system" and not content.strip():
            reason = "empty_response" if role == "assistant" else "empty_prompt"
            raise BadRecord(reason, f'{loc}: field "{field}": empty {role} message')


def _messages(turns: list[Turn]) -> list[dict]:
    return [{"role": role, "content": content} for role, content, _ in turns]


def _first_key(rec: dict, keys: tuple[str, ...]) -> str:
    return next((k for k in keys if k in rec), keys[0])


# ---------------------------------------------------------------------------- text


def text_record(rec: dict, loc: str) -> dict:
    key = _first_key(rec, ("text", "content"))
    text = _str(_get(rec, key, loc), loc, key)
    if not text.strip():
        raise BadRecord("empty_text", f'{loc}: field "{key}": empty text')
    return {"text": text}


# ---------------------------------------------------------------------------- conversation


def _messages_record(keys: tuple[str, ...]) -> Callable[[dict, str], dict]:
    def convert(rec: dict, loc: str) -> dict:
        key = _first_key(rec, keys)
        turns = _with_system(rec, _turns(_get(rec, key, loc), loc, key), loc)
        _check_turns(turns, loc, key, end="assistant")
        return {"messages": _messages(turns)}

    return convert


def _alpaca_prompt(rec: dict, loc: str) -> list[Turn]:
    """History pairs first, then the instruction with the input after a blank line when the input is not empty."""
    instruction = _str(_get(rec, "instruction", loc), loc, "instruction")
    extra = _opt_str(rec, "input", loc)
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise BadRecord(
            "bad_type", f'{loc}: field "history": expected a list of [question, answer], got {type_name(history)}'
        )
    turns: list[Turn] = []
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            got = f"a list of {len(pair)}" if isinstance(pair, (list, tuple)) else type_name(pair)
            raise BadRecord("bad_type", f'{loc}: field "history[{i}]": expected a [question, answer] pair, got {got}')
        turns.append(("user", _str(pair[0], loc, f"history[{i}][0]"), f"history[{i}][0]"))
        turns.append(("assistant", _str(pair[1], loc, f"history[{i}][1]"), f"history[{i}][1]"))
    user = "\n\n".join(part for part in (instruction, extra) if part.strip()) if extra.strip() else instruction
    turns.append(("user", user, "instruction"))
    return _with_system(rec, turns, loc)


def alpaca_record(rec: dict, loc: str) -> dict:
    turns = _alpaca_prompt(rec, loc)
    turns.append(("assistant", _str(_get(rec, "output", loc), loc, "output"), "output"))
    _check_turns(turns, loc, "instruction", end="assistant")
    return {"messages": _messages(turns)}


def prompt_completion_record(rec: dict, loc: str) -> dict:
    """prompt/completion or prompt/answer; each a string, or (TRL's conversational form) a list of messages."""
    key = _first_key(rec, ("completion", "answer"))
    turns: list[Turn] = []
    for field, role in (("prompt", "user"), (key, "assistant")):
        value = _get(rec, field, loc)
        turns += _turns(value, loc, field) if isinstance(value, list) else [(role, _str(value, loc, field), field)]
    turns = _with_system(rec, turns, loc)
    _check_turns(turns, loc, "prompt", end="assistant")
    return {"messages": _messages(turns)}


def _rank(reply: dict) -> float:
    rank = reply.get("rank")
    return rank if isinstance(rank, (int, float)) and not isinstance(rank, bool) else float("inf")


def oasst_tree_record(rec: dict, loc: str) -> dict:
    """An Open-Assistant message tree: follow the best-ranked live reply at each level (rank 0 is best, unranked
    last, ties by order) and end at the last assistant message on that path."""
    turns: list[Turn] = []
    node, path = rec, ""
    while True:
        role = _str(_get(node, "role", loc, f"{path}role"), loc, f"{path}role")
        if role not in ("prompter", "assistant"):
            raise BadRecord("unknown_role", f'{loc}: field "{path}role": unsupported role "{shown(role)}" '
                                            "(supported: prompter, assistant)")
        text = _str(_get(node, "text", loc, f"{path}text"), loc, f"{path}text")
        turns.append(("user" if role == "prompter" else "assistant", text, f"{path}text"))
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise BadRecord("bad_type", f'{loc}: field "{path}replies": expected a list, got {type_name(replies)}')
        live = [(i, r) for i, r in enumerate(replies) if isinstance(r, dict) and not r.get("deleted")]
        if not live:
            break
        i, node = min(live, key=lambda item: (_rank(item[1]), item[0]))
        path = f"{path}replies[{i}]."
    while turns and turns[-1][0] != "assistant":
        turns.pop()
    if not turns:
        raise BadRecord("no_answer", f'{loc}: field "replies": the message tree has no assistant reply')
    _check_turns(turns, loc, "replies", end="assistant")
    return {"messages": _messages(turns)}


# ---------------------------------------------------------------------------- preference


def _response(value: Any, loc: str, path: str) -> tuple[str, str]:
    """A chosen/rejected answer: a string, one {role, content} / {from, value} object, or a list of exactly one.
    Returns (content, field)."""
    if isinstance(value, str):
        return value, path
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRecord(
                "role_order", f'{loc}: field "{path}": expected one assistant message, got {len(value)} messages'
            )
        value, path = value[0], f"{path}[0]"
    if not isinstance(value, dict):
        raise BadRecord("bad_type", f'{loc}: field "{path}": expected a string or a message, got {type_name(value)}')
    role, content, field = _turn(value, loc, path)
    if role != "assistant":
        raise BadRecord("role_order", f'{loc}: field "{path}": expected an assistant message, got role {role}')
    return content, field


def _pair(prompt: list[Turn], prompt_path: str, rec: dict, loc: str, chosen=None, rejected=None) -> dict:
    """Validate and build a preference record; chosen/rejected are read from rec unless given as (content, field)."""
    _check_turns(prompt, loc, prompt_path, end="user")
    chosen = chosen or _response(_get(rec, "chosen", loc), loc, "chosen")
    rejected = rejected or _response(_get(rec, "rejected", loc), loc, "rejected")
    for content, field in (chosen, rejected):
        if not content.strip():
            raise BadRecord("empty_response", f'{loc}: field "{field}": empty response')
    if chosen[0] == rejected[0]:
        raise BadRecord(
            "identical_pair", f'{loc}: fields "{chosen[1]}" and "{rejected[1]}": chosen and rejected are identical'
        )
    return {
        "prompt": _messages(prompt),
        "chosen": [{"role": "assistant", "content": chosen[0]}],
        "rejected": [{"role": "assistant", "content": rejected[0]}],
    }


def prompt_chosen_rejected_record(rec: dict, loc: str) -> dict:
    prompt = _get(rec, "prompt", loc)
    if isinstance(prompt, list):
        turns = _turns(prompt, loc, "prompt")
    else:
        turns = [("user", _str(prompt, loc, "prompt"), "prompt")]
    return _pair(_with_system(rec, turns, loc), "prompt", rec, loc)


def _conversations_preference(keys: tuple[str, ...]) -> Callable[[dict, str], dict]:
    def convert(rec: dict, loc: str) -> dict:
        key = _first_key(rec, keys)
        turns = _with_system(rec, _turns(_get(rec, key, loc), loc, key), loc)
        return _pair(turns, key, rec, loc)

    return convert


def alpaca_preference_record(rec: dict, loc: str) -> dict:
    return _pair(_alpaca_prompt(rec, loc), "instruction", rec, loc)


_HH_MARK = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_split(text: str, loc: str, path: str) -> tuple[str, str]:
    cut = text.rfind(_HH_MARK)
    if cut < 0:
        raise BadRecord("hh_parse", f'{loc}: field "{path}": no "\\n\\nAssistant:" turn in the dialogue')
    return text[:cut], text[cut + len(_HH_MARK):].strip()


def _hh_turns(prefix: str, loc: str, path: str) -> list[Turn]:
    parts = _HH_TURN.split(prefix)  # ["", "Human", " text", "Assistant", " text", ...]
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord("hh_parse", f'{loc}: field "{path}": the dialogue must start with "\\n\\nHuman:"')
    return [
        ("user" if parts[j] == "Human" else "assistant", parts[j + 1].strip(), f"{path} (turn {j // 2 + 1})")
        for j in range(1, len(parts), 2)
    ]


def hh_rlhf_record(rec: dict, loc: str) -> dict:
    """Whole dialogues in chosen and rejected. Strings (HH-RLHF): split each at its last "\\n\\nAssistant:"; the
    part before it is parsed into turns on the "\\n\\nHuman:" / "\\n\\nAssistant:" markers and must be the same in
    both. Message lists (TRL's implicit prompt): the last message is the response, the rest must match.
    Parsed turns and responses are whitespace-stripped; "Human:" without a blank line before it stays text."""
    chosen, rejected = _get(rec, "chosen", loc), _get(rec, "rejected", loc)
    if isinstance(chosen, list) and isinstance(rejected, list):
        c_turns, r_turns = _turns(chosen, loc, "chosen"), _turns(rejected, loc, "rejected")
        if not c_turns or not r_turns:
            raise BadRecord("role_order", f'{loc}: field "{"rejected" if c_turns else "chosen"}": no messages')
        if [t[:2] for t in c_turns[:-1]] != [t[:2] for t in r_turns[:-1]]:
            raise BadRecord(
                "prompt_mismatch",
                f'{loc}: field "rejected": the messages before the last one differ from those in "chosen"',
            )
        answers = []
        for turns, name in ((c_turns, "chosen"), (r_turns, "rejected")):
            if turns[-1][0] != "assistant":
                raise BadRecord("role_order", f'{loc}: field "{name}": the last message must be from the assistant')
            answers.append(turns[-1][1:])
        return _pair(c_turns[:-1], "chosen", rec, loc, answers[0], answers[1])
    c_prefix, c_answer = _hh_split(_str(chosen, loc, "chosen"), loc, "chosen")
    r_prefix, r_answer = _hh_split(_str(rejected, loc, "rejected"), loc, "rejected")
    if c_prefix != r_prefix:
        at = next((i for i, (a, b) in enumerate(zip(c_prefix, r_prefix)) if a != b), min(len(c_prefix), len(r_prefix)))
        raise BadRecord(
            "prompt_mismatch",
            f'{loc}: field "rejected": the dialogue before its last "\\n\\nAssistant:" differs from the one in '
            f'"chosen" (first difference at character {at})',
        )
    return _pair(_hh_turns(c_prefix, loc, "chosen"), "chosen", rec, loc, (c_answer, "chosen"), (r_answer, "rejected"))


# ---------------------------------------------------------------------------- registry and detection

Converter = Callable[[dict, str], dict]

# kind -> format name -> (converter, what it reads). "txt" (plain-text files) is handled by the reader.
FORMATS: dict[str, dict[str, tuple[Converter, str]]] = {
    "text": {"text": (text_record, "text (or content) field")},
    "conversation": {
        "messages": (_messages_record(("messages", "conversations")), "messages: [{role, content}] (OpenAI)"),
        "sharegpt": (_messages_record(("conversations", "messages")), "conversations: [{from, value}] (ShareGPT)"),
        "alpaca": (alpaca_record, "instruction/input/output, optional history (Alpaca)"),
        "prompt_completion": (prompt_completion_record, "prompt/completion or prompt/answer"),
        "oasst_tree": (oasst_tree_record, "Open-Assistant message trees (best-ranked path)"),
    },
    "preference": {
        "prompt_chosen_rejected": (prompt_chosen_rejected_record, "prompt/chosen/rejected"),
        "hh_rlhf": (hh_rlhf_record, "chosen/rejected whole dialogues (HH-RLHF)"),
        "sharegpt_preference": (
            _conversations_preference(("conversations", "messages")),
            "conversations + chosen/rejected (LLaMA-Factory)",
        ),
        "alpaca_preference": (alpaca_preference_record, "instruction/input + chosen/rejected"),
    },
}


def detect(rec: dict, kind: str) -> str | None:
    """The format name for `kind` that this record's fields suggest, or None."""
    if kind == "text":
        return "text" if ("text" in rec or "content" in rec) else None
    if kind == "conversation":
        if "chosen" in rec and "rejected" in rec:  # a preference pair, whatever else it holds (a tiny-world
            return None                            # pair's prompt + answer would pass for prompt/answer)
        if isinstance(rec.get("messages"), list):
            return "messages"
        conversations = rec.get("conversations")
        if isinstance(conversations, list):
            first = conversations[0] if conversations and isinstance(conversations[0], dict) else {}
            return "messages" if "role" in first else "sharegpt"
        if "instruction" in rec and "output" in rec:
            return "alpaca"
        if "prompt" in rec and ("completion" in rec or "answer" in rec):
            return "prompt_completion"
        if "message_id" in rec and "replies" in rec:
            return "oasst_tree"
        return None
    if kind == "preference" and "chosen" in rec and "rejected" in rec:
        if "prompt" in rec:
            return "prompt_chosen_rejected"
        if "conversations" in rec or "messages" in rec:
            return "sharegpt_preference"
        if "instruction" in rec:
            return "alpaca_preference"
        return "hh_rlhf"
    return None


def detect_kind(rec: dict) -> str | None:
    """The kind of record this one's fields suggest (a pair before a conversation before text), or None."""
    return next((kind for kind in ("preference", "conversation", "text") if detect(rec, kind)), None)


def _hint(rec: dict, kind: str) -> str:
    """Why a near-miss format is not what `kind` needs, for the formats people most often try."""
    keys = set(rec)
    for key in ("messages", "conversations") if kind != "text" else ():
        if key in keys and not isinstance(rec[key], list):
            return f'field "{key}" holds {type_name(rec[key])}, not a list of messages'
    if "turns" in keys and not keys & {"answers", "choices", "output", "completion"}:
        return "the records hold questions only (\"turns\", MT-Bench style) and no answers to train on"
    if kind == "preference":
        if "label" in keys:
            return ("the records carry a \"label\" and no chosen/rejected pair: "
                    "unpaired (KTO-style) data, not preference pairs")
        if isinstance(rec.get("output"), list):
            return ("\"output\" is a ranked list of answers (reward-model style), not a pair: "
                    "write prompt/chosen/rejected records first (for example output[0] as chosen, output[-1] as rejected)")
        if {"output_1", "output_2"} <= keys:
            return ("these are pairwise judgments (output_1/output_2 with a \"preference\" label, "
                    "AlpacaEval annotations): convert them to prompt/chosen/rejected first, dropping ties")
    if kind == "conversation" and "instances" in keys:
        return ("\"instances\" holds the input/output examples (Alpaca seed tasks): "
                "flatten them to instruction/input/output first")
    for other in ("conversation", "preference", "text"):
        if other != kind and detect(rec, other):
            return f"the fields look like {other} data (format {detect(rec, other)}): {_FILE_FOR[other]}"
    return "no known format matches"


_FILE_FOR = {"conversation": "a file for sft (`pipeline data check --kind conversation`)",
             "preference": "a file for dpo, reward or rl (`pipeline data check --kind preference`)",
             "text": "a file for the tokenizer and pretrain (`pipeline data check --kind text`)"}


def unrecognised(rec: dict, kind: str, source: str) -> str:
    known = "; ".join(desc for _, desc in FORMATS[kind].values())
    fields = ", ".join(map(shown, rec)) or "none"
    return (f'{source}: format not recognised for kind "{kind}": {_hint(rec, kind)}. '
            f"Fields in the first record: {fields}. Known formats: {known}")
