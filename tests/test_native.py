"""The C library's own argument checks (through raw ffi calls), the header as the one source of the ABI's
constants, and the binding's loader."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from eora_gguf import _native

Q4_0, Q8_0, F16, F32 = (int(T[n]) for n in ("Q4_0", "Q8_0", "F16", "F32"))


@pytest.fixture(scope="module")
def lib(native):
    return native


def _buf(ffi, arr):
    return ffi.cast("void *", ffi.from_buffer(arr)), arr.nbytes


@pytest.mark.native
def test_abi_and_cpu_path(lib) -> None:
    ffi, c = lib
    assert c.eora_abi_version() == c.EORA_ABI_VERSION == 4
    assert ffi.string(c.eora_cpu_path()).decode() in ("avx512", "avx2", "scalar")
    elems, nbytes = ffi.new("int64_t *"), ffi.new("int64_t *")
    assert c.eora_type_info(11, elems, nbytes) == 0 and (elems[0], nbytes[0]) == (256, 110)
    assert c.eora_type_info(14, elems, nbytes) == 0 and (elems[0], nbytes[0]) == (256, 210)
    assert c.eora_type_info(99, elems, nbytes) == 2


@pytest.mark.native
def test_dequantize_status_codes(lib) -> None:
    ffi, c = lib
    src = np.zeros(18 * 4, np.uint8)
    dst = np.zeros(128, np.float32)
    sp, sn = _buf(ffi, src)
    dp, dn = _buf(ffi, dst)
    dp = ffi.cast("float *", dp)
    for fn in (c.eora_dequantize, c.eora_dequantize_ref):
        assert fn(Q4_0, sp, sn, 128, dp, dn) == 0
        assert fn(Q4_0, ffi.NULL, sn, 128, dp, dn) == 1
        assert fn(Q4_0, sp, sn, 128, ffi.NULL, dn) == 1
        assert fn(77, sp, sn, 128, dp, dn) == 2
        assert fn(Q4_0, sp, sn, 0, dp, dn) == 3
        assert fn(Q4_0, sp, sn, 100, dp, dn) == 3
        assert fn(Q4_0, sp, sn - 1, 128, dp, dn) == 4
        assert fn(Q4_0, sp, sn, 128, dp, dn - 4) == 4
        assert "dst has 508 bytes" in ffi.string(c.eora_last_error()).decode()


@pytest.mark.native
def test_fused_status_codes(lib) -> None:
    ffi, c = lib
    d_out, d_in, n, r = 8, 64, 2, 4
    w = np.zeros(d_out * d_in // 32 * 34, np.uint8)
    x = np.zeros((n, d_in), np.float32)
    a = np.zeros((r, d_in), np.float32)
    b = np.zeros((d_out, r), np.float32)
    y = np.zeros((n, d_out), np.float32)
    wp, wn = _buf(ffi, w)
    xp, xn = _buf(ffi, x)
    ap, an = _buf(ffi, a)
    bp, bn = _buf(ffi, b)
    yp, yn = _buf(ffi, y)
    xp, yp = ffi.cast("float *", xp), ffi.cast("float *", yp)

    def call(**kw):
        args = dict(wt=Q8_0, w=wp, wn=wn, d_out=d_out, d_in=d_in, xt=F32, x=xp, xn=xn, n=n, at=F32, a=ap, an=an,
                    bt=F32, b=bp, bn=bn, r=r, rb=r, y=yp, yn=yn)
        args.update(kw)
        g = args.get
        descs = (_native.matrix(ffi, g("wt"), g("w"), g("wn"), g("d_out"), g("d_in")),
                 _native.matrix(ffi, g("xt"), g("x"), g("xn"), g("n"), g("d_in")),
                 _native.matrix(ffi, g("at"), g("a"), g("an"), g("r"), g("d_in")) if g("a") != "none" else ffi.NULL,
                 _native.matrix(ffi, g("bt"), g("b"), g("bn"), g("d_out"), g("rb")) if g("b") != "none" else ffi.NULL,
                 g("y"), g("yn"))
        return c.eora_fused_matmul_ref(*descs), c.eora_fused_matmul(*descs, g("threads", 2), g("flags", 0))

    assert call() == (0, 0)
    assert call(a="none", b="none") == (0, 0)
    assert call(r=0, rb=0, a=ffi.NULL, b=ffi.NULL, an=0, bn=0) == (0, 0)
    cases = {
        1: [dict(w=ffi.NULL), dict(x=ffi.NULL), dict(y=ffi.NULL), dict(a=ffi.NULL), dict(a="none"), dict(b="none"),
            dict(threads=-1), dict(flags=1 << 7)],
        2: [dict(wt=99), dict(at=Q4_0), dict(bt=12), dict(xt=F16)],
        3: [dict(d_out=0), dict(n=0), dict(d_in=48), dict(r=-1, rb=-1), dict(r=9, rb=9), dict(bt=Q8_0), dict(rb=8)],
        4: [dict(wn=wn - 1), dict(xn=xn - 4), dict(yn=yn - 4), dict(an=an - 4), dict(bn=bn - 4)],
    }
    for status, variants in cases.items():
        for v in variants:
            got = call(**v)
            if "threads" in v or "flags" in v:  # the reference takes neither
                got = got[1:]
            assert set(got) == {status}, v
            assert ffi.string(c.eora_last_error()).decode().startswith("fused_matmul"), v
    assert c.eora_fused_matmul(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, yp, yn, 1, 0) == 1


def test_header_declarations_parse() -> None:
    import cffi

    text = _native.header_path().read_text()
    cdef = _native.cdef_from_header(text)
    assert "#" not in cdef and "EORA_API" not in cdef
    cffi.FFI().cdef(cdef)


def test_missing_library_fails_at_first_call(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_native, "candidate_paths", lambda: [tmp_path / "libeora_native.so"])
    fresh = _native._Library()
    monkeypatch.setattr(_native, "_library", fresh)
    assert _native.available() is False
    with pytest.raises(_native.NativeUnavailable, match=r"libeora_native\.so \(missing\).*pip install -e \."):
        _native.ffi_lib()


def test_import_works_without_library(tmp_path: Path) -> None:
    code = ("import eora_gguf, eora_gguf.kernels as k; from eora_gguf import _native as n; "
            "n.candidate_paths = lambda: []; print(k.available())")
    env = dict(os.environ, EORA_GGUF_LIB=str(tmp_path / "nope.so"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"
