"""Property-based fuzzing of the readers a user can feed: mutated profiles, recipes, ArchSpec JSON,
manifests, GGUF and safetensors headers and data files either load or end in a one-sentence ShrinkError (fuzz_readers.py; the
10,000-case runs are benchmarks/fuzz_readers.py)."""

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_readers import one_case, readers

READERS = readers()


@pytest.mark.parametrize("name", sorted(READERS))
def test_a_reader_loads_or_says_why_in_one_sentence(name, tmp_path_factory):
    reader, strategy, filename = READERS[name]
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(content=strategy)
    def check(content):
        finding = one_case(reader, content, folder / filename)
        assert finding is None, finding

    check()
