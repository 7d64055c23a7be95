import math

import pytest
import torch

from matxfer.regularizers import add_l2_sp_grad_, bss_penalty, l2_sp_penalty


def test_l2sp_is_zero_at_the_anchor():
    w = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    anchors = [p.detach().clone() for p in w]
    assert l2_sp_penalty(w, anchors).item() == 0.0


def test_l2sp_exact_value_and_gradient_for_known_perturbation():
    w0 = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    w = [torch.tensor([1.5, 1.0], requires_grad=True), torch.tensor([[2.5]], requires_grad=True)]
    value = l2_sp_penalty(w, w0)
    assert value.item() == pytest.approx(0.25 + 1.0 + 4.0)  # 0.5^2 + 1^2 + 2^2
    value.backward()
    assert torch.allclose(w[0].grad, torch.tensor([1.0, -2.0]))  # 2 (w - w0)
    assert torch.allclose(w[1].grad, torch.tensor([[4.0]]))


def test_closed_form_l2sp_gradient_by_hand():
    """Same perturbation as above, scale 0.1: grads 0.1 * 2 (w - w0) added to what is there
    (a missing grad becomes the term), value 0.1 * 5.25."""
    w0 = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    w = [torch.tensor([1.5, 1.0], requires_grad=True), torch.tensor([[2.5]], requires_grad=True)]
    w[0].grad = torch.tensor([10.0, 10.0])
    value = add_l2_sp_grad_(w, w0, 0.1)
    assert value == pytest.approx(0.525)
    assert torch.allclose(w[0].grad, torch.tensor([10.1, 9.8]))
    assert torch.allclose(w[1].grad, torch.tensor([[0.4]]))


def test_closed_form_l2sp_gradient_equals_autograd():
    torch.manual_seed(0)
    w0 = [torch.randn(7, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    w = [(a + 0.1 * torch.randn_like(a)).requires_grad_(True) for a in w0]
    (3e-3 * l2_sp_penalty(w, w0)).backward()
    expected = [p.grad.clone() for p in w]
    for p in w:
        p.grad = None
    value = add_l2_sp_grad_(w, w0, 3e-3)
    assert value == pytest.approx(3e-3 * l2_sp_penalty(w, w0).item(), rel=1e-12)
    for p, g in zip(w, expected):
        assert torch.allclose(p.grad, g, rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        add_l2_sp_grad_(w, w0[:1], 1.0)


def test_l2sp_gradient_is_defined_at_the_anchor():
    w = [torch.ones(3, requires_grad=True)]
    l2_sp_penalty(w, [torch.ones(3)]).backward()
    assert torch.equal(w[0].grad, torch.zeros(3))


def test_l2sp_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        l2_sp_penalty([torch.ones(2)], [])


def test_bss_sums_the_k_smallest_squared_singular_values():
    # singular values of diag(3, 2, 1) padded to [4, 3] are 3, 2, 1
    f = torch.zeros(4, 3)
    f[0, 0], f[1, 1], f[2, 2] = 3.0, 2.0, 1.0
    assert bss_penalty(f, 1).item() == pytest.approx(1.0)
    assert bss_penalty(f, 2).item() == pytest.approx(1.0 + 4.0)


def test_bss_with_batch_smaller_than_dim_uses_the_existing_values():
    f = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]])  # batch 2 < dim 4
    assert bss_penalty(f, 1).item() == pytest.approx(9.0)
    assert bss_penalty(f, 10).item() == pytest.approx(25.0)  # k clipped to 2


def test_bss_gradient_is_finite_with_repeated_singular_values():
    f = (2.0 * torch.eye(4)).requires_grad_(True)  # all four singular values equal 2
    value = bss_penalty(f, 2)
    value.backward()
    assert value.item() == pytest.approx(8.0)
    assert torch.isfinite(f.grad).all()


def test_bss_gradient_matches_finite_differences():
    torch.manual_seed(0)
    f = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: bss_penalty(x, 2), (f,))


def test_bss_rejects_bad_shapes_and_k():
    with pytest.raises(ValueError):
        bss_penalty(torch.ones(3), 1)
    with pytest.raises(ValueError):
        bss_penalty(torch.ones(3, 3), 0)
    assert math.isfinite(bss_penalty(torch.ones(3, 3), 1).item())
