import numpy as np
import pytest
import torch
from torch import nn

import memnet
from memnet.model import MemoryBlock


def test_m6r6_has_exactly_the_papers_conv_weights():
    m = memnet.MemNet(6, 6, 64)
    assert memnet.conv_weight_count(m) == 676_992


@pytest.mark.parametrize("blocks,recursions", [(6, 6), (10, 10), (3, 2), (1, 1)])
def test_depth_is_2_plus_m_2r_plus_1(blocks, recursions):
    m = memnet.MemNet(blocks, recursions, 8)
    assert m.depth == 2 + blocks * (2 * recursions + 1)
    # Count it from the modules too: convs applied per forward = FENet + 2R per block + gate + recon.
    applied = 1 + sum(2 * b.recursions + 1 for b in m.blocks) + 1
    assert applied == m.depth
    if (blocks, recursions) == (6, 6):
        assert m.depth == 80
    if (blocks, recursions) == (10, 10):
        assert m.depth == 212


def _conv_weights(model, kernel):
    return sum(
        mod.weight.numel()
        for mod in model.modules()
        if isinstance(mod, nn.Conv2d) and mod.kernel_size == (kernel, kernel)
    )


def test_3x3_weights_do_not_depend_on_recursions():
    counts = {r: _conv_weights(memnet.MemNet(4, r, 16), 3) for r in (1, 2, 5, 9)}
    assert len(set(counts.values())) == 1, counts
    # ...while the 1x1 gates and the BNs grow with R.
    gates = {r: _conv_weights(memnet.MemNet(4, r, 16), 1) for r in (1, 2, 5)}
    assert gates[1] < gates[2] < gates[5]
    bns = {r: sum(isinstance(x, nn.BatchNorm2d) for x in memnet.MemNet(4, r, 16).modules()) for r in (1, 2, 5)}
    assert bns[1] < bns[2] < bns[5]


def test_recursions_share_one_residual_block_but_have_their_own_bn():
    block = MemoryBlock(index=1, recursions=3, channels=8)
    convs3 = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 2
    assert len(block.bn_a) == len(block.bn_b) == 3
    assert len({id(b) for b in block.bn_a}) == 3


def test_gate_input_width_is_m_plus_r_times_c():
    m = memnet.MemNet(blocks=4, recursions=3, channels=8)
    for i, block in enumerate(m.blocks, start=1):
        assert block.gate.conv.in_channels == (i + 3) * 8
        assert block.gate.conv.kernel_size == (1, 1)


def test_pre_activation_on_the_raw_input():
    m = memnet.MemNet(2, 2, 8)
    assert isinstance(m.fenet.bn, nn.BatchNorm2d) and m.fenet.bn.num_features == 1


def test_reconstruction_conv_is_shared_with_one_bn_per_branch():
    m = memnet.MemNet(3, 2, 8)
    assert isinstance(m.recon_conv, nn.Conv2d) and m.recon_conv.out_channels == 1
    assert len(m.recon_bn) == 3


def test_branches_and_weighted_sum(tiny_model):
    x = torch.rand(2, 1, 20, 23)
    final, branches = tiny_model(x, branches=True)
    assert len(branches) == 2 and final.shape == x.shape
    expected = sum(w * y for w, y in zip(tiny_model.branch_weights, branches))
    torch.testing.assert_close(final, expected)
    torch.testing.assert_close(tiny_model(x), final)


def test_a_new_model_starts_as_the_identity_and_learns_from_the_first_steps():
    """Init: zero reconstruction conv (every branch and the output equal the input) and a +3 shift in
    the input BN, so its ReLU passes nearly every pixel instead of hiding the below-mean half."""
    torch.manual_seed(0)
    m = memnet.MemNet(2, 2, 8).train()
    x = torch.rand(4, 1, 16, 16)
    final, branches = m(x, branches=True)
    for y in branches + [final]:
        torch.testing.assert_close(y, x)
    z = m.fenet.bn(x)
    assert (z > 0).float().mean() > 0.99
    target = x.flip(-1)  # something to learn
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        final, branches = m(x, branches=True)
        loss = sum(((y - target) ** 2).mean() for y in branches + [final])
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    # After one step the reconstruction conv is non-zero and gradients reach every shared conv.
    assert m.branch_weights.grad is not None and m.branch_weights.grad.abs().sum() > 0
    assert m.blocks[0].conv_a.weight.grad.abs().sum() > 0 and m.fenet.conv.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("cfg", [(2, 2, 4), (3, 1, 4), (1, 3, 4)])
def test_receptive_field_matches_impulse_response(cfg):
    torch.manual_seed(1)
    m = memnet.MemNet(*cfg).double().eval()
    nn.init.normal_(m.recon_conv.weight)  # the zero init would hide every path
    r = memnet.receptive_field(m)
    assert r == 2 + 2 * cfg[0] * cfg[1]
    size = 2 * r + 9
    c = size // 2
    x = torch.randn(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    m(x)[0, 0, c, c].backward()
    g = x.grad[0, 0].abs() > 0
    ys, xs = torch.nonzero(g, as_tuple=True)
    measured = int(max((ys - c).abs().max(), (xs - c).abs().max()))
    assert measured == r


def test_receptive_field_of_the_paper_model():
    assert memnet.receptive_field(memnet.MemNet(6, 6, 64)) == 74


def test_macs_per_pixel_m6r6():
    assert memnet.macs_per_pixel(memnet.CONFIGS["M6R6C64"]) == 2_891_712


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(blocks=0), "blocks must be a positive integer"),
        (dict(channels=2.5), "channels must be a positive integer"),
        (dict(in_channels=3, out_channels=1), "in_channels == out_channels"),
    ],
)
def test_bad_config_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        memnet.MemNet(**kwargs)


def test_receptive_field_rejects_other_modules():
    with pytest.raises(TypeError, match="needs a memnet.MemNet"):
        memnet.receptive_field(nn.Conv2d(1, 1, 3))


def _randomised(model: memnet.MemNet) -> memnet.MemNet:
    """A model whose every weight, bias and BN statistic is non-trivial (a fresh one outputs its input)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.rand(t.shape, generator=g)
                t.copy_(0.5 + r if "running_var" in name or name.endswith("bn.weight") else (r - 0.5) * 0.4)
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_widen_computes_the_same_function_with_more_channels(mode):
    narrow = _randomised(memnet.MemNet(2, 2, 8))
    wide = memnet.widen(narrow, 12)
    assert wide.config.channels == 12 and (wide.config.blocks, wide.config.recursions) == (2, 2)
    assert wide.blocks[1].gate.conv.weight.shape == (12, (2 + 2) * 12, 1, 1)
    x = torch.rand(2, 1, 20, 20)
    getattr(narrow, mode)(), getattr(wide, mode)()
    ref = narrow(x)
    assert ref.std() > 1e-3  # a real function, not the identity
    torch.testing.assert_close(wide(x), ref, atol=1e-5, rtol=1e-5)
    # The new channels are live: their outgoing (zero) weights get gradients at once.
    wide.train()
    loss = (wide(x) - x).pow(2).mean()
    loss.backward()
    new_to_old = wide.blocks[0].conv_a.weight.grad[:8, 8:]
    assert new_to_old.abs().sum() > 0


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_deepen_computes_the_same_function_with_more_blocks_and_recursions(mode):
    shallow = _randomised(memnet.MemNet(2, 2, 8))
    deep = memnet.deepen(shallow, 3, 4)
    assert (deep.config.blocks, deep.config.recursions, deep.config.channels) == (3, 4, 8)
    assert deep.blocks[1].gate.conv.weight.shape == (8, (2 + 4) * 8, 1, 1)
    x = torch.rand(2, 1, 20, 20)
    getattr(shallow, mode)(), getattr(deep, mode)()
    ref = shallow(x)
    assert ref.std() > 1e-3
    torch.testing.assert_close(deep(x), ref, atol=1e-5, rtol=1e-5)
    # The new parts are live: the new branch weight and the new recursions' gate weights get gradients.
    deep.train()
    final, branches = deep(x, branches=True)
    (sum((b - x).pow(2).mean() for b in branches) + (final - x).pow(2).mean()).backward()
    assert deep.branch_weights.grad[2].abs() > 0
    assert deep.blocks[0].gate.conv.weight.grad[:, 3 * 8:].abs().sum() > 0
    with pytest.raises(ValueError, match="blocks must be an integer >= the model's 2"):
        memnet.deepen(shallow, 1, 2)


def test_widen_refuses_to_shrink():
    with pytest.raises(ValueError, match="channels must be an integer >= the model's 8"):
        memnet.widen(memnet.MemNet(2, 2, 8), 4)


def test_widen_leaves_the_callers_random_state_alone():
    narrow = memnet.MemNet(2, 2, 8)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    memnet.widen(narrow, 12, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_self_ensemble_is_the_mean_over_the_eight_flips_and_rotations(tiny_model):
    x = torch.rand(2, 1, 23, 31, generator=torch.Generator().manual_seed(3))
    xs = x.numpy()
    members = []
    with torch.no_grad():
        for k in range(4):
            for flip in (False, True):
                t = np.rot90(xs, k, axes=(2, 3))
                t = t[..., ::-1] if flip else t
                y = tiny_model(torch.from_numpy(np.ascontiguousarray(t))).numpy()
                y = y[..., ::-1] if flip else y
                members.append(np.rot90(y, -k, axes=(2, 3)))
        got = memnet.self_ensemble(tiny_model, x).numpy()
        plain = tiny_model(x).numpy()
    assert got.shape == plain.shape
    np.testing.assert_allclose(got, np.mean(members, axis=0), atol=1e-6)
    assert np.abs(got - plain).max() > 1e-3  # a random net is not flip/rotation-equivariant


def test_validation_predictor_can_self_ensemble(tiny_model):
    from memnet.evaluate import predictor

    x = np.random.default_rng(1).random((30, 26), dtype=np.float32)
    with torch.no_grad():
        ref = memnet.self_ensemble(tiny_model, torch.from_numpy(x)[None, None]).numpy()[0, 0]
    np.testing.assert_allclose(predictor(tiny_model, ensemble=True)(x), ref, atol=1e-6)
