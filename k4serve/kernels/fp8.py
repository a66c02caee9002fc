"""The e4m3 rounding step shared by the kernels that write fp8 GEMM / attention operands.

Same recipe as `k4serve.kernels.quantize`: scale = max(amax, 1e-12) / 448 is stored, and the kernel multiplies
by its reciprocal (one division per row or block, not per element).
"""

import triton
import triton.language as tl


@triton.jit
def fp8_inverse_scale(amax):
    """(448 / amax, amax / 448) with the all-zero floor of kernels.quantize."""
    amax = tl.maximum(amax, 1e-12)
    return 448.0 / amax, amax / 448.0


@triton.jit
def to_fp8(x, inverse_scale):
    """x · inverse_scale rounded to e4m3 (saturating at ±448)."""
    return tl.clamp(x * inverse_scale, -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def store_row(y_ptr, y_scale_ptr, row, D, cols, y, mask, FP8: tl.constexpr):
    """Store the fp32 row `y` as row `row` of y [*, D]: in y's dtype, or (FP8) in e4m3 with its scale at
    y_scale[row] (the per-token activation scale of the next fp8 GEMM)."""
    if FP8:
        inverse, scale = fp8_inverse_scale(tl.max(tl.abs(y), 0))
        tl.store(y_ptr + row * D + cols, to_fp8(y, inverse), mask=mask)
        tl.store(y_scale_ptr + row, scale)
    else:
        tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
