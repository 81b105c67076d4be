"""DP-SGD gradients of the torch engine: clipped sums against clipping vmap(grad) per-sample
gradients in float64 and against Opacus' DPOptimizer; noise reproducible by seed and of the
documented distribution."""

import pytest
import torch

from gradserve import kernels
from gradserve.kernels import torch_engine, triton_engine
from tests import per_sample
from tests.jobs import ensemble_job, random_job

SIZES = (5, 9, 4, 3)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def private_job(tensors, privacy, sizes=SIZES, **kw):
    job = ensemble_job(
        tensors, sizes, input_gradients=False, per_sample_losses=False, forward_outputs=False, **kw
    )
    job.privacy = privacy
    return job


def grads_of(result):
    out = {}
    for i, (w, b) in enumerate(zip(result.weight_grads, result.bias_grads, strict=True)):
        out[f"layers.{i}.weight"] = w
        out[f"layers.{i}.bias"] = b
    return out


def median_own_norm(ref, scale):
    """A clip norm that clips about half of the samples."""
    return float((per_sample.norms(ref) * scale).median())


@pytest.mark.parametrize("reduction", kernels.REDUCTIONS)
@pytest.mark.parametrize("loss", kernels.LOSSES)
@pytest.mark.parametrize("hidden", kernels.ACTIVATIONS)
def test_clipped_sums_equal_clipping_vmap_grad_per_sample_gradients(hidden, loss, reduction):
    tensors = random_job(SIZES, 3, 7, loss=loss, sample_weights=True, seed=6, dtype=torch.float64)
    ref = per_sample.per_sample_gradients(tensors, SIZES, hidden, loss, reduction)
    scale = 7 if reduction == "mean" else 1
    clip = median_own_norm(ref, scale)
    job = private_job(
        tensors,
        kernels.Privacy(clip),
        hidden=hidden,
        loss=loss,
        reduction=reduction,
        precision="float64",
    )
    got = grads_of(torch_engine.run(job))
    want = per_sample.clipped_sums(ref, clip, scale)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("reduction", kernels.REDUCTIONS)
@pytest.mark.parametrize("loss", kernels.LOSSES)
@pytest.mark.parametrize("hidden", ["relu", "sigmoid", "silu"])
def test_triton_engine_clipped_sums(hidden, loss, reduction):
    """Clipping inside the fused kernel (float32; interpreter on CPUs), against the float64
    reference, noise included: the engines draw the same noise on one device."""
    tensors = random_job(SIZES, 3, 21, loss=loss, sample_weights=True, seed=16)
    wide = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    ref = per_sample.per_sample_gradients(wide, SIZES, hidden, loss, reduction)
    scale = 21 if reduction == "mean" else 1
    clip = median_own_norm(ref, scale)
    want = per_sample.clipped_sums(ref, clip, scale)
    job = private_job(tensors, kernels.Privacy(clip), hidden=hidden, loss=loss,
                      reduction=reduction)  # fmt: skip
    got = grads_of(triton_engine.run(job, DEVICE))
    for name in want:
        for k in range(3):
            err = (got[name][k].double().cpu() - want[name][k]).norm() / want[name][k].norm()
            assert err < 1e-5, (name, k, float(err))
    job.privacy = kernels.Privacy(clip, noise_multiplier=0.9, noise_seed=5)
    noisy_triton = grads_of(triton_engine.run(job, DEVICE))
    noisy_torch = grads_of(torch_engine.run(job, DEVICE))
    for name in want:
        torch.testing.assert_close(noisy_triton[name], noisy_torch[name], rtol=1e-4, atol=1e-6)


def test_clipping_changes_some_samples_and_a_huge_clip_norm_none():
    tensors = random_job(SIZES, 2, 9, sample_weights=True, seed=3, dtype=torch.float64)
    plain = ensemble_job(tensors, SIZES, precision="float64")
    unclipped = grads_of(torch_engine.run(plain))
    huge = grads_of(
        torch_engine.run(private_job(tensors, kernels.Privacy(1e12), precision="float64"))
    )
    ref = per_sample.per_sample_gradients(tensors, SIZES, "relu", "mse", "mean")
    clipped = grads_of(
        torch_engine.run(
            private_job(tensors, kernels.Privacy(median_own_norm(ref, 9)), precision="float64")
        )
    )
    for name in unclipped:
        torch.testing.assert_close(huge[name], unclipped[name], rtol=1e-9, atol=1e-12)
        assert not torch.allclose(clipped[name], unclipped[name])


@pytest.mark.parametrize("precision, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_clipped_sums_in_lower_precisions(precision, tol):
    tensors = random_job(SIZES, 4, 33, loss="huber", sample_weights=True, seed=8)
    wide = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    ref = per_sample.per_sample_gradients(wide, SIZES, "gelu", "huber", "mean")
    clip = median_own_norm(ref, 33)
    want = per_sample.clipped_sums(ref, clip, 33)
    job = private_job(
        tensors, kernels.Privacy(clip), hidden="gelu", loss="huber", precision=precision
    )
    got = grads_of(torch_engine.run(job))
    for name in want:
        for k in range(4):
            err = (got[name][k].double() - want[name][k]).norm() / want[name][k].norm()
            assert err < tol, (name, k, float(err))


def test_noise_is_reproducible_by_seed_and_drawn_as_documented():
    tensors = random_job(SIZES, 3, 11, seed=4)
    clean = grads_of(torch_engine.run(private_job(tensors, kernels.Privacy(0.5))))
    noisy = kernels.Privacy(0.5, noise_multiplier=1.3, noise_seed=1234)
    a = grads_of(torch_engine.run(private_job(tensors, noisy)))
    b = grads_of(torch_engine.run(private_job(tensors, noisy)))
    c = grads_of(
        torch_engine.run(
            private_job(tensors, kernels.Privacy(0.5, noise_multiplier=1.3, noise_seed=1235))
        )
    )
    gen = torch.Generator().manual_seed(1234)
    std = 1.3 * 0.5 / 11  # sigma * C, divided by N under the mean reduction
    for name in clean:  # documented order: layers.0.weight, layers.0.bias, layers.1.weight...
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])
        noise = torch.randn(clean[name].shape, generator=gen)
        torch.testing.assert_close(a[name], clean[name] + std * noise, rtol=1e-5, atol=1e-7)


def test_noise_statistics():
    sizes = (16, 64, 64, 8)
    tensors = random_job(sizes, 8, 5, seed=9)
    clean = grads_of(torch_engine.run(private_job(tensors, kernels.Privacy(2.0), sizes)))
    noisy = grads_of(
        torch_engine.run(
            private_job(tensors, kernels.Privacy(2.0, noise_multiplier=0.7, noise_seed=7), sizes)
        )
    )
    z = torch.cat([((noisy[k] - clean[k]) / (0.7 * 2.0 / 5)).flatten() for k in clean])
    assert z.numel() > 40_000
    # mean 0 and std 1 within ~5 standard errors
    assert abs(z.mean().item()) < 5 / z.numel() ** 0.5
    assert abs(z.std().item() - 1) < 5 / (2 * z.numel()) ** 0.5


def test_privacy_validates_its_parameters():
    for bad in (
        dict(clip_norm=0.0),
        dict(clip_norm=-1.0),
        dict(clip_norm=float("nan")),
        dict(clip_norm=float("inf")),
        dict(clip_norm=1.0, noise_multiplier=-0.1),
        dict(clip_norm=1.0, noise_multiplier=float("nan")),
    ):
        with pytest.raises(ValueError):
            kernels.Privacy(**bad)


opacus = pytest.importorskip("opacus")


def per_sample_norms(optimizer):
    return torch.stack(
        [g.reshape(g.shape[0], -1).norm(dim=1) for g in optimizer.grad_samples]
    ).norm(dim=0)


# Opacus' hooks on a first layer whose inputs need no gradient: torch says so, harmlessly
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_clipped_mean_equals_opacus_dp_optimizer(loss):
    """Opacus: per-sample gradients by its hooks, clipping and averaging by DPOptimizer
    (noise 0), loss reduction mean, one model at a time."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from torch import nn

    m, n = 3, 10
    tensors = random_job(SIZES, m, n, loss=loss, seed=12, dtype=torch.float64)
    ref = per_sample.per_sample_gradients(tensors, SIZES, "tanh", loss, "mean")
    clip = median_own_norm(ref, n)
    seen_norms = []
    got = grads_of(
        torch_engine.run(
            private_job(
                tensors, kernels.Privacy(clip), hidden="tanh", loss=loss, precision="float64"
            )
        )
    )
    for k in range(m):
        layers = []
        for i in range(len(SIZES) - 1):
            lin = nn.Linear(SIZES[i], SIZES[i + 1]).double()
            with torch.no_grad():
                lin.weight.copy_(tensors[f"layers.{i}.weight"][k])
                lin.bias.copy_(tensors[f"layers.{i}.bias"][k])
            layers += [lin, nn.Tanh()] if i < len(SIZES) - 2 else [lin]
        model = GradSampleModule(nn.Sequential(*layers), loss_reduction="mean")
        optimizer = DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=0.0,
            max_grad_norm=clip,
            expected_batch_size=n,
            loss_reduction="mean",
        )
        criterion = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
        optimizer.zero_grad()
        criterion(model(tensors["inputs"][k]), tensors["targets"][k]).backward()
        optimizer.pre_step()  # clip, sum, (no) noise, scale by 1/expected_batch_size
        clipped = [p.grad for p in model.parameters()]
        seen_norms.append(per_sample_norms(optimizer))
        for i in range(len(SIZES) - 1):
            torch.testing.assert_close(got[f"layers.{i}.weight"][k], clipped[2 * i])
            torch.testing.assert_close(got[f"layers.{i}.bias"][k], clipped[2 * i + 1])
    seen = torch.cat(seen_norms)
    assert (seen > clip).any() and (seen < clip).any()  # some clipped, some not
