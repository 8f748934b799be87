"""How shrink opens llama.cpp: the AMX guard that keeps a decode from crashing the process."""

import llama_cpp.llama_cpp as bindings

from shrink.export.runtimes import extra_buffers_off_on_amx


def test_extra_buffers_are_off_only_where_llama_cpp_reports_amx(monkeypatch):
    defaults = bindings.llama_model_default_params
    monkeypatch.setattr(bindings, "llama_print_system_info", lambda: b"CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |")
    with extra_buffers_off_on_amx():
        assert bindings.llama_model_default_params().use_extra_bufts is False
    assert bindings.llama_model_default_params is defaults  # restored on the way out

    monkeypatch.setattr(bindings, "llama_print_system_info", lambda: b"CPU : AVX2 = 1 | REPACK = 1 |")
    with extra_buffers_off_on_amx():
        assert bindings.llama_model_default_params().use_extra_bufts is True
