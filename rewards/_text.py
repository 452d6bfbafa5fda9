"""Text in TRL's two shapes: a plain string, or a list of chat messages (completions and prompts).

TRL passes ``completions`` to reward functions either as strings (standard datasets) or as
lists of message dicts ``[{"role": "assistant", "content": "..."}]`` (conversational
datasets). This module reduces both to one string, and anything else (None, numbers, bytes,
malformed messages) to ``""`` so that rewards score it 0.0 instead of raising.
"""
from __future__ import annotations

MAX_CHARS = 100_000  # text beyond this (from the start) is dropped: the answer sits at the end


def completion_text(completion) -> str:
    """The text to score: the string itself, or the content of the last assistant message.

    A message content may also be a list of parts (``{"type": "text", "text": ...}``); the
    text parts are joined. Only the last ``MAX_CHARS`` characters are kept.

    >>> completion_text("<answer>1 + 2</answer>")
    '<answer>1 + 2</answer>'
    >>> completion_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "42"}])
    '42'
    >>> completion_text(None)
    ''
    """
    if isinstance(completion, str):
        text = completion
    elif isinstance(completion, dict):
        text = _content(completion)
    elif isinstance(completion, (list, tuple)) and completion:
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        pick = assistant or messages
        text = _content(pick[-1]) if pick else ""
    else:
        text = ""
    return text[-MAX_CHARS:]


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def fill_template(templates: dict, template: str, **fields) -> str | list[dict]:
    """A task prompt: ``templates[template]`` (a string, or chat messages) with ``fields`` filled in.

    >>> fill_template({"plain": "Q: {q}", "chat": [{"role": "user", "content": "{q}?"}]}, "chat", q="2+2")
    [{'role': 'user', 'content': '2+2?'}]
    """
    if template not in templates:
        raise ValueError(f"template={template!r} is not one of {sorted(templates)}")
    tpl = templates[template]
    if isinstance(tpl, str):
        return tpl.format(**fields)
    return [{"role": m["role"], "content": m["content"].format(**fields)} for m in tpl]
