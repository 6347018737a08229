"""examples/ and the drop-in snippets of docs/interop.md (and of the README, once it has one) run as
written."""
import pathlib
import re
import runpy

import pytest
import torch

pytest.importorskip("diffusers")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def example(name):
    return runpy.run_path(str(ROOT / "examples" / f"{name}.py"))["main"]


def mean(values):
    return sum(values) / len(values)


def test_diffusers_train_unconditional_learns_and_samples():
    losses, images = example("diffusers_train_unconditional")(steps=30)
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5])
    assert images.shape == (4, 8, 8, 3) and 0 <= images.min() and images.max() <= 1


def test_diffusers_pipelines_agree_three_ways():
    differences = example("diffusers_pipeline")(steps=20)
    assert set(differences) == {"ddpm", "ddim"}
    assert all(value < 1e-5 for method in differences.values() for value in method.values())


def test_lucidrains_style_loop_learns_and_samples():
    losses, samples = example("lucidrains_style")(steps=30)
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5])
    assert samples.shape == (4, 3, 8, 8) and 0 <= samples.min() and samples.max() <= 1


def test_improved_diffusion_style_loop_learns_samples_and_bounds():
    losses, respaced, ddim, bpd, state = example("improved_diffusion_style")(steps=20)
    assert mean(losses[-5:]) < mean(losses[:5])
    assert respaced.shape == ddim.shape == (4, 3, 8, 8) and respaced.abs().max() <= 1
    assert torch.isfinite(bpd["total_bpd"]).all() and state["_extra_state"]["loss_counts"].sum() > 0


def drop_in_snippet(path):
    """The ```python block whose first line is "# drop-in: diffusers", or None."""
    blocks = re.findall(r"```python\n(.*?)\n```", path.read_text(), re.S)
    return next((block for block in blocks if block.startswith("# drop-in: diffusers")), None)


@pytest.mark.parametrize("document", ["docs/interop.md", "README.md"])
def test_the_drop_in_snippet_runs_as_written(document):
    snippet = drop_in_snippet(ROOT / document)
    if snippet is None:
        assert document == "README.md", "docs/interop.md must hold the drop-in snippet"
        pytest.skip("the README has no '# drop-in: diffusers' snippet yet")
    namespace = {}
    exec(compile(snippet, document, "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["loss"].ndim == 0
    assert all(p.grad is None for p in namespace["model"].parameters())  # zero_grad ran after each step
