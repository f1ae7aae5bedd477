"""CUDA-graph capture safety, proven on the CPU: the inference graphs build no tensors from host values.

A tensor built from Python values (``torch.tensor``, ``x.new_tensor([...])``, ``torch.as_tensor(list)``) is a
host→device copy on CUDA, which a CUDA graph cannot capture (and which would replay stale data if it could). Every
such call goes through the ``aten.lift_fresh`` operator, so a dispatch mode that records operators finds them on a CPU
run without any GPU.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_iapr, random_images, random_ms_transformer
from torch.utils._python_dispatch import TorchDispatchMode

from apr_localizer import geometry as g


class _HostValueSpy(TorchDispatchMode):
    """Records every operator that turns host (Python) values into a tensor."""

    HOST_OPS = ("aten.lift_fresh", "aten.lift", "aten.scalar_tensor")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.HOST_OPS):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_spy_sees_host_value_tensors():
    q = torch.randn(2, 4)
    with _HostValueSpy() as spy:
        _ = q * q.new_tensor([1.0, -1.0, -1.0, -1.0])  # what iapr_update_torch did before
    assert spy.found == ["aten.lift_fresh.default"]


def test_iapr_update_torch_builds_no_host_tensors():
    gen = torch.Generator().manual_seed(0)
    neighbour, rel = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    with _HostValueSpy() as spy:
        out = g.iapr_update_torch(neighbour, rel)
    assert spy.found == []
    expected = g.iapr_update(neighbour.double().numpy(), rel.double().numpy())
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-encoder", "own-encoder"])
def test_apr_and_refinement_graphs_build_no_host_tensors(shared):
    """The graphs a CUDA graph captures (APR, iAPR encoder, refinement step) on a model WITH an iAPR."""
    apr = random_ms_transformer(seed=0).eval()
    iapr = random_iapr(seed=1, mstransformer=apr if shared else None).eval()
    x = random_images(1)
    with torch.inference_mode():
        scene_override = torch.full((1,), -1, dtype=torch.int64)
        with _HostValueSpy() as spy:
            out = apr(x, scene_override)
            lt, lr = iapr.query_latents(x, out["scene"])
            pose = out["pose"]
            for _ in range(3):
                pose = iapr.step(lt, lr, pose, out["scene"])
    assert spy.found == [], f"host-value tensors inside the captured graphs: {sorted(set(spy.found))}"
    assert torch.isfinite(pose).all()
