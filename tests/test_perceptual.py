"""The VAE target's losses: the VGG16 trunk loads from torchvision / LPIPS files, the LPIPS-style distance matches
a hand computation, and bad weight files are one-line errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from shared.core.errors import InputError
from stages.train import perceptual as P


def random_net(seed: int = 0) -> P.Perceptual:
    torch.manual_seed(seed)
    net = P.Perceptual()
    for lin in net.lins:
        lin.data = torch.rand_like(lin)
    return net


def images(seed: int, n: int = 2, side: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


def torchvision_state(net: P.Perceptual) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("features.")}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # the rest of a torchvision file is ignored
    return state


def lpips_state(net: P.Perceptual) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in net.state_dict().items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            k = next(s for s in range(1, 6) if P.SLICE_START[s - 1] <= index < P.SLICE_START[s])
            state[f"net.slice{k}.{index}.{key.split('.')[2]}"] = value.clone()
    for k, lin in enumerate(net.lins):
        state[f"lin{k}.model.1.weight"] = lin.detach().clone()
    return state


def test_a_torchvision_file_loads_the_trunk(tmp_path):
    net = random_net()
    save_file(torchvision_state(net), str(tmp_path / "vgg16.safetensors"))
    loaded = P.load(tmp_path / "vgg16.safetensors")
    x = images(1)
    for a, b in zip(net.taps(x), loaded.taps(x)):
        assert torch.equal(a, b)
    assert all(torch.equal(lin, torch.ones_like(lin)) for lin in loaded.lins)  # no lin weights: equal weights


def test_an_lpips_torch_file_loads_trunk_and_lin_weights(tmp_path):
    net = random_net(3)
    torch.save(lpips_state(net), tmp_path / "lpips_vgg.pth")
    loaded = P.load(tmp_path / "lpips_vgg.pth")
    a, b = images(4), images(5)
    assert torch.allclose(net(a, b), loaded(a, b))
    assert not torch.equal(loaded.lins[0], torch.ones_like(loaded.lins[0]))


def test_distance_matches_a_hand_computation():
    net = random_net(7)
    a, b = images(8), images(9)
    fa, fb = net.taps(a), net.taps(b)
    expected = torch.zeros(2)
    for w, lin, x, y in zip((1.0, 0.5, 0.0, 2.0, 1.0), net.lins, fa, fb):
        nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        expected += w * ((nx - ny) ** 2 * lin).sum(1).mean((1, 2))
    net.layer_weights.copy_(torch.tensor((1.0, 0.5, 0.0, 2.0, 1.0)))
    assert torch.allclose(net(a, b), expected, rtol=1e-5)
    assert net(a, a).abs().max() == 0
    assert float(net(a, b).min()) > 0


def test_gradients_reach_the_image_not_the_network():
    net = random_net()
    a = images(1).requires_grad_(True)
    net(a, images(2)).sum().backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    assert all(p.grad is None for p in net.parameters())


def test_losses_by_hand():
    pred, target = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(P.reconstruction(pred, target, "l1"), torch.tensor([1.5]))
    assert torch.allclose(P.reconstruction(pred, target, "l2"), torch.tensor([2.5]))
    assert P.kl(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0
    # KL(N(1, e) || N(0, 1)) = 0.5 * (1 + e - 1 - 1) per element
    assert torch.allclose(P.kl(torch.ones(1, 4), torch.ones(1, 4)), torch.tensor([0.5 * (torch.e - 1)]))
    loss, parts = P.vae_loss(pred, target, "l1", None, 0.0, torch.ones(1, 4), torch.ones(1, 4), w_kl=2.0)
    assert torch.allclose(loss, torch.tensor([1.5 + 2.0 * 0.5 * (torch.e - 1)]))
    assert set(parts) == {"reconstruction", "kl"}
    with pytest.raises(ValueError):
        P.vae_loss(pred, target, "l1", None, 0.5)


def test_bad_weight_files_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such perceptual-network weights file"):
        P.load(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable weights file"):
        P.load(tmp_path / "junk.safetensors")
    state = torchvision_state(random_net())
    del state["features.28.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(InputError, match="1 of its 26 trunk tensors are missing .first: features.28.weight"):
        P.load(tmp_path / "partial.safetensors")
    state = torchvision_state(random_net())
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(InputError, match=r"features.0.weight has shape \(64, 3, 5, 5\)"):
        P.load(tmp_path / "shape.safetensors")
