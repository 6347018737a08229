"""`fastddpm verify`: every kernel against the float64 reference, as a user runs it."""
import torch

import fastddpm.verify as verify_module


def test_every_kernel_agrees_with_the_reference():
    lines = []
    assert verify_module.verify(shapes=((2, 3, 4, 4),), seed=11, print_fn=lines.append)
    ops = {line.split("  ")[0] for line in lines[1:-1]}
    for op in ("q_sample", "p_sample_step eps learned_range", "ddim_step v eta=1", "diffusion_loss+grad x0 vlb",
               "vb_terms_bpd eps learned_range", "hybrid_loss+grad v kl"):
        assert op in ops
    assert lines[-1].endswith(", 0 failed")


def test_a_wrong_kernel_is_reported(monkeypatch):
    """Break the q-sample kernel's result: verify must say FAIL and return False."""
    from fastddpm import functional

    original = functional.q_sample

    def wrong_q_sample(*args, **kwargs):
        result = original(*args, **kwargs)
        return result * 1.001 if isinstance(result, torch.Tensor) else result

    monkeypatch.setattr(verify_module.F, "q_sample", wrong_q_sample)
    lines = []
    assert not verify_module.verify(shapes=((2, 3, 4, 4),), dtypes=(torch.float32,), print_fn=lines.append)
    assert any(line.startswith("q_sample ") and line.rstrip().endswith("FAIL") for line in lines)
