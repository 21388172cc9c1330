import torch

from dimba.diffusion.gaussian import eps_from_x0, q_sample, v_target, x0_from_v
from dimba.diffusion.schedules import NoiseSchedule


def test_endpoints_and_monotone():
    for kind in ("cosine", "linear"):
        s = NoiseSchedule(kind, zero_terminal_snr=True)
        t = torch.linspace(0, 1, 101)
        ab = s.alpha_bar(t)
        assert abs(float(ab[0]) - 1) < 1e-6 and float(ab[-1]) == 0.0
        assert (ab[1:] <= ab[:-1]).all()
    assert float(NoiseSchedule("linear", zero_terminal_snr=False).alpha_bar(torch.tensor(1.0))) > 0


def test_integer_timesteps_map_into_unit_interval():
    s = NoiseSchedule("cosine", num_steps=10)
    assert torch.allclose(s.to_continuous(torch.tensor([0, 9])), torch.tensor([0.1, 1.0], dtype=torch.float64))


def test_parameterisations_invert():
    torch.manual_seed(0)
    z0, eps = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    ab = torch.tensor([0.9, 0.5, 0.1, 0.01])
    zt = q_sample(z0, ab, eps)
    assert torch.allclose(x0_from_v(zt, v_target(z0, eps, ab), ab), z0, atol=1e-5)
    assert torch.allclose(eps_from_x0(zt, z0, ab), eps, atol=1e-4)


def test_shift_divides_snr_and_keeps_endpoints():
    base, shifted = NoiseSchedule("cosine"), NoiseSchedule("cosine", shift=4.0)
    t = torch.tensor([0.2, 0.5, 0.8])
    assert torch.allclose(shifted.snr(t), base.snr(t) / 16, rtol=1e-4)
    assert float(shifted.alpha_bar(torch.tensor(1.0))) == 0.0 and abs(float(shifted.alpha_bar(torch.tensor(0.0))) - 1) < 1e-6
