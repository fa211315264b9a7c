"""The `sparse-attention` command, end to end.

Subprocess calls check what a user sees (exit codes, messages, files); the per-pattern
picture checks call the CLI in-process (importing torch per subprocess would dominate).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import sparse_attention as sa
from sparse_attention import cli
from sparse_attention.viz import ALLOWED_RGB, EMPTY_RGB, geometry

mpimg = pytest.importorskip("matplotlib.image", reason="the viz extra (matplotlib) is not installed")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparse_attention", *args], capture_output=True, text=True,
                          timeout=300)


def test_list_shows_every_mechanism():
    r = run_cli("list")
    assert r.returncode == 0, r.stderr
    for m in sa.mechanisms():
        assert m.name in r.stdout, f"{m.name} missing from `list`"


@pytest.mark.parametrize(("args", "message"), [
    (["show", "no_such_thing", "-o", "x.png"], "unknown mechanism 'no_such_thing'"),
    (["show", "sliding_window", "--seq-len", "0", "-o", "x.png"], "positive integer"),
    (["show", "sliding_window", "--seq-len", "abc", "-o", "x.png"], "positive integer"),
    (["show", "sliding_window", "-o", "/no/such/dir/x.png"], "does not exist"),
    (["show", "sliding_window", "-o", "x.jpg"], ".png, .svg"),
    (["show", "sliding_window", "--wndow", "3", "-o", "x.png"], "valid: ['--causal', '--window']"),
    (["show", "sliding_window", "--window", "-3", "-o", "x.png"], "window must be >= 0"),
    (["show", "global", "--indices", "(0, 99)", "--seq-len", "64", "-o", "x.png"], "S=64"),
    (["cost", "bigbird"], "--seq-len"),
    (["bench", "--mechanisms", "nope"], "unknown mechanism 'nope'"),
    (["bench", "--seq-lens", "1024,-5"], "positive integer"),
    (["bench", "--json", "/no/such/dir/out.json"], "does not exist"),
    (["check", "causal", "--dtype", "int8"], "unknown dtype"),
])
def test_bad_input_exits_2_with_a_message(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparse_attention", *args], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2, f"exit {r.returncode} for {args}: {r.stderr}"
    assert message in r.stderr, f"{message!r} not in stderr for {args}: {r.stderr}"


def test_show_writes_png_and_svg(tmp_path):
    png, svg = tmp_path / "bb.png", tmp_path / "bb.svg"
    assert run_cli("show", "bigbird", "--seq-len", "128", "-o", str(png)).returncode == 0
    img = mpimg.imread(png)
    geo = geometry(1, 128, 128)
    assert img.shape[:2] == (geo.height, geo.width), f"picture size {img.shape[:2]}"
    assert cli.main(["show", "bigbird", "--seq-len", "64", "-o", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


@pytest.mark.parametrize(("n", "s", "factor"), [(10, 7, 3), (9, 9, 3), (5, 12, 4), (4, 4, 1)])
def test_pool_any_marks_a_tile_when_any_pair_is_kept(n, s, factor):
    """pool_any against a loop over tiles, the tiles at the far edges cut short."""
    from sparse_attention.viz import pool_any
    masks = torch.rand(2, n, s, generator=torch.Generator().manual_seed(n * s)) < 0.1
    pooled = pool_any(masks, factor)
    rows, cols = -(-n // factor), -(-s // factor)
    assert pooled.shape == (2, rows, cols)
    for h in range(2):
        for i in range(rows):
            for j in range(cols):
                tile = masks[h, i * factor:(i + 1) * factor, j * factor:(j + 1) * factor]
                assert bool(pooled[h, i, j]) == bool(tile.any()), (h, i, j)


def test_show_pools_long_matrices_and_refuses_huge_ones(tmp_path, capsys):
    """Past 1024 a pixel stands for a tile of pairs (drawn when any is kept): the pooled picture's cells
    match pool_any of mask(), the picture stays ~1024 pixels a side; past 8192 the command refuses (the
    N x N mask alone would be the problem, 4.5 GB of memory at 16384 here)."""
    from sparse_attention.viz import pool_any
    path = tmp_path / "sw.png"
    assert cli.main(["show", "sliding_window", "--seq-len", "2500", "--window", "40", "-o", str(path)]) == 0
    assert "2500x2500, drawn 834x834" in capsys.readouterr().out
    want = pool_any(sa.SlidingWindow(40).mask(2500, 2500).unsqueeze(0), 3)[0]
    img = torch.from_numpy(mpimg.imread(path)[..., :3].copy())
    geo = geometry(1, 834, 834)
    assert img.shape[:2] == (geo.height, geo.width)
    rows = torch.tensor([geo.center(0, i, 0)[0] for i in range(834)])
    cols = torch.tensor([geo.center(0, 0, j)[1] for j in range(834)])
    is_allowed = (img[rows][:, cols] - torch.tensor(ALLOWED_RGB)).abs().amax(-1) < 0.02
    assert torch.equal(is_allowed, want)
    assert cli.main(["show", "sliding_window", "--seq-len", "8193", "-o", str(path)]) == 2
    assert "--seq-len 8193: show builds the whole N x N mask" in capsys.readouterr().err


def _patterns_for_pictures():
    pats = {m.name: m.make() for m in sa.mechanisms("static")}
    pats["per_head"] = sa.PerHead([sa.Causal(), sa.SlidingWindow(3), sa.Strided(5)])
    return pats


@pytest.mark.parametrize(("name", "pattern"), list(_patterns_for_pictures().items()))
def test_picture_matches_mask_cell_by_cell(name, pattern, tmp_path, monkeypatch):
    """Every static pattern at N=64: each cell's centre pixel is 'allowed' blue exactly where mask() is True."""
    n = 64
    if name in sa.registry.REGISTRY:
        path = tmp_path / f"{name}.png"
        assert cli.main(["show", name, "--seq-len", str(n), "-o", str(path)]) == 0
    else:  # not in the registry: render through the same function the CLI uses
        from sparse_attention.viz import render_masks

        path = tmp_path / f"{name}.png"
        render_masks(pattern.mask(n, n), str(path), title=name, block=None)
    mask = pattern.mask(n, n)
    masks = mask if mask.dim() == 3 else mask.unsqueeze(0)
    img = torch.from_numpy(mpimg.imread(path)[..., :3].copy())
    geo = geometry(masks.shape[0], n, n)
    allowed, empty = torch.tensor(ALLOWED_RGB), torch.tensor(EMPTY_RGB)
    for h in range(masks.shape[0]):
        rows = torch.tensor([geo.center(h, i, 0)[0] for i in range(n)])
        cols = torch.tensor([geo.center(h, 0, j)[1] for j in range(n)])
        cells = img[rows][:, cols]  # (n, n, 3)
        is_allowed = (cells - allowed).abs().amax(-1) < 0.02
        is_empty = (cells - empty).abs().amax(-1) < 0.02
        assert bool((is_allowed | is_empty).all()), f"{name} head {h}: cells of neither colour"
        assert torch.equal(is_allowed, masks[h]), (
            f"{name} head {h}: picture differs from mask() at {int((is_allowed != masks[h]).sum())} cells")


@pytest.mark.parametrize("name", [m.name for m in sa.mechanisms("content")])
def test_content_based_picture_shows_the_pairs_kept_on_the_random_input(name, tmp_path):
    n, path = 48, tmp_path / f"{name}.png"
    assert cli.main(["show", name, "--seq-len", str(n), "--dim", "16", "--input-seed", "5", "-o", str(path)]) == 0
    q, k = cli._random_qk(1, n, 16, 5)
    kept = sa.explain(q, k, sa.registry.get(name).make())[0, 0]
    img = torch.from_numpy(mpimg.imread(path)[..., :3].copy())
    geo = geometry(1, n, n)
    rows = torch.tensor([geo.center(0, i, 0)[0] for i in range(n)])
    cols = torch.tensor([geo.center(0, 0, j)[1] for j in range(n)])
    is_allowed = (img[rows][:, cols] - torch.tensor(ALLOWED_RGB)).abs().amax(-1) < 0.02
    assert torch.equal(is_allowed, kept)


def test_list_shows_the_capabilities_of_module_mechanisms():
    r = run_cli("list")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("│ ") and "module" in line}
    for m in sa.mechanisms("module"):
        assert m.name in rows, f"{m.name} missing from `list`"
        cells = [c.strip() for c in rows[m.name].split("│")[1:-1]]
        assert cells[1:8] == ["module", "no", m.causal_support, "yes" if m.stochastic else "no",
                              "yes" if m.learned else "no", m.length_option or "-",
                              "yes" if m.self_only else "no"], cells


@pytest.mark.parametrize("command", ["show", "cost", "check"])
def test_pattern_commands_refuse_module_mechanisms(command, tmp_path, capsys):
    args = {"show": ["-o", str(tmp_path / "x.png")], "cost": ["--seq-len", "64"], "check": []}[command]
    assert cli.main([command, "linformer", *args]) == 2
    err = capsys.readouterr().err
    assert "linformer is a module mechanism" in err and "bench --mechanisms linformer" in err, err
    assert not (tmp_path / "x.png").exists()


def test_bench_times_module_mechanisms(tmp_path):
    """Modules run as head-split modules sized by the bench (a fixed-length one for each N); errors
    against full attention only where they mean something (not for learned or shared-QK ones)."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--mechanisms", "performer", "linformer", "reformer", "--seq-lens", "24,40",
                     "--heads", "1", "--dim", "8", "--repeats", "1", "--json", str(out)]) == 0
    rows = {(r["mechanism"], r["seq_len"]): r for r in json.loads(out.read_text())["rows"]}
    for n in (24, 40):
        for name in ("performer", "linformer", "reformer"):
            row = rows[(name, n)]
            assert row["status"] == "ok" and row["time_ms"] > 0 and row["speedup_vs_dense"] > 0, row
            assert row["density"] is None, row
        assert rows[("performer", n)]["max_rel_error"] > 0
        assert rows[("linformer", n)]["max_rel_error"] is None and rows[("reformer", n)]["max_rel_error"] is None


def test_bench_keep_freed_memory_flag(tmp_path, monkeypatch):
    """--keep-freed-memory calls sa.keep_freed_memory() once before timing (stubbed here: the real call is
    process-wide and cannot be undone; tests/test_allocator.py checks it in fresh processes) and records
    whether it took effect."""
    import sparse_attention.allocator as allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    out = tmp_path / "bench.json"
    args = ["bench", "--mechanisms", "sliding_window", "--seq-lens", "64", "--heads", "1", "--dim", "8",
            "--repeats", "1", "--json", str(out)]
    assert cli.main(args) == 0 and not calls
    assert json.loads(out.read_text())["config"]["keep_freed_memory"] is False
    assert cli.main(args + ["--keep-freed-memory"]) == 0 and calls == [1]
    assert json.loads(out.read_text())["config"]["keep_freed_memory"] is True


def test_bench_reports_the_native_kernels(tmp_path, capsys):
    """bench says whether the native kernels are in use (their status), on screen and in the JSON."""
    from sparse_attention import native

    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--mechanisms", "topk", "--seq-lens", "64", "--heads", "1", "--dim", "8",
                     "--repeats", "1", "--json", str(out)]) == 0
    assert f"native kernels: {native.status()}" in capsys.readouterr().out
    assert json.loads(out.read_text())["config"]["native"] == native.status()


def test_cost_refuses_content_based_mechanisms():
    r = run_cli("cost", "topk", "--seq-len", "64")
    assert r.returncode == 2 and "depends on the data" in r.stderr


def test_check_content_based_mechanism():
    r = run_cli("check", "probsparse", "--seq-len", "64", "--factor", "1.0")
    assert r.returncode == 0 and "backend=auto" in r.stdout and r.stdout.strip().endswith("PASS"), r.stdout


def test_cost_prints_pairs_and_memory():
    r = run_cli("cost", "longformer", "--seq-len", "4096", "--window", "256")
    assert r.returncode == 0, r.stderr
    pairs = sa.Longformer(256, (0,)).stats(4096).attended_pairs
    assert f"{pairs:,}" in r.stdout, r.stdout
    assert "peak memory" in r.stdout


def test_check_passes_and_reports_each_tensor():
    r = run_cli("check", "bigbird", "--seq-len", "97", "--dtype", "bf16")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("out", "dq", "dk", "dv"):
        assert name in r.stdout
    assert "backend=blocksparse" in r.stdout and "backend=dense" in r.stdout
    assert r.stdout.strip().endswith("PASS")


def test_bench_json_schema_and_plot(tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    r = run_cli("bench", "--mechanisms", "sliding_window", "bigbird", "--seq-lens", "128,256", "--heads", "2",
                "--dim", "16", "--repeats", "1", "--backward", "--json", str(out), "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["config"]["mode"] == "fwd+bwd" and data["config"]["seq_lens"] == [128, 256]
    rows = data["rows"]
    assert [(row["mechanism"], row["seq_len"]) for row in rows] == [
        (m, n) for n in (128, 256) for m in ("dense SDPA", "sliding_window", "bigbird")]
    keys = {"mechanism", "seq_len", "mode", "status", "time_ms", "peak_memory_mb", "speedup_vs_dense",
            "memory_vs_dense", "density", "max_rel_error", "mean_rel_error", "samples_ms"}
    for row in rows:
        assert keys <= set(row), f"missing {keys - set(row)}"
        assert row["status"] == "ok" and row["time_ms"] > 0, row
        if row["mechanism"] == "dense SDPA":
            assert row["max_rel_error"] == 0.0, row
        else:  # a sparse pattern changes the output of random inputs
            assert row["max_rel_error"] > 0 and row["mean_rel_error"] > 0 and row["speedup_vs_dense"] > 0, row
    assert mpimg.imread(plot).shape[0] > 100


def test_bench_turns_failures_into_rows(monkeypatch):
    """A mechanism that raises becomes a row saying so, not a crash."""
    from sparse_attention import bench

    def boom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(bench, "attention", boom)
    rows = bench.run(["sliding_window"], [64], heads=1, dim=8, repeats=1)
    assert rows[0].status == "ok" and rows[1].status == "out of memory", [r.status for r in rows]


def test_lra_layout(monkeypatch, capsys):
    """--lra: fwd+bwd rows at 1K-4K laid out as steps/s and memory relative to dense (run here at small N)."""
    from sparse_attention import bench

    real_run = bench.run
    seen = {}

    def small_run(names, lengths, **kw):
        seen.update(lengths=list(lengths), backward=kw["backward"])
        return real_run(names, [64, 128], **{**kw, "repeats": 1})

    monkeypatch.setattr(bench, "run", small_run)
    assert cli.main(["bench", "--lra", "--mechanisms", "block_local", "--heads", "1", "--dim", "8"]) == 0
    out = capsys.readouterr().out
    assert seen == {"lengths": [1024, 2048, 3072, 4096], "backward": True}
    assert "Long Range Arena" in out and "steps/s" in out and "block_local" in out


@pytest.mark.parametrize("argv", [
    ["check", "sliding_window", "--seq-len", "33", "--device", "foo"],
    ["check", "sliding_window", "--seq-len", "33", "--kv-heads", "3"],
    ["bench", "--device", "foo", "--seq-lens", "32", "--mechanisms", "full"],
    ["bench", "--seq-lens", "32", "--mechanisms", "full", "full"],
    ["bench", "--lra", "--seq-lens", "32", "--mechanisms", "full"],
    ["check", "topk", "--seq-len", "20", "--backend", "dense"],
] + ([["check", "sliding_window", "--seq-len", "33", "--device", "cuda"]] if not torch.cuda.is_available() else []))
def test_bad_device_or_heads_is_a_usage_error(argv, capsys):
    """Exit status 2 and one line naming the option (tracebacks with status 1 for --device/--kv-heads; a
    duplicated mechanism, --seq-lens under --lra and --backend dense for TopK were silently dropped)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and any(opt in err for opt in ("--device", "--kv-heads", "--mechanisms", "--lra",
                                                           "--backend")), err


def test_mechanism_options_are_not_taken_for_tool_options(tmp_path):
    """TopK's --k is its k (not an abbreviation of --kv-len), and show's --seed is the mechanism's seed (the
    random input's is --input-seed): RandomBlocks with seed 5 draws its own blocks."""
    assert cli.main(["check", "topk", "--seq-len", "20", "--k", "4"]) == 0
    paths = [tmp_path / f"rb{seed}.png" for seed in (0, 5)]
    for seed, path in zip((0, 5), paths, strict=True):
        assert cli.main(["show", "random_blocks", "--seq-len", "64", "--seed", str(seed), "-o", str(path)]) == 0
    assert paths[0].read_bytes() != paths[1].read_bytes()


def test_bench_measures_memory_after_the_warm_up(monkeypatch):
    """Peak memory is read on a call after the warm-up (on the warm-up itself it counted one-time costs: the
    first length's dense row showed 2.4 MB where the same call needs 0.02 MB)."""
    from sparse_attention import bench

    calls, entered_after = [0], []

    class Spy:
        def __init__(self, device):
            self.peak_bytes = 0

        def __enter__(self):
            entered_after.append(calls[0])
            return self

        def __exit__(self, *exc):
            return False

    def fn():
        calls[0] += 1

    monkeypatch.setattr(bench, "PeakMemory", Spy)
    samples, _ = bench.measure(fn, torch.device("cpu"), repeats=2)
    assert entered_after == [1] and calls[0] == 4 and len(samples) == 2


def test_empty_seq_lens_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--seq-lens", ",", "--mechanisms", "full"])
    assert e.value.code == 2 and "comma-separated positive ints" in capsys.readouterr().err
