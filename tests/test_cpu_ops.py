"""The fused CPU ops of a decoder layer (engine/cpu_ops.cpp through layers/native.py):
RMSNorm with the residual add before it, and SiLU-and-mul, against the torch ops
HF's modules run, in float32 and bfloat16; float64 and autograd keep torch's ops."""
import pytest
import torch
import torch.nn.functional as F

from memgen.layers import native
from memgen.layers.backend import LayerOps
from memgen.layers.linear import SiluAndMul
from memgen.layers.norm import RMSNorm

pytestmark = pytest.mark.skipif(native.rms_norm_cpu is None, reason="a build without the native CPU ops")


def hf_rms_norm(x, weight, eps):
    """HF's Qwen2RMSNorm.forward, op by op."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _norm(hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(hidden, eps=1e-5)
    norm.weight.data = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    return norm, g


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows,hidden", [(1, 512), (7, 37), (0, 64), (33, 1000)])
def test_native_rms_norm_with_and_without_the_residual(dtype, tol, rows, hidden):
    norm, g = _norm(hidden, dtype)
    x = (3 * torch.randn(rows, hidden, generator=g)).to(dtype)
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), hf_rms_norm(x, norm.weight, 1e-5), rtol=tol, atol=tol)
        want_residual = residual + x
        want = hf_rms_norm(want_residual, norm.weight, 1e-5)
        kept = residual
        out, new_residual = norm(x, residual)
    assert new_residual is kept, "the native path adds into the residual in place"
    assert torch.equal(new_residual, want_residual)     # one rounding per element, as torch's add
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


def test_rms_norm_keeps_hf_ops_in_float64_and_under_autograd():
    norm, g = _norm(64, torch.float64)
    x, residual = torch.randn(5, 64, generator=g, dtype=torch.float64), torch.randn(5, 64, dtype=torch.float64)
    with torch.inference_mode():
        out, new_residual = norm(x, residual)
    assert new_residual is not residual and torch.equal(new_residual, residual + x)
    assert torch.equal(out, hf_rms_norm(residual + x, norm.weight, 1e-5))   # bit for bit
    norm32, _ = _norm(64, torch.float32)
    x32 = torch.randn(5, 64, generator=g, requires_grad=True)
    out = norm32(x32)                                   # grad mode: torch's ops, differentiable
    out.sum().backward()
    assert x32.grad is not None and torch.isfinite(x32.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(1, 1024), (9, 13), (0, 8)])
def test_native_silu_and_mul(dtype, rows, width):
    g = torch.Generator().manual_seed(1)
    x = (4 * torch.randn(rows, 2 * width, generator=g)).to(dtype)
    if rows:
        x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0]).to(dtype)   # saturated and zero gates
    with torch.inference_mode():
        got = SiluAndMul()(x)
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    assert got.shape == want.shape and got.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_native_ops_refuse_other_dtypes():
    x = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native.silu_and_mul_cpu(x.data_ptr(), x.data_ptr(), 2, 2, native.DTYPE_CODES[torch.float64])
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native.rms_norm_cpu(x.data_ptr(), 0, x.data_ptr(), x.data_ptr(), 2, 4, 1e-6, native.DTYPE_CODES[torch.float64])


# ---- the packed CPU linear (engine/cpu_gemm.cpp) ----------------------------------------
def _linear(in_features, out_features, bias, seed=0):
    from memgen.layers.linear import Linear

    g = torch.Generator().manual_seed(seed)
    layer = Linear(in_features, out_features, bias=bias)
    layer.weight.data.copy_(torch.randn(out_features, in_features, generator=g))
    if bias:
        layer.bias.data.copy_(torch.randn(out_features, generator=g))
    return layer, g


# rows: one tile, balanced tiles (8 = 4 + 4 on AVX2, 17 = 9 + 8 on AVX-512), a lone row
# and alone, a chunk longer than one block of rows (256); out_features: panel groups of 4 with 3, 2 or 1 panels left, a padded last panel
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 7, 8, 9, 10, 12, 14, 16, 17, 20, 21, 33, 64, 300])
@pytest.mark.parametrize("in_features,out_features,bias", [(64, 48, True), (37, 21, False), (512, 1000, True),
                                                           (40, 80, True)])
def test_packed_linear_equals_f_linear(rows, in_features, out_features, bias):
    layer, g = _linear(in_features, out_features, bias)
    w, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    assert layer.pack_for_cpu() and layer.packed
    x = torch.randn(rows, in_features, generator=g)
    x_t = torch.randn(in_features, rows, generator=g)
    with torch.inference_mode():
        got = layer(x)
        got_strided = layer(x_t.t())   # a non-contiguous input
    assert got.shape == (rows, out_features) and got_strided.shape == (rows, out_features)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_strided, F.linear(x_t.t(), w, b), rtol=1e-5, atol=1e-4)


# (96, 80): 5 panels, a group of 4 and one left; (300, 40): K in three chunks of steps (the
# AVX2 7-8-row path sums 128 k's at a time, resuming from y), a padded last panel
@pytest.mark.parametrize("in_features,out_features", [(96, 80), (300, 40)])
def test_packed_linear_row_does_not_depend_on_the_rows_beside_it(in_features, out_features):
    """Every sum runs in the order of k in every tile shape: a row's output is bit-identical
    whether it is decoded alone, in a full tile or in a tail beside other rows."""
    layer, g = _linear(in_features, out_features, True)
    layer.pack_for_cpu()
    x = torch.randn(270, in_features, generator=g)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i:i + 1]) for i in range(270)])
        for rows in (2, 3, 5, 7, 8, 9, 11, 13, 16, 17, 19, 21, 270):
            assert torch.equal(layer(x[:rows]), alone[:rows]), rows


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_linear_splits_panels_across_threads(threads):
    layer, g = _linear(1024, 1040, True)            # 65 panels: uneven split, a padded last panel
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.pack_for_cpu()
    x = torch.randn(48, 1024, generator=g)          # enough work for a second thread
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = layer(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-3)


def test_packing_applies_to_cpu_float32_and_bfloat16_only():
    from memgen.layers.linear import Linear, pack_linears_for_cpu

    model = torch.nn.Sequential(Linear(8, 4), Linear(8, 4).double(), Linear(8, 4).to(torch.bfloat16),
                                Linear(8, 4).half())
    assert pack_linears_for_cpu(model) == 2 and [m.packed for m in model] == [True, False, True, False]
    assert pack_linears_for_cpu(model) == 2                       # idempotent
    with pytest.raises(RuntimeError, match="outside autograd"):
        model[0](torch.zeros(2, 8))                               # grad mode: the kernel has no backward
    with torch.inference_mode(), pytest.raises(RuntimeError, match="takes bfloat16"):
        model[2](torch.zeros(2, 8))                               # a float32 input to bfloat16 weights


def test_weights_load_straight_into_the_panels():
    """Packed before loading (as load_model does): each HF part lands in its panel
    columns, mid-panel starts and the padded last panel included."""
    from memgen.layers.linear import Linear

    g = torch.Generator().manual_seed(3)
    parts = {"q": 24, "k": 8, "v": 13}                  # 45 columns: parts start mid-panel, a padded last panel
    layer = Linear(20, parts, bias=True)
    layer.pack_for_cpu(keep_values=False)
    hf = {name: torch.randn(n, 20, generator=g, dtype=torch.float64) for name, n in parts.items()}   # cast on load
    bias = {name: torch.randn(n, generator=g) for name, n in parts.items()}
    for name in parts:
        layer.load_part(name, hf[name])
        layer.load_part(name, bias[name], is_bias=True)
    with pytest.raises(ValueError, match="expected \\(8, 20\\)"):
        layer.load_part("k", torch.zeros(8, 21))
    x = torch.randn(5, 20, generator=g)
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x, torch.cat(list(hf.values())).float(), torch.cat(list(bias.values())))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_packed_linear_lower_instruction_sets(isa):
    """The AVX2 and baseline bodies (what a Zen 3 or an older x86-64 runs), forced on
    this machine through MEMGEN_CPU_ISA, equal F.linear too."""
    import subprocess
    import sys

    code = ("import torch, torch.nn.functional as F\n"
            "from memgen.layers import native\n"
            "from memgen.layers.linear import Linear\n"
            "torch.manual_seed(0)\n"
            "layer = Linear(70, 45, bias=True)\n"
            "w = torch.randn(45, 70); b = torch.randn(45)\n"
            "layer.weight.data.copy_(w); layer.bias.data.copy_(b); layer.pack_for_cpu()\n"
            "for rows in (1, 3, 5, 6, 8, 13, 17, 22):\n"
            "    x = torch.randn(rows, 70)\n"
            "    with torch.inference_mode():\n"
            "        got = layer(x)\n"
            "        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)\n"
            "        assert torch.equal(got, torch.cat([layer(x[i:i + 1]) for i in range(rows)]))\n"
            "print(native.native_op('linear_isa')())\n")
    env = {**__import__("os").environ, "MEMGEN_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    ran = out.stdout.split()[-1]
    assert ran == isa or (isa == "avx2" and ran == "baseline")   # a CPU without AVX2 falls back


# The split across threads (engine/cpu_gemm.cpp): every output column is one tile's sum in
# the order of k whichever thread runs it, so 2, 3 and 4 threads give the 1-thread result
# bit for bit. Run in a subprocess per instruction-set body (MEMGEN_CPU_ISA caps it), with
# the "stream" split rule, which splits the few-row calls too.
_THREADS_CODE = """
import torch
from memgen.layers import native
from memgen.layers.backend import LayerOps
assert native.linear_split() == "stream"
torch.manual_seed(0)
mismatches, split = [], 0
for K, N in ((64, 3000), (37, 2001), (96, 4096 + 5), (576, 960), (130, 1553)):
    w_t = torch.randn(K, N)
    packed = torch.empty(native.packed_size(K, N))
    native.pack_weight(w_t.data_ptr(), K, N, packed.data_ptr())
    bias = torch.randn(N)
    for M in list(range(1, 21)) + [33]:
        x = torch.randn(M, K)
        outs = {}
        for threads in (1, 2, 3, 4):
            y = torch.empty(M, N)
            b = bias if M % 2 else None
            native.packed_linear(x.data_ptr(), M, K, packed.data_ptr(), N, 0 if b is None else b.data_ptr(),
                                 y.data_ptr(), threads)
            outs[threads] = y
            split += native.linear_threads(M, K, N, threads) > 1
        for threads in (2, 3, 4):
            if not torch.equal(outs[threads], outs[1]):
                mismatches.append((K, N, M, threads))
        ref = x @ w_t + (bias if M % 2 else 0)
        torch.testing.assert_close(outs[1], ref, rtol=1e-4, atol=1e-3)
assert not mismatches, mismatches
assert split > 0, "no call was split: the test would test nothing"
print(native.native_op("linear_isa")())
"""


@pytest.mark.parametrize("isa", ["native", "avx2", "baseline"])
def test_packed_linear_threads_are_bit_identical_to_one_thread(isa):
    """Rows 1..20 and 33 (one tile, balanced tiles of every height), odd output widths
    (a padded last panel, chunks that end mid-group), 1 vs 2/3/4 threads, on every body."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MEMGEN_CPU_ISA"}
    env["MEMGEN_LINEAR_SPLIT"] = "stream"
    if isa != "native":
        env["MEMGEN_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", _THREADS_CODE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if isa != "native":
        ran = out.stdout.split()[-1]
        assert ran == isa or (isa == "avx2" and ran == "baseline")


@pytest.fixture
def split_rule():
    """Set the split rule for one test; the process's rule comes back after it."""
    before = native.linear_split()
    yield native.set_linear_split
    native.set_linear_split(before)


def test_linear_threads_respects_the_budget_and_leaves_tiny_calls_alone(split_rule):
    lt = native.linear_threads
    for rule in ("sums", "stream"):
        split_rule(rule)
        assert lt(1, 64, 48, 4) == 1                  # a tiny linear wakes nobody
        assert lt(8, 37, 21, 16) == 1
        assert lt(1, 576, 49152, 1) == 1              # the budget: 1 thread means 1
        assert lt(0, 576, 3072, 2) == 1
        assert lt(1, 16, 32, 64) == 1                 # never more threads than chunks of panels
        assert all(lt(m, 576, 960, 64) <= 15 for m in (1, 8, 16, 300))   # 60 panels: 15 chunks of 4
        assert lt(256, 576, 3072, 2) == 2             # a prefill chunk splits under either rule
        assert lt(256, 576, 3072, 3) == 3
    split_rule("sums")                                # decode rows bound by the stream stay on 1
    assert lt(1, 576, 3072, 2) == 1 and lt(8, 576, 960, 2) == 1
    assert lt(16, 576, 576, 4) == 1                   # a 16-row step's o_proj: 5M multiply-adds
    assert lt(8, 576, 3072, 2) == 2                   # 14M multiply-adds
    split_rule("stream")                              # (the default) a decode row's projections and LM head split
    assert lt(1, 576, 49152, 2) == 2 and lt(1, 576, 49152, 3) == 3
    assert lt(1, 576, 3072, 2) == 2 and lt(1, 576, 960, 4) == 4
    split_rule("off")
    assert lt(256, 576, 3072, 4) == 1
    with pytest.raises(ValueError, match="'sums', 'stream' or 'off'"):
        split_rule("fast")


def test_linear_uses_torch_thread_count(split_rule):
    """Linear passes torch.get_num_threads() as the budget (the split is exact either way)."""
    split_rule("stream")
    layer, g = _linear(576, 3000, True)
    layer.pack_for_cpu()
    x = torch.randn(3, 576, generator=g)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append(layer(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_threaded_linear_after_fork_and_from_two_threads(split_rule):
    """The pool is per process (a forked child makes its own) and serves one caller at a
    time (another caller runs alone): both give the 1-thread result."""
    import os
    import threading

    split_rule("stream")
    k, n = 576, 3072
    w_t = torch.randn(k, n)
    packed = torch.empty(native.packed_size(k, n))
    native.pack_weight(w_t.data_ptr(), k, n, packed.data_ptr())
    x = torch.randn(4, k)
    assert native.linear_threads(4, k, n, 2) == 2

    def call(threads):
        y = torch.empty(4, n)
        native.packed_linear(x.data_ptr(), 4, k, packed.data_ptr(), n, 0, y.data_ptr(), threads)
        return y

    ref = call(1)
    assert torch.equal(call(2), ref)                 # the parent's pool exists now
    pid = os.fork()
    if pid == 0:
        os._exit(0 if all(torch.equal(call(2), ref) for _ in range(20)) else 3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    bad = []

    def worker():
        for _ in range(50):
            if not torch.equal(call(3), ref):
                bad.append(1)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


# ---- bfloat16 weights (packed panels of k pairs) -------------------------------------------
# Every instruction-set body, forced through MEMGEN_CPU_ISA in a subprocess: avx512 (no
# avx512_bf16: converts while it reads), avx2, baseline, and this machine's best (the
# avx512_bf16 body where the CPU has it). Each output within float32 accumulation of the
# float64 sum, rounded to bfloat16 once; a row's output the same alone, beside other rows
# and on 1-3 threads.
_BF16_CODE = """
import torch
from memgen.layers import native as nv
torch.manual_seed(0)
bad = []
for K, N in ((64, 48), (37, 21), (576, 960), (70, 45), (1536, 40), (13, 3)):
    w = torch.randn(N, K).to(torch.bfloat16)
    b = torch.randn(N).to(torch.bfloat16)
    packed = torch.zeros(nv.packed_size_bf16(K, N), dtype=torch.bfloat16)
    nv.pack_rows_bf16(w.data_ptr(), N, K, N, 0, packed.data_ptr())
    for M in (1, 2, 3, 5, 6, 7, 16, 17, 33, 300):
        x = torch.randn(M, K).to(torch.bfloat16)
        for bias in (None, b):
            bp = 0 if bias is None else bias.data_ptr()
            outs = []
            for t in (1, 2, 3):
                y = torch.empty(M, N, dtype=torch.bfloat16)
                nv.packed_linear_bf16(x.data_ptr(), M, K, packed.data_ptr(), N, bp, y.data_ptr(), t)
                outs.append(y)
            alone = torch.empty(M, N, dtype=torch.bfloat16)
            for i in range(M):
                nv.packed_linear_bf16(x[i].data_ptr(), 1, K, packed.data_ptr(), N, bp, alone[i].data_ptr(), 1)
            ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
            # float32 sums of K products, then one bfloat16 rounding (2^-8 of the value)
            tol = (x.double().abs() @ w.double().abs().t()) * K * 2 ** -24 + ref.abs() * 2 ** -8
            if not ((outs[0].double() - ref).abs() <= tol).all():
                bad.append(("panels", K, N, M))
            if not all(torch.equal(o, outs[0]) for o in outs) or not torch.equal(alone, outs[0]):
                bad.append(("panels rows/threads", K, N, M))
assert not bad, bad
print(nv.linear_isa(), nv.linear_isa_bf16())
"""


@pytest.mark.parametrize("isa", ["native", "avx512", "avx2", "baseline"])
def test_bf16_panels_on_every_body(isa):
    import os
    import subprocess
    import sys

    if native.packed_linear_bf16 is None:
        pytest.skip("a build without the bfloat16 linear")
    env = {k: v for k, v in os.environ.items() if k != "MEMGEN_CPU_ISA"}
    env["MEMGEN_LINEAR_SPLIT"] = "stream"
    if isa != "native":
        env["MEMGEN_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", _BF16_CODE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ran_f32, ran_bf16 = out.stdout.split()[-2:]
    if isa == "avx512":           # a CPU without AVX-512 runs AVX2 (or the baseline)
        assert ran_bf16 in ("avx512", "avx2", "baseline") and ran_bf16 == ran_f32
    elif isa != "native":
        assert ran_bf16 == ran_f32 and (ran_bf16 == isa or (isa == "avx2" and ran_bf16 == "baseline"))


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_bf16_linear_layer_loads_and_matches_f_linear(rows):
    """A bfloat16 Linear packs (before or after loading) and equals F.linear's bfloat16
    result within one bfloat16 rounding; odd K and a padded last panel included."""
    from memgen.layers.linear import Linear

    g = torch.Generator().manual_seed(5)
    parts = {"q": 24, "k": 8, "v": 13}
    w = {name: torch.randn(n, 37, generator=g) for name, n in parts.items()}
    b = {name: torch.randn(n, generator=g) for name, n in parts.items()}
    before = Linear(37, parts, bias=True).to(torch.bfloat16)
    before.pack_for_cpu(keep_values=False)
    after = Linear(37, parts, bias=True).to(torch.bfloat16)
    for name in parts:
        before.load_part(name, w[name])
        before.load_part(name, b[name], is_bias=True)
        after.load_part(name, w[name])
        after.load_part(name, b[name], is_bias=True)
    plain_w = after.weight.detach().clone()
    assert after.pack_for_cpu() and before.packed
    assert before.weight.dtype == torch.bfloat16 and torch.equal(before.weight, after.weight)
    x = torch.randn(rows, 37, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        got = before(x)
    want = (x.double() @ plain_w.double().t() + after.bias.double())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_embedding_in_panels_looks_up_and_projects(dtype):
    """A tied head packed as a Linear (TiedEmbedding): its lookup gathers exactly the
    checkpoint's rows from the panels (padded last panel, odd K for bfloat16's pairs),
    latents land on their rows, and its logits are the packed linear's."""
    from memgen.layers.linear import TiedEmbedding

    if native.packed_linear is None or (dtype == torch.bfloat16 and native.packed_linear_bf16 is None):
        pytest.skip("a build without the native linear")
    g = torch.Generator().manual_seed(2)
    vocab, hidden = 1003, 71
    emb = torch.randn(vocab, hidden, generator=g).to(dtype)
    head = TiedEmbedding(vocab, hidden).to(dtype)
    assert head.pack_for_cpu(keep_values=False)
    head.load_part("", emb)
    ids = torch.tensor([0, 1002, 17, 16, 15, 1002, 999])
    with torch.inference_mode():
        assert torch.equal(head(ids), emb[ids]) and torch.equal(head(ids.view(1, 7)), emb[ids].view(1, 7, hidden))
        with pytest.raises(ValueError, match="row outside W"):
            head(torch.tensor([3, 1003]))
        latents = torch.randn(2, hidden, generator=g).to(dtype)
        got = head.inject(torch.tensor([5, -1, 7, -1]), torch.tensor([-1, 1, -1, 0]), latents)
        assert torch.equal(got, torch.stack([emb[5], latents[1], emb[7], latents[0]]))
        for rows in (1, 4, 9):
            h = torch.randn(rows, hidden, generator=g).to(dtype)
            want = h.double() @ emb.double().t()
            tol = (h.double().abs() @ emb.double().abs().t()) * hidden * 2 ** -24 \
                + want.abs() * (2 ** -8 if dtype == torch.bfloat16 else 0)
            assert ((head.project(h).double() - want).abs() <= tol).all()
    # a build without this dtype's kernel keeps the TiedEmbedding unpacked ([V, H] as stored)
    plain = TiedEmbedding(vocab, hidden).to(dtype)
    plain.load_part("", emb)
    with torch.inference_mode():
        assert not plain.packed and torch.equal(plain(ids), emb[ids])
        assert torch.equal(plain.inject(torch.tensor([5, -1]), torch.tensor([-1, 0]), latents),
                           torch.stack([emb[5], latents[0]]))
        h = torch.randn(3, hidden, generator=g).to(dtype)
        torch.testing.assert_close(plain.project(h), F.linear(h, emb))   # the layer ops' linear, not the panels
    h = torch.randn(9, hidden, generator=g).double()   # unpacked (float64): torch's ops as before
    want64 = (emb.double() @ h.t()).t()
    assert torch.equal(LayerOps.tied_logits(h, emb.double()), want64)


# ---- the decoder layers in one native call (cpu_ops.h decoder_layers_cpu) ---------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_layer_call_equals_the_ops_one_by_one(dtype, tiny_model_dir, monkeypatch):
    """The same kernels in the same order: tokens and logprobs bit for bit those of the
    layers' ops called one by one (qwen2 with QKV biases, llama; qwen3's q/k norm runs op
    by op either way), prefill chunks and decode steps, several sequences. A LoRA hook put
    on one linear after the first forward sends the model back op by op (the call's table
    of addresses is remade), and taking it off brings the one call back."""
    from memgen import LLM, SamplingParams
    from memgen.layers.backend import TorchBackend

    if native.decoder_layers_cpu is None:
        pytest.skip("a build without the whole-layer call")
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=5, ignore_eos=True)
    prompts = ["Hello world, this", "The quick brown fox jumps over", [5, 6, 7]]
    llm = LLM(str(tiny_model_dir), dtype=dtype)
    calls = []
    real = native.decoder_layers_cpu
    monkeypatch.setattr(native, "decoder_layers_cpu", lambda *a: calls.append(1) or real(*a))

    def run():
        calls.clear()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.token_ids, o.logprobs) for o in outs], len(calls)

    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(TorchBackend, "fused_layers", fused)
        runs[fused] = run()
    assert runs[True][0] == runs[False][0] and runs[False][1] == 0
    arch = llm.engine.model_runner.model.config.model_type
    assert (runs[True][1] > 0) == (arch != "qwen3")
    monkeypatch.setattr(TorchBackend, "fused_layers", True)
    down = llm.engine.model_runner.model.model.layers[-1].mlp.down_proj
    down.lora = lambda x, y, layer: y           # a hook that adds nothing
    assert run() == (runs[True][0], 0)
    down.lora = None
    assert run() == runs[True]


@pytest.mark.parametrize("width", [1, 7, 8, 17, 49152 + 3])
def test_native_argmax_equals_torch_ties_nan_and_inf_included(width):
    """The greedy sampler's native argmax gives torch.argmax's index: the first of equal
    maxima, the first NaN of a row that has one, rows of -inf, +inf, signed zeros."""
    if native.argmax_rows_f32 is None:
        pytest.skip("this build has no native argmax")
    from memgen.layers.sampler import _argmax

    g = torch.Generator().manual_seed(width)
    x = torch.randn(10, width, generator=g)
    x[1] = float("-inf")
    x[2] = 0.0
    x[3, width // 2] = float("nan")
    x[3, -1] = float("nan")
    x[4] = x[4].round()                 # many ties at the top
    x[5, -1] = float("inf")
    x[6, 0] = -0.0
    x[6, 1:] = -1.0
    x[7] = torch.where(x[7] > 0, torch.tensor(float("nan")), x[7])
    x[8, -1] = x[8].max() + 1           # the maximum in the scalar tail
    want = x.argmax(dim=-1)
    out = torch.empty(10, dtype=torch.int64)
    native.argmax_rows_f32(x.data_ptr(), 10, width, out.data_ptr())
    assert torch.equal(out, want)
    assert torch.equal(_argmax(x), want)
    assert torch.equal(_argmax(x.t().contiguous().t()), want)   # a strided view: made contiguous
    assert torch.equal(_argmax(x.double()), x.double().argmax(dim=-1))   # float64 keeps torch's


def test_whole_layer_call_refuses_a_table_row_of_another_width():
    # _LayerPlan's row and the binding's reader must agree on the fields: a row of any other
    # width is refused before anything is read (every pointer here is null)
    args = (0, 1, 0, 0, 0, 4, 0, 0, 0, 0, 1, 1, 1, 0, 0)
    for width in (22, 24):
        with pytest.raises(ValueError, match=f"has {width} fields"):
            native.decoder_layers_cpu(0, width, *args)


def test_whole_layer_call_with_memgen_adapters_installed(memgen_reasoner_dir, memgen_ckpt_dir, monkeypatch):
    """MemGen puts LoRA hooks on the shared layers: forwards with adapter rows (the weaver's,
    the trigger's) run op by op, forwards of reasoner rows alone take the one native call,
    and the outputs, insertions included, are bit for bit those of op by op everywhere."""
    from memgen import LLM, SamplingParams
    from memgen.layers.backend import TorchBackend

    if native.decoder_layers_cpu is None:
        pytest.skip("a build without the whole-layer call")
    llm = LLM(model=str(memgen_reasoner_dir), memgen=str(memgen_ckpt_dir), dtype="float32")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = ["We add the numbers, then we check the result.", "Question: what is 12 plus 30? Answer:"]
    calls = []
    real = native.decoder_layers_cpu
    monkeypatch.setattr(native, "decoder_layers_cpu", lambda *a: calls.append(1) or real(*a))
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(TorchBackend, "fused_layers", fused)
        calls.clear()
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[fused] = ([(o.token_ids, o.augmentation) for o in outs], len(calls))
    assert runs[True][0] == runs[False][0] and runs[False][1] == 0
    assert any(any(a) for _, a in runs[True][0]), "no insertion: the adapter rows were not exercised"
    assert runs[True][1] > 0
