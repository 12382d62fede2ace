"""The demo's domains: distinct parts of the Python standard library, read from this interpreter.

Every CPython install has them, so the demo needs no download. Each domain is a few packages or
modules (source with their docstrings); its files are split by file into training and held-out
text, deterministically (by a hash of the file's path), and capped in size so the demo stays fast::

    corpus = load_corpus(DOMAINS[:6], max_train_chars=200_000, max_held_out_chars=40_000)
    corpus.names, corpus.domains[0].train[:1], corpus.digest()
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hf_mergelaw.errors import DemoError


@dataclass(frozen=True)
class Domain:
    """A domain: packages (folders) or modules (``.py`` files), relative to the stdlib root.

    Parts missing from an interpreter (``tomllib`` before 3.11) are skipped.
    """

    name: str
    parts: tuple[str, ...]


# Parts present from CPython 3.10 to 3.13 that no distribution strips (no tkinter, idlelib,
# test suites) and that are not removed by PEP 594. Ordered so a prefix makes a good smaller pool.
DOMAINS: tuple[Domain, ...] = (
    Domain("asyncio", ("asyncio",)),
    Domain("email", ("email", "mailbox.py", "smtplib.py")),
    Domain("xml", ("xml", "xmlrpc")),
    Domain("unittest", ("unittest", "doctest.py")),
    Domain("multiprocessing", ("multiprocessing", "concurrent")),
    Domain("web", ("http", "urllib", "wsgiref")),
    Domain("importlib", ("importlib", "pkgutil.py", "zipimport.py", "runpy.py")),
    Domain("formats", ("json", "csv.py", "configparser.py", "tomllib", "plistlib.py")),
)

# Folders skipped inside a package: test suites (often stripped by distributions).
_SKIPPED_FOLDERS = frozenset({"test", "tests", "__pycache__"})


@dataclass(frozen=True)
class DomainText:
    """One domain's text: whole files, training and held-out kept apart."""

    name: str
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    files: tuple[str, ...]
    held_out_files: tuple[str, ...]

    @property
    def train_chars(self) -> int:
        return sum(map(len, self.train))

    @property
    def held_out_chars(self) -> int:
        return sum(map(len, self.held_out))


@dataclass(frozen=True)
class Corpus:
    domains: tuple[DomainText, ...]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def digest(self) -> str:
        """Hash of every text: a pool trained on this corpus is keyed by it (another Python
        version reads other sources and gets a pool of its own)."""
        h = hashlib.sha256()
        for domain in self.domains:
            for split in (domain.train, domain.held_out):
                h.update(f"{domain.name}:{len(split)}".encode())
                for text in split:
                    h.update(hashlib.sha256(text.encode()).digest())
        return h.hexdigest()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def domain_files(root: Path, domain: Domain) -> list[str]:
    """The domain's ``.py`` files as paths relative to ``root``, sorted."""
    files: set[str] = set()
    for part in domain.parts:
        path = root / part
        if path.is_file() and path.suffix == ".py":
            files.add(part)
        elif path.is_dir():
            files.update(
                p.relative_to(root).as_posix()
                for p in path.rglob("*.py")
                if not _SKIPPED_FOLDERS & set(p.relative_to(path).parts[:-1])
            )
    return sorted(files)


def split_files(sizes: Mapping[str, int], held_out_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) files from {file: characters}: files in the order of a hash of their path
    (the same on every machine, unrelated to the alphabet) go to held-out until it holds
    ``held_out_fraction`` of the characters; at least one file on each side."""
    if len(sizes) < 2:
        raise DemoError(
            f"a domain needs at least two files to hold one out, got {len(sizes)}: {list(sizes)}"
        )
    ordered = sorted(sizes, key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    goal, held = held_out_fraction * sum(sizes.values()), 0
    n_held = 0
    while n_held < len(ordered) - 1 and (n_held == 0 or held < goal):
        held += sizes[ordered[n_held]]
        n_held += 1
    return ordered[n_held:], ordered[:n_held]


def load_corpus(
    domains: Sequence[Domain] = DOMAINS,
    *,
    max_train_chars: int,
    max_held_out_chars: int,
    held_out_fraction: float = 0.2,
    root: Path | None = None,
) -> Corpus:
    """Read each domain's files, split them, and cap each split's size.

    Raises:
        DemoError: a domain has fewer than two files on this interpreter.
    """
    root = stdlib_root() if root is None else root
    texts = []
    for domain in domains:
        files = domain_files(root, domain)
        sizes = {name: (root / name).stat().st_size for name in files}
        train_files, held_files = split_files(sizes, held_out_fraction)
        texts.append(
            DomainText(
                name=domain.name,
                train=_read_capped(root, train_files, max_train_chars),
                held_out=_read_capped(root, held_files, max_held_out_chars),
                files=tuple(files),
                held_out_files=tuple(held_files),
            )
        )
    return Corpus(tuple(texts))


def eval_chunks(texts: Sequence[str], count: int, chunk_chars: int) -> list[str]:
    """``count`` pieces of about ``chunk_chars`` characters, cut at line ends and taken evenly
    across ``texts`` (not just the first file's license header and imports)."""
    pieces = [p for text in texts for p in _cut_lines(text, chunk_chars)]
    if len(pieces) < count:
        raise DemoError(
            f"held-out text gives {len(pieces)} pieces of {chunk_chars} characters, fewer than "
            f"the {count} asked for; raise max_held_out_chars or lower eval_sequences."
        )
    step = len(pieces) / count
    return [pieces[int(i * step)] for i in range(count)]


def _read_capped(root: Path, files: Sequence[str], cap: int) -> tuple[str, ...]:
    out, total = [], 0
    for name in files:
        text = (root / name).read_text(encoding="utf-8", errors="replace")
        out.append(text[: cap - total])
        total += len(out[-1])
        if total >= cap:
            break
    return tuple(out)


def _cut_lines(text: str, size: int) -> list[str]:
    """Consecutive runs of whole lines with at least ``size`` characters (a short tail is
    dropped, so every piece is full length)."""
    pieces, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            pieces.append("".join(current))
            current, length = [], 0
    return pieces
