"""The ``lightning-score`` command's error lines: one line that says what is wrong and what is accepted.

jsonargparse reports a bad value of a nested argument as a tree ("Does not validate against any of the
Union subtypes … NestedArg(key='mode', …)") after ~60 lines of usage; :func:`one_line` reduces it to the
argument, the accepted values and the value given. :func:`own_error` finds, in a chain of wrapped errors,
the one lightning-score raised (its message names the file and the fix); :func:`raised_while_running` tells
input errors from failures inside Lightning's loops, which keep their traceback; :func:`in_chain` finds an
error of a kind (a refused YAML tag, an unwritable output) however jsonargparse wrapped it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

__all__ = ["in_chain", "one_line", "own_error", "raised_while_running"]

_E = TypeVar("_E", bound=BaseException)

_KEY = re.compile(r'Parser key "([^"]+)"')
_LITERAL = re.compile(r"Expected a typing\.Literal\[(?P<values>.*?)\]\. Got value: (?P<value>.*)$", re.MULTILINE)
_EXPECTED = re.compile(r"Expected a (?P<type><class '[\w.]+'>|[\w.\[\], ]+)\. Got value: (?P<value>.*)$", re.MULTILINE)
_SUBTYPES = re.compile(r"^\s*Subtypes: \[(?P<types>.*)\]\s*$", re.MULTILINE)
_GIVEN = re.compile(r"^\s*Given value: (?P<value>.*)$", re.MULTILINE)
_TYPE_NAMES = {"NoneType": "null", "str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}


def _type_name(text: str) -> str:
    text = text.strip()
    match = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", text)
    name = match.group(1) if match else text
    if name.startswith(("list[", "List[", "Sequence[", "tuple[")):
        return "a list"
    return _TYPE_NAMES.get(name, name)


def _split_types(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(<":
            depth += 1
        elif char in "])>":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in (*parts, current) if p.strip()]


def _flag(keys: list[str]) -> str:
    """``["model", "mode"]`` → ``--model.init_args.mode`` (a subclass argument's init argument)."""
    if len(keys) >= 2 and keys[0] in ("model", "data", "optimizer", "lr_scheduler") and keys[1] != "init_args":
        keys = [keys[0], "init_args", *keys[1:]]
    return "--" + ".".join(keys)


def one_line(message: str) -> str:
    r"""A jsonargparse error message as one line: the argument, what it accepts, what was given.

    Other one-line messages are returned unchanged.

    Example:
        >>> one_line('Parser key "model":\n  Problem:\n    Parser key "mode":\n'
        ...          "      Expected a typing.Literal['merge', 'zeroshot']. Got value: zero-shot")
        "--model.init_args.mode: 'zero-shot' is not one of merge, zeroshot."
    """
    lines = [line for line in message.splitlines() if line.strip()]
    keys = _KEY.findall(message)
    where = f"{_flag(keys)}: " if keys else ""
    last = message[message.rfind('Parser key "') :] if keys else message
    literal = _LITERAL.search(last)
    if literal is not None:
        values = ", ".join(v.strip().strip("'\"") for v in literal["values"].split(","))
        return f"{where}'{literal['value'].strip()}' is not one of {values}."
    expected = _EXPECTED.search(last)
    if expected is not None:
        value = expected["value"].strip()
        kind = _type_name(expected["type"])
        kind = f"a list, e.g. '[{value}]'" if kind == "a list" else kind
        return f"{where}expected {kind}; got '{value}'."
    subtypes, given = _SUBTYPES.search(last), _GIVEN.search(last)
    if subtypes is not None and given is not None:
        value = given["value"].strip()
        accepted = [_type_name(t) for t in _split_types(subtypes["types"])]
        accepted = [f"a list, e.g. '[{value}]'," if a == "a list" else a for a in dict.fromkeys(accepted)]
        return f"{where}expected {' or '.join(accepted)}; got '{value}'."
    if len(lines) <= 1:
        return message.strip()
    detail = next((line.strip() for line in last.splitlines()[1:] if line.strip()), lines[-1].strip())
    return f"{where}{detail}"


_PACKAGE = Path(__file__).resolve().parents[1]  # lightning_score/


def raised_while_running(error: BaseException) -> bool:
    """Whether the error came from inside one of Lightning's loops (training, validation, test, predict).

    Errors before the loops start (configuration, files, domains, fingerprints, refused strategies) are input
    errors; one raised while a loop runs is a failure during training or evaluation and keeps its traceback.
    """
    frame = error.__traceback__
    while frame is not None:
        parts = Path(frame.tb_frame.f_code.co_filename).parts
        if any(parts[i : i + 3] == ("lightning", "pytorch", "loops") for i in range(len(parts))):
            return True
        frame = frame.tb_next
    return False


def own_error(error: BaseException) -> BaseException:
    """The error lightning-score itself raised (its message names the file and the fix), else ``error``.

    jsonargparse wraps an error raised while instantiating a class in its own, and our error may itself
    wrap a library's (safetensors' bare "header too large"): the outermost error raised by a line of this
    package is the one that names the file and says what to do.
    """
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frame = current.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        if frame is not None and _PACKAGE in Path(frame.tb_frame.f_code.co_filename).resolve().parents:
            return current
        current = current.__cause__ or current.__context__
    return error


def in_chain(error: BaseException, kind: type[_E]) -> _E | None:
    """The first error of ``kind`` in ``error``'s chain of causes and contexts (``error`` included), else None.

    Example:
        >>> try:
        ...     try:
        ...         raise KeyError("inner")
        ...     except KeyError as inner:
        ...         raise TypeError("outer") from inner
        ... except TypeError as outer:
        ...     print(repr(in_chain(outer, KeyError)), in_chain(outer, OSError))
        KeyError('inner') None
    """
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
