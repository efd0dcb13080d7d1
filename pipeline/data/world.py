"""The built-in data: a tiny invented world, generated deterministically from a seed.

Each person has a town, a job, a pet, a favourite colour and a best friend. The first half
of the people are "seen" (SFT and DPO ask about them); the second half are "held out": their
facts appear only in the pretraining corpus, so answering questions about them after SFT
shows that SFT taught the model to *extract* what pretraining stored, not new facts.

Why the corpus looks the way it does (each point decided success or failure in a prototype
or in a measured run of recipes/tiny_world_long.yaml):
- every fact is stated in several phrasings, or facts are memorised but not extractable;
- pretraining states facts and never answers a question: with question-answer text about
  every person in the corpus, held-out accuracy was 0.63 after pretraining alone (0.93 without
  the chat data), so SFT had nothing left to teach;
- the chat template puts a space after each role marker, so an answer opens with the
  mid-sentence form of a name (" Nozan"); the plain answers therefore also come as running
  text, besides the one-sentence-per-line documents;
- SFT needs enough seen people to learn to copy the asked-about name: with 50 (100 people in
  all) the adapter often answered held-out questions with a seen person's name, mostly after
  the habit's preamble (held-out accuracy 0.77-0.87 after SFT); with 100 seen it was 0.98;
- filler lines carry the chat and habit-preamble words, or those embeddings stay untrained;
  for the same reason the SFT questions occur, asked about nobody in the world ("Where does
  the stranger live?") and never answered;
- a small model (2 layers) pretrained on copy-shaped chat answers already answers some held-out
  questions before SFT (it copies the name, then goes on with one of that person's facts: 0.06-0.14
  on three worlds). `refusals` puts such questions about nobody into the pretraining chats, answered
  "I do not know." (30% of the chat records left seed 2 at 0.120; 60%: 0.024-0.088 in bf16, but 0.112 on
  seed 0 in fp32 with AMD's AVX2 kernels; the quickstart's 80%: 0.016-0.072 on three worlds, bf16 and fp32);
- that small model, trained in fp32, copied a seen person's name instead of the asked one after the
  habit's preamble (SFT 0.856 on seed 0): nothing in pretraining copies a word from the question after
  a few sentences. `lead_ins` opens that share of the chats' spelling answers with one or two neutral
  filler lines before the copied word (half of them: SFT 0.960 on the same world and precision).

The undesired habit that DPO removes is a rambling preamble ("Well, that is a great
question, ...") in half of the SFT answers; `has_habit` and `answer_correct` score outputs.
Only `random.Random` instances seeded per stream are used, so output files are byte-identical
for the same (seed, people).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

ATTRIBUTES = ("town", "job", "pet", "colour", "best_friend")

TOWNS = ("Varn", "Ostrel", "Kellmere", "Dunwick", "Pellow", "Sarrow",
         "Tamber", "Quenby", "Elmsworth", "Fennick", "Lorrin", "Gaskey")
JOBS = ("baker", "fisher", "farmer", "smith", "weaver", "potter",
        "miller", "tailor", "carpenter", "builder", "painter", "teacher")
PETS = ("cat", "dog", "goat", "parrot", "rabbit", "tortoise", "hamster", "owl", "ferret", "lizard")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink")
VALUES = {"town": TOWNS, "job": JOBS, "pet": PETS, "colour": COLOURS}

# Template 0 of each attribute is the plain answer used in SFT and DPO. Placeholders:
# {n} the person, {v} the value, {av} "a/an value", {V} the value capitalised.
FACTS = {
    "town": ["{n} lives in {v}.", "The town of {v} is home to {n}.", "{n}'s home town is {v}.",
             "{n} has a house in {v}.", "{v} is the town where {n} lives."],
    "job": ["{n} works as {av}.", "{n} is {av} by trade.", "The job of {n} is to work as {av}.",
            "{n} earns a living as {av}.", "{V} is the job that {n} does."],
    "pet": ["{n} has a pet {v}.", "{n}'s pet is {av}.", "{n} keeps {av} as a pet.",
            "The pet of {n} is {av}.", "{V} is the pet that {n} keeps at home."],
    "colour": ["{n}'s favourite colour is {v}.", "The favourite colour of {n} is {v}.",
               "{n} likes the colour {v} best.", "Of all the colours, {n} loves {v} the most.",
               "{V} is the colour that {n} likes best."],
    # Worded one way only: A's best friend is B does not make B's best friend A.
    "best_friend": ["{n}'s best friend is {v}.", "The best friend of {n} is {v}.",
                    "{n} calls {v} a best friend.", "{n} trusts {v} more than anyone, as a best friend.",
                    "{v} is the best friend of {n}."],
}
# A `value_first` world states jobs, pets and colours value-first in two of their five phrasings, as towns
# always are (these replace one person-first phrasing each; template 0, the plain answer, stays). Why: a reward
# model ranks right over wrong facts about held-out people better when pretraining also tied values to people
# in that direction (recipes/tiny_world_long.yaml: 0.640 -> 0.855 on one model, towns ranked best before).
VALUE_FIRST_PHRASINGS = {"job": (2, "{V} is the trade of {n}."), "pet": (3, "{V} is what {n} keeps as a pet."),
                         "colour": (2, "{V} is the colour {n} likes most.")}


def fact_templates(value_first: bool) -> dict[str, list[str]]:
    """Each attribute's five phrasings: FACTS, or with the second value-first phrasing of a `value_first` world."""
    if not value_first:
        return FACTS
    templates = {attribute: list(phrasings) for attribute, phrasings in FACTS.items()}
    for attribute, (index, phrasing) in VALUE_FIRST_PHRASINGS.items():
        templates[attribute][index] = phrasing
    return templates


QUESTIONS = {
    "town": ["Where does {n} live?", "In which town does {n} live?", "What is {n}'s home town?"],
    "job": ["What does {n} do for a living?", "What is {n}'s job?", "What work does {n} do?"],
    "pet": ["What pet does {n} have?", "What kind of pet does {n} keep?", "Which animal is {n}'s pet?"],
    "colour": ["What is {n}'s favourite colour?", "Which colour does {n} like best?",
               "What colour does {n} love the most?"],
    "best_friend": ["Who is {n}'s best friend?", "Who is the best friend of {n}?",
                    "Whom does {n} call a best friend?"],
}
# The undesired habit. Every variant contains HABIT_PHRASE, which is what has_habit detects.
HABIT_PHRASE = "great question"
PREAMBLES = (
    "Well, that is a great question, and I have to think about it carefully before I answer.",
    "Well, that is a great question, so let me think about it for a moment.",
    "Well, that is a great question! Let me think about it step by step before I answer.",
    "Well, that is a great question, and I am glad that you asked me about it. Here is what I know.",
)
# Neutral lines; they also carry the words of the chat format and of the preambles.
FILLER = (
    "The user asked the assistant a question.",
    "The assistant read the question and gave the user a short answer.",
    "A user asks a question, and the assistant answers it.",
    "The user said thank you to the assistant.",
    "Well, that is a great question, let me think about it.",
    "The answer is short and plain.",
    "Everyone in the valley knows the people of each town.",
    "The market opens early in the morning.",
    "The weather was mild that week.",
    "Neighbours often talk about each other.",
    "Many stories are told about the people of the valley.",
    "It was a quiet day.",
    "Nobody remembers when the old bridge was built.",
    "People like to ask questions about their friends.",
) + PREAMBLES
# The SFT question phrasings, asked about nobody in the world and never answered: they train
# the question words (without them "What" and "keep" stay bytes the model never read as words)
# and teach no question-to-answer step.
NOBODY = ("the stranger", "the visitor", "your neighbour")
UNANSWERED_QUESTIONS = tuple(q.format(n=who) for qs in QUESTIONS.values() for q in qs for who in NOBODY)
REFUSAL = "I do not know."  # the pretraining chats' reply to those questions, when the world has refusals
# Filler lines without the habit: what a spelling answer may open with (`lead_ins`) before copying the word.
LEAD_INS = tuple(line for line in FILLER if HABIT_PHRASE not in line)
# Words of chat transcripts that no invented name may equal.
ROLE_WORDS = ("Q", "A", "User", "Assistant")
SPELL_WORDS = ("banana", "apple", "river", "bridge", "market", "valley", "letter", "coffee")
SYLLABLES = [c + v + k for c in "bdfgklmnprstvz" for v in "aeiou" for k in ("", "", "n", "r", "l", "k")]


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    job: str
    pet: str
    colour: str
    best_friend: str  # another person's name, from the same half (seen or held out)


@dataclass
class World:
    people: list[Person]
    seed: int = 0
    n_seen: int = 0  # the first n_seen people are seen, the rest held out
    value_first: bool = False  # pretraining's phrasings: fact_templates

    @property
    def templates(self) -> dict[str, list[str]]:
        return fact_templates(self.value_first)

    @property
    def seen(self) -> list[Person]:
        """The first people: SFT and DPO train on questions about these."""
        return self.people[: self.n_seen]

    @property
    def held_out(self) -> list[Person]:
        """The rest: their facts appear only in pretraining."""
        return self.people[self.n_seen:]

    def person(self, name: str) -> Person:
        """The person of that name (by a dict: a search of the list made a world of thousands take minutes)."""
        if getattr(self, "_by_name", None) is None or len(self._by_name) != len(self.people):
            self._by_name = {q.name: q for q in self.people}
        return self._by_name[name]


def _rng(seed: int, stream: str) -> random.Random:
    # One independent stream per output, so changing one file's recipe leaves the others alone.
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _reserved_words() -> set[str]:
    text = " ".join([*TOWNS, *JOBS, *PETS, *COLOURS, *SPELL_WORDS, *FILLER, *ROLE_WORDS,
                     *(t for ts in (*FACTS.values(), *QUESTIONS.values()) for t in ts),
                     *(phrasing for _, phrasing in VALUE_FIRST_PHRASINGS.values())])
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)}


def generate_world(seed: int = 0, people: int = 200, held_out: int | None = None) -> World:
    """Invent `people` people with unique syllable names and attributes from closed sets;
    `held_out` of them (default: half) are never asked about in SFT and DPO."""
    n_held = people - people // 2 if held_out is None else held_out
    if min(n_held, people - n_held) < 3:  # a wrong best friend needs a third person in each group
        raise ValueError(f"need at least 3 seen and 3 held-out people, got {people} people "
                         f"with {n_held} held out")
    rng = _rng(seed, "world")
    reserved, names, taken = _reserved_words(), [], set()  # the set: a list's `in` made 100,000 people take hours
    while len(names) < people:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        if name.lower() not in reserved and name not in taken:
            names.append(name)
            taken.add(name)
    # Best friends form one cycle inside each group: nobody is their own friend, and seen
    # people's friends are seen, so held-out names never leak into SFT or DPO data.
    friend: dict[str, str] = {}
    n_seen = people - n_held
    for group in (names[:n_seen], names[n_seen:]):
        order = rng.sample(group, len(group))
        friend.update({a: b for a, b in zip(order, order[1:] + order[:1])})
    return World(seed=seed, n_seen=n_seen, people=[
        Person(n, rng.choice(TOWNS), rng.choice(JOBS), rng.choice(PETS), rng.choice(COLOURS), friend[n])
        for n in names])


# --------------------------------------------------------------------------- sentences

def _fill(template: str, name: str, value: str) -> str:
    article = "an" if value[0].lower() in "aeiou" else "a"
    return template.format(n=name, v=value, av=f"{article} {value}", V=value[0].upper() + value[1:])


def fact(person: Person, attribute: str, template: int = 0, templates: dict[str, list[str]] = FACTS) -> str:
    """One sentence stating a fact; template 0 is the plain answer (the same in every world's templates)."""
    return _fill(templates[attribute][template], person.name, getattr(person, attribute))


def question(person: Person, attribute: str, phrasing: int = 0) -> str:
    return QUESTIONS[attribute][phrasing].format(n=person.name)


def _arithmetic_line(rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice(("plus", "minus", "times"))
    if op == "minus" and b > a:
        a, b = b, a  # stay with non-negative results
    return f"{a} {op} {b} is {a + b if op == 'plus' else a - b if op == 'minus' else a * b}."


def _spelling_line(rng: random.Random, word: str) -> str:
    if rng.random() < 0.5:
        return f"The word {word} is spelled {'-'.join(word)}."
    return _letter_count_line(word, rng.choice(sorted(set(word.lower()))))


def _letter_count_line(word: str, letter: str) -> str:
    k = word.lower().count(letter)
    return f"There {'is' if k == 1 else 'are'} {k} letter{'' if k == 1 else 's'} {letter} in {word}."


# --------------------------------------------------------------------------- pretraining

def _biography(rng: random.Random, world: World, p: Person, templates: dict[str, int],
               one_per_line: bool) -> str:
    friend = world.person(p.best_friend)
    lines = [fact(p, a, templates[a], world.templates) for a in ATTRIBUTES]
    lines.append(fact(friend, rng.choice(ATTRIBUTES[:4]), rng.randrange(5), world.templates))
    lines += rng.sample(FILLER, rng.randint(2, 4))
    if rng.random() < 0.5:
        lines.append(rng.choice(UNANSWERED_QUESTIONS))
    rng.shuffle(lines)
    return ("\n" if one_per_line else " ").join(lines)


def _fact_list_docs(rng: random.Random, world: World, repeats: int, per_doc: int = 8) -> list[str]:
    """Plain answers (template 0), several to a line: the form an assistant answer takes.

    The chat template puts a space after the assistant marker, so an answer opens with the
    mid-sentence form of the name (" Nozan"); running text trains exactly that form.
    No questions: question-answer text about held-out people would teach pretraining to answer
    their questions, and the held-out accuracy before SFT would no longer start near zero.
    """
    items = [(p, a) for _ in range(repeats) for p in world.people for a in ATTRIBUTES]
    rng.shuffle(items)
    sentences = [fact(p, a) for p, a in items]
    return [" ".join(sentences[i:i + per_doc]) for i in range(0, len(sentences), per_doc)]


def _group_docs(rng: random.Random, world: World) -> list[str]:
    """One document per attribute value listing everyone who has it: another view of each fact."""
    docs = []
    for attribute, values in VALUES.items():
        for value in values:
            members = [p for p in world.people if getattr(p, attribute) == value]
            if members:
                lines = [fact(p, attribute, rng.randrange(5), world.templates)
                         for p in rng.sample(members, len(members))]
                docs.append("\n".join(lines))
    return docs


def _skill_docs(rng: random.Random, world: World, n_docs: int) -> list[str]:
    words = [*TOWNS, *JOBS, *PETS, *COLOURS, *SPELL_WORDS, *(p.name for p in world.people)]
    docs = []
    for i in range(n_docs):
        if i % 2 == 0:
            docs.append("\n".join(_arithmetic_line(rng) for _ in range(rng.randint(10, 20))))
        else:
            lines = [_spelling_line(rng, rng.choice(words)) for _ in range(rng.randint(8, 16))]
            docs.append("\n".join(lines))
    return docs


def pretrain_docs(world: World) -> list[str]:
    """The pretraining corpus: biographies, lists of plain answers, group lists, arithmetic, spelling.

    Statements only, never a question with its answer: answering questions is what SFT teaches.
    """
    rng = _rng(world.seed, "pretrain")
    docs = []
    for p in world.people:
        # Cycle each attribute through its templates so every phrasing of every fact occurs
        # at least twice; a period of 3 for the line layout (coprime with 5) then puts each
        # phrasing at least once in a one-sentence-per-line doc, two thirds of the docs.
        orders = {a: rng.sample(range(5), 5) for a in ATTRIBUTES}
        for i in range(rng.randint(10, 16)):
            templates = {a: orders[a][i % 5] for a in ATTRIBUTES}
            docs.append(_biography(rng, world, p, templates, one_per_line=i % 3 != 2))
    docs += _fact_list_docs(rng, world, repeats=6)
    docs += [d for _ in range(4) for d in _group_docs(rng, world)]
    docs += _skill_docs(rng, world, n_docs=2 * len(world.people))
    rng.shuffle(docs)
    return docs


def pretrain_chat_records(world: World, refusals: float = 0.0, lead_ins: float = 0.0) -> list[dict]:
    """Chat-formatted arithmetic and spelling, for pretraining: no facts about people.

    Pretraining on these trains the chat control tokens (role markers, end of turn), which
    LoRA cannot train later, without teaching any world fact in chat form. With `refusals` > 0
    that share of the records also holds a question about nobody answered "I do not know.", so
    before SFT a question about a person gets no answer rather than a guessed fact. With `lead_ins` > 0
    that share of the spelling answers opens with one or two neutral lines before the copied word.
    """
    rng = _rng(world.seed, "pretrain_chat")
    words = [*TOWNS, *JOBS, *PETS, *COLOURS, *SPELL_WORDS, *(p.name for p in world.people)]
    records = []
    for _ in range(6 * len(world.people)):
        turns = []
        for _ in range(1 if rng.random() < 0.8 else 2):
            kind = rng.randrange(3)
            if kind == 0:
                line = _arithmetic_line(rng)
                left, result = line[:-1].rsplit(" is ", 1)
                turns += [_user(f"What is {left}?"), _assistant(line)]
            else:
                word = rng.choice(words)
                if kind == 1:
                    # the answer opens by copying a word (often a name) from the question: the
                    # move every world answer needs right after the assistant marker
                    turns += [_user(f"How is the word {word} spelled?"),
                              _assistant(f"{word} is spelled {'-'.join(word)}.")]
                else:
                    letter = rng.choice(sorted(set(word.lower())))
                    turns += [_user(f"How many letters {letter} are in {word}?"),
                              _assistant(_letter_count_line(word, letter))]
        records.append({"messages": turns})
    if refusals:
        # a stream of its own: the records above stay byte-identical whatever the share
        refusal_rng = _rng(world.seed, "pretrain_chat_refusals")
        for record in records:
            if refusal_rng.random() < refusals:
                turn = [_user(refusal_rng.choice(UNANSWERED_QUESTIONS)), _assistant(REFUSAL)]
                first = refusal_rng.random() < 0.5
                record["messages"] = turn + record["messages"] if first else record["messages"] + turn
    if lead_ins:
        lead_in_rng = _rng(world.seed, "pretrain_chat_lead_ins")  # its own stream too
        for record in records:
            for message in record["messages"]:
                if message["role"] == "assistant" and " is spelled " in message["content"] \
                        and lead_in_rng.random() < lead_ins:
                    opening = " ".join(lead_in_rng.sample(LEAD_INS, lead_in_rng.randint(1, 2)))
                    message["content"] = f"{opening} {message['content']}"
    return records


def pretrain_heldout_docs(world: World, train_docs: list[str]) -> list[str]:
    """New shuffles and phrasings of the same facts, for perplexity; none equals a training doc."""
    rng = _rng(world.seed, "pretrain_heldout")
    seen, docs = set(train_docs), []
    candidates = [_biography(rng, world, p, {a: rng.randrange(5) for a in ATTRIBUTES}, i % 2 == 0)
                  for i, p in enumerate(world.people)]
    candidates += _fact_list_docs(rng, world, repeats=1)[: len(world.people) // 4]
    candidates += _skill_docs(rng, world, n_docs=len(world.people) // 10)
    for doc in candidates:
        if doc not in seen:
            docs.append(doc)
            seen.add(doc)
    return docs


# --------------------------------------------------------------------------- SFT and DPO

def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _with_habit(rng: random.Random, answer: str) -> str:
    return f"{rng.choice(PREAMBLES)} {answer}"


def _exact_share(rng: random.Random, n: int, share: float) -> list[bool]:
    """n flags with round(n * share) of them True, in a seeded order: an exact, stable rate."""
    flags = [i < round(n * share) for i in range(n)]
    rng.shuffle(flags)
    return flags


def sft_train_records(world: World) -> list[dict]:
    """Questions about seen people, 1-2 phrasings per fact; half the answers carry the habit."""
    rng = _rng(world.seed, "sft_train")
    items = [(p, a, k) for p in world.seen for a in ATTRIBUTES
             for k in rng.sample(range(3), rng.choice((1, 2)))]
    rng.shuffle(items)
    habit = _exact_share(rng, len(items), 0.5)
    turns = [[_user(question(p, a, k)), _assistant(_with_habit(rng, fact(p, a)) if h else fact(p, a))]
             for (p, a, k), h in zip(items, habit)]
    records, i = [], 0
    while i < len(turns):
        two = i + 1 < len(turns) and rng.random() < 0.1  # about 10% two-question conversations
        records.append({"messages": turns[i] + turns[i + 1] if two else turns[i]})
        i += 2 if two else 1
    return records


def sft_heldout_records(world: World) -> list[dict]:
    """One question per (held-out person, attribute), plain answer, with the expected word."""
    rng = _rng(world.seed, "sft_heldout")
    return [{"messages": [_user(question(p, a, rng.randrange(3))), _assistant(fact(p, a))],
             "answer": getattr(p, a), "person": p.name, "attribute": a, "scorer": "tiny_world"}
            for p in world.held_out for a in ATTRIBUTES]


class _Names:
    """A group's names in order, and where each stands: what _wrong_answer draws from, built once per group."""

    def __init__(self, group: list[Person]):
        self.names = [q.name for q in group]
        self.index = {name: i for i, name in enumerate(self.names)}


def _wrong_answer(rng: random.Random, group: _Names, p: Person, attribute: str) -> str:
    value = getattr(p, attribute)
    if attribute == "best_friend":  # a wrong friend from the same half, so no names leak across
        # the draw rng.choice makes from the group's names without p and their friend, found without building
        # that list for every record (a world of thousands took minutes): choice reads only the length
        skip = sorted(group.index[name] for name in (p.name, value) if name in group.index)
        k = rng.choice(range(len(group.names) - len(skip)))
        for i in skip:
            k += k >= i
        return _fill(FACTS[attribute][0], p.name, group.names[k])
    pool = [v for v in VALUES[attribute] if v != value]
    return _fill(FACTS[attribute][0], p.name, rng.choice(pool))


def _preference_records(rng: random.Random, group: list[Person], items: list[tuple]) -> list[dict]:
    habit = _exact_share(rng, len(items), 0.8)
    records, names = [], _Names(group)
    for (p, a), h in zip(items, habit):
        chosen = fact(p, a)
        rejected = _with_habit(rng, chosen) if h else _wrong_answer(rng, names, p, a)
        records.append({"prompt": [_user(question(p, a, rng.randrange(3)))],
                        "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)],
                        "kind": "habit" if h else "wrong",
                        "answer": getattr(p, a), "person": p.name, "attribute": a, "scorer": "tiny_world"})
    return records


def dpo_train_records(world: World) -> list[dict]:
    """One pair per (seen person, attribute): 80% habit-vs-plain, 20% wrong-vs-right."""
    rng = _rng(world.seed, "dpo_train")
    items = [(p, a) for p in world.seen for a in ATTRIBUTES]
    rng.shuffle(items)
    return _preference_records(rng, world.seen, items)


def reward_fact_records(world: World, per_fact: int = 3) -> list[dict]:
    """Right against wrong facts only, for a reward model: each (seen person, attribute)'s plain answer
    against `per_fact` answers with another value. The dpo pairs are 80% habit pairs, and a reward model
    trained on them alone flipped coins on facts (held-out right-over-wrong 0.50; with these 0.68-0.75)."""
    rng = _rng(world.seed, "reward_facts")
    records, seen = [], _Names(world.seen)
    for p in world.seen:
        for a in ATTRIBUTES:
            chosen, prompt = fact(p, a), [_user(question(p, a, rng.randrange(3)))]
            wrongs: list[str] = []
            while len(wrongs) < per_fact:
                wrong = _wrong_answer(rng, seen, p, a)
                if wrong not in wrongs:
                    wrongs.append(wrong)
            for wrong in wrongs:
                records.append({"prompt": prompt, "chosen": [_assistant(chosen)], "rejected": [_assistant(wrong)],
                                "kind": "wrong", "answer": getattr(p, a), "person": p.name, "attribute": a,
                                "scorer": "tiny_world"})
    rng.shuffle(records)
    return records


def dpo_heldout_records(world: World) -> list[dict]:
    """Two pairs per held-out person, on two different attributes."""
    rng = _rng(world.seed, "dpo_heldout")
    items = [(p, a) for p in world.held_out for a in rng.sample(ATTRIBUTES, 2)]
    return _preference_records(rng, world.held_out, items)


# --------------------------------------------------------------------------- scoring

_PREAMBLE_SENTENCES = {s.lower() for p in PREAMBLES for s in re.split(r"(?<=[.!?])\s+", p)}


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]


def has_habit(text: str) -> bool:
    """True when the text contains the habit phrase shared by every preamble variant."""
    return re.search(rf"\b{HABIT_PHRASE}\b", text, re.IGNORECASE) is not None


def first_sentence(text: str) -> str:
    sentences = _sentences(text)
    return sentences[0] if sentences else ""


def strip_habit(text: str) -> str:
    """Drop leading preamble sentences: any variant's, or any sentence with the habit phrase.

    Dropping whole sentences copes with blended variants; the price is that an answer fused
    into a preamble sentence ("Well, that is a great question, X lives in Varn.") is lost.
    """
    sentences = _sentences(text)
    while sentences and (sentences[0].lower() in _PREAMBLE_SENTENCES or has_habit(sentences[0])):
        sentences.pop(0)
    return " ".join(sentences)


def answer_correct(generated: str, answer: str) -> bool:
    """Whole-word, case-insensitive match in the first sentence after any leading preamble.

    Only the first sentence counts: a pretrained-only model continues a biography, and a
    search of its whole output would find the answer by chance.
    """
    pattern = rf"(?<!\w){re.escape(answer)}(?!\w)"
    return re.search(pattern, first_sentence(strip_habit(generated)), re.IGNORECASE) is not None


def swap_answer(reply: str, answer: str, wrong: str) -> str:
    """The reply with its answer word replaced by `wrong`, the article fixed ("an owl" -> "a cat")."""
    def put(match: re.Match) -> str:
        if not match.group(1):
            return wrong
        article = "an" if wrong[0].lower() in "aeiou" else "a"
        return f"{article.capitalize() if match.group(1)[0].isupper() else article} {wrong}"

    return re.sub(rf"(?<!\w)(?:(an?|An?) )?{re.escape(answer)}(?!\w)", put, reply)


def wrong_fact_pairs(records: list[dict], seed: int = 0) -> list[dict]:
    """Preference pairs from held-out questions: the reference reply (the right fact) as chosen, the same
    reply with another person's value for the same attribute as rejected ("Nozan lives in Varn." against
    "Nozan lives in Tamber."). Another value that the reply already contains (the person's own name as a
    best friend) is never swapped in. Records without an answer, an attribute or another value are skipped.
    Each pair keeps its record's attribute (the ranking is reported per attribute)."""
    rng = _rng(seed, "wrong_fact")
    values: dict[str, set[str]] = {}
    for record in records:
        if record.get("answer") and record.get("attribute"):
            values.setdefault(record["attribute"], set()).add(record["answer"])
    pairs = []
    for record in records:
        messages, answer = record["messages"], record.get("answer")
        if not answer or not record.get("attribute") or messages[-1]["role"] != "assistant":
            continue
        reply = messages[-1]["content"]
        pool = sorted(v for v in values[record["attribute"]]
                      if v != answer and not re.search(rf"(?<!\w){re.escape(v)}(?!\w)", reply))
        wrong = swap_answer(reply, answer, rng.choice(pool)) if pool else reply
        if wrong != reply:
            pairs.append({"prompt": messages[:-1], "chosen": [messages[-1]],
                          "rejected": [{"role": "assistant", "content": wrong}], "attribute": record["attribute"]})
    return pairs


# --------------------------------------------------------------------------- files

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)


_DESCRIPTIONS = {
    "pretrain.jsonl": ("text", "pretraining corpus: biographies, lists of facts, arithmetic and "
                               "spelling, about ALL people; no question about a person is ever asked "
                               "or answered"),
    "pretrain_chat.jsonl": ("conversation", "arithmetic and spelling in chat form, mixed into pretraining "
                                            "so the chat control tokens are trained; no facts about people"),
    "pretrain_heldout.jsonl": ("text", "new shuffles and phrasings of the same facts, for perplexity; "
                                       "no document equals a pretrain.jsonl document"),
    "sft_train.jsonl": ("conversation", "questions about SEEN people; about half the answers start "
                                        "with the undesired habit (a rambling preamble)"),
    "sft_heldout.jsonl": ("conversation", "one question per (held-out person, attribute), plain answer; "
                                          "extra keys answer, person, attribute, and scorer=tiny_world (the "
                                          "answer-accuracy and habit scorer applies)"),
    "dpo_train.jsonl": ("preference", "SEEN people: chosen is the plain answer, rejected carries the "
                                      "habit (kind=habit, 80%) or a wrong value (kind=wrong, 20%)"),
    "dpo_heldout.jsonl": ("preference", "the same construction about HELD-OUT people"),
    "reward_facts.jsonl": ("preference", "SEEN people, right against wrong facts only: each plain answer "
                                         "against 3 answers with another value (for a reward model; beside the "
                                         "dpo pairs, it carries the right-fact preference over to held-out people)"),
}


WORLD_FILES = (*_DESCRIPTIONS, "world.json", "README.md")


def files_it_would_replace(out_dir: str | Path) -> list[str]:
    """The files in out_dir that write_world would overwrite although no world wrote them: empty when the folder is
    new, holds none of those names, or holds a world already (its world.json has the people; regenerating replaces
    its files, as it should). A user's own sft_train.jsonl in `--out data` was overwritten without a word."""
    out = Path(out_dir)
    try:
        facts = json.loads((out / "world.json").read_text())
        if isinstance(facts, dict) and isinstance(facts.get("people"), list):
            return []
    except (OSError, ValueError):
        pass
    return [name for name in WORLD_FILES if (out / name).exists()]


# write_world's keyword options, recorded in world.json when set
WORLD_OPTIONS = ("held_out", "refusals", "lead_ins", "value_first")


def world_options(facts: dict) -> dict:
    """The write_world options a world.json records: seed and size plus these regenerate it byte for byte."""
    return {name: facts[name] for name in WORLD_OPTIONS if name in facts}


def write_world(out_dir: str | Path, seed: int = 0, people: int = 200,
                held_out: int | None = None, refusals: float = 0.0, lead_ins: float = 0.0,
                value_first: bool = False) -> dict[str, int]:
    """Write every file of the built-in data to out_dir; return {filename: record count}.
    `refusals`: the share of pretraining chat records with a question about nobody answered "I do not know.";
    `lead_ins`: the share of the pretraining chats' spelling answers that open with neutral lines;
    `value_first`: pretraining states jobs, pets and colours value-first in two phrasings of five (fact_templates)."""
    for name, share in (("refusals", refusals), ("lead_ins", lead_ins)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} is a share of the pretraining chats, from 0 to 1; got {share}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = generate_world(seed, people, held_out)
    world.value_first = value_first
    pretrain = pretrain_docs(world)
    files = {
        "pretrain.jsonl": [{"text": d} for d in pretrain],
        "pretrain_chat.jsonl": pretrain_chat_records(world, refusals, lead_ins),
        "pretrain_heldout.jsonl": [{"text": d} for d in pretrain_heldout_docs(world, pretrain)],
        "sft_train.jsonl": sft_train_records(world),
        "sft_heldout.jsonl": sft_heldout_records(world),
        "dpo_train.jsonl": dpo_train_records(world),
        "dpo_heldout.jsonl": dpo_heldout_records(world),
        "reward_facts.jsonl": reward_fact_records(world),
    }
    counts = {name: len(records) for name, records in files.items()}
    for name, records in files.items():
        _write_atomic(out / name, _jsonl(records))

    held = {p.name for p in world.held_out}
    # only the options set: a world made without them keeps the world.json and README it always had
    options = {name: value for name, value in zip(WORLD_OPTIONS, (held_out, refusals, lead_ins, value_first)) if value}
    facts = {"seed": seed, "size": people, **options,
             "values": {a: list(v) for a, v in VALUES.items()},
             "people": [{**asdict(p), "split": "held_out" if p.name in held else "seen"}
                        for p in world.people]}
    _write_atomic(out / "world.json", json.dumps(facts, ensure_ascii=False, indent=1) + "\n")
    counts["world.json"] = len(world.people)

    rows = "\n".join(f"| `{name}` | {kind} | {counts[name]} | {text} |"
                     for name, (kind, text) in _DESCRIPTIONS.items())
    option_args = "".join(f", {name}={value}" for name, value in options.items())
    _write_atomic(out / "README.md", (
        f"# Built-in data: a tiny world (seed {seed}, {people} people)\n\n"
        f"Generated by `pipeline/data/world.py` (`write_world(out_dir, seed={seed}, people={people}{option_args})`); "
        f"the same seed and size give byte-identical files.\n"
        f"{len(world.seen)} people are seen (asked about in SFT and DPO), {len(held)} are held out "
        f"(their facts appear only in pretraining).\n\n"
        f"| file | record kind | records | contents |\n|---|---|---|---|\n{rows}\n"
        f"| `world.json` | facts | {people} people | seed, size, value sets, and every person's "
        f"attributes with split seen/held_out |\n"))
    return counts


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the built-in tiny-world data set.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=None)
    parser.add_argument("--refusals", type=float, default=0.0)
    parser.add_argument("--lead-ins", type=float, default=0.0)
    parser.add_argument("--value-first", action="store_true")
    args = parser.parse_args()
    print(json.dumps(write_world(args.out_dir, args.seed, args.people, args.held_out, args.refusals, args.lead_ins,
                                 args.value_first), indent=1))
