"""Moved to `shrink.blocks` (the model level, so that normeps and layershapes import downward).

This alias remains only while compress/quant/ptq.py still imports `shrink.compress.blocks`; new code
imports `shrink.blocks`.
"""

from shrink.blocks import *  # noqa: F401,F403
