"""Leaving the caller's modules as they were: autojac runs f more often than the caller asked
(probes, tuning, checks), and BatchNorm's running statistics must end up as after one call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class BufferSnapshot:
    """Every buffer of some modules (BatchNorm's running statistics, say) as it was when taken."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.saved = [(b, b._version, b.detach().clone()) for m in modules for b in m.buffers(recurse=False)]

    def restore(self) -> None:
        """Write back the buffers that changed: an untouched buffer keeps its version, so a graph the
        caller built earlier that saved it (Fourier features' frequencies, say) stays usable."""
        if not self.saved:
            return
        with torch.no_grad():
            for buffer, version, copy in self.saved:
                # (the fused batch_norm kernel updates running statistics without bumping the version)
                if buffer._version != version or not torch.equal(buffer, copy):
                    buffer.copy_(copy)


@contextlib.contextmanager
def preserved_buffers(modules: Sequence[nn.Module]) -> Iterator[BufferSnapshot]:
    """Restore every buffer after the block has run f (probes, tuning, checks)."""
    snapshot = BufferSnapshot(modules)
    try:
        yield snapshot
    finally:
        snapshot.restore()
