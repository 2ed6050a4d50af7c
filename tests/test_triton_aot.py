"""The Triton kernel compiled ahead of time for sm_80 and sm_90 on this GPU-less machine: the PTX
must use 128-bit loads/stores, 64-bit offsets and the rounding ops the math contract names, and
ptxas must report no spills."""
import re
import shutil
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_adam.backends.triton_kernel import BLOCK, NUM_WARPS, _adam_kernel  # noqa: E402

POINTERS = ("p_base", "g_base", "m_base", "v_base", "vmax_base", "w_base", "ma_base", "va_base")
# Weight decay, maximize and the clip coefficient come from the row at run time: only the
# operands that exist and how the param is stored make variants.
MODES = {
    "plain": dict(AMSGRAD=False, MASTER=False, STOCHASTIC=False),
    "amsgrad": dict(AMSGRAD=True, MASTER=False, STOCHASTIC=False),
    # bf16 params and grads, fp32 states and master copy
    "bf16-master": dict(AMSGRAD=False, MASTER=True, STOCHASTIC=False),
    # the skip flag (skip_nonfinite, GradScaler)
    "skip": dict(AMSGRAD=False, MASTER=False, STOCHASTIC=False, SKIP=True),
    # bf16 params and grads, fp32 states, params stochastically rounded
    "bf16-stochastic": dict(AMSGRAD=False, MASTER=False, STOCHASTIC=True),
    # 8-bit states (uint8 codes, fp32 scales per block): fp32 params, bf16 + fp32 master
    "q8": dict(AMSGRAD=False, MASTER=False, STOCHASTIC=False, Q8=True),
    "q8-bf16-master": dict(AMSGRAD=False, MASTER=True, STOCHASTIC=False, Q8=True),
}
BF16 = {"p_base", "g_base"}


def _compile(arch, mode, pointer_types=None):
    names = _adam_kernel.arg_names
    constexprs = dict(dict(SKIP=False, Q8=False), **MODES[mode], ALIGNED=True, BLOCK=BLOCK)
    low = BF16 if MODES[mode]["MASTER"] or MODES[mode]["STOCHASTIC"] else set()
    signature = {n: "*bf16" if n in low else "*fp32" for n in POINTERS} | (pointer_types or {})
    if constexprs["Q8"]:
        signature |= {"m_base": "*u8", "v_base": "*u8"}
    # Ints as launched: i32 while their values fit (Triton types ints by value).
    signature |= {"table_ptr": "*i64", "n_segments": "i32", "hyper_ptr": "*fp64",
                  "found_ptr": "*fp32"}
    signature |= {n: "constexpr" for n in constexprs}
    # What the launcher's specialization sees for flat buffers: 16-aligned base pointers. The
    # segments' pointers come from the table: ALIGNED (the launcher checked them) hints them.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS}
    src = ASTSource(_adam_kernel, signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=NUM_WARPS, enable_fp_fusion=False))


def _ptxas_report(arch, ptx, tmp_path):
    ptxas = _ptxas(arch)
    if ptxas is None:
        pytest.skip("no ptxas")
    path = tmp_path / "k.ptx"
    path.write_text(ptx)
    arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    return subprocess.run([ptxas, "-v", f"-arch={arch_name}", str(path), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, check=True).stderr


def _ptxas(arch):
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        return shutil.which("ptxas")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", [80, 90])
def test_ptx_is_vectorized_and_exact(arch, mode, tmp_path):
    kernel = _compile(arch, mode)
    ptx = kernel.asm["ptx"]
    per_thread = BLOCK // (NUM_WARPS * 32) // 4  # 128-bit accesses per thread per fp32 tensor
    if MODES[mode].get("Q8"):
        # fp32 p and g (or the master w): 2 x 128 bits per thread each, bf16 p and g 1 each; the
        # codes of m and v, 8 a thread, 64 bits each way
        if MODES[mode]["MASTER"]:
            assert ptx.count("ld.global.v4.b32") == per_thread + 2 * (per_thread // 2)
            assert ptx.count("st.global.v4.b32") == per_thread + per_thread // 2
        else:
            assert ptx.count("ld.global.v4.b32") == 2 * per_thread
            assert ptx.count("st.global.v4.b32") == per_thread
        assert ptx.count("ld.global.v2.b32") == 2 and ptx.count("st.global.v2.b32") == 2
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx and ".local" not in ptx
        out = _ptxas_report(arch, ptx, tmp_path)
        assert "0 bytes spill stores, 0 bytes spill loads" in out, out
        return
    if MODES[mode]["STOCHASTIC"]:
        # fp32 m, v and bf16 p, g: 2 x 128 bits per thread for each fp32 tensor, 1 per bf16
        assert ptx.count("ld.global.v4.b32") == 2 * per_thread + 2 * (per_thread // 2)
        assert ptx.count("st.global.v4.b32") == 2 * per_thread + per_thread // 2
        # The hash runs for every element a thread stores, the tail's included: with i32
        # arguments an i32 tail index made `index >> 32` undefined and LLVM folded the hash away
        # (the tail then stored bits >> 16 | 0x40: 1.001 became 1.5). 0x7FEB352D, twice a hash.
        elements = BLOCK // (NUM_WARPS * 32)
        assert ptx.count(str(0x7FEB352D)) == 2 * (elements + 1)
    elif MODES[mode]["MASTER"]:
        # fp32 w, m, v: 2 x 128 bits per thread each; bf16 p and g: 1 each (p is read too: a
        # write by user code since the last step wins over the master)
        assert ptx.count("ld.global.v4.b32") == 3 * per_thread + 2 * (per_thread // 2)
        assert ptx.count("st.global.v4.b32") == 3 * per_thread + per_thread // 2
    else:
        assert ptx.count("ld.global.v4.b32") == (4 + MODES[mode]["AMSGRAD"]) * per_thread
        assert ptx.count("st.global.v4.b32") == (3 + MODES[mode]["AMSGRAD"]) * per_thread
    # The ragged tail (< 16 elements, last program only) is the one place for scalar accesses:
    # one load per tensor read, one store per tensor written.
    tensors_read = 4 + MODES[mode]["AMSGRAD"] + MODES[mode]["MASTER"]  # p, g, m, v [, vmax] [, w]
    tensors_written = tensors_read - 1  # p, m, v [, vmax] [, w]
    if MODES[mode].get("SKIP"):  # plus found_inf (the row's fields are float64 loads)
        tensors_read += 1
    assert len(re.findall(r"ld\.global\.(?:nc\.)?(?:b16|b32|f32)\b", ptx)) == tensors_read
    assert len(re.findall(r"st\.global\.(?:b16|b32|f32)\b", ptx)) == tensors_written
    # the program's block within its segment, times BLOCK, in 64 bits
    assert re.search(r"shl\.b64\s+%rd\d+, %rd\d+, " + str(BLOCK.bit_length() - 1) + ";", ptx), \
        "offsets not 64-bit"
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
    assert ".local" not in ptx
    out = _ptxas_report(arch, ptx, tmp_path)
    assert "0 bytes spill stores, 0 bytes spill loads" in out, out
    assert "0 bytes stack frame" in out, out


TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
COMBINATIONS = [  # (param, grad, exp_avg, exp_avg_sq, master copy)
    (p, g, m, v, master)
    for p in TYPES for g in dict.fromkeys((p, torch.float32)) for m in (torch.float32, torch.bfloat16)
    for v in (torch.float32, torch.bfloat16) for master in ((False, True) if p != torch.float32 else (False,))
]


@pytest.mark.parametrize("types", COMBINATIONS, ids=lambda c: "-".join(
    [str(t).split(".")[1] for t in c[:4]] + (["master"] if c[4] else [])))
def test_every_dtype_combination_compiles_without_spills(types, tmp_path):
    p, g, m, v, master = types
    pointers = {"p_base": TYPES[p], "g_base": TYPES[g], "m_base": TYPES[m], "v_base": TYPES[v],
                "vmax_base": TYPES[v], "w_base": "*fp32", "ma_base": "*fp32", "va_base": "*fp32"}
    mode = "bf16-master" if master else "amsgrad"
    out = _ptxas_report(90, _compile(90, mode, pointers).asm["ptx"], tmp_path)
    assert "0 bytes spill stores, 0 bytes spill loads" in out and "0 bytes stack frame" in out, out
