"""Instruction data for `kdjax prepare text`: JSONL examples, chat templates and response masks.

A ``.jsonl`` file holds one example a line, in one of three shapes (other keys are ignored):

* ``{"prompt": str, "response": str}``: one user turn and the assistant's answer;
* ``{"messages": [{"role": str, "content": str}, ...]}`` (OpenAI-style chat): the last message
  is the assistant's response, everything before it (system, earlier turns) the prompt;
* ``{"text": str}``: plain text, a document as a file is.

A conversation is rendered with a chat template: ``--chat-template PATH`` (a Jinja file, or a
``tokenizer_config.json`` whose "chat_template" is used), else the one beside a ``tokenizer.json``
in the Hugging Face layout (``chat_template.jinja`` or ``tokenizer_config.json``'s), rendered as
`transformers` renders it: Jinja's immutable sandbox, ``bos_token``/``eos_token`` from
``tokenizer_config.json``. The response is what the whole conversation's render adds to the
prompt's render with ``add_generation_prompt=True``; the two are tokenized apart, so that the
prompt's tokens are exactly those a generation starts from and no token straddles the boundary;
only the response's tokens count in the loss.
A template places its own begin-of-text and end-of-turn tokens, so the document is its render
alone. Without a template, the plain format ``PLAIN`` is used: each message as
``"{role}: {content}\\n"``, the response after ``"assistant: "``, the document between the
tokenizer's bos and eos (the eos counts, so that the model learns where a response ends).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdjax.lm import tokenizer as tokenizer_lib
from kdjax.prepare.common import DataPreparationError

SHAPES = ('{"prompt": str, "response": str}, {"messages": [{"role": str, "content": str}, ...]} '
          '(the last message the assistant\'s response) or {"text": str}')
_SHAPE_KEYS = ({"prompt", "response"}, {"messages"}, {"text"})
#: The template-less format (documented in the module and the README).
PLAIN = "plain format ('{role}: {content}\\n' per message, the response after 'assistant: ')"


@dataclasses.dataclass(frozen=True)
class Example:
    """One document: plain text (`response` alone, `prompt` None: every token counts) or a
    rendered `prompt` and `response` (only the response's tokens count); `templated` when a chat
    template rendered it."""

    response: str
    prompt: str | None = None
    templated: bool = False

    @property
    def text(self) -> str:
        return (self.prompt or "") + self.response

    def encode(self, tok: tokenizer_lib.Tokenizer) -> tuple[list[int], list[int]]:
        """(token ids, loss mask): 1 where a token counts as a target."""
        if self.prompt is None:
            ids = [tok.bos, *tok.encode(self.response), tok.eos]
            return ids, [1] * len(ids)
        head, tail = tok.encode(self.prompt), tok.encode(self.response)
        if not self.templated:
            head, tail = [tok.bos, *head], [*tail, tok.eos]
        return head + tail, [0] * len(head) + [1] * len(tail)


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How conversations are rendered: a Jinja `template` (None: the plain format) from
    `source`, with the special tokens the template may name (`specials`)."""

    template: str | None = None
    source: str = "plain"
    specials: dict[str, str] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        return PLAIN if self.template is None else f"chat template of {self.source}"

    def example(self, record: Any, where: str) -> Example:
        """The Example of one JSONL line's `record` (`where`: its file and line number)."""
        if not isinstance(record, dict):
            raise DataPreparationError(f"{where}: a JSON {type(record).__name__}, not an object; "
                                       f"accepted shapes: {SHAPES}")
        keys = set(record) & {"prompt", "response", "messages", "text"}
        if keys not in _SHAPE_KEYS:
            raise DataPreparationError(f"{where}: an object of keys {sorted(record)} is none of "
                                       f"the accepted shapes: {SHAPES}")
        if keys == {"text"}:
            return Example(_string(record, "text", where))
        if keys == {"messages"}:
            messages = _messages(record["messages"], where)
        else:
            messages = [{"role": "user", "content": _string(record, "prompt", where)},
                        {"role": "assistant", "content": _string(record, "response", where)}]
        prompt = self._render(messages[:-1], True, where)
        full = self._render(messages, False, where)
        if not full.startswith(prompt):
            raise DataPreparationError(
                f"{where}: the {self.describe()} renders the prompt (add_generation_prompt=True) "
                f"as {_clip(prompt)}, which is not a prefix of its render of the whole "
                f"conversation, {_clip(full)}; the response's tokens cannot be told apart: fix "
                f"the template, or give one that renders the prompt as the conversation's "
                f"beginning with --chat-template")
        if len(full) == len(prompt):
            raise DataPreparationError(f"{where}: the {self.describe()} renders nothing of the "
                                       f"response; give a non-empty response")
        return Example(full[len(prompt):], prompt, templated=self.template is not None)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                where: str) -> str:
        if self.template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + "assistant: " if add_generation_prompt else text
        import jinja2  # noqa: PLC0415  (checked by load_format)

        try:
            return _compile(self.template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.specials)
        except jinja2.TemplateError as e:
            raise DataPreparationError(f"{where}: the {self.describe()} refused the conversation: "
                                       f"{e}") from None


def _clip(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _string(record: dict, key: str, where: str) -> str:
    if not isinstance(record[key], str):
        raise DataPreparationError(f"{where}: \"{key}\" is a {type(record[key]).__name__}, not a "
                                   f"string; accepted shapes: {SHAPES}")
    return record[key]


def _messages(messages: Any, where: str) -> list[dict[str, str]]:
    ok = isinstance(messages, list) and len(messages) >= 2 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise DataPreparationError(f"{where}: \"messages\" must be a list of at least two "
                                   f"{{\"role\": str, \"content\": str}} objects (a prompt and the "
                                   f"response); accepted shapes: {SHAPES}")
    if messages[-1]["role"] != "assistant":
        raise DataPreparationError(f"{where}: the last message's role is "
                                   f"{messages[-1]['role']!r}; it must be the assistant's "
                                   f"response, the one the loss counts: end the conversation "
                                   f"with it")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line of `path`."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataPreparationError(f"{path}:{number}: not JSON ({e.msg}, column {e.colno}); "
                                       f"each line of a .jsonl file is one object: "
                                       f"{SHAPES}") from None


def _compile(template: str):
    import jinja2.ext  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    # As transformers' apply_chat_template: templates from the Hub are untrusted code, hence the
    # sandbox; its helpers are what templates call.
    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _template_of(config: dict, where: str) -> str | None:
    """A tokenizer_config.json's chat template: a string, or the "default" of named ones."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise DataPreparationError(f"{where} names chat templates {sorted(named)} but no "
                                       f"'default'; pass the one to use with --chat-template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise DataPreparationError(f"{where}: \"chat_template\" is a {type(template).__name__}, "
                                   f"not a template string; pass one with --chat-template")
    return template


def _specials(config: dict) -> dict[str, str]:
    """The special tokens a template may name (bos_token, ...), as transformers passes them."""
    out = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value  # older layout
        if isinstance(value, str):
            out[name] = value
    return out


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataPreparationError(f"{path}: cannot read it as JSON ({e}); fix or remove "
                                   f"it") from None
    return config if isinstance(config, dict) else {}


def load_format(tokenizer: str, chat_template: str | None) -> ChatFormat:
    """The ChatFormat of `--chat-template` or of the `--tokenizer` tokenizer.json's folder (the
    plain format when neither has a template); the template compiled, so that a broken one is
    refused before any work."""
    folder = Path(tokenizer).parent if tokenizer not in ("byte", "bpe") else None
    config_path = folder / "tokenizer_config.json" if folder else None
    config = _read_config(config_path) if config_path and config_path.is_file() else {}
    if chat_template is not None:
        path = Path(os.path.expanduser(chat_template))
        if not path.is_file():
            raise DataPreparationError(f"--chat-template {chat_template!r}: no such file; give a "
                                       f"Jinja template or a tokenizer_config.json holding one")
        if path.suffix == ".json":
            template = _template_of(_read_config(path), f"--chat-template {chat_template!r}")
            if template is None:
                raise DataPreparationError(f"--chat-template {chat_template!r} has no "
                                           f"\"chat_template\"; give a file that holds one")
        else:
            template = path.read_text(encoding="utf-8")
        source = os.fspath(path)
    elif folder and (folder / "chat_template.jinja").is_file():
        template, source = (folder / "chat_template.jinja").read_text(encoding="utf-8"), \
            os.fspath(folder / "chat_template.jinja")
    elif config_path and config_path.is_file():
        template, source = _template_of(config, os.fspath(config_path)), os.fspath(config_path)
    else:
        template = None
    if template is None:
        return ChatFormat()
    try:
        import jinja2  # noqa: PLC0415
    except ImportError:
        raise DataPreparationError(f"the chat template of {source} needs Jinja: pip install "
                                   f"'kdjax[text]' (or pip install jinja2)") from None
    try:
        _compile(template)
    except jinja2.TemplateError as e:
        raise DataPreparationError(f"the chat template of {source} does not compile ({e}); fix "
                                   f"it or give another with --chat-template") from None
    return ChatFormat(template, source, _specials(config))
