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


def test_an_artifact_is_timed_as_read_from_disk(tmp_path, monkeypatch):
    import os

    from shrink.export import runtimes

    folder = tmp_path / "onnx"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"x" * 4096)
    (folder / "sub" / "weights.bin").write_bytes(b"y" * 4096)
    dropped = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: dropped.append(advice) or real(fd, offset, length, advice))
    runtimes.as_if_from_disk(folder)
    runtimes.as_if_from_disk(folder / "model.onnx")
    assert dropped == [os.POSIX_FADV_DONTNEED] * 3  # both files of the directory, then the one file
