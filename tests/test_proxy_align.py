"""Stage 1: the DPO loss by hand, the shared loop's accumulation and resume, and alignment on a tiny world."""
import json
import math

import pytest
import torch

import data
import proxy_align
import train
from model import Llama


# ------------------------------------------------------------------------------------- dpo_loss

def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-1.0, -10.0]), torch.tensor([-2.0, -8.0])
    rc, rr = torch.tensor([-1.5, -9.0]), torch.tensor([-1.5, -9.0])
    losses, cr, rj = proxy_align.dpo_loss(pc, pr, rc, rr, beta=0.5)
    # Row 0: ratios +0.5 and -0.5, z = 0.5·1.0 = 0.5, loss = log(1 + e^-0.5) = 0.474077.
    # Row 1: ratios -1 and +1, z = 0.5·(-2) = -1, loss = log(1 + e^1) = 1.313262.
    torch.testing.assert_close(losses, torch.tensor([0.474077, 1.313262]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cr, torch.tensor([0.25, -0.5]))
    torch.testing.assert_close(rj, torch.tensor([-0.25, 0.5]))
    losses, _, _ = proxy_align.dpo_loss(torch.tensor([-10.0]), torch.tensor([-8.0]), torch.tensor([-9.0]),
                                        torch.tensor([-9.0]), beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.798139]), atol=1e-6, rtol=0)  # log(1 + e^0.2)


def test_dpo_loss_against_an_independent_derivation():
    """Float64 re-derivation from the Bradley-Terry form: p(y ≻ ŷ) = e^{r_c} / (e^{r_c} + e^{r_r}),
    loss = -log p; and the gradient w.r.t. log π(y) is -β·(1 - p)."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    pc.requires_grad_(True)
    beta = 0.3
    losses, cr, rj = proxy_align.dpo_loss(pc, pr, rc, rr, beta)
    r_c, r_r = beta * (pc.detach() - rc), beta * (pr - rr)
    p = torch.exp(r_c) / (torch.exp(r_c) + torch.exp(r_r))
    torch.testing.assert_close(losses.detach(), -torch.log(p), atol=1e-10, rtol=1e-10)
    losses.sum().backward()
    torch.testing.assert_close(pc.grad, -beta * (1 - p), atol=1e-10, rtol=1e-10)
    assert not cr.requires_grad and not rj.requires_grad


def test_reduce_logps_mean_and_sum():
    s, n = torch.tensor([-6.0, -3.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(proxy_align.reduce_logps(s, n, "mean"), torch.tensor([-2.0, -3.0]))
    torch.testing.assert_close(proxy_align.reduce_logps(s, n, "sum"), s)


def test_lr_schedule():
    assert train.lr_at(0, 100, 1e-3, "constant", warmup=4) == pytest.approx(2.5e-4)
    assert train.lr_at(50, 100, 1e-3, "constant", warmup=4) == 1e-3
    assert train.lr_at(4, 100, 1e-3, "cosine", warmup=4, min_ratio=0.1) == pytest.approx(1e-3)
    assert train.lr_at(100, 100, 1e-3, "cosine", warmup=4, min_ratio=0.1) == pytest.approx(1e-4)
