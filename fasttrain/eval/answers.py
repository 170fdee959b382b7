"""Math answer extraction, normalisation and equivalence (GSM8K / MATH, as in Step-DPO).

Three public functions:

* :func:`extract_answer` -- pull the final answer out of a model completion
  (last ``\\boxed{...}``, else "The answer is: X" / "#### X", else the last number).
* :func:`normalize_answer` -- LaTeX normalisation in the spirit of Hendrycks et al.'s
  ``strip_string`` and Minerva's ``normalize_final_answer`` (written from scratch).
* :func:`is_equiv` -- string / numeric / structural / symbolic (sympy) equivalence.

Pure Python; sympy is only needed for the symbolic fallback, and it runs in a separate
worker process (see :func:`is_equiv` for why), so importing this module is cheap.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

__all__ = ["extract_answer", "is_equiv", "normalize_answer"]

# --------------------------------------------------------------------------------------
# helpers: brace matching
# --------------------------------------------------------------------------------------


def _match_brace(s: str, start: int, open_ch: str = "{", close_ch: str = "}") -> int:
    """Index of the brace closing the one at ``s[start]``, or -1.

    A backslash escapes the next character, so ``\\{`` / ``\\}`` (LaTeX set braces) and
    ``\\\\`` do not count: ``{\\{1,2\\}}`` is one group.
    """
    depth = 0
    i = start
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """Read one LaTeX macro argument starting at ``s[i]`` (spaces skipped).

    ``{...}`` gives the braced content; otherwise a single character, or a whole
    ``\\command``. Returns (argument, index after it) or None.
    """
    n = len(s)
    while i < n and s[i] == " ":
        i += 1
    if i >= n:
        return None
    if s[i] == "{":
        j = _match_brace(s, i)
        if j < 0:
            return None
        return s[i + 1 : j], j + 1
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+|\\.", s[i:])
        if m:
            return m.group(0), i + len(m.group(0))
    if s[i] in "}":
        return None
    return s[i], i + 1


# --------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_IS_RE = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
_GSM_RE = re.compile(r"####\s*(.+)")
# numbers: thousands-separated | plain int/decimal with optional /denominator | .5
# A leading "-" counts only when not preceded by a word character (so "3-4" gives 4).
_NUM_RE = re.compile(
    r"(?<![\w.])(?:(?<=[^\w])-|^-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|\.\d+)"
)
_UNIT_WORDS = (
    "dollars", "dollar", "cents", "cent", "euros", "pounds", "percent", "units", "unit",
    "meters", "meter", "cm", "mm", "km", "inches", "inch", "feet", "foot", "ft", "miles",
    "mph", "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day",
    "weeks", "years", "degrees", "kg", "grams", "g", "lbs", "ounces", "oz", "liters",
    "gallons", "square", "sq", "points", "ways", "students", "people", "apples", "cookies",
)
_PLAIN_NUM_RE = re.compile(r"^-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^-?\.\d+$")


def _boxed_contents(text: str) -> str | None:
    """Content of the last well-formed, non-empty ``\\boxed``/``\\fbox`` in ``text``."""
    for m in reversed(list(_BOX_RE.finditer(text))):
        i = m.end()
        n = len(text)
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == "{":
            j = _match_brace(text, i)
            if j < 0:  # truncated completion: try an earlier box
                continue
            content = text[i + 1 : j].strip()
        elif m.end() < n and text[m.end()] == " ":  # "\boxed 5": one whitespace-free token
            tok = re.match(r"[^\s$]+", text[i:])
            content = tok.group(0) if tok else ""
        else:
            continue
        inner = _boxed_contents(content) if _BOX_RE.match(content) else None
        if inner:  # \boxed{\boxed{5}}
            content = inner
        if content:
            return content
    return None


def _clean_answer(ans: str) -> str:
    """Tidy a free-text answer span (from "The answer is" / "####").

    Strips surrounding ``$`` / ``\\$``, trailing sentence punctuation, and -- only when
    what remains is a plain number -- a trailing unit word from a small whitelist
    ("18 dollars" -> "18", but "x dollars" is kept) and thousands separators
    ("70,000" -> "70000"). Everything else is returned as written.
    """
    ans = ans.strip()
    inner = _boxed_contents(ans)
    if inner is not None:
        return inner
    ans = re.sub(r"[\s.;:,!?]+$", "", ans)
    ans = ans.replace("\\$", "").strip()
    if ans.startswith("$") and ans.count("$") >= 2:  # "$\frac{1}{2}$ ..." -> inline math
        ans = ans[1 : ans.index("$", 1)]
    ans = ans.strip("$").strip()
    ans = re.sub(r"[\s.;:,!?]+$", "", ans)
    parts = ans.split()
    if len(parts) >= 2 and parts[-1].lower().strip(".") in _UNIT_WORDS:
        head = " ".join(parts[:-1]).strip("$").strip()
        if _PLAIN_NUM_RE.match(head):
            ans = head
    if _PLAIN_NUM_RE.match(ans):
        ans = ans.replace(",", "")
    return ans


def extract_answer(text: str) -> str | None:
    """Extract the final answer from a completion; None when nothing answer-like exists.

    Order of preference:

    1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched; escaped
       ``\\{ \\}`` do not count; an unterminated or empty box falls back to an earlier
       one), or ``\\boxed 5`` (one whitespace-free token). The content is returned
       verbatim (normalise it with :func:`normalize_answer`).
    2. the last "The answer is: X" / "The answer is X" (case-insensitive, to end of
       line), else the last GSM8K-style "#### X"; cleaned by stripping ``$``, trailing
       punctuation, a trailing unit word after a plain number, and thousands commas.
    3. the last number in the text: ``-3``, ``2.5``, ``.5``, ``1,000`` (returned as
       ``1000``), ``3/4``. A ``-`` counts as a sign only when not glued to a preceding
       word/digit ("pages 3-4" gives ``4``).
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = _boxed_contents(text)
    if boxed is not None:
        return boxed
    for pat in (_ANSWER_IS_RE, _GSM_RE):
        matches = [m.group(1) for m in pat.finditer(text)]
        for cand in reversed(matches):
            cand = _clean_answer(cand.splitlines()[0] if cand else "")
            if cand:
                return cand
    nums = _NUM_RE.findall(text)
    if not nums:
        return None
    return nums[-1].replace(",", "")


# --------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------

_UNIT_TEXT_RE = re.compile(r"\\(?:text|textrm|textnormal|mbox|mathrm)\{\s*([^{}]*)\}")
_WRAPPERS = ("\\boxed", "\\fbox", "\\textbf", "\\mathbf", "\\mathrm", "\\text", "\\textrm",
             "\\textnormal", "\\mbox", "\\operatorname", "\\mathit", "\\displaystyle")
_SPACING = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\ ",
            "\\displaystyle", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\big", "\\Big")
_UNIT_NAMES = (
    "square", "sq", "ways", "integers", "dollars", "dollar", "mph", "inches", "inch", "ft",
    "feet", "foot", "hours", "hour", "km", "units", "unit", "points", "minutes", "minute",
    "seconds", "second", "digits", "cents", "cent", "degrees", "degree", "cm", "mm", "m",
    "gm", "g", "kg", "pounds", "lbs", "meters", "meter", "miles", "days", "years",
    "students", "people", "edges", "sides", "numbers", "percent", "sqft", "mm", "s",
)
_SINGLE_VAR = r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?[a-zA-Z0-9]+\}?)?'*"


def _unwrap_macro(s: str, macro: str) -> str:
    """Replace every ``\\macro{X}`` by ``X`` (brace-matched)."""
    out = []
    i = 0
    pat = re.compile(re.escape(macro) + r"(?![a-zA-Z])\s*\{")
    while True:
        m = pat.search(s, i)
        if not m:
            out.append(s[i:])
            break
        j = _match_brace(s, m.end() - 1)
        if j < 0:
            out.append(s[i:])
            break
        out.append(s[i : m.start()])
        out.append(s[m.end() : j])
        i = j + 1
    return "".join(out)


def _fix_macro_args(s: str, macro: str, nargs: int) -> str:
    """Brace un-braced arguments: ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt3`` -> ``\\sqrt{3}``."""
    out = []
    i = 0
    pat = re.compile(re.escape(macro) + r"(?![a-zA-Z])")
    while True:
        m = pat.search(s, i)
        if not m:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i : m.end()])
        k = m.end()
        if macro == "\\sqrt" and k < len(s) and s[k] == "[":  # \sqrt[3]{x}
            j = s.find("]", k)
            if j < 0:
                out.append(s[k:])
                return "".join(out)
            out.append(s[k : j + 1])
            k = j + 1
        for _ in range(nargs):
            arg = _read_arg(s, k)
            if arg is None:
                break
            out.append("{" + arg[0] + "}")
            k = arg[1]
        i = k


def _canon_number(s: str) -> str:
    """Canonical spelling of a plain decimal: ``.5``->``0.5``, ``2.50``->``2.5``, ``3.0``->``3``."""
    m = re.fullmatch(r"([+-]?)(\d*)(?:\.(\d*))?", s)
    if not m or not (m.group(2) or m.group(3)):
        return s
    sign, ip, fp = m.group(1), m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0")
    out = ip + ("." + fp if fp else "")
    if out == "0":
        sign = ""
    return ("-" if sign == "-" else "") + out


def normalize_answer(s: str) -> str:
    """Normalise a (LaTeX) answer string for comparison.

    Steps (Hendrycks ``strip_string`` / Minerva ``normalize_final_answer`` in spirit):

    * unwrap ``\\boxed``/``\\fbox``, math delimiters ``$ \\( \\) \\[ \\]``; drop ``\\$``;
    * drop ``\\left``/``\\right``, spacing macros (``\\! \\, \\; \\quad``), ``\\displaystyle``,
      degree signs (``^\\circ``, ``^{\\circ}``, ``°``) and percent signs (``\\%``, ``%``);
      so "50\\%" normalises to "50" (see :func:`is_equiv` for the /100 reading);
    * ``\\dfrac``/``\\tfrac`` -> ``\\frac``; ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` ->
      ``\\sqrt{2}``; ``\\le``/``\\ge`` -> ``\\leq``/``\\geq``; ``\\varnothing`` -> ``\\emptyset``;
    * units: a trailing ``\\text{...}``/``\\mbox{...}`` after something else is dropped
      ("10\\text{ cm}" -> "10"); other ``\\text{X}``/``\\textbf{X}``/``\\mathrm{X}`` are
      unwrapped; a trailing plain unit word from a whitelist is dropped only after a
      number ("5 dollars" -> "5", "2 m" -> "2"; "5x" untouched);
    * ``x = 5`` -> ``5`` when the left side is a single variable (``x``, ``\\alpha``,
      ``x_1``); ``1{,}000`` / ``1\\,000`` / ``1,000`` -> ``1000`` for whole-number strings
      (a ``,`` followed by a space is a list separator, not a thousands separator);
    * all whitespace removed; plain decimals canonicalised (``.5``->``0.5``,
      ``2.50``->``2.5``, ``3.0``->``3``, ``-0``->``0``); trailing ``.`` dropped.

    Numeric equivalence of different spellings (``\\frac{1}{2}`` vs ``0.5``) is *not*
    decided here but in :func:`is_equiv`.
    """
    if s is None:
        return ""
    s = str(s).strip()
    if not s:
        return ""
    boxed = _boxed_contents(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\n", " ").replace("\t", " ")
    # math delimiters
    s = s.replace("\\$", "")
    for d in ("\\(", "\\)", "\\[", "\\]"):
        s = s.replace(d, "")
    s = s.strip().strip("$").strip()
    s = s.replace("$", "")
    # thousands separators written the LaTeX way
    s = re.sub(r"(\d)\{,\}(\d{3})", r"\1\2", s)
    s = re.sub(r"(\d)\\,(\d{3})(?!\d)", r"\1\2", s)
    for sp in _SPACING:
        s = re.sub(re.escape(sp) + (r"(?![a-zA-Z])" if sp[-1].isalpha() else ""), " ", s)
    s = s.replace("~", " ")
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\le(?![a-zA-Z])", r"\\leq", s)
    s = re.sub(r"\\ge(?![a-zA-Z])", r"\\geq", s)
    s = s.replace("\\varnothing", "\\emptyset")
    # units in \text{...} at the end, after something else
    m = re.search(r"^(.*\S)\s*\\(?:text|textrm|mbox|mathrm)\{\s*([a-zA-Z ]*)\}\s*(\^\{?[23]\}?)?\s*\.?$", s)
    if m and re.search(r"[\d}]\s*$", m.group(1)) and m.group(2).strip():
        s = m.group(1)
    for w in _WRAPPERS:
        s = _unwrap_macro(s, w)
    s = s.strip()
    s = re.sub(r"[\s.]+$", "", s) if not re.search(r"\d\.$", s) else s[:-1]
    # trailing plain unit words after a number: "5 dollars", "12 sq ft"
    for _ in range(2):
        m = re.match(r"^(.*?[\d}])\s*([a-zA-Z]+)(\^\{?[23]\}?)?$", s)
        if m and m.group(2).lower() in _UNIT_NAMES and (" " in s or len(m.group(2)) > 1) \
                and re.search(r"\d", m.group(1)):
            s = m.group(1).strip()
        else:
            break
    # "x = 5" -> "5" when the left side is a single variable
    parts = s.split("=")
    if len(parts) == 2 and re.fullmatch(r"\s*" + _SINGLE_VAR + r"\s*", parts[0]):
        s = parts[1].strip()
    # thousands separators: whole string is a number and commas are not list separators
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s.strip()):
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    s = _fix_macro_args(s, "\\frac", 2)
    s = _fix_macro_args(s, "\\sqrt", 1)
    s = _fix_macro_args(s, "\\binom", 2)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)  # ".5" -> "0.5" inside expressions too
    s = re.sub(r"(?<![\d.])(\d+)\.0+(?![\d])", r"\1", s)  # "3.0" -> "3"
    s = _canon_number(s)
    if s.startswith("+") and len(s) > 1:
        s = s[1:]
    return s


# --------------------------------------------------------------------------------------
# numeric parsing (no sympy)
# --------------------------------------------------------------------------------------


def _to_number(s: str) -> Fraction | float | None:
    """Value of a normalised *simple* numeric string, else None.

    Accepts ``-3``, ``2.5``, ``1e-3``, ``a/b``, ``\\frac{a}{b}``, ``-\\frac{a}{b}``,
    ``a\\frac{b}{c}`` is *not* accepted (ambiguous mixed number vs product).
    """
    s = s.strip()
    neg = False
    while s.startswith(("-", "+")):
        neg ^= s[0] == "-"
        s = s[1:]
    if s.startswith("(") and s.endswith(")") and _match_brace(s, 0, "(", ")") == len(s) - 1:
        v = _to_number(s[1:-1])
        return None if v is None else (-v if neg else v)
    val: Fraction | float | None = None
    if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", s):
        val = Fraction(s)
    elif re.fullmatch(r"(?:\d+(?:\.\d*)?|\.\d+)[eE][+-]?\d+", s):
        val = float(s)
    else:
        m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(
            r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", s)
        if m:
            try:
                num, den = Fraction(m.group(1)), Fraction(m.group(2))
            except (ValueError, ZeroDivisionError):
                return None
            if den == 0:
                return None
            val = num / den
    if val is None:
        return None
    return -val if neg else val


def _close(a, b, rel_tol: float) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction) and a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)
    except (OverflowError, ValueError):
        return False


def _has_percent(raw: str) -> bool:
    return "%" in raw or bool(re.search(r"\bpercent\b", raw, re.IGNORECASE))


# --------------------------------------------------------------------------------------
# structure: tuples, intervals, sets, unions, lists
# --------------------------------------------------------------------------------------


def _split_top(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside (), [], {}, \\{ \\} (escaped braces count as brackets)."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            cur.append(s[i : i + 2])
            i += 2
            continue
        if s.startswith(sep, i) and depth == 0:
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _structure(s: str):
    """(kind, open, close, elements) for tuples/intervals/sets/lists, else None."""
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        return ("set", "\\{", "\\}", _split_top(inner, ","))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        # outer pair must enclose everything: check depth never hits 0 before the end
        depth = 0
        for k, c in enumerate(s):
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
                if depth == 0 and k != len(s) - 1:
                    break
        else:
            elems = _split_top(s[1:-1], ",")
            if len(elems) >= 2:
                return ("seq", s[0], s[-1], elems)
    elems = _split_top(s, ",")
    if len(elems) >= 2:
        return ("list", "", "", elems)
    return None


# --------------------------------------------------------------------------------------
# LaTeX -> sympy syntax
# --------------------------------------------------------------------------------------

_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh",
          "cosh", "tanh", "log", "ln", "exp"}
_SYMBOLS = {"pi": "pi", "infty": "oo", "infinity": "oo", "cdot": "*", "times": "*",
            "div": "/", "alpha": "alpha", "beta": "beta", "gamma": "gamma", "theta": "theta",
            "phi": "phi", "lambda": "lamda", "mu": "mu", "sigma": "sigma", "omega": "omega",
            "tau": "tau", "delta": "delta", "epsilon": "epsilon", "rho": "rho"}
_SAFE_RE = re.compile(r"^[0-9a-zA-Z+\-*/(). ,]*$")


def _latex_to_sympy(s: str) -> str | None:
    """Convert a normalised LaTeX-ish string to sympy ``parse_expr`` syntax (or None).

    Handles ``\\frac{a}{b}``, ``\\sqrt{x}``, ``\\sqrt[n]{x}``, ``\\binom{n}{k}``, ``^``/``^{}``,
    ``\\pi``, ``\\infty``, ``\\cdot``/``\\times``/``\\div``, ``\\sin`` etc, greek letters,
    ``{}`` grouping and ``x_1``/``x_{12}`` subscripts. Anything else -> None. The output
    is restricted to a small character set (no ``_``, quotes, ``[]`` or ``=``), which,
    with builtins removed from the eval namespace, keeps ``parse_expr`` (which calls
    ``eval``) from doing anything but arithmetic.
    """
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            m = re.match(r"\\([a-zA-Z]+)", s[i:])
            if not m:
                return None
            name = m.group(1)
            i += len(m.group(0))
            if name in ("frac", "binom"):
                a1 = _read_arg(s, i)
                if a1 is None:
                    return None
                a2 = _read_arg(s, a1[1])
                if a2 is None:
                    return None
                x, y = _latex_to_sympy(a1[0]), _latex_to_sympy(a2[0])
                if x is None or y is None:
                    return None
                out.append(f"(({x})/({y}))" if name == "frac" else f"binomial({x},{y})")
                i = a2[1]
            elif name == "sqrt":
                root = None
                if i < n and s[i] == "[":
                    j = s.find("]", i)
                    if j < 0:
                        return None
                    root = _latex_to_sympy(s[i + 1 : j])
                    if root is None:
                        return None
                    i = j + 1
                a = _read_arg(s, i)
                if a is None:
                    return None
                x = _latex_to_sympy(a[0])
                if x is None:
                    return None
                out.append(f"sqrt({x})" if root is None else f"(({x})**(1/({root})))")
                i = a[1]
            elif name in _FUNCS:
                out.append(" " + {"ln": "log", "arcsin": "asin", "arccos": "acos",
                                  "arctan": "atan"}.get(name, name))
            elif name in _SYMBOLS:
                out.append(" " + _SYMBOLS[name] + " ")
            else:
                return None
        elif c == "^":
            a = _read_arg(s, i + 1)
            if a is None:
                return None
            x = _latex_to_sympy(a[0])
            if x is None:
                return None
            out.append(f"**({x})")
            i = a[1]
        elif c == "_":
            a = _read_arg(s, i + 1)
            if a is None or not re.fullmatch(r"[a-zA-Z0-9]+", a[0]):
                return None
            base = out.pop() if out and re.fullmatch(r"[a-zA-Z]", out[-1]) else None
            if base is None:
                return None
            out.append(f" {base}{a[0]} ")  # x_1 -> " x1 ": one symbol (worker keeps it whole)
            i = a[1]
        elif c == "{":
            out.append("(")
            i += 1
        elif c == "}":
            out.append(")")
            i += 1
        else:
            out.append(c)
            i += 1
    res = "".join(out).strip()
    if not res or not _SAFE_RE.match(res) or "." in re.sub(r"\d\.\d|\.\d|\d\.", "", res):
        return None
    return res


# --------------------------------------------------------------------------------------
# sympy worker process
# --------------------------------------------------------------------------------------


_SYMPY_NAMES = ("Integer", "Float", "Number", "Rational", "Symbol", "sqrt", "pi", "E", "I", "oo", "sin",
                "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh",
                "tanh", "log", "exp", "binomial")


def _worker_main() -> None:  # pragma: no cover - runs in the child process
    """Child loop: read JSON requests on stdin, answer on stdout, one line each."""
    try:
        import resource

        lim = 4 << 30
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    except Exception:  # noqa: BLE001, S110 - never raise from grading
        pass
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    # Allowlisted namespace only (no preview/plot/sympify/var...), and no builtins:
    # every other name becomes a Symbol through the auto_symbol transformation.
    ns: dict = {name: getattr(sympy, name) for name in _SYMPY_NAMES}
    ns["__builtins__"] = {}
    transforms = standard_transformations + (implicit_multiplication_application, convert_xor)
    out = sys.stdout
    sys.stdout = sys.stderr  # (DEVNULL) nothing sympy prints can corrupt the reply stream
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        ok = False
        try:
            req = json.loads(line)
            # subscripted names ("x1" from x_1) are declared so split_symbols keeps them whole
            subs = {t: sympy.Symbol(t) for t in re.findall(r"\b[a-zA-Z][0-9]+\b", req["a"] + " " + req["b"])}
            a = parse_expr(req["a"], local_dict=dict(subs), global_dict=dict(ns), transformations=transforms)
            b = parse_expr(req["b"], local_dict=dict(subs), global_dict=dict(ns), transformations=transforms)
            ok = _sympy_equal(sympy, a, b, float(req["rel_tol"]))
        except BaseException:  # noqa: BLE001 - any failure means "not shown equal"
            ok = False
        out.write(json.dumps({"ok": bool(ok)}) + "\n")
        out.flush()


def _sympy_equal(sympy, a, b, rel_tol: float) -> bool:
    a, b = sympy.sympify(a), sympy.sympify(b)
    if not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return False
    if a == b:
        return True
    if not a.free_symbols and not b.free_symbols:
        try:
            va, vb = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
            if math.isfinite(abs(va)) and math.isfinite(abs(vb)):
                return abs(va - vb) <= max(rel_tol * max(abs(va), abs(vb)), 1e-12)
        except (TypeError, ValueError, OverflowError):
            pass
    diff = sympy.simplify(a - b)
    return diff == 0


class _SympyWorker:
    """A persistent ``python`` child running :func:`_worker_main`, killed on timeout.

    Started with ``subprocess`` (not ``multiprocessing``): no re-import of the user's
    ``__main__``, no fork of a multi-threaded (torch) parent, and it only imports sympy.
    Startup (~1 s, importing sympy) is not charged to the per-comparison timeout.
    """

    STARTUP_TIMEOUT_S = 60.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()

    def _start(self) -> None:
        code = ("import importlib.util,sys;"
                "spec=importlib.util.spec_from_file_location('_fasttrain_answers_worker',sys.argv[1]);"
                "m=importlib.util.module_from_spec(spec);spec.loader.exec_module(m);m._worker_main()")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self._buf = b""
        if self._readline(self.STARTUP_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError("sympy worker failed to start")

    def _readline(self, timeout: float) -> str | None:
        import time

        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode().strip()

    def kill(self) -> None:
        p, self._proc = self._proc, None
        if p is not None:
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:  # noqa: BLE001, S110 - never raise from grading
                pass

    def compare(self, a: str, b: str, rel_tol: float, timeout_s: float) -> bool | None:
        """True/False from sympy; None on timeout or worker failure (worker is killed)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write((json.dumps({"a": a, "b": b, "rel_tol": rel_tol}) + "\n").encode())
                self._proc.stdin.flush()
            except OSError:
                self.kill()
                return None
            line = self._readline(timeout_s)
            if line is None:  # timeout or crash: the child may be stuck, replace it
                self.kill()
                return None
            try:
                return bool(json.loads(line)["ok"])
            except (ValueError, KeyError, TypeError):
                self.kill()
                return None


_WORKER = _SympyWorker()
atexit.register(_WORKER.kill)


_SYM_CACHE: dict[tuple[str, str, float], bool] = {}
_SYM_CACHE_MAX = 4096


def _symbolic_equal(a: str, b: str, rel_tol: float, timeout_s: float) -> bool:
    """Memoised worker call; timeouts and worker failures are answered False, not cached."""
    key = (a, b, rel_tol)
    if key in _SYM_CACHE:
        return _SYM_CACHE[key]
    try:
        res = _WORKER.compare(a, b, rel_tol, timeout_s)
    except Exception:  # noqa: BLE001 - never raise from grading
        return False
    if res is not None:
        if len(_SYM_CACHE) >= _SYM_CACHE_MAX:
            _SYM_CACHE.clear()
        _SYM_CACHE[key] = res
    return bool(res)


# --------------------------------------------------------------------------------------
# equivalence
# --------------------------------------------------------------------------------------

_MAX_LEN = 2000


def _scalar_equiv(p: str, r: str, p_pct: bool, r_pct: bool, timeout_s: float, rel_tol: float) -> bool:
    if p == r:
        return True
    if not p or not r:
        return False
    pv, rv = _to_number(p), _to_number(r)
    if pv is not None and rv is not None:
        cands = [(pv, rv)]
        if p_pct and not r_pct:
            cands.append((pv / 100, rv))
        if r_pct and not p_pct:
            cands.append((pv, rv / 100))
        return any(_close(x, y, rel_tol) for x, y in cands)
    if timeout_s <= 0:
        return False
    ps, rs = _latex_to_sympy(p), _latex_to_sympy(r)
    if ps is None or rs is None:
        return False
    if ps.replace(" ", "") == rs.replace(" ", ""):
        return True
    if len(ps) > _MAX_LEN or len(rs) > _MAX_LEN:
        return False
    return _symbolic_equal(ps, rs, float(rel_tol), float(timeout_s))


def _equiv_norm(p: str, r: str, p_pct: bool, r_pct: bool, timeout_s: float, rel_tol: float,
                depth: int = 0) -> bool:
    if p == r:
        return True
    if depth > 4:
        return False
    # unions of intervals/sets: same pieces in the same order
    pu, ru = _split_top(p, "\\cup"), _split_top(r, "\\cup")
    if len(pu) > 1 or len(ru) > 1:
        return len(pu) == len(ru) and all(
            _equiv_norm(x, y, p_pct, r_pct, timeout_s, rel_tol, depth + 1) for x, y in zip(pu, ru))
    ps, rs = _structure(p), _structure(r)
    if ps is not None or rs is not None:
        if ps is None or rs is None:
            return False
        pk, po, pc, pe = ps
        rk, ro, rc, re_ = rs
        if pk != rk or po != ro or pc != rc or len(pe) != len(re_):
            return False

        def eq(x: str, y: str) -> bool:
            return _equiv_norm(x, y, p_pct, r_pct, timeout_s, rel_tol, depth + 1)

        if pk == "seq":  # tuples / intervals: ordered
            return all(eq(x, y) for x, y in zip(pe, re_))
        # sets and bare comma lists ("all solutions, separated by commas"): unordered
        remaining = list(re_)
        for x in pe:
            for k, y in enumerate(remaining):
                if eq(x, y):
                    del remaining[k]
                    break
            else:
                return False
        return True
    return _scalar_equiv(p, r, p_pct, r_pct, timeout_s, rel_tol)


def is_equiv(pred: str | None, ref: str, *, timeout_s: float = 2.0, rel_tol: float = 1e-4) -> bool:
    """Is the predicted answer equivalent to the reference? Never raises (garbage -> False).

    Checks, cheapest first:

    1. string equality after :func:`normalize_answer`;
    2. structure: ``A \\cup B`` piecewise in order; ``(a, b)`` / ``[a, b)`` ordered and
       element-wise, and the brackets must match exactly (so ``(1,2)`` != ``[1,2]``;
       a tuple and an open interval are indistinguishable and compare equal);
       ``\\{a, b\\}`` sets and bare ``a, b`` lists unordered (multiset matching);
       structured vs scalar is False;
    3. numbers: ints, decimals, ``a/b``, ``\\frac{a}{b}`` compared exactly as fractions,
       else with ``math.isclose(rel_tol=rel_tol, abs_tol=1e-12)``. Percentages: when
       exactly one side was written with ``%`` / ``\\%`` / "percent", both its face value
       and its value/100 are accepted, so ``50%`` == ``50`` and ``50%`` == ``0.5``
       (graders usually accept both spellings of a percentage answer);
    4. symbolic: both sides converted LaTeX -> sympy syntax (see ``_latex_to_sympy``),
       parsed with implicit multiplication, equal if structurally equal, if both are
       constants whose numeric values agree within ``rel_tol``, or if
       ``simplify(a - b) == 0``.

    Timeout design: sympy runs in a persistent child *process* (``subprocess``, started
    on first use, reused), and the parent waits at most ``timeout_s`` for its reply;
    on timeout the child is killed (restarted lazily) and the answer is False. A
    process rather than ``signal.alarm`` because it also bounds C-level work (huge
    integer powers), works from any thread and on any platform with ``select`` on
    pipes, and the child gets a 4 GiB address-space limit. ``timeout_s <= 0`` disables
    the sympy step entirely. Symbolic results are memoised (timeouts are not).
    """
    try:
        if pred is None or ref is None:
            return False
        pred, ref = str(pred), str(ref)
        if len(pred) > 10 * _MAX_LEN or len(ref) > 10 * _MAX_LEN:
            return False
        p, r = normalize_answer(pred), normalize_answer(ref)
        if not p or not r:
            return False
        return _equiv_norm(p, r, _has_percent(pred), _has_percent(ref), float(timeout_s), float(rel_tol))
    except Exception:  # noqa: BLE001 - never raise from grading
        return False
