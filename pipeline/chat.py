"""`pipeline chat`: talk to any stage's model, rendered exactly as training rendered conversations.

Reads one user message per line from standard input (a terminal or a pipe), streams the reply,
and keeps the conversation. Commands: /reset, /system TEXT, /quit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from pipeline.chat_template import ChatRenderer
from pipeline.generation import stop_token_ids

HELP = "commands: /reset (new conversation), /system TEXT (set the system message), /quit"


@dataclass
class Sampling:
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        return dict(do_sample=True, temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.renderer = ChatRenderer(self.tokenizer)
        self.model.eval()

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt_ids(self, user_text: str) -> list[int]:
        """The ids the model continues: the same render as training, ending at the assistant marker."""
        return self.renderer.prompt_ids(self.messages() + [{"role": "user", "content": user_text}])

    @torch.no_grad()
    def reply(self, user_text: str, stream=None) -> str:
        ids = torch.tensor([self.prompt_ids(user_text)], device=next(self.model.parameters()).device)
        torch.manual_seed(self.sampling.seed)
        streamer = _Streamer(self.tokenizer, stream) if stream is not None else None
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=self.sampling.max_new_tokens,
                                  eos_token_id=stop_token_ids(self.tokenizer, self.renderer),
                                  pad_token_id=self.tokenizer.pad_token_id or self.renderer.end_of_turn,
                                  streamer=streamer, **self.sampling.generate_kwargs())
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        text = text[1:] if text.startswith(" ") else text
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text


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
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip(" ")
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
        if text.startswith("/system"):
            for _, session in sessions:
                session.system = text[len("/system"):].strip() or None
                session.history.clear()
            stdout.write("(system message set; new conversation)\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        for path, session in sessions:
            stdout.write(f"{path}> " if len(sessions) > 1 else "assistant> ")
            stdout.flush()
            session.reply(text, stream=stdout)
    return 0
