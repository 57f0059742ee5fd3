"""README's "Use from your own JAX code" snippet runs, and does what its comments say."""
import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def _snippet() -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Use from your own JAX code"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_composes_the_stages():
    ns = {}
    exec(compile(_snippet(), "README.md", "exec"), ns)
    ql, ql4, mine, by_hand = ns["ql"], ns["ql4"], ns["mine"], ns["by_hand"]
    m, n = ns["m"], ns["n"]
    # 1. the default: 2 bits, Hadamard both sides; apply == x @ dequantize^T
    assert ql.codebook == "E8P12" and ql.transforms == ("hadamard", "hadamard")
    np.testing.assert_allclose(np.asarray(ns["y"]), ns["X"][:8] @ np.asarray(ns["What"]).T,
                               rtol=1e-4, atol=1e-4)
    assert 0 < float(ns["quipjax"].proxy(ns["W"], ql, ns["H"], 1e-2)) < 0.2
    # 2. the values passed in are the stages that ran
    assert ql4.codebook == "E8P12RVQ4B" and ql4.transforms == ("rfft", "rfft")
    assert ql4.codes.shape == (m, n // 8, 2)
    # 3. the user's nearest rounding == the built-in nearest rounding, code for code
    builtin = ns["quipjax"].quantize_linear(ns["W"], ns["H"], key=ns["jax"].random.key(0),
                                            rounding="nearest")
    np.testing.assert_array_equal(np.asarray(mine.codes), np.asarray(builtin.codes))
    assert not np.array_equal(np.asarray(mine.codes), np.asarray(ql.codes))   # LDLQ differs
    # 4. the stages by hand are quantize_linear, bit for bit
    for f in ("codes", "SU", "SV"):
        np.testing.assert_array_equal(np.asarray(getattr(by_hand, f)), np.asarray(getattr(ql, f)))
