"""WeightEMA on its own: the average after a few optimizer steps equals the hand-computed recursion, frozen
parameters are not tracked, and swapping the average in for evaluation leaves the weights as they were."""
import torch

from pipeline.train.ema import WeightEMA, read_ema


def test_ema_matches_hand_computed_average(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    decay = 0.7
    ema = WeightEMA(model, decay)
    assert ema.names == ["0.weight", "1.weight", "1.bias"]
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(4):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        for n, p in model.named_parameters():
            if n in expected:
                expected[n] = decay * expected[n] + (1 - decay) * p.detach()
    state = ema.state_dict()
    for n, v in expected.items():
        torch.testing.assert_close(state[n], v, rtol=0, atol=1e-7)

    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in():
        for n, p in model.named_parameters():
            assert torch.equal(p, state[n] if n in state else raw[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n])

    ema.save(tmp_path)
    other = WeightEMA(model, decay)
    other.load_state_dict(read_ema(tmp_path))
    for a, b in zip(other.average, ema.average):
        assert torch.equal(a, b)
    assert read_ema(tmp_path / "nothing") is None
