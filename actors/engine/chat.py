"""Render chat turns into the text to append to a session's context, with the model's template."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

Turn = dict[str, str]


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Pass-through for HuggingFace's `{% generation %}` tag, as llama-cpp-python does."""

    # jinja2 declares `tags` a set on Extension; a ClassVar here would clash with its stubs.
    tags = {"generation"}  # noqa: RUF012

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Transformers renders tojson with ensure_ascii=False; templates are written against that.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatRenderer:
    """Text to append to a session so that it holds the conversation plus a generation prompt.

    A session's context already holds `history` (assistant replies included, each ending at the
    end-of-turn token the model sampled). `render(history, new)` returns only what must be added.

    With the model's Jinja template (`tokenizer.chat_template`), rendered in a sandbox the way
    llama-cpp-python's Jinja2ChatFormatter does: render history + new with the generation prompt,
    and keep what follows the rendering of history alone when that is a prefix of it. When it is
    not (templates that rewrite earlier turns, e.g. drop past reasoning), or history does not
    render, the fallback renders `new` alone, as if it were the whole conversation.

    Without a template (the default gemma 3 270M GGUF has none), Gemma's turn format:
    `<start_of_turn>{role}\\n{content}<end_of_turn>\\n` per turn, "assistant" written as "model",
    "system" folded into the next user turn as its first paragraph (Gemma has no system role),
    then `<start_of_turn>model\\n`. A continuation (history not empty) starts with "\\n", because
    the previous model turn stopped right after the model's own `<end_of_turn>` token.

    The text never starts with the BOS token's text: tokenize the first chunk of a session
    with add_bos=True, later chunks without.
    """

    def __init__(self, template: str | None, bos_text: str, eos_text: str) -> None:
        self.template = template
        self.bos_text = bos_text
        self.eos_text = eos_text
        self._compiled: jinja2.Template | None = None
        if template is not None:
            environment = ImmutableSandboxedEnvironment(
                loader=jinja2.BaseLoader(),
                trim_blocks=True,
                lstrip_blocks=True,
                extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols],
            )
            environment.filters["tojson"] = _tojson
            try:
                self._compiled = environment.from_string(template)
            except jinja2.TemplateError as exc:
                raise ValueError(f"chat template does not compile: {exc}") from None

    def render(self, history: list[Turn], new: list[Turn]) -> str:
        """Text to append to a context holding `history` so that it holds history + new + prompt."""
        if self._compiled is None:
            return self._render_gemma(history, new)
        full = self._render_template(history + new, add_generation_prompt=True)
        if history:
            try:
                before = self._render_template(history, add_generation_prompt=False)
            except ValueError:
                before = None
            if before is not None and full.startswith(before):
                return full[len(before) :]
            return self._strip_bos(self._render_template(new, add_generation_prompt=True))
        return self._strip_bos(full)

    def _render_template(self, messages: list[Turn], *, add_generation_prompt: bool) -> str:
        assert self._compiled is not None
        try:
            return self._compiled.render(
                messages=messages,
                bos_token=self.bos_text,
                eos_token=self.eos_text,
                add_generation_prompt=add_generation_prompt,
                raise_exception=_raise_exception,
                strftime_now=_strftime_now,
            )
        # A template is untrusted code from the model file: any failure in it is a template error.
        except Exception as exc:
            raise ValueError(f"chat template failed: {exc}") from None

    def _strip_bos(self, text: str) -> str:
        # The tokenizer adds BOS itself (add_bos=True); a second one from the template hurts output.
        if self.bos_text and text.startswith(self.bos_text):
            return text[len(self.bos_text) :]
        return text

    @staticmethod
    def _render_gemma(history: list[Turn], new: list[Turn]) -> str:
        parts: list[str] = ["\n"] if history else []
        system: list[str] = []
        for turn in new:
            role, content = turn["role"], turn["content"]
            if role == "system":
                system.append(content)
                continue
            if system:
                if role == "user":
                    content = "\n\n".join([*system, content])
                else:
                    # No user turn to carry the instructions: give them a user turn of their own.
                    parts.append(_gemma_turn("user", "\n\n".join(system)))
                system = []
            parts.append(_gemma_turn("model" if role == "assistant" else role, content))
        if system:
            parts.append(_gemma_turn("user", "\n\n".join(system)))
        parts.append("<start_of_turn>model\n")
        return "".join(parts)


def _gemma_turn(role: str, content: str) -> str:
    return f"<start_of_turn>{role}\n{content}<end_of_turn>\n"
