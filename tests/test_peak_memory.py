"""`pipeline.peak_memory.PeakRSS`: each measured stretch reports its own peak, not the
process's largest so far."""
import numpy as np

from quipjax.pipeline.peak_memory import PeakRSS


def test_each_stretch_reports_its_own_peak():
    with PeakRSS() as big:
        x = np.ones(60_000_000)            # 480 MB, every page touched
        x[::4096] += 1.0
        del x
    with PeakRSS() as small:
        y = np.ones(1000)
        del y
    assert big.reset and small.reset       # Linux: the high-water mark was reset
    # the second stretch does not inherit the first one's 480 MB
    assert big.gb - small.gb > 0.35, (big.gb, small.gb)
    assert small.gb > 0.01


def test_release_freed_drops_compiled_programs_and_they_compile_again():
    import jax
    import jax.numpy as jnp

    from quipjax.pipeline.peak_memory import release_freed
    f = jax.jit(lambda x: x * 3 + 1)
    assert float(f(jnp.float32(2))) == 7.0 and f._cache_size() == 1
    release_freed()
    assert f._cache_size() == 0
    assert float(f(jnp.float32(2))) == 7.0 and f._cache_size() == 1
