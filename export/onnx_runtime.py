"""Run an ONNX decoder written by shrink in ONNX Runtime: prefill with an empty cache, then decode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from shrink.errors import ShrinkError
from shrink.export.onnx import LAYOUT_FILE


class OnnxRunner:
    name = "onnxruntime"

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        layout_path = directory / LAYOUT_FILE
        if not layout_path.is_file():
            raise ShrinkError(f"'{directory}' has no {LAYOUT_FILE}: it was not written by `shrink export`.")
        self.layout = json.loads(layout_path.read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types for a bad or truncated file
            raise ShrinkError(f"ONNX Runtime could not load '{directory}': the model is corrupt, truncated or "
                              f"incomplete ({str(err).splitlines()[0][:200]}).") from None

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        cache = {}
        for i, layer in enumerate(self.layout["layers"]):
            shape = (batch, layer["num_kv_heads"], 0, layer["head_dim"])
            index = layer.get("layer", i)  # written before layers without a cache existed: every layer has one
            cache[f"past_key_{index}"] = np.zeros(shape, np.float32)
            cache[f"past_value_{index}"] = np.zeros(shape, np.float32)
        return cache

    def step(self, ids: list[int], cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Feed `ids` after the cached positions; returns their logits and the grown cache."""
        past = next(iter(cache.values())).shape[2] if cache else 0  # no cached layer: no position matters
        feed = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past + len(ids)), dtype=np.int64),
            "position_ids": np.arange(past, past + len(ids), dtype=np.int64)[None, :],
            **cache,
        }
        outputs = self.session.run(None, feed)
        names = self.layout["outputs"]
        new_cache = {name.replace("present_", "past_"): value for name, value in zip(names[1:], outputs[1:])}
        return outputs[0][0], new_cache

    def logits(self, ids: list[int]) -> np.ndarray:
        """Every position's logits: one call, or for a graph that returns the last position's only
        (layout "logits": "last"), one call per token, each feeding the cache back."""
        if self.layout.get("logits", "all") == "all":
            return self.step(ids, self.empty_cache())[0].astype(np.float32)
        rows, cache = [], self.empty_cache()
        for token in ids:
            row, cache = self.step([token], cache)
            rows.append(row[-1])
        return np.stack(rows).astype(np.float32)
