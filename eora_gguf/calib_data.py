"""Calibration text: parse a `--calib` spec, read its sources, cut token windows.

A spec is one source or a comma-separated weighted mix of sources, each `SOURCE[:WEIGHT]` (weight > 0,
default 1), e.g. `demo`, `notes.txt`, `arc_easy:0.5,demo:0.5`, `mytask.jsonl:3,demo:1`. A source is
  - a path to a plain-text file (`.txt`, `.txt.gz`): its whole text;
  - a path to a JSON-lines file (`.jsonl`, `.jsonl.gz`): one text per record, by `record_text` below;
  - a built-in name such as `BUILTIN_NAMES`, resolved to a file by `eora_gguf.assets.data_file(name)`
    (which refuses unknown names).
Paths that contain ':' or ',' cannot be named in a spec.

Each source's texts are joined with blank lines and tokenized as one stream; windows of `seqlen` tokens are
cut from it without overlap. If the tokenizer adds BOS by itself (Llama, Gemma), every window starts with
BOS followed by seqlen-1 text tokens, as the model sees text at inference. Sample counts are proportional to
the weights (largest remainder), and which windows are taken is drawn from `seed`; draws 0, 1, … of one seed take
successive windows of the same shuffled order, so they share no window while a source has enough of them.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import assets
from .errors import EoraError

log = logging.getLogger(__name__)

BUILTIN_NAMES = ("demo", "stories", "arc_easy", "arc_challenge", "gsm8k")

# Record fields tried in order when a JSON-lines record has no "text" string: (prompt, answer) pairs.
_PAIR_FIELDS = (
    ("question", "answer"),
    ("query", "continuation"),
    ("context", "continuation"),
    ("prompt", "completion"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("input", "output"),
)


@dataclass(frozen=True)
class Source:
    """One entry of a spec: `name` as written, its resolved file, and its mixing weight."""

    name: str
    path: Path
    weight: float


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """Split `a:0.5,b:0.5` into [("a", 0.5), ("b", 0.5)]; a missing weight is 1. No file access."""
    if not isinstance(spec, str) or not spec.strip():
        raise EoraError("empty --calib spec: give a .txt/.jsonl file, a built-in name "
                        f"({', '.join(BUILTIN_NAMES)}) or a mix like demo:1,arc_easy:1")
    out: list[tuple[str, float]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise EoraError(f"malformed --calib spec {spec!r}: empty entry between commas")
        name, sep, weight_text = item.rpartition(":")
        if not sep:
            name, weight = item, 1.0
        else:
            name = name.strip()
            try:
                weight = float(weight_text)
            except ValueError:
                raise EoraError(f"malformed --calib entry {item!r}: weight {weight_text!r} is not a number "
                                "(write SOURCE:WEIGHT, e.g. demo:0.5)") from None
            if not name:
                raise EoraError(f"malformed --calib entry {item!r}: no source before ':'")
        if not math.isfinite(weight) or weight <= 0:
            raise EoraError(f"--calib weight of {name!r} is {weight_text.strip()}: weights must be positive numbers")
        out.append((name, weight))
    return out


def resolve_sources(spec: str) -> list[Source]:
    """Parse `spec` and map every entry to an existing file (built-in names through eora_gguf.assets)."""
    sources = []
    for name, weight in parse_spec(spec):
        path = Path(name).expanduser()
        if path.is_file():
            sources.append(Source(name, path, weight))
        elif path.suffix in (".txt", ".jsonl", ".gz") or "/" in name or os.sep in name:
            raise EoraError(f"calibration file {name} does not exist: check the path in --calib")
        else:
            sources.append(Source(name, Path(assets.data_file(name)), weight))
    return sources


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _answer_text(record: dict[str, Any]) -> str | None:
    """The correct answer of a QA record: `answer` as text, or the chosen entry of `choices`.

    `choices` may be a list of strings or {"text": [...], "label": [...]}; the answer (the first present of
    `answer`, `answerKey`, `gold`, `label`) may be the text itself, an index, or a label such as "B".
    """
    answer = next((record[k] for k in ("answer", "answerKey", "gold", "label") if k in record), None)
    choices = record.get("choices")
    labels: list[str] | None = None
    if isinstance(choices, dict):
        labels = [str(x) for x in choices.get("label", [])] or None
        choices = choices.get("text")
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        if isinstance(answer, bool):
            return None
        if isinstance(answer, int) and 0 <= answer < len(choices):
            return choices[answer]
        if isinstance(answer, str):
            key = answer.strip()
            if labels and key in labels:
                return choices[labels.index(key)]
            if len(key) == 1 and key.isalpha() and ord(key.upper()) - ord("A") < len(choices):
                return choices[ord(key.upper()) - ord("A")]
            if key.isdigit() and int(key) < len(choices) and key not in choices:
                return choices[int(key)]
            return answer
        return None
    return answer if isinstance(answer, str) else None


def record_text(record: Any) -> str | None:
    """Text of one JSON-lines record, or None if it has none.

    Rule: a bare JSON string is the text; else a string field "text"; else "question" + newline + the
    correct answer (see `_answer_text`); else the first pair of string fields found among `_PAIR_FIELDS`
    (query/continuation, context/continuation, prompt/completion, instruction/output|response, input/output).
    """
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("question"), str):
        answer = _answer_text(record)
        if answer is not None:
            return f"{record['question']}\n{answer}"
    for first, second in _PAIR_FIELDS:
        a, b = record.get(first), record.get(second)
        if isinstance(a, str) and isinstance(b, str):
            glue = "" if a.endswith((" ", "\n")) or b.startswith(" ") else " "
            return a + glue + b
    return None


def read_texts(path: Path) -> list[str]:
    """All texts of one source file (see the module docstring for the formats)."""
    name = path.name.lower()
    if not path.is_file():
        raise EoraError(f"calibration file {path} does not exist: check the path in --calib")
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            texts = []
            with _open_text(path) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise EoraError(f"{path}:{lineno} is not valid JSON ({exc.msg}): "
                                        "fix or remove that line") from None
                    text = record_text(record)
                    if text is None:
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise EoraError(f"{path}:{lineno} has no text: give records a \"text\" field or "
                                        f"question/answer-like fields (found {keys})")
                    texts.append(text)
            return texts
        if name.endswith((".txt", ".txt.gz")):
            with _open_text(path) as fh:
                return [fh.read()]
    except UnicodeDecodeError:
        raise EoraError(f"calibration file {path} is not UTF-8 text") from None
    raise EoraError(f"calibration file {path}: unknown format, use .txt, .txt.gz, .jsonl or .jsonl.gz")


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize_source(texts: list[str], tokenizer) -> list[int]:
    """Token ids of the texts joined by blank lines, without special tokens."""
    text = "\n\n".join(t for t in texts if t.strip())
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def split_counts(weights: list[float], total: int) -> list[int]:
    """Integers proportional to `weights` summing to `total` (largest remainder, ties to the earlier entry)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def build_calibration(spec: str, tokenizer, *, samples: int, seqlen: int, seed: int = 0,
                      draw: int = 0) -> torch.LongTensor:
    """Token windows for calibration: LongTensor (samples, seqlen), sources in spec order.

    Windows of one source are distinct while it has enough of them; a source with fewer windows than its
    share is reused from the start (with a warning). Deterministic for a given spec, tokenizer, seed and draw.
    draw k takes the k-th run of `count` windows in the seed's shuffled order of each source: draws of one seed
    are disjoint samples (an independent second calibration set) while a source has (k+1)·count windows.
    """
    if samples < 1 or seqlen < 2:
        raise EoraError(f"need samples >= 1 and seqlen >= 2 (got samples={samples}, seqlen={seqlen})")
    if draw < 0:
        raise EoraError(f"the calibration draw must be 0 or more, got {draw}")
    sources = resolve_sources(spec)
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    body = seqlen - (bos is not None)
    counts = split_counts([s.weight for s in sources], samples)
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    for source, count in zip(sources, counts):
        ids = np.asarray(tokenize_source(read_texts(source.path), tokenizer), dtype=np.int64)
        n_windows = len(ids) // body
        if n_windows < 1:
            raise EoraError(f"calibration source {source.name} has {len(ids)} tokens, fewer than one sample of "
                            f"{seqlen}: give more text or a smaller --seqlen")
        if (draw + 1) * count > n_windows:
            log.warning("calibration source %s has %d windows of %d tokens for %d samples%s: reusing windows",
                        source.name, n_windows, seqlen, count, f" in draw {draw}" if draw else "")
        if count == 0:
            log.warning("calibration source %s gets no sample out of %d: raise --samples or its weight",
                        source.name, samples)
        order = rng.permutation(n_windows)
        picks = np.resize(order, (draw + 1) * count)[draw * count:] if count else order[:0]
        windows = ids[: n_windows * body].reshape(n_windows, body)[picks]
        if bos is not None:
            windows = np.concatenate([np.full((count, 1), bos, dtype=np.int64), windows], axis=1)
        rows.append(windows)
        log.info("calibration: %d samples from %s (%d tokens, weight %g)", count, source.name, len(ids), source.weight)
    return torch.from_numpy(np.concatenate(rows, axis=0))


def calibration_fingerprint(spec: str, input_ids: torch.Tensor) -> str:
    """sha256 over the spec (normalized) and the exact token ids (shape included), hex."""
    h = hashlib.sha256()
    h.update(json.dumps(parse_spec(spec)).encode())
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    h.update(json.dumps(list(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()
