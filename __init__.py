"""shrink: turn a causal language model into one that meets a deployment target, with evidence."""

__version__ = "0.1.0"
