"""Integer helpers of the launch code.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects since Triton
3.5: a host call goes through a wrapper that unwraps every argument (about 2 us a call on a
CPU like the CI's, against a few tens of nanoseconds for the arithmetic), and a three-branch
loss call made some 35 of them. The launch code calls these instead; kernels keep ``tl.cdiv``.
"""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for ``y > 0``."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1``; 0 for 0, as Triton's."""
    return n if n <= 1 else 1 << (n - 1).bit_length()
