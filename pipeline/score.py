"""`pipeline score`: the log-probability a model gives each sentence, token by token.

Compare "The apple and pear salad" with "The apple and pair salad": the model that learned
English gives the first a higher log-probability, and the per-token table shows where.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from pipeline.generation import context_length


@dataclass
class SentenceScore:
    text: str
    tokens: list[str]
    token_logprobs: list[float]  # log p(token | everything before it); the first follows BOS

    @property
    def logprob(self) -> float:
        return sum(self.token_logprobs)


@torch.no_grad()
def score_sentences(model, tokenizer, texts: list[str]) -> list[SentenceScore]:
    model.eval()
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    limit = context_length(model)
    scores = []
    for number, text in enumerate(texts, start=1):
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        context = ([bos] if bos is not None else []) + ids
        if len(context) > limit:  # past its positions a model's log-probabilities mean nothing
            raise PipelineError(f"text {number} is {len(context):,} tokens, but this model's context is {limit:,}: "
                                "score a shorter text")
        if bos is None:  # no BOS to condition on: the first token cannot be scored
            ids = ids[1:]
        tensor = torch.tensor([context], device=device)
        logits = model(input_ids=tensor, use_cache=False).logits.float()[0]  # (T, V)
        logprobs = logits[:-1].log_softmax(-1)  # position t predicts token t+1
        targets = tensor[0, 1:]
        per_token = logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()
        scores.append(SentenceScore(text, [tokenizer.decode([t]) for t in ids], per_token))
    return scores


def format_scores(scores: list[SentenceScore]) -> str:
    lines = []
    for score in scores:
        lines.append(f"{score.logprob:9.3f}  {score.text}")
        for token, logprob in zip(score.tokens, score.token_logprobs):
            lines.append(f"           {repr(token):<16} p={torch.tensor(logprob).exp().item():.4f}  log p={logprob:.3f}")
    best = max(scores, key=lambda s: s.logprob) if len(scores) > 1 else None
    if best:
        lines.append(f"most likely: {best.text!r}")
    return "\n".join(lines)
