"""Moved: the training loop and losses are `quipjax.training`, the tunable stand-in layers
`quipjax.layers.tunable`. This re-export stays for one release."""
from quipjax.layers.tunable import (Frozen, TunableQuantLinear, attach_tunable,  # noqa: F401
                                    detach_tunable, rotated_back)
from quipjax.training import *  # noqa: F401,F403
