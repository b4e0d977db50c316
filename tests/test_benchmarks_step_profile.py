"""benchmarks/step_profile.py: the per-step summary of a profiled decode window (pure functions), and the
profiling driver on a scripted engine with a stand-in profiler."""

from types import SimpleNamespace

import pytest

from benchmarks import step_profile
from benchmarks.step_profile import Kernel

OSCAR_DECODE = "void oscar::decode_kernel<128, 1, 4>(oscar::DecodeParams)"
ROTATE_Q = "void oscar::rotate_q_kernel<128, 8, 8, 4>(oscar::DecodeParams)"
STORE = "void oscar::store_kernel<128, 1>(oscar::StoreParams)"
FA3 = ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90"
       "<2, cute::tuple<cute::C<1>>, cute::tuple<cute::C<128>>>>>>(flash::Params)")
FA3_COMBINE = "void cutlass::device_kernel<flash::FlashAttnFwdCombine<cute::tuple<cute::C<8>>, 7, 256>>(flash::Params)"
KV_WRITE = "void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, __nv_bfloat16, 0>(...)"
GEMM = "nvjet_tst_128x64_64x8_2x1_v_bz_TNT"


@pytest.mark.parametrize("name, cat", [
    (OSCAR_DECODE, "oscar_decode"), (ROTATE_Q, "oscar_decode"), (STORE, "oscar_store"),
    ("void oscar::gather_kernel<128>(oscar::GatherParams)", "oscar_gather"),
    (FA3, "flash_attention"), (FA3_COMBINE, "flash_attention"), (KV_WRITE, "kv_cache_write"), (GEMM, "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other"),
])
def test_categories(name, cat):
    assert step_profile.category(name) == cat


def test_busy_time_is_the_union_of_the_intervals():
    ks = [Kernel("a", 0, 10), Kernel("b", 5, 12), Kernel("c", 20, 25), Kernel("d", 21, 22), Kernel("e", 25, 30)]
    assert step_profile.busy_us(ks) == pytest.approx(12 + 10)
    assert step_profile.busy_us([]) == 0


def test_count_steps_from_the_once_per_layer_kernel():
    layers = 3
    oscar = [Kernel(OSCAR_DECODE, i, i + 1) for i in range(2 * layers)] + [Kernel(ROTATE_Q, 0, 1)] * 6
    assert step_profile.count_steps(oscar, layers) == (2, step_profile.STEP_KERNELS["oscar"])
    fa = [Kernel(FA3, i, i + 1) for i in range(4 * layers)] + [Kernel(FA3_COMBINE, 0, 1)] * 5
    assert step_profile.count_steps(fa, layers)[0] == 4  # the combine kernel is not counted
    with pytest.raises(ValueError, match="not a multiple of 3 layers"):
        step_profile.count_steps(oscar[:-7], layers)
    with pytest.raises(ValueError, match="cannot count decode steps"):
        step_profile.count_steps([Kernel(GEMM, 0, 1)], layers)


def test_summarize_two_steps_of_two_layers():
    ks, t = [], 0.0
    for _step in range(2):
        for _layer in range(2):
            for name, us in ((GEMM, 10.0), (ROTATE_Q, 2.0), (OSCAR_DECODE, 20.0), (STORE, 4.0)):
                # rotate_q -> decode -> store overlap by 1 us each (programmatic dependent launch)
                start = t - (1.0 if name in (OSCAR_DECODE, STORE) else 0.0)
                ks.append(Kernel(name, start, start + us))
                t = start + us
        t += 100.0  # the gap to the next step
    run = {"kernels": ks, "engine_steps": 2, "tokens": 2, "requests": 1, "wall_s": 0.001}
    res = step_profile.summarize(run, num_layers=2, top=3)
    assert res["steps"] == 2 and res["requests"] == 1 and res["step_kernel"] == step_profile.STEP_KERNELS["oscar"]
    assert res["kernel_ms"] == pytest.approx(2 * 36 / 1000)
    assert res["gpu_busy_ms"] == pytest.approx(2 * 34 / 1000)  # 2 us of overlap per layer count once
    assert res["by_category_ms"] == {"oscar_decode": pytest.approx(0.044), "gemm": pytest.approx(0.02),
                                     "oscar_store": pytest.approx(0.008)}
    assert res["attention_ms"] == pytest.approx(0.052)  # summed: the overlaps count twice
    assert res["attention_busy_ms"] == pytest.approx(0.048) and res["attention_busy_us_per_layer"] == pytest.approx(24)
    assert res["gpu_gaps_ms"] == pytest.approx(0.05)  # the 100 us between the two steps, per step
    assert res["wall_ms_per_engine_step"] == pytest.approx(0.5)
    assert [k["category"] for k in res["kernels"]] == ["oscar_decode", "gemm", "oscar_store"]
    assert res["kernels"][0]["per_step"] == 2 and res["kernels"][0]["us_each_median"] == pytest.approx(20.0)


def test_markdown_table_rows():
    p = {"gpu_span_ms_per_step": 7.329, "gpu_gaps_ms": 0.328, "wall_ms_per_engine_step": 7.443,
         "by_category_ms": {"gemm": 5.7476, "oscar_decode": 0.9416, "oscar_store": 0.4513, "other": 0.3646},
         "attention_busy_ms": 0.889, "attention_busy_us_per_layer": 24.69}
    table = step_profile.markdown_table({"oscar_int2": {"65536": {"error": "RuntimeError('x')"}, "32768x78": p,
                                                        "32768": p}})
    lines = table.splitlines()
    assert lines[-3] == "| `oscar_int2` | 32K | 7.329 | 5.748 | 0.889 (24.7) | 0.365 | 0.328 | 7.443 |"
    assert lines[-2].startswith("| `oscar_int2` | 32K × 78 requests | 7.329 |")
    assert lines[-1].startswith("| `oscar_int2` | 64K | RuntimeError('x') |")


def test_run_refuses_a_full_kv_profile_without_a_full_kv_configuration():
    from benchmarks import run

    with pytest.raises(SystemExit, match="--profile-full-kv profiles the full-KV configuration of --sat-context"):
        run.main(["--suite", "perf", "--formats", "oscar_int2", "--profile-full-kv", "--sat-context", "0"])


class _StaggeredEngine:
    """Stands in for ``LLMEngine``: request i gets its first token at step ``start[i]`` (a long prefill), then
    one per step; ``abort_request`` drops requests."""

    def __init__(self, start):
        self.start, self.left, self.n, self.aborted = start, {}, 0, []

    def has_unfinished_requests(self):
        return any(v > 0 for v in self.left.values())

    def add_request(self, rid, prompt, params):
        assert prompt["type"] == "token" and params.output_kind.name == "DELTA"
        self.left[rid] = params.max_tokens

    def abort_request(self, rids):
        self.aborted += rids
        for r in rids:
            self.left[r] = 0

    def step(self):
        self.n += 1
        outs = []
        for i, (rid, left) in enumerate(self.left.items()):
            if left > 0 and self.n >= self.start[i]:
                self.left[rid] = left - 1
                outs.append(SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=[7])]))
        return outs


@pytest.fixture
def fake_profiler(monkeypatch):
    """torch.profiler.profile and torch.cuda.synchronize for a CPU run: the window 'records' one decode kernel."""
    import torch
    from torch.autograd import DeviceType

    class FakeProfile:
        def __init__(self, activities):
            self.activities = activities

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            kernel = SimpleNamespace(device_type=DeviceType.CUDA, name=OSCAR_DECODE,
                                     time_range=SimpleNamespace(start=0.0, end=5.0))
            return [kernel, SimpleNamespace(device_type=DeviceType.CPU, name="cudaGraphLaunch", time_range=None)]

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def test_profile_window_opens_once_every_request_decodes(fake_profiler):
    engine = _StaggeredEngine(start=[1, 5])  # the second request's prefill ends at step 5
    run = step_profile.profile_decode(SimpleNamespace(llm_engine=engine), [[1, 2], [3]], steps=4, warm_tokens=2,
                                      prefix="p", max_tokens=100)
    assert engine.n == 6 + 4  # warm until step 6 (request 1's second token), then the 4-step window
    assert run["tokens"] == 2 * 4 and run["requests"] == 2 and run["engine_steps"] == 4
    assert [k.name for k in run["kernels"]] == [OSCAR_DECODE]  # CUDA events only
    assert engine.aborted == ["p-0", "p-1"] and not engine.has_unfinished_requests()


def test_profile_refuses_a_window_the_requests_do_not_reach(fake_profiler):
    engine = _StaggeredEngine(start=[1, 50])  # request 0 finishes long before request 1 decodes
    with pytest.raises(RuntimeError, match="raise max_tokens"):
        step_profile.profile_decode(SimpleNamespace(llm_engine=engine), [[1], [2]], steps=4, warm_tokens=2,
                                    max_tokens=10)
    busy = _StaggeredEngine(start=[1])
    busy.left["other"] = 3
    with pytest.raises(RuntimeError, match="idle engine"):
        step_profile.profile_decode(SimpleNamespace(llm_engine=busy), [[1]])
