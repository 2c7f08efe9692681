"""One base, two EoRA adapters, one llama-server: each request gets what llama.cpp computes for that base + adapter
alone, whatever ran before it; and each prompt-cache leak the documented command guards against is real."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cli import words

from eora_gguf import compensate, llama_eval, llama_tools, serve
from eora_gguf.errors import EoraError

N_PREDICT = 6
# One configuration's answers are compared exactly (TOL only allows float reordering): with nothing reused, against a
# fresh (`cache_prompt: false`) evaluation; with its prompt reused, against the same configuration's own cached
# evaluation. The two differ on SmolLM2 by up to ~0.03 in log-probability (the reused prompt's last token is decoded
# alone; llama-server's README: not bit-identical across batch sizes), not on the tiny model. Adapters move the
# log-probabilities far more than TOL (checked), so another adapter's cached state cannot pass for the right one.
TOL = 1e-5


def test_server_args_load_every_adapter_at_scale_zero():
    args = serve.server_args("base.gguf", ["a.gguf", "dir/b.gguf"], port=8123)
    assert args[:4] == ["-m", "base.gguf", "--lora-scaled", "a.gguf:0,dir/b.gguf:0"]
    assert args.count("--lora-scaled") == 1 and "--lora-scaled" not in serve.server_args("b.gguf", [], port=1)
    assert args[args.index("--cache-ram") + 1] == "0" and args[args.index("--port") + 1] == "8123"
    assert serve.lora_list(2, None) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    assert serve.lora_list(2, 1) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    with pytest.raises(EoraError, match="cannot parse"):
        serve.server_args("base.gguf", ["a:b.gguf"], port=1)
    cmds = serve.card_commands("m.gguf", [("x", "m-x.gguf")], bin_dir=Path("/opt/llama bin"), port=9, prompt="it's")
    assert cmds["path"] == "export PATH='/opt/llama bin':\"$PATH\""
    assert "--lora-scaled m-x.gguf:0 --cache-ram 0" in cmds["server"]
    assert '"lora": [{"id": 0, "scale": 1.0}]' in cmds["requests"][0].replace("'\"'\"'", "'")
    assert len(cmds["requests"]) == 2 and cmds["requests"][1].endswith("# base alone")


@pytest.fixture(scope="module")
def served(tiny_hf, tiny_gguf, llama, tmp_path_factory):
    """A tiny llama quantized to Q2_K and two EoRA adapters calibrated on different texts."""
    tmp = tmp_path_factory.mktemp("serve")
    hf = tiny_hf("llama")
    base = llama_tools.quantize(llama, tiny_gguf("llama"), tmp / "base-Q2_K.gguf", "Q2_K")
    adapters = []
    for i, seed in enumerate((21, 22)):
        calib = words(tmp / f"calib{i}.txt", 3000, seed=seed)
        out = tmp / f"adapter{i}.gguf"
        compensate.compensate(hf, base, out, rank=16, calib=str(calib), samples=16, seqlen=64, name=f"a{i}")
        adapters.append(out)
    return base, adapters, tmp


PROMPT_P = ("the model reads a quantized weight and calibration text then writes an adapter that llama runs with its "
            "own kernels while every layer keeps")
PROMPT_Q = ("hello world quick brown fox jumps over lazy dog numbers one two three four five six seven eight nine "
            "ten GGUF tensor matrix")


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got["tokens"] == want["tokens"], what
    assert np.max(np.abs(np.subtract(got["logprobs"], want["logprobs"]))) < TOL, what


def distance(a: dict, b: dict) -> float:
    """How far two configurations' answers are: top-logprob difference over the tokens both rank."""
    d = [abs(x[t] - y[t]) for x, y in zip(a["top"], b["top"]) for t in x.keys() & y.keys()]
    return max(d) if d else float("inf")


def check_serving(llama, base: Path, adapters: list[Path], log_file: Path, prompt_p: str, prompt_q: str,
                  names: list[str]) -> None:
    """The documented server (plus -np 1, which makes the RAM-cache path bite if it could) answers each request as
    llama.cpp computes that base + adapter alone, whatever adapters and prompts came before."""
    configs = (None, *range(len(adapters)))
    n = len(adapters)
    with serve.Server(llama, base, adapters, extra=["-np", "1"], threads=2, log_file=log_file) as s:
        listed = s.get("/lora-adapters")
        assert [(x["id"], x["scale"], x["task_name"]) for x in listed] == [(i, 0.0, nm) for i, nm in enumerate(names)]
        fresh = {c: s.complete(prompt_p, lora=serve.lora_list(n, c), n_predict=N_PREDICT, cache_prompt=False)
                 for c in configs}
        # what llama.cpp computes for the base + that adapter loaded alone (our libllama client)
        for c in configs:
            ref = llama_eval.generate(llama, base, [prompt_p], max_new=N_PREDICT, threads=2,
                                      lora=[adapters[c]] if c is not None else [])[0]
            tokens = fresh[c]["tokens"][:-1] if fresh[c]["stop_type"] == "eos" else fresh[c]["tokens"]
            assert list(ref.tokens) == tokens, f"adapter {c}: server and standalone llama.cpp differ"  # no EOS there
        # the adapters change the answer by far more than TOL, so a leak could not hide below it
        for i, x in enumerate(configs):
            for y in configs[i + 1:]:
                assert distance(fresh[x], fresh[y]) > 20 * TOL, (x, y)
        # each configuration's own cached evaluation: run it, then again reusing its prompt
        warm = {}
        for c in configs:
            assert_same(s.complete(prompt_p, lora=serve.lora_list(n, c), n_predict=N_PREDICT), fresh[c],
                        f"adapter {c} after another adapter")
            warm[c] = s.complete(prompt_p, lora=serve.lora_list(n, c), n_predict=N_PREDICT)
            assert warm[c]["reused"] > 0

        def check(got: dict, c: int | None, what: str) -> None:
            assert_same(got, warm[c] if got["reused"] else fresh[c], what)

        # same prompt through every order of adapters, cached: each answer is its configuration's own
        for c in (0, 1, None, 0, None, 1, 1, 0):
            check(s.complete(prompt_p, lora=serve.lora_list(n, c), n_predict=N_PREDICT), c,
                  f"adapter {c} after cached requests")
        # the RAM prompt cache's restore path (another prompt in between, one slot): off in the documented command
        for first, second in ((0, 1), (1, None), (None, 0)):
            s.complete(prompt_p, lora=serve.lora_list(n, first), n_predict=N_PREDICT)
            s.complete(prompt_q, lora=serve.lora_list(n, second), n_predict=N_PREDICT)
            got = s.complete(prompt_p, lora=serve.lora_list(n, second), n_predict=N_PREDICT)
            check(got, second, f"adapter {second} after {first}, via another prompt")
    # every adapter came from the one --lora-scaled list, which the server takes without a deprecation warning
    assert "specified multiple times" not in log_file.read_text(errors="replace")


@pytest.mark.llama_cpp
def test_each_request_gets_its_adapter_and_nothing_leaks(served, llama, tmp_path):
    base, adapters, _ = served
    check_serving(llama, base, adapters, tmp_path / "server.log", PROMPT_P, PROMPT_Q, ["a0", "a1"])


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_smollm2_two_real_adapters_served(smol_made, llama, tmp_path):
    out, made = smol_made
    adapters = [out / a["file"] for a in made["adapters"]]
    check_serving(llama, out / made["base"]["file"], adapters, tmp_path / "server.log",
                  "Question: Which gas do plants take in from the air to make food?\nAnswer:",
                  "The history of the city began in the twelfth century, when merchants settled by the river",
                  [a["name"] for a in made["adapters"]])


@pytest.mark.llama_cpp
def test_the_guards_are_needed(served, llama, tmp_path):
    """Without an explicit `lora` list, or with the RAM prompt cache on, the pinned server returns a prompt state
    another adapter computed: the reasons for the documented command."""
    base, adapters, _ = served
    with serve.Server(llama, base, adapters, extra=["-np", "1", "--cache-ram", "64"], threads=2,
                      log_file=tmp_path / "server.log") as s:
        fresh = {c: s.complete(PROMPT_P, lora=serve.lora_list(2, c), n_predict=N_PREDICT, cache_prompt=False)
                 for c in (None, 1)}
        # 1. no lora list after adapter 0: start-up scales (the base), but adapter 0's cached prompt
        s.complete(PROMPT_P, lora=serve.lora_list(2, 0), n_predict=N_PREDICT)
        leaked = s.complete(PROMPT_P, lora=None, n_predict=N_PREDICT)
        assert leaked["reused"] > 0 and distance(leaked, fresh[None]) > 20 * TOL
        # and the wrong state stays: the slot now runs the start-up scales, so the next request for the base alone,
        # even with an explicit list, sees no change of scales and reuses it
        again = s.complete(PROMPT_P, lora=serve.lora_list(2, None), n_predict=N_PREDICT)
        assert again["reused"] > 0 and distance(again, fresh[None]) > 20 * TOL
        # 2. RAM prompt cache: P with adapter 0, Q with adapter 1, P with adapter 1 restores P's adapter-0 state
        s.complete(PROMPT_P, lora=serve.lora_list(2, 0), n_predict=N_PREDICT)
        s.complete(PROMPT_Q, lora=serve.lora_list(2, 1), n_predict=N_PREDICT)
        leaked = s.complete(PROMPT_P, lora=serve.lora_list(2, 1), n_predict=N_PREDICT)
        assert leaked["reused"] > 0 and distance(leaked, fresh[1]) > 20 * TOL
