"""One base, many adapters, one llama-server: the commands `make` writes into its model card, and a small client.

At the pinned llama.cpp (tools/server): `--lora-scaled A:0,B:0` loads adapters at scale 0 (`--lora` loads them at
scale 1; `--lora-init-without-apply` only skips applying the scales at start-up, the server's per-slot default
stays 1). A `/completion` request's `lora` list sets the scales for that request, every adapter it does not list
at 0; a request without a `lora` list (or with an empty one) runs with the start-up scales. `GET /lora-adapters`
lists ids, paths, scales and `task_name` (our adapters' name, `adapter.lora.task_name`).

Prompt caches, and why the card's command is what it is:
- The slot's own cache: when a request's adapter scales differ from those its slot last ran, the slot's cached
  prompt is cleared (server-context.cpp, `launch_slot_with_task`) — but only for requests that carry a `lora`
  list. A request without one takes the start-up scales and keeps the cached tokens of whatever adapter computed
  them (and that state then stays for the next request with the start-up scales, list or not). So every request
  names its scales, the base alone included (`[{"id": 0, "scale": 0}]`).
- The RAM prompt cache (`--cache-ram`, default 8 GiB): a slot's state is saved there and restored by the longest
  token prefix, with no record of the adapter that computed it (server-task.cpp, `server_prompt_cache::load`),
  after which the scales look unchanged and nothing is cleared. `--cache-ram 0` turns it off.
tests/test_serve.py checks both: with the documented command every request returns what the server computes for
that base + adapter alone (fresh, or from that adapter's own cached prompt), and each leak appears without its
guard.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from . import llamacpp
from .errors import EoraError

log = logging.getLogger(__name__)

SERVER_FLAGS = ("--cache-ram", "0")


def lora_list(n_adapters: int, active: int | None) -> list[dict]:
    """A request's explicit `lora` list: adapter `active` at scale 1, every other at 0 (None: the base alone)."""
    return [{"id": i, "scale": 1.0 if i == active else 0.0} for i in range(max(n_adapters, 1))]


def server_args(base: str, adapters: Sequence[str], *, port: int, host: str = "127.0.0.1",
                extra: Sequence[str] = ()) -> list[str]:
    """llama-server's arguments for a base with every adapter loaded at scale 0 (see the module docstring)."""
    for a in adapters:
        if ":" in Path(a).name or "," in str(a):
            raise EoraError(f"adapter path {a} contains ':' or ',', which llama-server's --lora-scaled cannot "
                            "parse: rename it")
    # one comma-separated list: the pinned llama.cpp warns that a repeated option is deprecated and keeps its last
    loras = ["--lora-scaled", ",".join(f"{a}:0" for a in adapters)] if adapters else []
    return ["-m", base, *loras, *SERVER_FLAGS, "--host", host, "--port", str(port), *extra]


def card_commands(base: str, adapters: Sequence[tuple[str, str]], *, bin_dir: Path, port: int, prompt: str,
                  n_predict: int = 32) -> dict:
    """The shell commands of `make`'s model card, run from the output folder: {path, cli, completion, server,
    wait, requests (one per adapter, then the base alone), list}."""
    q = shlex.quote
    url = f"http://127.0.0.1:{port}"
    first = adapters[0][1]
    requests = []
    for i, (name, _) in enumerate([*adapters, ("base alone", "")]):
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0,
                "lora": lora_list(len(adapters), i if i < len(adapters) else None)}
        requests.append(f"curl -s {url}/completion -d {q(json.dumps(body))}   # {name}")
    return {"path": f'export PATH={q(str(bin_dir))}:"$PATH"',
            "cli": f"llama-cli -m {q(base)} --lora {q(first)} -p {q(prompt)} -n {n_predict} -st",
            "completion": f"llama-completion -m {q(base)} --lora {q(first)} -no-cnv -p {q(prompt)} -n {n_predict} "
                          "--temp 0",
            "server": " ".join(["llama-server", *map(q, server_args(base, [a for _, a in adapters], port=port))]),
            "wait": f"until curl -sf {url}/health > /dev/null; do sleep 1; done",
            "requests": requests, "list": f"curl -s {url}/lora-adapters"}


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A llama-server child process; `with Server(...) as s:` waits until it serves and always stops it."""

    def __init__(self, llama: llamacpp.LlamaCpp, base: str | os.PathLike[str],
                 adapters: Sequence[str | os.PathLike[str]] = (), *, port: int | None = None,
                 extra: Sequence[str] = (), threads: int | None = None, ctx: int = 2048,
                 log_file: str | os.PathLike[str] | None = None, timeout: float = 120.0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = server_args(str(base), [str(a) for a in adapters], port=self.port,
                           extra=["-c", str(ctx), "-t", str(threads or os.cpu_count() or 1), *extra])
        self.cmd = [str(llama.tool("llama-server")), *args]
        self.log_file, self.timeout = log_file, timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        out = open(self.log_file, "w") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        log.debug("$ %s", " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise EoraError(f"llama-server exited with status {self.proc.returncode} while starting"
                                    + (f": see {self.log_file}" if self.log_file else ""))
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.25)
            raise EoraError(f"llama-server did not answer on {self.url} within {self.timeout:.0f} s")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=self.timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise EoraError(f"llama-server answered {exc.code} to {path}: {exc.read()[:300]!r}") from None

    def complete(self, prompt: str, *, lora: list[dict] | None, n_predict: int = 8, n_probs: int = 5,
                 cache_prompt: bool = True) -> dict:
        """Greedy completion; `lora=None` sends no `lora` field. Returns {tokens (an end-of-generation token
        included, stop_type "eos"), content, stop_type, logprobs (per generated token), top (per token:
        {id: logprob} of the n_probs most likely), reused (prompt tokens taken from the cache instead of
        evaluated)}."""
        body: dict = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "n_probs": n_probs,
                      "return_tokens": True, "cache_prompt": cache_prompt, "seed": 0}
        if lora is not None:
            body["lora"] = lora
        res = self.post("/completion", body)
        probs = res.get("completion_probabilities") or []
        return {"tokens": list(res.get("tokens") or []), "content": res.get("content", ""),
                "stop_type": res.get("stop_type"),
                "logprobs": [p["logprob"] for p in probs],
                "top": [{t["id"]: t["logprob"] for t in p["top_logprobs"]} for p in probs],
                "reused": int(res.get("tokens_evaluated", 0)) - int((res.get("timings") or {}).get("prompt_n", 0))}


__all__ = ["Server", "card_commands", "free_port", "lora_list", "server_args"]
