"""The `shrink` command line: one module per command family, each thin (parse, call, render)."""
