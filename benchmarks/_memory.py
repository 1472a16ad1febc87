"""Peak memory of tensors allocated inside a region, on any device.

On CUDA, torch.cuda.max_memory_allocated is exact. The CPU allocator keeps no
statistics, so on CPU we count at the dispatcher: every storage an op returns
is added when it appears and subtracted when its StorageImpl is freed (torch
keeps one Python object per live storage, so a weakref finaliser fires exactly
then). Temporaries that a kernel allocates and frees internally are not seen,
for our ops and ATen's alike; torch.compile's generated code allocates outside
the dispatcher, so it cannot be measured this way (reported as n/a).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _CpuPeakTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views (detach, reshape, ...) alias an input's storage: no new memory.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }
        for item in tree_flatten(out)[0]:
            if not isinstance(item, torch.Tensor) or item.device.type != "cpu":
                continue
            storage = item.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen or key in inputs:
                continue
            self._seen.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def peak_bytes(fn, device: str) -> int | None:
    """Bytes above the starting point at the region's peak (None if unmeasurable)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    tracker = _CpuPeakTracker()
    with tracker:
        fn()
    return tracker.peak
