"""Fused Triton kernels on CUDA: log Z of each row of logits in one read, and with it the scaled softmax
(the chunked loss) in two.

`vocab_loss` (`fusion.modules.losses`) needs, for each row of a chunk of logits, ``log Z`` and
``softmax(z) * scale``, the bulk of its gradient. In eager PyTorch that is about seven passes over a
float32 copy of the ``[n, V]`` chunk (upcast, max, sum, subtract, exp, downcast); this kernel reads
the logits twice in their own dtype and writes the result once, in place when asked, so a bf16 chunk
costs 2 bytes per element instead of 6 and a third of the memory traffic. The eager code stays the
reference (and the path on CPUs and where Triton is missing); the tests compare the two.

`row_log_z` is the first pass alone, for teacher extraction (`fusion.data.representations`), which needs
log Z in float32 but no softmax: eager PyTorch's cheapest way there, a float32 log-softmax, writes a
float32 copy of the logits (on an H200 at V = 152k, 17 ms per 8 x 2,048 rows against 2 ms for one read).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: the eager path is used
    triton = None

_BLOCK = 4096  # columns per step of a row's loop: 8 warps x 32 threads x 16 elements


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernel can run on ``tensor``: a CUDA tensor (or Triton's CPU interpreter), Triton installed."""
    return triton is not None and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    @triton.jit
    def _row_log_z(x_row, n_cols, BLOCK: tl.constexpr):
        """Log Z of one row by the running max and running sum (one read, float32 in registers)."""
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        return m + tl.log(s)

    @triton.jit
    def _log_z_kernel(x_ptr, x_stride, lse_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        tl.store(lse_ptr + row, _row_log_z(x_ptr + row * x_stride, n_cols, BLOCK))

    @triton.jit
    def _scaled_softmax_kernel(x_ptr, x_stride, out_ptr, out_stride, scale_ptr, lse_ptr, n_cols,
                               BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        out_row = out_ptr + row * out_stride
        # Pass 1: log Z.
        lse = _row_log_z(x_row, n_cols, BLOCK)
        tl.store(lse_ptr + row, lse)
        # Pass 2: softmax * scale, written in the output's dtype (over the input, when they are one).
        scale = tl.load(scale_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            y = tl.exp(x - lse) * scale
            tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


def scaled_softmax(logits: torch.Tensor, scale: torch.Tensor,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(logits) * scale[:, None], log Z)`` of ``[n, V]`` logits (rows contiguous) and ``[n]`` scales.

    The result goes into ``out`` (same shape, any float dtype; ``logits`` itself for in place), else a
    new tensor of the logits' dtype; log Z is float32 ``[n]``.
    """
    n, n_cols = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    if logits.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("scaled_softmax needs rows laid out contiguously")
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _scaled_softmax_kernel[(n,)](logits, logits.stride(0), out, out.stride(0),
                                     scale.to(torch.float32).contiguous(), lse, n_cols, BLOCK=_BLOCK, num_warps=8)
    return out, lse


def row_log_z(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` of each row of ``[n, V]`` logits (rows contiguous, any float dtype), float32 ``[n]``."""
    if logits.stride(1) != 1:
        raise ValueError("row_log_z needs rows laid out contiguously")
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        _log_z_kernel[(logits.shape[0],)](logits, logits.stride(0), lse, logits.shape[1], BLOCK=_BLOCK, num_warps=8)
    return lse
