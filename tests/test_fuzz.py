"""Short property-based fuzz runs (hypothesis) of tests/fuzz_targets.py, and the regressions they found.

The long run with the sanitizer build is tools/fuzz.py (README: "Fuzzing").
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft
from eora_gguf import _native

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def seeds():
    return ft.Seeds()


def test_fuzz_gguf_reader(seeds):
    given(st.data())(FUZZ(lambda data: ft.target_gguf(seeds, data)))()


def test_fuzz_adapter_reader(seeds):
    given(st.data())(FUZZ(lambda data: ft.target_adapter(seeds, data)))()


@pytest.mark.skipif(not _native.available(), reason="eora_native library not built")
def test_fuzz_native_entry_points():
    given(st.data())(FUZZ(ft.target_native))()


@pytest.mark.skipif(not _native.available(), reason="eora_native library not built")
def test_fuzz_kernel_wrappers():
    given(st.data())(FUZZ(ft.target_kernels))()
