"""The models `pipeline serve` answers with: each finished model stage of one run, loaded on first use.

Loading and rendering are training's and `pipeline chat`'s own (load_stage_model, ChatRenderer,
chat.generate_ids), so a greedy reply here is the reply `pipeline chat --greedy` gives. Every call
in this module blocks: the app runs them in worker threads.

Concurrency: each model has a lock, so two requests never run one model at once, while two stages
answer side by side. Sampling draws from a generator seeded by the request alone (chat.SeededSampler),
never from torch's global one, so a reply does not depend on what else is running. A model loads alone
(_Gate): transformers sets process-wide state while it builds one (torch's default dtype, the meta
device, patched init functions), and two loads at once, or a load beside a generation, can break.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from pipeline.chat import Sampling, decode_reply, generate_ids
from pipeline.chat_template import ChatRenderer
from pipeline.errors import PipelineError
from pipeline.generation import context_length, stop_token_ids
from pipeline.lineage import stale_upstream
from pipeline.stages.eval import MODEL_STAGES, read_stage_status

DEFAULT_MAX_TOKENS = 512  # when a request names none (and the context leaves that much)


class RequestError(Exception):
    """A request this server refuses: the app answers it as an OpenAI-style 4xx error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class Loaded:
    model: object
    tokenizer: object
    renderer: ChatRenderer
    context: int  # positions the model can attend to: prompt + reply must fit
    stamp: int  # stage.json's modification time when loaded: a rerun stage is loaded afresh
    lock: threading.Lock


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int  # generated before the stop, the end-of-turn token not counted


class _Gate:
    """Any number of generations at once, or one model load alone; a waiting load goes before new generations."""

    def __init__(self):
        self._changed = threading.Condition()
        self._generating = 0
        self._loads = 0  # waiting or running
        self._load_running = False

    @contextmanager
    def generating(self):
        with self._changed:
            self._changed.wait_for(lambda: self._loads == 0)
            self._generating += 1
        try:
            yield
        finally:
            with self._changed:
                self._generating -= 1
                self._changed.notify_all()

    @contextmanager
    def loading(self):
        with self._changed:
            self._loads += 1
            self._changed.wait_for(lambda: self._generating == 0 and not self._load_running)
            self._load_running = True
        try:
            yield
        finally:
            with self._changed:
                self._loads -= 1
                self._load_running = False
                self._changed.notify_all()


_GATE = _Gate()


class StageModels:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._loaded: dict[str, Loaded] = {}
        self._loading: dict[str, threading.Lock] = {name: threading.Lock() for name in MODEL_STAGES}

    def names(self) -> list[str]:
        """Finished model stages, in pipeline order (read afresh: a stage that finishes later shows up)."""
        return [name for name in MODEL_STAGES if read_stage_status(self.run_dir / name) == "done"]

    def check(self, name: str) -> Path:
        stage_dir = self.run_dir / name
        if name not in self.names():
            served = ", ".join(self.names()) or "none"
            raise RequestError(f"The model '{name}' does not exist: this run serves {served}.", "model",
                               "model_not_found", 404)
        stale = stale_upstream(stage_dir)
        if stale:
            raise RequestError(f"The model '{name}' is stale: {stale}. Rerun it: pipeline run RECIPE --from {name}",
                               "model", "model_stale", 409)
        return stage_dir

    def get(self, name: str) -> Loaded:
        """The stage's model, loaded once (one load at a time per stage) and kept."""
        stage_dir = self.check(name)
        stamp = (stage_dir / "stage.json").stat().st_mtime_ns
        with self._loading[name]:
            loaded = self._loaded.get(name)
            if loaded is None or loaded.stamp != stamp:
                from pipeline.models import load_stage_model

                try:
                    with _GATE.loading():
                        model, tokenizer = load_stage_model(stage_dir)
                    renderer = ChatRenderer(tokenizer)
                except PipelineError as exc:
                    raise RequestError(f"The model '{name}' cannot be loaded: {exc}", "model", "model_unavailable",
                                       409) from None
                loaded = self._loaded[name] = Loaded(model.eval(), tokenizer, renderer, context_length(model), stamp,
                                                     threading.Lock())
        return loaded


def prompt_and_budget(loaded: Loaded, messages: list[dict], max_tokens: int | None) -> tuple[list[int], int]:
    """The prompt's ids and how many tokens the reply may take, or a RequestError when they do not fit."""
    try:
        # A fast tokenizer is not safe to share between threads: each encode sets its truncation and
        # padding state, and two encodes at once gave other ids now and then (measured). So one model's
        # tokenizer is used under that model's lock.
        with loaded.lock, _GATE.generating():
            prompt = loaded.renderer.prompt_ids(messages)
    except Exception as exc:  # jinja's raise_exception in a template that refuses this conversation
        raise RequestError(f"The chat template refused these messages: {exc}", "messages") from None
    room = loaded.context - len(prompt)
    if room < 1:
        raise RequestError(f"This model's context is {loaded.context} tokens and the messages take {len(prompt)}: "
                           "shorten them.", "messages", "context_length_exceeded")
    if max_tokens is None:
        return prompt, min(DEFAULT_MAX_TOKENS, room)
    if max_tokens > room:
        raise RequestError(f"max_tokens is {max_tokens}, but this model's context is {loaded.context} tokens and the "
                           f"messages take {len(prompt)}: at most {room}.", "max_tokens", "context_length_exceeded")
    return prompt, max_tokens


class _Watch(StoppingCriteria):
    """generate() calls this after every new token: it cuts the reply at a stop string, passes new text
    to `on_text` (holding back what may yet turn into a stop string or a whole character), and ends
    the generation once a stop string came or the client went away."""

    def __init__(self, tokenizer, prompt_len: int, stops: list[str], stop_ids: list[int],
                 on_text: Callable[[str], None] | None, cancelled: threading.Event | None):
        self.tokenizer, self.prompt_len, self.stops, self.stop_ids = tokenizer, prompt_len, stops, stop_ids
        self.on_text, self.cancelled = on_text, cancelled
        self.text, self.hit, self.shown = "", False, ""

    def update(self, ids: list[int]) -> None:
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        text = decode_reply(self.tokenizer, ids)
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        self.hit = bool(cuts)
        self.text = text[: min(cuts)] if cuts else text

    def ready(self, final: bool) -> str:
        """The text that may be shown now."""
        if final:
            return self.text
        text = self.text.rstrip("\ufffd")  # a character split across tokens shows once whole
        held = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        return text[: len(text) - held]

    def emit(self, final: bool = False) -> None:
        ready = self.ready(final)
        if self.on_text is not None and ready.startswith(self.shown) and len(ready) > len(self.shown):
            self.on_text(ready[len(self.shown):])
            self.shown = ready

    def __call__(self, input_ids, scores, **kwargs):
        self.update(input_ids[0, self.prompt_len:].tolist())
        self.emit()
        done = self.hit or (self.cancelled is not None and self.cancelled.is_set())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def generate(loaded: Loaded, prompt: list[int], sampling: Sampling, stops: list[str] = (),
             on_text: Callable[[str], None] | None = None, cancelled: threading.Event | None = None) -> Reply:
    """One reply (blocking; one generation per model at a time). `on_text` gets it piece by piece."""
    stop_ids = stop_token_ids(loaded.tokenizer, loaded.renderer)
    watch = _Watch(loaded.tokenizer, len(prompt), list(stops), stop_ids, on_text, cancelled)
    with loaded.lock, _GATE.generating():
        if cancelled is not None and cancelled.is_set():
            return Reply("", "stop", len(prompt), 0)
        ids = generate_ids(loaded.model, loaded.tokenizer, loaded.renderer, prompt, sampling,
                           stopping_criteria=StoppingCriteriaList([watch]))
        watch.update(ids)  # decoding too stays clear of a load
        watch.emit(final=True)
    ended = bool(ids) and ids[-1] in stop_ids
    tokens = len(ids) - ended
    finish = "length" if not (ended or watch.hit) and len(ids) >= sampling.max_new_tokens else "stop"
    return Reply(watch.text, finish, len(prompt), tokens)
