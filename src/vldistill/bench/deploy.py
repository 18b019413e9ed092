"""``deploy_benchmark`` (``python -m vldistill.bench.deploy``): what serving a dual encoder costs, in one run.

- ``towers``: milliseconds per example of each exported graph (text tower, image tower, fusion head) on PyTorch
  eager and on onnxruntime, at ``deploy.bench.batch_sizes``, for the embedded architecture and (``paper``)
  ViLT-B/32's; random weights (:func:`vldistill.bench.paper.paper_models`: latency does not depend on them).
- ``faiss``: synthetic galleries of ``gallery_sizes`` unit vectors of width ``dim`` (a mixture of clusters, as real
  embeddings are, not uniform noise, on which no approximate index works); exact inner product against
  ``approx`` (IVF-Flat or HNSW): build seconds, queries per second for ``queries`` queries in one call, and the
  approximate index's recall@10 against the exact top 10.
- ``query``: one text query end to end on the largest gallery: tokenise + text tower + search, against the
  teacher, which must run one joint pass per (query, image) pair: ``N × per-pair time`` (always extrapolated).

Threads: ``deploy.bench.threads`` for torch, onnxruntime and FAISS alike. Writes ``metrics/bench/deploy.json``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from vldistill.bench import paper as paper_size
from vldistill.bench.timing import summarise, time_calls
from vldistill.config import DeployBenchParams, PaperArchitecture, Params
from vldistill.data.datasets import tokenize
from vldistill.deploy.index import faiss_index
from vldistill.deploy.onnx_towers import OnnxRunner, TorchRunner, export_onnx
from vldistill.io import write_json

OUT = Path("metrics/bench/deploy.json")
TASK = "retrieval"
"""The task the timed models carry: its head (image–text matching) is the fusion head a search re-ranks with."""
UNITS = {
    "towers.<scale>.<graph>.<batch>": "torch_ms / onnx_ms: median milliseconds per example; speedup = torch / onnx",
    "faiss.<N>": "build_s: seconds to build (IVF: train + add); qps: queries per second in one batched call of "
                 "`queries`; recall_at_10: |approx top 10 ∩ exact top 10| / 10, averaged; memory_mb: N·dim·4 bytes",
    "query.<scale>": "milliseconds for one text query: dual_<way>_ms = tokenise + the faster of the two text towers "
                     "+ <way> search of the gallery; teacher_s: N × teacher_pair_ms (one joint pass per image, "
                     "extrapolated); gain_<way> = teacher_s / dual_<way>_ms; `extrapolated` lists the keys not "
                     "measured as such",
}


@contextlib.contextmanager
def threads(n: int):
    """torch and FAISS on ``n`` threads for the body (onnxruntime gets ``n`` per session)."""
    import faiss

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _knobs(bench: DeployBenchParams, warmup: int) -> SimpleNamespace:
    return SimpleNamespace(warmup=warmup, min_repeats=min(bench.min_repeats, bench.max_repeats),
                           max_repeats=bench.max_repeats, rel_tol=bench.rel_tol, max_seconds=bench.max_seconds)


def _ms(fn, bench: DeployBenchParams, batch: int, warmup: int) -> float:
    return summarise(time_calls(fn, _knobs(bench, warmup)), batch)["median"]


def embedded_architecture(params: Params) -> PaperArchitecture:
    """The embedded pipeline's model as a :class:`PaperArchitecture` (``teacher.*``, the scene's image size)."""
    t, scene = params.teacher, params.data.scene
    side = scene.grid * scene.cell
    return PaperArchitecture(hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                             intermediate_size=t.intermediate_size, patch_size=t.patch_size, image_size=[side, side],
                             text_len=t.max_text_len, vocab_size=params.tokenizer.vocab_size, vqa_answers=2,
                             fusion_hidden=params.student.fusion_hidden)


# ------------------------------------------------------------------------------------------------------ towers
def tower_latency(arch: PaperArchitecture, bench: DeployBenchParams, opset: int) -> tuple[dict, float]:
    """``({graph: {"<batch>": {"torch_ms", "onnx_ms", "speedup"}}}, teacher_pair_ms)``. Warm-up calls once per
    (graph, runtime), before its smallest batch; the teacher's joint pass is timed at the largest batch."""
    teacher, dual = paper_size.paper_models(TASK, arch)
    sizes = sorted(bench.batch_sizes)
    results: dict[str, dict] = {"text": {}, "image": {}, "head": {}}
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(dual, tmp, arch.image_size, arch.text_len, opset)
        runners = {"torch": TorchRunner(dual), "onnx": OnnxRunner(tmp, bench.threads)}
        for i, size in enumerate(sizes):
            batch = paper_size.synthetic_batch(TASK, size, arch.text_len, arch.vocab_size, arch.image_size)
            ids, mask, pixels = (batch[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values"))
            cls = [np.random.default_rng(0).standard_normal((size, arch.hidden_size), dtype=np.float32)] * 2
            calls = {"text": lambda r: r.text(ids, mask), "image": lambda r: r.image(pixels, 1),
                     "head": lambda r: r.head(*cls)}
            for graph, call in calls.items():
                row = {f"{name}_ms": _ms(lambda: call(runner), bench, size, bench.warmup if i == 0 else 0)
                       for name, runner in runners.items()}
                results[graph][str(size)] = {**row, "speedup": row["torch_ms"] / row["onnx_ms"]}
        del runners
    batch = paper_size.synthetic_batch(TASK, sizes[-1], arch.text_len, arch.vocab_size, arch.image_size)
    with torch.inference_mode():
        teacher_ms = _ms(lambda: teacher.rank_score(batch["input_ids"], batch["attention_mask"],
                                                    batch["pixel_values"]), bench, sizes[-1], min(bench.warmup, 1))
    return results, teacher_ms


# ------------------------------------------------------------------------------------------------------- FAISS
def synthetic_gallery(n: int, dim: int, seed: int = 0, clusters: int = 1000, spread: float = 1.0) -> np.ndarray:
    """``(n, dim)`` float32 unit vectors: ``clusters`` random centres plus Gaussian noise of relative size
    ``spread``, in chunks (a million 128-d rows is 512 MB).

    ``spread = 1``: a member is as far from its centre as the centre is long, so a query's 10th neighbour sits at
    cosine ≈ 0.55 (at 10⁵ × 128). Tighter clusters make every approximate index look perfect (0.5: IVF recall@10 =
    1.0), looser ones approach uniform noise, where none works (2.0: 0.41)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        rows = centres[rng.integers(0, clusters, stop - start)]
        rows += spread * rng.standard_normal(rows.shape, dtype=np.float32)
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def queries_near(gallery: np.ndarray, count: int, seed: int = 1, noise: float = 0.3) -> np.ndarray:
    """``count`` unit queries, each a gallery row plus noise (a caption lands near, not on, its image)."""
    rng = np.random.default_rng(seed)
    rows = gallery[rng.integers(0, len(gallery), count)]
    rows = rows + noise * rng.standard_normal(rows.shape, dtype=np.float32) / np.sqrt(gallery.shape[1])
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _build(gallery: np.ndarray, kind: str, bench: DeployBenchParams):
    start = time.perf_counter()
    index = faiss_index(gallery, kind, ivf_lists=bench.ivf_lists, ivf_probe=bench.ivf_probe, hnsw_m=bench.hnsw_m,
                        hnsw_ef_search=bench.hnsw_ef_search)
    return index, time.perf_counter() - start


def faiss_row(gallery: np.ndarray, queries: np.ndarray, bench: DeployBenchParams) -> tuple[dict, dict]:
    """``(row, indexes)`` for one gallery: exact vs approximate build time, queries/s, recall@10; ``indexes``
    ``{"exact", "approx"}`` for the end-to-end query."""
    row, indexes, top = {"memory_mb": gallery.nbytes / 2**20}, {}, {}
    for way, kind in (("exact", "flat"), ("approx", bench.approx)):
        index, build_s = _build(gallery, kind, bench)
        seconds = time_calls(lambda: index.search(queries, 10), _knobs(bench, 1))
        top[way] = index.search(queries, 10)[1]
        row[way] = {"kind": kind, "build_s": build_s, "qps": len(queries) / float(np.median(seconds))}
        if kind == "ivf":
            row[way].update(lists=int(index.nlist), probe=int(index.nprobe))
        indexes[way] = index
    hits = [len(set(a) & set(e)) / 10 for a, e in zip(top["approx"], top["exact"])]
    row["exact"]["recall_at_10"], row["approx"]["recall_at_10"] = 1.0, float(np.mean(hits))
    return row, indexes


# ------------------------------------------------------------------------------------------------------- query
def query_row(arch: PaperArchitecture, tokenizer, towers: dict, teacher_pair_ms: float, search_ms: dict,
              gallery: int, measured_dim: int, bench: DeployBenchParams) -> dict:
    """One text query on a gallery of ``gallery`` images: tokenise (measured) + text tower at batch 1 (measured,
    torch and onnx) + search (measured at width ``measured_dim``; scaled by ``hidden / measured_dim`` when the
    architecture is wider, and marked so), against the teacher's ``gallery × teacher_pair_ms``."""
    text = "a red circle left of a blue square"
    tokenise_ms = _ms(lambda: tokenize(tokenizer, [text], arch.text_len), bench, 1, bench.warmup)
    scale = arch.hidden_size / measured_dim
    extrapolated = ["teacher_s"] + (["search_exact_ms", "search_approx_ms"] if scale != 1 else [])
    row = {"gallery": gallery, "tokenise_ms": tokenise_ms, "text_torch_ms": towers["text"]["1"]["torch_ms"],
           "text_onnx_ms": towers["text"]["1"]["onnx_ms"], "search_exact_ms": search_ms["exact"] * scale,
           "search_approx_ms": search_ms["approx"] * scale, "teacher_pair_ms": teacher_pair_ms,
           "teacher_s": gallery * teacher_pair_ms / 1000, "extrapolated": extrapolated}
    text_ms = min(row["text_torch_ms"], row["text_onnx_ms"])
    for way in ("exact", "approx"):
        row[f"dual_{way}_ms"] = tokenise_ms + text_ms + row[f"search_{way}_ms"]
        row[f"gain_{way}"] = row["teacher_s"] * 1000 / row[f"dual_{way}_ms"]
    return row


def synthetic_tokenizer(vocab_size: int, max_len: int):
    """A WordPiece tokenizer over a fixed sentence set, sized ``vocab_size`` at most (tokenising costs the same)."""
    from vldistill.data.tokenizer import train_tokenizer

    words = [f"{c} {s} {r}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")
             for r in ("left of", "right of", "above", "below", "a", "the")]
    return train_tokenizer(words, max(60, min(vocab_size, 120)), max_len)


def run(params: Params, out: str | Path = OUT) -> dict:
    """Every measurement of the module docstring; writes and returns ``metrics/bench/deploy.json``."""
    bench = params.deploy.bench
    scales = {"embedded": embedded_architecture(params)}
    if bench.paper:
        scales["paper"] = params.bench.paper.architecture
    result: dict = {"towers": {}, "faiss": {}, "query": {}, "units": UNITS,
                    "setup": {"threads": bench.threads, "dim": bench.dim, "queries": bench.queries,
                              "approx": bench.approx, "onnxruntime": _version("onnxruntime"),
                              "faiss": _version("faiss"), "torch": torch.__version__,
                              "architectures": {k: paper_size.describe(a) for k, a in scales.items()}}}
    with threads(bench.threads):
        teacher_ms = {}
        for scale, arch in scales.items():
            result["towers"][scale], teacher_ms[scale] = tower_latency(arch, bench, params.deploy.export.opset)
        for n in sorted(bench.gallery_sizes):  # the largest last: its indexes time the single query
            gallery = synthetic_gallery(n, bench.dim)
            queries = queries_near(gallery, bench.queries)
            result["faiss"][str(n)], indexes = faiss_row(gallery, queries, bench)
            del gallery
        search_ms = {way: _ms(lambda: index.search(queries[:1], 10), bench, 1, 1) for way, index in indexes.items()}
        del indexes
        tokenizer = synthetic_tokenizer(params.tokenizer.vocab_size, params.teacher.max_text_len)
        for scale, arch in scales.items():
            result["query"][scale] = query_row(arch, tokenizer, result["towers"][scale], teacher_ms[scale],
                                               search_ms, max(bench.gallery_sizes), bench.dim, bench)
    write_json(out, result)
    return result


def _version(module: str) -> str:
    return getattr(__import__(module), "__version__", "unknown")


def main() -> None:
    from vldistill.cli import stage_args

    _, params = stage_args(__doc__.split("\n\n")[0])
    result = run(params)
    for line in summary_lines(result):
        print(line)


def summary_lines(result: dict) -> list[str]:
    """The three tables as text lines (what the stage prints)."""
    lines = [f"{'scale':9}{'graph':7}{'batch':>6}{'torch ms':>10}{'onnx ms':>10}{'x':>7}"]
    for scale, graphs in result["towers"].items():
        for graph, sizes in graphs.items():
            for size, row in sizes.items():
                lines.append(f"{scale:9}{graph:7}{size:>6}{row['torch_ms']:10.3f}{row['onnx_ms']:10.3f}"
                             f"{row['speedup']:7.2f}")
    lines.append(f"{'N':>9}{'exact qps':>11}{'approx qps':>12}{'recall@10':>11}{'exact build s':>15}"
                 f"{'approx build s':>16}")
    for n, row in result["faiss"].items():
        lines.append(f"{n:>9}{row['exact']['qps']:11.0f}{row['approx']['qps']:12.0f}"
                     f"{row['approx']['recall_at_10']:11.3f}{row['exact']['build_s']:15.2f}"
                     f"{row['approx']['build_s']:16.2f}")
    lines.append(f"{'scale':9}{'N':>9}{'dual exact ms':>15}{'dual approx ms':>16}{'teacher s':>11}{'gain exact':>12}")
    for scale, row in result["query"].items():
        lines.append(f"{scale:9}{row['gallery']:>9}{row['dual_exact_ms']:15.2f}{row['dual_approx_ms']:16.2f}"
                     f"{row['teacher_s']:11.1f}{row['gain_exact']:12.0f}  (extrapolated: "
                     f"{', '.join(row['extrapolated'])})")
    return lines


if __name__ == "__main__":
    main()
