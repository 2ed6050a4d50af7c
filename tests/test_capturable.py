"""capturable=True: step counts, bias corrections and a tensor lr on the device, no host sync;
on a GPU a whole training step captures in a CUDA graph and replays."""
import pytest
import torch

from conftest import (CASES, SHAPES, assert_optimizers_match, clone_params, forbid_host_sync,
                      make_params, set_grads)
from fused_adam import FusedAdamW


@pytest.mark.parametrize("device,backend", CASES)
def test_tensor_lr_changed_in_place(device, backend):
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)
    lr = torch.tensor(1e-2, device=device)
    ours = FusedAdamW(params, lr=lr, capturable=True, amsgrad=True, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, amsgrad=True, foreach=False)
    for step in range(8):
        set_grads(params, ref_params, step, skip={3} if step == 2 else set())
        ours.step()
        ref.step()
        lr.mul_(0.8)  # as a scheduler writing into a captured graph's lr would
        ref.param_groups[0]["lr"] *= 0.8
    assert ours.state[params[0]]["step"].device.type == device
    assert_optimizers_match(ours, ref, backend)


def test_no_host_sync(monkeypatch):
    params = make_params(SHAPES, "cpu")
    opt = FusedAdamW(params, lr=torch.tensor(1e-3), capturable=True, max_grad_norm=1.0)
    set_grads(params, clone_params(params), 0)
    opt.step()

    forbid_host_sync(monkeypatch)
    opt.step()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_cuda_graph_capture_and_replay(backend):
    import fused_adam
    if backend not in fused_adam.available_backends("cuda"):
        pytest.skip(f"{backend} is not available")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    eager = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    eager.load_state_dict(model.state_dict())
    lr = torch.tensor(1e-2, device="cuda")
    opt = FusedAdamW(model.parameters(), lr=lr, capturable=True, backend=backend)
    ref = FusedAdamW(eager.parameters(), lr=lr.clone(), capturable=True, backend=backend)
    x, xs = torch.randn(32, 64, device="cuda"), [torch.randn(32, 64, device="cuda") for _ in range(5)]

    def train_step(m, o, inp):
        o.zero_grad(set_to_none=False)
        m(inp).square().mean().backward()
        o.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: state, grad views, kernel compilation
        for _ in range(3):
            train_step(model, opt, x)
            train_step(eager, ref, x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, x)
    for inp in xs:
        x.copy_(inp)
        graph.replay()
        train_step(eager, ref, inp)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(opt.state[model[0].weight]["step"]) == 3 + len(xs)  # capture itself runs nothing
