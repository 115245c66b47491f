"""kernel_matvec at M = N = 20,000, d = 3 on CPU never allocates an M x N matrix.

Runs in a fresh process and reads its peak resident memory (ru_maxrss): an M x N float32 matrix
would add 1.6 GB; the fused op needs O((M + N)(d + E)).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from steinops.ops import backends

SCRIPT = textwrap.dedent("""
    import resource, sys, torch, steinops
    torch.manual_seed(0)
    M = N = 20000
    x = torch.randn(N, 3); y = torch.randn(M, 3); v = torch.randn(M, 4)
    x.requires_grad_(); y.requires_grad_()
    steinops.kernel_matvec(x[:10], y[:10], v[:10], bandwidth=1.0, backend=sys.argv[1])  # warm-up: libraries loaded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = steinops.kernel_matvec(x, y, v, bandwidth=0.5, backend=sys.argv[1])
    out.square().sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    print((after - before) / 1024)  # MiB
""")


@pytest.mark.skipif(not backends.available("cpu", torch.device("cpu")), reason="C++ extension not built")
def test_kernel_matvec_20k_never_allocates_mxn():
    res = subprocess.run([sys.executable, "-c", SCRIPT, "cpu"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    grown_mib = float(res.stdout.strip().splitlines()[-1])
    mxn_mib = 20000 * 20000 * 4 / 2**20
    assert grown_mib < 0.05 * mxn_mib, f"peak memory grew by {grown_mib:.0f} MiB (M x N float32 is {mxn_mib:.0f} MiB)"
