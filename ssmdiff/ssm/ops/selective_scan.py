"""Selective scan dispatch. Placeholder dispatch to the reference until the fast paths land."""

from __future__ import annotations

from .selective_scan_ref import selective_scan_ref


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, reverse=False):
    return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              return_last_state=return_last_state, reverse=reverse)
