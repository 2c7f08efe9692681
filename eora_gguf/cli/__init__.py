"""The `eora-gguf` command line: verbs that mirror the llama.cpp workflow.

checks.py checks arguments before any work, verbs.py holds one function per verb, parser.py the argparse
parser; `main` here runs a verb and reports.

Each verb is a function `(args) -> dict` returning its result; `main` prints it as text, or as JSON with --json.
User errors (EoraError) print one line and exit 2; nothing partial is left behind (see errors.atomic_output).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence

# OpenMP threads that spin while waiting stall torch's LAPACK calls badly when the cores are shared
# (eigh 576x576: 9 s instead of 0.1 s measured here); set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ..errors import EoraError
from .checks import check_numbers
from .parser import build_parser
from .verbs import is_main

log = logging.getLogger("eora_gguf")


def _print_human(result: dict) -> None:
    table = result.pop("table", None)
    if table:
        result.pop("rows", None)  # the table shows them
    for k, v in result.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for k2, v2 in v.items():
                print(f"  {k2}: {v2}")
        else:
            print(f"{k}: {v}")
    if table:
        print(table)


class _Summaries(logging.Filter):
    """Repeated warnings (records with `extra={"summary": (key, text, severity, detail)}`) become one line each:
    how many, and the worst one. The single records pass only with --verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.seen: dict[str, list] = {}  # key -> [count, text, worst severity, its detail]

    def filter(self, record: logging.LogRecord) -> bool:
        summary = getattr(record, "summary", None)
        if summary is None:
            return True
        key, text, severity, detail = summary
        entry = self.seen.setdefault(key, [0, text, float("-inf"), detail])
        entry[0] += 1
        if severity > entry[2]:
            entry[2:] = [severity, detail]
        return self.verbose

    def flush(self) -> None:
        for count, text, _, detail in self.seen.values():
            log.warning("%d %s; the largest: %s", count, text, detail)
        self.seen.clear()


def _on_sigterm(signum, frame):  # let `finally` blocks remove temporary outputs
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
                        stream=sys.stderr)
    if not args.verbose:  # gguf-py narrates every file it writes at INFO
        logging.getLogger("gguf").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _on_sigterm)
    summaries = _Summaries(args.verbose)
    handlers = logging.getLogger().handlers
    for h in handlers:
        h.addFilter(summaries)
    t0 = time.perf_counter()
    try:
        check_numbers(args)
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # started by torchrun: join its process group
            from .. import devices, distributed

            if args.verb not in ("calibrate", "compensate"):
                raise EoraError(f"`{args.verb}` runs in one process: only calibrate and compensate run under "
                                "torchrun")
            distributed.init_from_env(devices.resolve(getattr(args, "device", None)))
            if not distributed.is_main():  # one process narrates; the others speak only of problems
                logging.getLogger().setLevel(logging.WARNING)
        result = args.fn(args)
    except EoraError as e:
        print(f"eora-gguf: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("eora-gguf: error: out of memory: lower --samples/--seqlen (or the model size) or free memory",
              file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch reports a failed allocation as a RuntimeError
        if not re.search(r"can't allocate memory|out of memory|DefaultCPUAllocator", str(e)):
            raise
        print(f"eora-gguf: error: out of memory ({str(e).splitlines()[0][:200]}): lower --samples/--seqlen or "
              "free memory", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG):
            raise
        print(f"eora-gguf: error: {e.strerror}{f': {e.filename}' if e.filename else ''}: free space or choose "
              "another output path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eora-gguf: interrupted", file=sys.stderr)
        return 130
    finally:
        for h in handlers:
            h.removeFilter(summaries)
    if not is_main():  # under torchrun, rank 0 reports
        return 0
    summaries.flush()  # on success only: after an error its one line is all the user needs
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        result.pop("table", None)
        print(json.dumps(result, indent=1, default=str))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
