"""benchmarks/step_profile.py: the per-step summary of a profiled decode window (pure functions)."""

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
