"""The GGUF quantization flow around flows/gguf_search.py: the model exported once to F16, shrink's
importance matrix from the calibration text, the reference's log-probabilities on held-out text, a
cost per candidate on the target, and the chosen file written as an artifact with its manifest.

`prepare_search` sets a search up; `write_choice` turns an option into the step's artifact. The
planner (flows/plan.py) searches at plan time and records the choice in the recipe, so the run's
`gguf-quantize` step re-makes exactly that file (`make_option`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from shrink.compress.quant.imatrix import cached_importance_matrix
from shrink.errors import ShrinkError
from shrink.export.backend import backend
from shrink.export.bench import token_ids
from shrink.export.llamacpp_quantize import gguf_importance, tensor_rows
from shrink.export.manifest import write_manifest
from shrink.export.runtimes import TorchRunner
from shrink.export.verify import ReferenceLogProbs
from shrink.export.workflow import export_artifact
from shrink.flows import defaults
from shrink.flows.anchors import Anchor
from shrink.flows.candidates import Candidate, TargetBudget
from shrink.flows.gguf_search import Cost, Option, Search, run_search
from shrink.hardware.roofline import Workload, estimate
from shrink.model import weights_hash

SEARCH_SEQUENCES = 3  # held-out sequences the KL of every candidate is measured on (3 x 128 positions)
SEARCH_POSITIONS = 128


def target_cost(spec: Any, profile: Any, workload: Workload) -> Callable[[Path], Cost]:
    """A GGUF file's time per token: measured in llama.cpp on `host`, else the roofline's estimate on
    the target for the types the file stores (memory and TTFT always estimated)."""
    gguf = backend("gguf")
    threads = os.cpu_count() or 1

    def cost(path: Path) -> Cost:
        stored, formats = gguf.stored_formats(path, spec)
        est = estimate(replace(stored, formats=formats), profile, workload, gguf.runtime)
        if not profile.measured:
            return Cost(est.tpot_s, "estimated", est.ttft_s, est.memory.total_bytes)
        # timed as the run's bench step will judge it: its prompt, decoded tokens and repeats
        prompt = token_ids(defaults.BENCH_PROMPT_LEN, spec.vocab_size)
        gen = token_ids(defaults.BENCH_GEN_LEN, spec.vocab_size)
        _, decode = gguf.time(path, threads, prompt, gen, defaults.BENCH_REPEATS)
        return Cost(sorted(decode)[len(decode) // 2], "measured", est.ttft_s, est.memory.total_bytes, est.tpot_s)
    return cost


def budget_fits(budget: Any) -> Callable[[Cost], bool]:
    """A TargetBudget as a test of a cost: every line given must hold."""
    def fits(cost: Cost) -> bool:
        return ((budget.tpot_s is None or cost.tpot_s <= budget.tpot_s)
                and (budget.ttft_s is None or cost.ttft_s is None or cost.ttft_s <= budget.ttft_s)
                and (budget.memory_bytes is None or cost.memory_bytes is None or cost.memory_bytes <= budget.memory_bytes))
    return fits


def prepare_search(loaded: Any, split: Any, folder: Path, cost: Callable[[Path], Cost], fits: Callable[[Cost], bool],
                   *, imatrix: bool = True, status: Callable[[str], None] = lambda m: None) -> Search:
    """The model as an F16 GGUF in `folder`, its importance matrix, the reference's log-probabilities."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "f16.gguf"
    status("Exporting the model to an F16 GGUF for llama.cpp's quantizer")
    export_artifact(loaded, "gguf", source, quant="f16", verify=False)
    matrix = None
    if imatrix:
        status(f"Importance matrix from {split.calibration.numel():,} calibration tokens")
        matrix = gguf_importance(cached_importance_matrix(loaded.model, split.calibration), loaded.spec,
                                 tensor_rows(source))
    status("Reference log-probabilities on held-out text")
    sequences = [row[:SEARCH_POSITIONS].tolist() for row in split.evaluation[:SEARCH_SEQUENCES]]
    reference = ReferenceLogProbs(TorchRunner(loaded.model), sequences)
    return Search(source, folder, reference, cost, fits, matrix, status)


def write_choice(option: Option, loaded: Any, artifact: Path) -> dict:
    """The chosen option's file as the artifact, with a manifest (source, hashes, ArchSpec, how it was
    made) so that verify, bench and the budget check read it like any export."""
    artifact.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(option.path, artifact)
    gguf = backend("gguf")
    report = {"path": str(artifact), "arch": loaded.spec.family, "quant": gguf.stored_quant(artifact),
              "method": "llama.cpp quantizer (llama_model_quantize)", "file_type": option.file_type,
              "imatrix": option.imatrix, "overrides": option.overrides}
    write_manifest(artifact, source=loaded.source, source_hash=weights_hash(loaded.model), spec=loaded.spec,
                   export=report, verify=None)
    return report


def make_option(search: Search, file_type: str, imatrix: bool, overrides: dict[str, str]) -> Option:
    return search.make(Option(file_type.upper(), imatrix and search.imatrix is not None, overrides))


def quantizer_candidate(loaded: Any, split: Any, profile: Any, workload: Workload, budget: TargetBudget,
                        status: Callable[[str], None] = lambda m: None) -> tuple[Candidate | None, str | None, list[Anchor]]:
    """The planner's candidate from llama.cpp's quantizer: the unpruned model, every option made and
    measured now (its KL is measured, not a proxy), the best within the budget; else None and why
    (none fits or passes its verify gate, or the model cannot be written as a GGUF). Beside it, the
    options whose time was measured, as anchors for the estimated candidates (none off `host`)."""
    with tempfile.TemporaryDirectory(prefix="shrink-quantizer-") as folder:
        try:
            search = prepare_search(loaded, split, Path(folder), target_cost(loaded.spec, profile, workload),
                                    budget_fits(budget), status=status)
        except ShrinkError as err:
            return None, str(err), []
        best = run_search(search)
    anchors = [Anchor(o.label, o.weights, o.vocabulary, o.cost.tpot_s, o.cost.roofline_tpot_s) for o in search.options
               if o.cost is not None and o.cost.by == "measured" and o.cost.roofline_tpot_s]
    if best is None:
        return None, search.why_none(), anchors
    candidate = Candidate(1.0, "-", None, "gguf", quantizer=best.to_dict(), kl_shape=0.0, kl_format=best.kl)
    candidate.tpot_s, candidate.ttft_s = best.cost.tpot_s, best.cost.ttft_s or 0.0
    candidate.memory_bytes = best.cost.memory_bytes or 0.0
    candidate.costed = True
    return candidate, None, anchors
