"""The benchmark: timing rules, latency rows, retrieval extrapolation, both JSON files, the paper-size models, the
training-step timer, and the one-line errors of ``bench.*``. Paper-size code runs on a small architecture here
(``TINY_ARCH``); the default is checked to be ViLT-B/32 without building it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vldistill import paths
from vldistill.bench import gpu, paper, retrieval
from vldistill.bench import run as bench_run
from vldistill.bench.latency import WAYS, cached_images, latency_calls, latency_row, task_flops, task_latency
from vldistill.bench.timing import count_flops, time_calls
from vldistill.config import BenchParams, ConfigError, PaperArchitecture, PaperBenchParams, load
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import ViltTeacher

from conftest import ROOT

TINY_ARCH = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "patch_size": 16,
             "image_size": [32, 48], "text_len": 8, "vocab_size": 120, "vqa_answers": 7, "fusion_hidden": 32}
FAST = {"warmup": 0, "min_repeats": 1, "max_repeats": 1}


def fast_bench(**paper_knobs) -> BenchParams:
    return BenchParams(batch_sizes=[1, 3], warmup=0, min_repeats=3, max_repeats=3, retrieval_max=100,
                       retrieval_pairs=8, retrieval_batch=64,
                       paper=PaperBenchParams(**FAST, architecture=PaperArchitecture(**TINY_ARCH), **paper_knobs))


def fake_timer(*seconds: float):
    """A timer that returns the given seconds for each timed callable in turn (the last value repeats), without
    calling it more than once."""
    queue = list(seconds)

    def timer(fn):
        fn()
        value = queue.pop(0) if len(queue) > 1 else queue[0]
        return [value, value, value]

    return timer


# ------------------------------------------------------------------------------------------------------ config
def test_default_paper_architecture_is_vilt_b32():
    arch = load(ROOT / "params.yaml").bench.paper.architecture
    assert arch == PaperArchitecture()
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.intermediate_size, arch.patch_size) == \
        (768, 12, 12, 3072, 32)
    assert (arch.image_size, arch.text_len, arch.vocab_size, arch.vqa_answers) == ([384, 640], 40, 30522, 3129)
    assert paper.describe(arch)["image_tokens"] == 241
    assert load(ROOT / "params.paper.yaml").bench.paper.architecture == PaperArchitecture()


@pytest.mark.parametrize("override, expected", [
    ("bench.paper.min_repeats=20", "bench.paper.min_repeats=20: must be <= max_repeats=10"),
    ("bench.min_repeats=60", "bench.min_repeats=60: must be <= max_repeats=50"),
    ("bench.paper.batch_sizes=[1, 1]", "bench.paper.batch_sizes=[1, 1]: must be a non-empty list of distinct"),
    ("bench.retrieval_max=50", "bench.retrieval_max=50: Input should be greater than or equal to 100"),
    ("bench.paper.max_seconds=0", "bench.paper.max_seconds=0: Input should be greater than 0"),
    ("bench.paper.architecture.image_size=[384, 600]",
     "bench.paper.architecture.image_size=[384, 600]: must be [H, W]"),
    ("bench.paper.architecture.num_heads=5", "bench.paper.architecture.hidden_size=768: must be a multiple"),
    ("bench.paper.gpu=true", "unknown key 'bench.paper.gpu' (allowed keys: enabled,"),
])
def test_bench_errors_are_one_line(override, expected):
    with pytest.raises(ConfigError) as info:
        load(ROOT / "params.yaml", [override])
    assert "\n" not in str(info.value) and expected in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------------------ timing
class FakeClock:
    """``clock()`` reads a time that only ``tick`` (the timed function) advances, by the next duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def clock(self):
        return self.now

    def tick(self):
        self.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1


def test_time_calls_warms_up_then_stops_when_the_median_is_stable():
    fake = FakeClock([9.0, 9.0, 1.0, 1.0, 1.0, 1.0])  # two slow warm-up calls, then stable
    knobs = BenchParams(warmup=2, min_repeats=3, max_repeats=50, rel_tol=0.05)
    assert time_calls(fake.tick, knobs, clock=fake.clock) == [1.0, 1.0, 1.0]
    assert fake.calls == 5
    fake = FakeClock([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])  # never stable: stops at max_repeats
    assert len(time_calls(fake.tick, BenchParams(warmup=0, min_repeats=3, max_repeats=6), clock=fake.clock)) == 6


def test_time_calls_caps_the_timed_seconds_and_can_skip_warmup():
    fake = FakeClock([1.0, 2.0, 4.0, 8.0])
    knobs = PaperBenchParams(warmup=3, min_repeats=2, max_repeats=10, max_seconds=6.0)
    assert time_calls(fake.tick, knobs, warmup=0, clock=fake.clock) == [1.0, 2.0, 4.0]  # 7 s >= 6 s after >= 2 calls
    fake = FakeClock([30.0])
    assert time_calls(fake.tick, PaperBenchParams(warmup=0, min_repeats=1, max_seconds=8.0), clock=fake.clock) == [30.0]


def test_count_flops_of_a_matrix_product():
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    assert count_flops(lambda: a @ b) == 2 * 4 * 5 * 6


# ----------------------------------------------------------------------------------------------------- latency
def test_latency_row_is_per_example_and_speedups_are_ratios_of_medians():
    times = {"teacher": [0.8, 0.4, 0.4], "dual": [0.2, 0.3, 0.1], "dual_cached": [0.05, 0.04, 0.06]}
    row = latency_row(times, batch=4, flops={"teacher": 8e9, "dual": 6e9, "dual_cached": 1e9})
    assert row["teacher_ms"] == pytest.approx(100.0) and row["teacher_ms_mean"] == pytest.approx(1000 * 1.6 / 3 / 4)
    assert row["dual_ms"] == pytest.approx(50.0) and row["dual_cached_ms"] == pytest.approx(12.5)
    assert row["speedup_uncached"] == pytest.approx(row["teacher_ms"] / row["dual_ms"])
    assert row["speedup_cached"] == pytest.approx(row["teacher_ms"] / row["dual_cached_ms"]) == 8.0
    assert row["teacher_gflop"] == 8.0 and row["dual_cached_repeats"] == 3


@pytest.fixture(scope="module")
def tiny_arch():
    return PaperArchitecture(**TINY_ARCH)


@pytest.mark.parametrize("task", ["nlvr2", "snli_ve", "vqa"])
def test_cached_path_gives_the_dual_encoders_logits(task, tiny_arch):
    teacher, student = paper.paper_models(task, tiny_arch)
    batch = paper.synthetic_batch(task, 3, tiny_arch.text_len, tiny_arch.vocab_size, tiny_arch.image_size)
    calls = latency_calls(teacher, student, batch, cached_images(student, batch))
    with torch.inference_mode():
        out = {way: fn() for way, fn in calls.items()}
    width = paper.num_outputs(task, tiny_arch)
    assert all(logits.shape == (3, width) for logits in out.values())
    torch.testing.assert_close(out["dual_cached"], out["dual"])
    random = cached_images(student, batch, precompute=False)
    assert [c.shape for c in random] == [c.shape for c in cached_images(student, batch)]


def test_task_latency_with_a_fake_timer(tiny_arch):
    teacher, student = paper.paper_models("snli_ve", tiny_arch)
    batch = paper.synthetic_batch("snli_ve", 2, tiny_arch.text_len, tiny_arch.vocab_size, tiny_arch.image_size)
    row = task_latency(teacher, student, batch, fake_timer(0.4, 0.1, 0.02))  # teacher, dual, dual_cached
    assert (row["teacher_ms"], row["dual_ms"], row["dual_cached_ms"]) == (200.0, 50.0, 10.0)
    assert (row["speedup_uncached"], row["speedup_cached"]) == (4.0, 20.0)
    flops = task_flops(teacher, student, batch)
    assert flops["teacher"] > flops["dual_cached"] > 0


def test_paper_models_are_the_pipeline_classes_at_the_given_size(tiny_arch):
    teacher, student = paper.paper_models("vqa", tiny_arch)
    assert isinstance(teacher, ViltTeacher) and isinstance(student, DualEncoder)
    assert teacher.config.hidden_size == 32 and teacher.classifier[-1].out_features == 7
    batch = paper.synthetic_batch("vqa", 2, tiny_arch.text_len, tiny_arch.vocab_size, tiny_arch.image_size)
    with torch.inference_mode():
        assert student.encode_image(batch["pixel_values"]).sequence.shape[1] == 1 + 2 * 3  # 32x48 / 16
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].all()


# --------------------------------------------------------------------------------------------------- retrieval
def test_extrapolation_arithmetic_by_hand():
    teacher = retrieval.TeacherCost(per_pair_s=0.002, pairs_sampled=64)
    dual = retrieval.DualCost(per_image_s=0.01, per_caption_s=0.001)
    assert retrieval.extrapolate_teacher_s(300, teacher) == pytest.approx(5 * 300 * 300 * 0.002)  # 900 s
    assert retrieval.extrapolate_dual_s(300, dual, matrix_s=0.5) == pytest.approx(300 * 0.01 + 1500 * 0.001 + 0.5)
    row = retrieval.scaling_row(300, teacher, 5.0, "extrapolated")
    assert row == {"images": 300, "captions": 1500, "pairs": 450000, "dual_s": 5.0, "dual_measured": "extrapolated",
                   "teacher_s": 900.0, "teacher_extrapolated": True, "teacher_per_pair_ms": 2.0,
                   "teacher_pairs_sampled": 64, "speedup": 180.0}
    assert retrieval.gallery_sizes(1000) == [100, 300, 1000] and retrieval.gallery_sizes(5000)[-1] == 5000


def test_paper_scale_retrieval_extrapolated_with_a_fake_timer(tiny_arch):
    teacher, student = paper.paper_models("retrieval", tiny_arch)
    inputs = retrieval.Inputs.make(4, tiny_arch.text_len, tiny_arch.vocab_size, tiny_arch.image_size)
    # timed in turn: teacher on 2 pairs (0.5 s), 4 images (0.2 s), 4 captions (0.04 s), the matrix at N=100, 300
    timer = fake_timer(0.5, 0.2, 0.04, 0.003, 0.02)
    rows = retrieval.scaling_extrapolated(teacher, student, [100, 300], inputs, batch_size=4, pairs=2, timer=timer)
    assert rows["100"]["teacher_s"] == pytest.approx(5 * 100 ** 2 * 0.25)
    assert rows["100"]["dual_s"] == pytest.approx(100 * 0.05 + 500 * 0.01 + 0.003)
    assert rows["300"]["dual_s"] == pytest.approx(300 * 0.05 + 1500 * 0.01 + 0.02)
    assert rows["300"]["speedup"] == pytest.approx(5 * 300 ** 2 * 0.25 / 30.02, rel=1e-3)
    assert rows["300"]["teacher_pairs_sampled"] == 2 * 3 and rows["300"]["dual_measured"] == "extrapolated"
    assert (rows["300"]["dual_per_image_ms"], rows["300"]["dual_per_caption_ms"]) == (50.0, 10.0)


def test_dual_scores_are_batch_independent_and_end_to_end_rows(tiny_arch):
    teacher, student = paper.paper_models("retrieval", tiny_arch)
    inputs = retrieval.Inputs.make(7, tiny_arch.text_len, tiny_arch.vocab_size, tiny_arch.image_size)
    with torch.inference_mode():
        whole, chunked = retrieval.dual_scores(student, inputs, 64), retrieval.dual_scores(student, inputs, 3)
    assert whole.shape == (35, 7)
    torch.testing.assert_close(whole, chunked)
    rows = retrieval.scaling_end_to_end(teacher, student, [3, 7], inputs, 4, pairs=5, timer=fake_timer(1.0, 0.3, 0.6))
    assert rows["3"]["dual_measured"] == "end_to_end" and rows["3"]["dual_s"] == 0.3 and rows["7"]["dual_s"] == 0.6
    assert rows["7"]["teacher_s"] == pytest.approx(5 * 49 * 0.2) and rows["7"]["teacher_pairs_sampled"] == 15


# ----------------------------------------------------------------------------------------------- both files
LEAD_SEED = 2
"""The first seed of ``seeds`` in these tests (``[2, 0]``): the DiDE replica the benchmark times is that seed's."""


@pytest.fixture
def trained_retrieval_models(tmp_path, monkeypatch, tiny_arch):
    """A working directory holding tiny 'trained' retrieval models where the stage reads them: the teacher and the
    DiDE replica of seed :data:`LEAD_SEED` (no other seed's replica: the benchmark must not read one)."""
    monkeypatch.chdir(tmp_path)
    teacher, student = paper.paper_models("retrieval", tiny_arch)
    teacher.save(tmp_path / "models/teacher_finetune/retrieval")
    student.save(tmp_path / paths.replica_dir("retrieval", "dide", LEAD_SEED))
    assert paths.replica_dir("retrieval", "dide", LEAD_SEED) == Path("models/distill_finetune/retrieval/dide/seed2")
    return tmp_path


def test_both_files_have_the_contract_shape(trained_retrieval_models):
    base = load(ROOT / "params.yaml", [f"seeds=[{LEAD_SEED}, 0]"])
    params = base.model_copy(update={"tasks": ["retrieval"], "bench": fast_bench()})
    _, student, models = bench_run.embedded_retrieval_models(params)
    assert models == "trained"
    saved = DualEncoder.load(trained_retrieval_models / paths.replica_dir("retrieval", "dide", LEAD_SEED))
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in saved.state_dict().items())
    latency = bench_run.run_latency(params)
    scaling = bench_run.run_retrieval(params)
    on_disk = json.loads((trained_retrieval_models / "metrics/bench/latency.json").read_text())
    assert on_disk == json.loads(json.dumps(latency))
    assert on_disk["embedded"] == {}  # no classification task enabled
    assert set(on_disk["paper"]) == {"nlvr2", "snli_ve", "vqa"}
    for task, sizes in on_disk["paper"].items():
        assert set(sizes) == {"1", "3"}
        for row in sizes.values():
            assert {f"{w}_{k}" for w in WAYS for k in ("ms", "ms_mean", "repeats", "gflop")} <= set(row)
            assert row["speedup_cached"] == pytest.approx(row["teacher_ms"] / row["dual_cached_ms"], rel=2e-3)
            assert row["speedup_uncached"] == pytest.approx(row["teacher_ms"] / row["dual_ms"], rel=2e-3)
            assert row["teacher_repeats"] == 1
    assert {"kind", "name", "threads", "paper_threads", "torch"} <= set(on_disk["device"])
    assert on_disk["setup"]["paper"]["architecture"]["hidden_size"] == 32
    assert on_disk["setup"]["paper"]["warmup_per"].startswith("model")
    assert "models/distill_finetune/<task>/dide/seed2 (the first seed" in on_disk["setup"]["embedded"]["models"]
    on_disk = json.loads((trained_retrieval_models / "metrics/bench/retrieval.json").read_text())
    assert on_disk == json.loads(json.dumps(scaling))
    assert set(on_disk["embedded"]) == set(on_disk["paper"]) == {"100"}
    assert on_disk["setup"]["embedded"]["models"] == "trained"
    for scale, measured in (("embedded", "end_to_end"), ("paper", "extrapolated")):
        for n, row in on_disk[scale].items():
            assert row["images"] == int(n) and row["pairs"] == 5 * int(n) ** 2 and row["dual_measured"] == measured
            assert row["teacher_extrapolated"] is True
            assert row["teacher_pairs_sampled"] % (8 if scale == "embedded" else 2) == 0
            assert row["speedup"] == pytest.approx(row["teacher_s"] / row["dual_s"], rel=1e-3)


def test_paper_block_can_be_disabled_and_random_embedded_retrieval_models(trained_retrieval_models):
    params = load(ROOT / "params.yaml", [f"seeds=[{LEAD_SEED}, 0]"]).model_copy(
        update={"tasks": ["nlvr2"], "bench": fast_bench(enabled=False)})
    _, _, models = bench_run.embedded_retrieval_models(params)
    assert models == "random"
    params = params.model_copy(update={"tasks": ["retrieval"]})
    assert "paper" not in bench_run.run_latency(params) and "paper" not in bench_run.run_retrieval(params)


# ----------------------------------------------------------------------------------------------- training step
def test_training_step_timer_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu.main(["--params", str(ROOT / "params.yaml"), "--task", "nlvr2", "--batch-size", "2", "--device", "cpu",
                       "--peak-tflops", "0.5", "--out", str(out),
                       "-S", f"bench.paper.architecture={json.dumps(TINY_ARCH)}", "-S", "bench.paper.warmup=0",
                       "-S", "bench.paper.min_repeats=1", "-S", "bench.paper.max_repeats=1"])
    assert json.loads(out.read_text()) == result
    assert result["device"]["name"] == "cpu" and result["task"] == "nlvr2" and result["precision"] == "32"
    assert result["knowledge"] == ["gt", "soft", "attn_cross"] and result["tflop_per_step"] > 0
    assert result["achieved_tflops"] == pytest.approx(result["tflop_per_step"] / (result["step_ms"] / 1000), rel=1e-3)
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 0.5, rel=1e-3)
    assert result["ms_per_example"] == pytest.approx(result["step_ms"] / 2, rel=1e-3)
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("cpu") is None


# ----------------------------------------------------------------------------------------------- precision
def test_the_benchmark_times_under_the_precision_of_fabric_or_its_own(monkeypatch):
    """Every timed call runs inside the precision's autocast (bf16-mixed: bfloat16 logits on this CPU);
    ``bench.precision: null`` follows ``fabric.precision``."""
    seen = []

    def spy(teacher, student, batch, timer, **kwargs):
        seen.append(latency_calls(teacher, student, batch, cached_images(student, batch))["teacher"]().dtype)
        return {}

    monkeypatch.setattr(bench_run, "task_latency", spy)
    monkeypatch.setattr(bench_run, "task_flops", lambda *args, **kwargs: {})
    for precision in ("bf16-mixed", "32-true"):
        bench_run.paper_latency(fast_bench(), ("snli_ve",), precision=precision)
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]  # batch sizes 1 and 3
    params = load(ROOT / "params.yaml", ["fabric.precision=bf16-mixed"])
    assert params.bench.precision_of(params.fabric) == "bf16-mixed"
    assert load(ROOT / "params.yaml", ["bench.precision=32-true"]).bench.precision_of(params.fabric) == "32-true"
    assert bench_run.device_info(params.bench, "bf16-mixed")["precision"] == "bf16-mixed"
    with pytest.raises(RuntimeError, match="bench.precision=16-mixed"):
        bench_run.check_device(params.bench, "16-mixed")
