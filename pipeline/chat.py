"""`pipeline chat`: talk to any stage's model, rendered exactly as training rendered conversations.

Reads one user message per line from standard input (a terminal or a pipe), streams the reply,
and keeps the conversation. Commands: /reset, /system TEXT, /help, /quit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pipeline.chat_template import ChatRenderer
from pipeline.generation import context_length, stop_token_ids

HELP = "commands: /reset (new conversation), /system TEXT (set the system message; alone: clear it), /help, /quit"


# Below this temperature sampling is greedy: logits divided by it overflow to inf (1e-40 turned the whole row into
# NaN and the draw failed), and long before that a sample is the argmax but for exact ties.
GREEDY_BELOW = 1e-6


@dataclass
class Sampling:
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self.greedy = self.greedy or self.temperature < GREEDY_BELOW


class SeededSampler(LogitsProcessor):
    """Draw the next token with a generator of its own, so generations running side by side (pipeline serve)
    never share random state, and a seed alone decides a reply.

    generate() runs greedy and this processor, its last, leaves only the drawn token standing. The maths is
    generate()'s own sampling (temperature, then top-k, then top-p, then one multinomial draw), and a fresh
    generator seeded with s draws what torch.manual_seed(s) would: the replies are those of
    generate(do_sample=True) after torch.manual_seed(seed) (tests/test_serve.py checks it on CPU).
    """

    def __init__(self, sampling: Sampling):
        self.warpers = LogitsProcessorList()
        if sampling.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.seed = sampling.seed
        self.generator = None  # made on the logits' device at the first token

    def __call__(self, input_ids, scores):
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probs = self.warpers(input_ids, scores).softmax(dim=-1)  # (B, V)
        drawn = torch.multinomial(probs, num_samples=1, generator=self.generator)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


@torch.no_grad()
def generate_ids(model, tokenizer, renderer: ChatRenderer, prompt_ids: list[int], sampling: Sampling,
                 streamer=None, stopping_criteria=None) -> list[int]:
    """The reply's token ids after `prompt_ids`, up to and including the stop token when one came.

    chat and serve both generate here, so a greedy reply is the same from either."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    processors = LogitsProcessorList([] if sampling.greedy else [SeededSampler(sampling)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                         eos_token_id=stop_token_ids(tokenizer, renderer),
                         pad_token_id=tokenizer.pad_token_id or renderer.end_of_turn,
                         do_sample=False, temperature=None, top_k=None, top_p=None, logits_processor=processors,
                         streamer=streamer, stopping_criteria=stopping_criteria)
    return out[0, ids.shape[1]:].tolist()


def decode_reply(tokenizer, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # templates that put a space between the role marker and the text leave it on the reply
    return text[1:] if text.startswith(" ") else text


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.renderer = ChatRenderer(self.tokenizer)
        self.context = context_length(self.model)
        self.model.eval()

    def messages(self, history: list[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.history if history is None else history)

    def prompt_ids(self, user_text: str, history: list[dict] | None = None) -> list[int]:
        """The ids the model continues: the same render as training, ending at the assistant marker."""
        return self.renderer.prompt_ids(self.messages(history) + [{"role": "user", "content": user_text}])

    def fitted_prompt(self, user_text: str) -> tuple[list[int], list[dict]]:
        """prompt_ids and the history they hold: the oldest exchanges are left out (as other chat front ends do)
        until the prompt leaves max_new_tokens of the model's context for the reply, or no history is left.
        Past its context a model writes nonsense, so a message that does not fit even alone raises TooLong."""
        history = self.history
        ids = self.prompt_ids(user_text, history)
        while history and len(ids) + self.sampling.max_new_tokens > self.context:
            history = history[2:]  # one user message and its reply
            ids = self.prompt_ids(user_text, history)
        if len(ids) >= self.context:
            raise TooLong(f"that message takes {len(ids):,} tokens with the chat's framing, but this model's context "
                          f"is {self.context:,}: shorten it")
        return ids, history

    def reply(self, user_text: str, stream=None) -> str:
        """The model's reply (streamed to `stream` as it comes), kept in the history with the message. A message
        refused as TooLong leaves the conversation as it was."""
        ids, history = self.fitted_prompt(user_text)
        dropped = (len(self.history) - len(history)) // 2
        if dropped and stream is not None:
            stream.write(f"(the {dropped} oldest exchange(s) no longer fit the model's {self.context:,}-token "
                         "context and were left out) ")
        streamer = _Streamer(self.tokenizer, stream) if stream is not None else None
        budget = replace(self.sampling, max_new_tokens=min(self.sampling.max_new_tokens, self.context - len(ids)))
        reply_ids = generate_ids(self.model, self.tokenizer, self.renderer, ids, budget, streamer=streamer)
        text = decode_reply(self.tokenizer, reply_ids)
        self.history = history + [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text


class TooLong(Exception):
    """A message that does not fit the model's context even without the conversation before it."""


class _Streamer:
    """Print each new piece of the reply as it is generated (decoding the whole reply each time,
    so multi-byte characters split across tokens come out whole)."""

    def __init__(self, tokenizer, stream):
        self.tokenizer, self.stream = tokenizer, stream
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = decode_reply(self.tokenizer, self.ids)
        if not text.endswith("\ufffd"):
            self.stream.write(text[len(self.shown):])
            self.stream.flush()
            self.shown = text

    def end(self):
        self.stream.write("\n")
        self.stream.flush()


def run_chat(paths: list[str], sampling: Sampling, system: str | None, stdin=sys.stdin, stdout=sys.stdout) -> int:
    from pipeline.models import load_stage_model

    sessions = []
    for path in paths:
        model, tokenizer = load_stage_model(path)
        sessions.append((path, ChatSession(model, tokenizer, sampling, system)))
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"chatting with {', '.join(paths)}; {HELP}\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/quit":
            break
        if text.strip() == "/reset":
            for _, session in sessions:
                session.history.clear()
            stdout.write("(new conversation)\n")
            continue
        command, _, argument = text.strip().partition(" ")
        if command == "/help" and not argument:
            stdout.write(f"{HELP}\n")
            continue
        if command == "/system":  # the command word alone: "/systematic" is not "/system atic"
            for _, session in sessions:
                session.system = argument.strip() or None
                session.history.clear()
            stdout.write(f"(system message {'set' if argument.strip() else 'cleared'}; new conversation)\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        for path, session in sessions:
            stdout.write(f"{path}> " if len(sessions) > 1 else "assistant> ")
            stdout.flush()
            try:
                session.reply(text, stream=stdout)
            except TooLong as exc:
                stdout.write(f"({exc})\n")
    return 0
