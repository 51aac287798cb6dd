"""The orders in which a decoder layer's groups are pruned (see driver.py); torch-free so specs can check them."""

from __future__ import annotations

ORDERS: tuple[str, ...] = ("sequential", "reference")


def check_order(order: str) -> str:
    """`order` when it is one of ORDERS, else a one-line error naming what is allowed."""
    if order not in ORDERS:
        raise ValueError(f"order {order!r} is not allowed: use one of {', '.join(ORDERS)}")
    return order
