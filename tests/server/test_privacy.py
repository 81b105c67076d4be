"""DP-SGD gradients through a real server: clipped sums against the float64 vmap(grad)
reference, noise reproducible by seed, fresh noise without one."""

import numpy as np
import pytest
import torch

from tests import per_sample
from tests.jobs import random_job

SIZES = (6, 10, 7, 2)


def job_args(seed=3):
    tensors = random_job(SIZES, 5, 13, sample_weights=True, seed=seed)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    args = (params, tensors["inputs"].numpy(), tensors["targets"].numpy())
    return tensors, args, {"sample_weights": tensors["sample_weights"].numpy()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clipped_gradients_match_the_reference(client, backend):
    tensors, args, kw = job_args()
    wide = {k: v.double() for k, v in tensors.items()}
    ref = per_sample.per_sample_gradients(wide, SIZES, "silu", "mse", "mean")
    clip = float((per_sample.norms(ref) * 13).median())
    want = per_sample.clipped_sums(ref, clip, 13)
    result = client.compute(*args, **kw, hidden_activation="silu", clip_norm=clip, backend=backend)
    assert result.engine == backend
    for name, g in want.items():
        got = torch.from_numpy(result.gradients[name]).double()
        for k in range(5):
            assert (got[k] - g[k]).norm() <= 1e-5 * g[k].norm(), (name, k)


def test_noise_is_reproducible_by_seed_and_fresh_without_one(client):
    _, args, kw = job_args()
    dp = dict(clip_norm=0.2, noise_multiplier=1.1)
    a = client.compute(*args, **kw, **dp, noise_seed=99).gradients
    b = client.compute(*args, **kw, **dp, noise_seed=99).gradients
    c = client.compute(*args, **kw, **dp).gradients
    d = client.compute(*args, **kw, **dp).gradients
    clean = client.compute(*args, **kw, clip_norm=0.2).gradients
    for name in a:
        assert np.array_equal(a[name], b[name])
        assert not np.array_equal(c[name], d[name])
        noise = (a[name] - clean[name]) / (1.1 * 0.2 / 13)
        assert 0.2 < noise.std() < 5  # noise of about the documented size is there
