"""The imatrix writer: values against the covariances (read back by gguf-py), the file against the pinned
llama-imatrix on the same tokens and through its loader, llama-quantize using it, and bad inputs."""
from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from eora_gguf import calibration, llama_tools
from eora_gguf import imatrix as im
from eora_gguf.cli import main
from eora_gguf.errors import EoraError
from eora_gguf.naming import INPUT_GROUPS, NameMap, model_dims
from eora_gguf.stats import CalibrationStats

from tiny_models import _WORDS, SYNTH, write_out

SITES = ("attn_in", "o_in", "mlp_in", "down_in")  # one per INPUT_GROUPS entry


def synthetic_stats(config=SYNTH, *, layers: int = 2, tokens: int = 40, seed: int = 0):
    """Statistics as `calibration.stream` lays them out, from random inputs; also the inputs per site."""
    dims = model_dims(dict(config, num_hidden_layers=layers))
    names = NameMap(dims)
    gen = torch.Generator().manual_seed(seed)
    stats = CalibrationStats(meta={"seqlen": 8, "samples": tokens // 8, "calib_spec": "synthetic"})
    inputs = {}
    for b in range(layers):
        for site, group in zip(SITES, INPUT_GROUPS):
            d_in = dims.linear_shape(group[0])[1]
            x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, d_in)
            key = f"model.layers.{b}.{site}"
            stats.covariances[key], stats.n_tokens[key], inputs[key] = x.T @ x, tokens, x
            for module in group:
                stats.module_sites[f"model.layers.{b}.{module}"] = key
    return stats, names, inputs


def word_text(path: Path, n_words: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(_WORDS) for _ in range(n_words)))
    return path


# ------------------------------------------------------------------------------------------------ no llama.cpp


def test_values_are_the_diagonal_of_the_input_covariance(tmp_path):
    stats, names, inputs = synthetic_stats()
    path = im.write_imatrix(stats, names, tmp_path / "imatrix.gguf")
    reader = gguf.GGUFReader(path)  # gguf-py, not our reader: the layout llama.cpp's loader sees
    keys = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert keys == {"general.type": "imatrix", "imatrix.datasets": ["synthetic"], "imatrix.chunk_count": 5,
                    "imatrix.chunk_size": 8}
    weights = sorted(names.to_gguf(m) for m in stats.module_sites)
    assert [t.name for t in reader.tensors] == [w + s for w in weights for s in (".in_sum2", ".counts")]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
    by_name = {t.name: t for t in reader.tensors}
    for module, site in stats.module_sites.items():
        w = names.to_gguf(module)
        s, c = by_name[w + ".in_sum2"], by_name[w + ".counts"]
        x = inputs[site]
        assert list(s.shape) == [x.shape[1]] and list(c.shape) == [1]  # 1-d, as ggml writes [n, 1] tensors
        np.testing.assert_allclose(np.array(s.data).ravel(), (x ** 2).sum(0).numpy(), rtol=1e-6)
        assert float(np.array(c.data).ravel()[0]) == x.shape[0]
    back = im.read_imatrix(path)
    assert (back.chunk_count, back.chunk_size, back.datasets) == (5, 8, ["synthetic"])
    for module, site in stats.module_sites.items():
        w = names.to_gguf(module)
        np.testing.assert_allclose(back.importance(w)[0], (inputs[site] ** 2).mean(0).numpy(), rtol=1e-6)
    q, k = names.to_gguf("model.layers.1.self_attn.q_proj"), names.to_gguf("model.layers.1.self_attn.k_proj")
    assert np.array_equal(back.sums[q], back.sums[k])  # one input site, one importance vector
    assert all(r["cosine"] == pytest.approx(1.0) for r in im.compare(back, im.from_stats(stats, names)).values())


def _stats_case(case: str):
    stats, names, _ = synthetic_stats()
    site = "model.layers.0.attn_in"
    if case == "empty":
        stats = CalibrationStats()
    elif case == "other model":
        stats.covariances[site] = stats.covariances[site][:32, :32]
    elif case == "nan":
        stats.covariances[site][3, 3] = float("nan")
    elif case == "no tokens":
        stats.n_tokens[site] = 0
    elif case == "missing site":
        del stats.covariances[site]
    elif case == "no adapted module":
        stats.module_sites = {"model.layers.0.mlp.router": site}
    return stats, names


@pytest.mark.parametrize("case", ["empty", "other model", "nan", "no tokens", "missing site", "no adapted module"])
def test_bad_statistics_are_one_line_and_leave_no_file(tmp_path, case):
    stats, names = _stats_case(case)
    out = tmp_path / "imatrix.gguf"
    with pytest.raises(EoraError) as err:
        im.write_imatrix(stats, names, out)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def _write_gguf(path: Path, kv: dict, tensors: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(path, "imatrix")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    for key, value in kv.items():
        if isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)
    for name, data in tensors.items():
        w.add_tensor(name, data)
    write_out(w)
    return path


META = {"imatrix.datasets": ["t"], "imatrix.chunk_count": 1, "imatrix.chunk_size": 4}


@pytest.mark.parametrize("case", ["missing", "not gguf", "no metadata", "counts only", "f16 sums", "no entries"])
def test_reader_refuses_bad_files(tmp_path, case):
    path = tmp_path / "bad.gguf"
    sums, counts = np.ones((1, 8), np.float32), np.full((1, 1), 4, np.float32)
    if case == "not gguf":
        path.write_bytes(b"\x01\x00\x00\x00" + b"\x00" * 64)  # what a legacy .dat starts with
    elif case == "no metadata":
        _write_gguf(path, {}, {"blk.0.attn_q.weight.in_sum2": sums, "blk.0.attn_q.weight.counts": counts})
    elif case == "counts only":
        _write_gguf(path, META, {"blk.0.attn_q.weight.counts": counts})
    elif case == "f16 sums":
        _write_gguf(path, META, {"blk.0.attn_q.weight.in_sum2": sums.astype(np.float16),
                                 "blk.0.attn_q.weight.counts": counts})
    elif case == "no entries":
        _write_gguf(path, META, {"blk.0.attn_q.weight": sums})
    with pytest.raises(EoraError) as err:
        im.read_imatrix(path)
    assert "\n" not in str(err.value)


def test_cli_imatrix_and_calibrate_option(tiny_hf, tmp_path, capsys):
    hf = tiny_hf("llama")
    text = word_text(tmp_path / "calib.txt", 3000, seed=1)
    calib = ["--calib", str(text), "--samples", "4", "--seqlen", "64"]
    stats_path, beside = tmp_path / "stats.safetensors", tmp_path / "beside.gguf"
    assert main(["calibrate", "--hf", str(hf), *calib, "-o", str(stats_path), "--imatrix", str(beside)]) == 0
    capsys.readouterr()
    assert main(["imatrix", "--hf", str(hf), "--stats", str(stats_path), "-o", str(tmp_path / "a.gguf"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["weights"], out["tokens"]) == (2 * 7, 4 * 64)
    assert main(["imatrix", "--hf", str(hf), *calib, "-o", str(tmp_path / "b.gguf")]) == 0
    stats = CalibrationStats.load(stats_path)
    ref = im.from_stats(stats, NameMap.from_config(json.loads((hf / "config.json").read_text())))
    for f in ("beside.gguf", "a.gguf", "b.gguf"):  # same spec, same tokens: the same file three ways
        got = im.read_imatrix(tmp_path / f)
        assert sorted(got.sums) == sorted(ref.sums) and len(got.sums) == 2 * 7
        for name in ref.sums:
            np.testing.assert_allclose(got.sums[name], ref.sums[name], rtol=1e-5)
            assert got.counts[name][0] == 4 * 64
        assert (got.chunk_count, got.chunk_size, got.datasets) == (4, 64, [str(text)])
    # bad input: one line, exit 2, no file
    assert main(["imatrix", "--hf", str(hf), "--stats", str(tmp_path / "nope.safetensors"),
                 "-o", str(tmp_path / "c.gguf")]) == 2
    assert "\n" not in capsys.readouterr().err.strip() and not (tmp_path / "c.gguf").exists()


# ------------------------------------------------------------------------------------------- through llama.cpp

CTX, CHUNKS = 128, 4


def run(llama, *args) -> str:
    res = llama_tools.run_tool([llama.tool(args[0]), *args[1:]], args[0])
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def matched(tiny_hf, tiny_gguf, llama, tmp_path_factory):
    """matched(arch) -> dict: ours and llama-imatrix's file over the same token windows of the same text."""
    made: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in made:
            d = tmp_path_factory.mktemp(f"imatrix-{arch}")
            hf, f16 = tiny_hf(arch), tiny_gguf(arch, "f16")
            text = word_text(d / "calib.txt", 4000, seed=5)
            ids = im.llama_imatrix_windows(llama, f16, text, ctx=CTX, chunks=CHUNKS, threads=2)
            stats = calibration.collect_stats(hf, torch.from_numpy(ids), batch_size=4)
            names = NameMap.from_config(json.loads((hf / "config.json").read_text()))
            ours = im.write_imatrix(stats, names, d / "ours.gguf", datasets=[str(text)])
            theirs = d / "theirs.gguf"
            run(llama, "llama-imatrix", "-m", f16, "-f", text, "-c", str(CTX), "--chunks", str(CHUNKS), "--no-ppl",
                "-t", "2", "-o", theirs)
            made[arch] = {"f16": f16, "ours": ours, "theirs": theirs, "ids": ids, "dir": d}
        return made[arch]

    return get


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_matches_llama_imatrix_on_the_same_tokens(matched, arch):
    """Same weights, same counts, importance vectors equal up to llama.cpp's F16 weights and float32 arithmetic."""
    m = matched(arch)
    assert m["ids"].shape == (CHUNKS, CTX)
    ours, theirs = im.read_imatrix(m["ours"]), im.read_imatrix(m["theirs"])
    assert sorted(ours.sums) == sorted(theirs.sums)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (CHUNKS, CTX)
    for name in ours.sums:
        assert ours.counts[name].tolist() == theirs.counts[name].tolist() == [CHUNKS * CTX]
    # the same file layout: KV keys and types, tensor names, order, types and shapes (only the data differ)
    layout = [{k: f.types for k, f in r.fields.items()} for r in map(gguf.GGUFReader, (m["ours"], m["theirs"]))]
    assert layout[0] == layout[1]
    tensors = [[(t.name, t.tensor_type, t.shape.tolist(), t.data_offset - r.tensors[0].data_offset)
                for t in r.tensors] for r in map(gguf.GGUFReader, (m["ours"], m["theirs"]))]
    assert tensors[0] == tensors[1]
    cmp = im.compare(ours, theirs)
    worst = min(r["cosine"] for r in cmp.values())
    rel = max(float(np.max(np.abs(ours.importance(n) - theirs.importance(n)) / theirs.importance(n).max()))
              for n in cmp)
    print(f"{arch}: min cosine {worst:.7f}, max |Δ|/max {rel:.2e}")
    assert worst > 0.9999 and rel < 1e-2


@pytest.mark.llama_cpp
def test_llama_cpp_loader_reads_our_file(matched, llama):
    m = matched("llama")
    # llama-imatrix's loader reads our file (checked through a file it writes, not through its log, which the
    # pinned llama.cpp sometimes loses): merged with llama-imatrix's own, the sums and counts add up
    merged = m["dir"] / "merged.gguf"
    run(llama, "llama-imatrix", "-m", m["f16"], "--in-file", m["ours"], "--in-file", m["theirs"], "-o", merged)
    a, b, both = (im.read_imatrix(p) for p in (m["ours"], m["theirs"], merged))
    for name in a.sums:
        np.testing.assert_allclose(both.sums[name], a.sums[name] + b.sums[name], rtol=1e-6)
        assert both.counts[name][0] == a.counts[name][0] + b.counts[name][0]


@pytest.mark.llama_cpp
def test_llama_quantize_uses_our_imatrix(matched, llama, tmp_path):
    m = matched("llama")
    n = len(im.read_imatrix(m["ours"]).sums)
    plain, with_ours, with_theirs = (tmp_path / f"{k}.gguf" for k in ("plain", "ours", "theirs"))
    run(llama, "llama-quantize", m["f16"], plain, "Q2_K", "2")
    run(llama, "llama-quantize", "--imatrix", m["ours"], m["f16"], with_ours, "Q2_K", "2")
    # what llama-quantize loaded, as it records it in the file it writes (its log may lose lines)
    meta = gguf.GGUFReader(with_ours).fields
    assert meta["quantize.imatrix.entries_count"].contents() == n
    assert meta["quantize.imatrix.chunks_count"].contents() == CHUNKS
    run(llama, "llama-quantize", "--imatrix", m["theirs"], m["f16"], with_theirs, "Q2_K", "2")
    data = {k: {t.name: np.array(t.data) for t in gguf.GGUFReader(p).tensors}
            for k, p in (("plain", plain), ("ours", with_ours), ("theirs", with_theirs))}
    weights = [w for w in data["plain"] if w.endswith(".weight")]
    covered = [w for w in weights if w in im.read_imatrix(m["ours"]).sums]
    assert len(covered) == n
    changed = [w for w in covered if not np.array_equal(data["plain"][w], data["ours"][w])]
    assert len(changed) == n  # every weight with an entry is quantized differently ...
    for w in set(weights) - set(covered):  # ... and those without one (embeddings, head) are not
        assert np.array_equal(data["plain"][w], data["ours"][w])
    same_as_theirs = [w for w in covered if np.array_equal(data["ours"][w], data["theirs"][w])]
    print(f"Q2_K: {len(changed)}/{n} weights changed by our imatrix, {len(same_as_theirs)}/{n} bit-equal to "
          "llama-imatrix's")


@pytest.mark.llama_cpp
def test_llama_quantize_refuses_what_our_reader_refuses(llama, tmp_path, tiny_gguf):
    """A file without the imatrix.* metadata: our reader and llama-quantize both refuse it."""
    bad = _write_gguf(tmp_path / "bad.gguf", {}, {"blk.0.attn_q.weight.in_sum2": np.ones((1, 256), np.float32),
                                                  "blk.0.attn_q.weight.counts": np.ones((1, 1), np.float32)})
    with pytest.raises(EoraError):
        im.read_imatrix(bad)
    with pytest.raises(EoraError, match="llama-quantize"):
        llama_tools.quantize(llama, tiny_gguf("llama"), tmp_path / "q.gguf", "Q2_K", imatrix=bad)
    assert not (tmp_path / "q.gguf").exists()
