"""What the documentation shows: its fenced blocks, the commands in them, the files.

The rules a document follows so that its commands can be run as written:

- Commands go in a block labelled ``sh`` (``bash``, ``shell``), one a line, a trailing
  ``\\`` continuing it; or in a ``console`` block as ``$ command`` followed by exactly
  what it prints (``...`` stands for any text). A block of another language, or none,
  holds no command.
- A command that is meant to fail says so in its comment: ``# exit status 1: ...``.
- ``export NAME=value`` sets a variable for the commands after it in that document.
- A file the reader writes is a block whose preceding line is ``File `path`:``; the
  commands of the document run where those files are.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL = frozenset({"sh", "bash", "shell"})
CONSOLE = "console"
_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)(.*)$")
_FILE = re.compile(r"^File `([^`]+)`:$")
_EXIT = re.compile(r"\bexit status (\d+)\b")


def documents() -> list[Path]:
    """Every document whose commands are run: the README, docs/ and the examples' READMEs."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found += sorted((ROOT / "examples").rglob("README.md"))
    return [path for path in found if path.is_file()]


def name(path: Path) -> str:
    """A document's path from the checkout (as is, for one outside it)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass(frozen=True)
class Block:
    document: Path
    line: int
    """The line of the opening fence (1-based)."""
    language: str
    text: str
    file: str | None = None
    """The path the block is the content of (``File `path`:`` before it)."""

    @property
    def where(self) -> str:
        return f"{name(self.document)}:{self.line}"


@dataclass
class Command:
    block: Block
    line: int
    text: str
    """As shown, continuation lines joined with their backslash-newline."""
    expect_status: int = 0
    comment: str = ""
    output: str | None = None
    """What a ``console`` block shows it printing; ``None``: not compared."""

    @property
    def where(self) -> str:
        return f"{name(self.block.document)}:{self.line}"

    @property
    def key(self) -> str:
        """The command without comment and with its words single-spaced."""
        return " ".join(shlex.split(self.text, comments=True))


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, language = match.group(1), match.group(2).lower()
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].startswith(fence):
            body.append(lines[index])
            index += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = _FILE.match(previous.strip())
        text = "\n".join(body) + "\n"
        found.append(Block(path, start + 1, language, text, marker.group(1) if marker else None))
        index += 1
    return found


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its trailing comment (``#`` outside quotes, at the start
    of a word)."""
    quote = ""
    for position, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1].isspace()):
            return line[:position].rstrip(), line[position + 1 :].strip()
    return line.rstrip(), ""


def commands(block: Block) -> list[Command]:
    """The commands of a block, in order (none for a block that is not a shell one)."""
    if block.file is not None or (block.language not in SHELL and block.language != CONSOLE):
        return []
    console = block.language == CONSOLE
    found: list[Command] = []
    parts: list[str] = []
    first = 0
    shown: list[str] = []
    for number, raw in enumerate(block.text.splitlines(), start=block.line + 1):
        if not parts:
            if console and not raw.startswith("$ "):
                shown.append(raw)
                continue
            raw = raw[2:] if console else raw
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            if console and found:
                found[-1].output = "\n".join(shown)
            shown, first = [], number
        parts.append(raw)
        if raw.endswith("\\"):
            continue
        code, comment = split_comment(parts[-1])
        status = _EXIT.search(comment)
        text = "\n".join([*parts[:-1], code])
        found.append(Command(block, first, text, int(status.group(1)) if status else 0, comment))
        parts = []
    if console and found:
        found[-1].output = "\n".join(shown)
    return found


def output_matches(expected: str, actual: str) -> bool:
    """Whether ``actual`` is what a console block shows, ``...`` standing for any text;
    trailing spaces and trailing blank lines do not count."""

    def tidy(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.rstrip("\n").splitlines())

    pattern = ".*?".join(re.escape(part) for part in tidy(expected).split("..."))
    return re.fullmatch(pattern, tidy(actual), re.DOTALL) is not None


def files(path: Path) -> list[Block]:
    """The files a document has the reader write, in order."""
    return [block for block in blocks(path) if block.file is not None]
