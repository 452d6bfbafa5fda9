"""Safe arithmetic for untrusted model output: a tokenizer and a recursive-descent parser.

This module turns a string such as ``"(3 + 5) * 7 - 34"`` into an exact ``Fraction`` and the
list of integer literals it used. It never calls ``eval``/``exec``/``compile``; the grammar
admits only ASCII digits, the four operators ``+ - * /``, parentheses and ASCII whitespace:

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := INTEGER | '(' expr ')'

There is no unary minus, no decimal point, no exponent (``**`` is two operators in a row, a
syntax error). Every resource is bounded before or while parsing: input length, literal count,
literal digits, parenthesis depth and the bit length of every intermediate numerator and
denominator. Any violation, and division by zero, raises :class:`ArithError`; callers in
``rewards.countdown`` turn that into a reward of 0.0.

Also here: a small expression-tree printer with minimal parentheses, shared by the Countdown
solver and problem generator.
"""
from __future__ import annotations

import re
from fractions import Fraction

MAX_LENGTH = 256  # characters; a 4-number Countdown answer is ~20
MAX_DEPTH = 32  # nested parentheses
MAX_LITERALS = 32
MAX_LITERAL_DIGITS = 12
MAX_BITS = 256  # bound on numerator/denominator of every intermediate value

_ALLOWED = re.compile(r"[0-9+\-*/() \t\n\r]*")  # ASCII only: str.isdigit() also admits '３', '²'
_TOKEN = re.compile(r"[0-9]+|[-+*/()]")
_END = ""  # sentinel token after the last one


class ArithError(ValueError):
    """The text is not a bounded, well-formed arithmetic expression, or divides by zero."""


def _tokenize(text: str) -> list[str]:
    """Split into integer literals, operators and parentheses; reject anything else."""
    if not _ALLOWED.fullmatch(text):
        bad = next(i for i, ch in enumerate(text) if not _ALLOWED.fullmatch(ch))
        raise ArithError(f"character {text[bad]!r} at position {bad} is not allowed")
    tokens = _TOKEN.findall(text)
    for tok in tokens:
        if len(tok) > MAX_LITERAL_DIGITS:
            raise ArithError(f"literal of {len(tok)} digits exceeds {MAX_LITERAL_DIGITS}")
    tokens.append(_END)
    return tokens


class _Parser:
    """Recursive descent over the token list, evaluating exactly as it goes.

    Values stay Python ints until a division leaves a remainder, then become Fractions:
    exact either way, and int arithmetic is several times faster than Fraction's.
    """

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.literals: list[int] = []

    def expr(self) -> int | Fraction:
        value = self.term()
        while self.tokens[self.pos] in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term()
            value = _check(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> int | Fraction:
        value = self.factor()
        while self.tokens[self.pos] in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.factor()
            if op == "*":
                value = _check(value * rhs)
            elif rhs == 0:
                raise ArithError("division by zero")
            elif isinstance(value, int) and isinstance(rhs, int) and value % rhs == 0:
                value = value // rhs
            else:
                value = _check(Fraction(value) / rhs)
        return value

    def factor(self) -> int | Fraction:
        tok = self.tokens[self.pos]
        self.pos += 1
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ArithError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr()
            if self.tokens[self.pos] != ")":
                raise ArithError("unbalanced parentheses")
            self.pos += 1
            self.depth -= 1
            return value
        if tok and tok[0] in "0123456789":
            value = int(tok)
            self.literals.append(value)
            if len(self.literals) > MAX_LITERALS:
                raise ArithError(f"more than {MAX_LITERALS} numbers")
            return value
        if tok == _END:
            raise ArithError("unexpected end of expression")
        raise ArithError(f"unexpected token {tok!r}")


def _check(value: int | Fraction) -> int | Fraction:
    if isinstance(value, int):
        if value.bit_length() > MAX_BITS:
            raise ArithError(f"intermediate value exceeds {MAX_BITS} bits")
    elif value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
        raise ArithError(f"intermediate value exceeds {MAX_BITS} bits")
    return value


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """Evaluate an arithmetic expression exactly; return (value, integer literals in order).

    >>> evaluate("(3 + 5) * 7 - 34")
    (Fraction(22, 1), [3, 5, 7, 34])
    >>> evaluate("7 / 2 * 4")
    (Fraction(14, 1), [7, 2, 4])
    >>> evaluate("__import__('os')")
    Traceback (most recent call last):
    ...
    rewards._arith.ArithError: character '_' at position 0 is not allowed
    >>> evaluate("2 ** 3")
    Traceback (most recent call last):
    ...
    rewards._arith.ArithError: unexpected token '*'
    """
    if not isinstance(text, str):
        raise ArithError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ArithError(f"expression of {len(text)} characters exceeds {MAX_LENGTH}")
    parser = _Parser(_tokenize(text))
    value = parser.expr()
    if parser.tokens[parser.pos] != _END:
        raise ArithError(f"unexpected token {parser.tokens[parser.pos]!r}")
    return Fraction(value), parser.literals


# ---- expression trees: int leaves, (op, left, right) nodes ---------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def tree_to_str(node) -> str:
    """Print a tree with only the parentheses that the usual precedence rules need.

    >>> tree_to_str(("*", ("+", 3, 5), ("-", 7, 2)))
    '(3 + 5) * (7 - 2)'
    >>> tree_to_str(("-", 10, ("-", 4, 1)))
    '10 - (4 - 1)'
    """
    if not isinstance(node, tuple):
        return str(node)
    op, left, right = node
    ls, rs = tree_to_str(left), tree_to_str(right)
    if isinstance(left, tuple) and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    if isinstance(right, tuple) and (
        _PREC[right[0]] < _PREC[op] or (_PREC[right[0]] == _PREC[op] and op in "-/")
    ):
        rs = f"({rs})"
    return f"{ls} {op} {rs}"
