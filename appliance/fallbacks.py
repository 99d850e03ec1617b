"""Tasks answered by the default instruct generator when no dedicated model is installed.

A fresh `make serve` has an embedding model and SmolLM2-135M-Instruct, and no weights for a
question-answering or summarisation model can be had offline; without this, the task API's
/v1/qa and /v1/summarisation examples would answer 422. A `Plan` turns each input of such a
request into a text-generation input (a task prompt in the model's chat format), and the
generator's text back into the task's output:

- QA stays extractive: the generated answer is snapped to the span of the context (at most
  MAX_ANSWER_WORDS words) with the highest token F1 against it, and is "unknown" when the
  generator says so or no span matches it well enough (MIN_SPAN_F1).
- Summaries are greedy with a bounded max_length.

Everything else about the request (limits, tokens charged as the generator charges them,
the cache keyed on the generator's input, X-Model) is the ordinary path of
appliance.inference; this module only decides when a fallback applies and adapts inputs and
outputs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import string
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from appliance.config import FallbacksConfig
from appliance.errors import (
    ApplianceError,
    InputTooLong,
    ModelNotFound,
    ValidationFailed,
    WrongTask,
)
from appliance.models.registry import ModelEntry, Registry
from appliance.runtime.tokenizer import INLINE_CHARS
from appliance.tasks import ItemResult
from appliance.tasks.base import require_text

log = logging.getLogger("appliance.fallbacks")

GENERATION = "text-generation"
UNKNOWN = "unknown"
MAX_ANSWER_WORDS = 30
"""Longest span a QA answer is snapped to (SQuAD answers are a few words)."""
MIN_SPAN_F1 = 0.5
"""Below this token F1 between the generated answer and its best span, the context is taken
to hold no answer: the generator said something the context does not say."""
QA_MAX_NEW_TOKENS = 32
QA_CONTEXT_TOKENS = 1536
SUMMARY_INPUT_TOKENS = 2048
SUMMARY_MAX_LENGTH = 64
SUMMARY_MAX_LENGTH_LIMIT = 256
PROMPT_ROOM = 160
"""Tokens kept free for the instructions and chat markup around the user's text."""


def export_fix(task: str) -> str:
    return f"appliance export CKPT --task {task}"


# ---- SQuAD-style text comparison -----------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


_REFUSAL = re.compile(
    r"^(unknown|unanswerable|none|n ?a|no answer)\b"
    r"|\bnot (mentioned|stated|given|specified|provided|available|known|answered)\b"
    r"|\b(do not|dont|cannot|cant) (know|answer|tell)\b|\bno information\b"
    r"|\b(does not|doesnt|do not) (say|mention|state|contain|provide|answer)\b"
)


def says_unknown(answer: str) -> bool:
    text = answer.lower().translate(_PUNCTUATION).strip()
    return not text or _REFUSAL.search(text) is not None


_PREAMBLE = re.compile(
    r"^[^\"“]*?\b(?:answer(?: to (?:this|the) question)?|it) (?:is|was|would be)\s*:?\s*", re.I
)
_QUOTED = re.compile(r"[\"“]([^\"”]+)[\"”]")


def bare_answer(generated: str) -> str:
    """The answer a chatty generator wrapped: its first line that is not the question again,
    after 'The answer is', the quoted part when it quotes one."""
    lines = [ln.strip() for ln in generated.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.lower().startswith("question:")] or [""]
    answer = re.sub(r"^answer\s*:\s*", "", lines[0], flags=re.I)
    if says_unknown(answer):
        return answer
    answer = _PREAMBLE.sub("", answer, count=1) or answer
    # 'The answer to "Who is he?" is "1971"': the quoted part that is not a question.
    quoted = [q for q in _QUOTED.findall(answer) if not q.rstrip().endswith("?")]
    return quoted[-1] if quoted else answer


_FUNCTION_WORDS = (
    "is was were are be been being am has have had do does did by of in on at to for from "
    "with and or but it its this that these those which who whom whose what when where why "
    "how there their they them he she his her we our you your i me my as so than then"
)
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())
"""Left out of a span match when the answer has other words: they connect a restated
sentence ("was built by ...") and are not what the question asks for."""


_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty"
)
_NUMBERS = {w: str(n) for n, w in enumerate(_NUMBER_WORDS.split())}
_NUMBERS.update(thirty="30", forty="40", fifty="50", hundred="100", thousand="1000")


def _number(token: str) -> str:
    """Number words match digits ("twenty minutes" is the span of "20 minutes")."""
    return _NUMBERS.get(token, token)


@dataclass(frozen=True, slots=True)
class Span:
    text: str
    start: int
    f1: float


_EDGE = "\"'()[]{}<>,;:!?.“”‘’«»"


def snap(answer: str, context: str, question: str = "", max_words: int = MAX_ANSWER_WORDS) -> Span:
    """The span of `context` (whole words, at most `max_words`) whose tokens best match
    `answer` by SQuAD token F1. Words of the question are left out of the match when the
    answer has others: a generator that restates the question ("The meaning of life is 42")
    still answers only its new part ("42")."""
    target = answered = [_number(t) for t in normalize(answer).split()]
    asked = {_number(t) for t in normalize(question).split()}
    if all(t in asked for t in target):
        return Span("", 0, 0.0)  # the question said again answers nothing
    for common in (asked, FUNCTION_WORDS):
        if any(t not in common for t in target):
            target = [t for t in target if t not in common]
    wanted = Counter(target)
    words = [
        (m.start(), m.end(), _number(normalize(m.group()))) for m in re.finditer(r"\S+", context)
    ]
    best: tuple[float, int, int, int] = (0.0, 0, -1, -1)  # (f1, -length, start word, end word)
    for i, (_, _, first) in enumerate(words):
        if first not in wanted:
            continue  # a span starting on a word the answer lacks is beaten by one without it
        seen: Counter[str] = Counter()
        overlap = length = 0
        for j in range(i, min(len(words), i + max_words)):
            token = words[j][2]
            if not token:
                continue
            length += 1
            if seen[token] < wanted[token]:
                overlap += 1
            seen[token] += 1
            if token not in wanted:
                continue
            precision, recall = overlap / length, overlap / len(target)
            f1 = 2 * precision * recall / (precision + recall)
            if (f1, -length) > best[:2]:
                best = (f1, -length, i, j)
    f1, _, i, j = best
    if i < 0:
        return Span("", 0, 0.0)
    # Words of the answer that were left out as the question's ("Company" of "Which company
    # built it?" -> "Ford Motor Company") join the span where they border it in one phrase
    # (no punctuation between: "the manager, Priya Nair" stays "Priya Nair").
    said = set(answered) - FUNCTION_WORDS

    def open_after(k: int) -> bool:
        return context[words[k][1] - 1] not in ",;:.!?"

    while (
        j + 1 < len(words) and j + 1 - i < max_words and open_after(j) and words[j + 1][2] in said
    ):
        j += 1
    while i > 0 and j - i + 1 < max_words and open_after(i - 1) and words[i - 1][2] in said:
        i -= 1
    start, end = words[i][0], words[j][1]
    raw = context[start:end]
    stripped = raw.strip(_EDGE)
    if not stripped:
        return Span("", 0, 0.0)
    return Span(stripped, start + raw.index(stripped), f1)


# ---- prompts in the generator's chat format --------------------------------------------------


class ChatFormat:
    """Renders messages the way the generator was tuned to read them: the manifest's Jinja
    chat template when it carries one (and jinja2 is installed), else ChatML when the
    tokenizer has its markers (SmolLM2, Qwen, ...), else plain labelled lines."""

    CHATML = ("<|im_start|>", "<|im_end|>")

    def __init__(self, template: str | None, tokenizer: Any, bos: str = "", eos: str = "") -> None:
        self._template: Any = None
        self.markers: tuple[str, ...] = ()
        if template:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                self._template = env.from_string(template)
                self._bos, self._eos = bos, eos
            except Exception:  # no jinja2, or a template it cannot read: the markers below
                self._template = None
        if tokenizer is not None and all(tokenizer.token_to_id(m) is not None for m in self.CHATML):
            self.markers = self.CHATML
        added = tokenizer.get_added_tokens_decoder().values() if tokenizer is not None else ()
        self.specials = tuple(
            {t for t in (bos, eos, *self.markers) if t} | {a.content for a in added if a.special}
        )
        # A tokenizer that puts its own BOS first (SmolLM2's is "<|im_start|>") would double
        # a template's first marker: the rendered prompt leaves it to the tokenizer.
        lead = tokenizer.encode("").ids if tokenizer is not None else []
        self.auto_prefix = str(tokenizer.id_to_token(lead[0])) if lead else ""

    @classmethod
    def of(cls, entry: ModelEntry) -> ChatFormat:
        runner, manifest = entry.runner, entry.manifest
        assert manifest is not None
        tokenizer = getattr(runner, "tokenizer", None)
        config = manifest.config
        template = config.get("chat_template")

        def token(ids: Any) -> str:
            first = ids[0] if isinstance(ids, list) and ids else ids
            name = tokenizer.id_to_token(first) if tokenizer and isinstance(first, int) else None
            return str(name or "")

        return cls(
            template if isinstance(template, str) else None,
            tokenizer,
            bos=token(config.get("bos_token_id")),
            eos=token(config.get("eos_token_ids")),
        )

    def clean(self, text: str) -> str:
        """User text with the format's control markers removed, so it cannot open turns."""
        for marker in self.specials:
            text = text.replace(marker, " ")
        return text

    def render(self, messages: list[dict[str, str]]) -> str:
        text = self._render(messages)
        if self.auto_prefix and text.startswith(self.auto_prefix):
            return text[len(self.auto_prefix) :]
        return text

    def _render(self, messages: list[dict[str, str]]) -> str:
        if self._template is not None:
            try:
                return str(
                    self._template.render(
                        messages=messages,
                        add_generation_prompt=True,
                        bos_token=self._bos,
                        eos_token=self._eos,
                    )
                )
            except Exception:  # a template that fails on these messages: the markers below
                log.warning("the generator's chat template failed; using its plain format")
        if self.markers:
            start, end = self.markers
            turns = "".join(f"{start}{m['role']}\n{m['content']}{end}\n" for m in messages)
            return f"{turns}{start}assistant\n"
        names = {"system": "", "user": "User: ", "assistant": "Assistant: "}
        lines = [f"{names[m['role']]}{m['content']}" for m in messages]
        return "\n\n".join(lines) + "\n\nAssistant:"


# ---- adapters: one per task a generator can stand in for ------------------------------------


@dataclass
class Prepared:
    payload: dict[str, Any]
    """The text-generation input."""
    source: Any
    """What `finish` needs of the original input (e.g. the context to snap to)."""
    truncated: bool = False


class Adapter(Protocol):
    task: ClassVar[str]
    """The dedicated model task this adapter replaces."""

    def prepare(self, payload: Any, chat: ChatFormat, fit: Fit, truncate: bool) -> Prepared: ...

    def finish(self, prepared: Prepared, generated: str) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Fit:
    """Cuts a text to a number of the generator's tokens (at a token boundary)."""

    tokenizer: Any
    positions: int = 1 << 30
    """The generator's context: prompt and answer together."""

    def budget(self, cap: int, max_length: int) -> int:
        """Tokens the user's text may take: `cap`, or less when the generator's context is
        smaller (what still does not fit is cut from the prompt's start by the runner)."""
        return max(16, min(cap, self.positions - max_length - PROMPT_ROOM))

    def __call__(self, text: str, limit: int) -> tuple[str, bool]:
        if self.tokenizer is None or len(text) <= limit:  # a token holds at least a character
            return text, False
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= limit:
            return text, False
        return text[: encoding.offsets[limit - 1][1]], True


def _strings(payload: dict[str, Any], name: str) -> list[str]:
    value = payload.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationFailed(f"`{name}` must be a list of strings.", details={"field": name})
    return value


class QuestionAnswering:
    task: ClassVar[str] = "question-answering"
    SYSTEM = (
        "You answer questions about a text. Reply with the exact words of the text that "
        "answer the question, as few as possible. If the text does not answer it, reply "
        "unknown."
    )

    def prepare(self, payload: Any, chat: ChatFormat, fit: Fit, truncate: bool) -> Prepared:
        question = require_text(payload, "question")
        context = require_text(payload, "context")
        prev_q, prev_a = _strings(payload, "prev_q"), _strings(payload, "prev_a")
        if len(prev_q) != len(prev_a):
            raise ValidationFailed(
                "`prev_q` and `prev_a` need the same number of entries.",
                details={"field": "prev_a"},
            )
        seen, cut = fit(context, fit.budget(QA_CONTEXT_TOKENS, QA_MAX_NEW_TOKENS))
        # Earlier turns come first and the text with the question asked now, since a small
        # model answers the last message it reads. A turn answered "unknown" is left out: it
        # holds nothing a later question can refer to, and primes the model to refuse again.
        messages = [{"role": "system", "content": self.SYSTEM}]
        for q, a in zip(prev_q, prev_a, strict=True):
            if says_unknown(a):
                continue
            messages += [
                {"role": "user", "content": f"Question: {chat.clean(q)}"},
                {"role": "assistant", "content": chat.clean(a)},
            ]
        user = f"Text: {chat.clean(seen)}\n\nQuestion: {chat.clean(question)}"
        messages.append({"role": "user", "content": user})
        generation = {"text": chat.render(messages), "max_length": QA_MAX_NEW_TOKENS}
        return Prepared(generation, (question, seen), cut)

    def finish(self, prepared: Prepared, generated: str) -> dict[str, Any]:
        question, context = prepared.source
        answer = bare_answer(generated)
        if says_unknown(answer):
            return {"answer": UNKNOWN, "score": 0.0}
        span = snap(answer, context, question)
        if span.f1 < MIN_SPAN_F1:
            return {"answer": UNKNOWN, "score": 0.0}
        return {"answer": span.text, "score": round(span.f1, 4)}


class Summarisation:
    task: ClassVar[str] = "summarisation"
    SYSTEM = "You write short, faithful summaries."
    PASSED = ("min_length", "repetition_penalty")

    def prepare(self, payload: Any, chat: ChatFormat, fit: Fit, truncate: bool) -> Prepared:
        text = require_text(payload)
        asked = payload.get("max_length")
        max_length = SUMMARY_MAX_LENGTH if asked is None else asked
        counted = isinstance(asked, int) and not isinstance(asked, bool)
        if counted and asked > SUMMARY_MAX_LENGTH_LIMIT:
            raise ValidationFailed(
                f"`max_length` must be at most {SUMMARY_MAX_LENGTH_LIMIT} when a generator "
                "summarises (no summarisation model is installed).",
                details={"field": "max_length"},
            )
        # Anything else wrong with max_length is the generation parser's 422, naming it.
        limit = fit.budget(SUMMARY_INPUT_TOKENS, asked if counted else SUMMARY_MAX_LENGTH)
        seen, cut = fit(text, limit)
        if cut and not truncate:
            raise InputTooLong(
                f"The text is longer than the {limit} tokens the generator summarises, and "
                "truncation was turned off.",
                details={"max_tokens": limit},
            )
        messages = [
            {"role": "system", "content": self.SYSTEM},
            {
                "role": "user",
                "content": "Summarise this text in one or two sentences.\n\n" + chat.clean(seen),
            },
        ]
        generation: dict[str, Any] = {"text": chat.render(messages), "max_length": max_length}
        generation.update({p: payload[p] for p in self.PASSED if payload.get(p) is not None})
        return Prepared(generation, None, cut)

    def finish(self, prepared: Prepared, generated: str) -> dict[str, Any]:
        return {"output": generated.strip()}


ADAPTERS: dict[str, Adapter] = {a.task: a for a in (QuestionAnswering(), Summarisation())}


# ---- a request's plan ----------------------------------------------------------------------


@dataclass
class Plan:
    """One request answered by `generator` in place of a `adapter.task` model."""

    generator: ModelEntry
    adapter: Adapter
    prepared: list[Prepared] = field(default_factory=list)

    async def prepare(self, payloads: Sequence[Any], truncate: bool) -> list[dict[str, Any]]:
        """The generation inputs; long texts are measured in a worker thread."""
        runner = self.generator.runner
        chat = ChatFormat.of(self.generator)
        fit = Fit(getattr(runner, "tokenizer", None), getattr(runner, "max_positions", 1 << 30))

        def run() -> list[Prepared]:
            return [self.adapter.prepare(p, chat, fit, truncate) for p in payloads]

        size = sum(len(str(p)) for p in payloads)
        self.prepared = run() if size <= INLINE_CHARS else await asyncio.to_thread(run)
        return [p.payload for p in self.prepared]

    def finish(self, results: list[ItemResult]) -> list[ItemResult]:
        out = []
        for prepared, result in zip(self.prepared, results, strict=True):
            text = result.output["output"]
            prompt = prepared.payload["text"]
            generated = text[len(prompt) :] if text.startswith(prompt) else text
            out.append(
                ItemResult(
                    self.adapter.finish(prepared, generated),
                    tokens=result.tokens,
                    truncated=result.truncated or prepared.truncated,
                )
            )
        return out


@dataclass
class Fallbacks:
    """Decides, when a task endpoint's model cannot serve it, whether a generator will."""

    config: FallbacksConfig = field(default_factory=FallbacksConfig)

    def generators(self, registry: Registry) -> list[ModelEntry]:
        ready = [
            e
            for e in registry.entries()
            if e.is_active and e.manifest is not None and e.manifest.task == GENERATION
        ]
        if self.config.generator:
            return [e for e in ready if e.slug == self.config.generator]
        return sorted(ready, key=lambda e: e.slug)

    def dedicated(self, registry: Registry, tasks: Collection[str]) -> list[str]:
        return sorted(
            e.slug
            for e in registry.entries()
            if e.is_active and e.manifest is not None and e.manifest.task in tasks
        )

    def plan(
        self,
        registry: Registry,
        ref: str,
        tasks: Collection[str] | None,
        error: ApplianceError,
    ) -> Plan | None:
        """A plan when a generator stands in for `tasks` after `error` (a model of another
        task, or an alias to a model that is not installed); None otherwise. A generator
        named in the request is used as asked; else the configured or first installed one,
        only when no model of the task is installed (then the caller's error stands)."""
        if tasks is None or len(tasks) != 1 or not self.config.enabled:
            return None
        adapter = ADAPTERS.get(next(iter(tasks)))
        if adapter is None:
            return None
        named = error.details.get("task") == GENERATION and isinstance(error, WrongTask)
        if named:
            return Plan(registry.get(error.details["model"]), adapter)
        if not isinstance(error, WrongTask) and "slug" not in error.details:
            return None  # an unknown name (a typo?) stays a 404
        if self.dedicated(registry, tasks):
            return None
        generators = self.generators(registry)
        return Plan(generators[0], adapter) if generators else None

    def explain(
        self, registry: Registry, tasks: Collection[str] | None, error: ApplianceError
    ) -> ApplianceError:
        """The error of a request nothing can serve, saying which export adds a model."""
        if tasks is None or not isinstance(error, WrongTask | ModelNotFound):
            return error
        if isinstance(error, ModelNotFound) and "slug" not in error.details:
            return error
        task = next((t for t in PREFERRED if t in tasks), min(tasks))
        installed = self.dedicated(registry, tasks)
        if installed:
            hint = f" Installed {task} models: {', '.join(installed)} (pass one as `model`)."
        else:
            hint = f" No {task} model is installed: `{export_fix(task)}` adds one."
            if task in ADAPTERS and self.config.enabled:
                hint += f" (An installed {GENERATION} model would also answer, as a fallback.)"
        details = {**error.details, "fix": export_fix(task)}
        if installed:
            details["models"] = installed
        return type(error)(error.message + hint, details=details)


PREFERRED = (
    "question-answering",
    "summarisation",
    "text-generation",
    "feature-extraction",
    "zero-shot-classification",
    "text-classification",
    "text-ranking",
    "zero-shot-image-classification",
    "image-classification",
    "custom",
)
"""Which export an error suggests when an endpoint takes several model tasks."""
