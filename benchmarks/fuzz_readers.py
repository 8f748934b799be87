"""Fuzz every reader a user can feed (profile and recipe TOML, ArchSpec JSON, manifests, GGUF and safetensors
headers, .txt/.jsonl/.parquet data files)
with mutated valid inputs: counts the cases and the findings (anything but a load or a one-sentence
ShrinkError), and prints the first finding of each reader.

    python benchmarks/fuzz_readers.py [--examples 10000] [--only NAME]

The strategies and the check are tests/fuzz_readers.py's, which tests/test_fuzz.py runs at 60 cases each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fuzz_readers import one_case, readers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="Cases per reader.")
    parser.add_argument("--only", default="", help="Only the readers whose name contains this.")
    args = parser.parse_args()
    table = Table(title=f"Fuzzed readers (measured, {args.examples:,} cases each)", title_justify="left")
    for column in ("reader", "cases", "findings", "seconds", "first finding"):
        table.add_column(column, overflow="fold")
    failed = False
    with tempfile.TemporaryDirectory(prefix="shrink-fuzz-") as folder:
        for name, (reader, strategy, filename) in readers().items():
            if args.only not in name:
                continue
            seen = {"cases": 0, "findings": []}

            @settings(max_examples=args.examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(content=strategy)
            def run(content):
                seen["cases"] += 1
                finding = one_case(reader, content, Path(folder) / filename)
                if finding:
                    seen["findings"].append(finding)

            start = time.perf_counter()
            run()
            failed |= bool(seen["findings"])
            table.add_row(name, f"{seen['cases']:,}", str(len(seen["findings"])), f"{time.perf_counter() - start:.0f}",
                          (seen["findings"] or [""])[0][:200])
    Console(width=160).print(table)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
