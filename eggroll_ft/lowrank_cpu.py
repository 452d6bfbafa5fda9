"""The rank-1 low-rank term on CPU as one fused C++ operation: one pass per row over ``x`` and ``out``.

For rows in ``U`` groups of ``R`` consecutive rows sharing noise index ``u`` (float32, contiguous),
in place:

    out[u, j] += s[u, j // T] * (x[u, j] . b[u]) * a[u]      x (U, R, n), out (U, R, m)

with ``b (U, n)``, ``a (U, m)`` the group's factors (``B_u``, ``A_u`` at rank 1) and ``s (U, G)``
the scales of the group's ``G`` members (``R = G T``, ``T`` tokens per row). With torch operations
the same term is a product and a sum over ``x`` (or a batched matrix-vector product), a scaling,
and a broadcast multiply-add over ``out``: passes over the layer's activations and a temporary
beside the layer's compute-bound matmul, which is what the population paid over plain inference on
CPU (docs/benchmarks.md, issue 17). Here each row's dot product and its update of ``out`` run back
to back while the row is in cache, rows split over torch's intra-op threads (``at::parallel_for``;
a row's result does not depend on the number of threads).

The operation is compiled at first use by ``torch.utils.cpp_extension`` (a C++ compiler and
``ninja``; about 25 s, then cached under ``TORCH_EXTENSIONS_DIR``), for the CPU's vector extension
as torch reports it (one build per extension, so a cache shared by different CPUs stays valid).
Where it cannot be built, ``available()`` is False with the reason in ``build_error()``, and the
population adds the term with torch operations. This module knows nothing of models or members:
``population.py`` passes the block's factors and scales.
"""
from __future__ import annotations

import threading
import warnings

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

// out (U, R, m) += s[u, j / T] * (x (U, R, n)[u, j] . b (U, n)[u]) * a (U, m)[u]
void lowrank1_add_(torch::Tensor out, torch::Tensor x, torch::Tensor b, torch::Tensor a,
                   torch::Tensor s, int64_t T) {
  const int64_t U = out.size(0), R = out.size(1), m = out.size(2), n = x.size(2), G = s.size(1);
  float* po = out.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  const float* pa = a.data_ptr<float>();
  const float* ps = s.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n + m));
  at::parallel_for(0, U * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t u = i / R, j = i - u * R;
      const float* xr = px + i * n;
      const float* bu = pb + u * n;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < n; ++k) acc += xr[k] * bu[k];
      const float d = acc * ps[u * G + j / T];
      float* orow = po + i * m;
      const float* au = pa + u * m;
#pragma omp simd
      for (int64_t k = 0; k < m; ++k) orow[k] += d * au[k];
    }
  });
}
"""

# torch's CPU capability -> the compiler flags of that build
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

_lock = threading.Lock()
_state: dict = {}  # "module": the built extension, or "error": why it could not be built


def _build():
    module = _state.get("module")
    if module is not None:
        return module
    with _lock:
        if "module" in _state or "error" in _state:
            return _state.get("module")
        try:
            from torch.utils.cpp_extension import load_inline

            isa = torch.backends.cpu.get_cpu_capability()
            flags = _ISA_FLAGS.get(isa, [])
            _state["module"] = load_inline(
                f"eggroll_ft_lowrank_cpu_{isa.lower() if flags else 'default'}", cpp_sources=_SOURCE,
                functions=["lowrank1_add_"], extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no ninja, no writable cache: torch operations instead
            _state["error"] = f"{type(e).__name__}: {e}".strip()
            warnings.warn(f"eggroll_ft.lowrank_cpu: the fused CPU operation could not be built "
                          f"({_state['error'][:300]}); the population adds its low-rank term with torch "
                          "operations, slower on CPU", RuntimeWarning, stacklevel=3)
        return _state.get("module")


def available() -> bool:
    """Whether the operation is built (building it on the first call; False where it cannot be)."""
    return _build() is not None


def build_error() -> str | None:
    """Why the operation could not be built, once ``available()`` returned False; else None."""
    return _state.get("error")


def lowrank1_add_(out: torch.Tensor, x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                  tokens: int, check: bool = True) -> torch.Tensor:
    """``out (U, R, m) += s[u, j // tokens] (x[u, j] . b[u]) a[u]`` in place (see the module's text);
    CPU, float32, contiguous. Returns ``out``. ``check=False`` skips the checks of the arguments
    (for a caller that guarantees them: the population's hook, 200 calls per forward)."""
    module = _build()
    if module is None:
        raise RuntimeError(f"the fused CPU operation could not be built: {build_error()}")
    if not check:
        module.lowrank1_add_(out, x, b, a, s, tokens)
        return out
    U, R, m = out.shape
    n = x.shape[-1]
    G = s.shape[-1]
    for name, t, shape in (("out", out, (U, R, m)), ("x", x, (U, R, n)), ("b", b, (U, n)), ("a", a, (U, m)),
                           ("s", s, (U, G))):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape:
            raise ValueError(f"lowrank1_add_: {name} must be a contiguous float32 CPU tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")
    if tokens < 1 or G * tokens != R:
        raise ValueError(f"lowrank1_add_: tokens={tokens} times the {G} scales per group must equal R={R}")
    module.lowrank1_add_(out, x, b, a, s, int(tokens))
    return out
