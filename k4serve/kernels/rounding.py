"""The e4m3 and int8 rounding steps shared by the kernels that write 8-bit GEMM / attention operands.

Same recipes as `k4serve.kernels.quantize`: scale = max(amax, 1e-12) / 448 (e4m3) or / 127 (int8, rounded to
nearest) is stored, and the kernel multiplies by its reciprocal (one division per row or block, not per element).
"""

import triton
import triton.language as tl

from k4serve.kernels.quantize import AMAX_FLOOR, INT8_MAX

# the torch recipe's constants, as the constexprs a jit function may read
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_INT8_MAX = tl.constexpr(INT8_MAX)


@triton.jit
def fp8_inverse_scale(amax):
    """(448 / amax, amax / 448) with the all-zero floor of kernels.quantize."""
    amax = tl.maximum(amax, _AMAX_FLOOR)
    return 448.0 / amax, amax / 448.0


@triton.jit
def to_fp8(x, inverse_scale):
    """x · inverse_scale rounded to e4m3 (saturating at ±448)."""
    return tl.clamp(x * inverse_scale, -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def int8_inverse_scale(amax):
    """(127 / amax, amax / 127) with the all-zero floor of kernels.quantize."""
    amax = tl.maximum(amax, _AMAX_FLOOR)
    return (1.0 / amax) * _INT8_MAX, amax / _INT8_MAX  # tensor first: constexpr / tensor stays a constexpr


@triton.jit
def to_int8(x, inverse_scale):
    """x · inverse_scale rounded to the nearest integer (halves away from zero) as int8."""
    y = x * inverse_scale
    y = tl.where(y >= 0, y + 0.5, y - 0.5)  # the cast truncates toward zero
    return tl.clamp(y, -_INT8_MAX, _INT8_MAX).to(tl.int8)


@triton.jit
def store_row(y_ptr, y_scale_ptr, row, D, cols, y, mask, QUANT: tl.constexpr):
    """Store the fp32 row `y` as row `row` of y [*, D]: in y's dtype (QUANT ""), or as the per-token operand of
    the next 8-bit GEMM (QUANT "fp8": e4m3, "int8") with its scale at y_scale[row]."""
    if QUANT == "fp8":
        inverse, scale = fp8_inverse_scale(tl.max(tl.abs(y), 0))
        tl.store(y_ptr + row * D + cols, to_fp8(y, inverse), mask=mask)
        tl.store(y_scale_ptr + row, scale)
    elif QUANT == "int8":
        inverse, scale = int8_inverse_scale(tl.max(tl.abs(y), 0))
        tl.store(y_ptr + row * D + cols, to_int8(y, inverse), mask=mask)
        tl.store(y_scale_ptr + row, scale)
    else:
        tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
