"""Puzzle (Bercovich et al., arXiv 2411.19146): give each layer the block variant that buys most quality
for its cost on the target.

library.py   the variants of each layer's attention and FFN, initialised from the parent's weights
bld.py       blockwise local distillation: each variant learns its parent sub-block's output
scores.py    replace-one-block KL: the parent with only that sub-block swapped, on held-out text
solve.py     roofline costs per variant and the mixed-integer program choosing one variant per layer
assemble.py  the chosen architecture as a real model (then globally distilled by the shared trainer)
"""
