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

from fractions import Fraction

MAX_LENGTH = 256  # characters; a 4-number Countdown answer is ~20
MAX_DEPTH = 32  # nested parentheses
MAX_LITERALS = 32
MAX_LITERAL_DIGITS = 12
MAX_BITS = 256  # bound on numerator/denominator of every intermediate value

_OPS = "+-*/"
_SPACE = " \t\n\r"
_DIGITS = "0123456789"  # ASCII only: str.isdigit() also admits '３' and '²'


class ArithError(ValueError):
    """The text is not a bounded, well-formed arithmetic expression, or divides by zero."""


def _tokenize(text: str) -> list[str]:
    """Split into integer literals, operators and parentheses; reject anything else."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _SPACE:
            i += 1
        elif ch in _DIGITS:
            j = i
            while j < n and text[j] in _DIGITS:
                j += 1
            if j - i > MAX_LITERAL_DIGITS:
                raise ArithError(f"literal of {j - i} digits exceeds {MAX_LITERAL_DIGITS}")
            tokens.append(text[i:j])
            i = j
        elif ch in _OPS or ch in "()":
            tokens.append(ch)
            i += 1
        else:
            raise ArithError(f"character {ch!r} at position {i} is not allowed")
    return tokens


class _Parser:
    """Recursive descent over the token list, evaluating exactly as it goes."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.literals: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            value = _check(value + self.term() if op == "+" else value - self.term())
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor()
            if op == "*":
                value = _check(value * rhs)
            elif rhs == 0:
                raise ArithError("division by zero")
            else:
                value = _check(value / rhs)
        return value

    def factor(self) -> Fraction:
        tok = self.take()
        if tok is None:
            raise ArithError("unexpected end of expression")
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ArithError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr()
            if self.take() != ")":
                raise ArithError("unbalanced parentheses")
            self.depth -= 1
            return value
        if tok[0] in _DIGITS:
            self.literals.append(int(tok))
            if len(self.literals) > MAX_LITERALS:
                raise ArithError(f"more than {MAX_LITERALS} numbers")
            return Fraction(int(tok))
        raise ArithError(f"unexpected token {tok!r}")


def _check(value: Fraction) -> Fraction:
    if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
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
    if parser.peek() is not None:
        raise ArithError(f"unexpected token {parser.peek()!r}")
    return value, parser.literals


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
