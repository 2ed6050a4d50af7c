"""Bad input: the exception types and messages of torch.optim; backends fail loudly."""
import os
import subprocess
import sys

import pytest
import torch

import fused_adam
from fused_adam import FusedAdam, FusedAdamW, backends

P = [torch.nn.Parameter(torch.randn(3))]
BAD = [
    dict(lr=-1e-3),
    dict(eps=-1.0),
    dict(betas=(1.0, 0.999)),
    dict(betas=(0.9, -0.1)),
    dict(weight_decay=-0.1),
    dict(lr=torch.tensor([1e-3, 1e-3])),
    dict(lr=torch.tensor(1e-3), foreach=True),
    dict(betas=(0.9, torch.tensor(0.99))),
    dict(fused=True, foreach=True),
]


def _raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("ours_cls,ref_cls", [(FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW)])
@pytest.mark.parametrize("kwargs", BAD, ids=lambda k: ",".join(k))
def test_invalid_arguments_raise_like_torch(ours_cls, ref_cls, kwargs):
    assert _raised(lambda: ours_cls(P, **kwargs)) == _raised(lambda: ref_cls(P, **kwargs))


@pytest.mark.parametrize("params", [
    pytest.param(lambda: [{"params": P}, {"params": P}], id="param-in-two-groups"),
    pytest.param(lambda: torch.randn(3), id="a-tensor"),
    pytest.param(lambda: 3, id="not-iterable"),
    pytest.param(lambda: [], id="empty"),
])
def test_invalid_params_raise_like_torch(params):
    assert _raised(lambda: FusedAdamW(params())) == _raised(lambda: torch.optim.AdamW(params()))


def test_tensor_lr_is_accepted():
    params = [torch.nn.Parameter(torch.randn(5))]
    ref_params = [torch.nn.Parameter(params[0].detach().clone())]
    opt = FusedAdamW(params, lr=torch.tensor(0.01))
    ref = torch.optim.AdamW(ref_params, lr=torch.tensor(0.01), foreach=False)
    for o, p in ((opt, params), (ref, ref_params)):
        p[0].grad = torch.ones(5)
        o.step()
    torch.testing.assert_close(params[0], ref_params[0], rtol=1e-6, atol=0)


def test_unsupported_modes_raise():
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        FusedAdam(P, differentiable=True)


def test_unknown_backend():
    with pytest.raises(ValueError, match="Invalid backend: 'cuda-magic'"):
        FusedAdam(P, backend="cuda-magic")


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable for torch.float32 on cpu: .*TRITON_INTERPRET"):
        FusedAdam([torch.nn.Parameter(torch.randn(3))], backend="triton")


def test_backend_env_override(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = FusedAdam(params)
    params[0].grad = torch.ones(3)
    monkeypatch.setenv("FUSED_ADAM_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable"):
        opt.step()
    assert torch.equal(params[0], before) and not opt.state  # nothing changed
    monkeypatch.setenv("FUSED_ADAM_BACKEND", "torch")
    opt.step()
    assert not torch.equal(params[0], before)


def test_available_backends_on_cpu():
    assert "torch" in fused_adam.available_backends("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_no_backend_claims_cuda_without_a_gpu():
    assert fused_adam.available_backends("cuda") == []
    assert backends.unavailable_reason("cuda", torch.device("cuda")) == "CUDA is not available"


def test_import_without_triton():
    """A broken triton install leaves the torch backend working and says why triton is out."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fused_adam\n"
            "from fused_adam import backends\n"
            "assert 'triton' not in fused_adam.available_backends('cpu')\n"
            "print(backends.unavailable_reason('triton', torch.device('cpu')))\n"
            "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
            "fused_adam.FusedAdam([p]).step()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "import failed" in out.stdout


def test_no_ext_env_uses_the_torch_backend():
    code = ("import torch, fused_adam\n"
            "from fused_adam import backends\n"
            "from fused_adam.backends import torch_ref\n"
            "assert fused_adam.available_backends('cpu') == ['torch'], fused_adam.available_backends('cpu')\n"
            "assert backends.resolve('auto', torch.device('cpu'), torch.float32) is torch_ref.adam_step_\n"
            "print(backends.unavailable_reason('cpu', torch.device('cpu')))\n"
            "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
            "fused_adam.FusedAdam([p]).step()\n")
    env = dict(os.environ, FUSED_ADAM_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "disabled by FUSED_ADAM_NO_EXT=1" in out.stdout


@pytest.mark.parametrize("ours,theirs", [(FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW)])
def test_signatures_are_torchs_plus_our_options(ours, theirs):
    """Every argument of torch's with torch's default and kind, then ours (their defaults are
    FusedAdam's signature, the one place they are listed); AdamW refuses
    decoupled_weight_decay as torch's does."""
    import inspect
    mine, torchs = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    for name, p in torchs.items():
        assert name in mine and mine[name].kind == p.kind, name
        assert mine[name].default == p.default, name
    if ours is FusedAdamW:
        with pytest.raises(TypeError, match="unexpected keyword argument 'decoupled_weight_decay'"):
            FusedAdamW([torch.nn.Parameter(torch.ones(2))], decoupled_weight_decay=False)
        assert FusedAdamW([torch.nn.Parameter(torch.ones(2))]).defaults["weight_decay"] == 1e-2


def test_segments_out_of_range_raise_even_where_start_plus_length_overflows():
    if "cpu" not in fused_adam.available_backends("cpu"):
        pytest.skip("the CPU extension is not built")
    from fused_adam.functional import hyper_row
    hyper = torch.tensor([hyper_row(step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)],
                         dtype=torch.float64)
    ts = [torch.zeros(8) for _ in range(4)]
    for segment in ([0, 1, 2**63 - 1, 0, 0], [0, 2**62, 2**62, 0, 0], [0, 0, 9, 0, 0],
                    [1, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, -1, 1, 0, 0]):
        with pytest.raises(RuntimeError, match="segment 0 is out of range"):
            torch.ops.fused_adam.adam_step_(*([t] for t in ts), [], [], [], [], hyper, segment)


def test_the_torch_backend_steps_strided_tensors():
    """The functional API on a transposed (non-contiguous) tensor: the torch backend (and auto
    for float64) steps it in its shape, as torch.optim would."""
    from fused_adam import adam_step_
    for dtype, backend in ((torch.float64, "auto"), (torch.float32, "torch")):
        p = torch.randn(6, 4, dtype=dtype).t()
        ref = torch.nn.Parameter(p.detach().clone())
        g = torch.randn(4, 6, dtype=dtype)
        m, v = torch.zeros(6, 4, dtype=dtype).t(), torch.zeros(6, 4, dtype=dtype).t()
        adam_step_(p, g, m, v, step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, backend=backend)
        ref.grad = g
        torch.optim.Adam([ref], lr=0.1, foreach=False).step()
        assert torch.equal(p, ref.detach())
