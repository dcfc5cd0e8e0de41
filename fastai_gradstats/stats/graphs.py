"""A layout's reductions captured as one CUDA graph and replayed (`_StepGraph`): one launch per step on a GPU, where
launching them one by one costs more host time than all the rest of a recorded step. `USE_CUDA_GRAPHS` (on the
`fastai_gradstats.stats` package) switches it off."""
from __future__ import annotations

import torch

__all__ = []


_DATA_PTR = torch.Tensor.data_ptr


class _StepGraph:
    """A layout's reductions (`LayerStats._reduce`) captured as one CUDA graph and replayed: one launch per step
    instead of about 60, which on a GPU cost more host time than all the rest of a recorded step.

    A graph reads the memory its gradients and parameters had when it was captured. So it is captured only once
    their addresses stayed the same for two steps in a row (fastai zeroes gradients in place; an optimizer that sets
    them to None may reallocate them elsewhere), replayed only while they stay there, and dropped when they move.
    Their shapes and dtypes are the layout's, and their strides stay too: a gradient is laid out like its
    parameter, and a parameter laid out anew lies at a new address.

    After `MAX_CAPTURES` captures, or one that fails, the layout launches its reductions one by one (what it did
    before); it does not capture while another CUDA graph is being captured. The fallback after a failed capture is
    a safety net, not a guarantee: a capture that CUDA itself invalidates can leave torch's allocator in a degraded
    state, which is why it is never retried (no capture failed in the tests on an H200 with CUDA 13 and torch 2.11).
    A graph keeps the temporaries of `_reduce` in its own memory pool: small next to the work buffer, except for
    tensors whose rows exceed it (reduced where they lie, with |g| temporaries)."""
    MAX_CAPTURES = 3

    def __init__(self):
        self.graph, self.addresses, self.last, self.stable, self.captures, self.failed = None, None, None, 0, 0, False

    def run(self, stats, layout, grads, params) -> bool:
        "Do this step's reductions as a graph: True if done, False if the caller must launch them itself."
        addresses = (*map(_DATA_PTR, grads), *map(_DATA_PTR, params))
        if self.graph is not None:
            if addresses == self.addresses:
                self.graph.replay()
                return True
            self.graph = None  # the tensors moved: wait for them to settle again
        self.stable = self.stable + 1 if addresses == self.last else 0
        self.last = addresses
        if self.stable < 2 or self.failed or self.captures >= self.MAX_CAPTURES: return False
        graph = self._record(stats, layout, grads, params)
        if graph is None: return False
        graph.replay()  # capturing records the work without doing it
        self.graph, self.addresses = graph, addresses
        return True

    def _record(self, stats, layout, grads, params):
        "A CUDA graph of `stats._reduce` on these tensors; None while another capture is under way, or if it fails."
        if torch.cuda.is_current_stream_capturing(): return None
        self.captures += 1
        graph, stream, current = torch.cuda.CUDAGraph(), torch.cuda.Stream(layout.device), torch.cuda.current_stream(layout.device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                stats._reduce(layout, grads, params)  # a warm-up on the capturing stream, as CUDA graphs ask
                # thread_local: other threads (a DataLoader's pinning thread) may use CUDA meanwhile
                graph.capture_begin(capture_error_mode='thread_local')
                try: stats._reduce(layout, grads, params)
                finally: graph.capture_end()
        except Exception:  # an op that cannot be captured: launch one by one from now on
            self.failed = True
            return None
        finally:
            current.wait_stream(stream)
        return graph
