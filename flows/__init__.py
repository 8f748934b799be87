"""The flows: plan, run, budget check and each step's execution, shared by `shrink run`, the single
commands (`shrink prune`, `quantize`, `distill`) and Python callers. Progress goes through a Hooks
object (flows/steps.py) that the caller renders; nothing here prints."""
