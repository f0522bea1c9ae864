"""The Triton kernels of ``_scan_triton`` (imported only where Triton is installed; see that module)."""

import triton
import triton.language as tl


@triton.jit
def _affine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), log1p by the u = 1 + e correction (no precision lost for tiny e)
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    l1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.maximum(x, 0.0) + l1p


@triton.jit
def _positions(k, L, BT: tl.constexpr, REVERSE: tl.constexpr, SHIFT: tl.constexpr):
    # scan-order steps s of tile k shifted by SHIFT, the time index of each, and whether it exists
    s = k * BT + tl.arange(0, BT) + SHIFT
    if REVERSE:
        t = L - 1 - s
    else:
        t = s
    return s, t, (s >= 0) & (s < L)


@triton.jit
def _load_dt(dt_ptr, bias, offs_d, t, m2, sdt_b, sdt_d, sdt_t, pid_b,
             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    raw = tl.load(dt_ptr + pid_b * sdt_b + offs_d[:, None] * sdt_d + t[None, :] * sdt_t, mask=m2,
                  other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(m2, dt, 0.0), raw


@triton.jit
def _load_bc(ptr, pid_b, grp, offs_n, t, mask_t, mask_n, s_b, s_g, s_n, s_t):
    # (BT, NP) float32
    return tl.load(ptr + pid_b * s_b + grp * s_g + offs_n[None, :] * s_n + t[:, None] * s_t,
                   mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)


@triton.jit
def _program_rows(d, n, ch_per_group, A_ptr, D_ptr, bias_ptr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BD: tl.constexpr, NP: tl.constexpr):
    # This program's channels (axis 1 of the grid) and states, their masks, its B/C group (a program's channels
    # share one: BD divides ch_per_group), and its rows of A (float32, (BD, NP)), D and the delta bias (zeros when
    # absent).
    pid_d = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    mask_d = offs_d < d
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = (pid_d * BD) // ch_per_group
    A = tl.load(A_ptr + offs_d[:, None] * n + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    Dv = tl.zeros([BD], tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros([BD], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, mask_d, offs_n, mask_n, mask_dn, grp, A, Dv, bias


@triton.jit
def scan_fwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, add_ptr, out_ptr, last_ptr, states_ptr,
             d, L, n, ch_per_group, ntiles,
             su_b, su_d, su_t, sdt_b, sdt_d, sdt_t, sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
             sz_b, sz_d, sz_t, sa_b, sa_d, sa_t, so_b, so_d, so_t,
             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
             GATE_ADD: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, SAVE_STATES: tl.constexpr,
             BD: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr):
    pid_b = tl.program_id(0)
    offs_d, mask_d, offs_n, mask_n, mask_dn, grp, A, Dv, bias = _program_rows(
        d, n, ch_per_group, A_ptr, D_ptr, bias_ptr, HAS_D, HAS_BIAS, BD, NP)
    last_col = (tl.arange(0, BT) == BT - 1)[None, :, None]
    h = tl.zeros([BD, NP], tl.float32)
    for k in range(0, ntiles):
        s, t, mask_t = _positions(k, L, BT, REVERSE, 0)
        m2 = mask_d[:, None] & mask_t[None, :]
        if SAVE_STATES:
            tl.store(states_ptr + ((pid_b * d + offs_d[:, None]) * ntiles + k) * n + offs_n[None, :], h,
                     mask=mask_dn)
        uu = tl.load(u_ptr + pid_b * su_b + offs_d[:, None] * su_d + t[None, :] * su_t, mask=m2,
                     other=0.0).to(tl.float32)
        dt, _raw = _load_dt(dt_ptr, bias, offs_d, t, m2, sdt_b, sdt_d, sdt_t, pid_b, HAS_BIAS, SOFTPLUS)
        Bt = _load_bc(B_ptr, pid_b, grp, offs_n, t, mask_t, mask_n, sB_b, sB_g, sB_n, sB_t)
        Ct = _load_bc(C_ptr, pid_b, grp, offs_n, t, mask_t, mask_n, sC_b, sC_g, sC_n, sC_t)
        a = tl.exp(dt[:, :, None] * A[:, None, :])  # 1 at missing positions (dt = 0 there): the identity
        x = (dt * uu)[:, :, None] * Bt[None, :, :]
        ca, hs = tl.associative_scan((a, x), 1, _affine)
        hs = hs + ca * h[:, None, :]
        y = tl.sum(hs * Ct[None, :, :], axis=2)
        h = tl.sum(tl.where(last_col, hs, 0.0), axis=1)
        if HAS_D:
            y = y + Dv[:, None] * uu
        if HAS_ADD:
            ad = tl.load(add_ptr + pid_b * sa_b + offs_d[:, None] * sa_d + t[None, :] * sa_t, mask=m2,
                         other=0.0).to(tl.float32)
            if GATE_ADD:
                y = y + ad
        if HAS_Z:
            zz = tl.load(z_ptr + pid_b * sz_b + offs_d[:, None] * sz_d + t[None, :] * sz_t, mask=m2,
                         other=0.0).to(tl.float32)
            y = y * (zz * tl.sigmoid(zz))
        if HAS_ADD:
            if not GATE_ADD:
                y = y + ad
        tl.store(out_ptr + pid_b * so_b + offs_d[:, None] * so_d + t[None, :] * so_t,
                 y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(last_ptr + (pid_b * d + offs_d[:, None]) * n + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def scan_bwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, add_ptr, states_ptr, g_ptr,
             du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dadd_ptr,
             d, L, n, ch_per_group, ntiles,
             su_b, su_d, su_t, sdt_b, sdt_d, sdt_t, sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
             sz_b, sz_d, sz_t, sa_b, sa_d, sa_t, sg_b, sg_d, sg_t, sdB_b, sdB_g, sdB_n, sdB_t,
             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
             GATE_ADD: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
             BD: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr):
    # du, ddt, dz, dadd (with GATE_ADD): (batch, d, L) contiguous, written whole; dA (d, n), dB/dC (batch, groups,
    # n, L), dD and dbias (d): float32, zeroed by the caller and accumulated with atomics.
    pid_b = tl.program_id(0)
    offs_d, mask_d, offs_n, mask_n, mask_dn, grp, A, Dv, bias = _program_rows(
        d, n, ch_per_group, A_ptr, D_ptr, bias_ptr, HAS_D, HAS_BIAS, BD, NP)
    first_col = (tl.arange(0, BT) == 0)[None, :, None]
    dh_next = tl.zeros([BD, NP], tl.float32)  # dh at the first step of the tile after this one
    dA_acc = tl.zeros([BD, NP], tl.float32)
    dD_acc = tl.zeros([BD], tl.float32)
    dbias_acc = tl.zeros([BD], tl.float32)
    row = pid_b * d * L + offs_d[:, None] * L  # offsets into the contiguous (batch, d, L) gradients
    for kk in range(0, ntiles):
        k = ntiles - 1 - kk
        s, t, mask_t = _positions(k, L, BT, REVERSE, 0)
        m2 = mask_d[:, None] & mask_t[None, :]
        # The states before each step: a scan of the previous steps' pairs from the tile's saved entering state
        # (the tile's first step gets the identity).
        sp, tp, mask_p = _positions(k, L, BT, REVERSE, -1)
        mask_p = mask_p & (sp >= k * BT)
        mp2 = mask_d[:, None] & mask_p[None, :]
        up = tl.load(u_ptr + pid_b * su_b + offs_d[:, None] * su_d + tp[None, :] * su_t, mask=mp2,
                     other=0.0).to(tl.float32)
        dtp, _rp = _load_dt(dt_ptr, bias, offs_d, tp, mp2, sdt_b, sdt_d, sdt_t, pid_b, HAS_BIAS, SOFTPLUS)
        Bp = _load_bc(B_ptr, pid_b, grp, offs_n, tp, mask_p, mask_n, sB_b, sB_g, sB_n, sB_t)
        h0 = tl.load(states_ptr + ((pid_b * d + offs_d[:, None]) * ntiles + k) * n + offs_n[None, :],
                     mask=mask_dn, other=0.0)
        cp, hb = tl.associative_scan((tl.exp(dtp[:, :, None] * A[:, None, :]), (dtp * up)[:, :, None] * Bp[None, :, :]),
                                     1, _affine)
        hp = hb + cp * h0[:, None, :]
        # This tile's own steps.
        uu = tl.load(u_ptr + pid_b * su_b + offs_d[:, None] * su_d + t[None, :] * su_t, mask=m2,
                     other=0.0).to(tl.float32)
        dt, raw = _load_dt(dt_ptr, bias, offs_d, t, m2, sdt_b, sdt_d, sdt_t, pid_b, HAS_BIAS, SOFTPLUS)
        Bt = _load_bc(B_ptr, pid_b, grp, offs_n, t, mask_t, mask_n, sB_b, sB_g, sB_n, sB_t)
        Ct = _load_bc(C_ptr, pid_b, grp, offs_n, t, mask_t, mask_n, sC_b, sC_g, sC_n, sC_t)
        a = tl.exp(dt[:, :, None] * A[:, None, :])
        xu = dt * uu
        hs = a * hp + xu[:, :, None] * Bt[None, :, :]
        g = tl.load(g_ptr + pid_b * sg_b + offs_d[:, None] * sg_d + t[None, :] * sg_t, mask=m2,
                    other=0.0).to(tl.float32)
        gy = g
        if HAS_Z:
            y = tl.sum(hs * Ct[None, :, :], axis=2)
            if HAS_D:
                y = y + Dv[:, None] * uu
            if HAS_ADD:
                if GATE_ADD:
                    y = y + tl.load(add_ptr + pid_b * sa_b + offs_d[:, None] * sa_d + t[None, :] * sa_t,
                                    mask=m2, other=0.0).to(tl.float32)
            zz = tl.load(z_ptr + pid_b * sz_b + offs_d[:, None] * sz_d + t[None, :] * sz_t, mask=m2,
                         other=0.0).to(tl.float32)
            sig = tl.sigmoid(zz)
            dz = g * y * sig * (1.0 + zz * (1.0 - sig))
            tl.store(dz_ptr + row + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
            gy = g * (zz * sig)
        if GATE_ADD:  # (without the gate, add's gradient is dout itself: the caller passes it on)
            tl.store(dadd_ptr + row + t[None, :], gy.to(dadd_ptr.dtype.element_ty), mask=m2)
        # dh_s = gy_s C_s + a_{s+1} dh_{s+1}: a reverse scan of (a of the next step, gy C), the state gradient
        # entering from the next tile added through the scanned product.
        sn, tn, mask_nx = _positions(k, L, BT, REVERSE, 1)
        mn2 = mask_d[:, None] & mask_nx[None, :]
        dtn, _rn = _load_dt(dt_ptr, bias, offs_d, tn, mn2, sdt_b, sdt_d, sdt_t, pid_b, HAS_BIAS, SOFTPLUS)
        an = tl.where(mn2[:, :, None], tl.exp(dtn[:, :, None] * A[:, None, :]), 0.0)
        ra, rb = tl.associative_scan((an, gy[:, :, None] * Ct[None, :, :]), 1, _affine, reverse=True)
        dh = rb + ra * dh_next[:, None, :]
        dh_next = tl.sum(tl.where(first_col, dh, 0.0), axis=1)
        # dC_s = sum over channels of gy h_s; dB_s = sum over channels of dh_s dt u
        dC = tl.sum(gy[:, :, None] * hs, axis=0)
        dB = tl.sum(dh * xu[:, :, None], axis=0)
        m_tn = mask_t[:, None] & mask_n[None, :]
        bc_off = pid_b * sdB_b + grp * sdB_g + offs_n[None, :] * sdB_n + t[:, None] * sdB_t
        tl.atomic_add(dC_ptr + bc_off, dC, mask=m_tn)
        tl.atomic_add(dB_ptr + bc_off, dB, mask=m_tn)
        dxu = tl.sum(dh * Bt[None, :, :], axis=2)  # gradient of dt * u
        w = dh * hp * a  # gradient of the exponent dt * A
        ddt = uu * dxu + tl.sum(w * A[:, None, :], axis=2)
        dA_acc += tl.sum(w * dt[:, :, None], axis=1)
        du = dt * dxu
        if HAS_D:
            du = du + Dv[:, None] * gy
            dD_acc += tl.sum(tl.where(m2, gy * uu, 0.0), axis=1)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + row + t[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + row + t[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
    tl.atomic_add(dA_ptr + offs_d[:, None] * n + offs_n[None, :], dA_acc, mask=mask_dn)
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, dbias_acc, mask=mask_d)
