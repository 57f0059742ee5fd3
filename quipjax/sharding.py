"""Moved: meshes, placement and the distributed programs are `quipjax.distributed`, the exact
Hessian merge `quipjax.hessian.exact_merge`, the planner `quipjax.pipeline.plan`. This
re-export stays for one release."""
from quipjax.distributed import *  # noqa: F401,F403
from quipjax.hessian import exact_merge  # noqa: F401
