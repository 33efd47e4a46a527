"""ELF: the error bound holds for every value, on adversarial inputs."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import codec
from codec import dtypes

SET = settings(max_examples=30, deadline=None)
NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def adversarial(dt, n, seed):
    rng = np.random.default_rng(seed)
    f = NP[dt]
    one = f(1.0)
    below = np.nextafter(one, f(0))
    sp = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, below, -below, one, -one,
                   np.nextafter(below, f(0)), np.finfo(f).tiny, np.finfo(f).smallest_subnormal,
                   -np.finfo(f).smallest_subnormal, np.finfo(f).max, 0.9999999, 0.999, 1.0001,
                   2.0, -3.5, 1e-30, 65504.0 if dt == "F16" else 1e30], np.float64)
    w = rng.normal(0, rng.choice([1e-3, 0.05, 0.5, 3.0]), n)
    k = min(n, 60)
    if n:
        w[rng.integers(0, n, k)] = rng.choice(sp, k)
    with np.errstate(over="ignore"):
        x = w.astype(f)
    # some NaNs with payloads
    if n and dt == "F32":
        u = x.view(np.uint32)
        u[rng.integers(0, n, 3)] = [0x7F800001, 0xFFC00123, 0x7FBFFFFF]
    return x


@SET
@given(st.sampled_from(["F32", "F16", "F64"]), st.integers(0, 4000), st.integers(0, 2**31),
       st.one_of(st.just("native"), st.floats(1e-7, 0.5), st.sampled_from([1e-4, 1e-3, 2**-24,
                                                                        2**-11, 0.25])))
def test_elf_bound_holds(dt, n, seed, bound):
    x = adversarial(dt, n, seed)
    for grid in (None, "pow2"):
        frame = codec.ElfCodec(dtype=dt, bound=bound, grid=grid).encode(x)
        info = codec.inspect(frame)
        assert info.lossy and info.codec == "elf" and info.max_error <= info.bound
        if bound != "native":
            assert info.bound == bound
        y = np.frombuffer(codec.decode(frame), NP[dt])
        xb, yb = x.view(dtypes.BY_NAME[dt].uint), y.view(dtypes.BY_NAME[dt].uint)
        fin = np.isfinite(x)
        # non-finite values come back bit-exact (NaN payloads, inf signs)
        assert (xb[~fin] == yb[~fin]).all()
        err = np.abs(y[fin].astype(np.float64) - x[fin].astype(np.float64))
        assert err.size == 0 or err.max() <= info.bound
        assert err.size == 0 or err.max() <= info.max_error
        # signs survive (incl. -0.0)
        assert (np.signbit(y[fin]) == np.signbit(x[fin])).all()


def test_native_bounds():
    for dt, b in (("F32", 2.0 ** -24), ("F16", 2.0 ** -11), ("F64", 2.0 ** -53)):
        x = adversarial(dt, 3000, 7)
        info = codec.inspect(codec.encode(x, dt, codec="elf", bound="native"))
        assert info.bound == b and info.max_error <= b


def test_elf_ratio_and_fidelity():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.05, 200_000).astype(np.float32)
    f = codec.encode(x, "F32", codec="elf", bound="native")
    assert x.nbytes / len(f) > 1.45
    f4 = codec.encode(x, "F32", codec="elf", bound=1e-4)
    assert x.nbytes / len(f4) > 2.5
    y = np.frombuffer(codec.decode(f, fidelity=7), np.float32)
    assert np.abs(y - x).max() <= 2.0 ** -7
    assert codec.inspect(codec.encode(x, "F32", bound=1e-3)).codec == "elf"


def test_elf_requires_bound():
    with pytest.raises(ValueError):
        codec.encode(np.zeros(10, np.float32), "F32", codec="elf")
