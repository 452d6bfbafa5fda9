"""Numbers in model output: the final answer of a completion, as an exact value.

Shared by the tasks whose answer is one number (GSM8K, arithmetic). A linear-time regex finds
the final answer (after ``####``, else in the last ``\\boxed{}``, else after "the answer is",
else the last number) and normalises commas, ``$``, units, signs, decimals, ``a/b`` and
``\\frac{a}{b}``; ``to_fraction`` turns it into an exact ``int`` or ``Fraction``. Nothing is
ever evaluated: model output is untrusted text.
"""
from __future__ import annotations

import re
from fractions import Fraction

MAX_CHARS = 20_000  # only the tail is searched: the final answer sits at the end
_MAX_NUMBER_CHARS = 64

# Digits first (the lookahead lets the regex engine skip non-digit text quickly); a sign or
# "$" in front is read by _normalize, which looks back from the match.
_NUMBER = re.compile(
    r"(?=[\d.])(?<![\w.])"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>\d+)(?![\d.]))?",
    re.ASCII,  # ASCII digits only: without it, \d also reads '３' or '٣' as numbers
)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
_FRAC = re.compile(r"(?P<sign>-?)\s*\\[dt]?frac\s*\{\s*(?P<num>\d+)\s*\}\s*\{\s*(?P<den>\d+)\s*\}", re.ASCII)
_UNIT_GROUP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}")
_LATEX_NOISE = re.compile(r"\\[$%,!; ]|[$%~]|\\left|\\right")


def _negative(text: str, start: int) -> bool:
    """Whether the number at ``start`` carries a minus sign: "-5", "-$5", not "5-3" or "5 - 3"."""
    j = start
    if j > 0 and text[j - 1] == "$":
        j -= 1
    if j == 0 or text[j - 1] not in "-\u2212":
        return False
    return j == 1 or not (text[j - 2].isalnum() or text[j - 2] in "_.")


def _normalize(text: str, match: re.Match) -> str:
    sign = "-" if _negative(text, match.start()) else ""
    den = match.group("den")
    return sign + match.group("num").replace(",", "") + (f"/{den}" if den else "")


def first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return None if match is None else _normalize(text, match)


def _last_number(text: str) -> str | None:
    """The last number; only a window before the last digit is searched (str.rfind is C-fast)."""
    end = max(text.rfind(d) for d in "0123456789")
    if end < 0:
        return None
    last = None
    # a number longer than the window is invalid anyway (> _MAX_NUMBER_CHARS): no match there
    for last in _NUMBER.finditer(text, max(0, end - 2 * _MAX_NUMBER_CHARS), end + 1):
        pass
    return None if last is None else _normalize(text, last)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _boxed_value(content: str) -> str | None:
    """A number string when the boxed content is one number (or \\frac), else cleaned LaTeX."""
    cleaned = _LATEX_NOISE.sub(" ", _UNIT_GROUP.sub(" ", content.replace("{,}", ","))).strip()
    if not cleaned:
        return None
    frac = _FRAC.fullmatch(cleaned)
    if frac:
        return frac.group("sign") + frac.group("num") + "/" + frac.group("den")
    numbers = list(_NUMBER.finditer(cleaned))
    if len(numbers) == 1 and not re.search(r"[\\^=*+{}()]", cleaned):
        return _normalize(cleaned, numbers[0])  # one number with words around it: "18 dollars"
    return cleaned


def extract_final_answer(text: str) -> str | None:
    """The model's final answer as a normalised string, or None when there is none.

    Only the text after the last ``</think>`` counts, when there is one. Then the first
    number after the last ``####``; else the content of the last ``\\boxed{}``; else the first
    number after the last "answer is" / "answer:"; else the last number. Numbers lose ``$``,
    thousands commas and units; ``a/b`` and ``\\frac{a}{b}`` become ``"a/b"``. A boxed answer the
    fast path cannot read is returned as its LaTeX (for the math-verify fallback).

    >>> extract_final_answer("9 * 2 = 18\\n#### 18")
    '18'
    >>> extract_final_answer("So she makes $1,250.50 a week. The answer is $1,250.50.")
    '1250.50'
    >>> extract_final_answer("<think>maybe 7</think> The total is \\\\boxed{\\\\frac{3}{4}}")
    '3/4'
    >>> extract_final_answer("She lost 5 and has -3 left.")
    '-3'
    >>> extract_final_answer("no digits here") is None
    True
    """
    if not isinstance(text, str):
        return None
    text = text[-MAX_CHARS:]
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "####" in text:
        return first_number(text.rsplit("####", 1)[1])
    boxed = _last_boxed(text)
    if boxed is not None:
        return _boxed_value(boxed)
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is not None:
        number = first_number(text[last.end():])
        if number is not None:
            return number
    return _last_number(text)


_VALUE = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?", re.ASCII)


def to_fraction(s: str) -> int | Fraction | None:
    """Exact value of a normalised number string (an int when it is one); None if not a number."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    if s.isascii() and (s.isdigit() or (s[:1] == "-" and s[1:].isdigit())):
        return int(s)  # the common case, without Fraction's string parsing
    if not _VALUE.fullmatch(s):
        return None
    num, _, den = s.partition("/")
    if den and int(den) == 0:
        return None
    return Fraction(num) / (int(den) if den else 1)
