"""The GPU scripts run end to end on CPU with the tiny model: scripts/bench.py --smoke (also with TP=2),
scripts/profile_step.py --smoke and scripts/parity_gpu.py --shape tiny (fp32, where the runtime must
match HF exactly); scripts/kernel_asm.py compiles for a GPU that is not here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], tmp: Path) -> None:
    """Run a script with its own temporary directory, and check it removed its scratch work
    (several GB of checkpoints at mBART-large shape)."""
    scratch = tmp / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True, timeout=600, env=env)
    left = [p.name for p in scratch.iterdir() if p.name.startswith(("bench-", "profile-", "parity-"))]
    assert not left, f"{args[0]} left its scratch directories behind: {left}"


def test_bench_smoke_writes_table_json_and_plot(tmp_path):
    """Every contender serves each level's requests (--rounds per client, at least 8), 8 new tokens each,
    --repeats times, and reports the median run with every run's tokens/s."""
    run(["scripts/bench.py", "--smoke", "--variants", "float32,int8_wo=rtn,float32+shortlist", "--rounds", "3",
         "--repeats", "3", "--out", str(tmp_path)], tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "bench.json").read_text())
    runtime = {"runtime float32", "runtime int8_wo", "runtime float32+shortlist"}
    assert set(report["contenders"]) == runtime | {"HF generate fp16", "HF generate fp16, no cuDNN SDPA"}
    for name, c in report["contenders"].items():
        assert "error" not in c, name
        assert {lv: level["requests"] for lv, level in c["levels"].items()} == {"1": 8, "4": 12}, name
        for level in c["levels"].values():
            assert round(level["tokens_per_s"] * level["wall_s"]) == 8 * level["requests"], name
            runs = level["tokens_per_s_runs"]
            assert len(runs) == 3 and runs == sorted(runs) and level["tokens_per_s"] == runs[1], name
    for name in runtime:
        steps = report["contenders"][name]["step_ms_batch1_runs"]
        assert len(steps) == 3 and report["contenders"][name]["step_ms_batch1"] == sorted(steps)[1], name
    assert (
        report["contenders"]["runtime int8_wo"]["weight_bytes"]
        < report["contenders"]["runtime float32"]["weight_bytes"]
    )
    bytes_per_step = {n: report["contenders"][n]["weight_bytes_per_step"] for n in runtime}
    assert bytes_per_step["runtime float32+shortlist"] < bytes_per_step["runtime float32"]
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_hf_batch1_step_comes_only_from_a_level_of_one_client():
    from scripts.bench import lone_ms_per_token

    assert lone_ms_per_token({"1": {"tokens_per_s": 125.0}, "64": {"tokens_per_s": 4000.0}}) == 8.0
    assert math.isnan(lone_ms_per_token({"64": {"tokens_per_s": 4000.0}}))


def test_bench_tp_mode_serves_each_variant_at_tp1_and_tp2_with_the_same_tokens(tmp_path):
    """--tp-size 2 runs the variant through the server's backend at one and at two ranks (gloo here, NCCL
    on GPUs) and reports whether the two generated the same tokens."""
    run(["scripts/bench.py", "--smoke", "--tp-size", "2", "--variants", "float32", "--no-hf", "--repeats", "2",
         "--out", str(tmp_path)], tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "bench.json").read_text())
    tp1, tp2 = report["contenders"]["runtime float32, TP=1"], report["contenders"]["runtime float32, TP=2"]
    for c in (tp1, tp2):
        assert "error" not in c and c["step_ms_batch1"] > 0
        assert set(c["levels"]) == {"1", "4"} and all(lv["tokens_per_s"] > 0 for lv in c["levels"].values())
        assert all(len(lv["tokens_per_s_runs"]) == 2 for lv in c["levels"].values())
    assert tp2["tokens_identical_to_tp1"] is True


def test_parity_script_tiny_fp32_is_exact(tmp_path):
    run(["scripts/parity_gpu.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
         "--sentences", "8", "--max-new-tokens", "16", "--out", str(tmp_path)], tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["max_abs_logit_diff"] <= 1e-4
    assert report["greedy_identical_sequences"] == report["sentences"] == 8


def test_profile_smoke_splits_the_loop_and_idle_gaps_go_to_the_host_phase(tmp_path):
    """profile_step runs on CPU (encoder passes, host split and cProfile; the device timeline needs CUDA),
    and its gap attribution charges each device gap to the innermost host phase running when it began."""
    from scripts.profile_step import idle_gaps

    run(
        ["scripts/profile_step.py", "--smoke", "--rows", "4", "--new-tokens", "4", "--out", str(tmp_path)],
        tmp_path,
    )
    report = json.loads((tmp_path / "profile.json").read_text())
    split = report["host_split"]
    assert split["steps"] > 4 and split["tokens_per_s"] > 0 and split["host_ms_per_step"] > 0
    passes = report["encoder_passes"]  # 8 sources for 4 rows; on CPU the engine's pass is the eager one
    assert [p["sources"] for p in passes] == [1, 2, 4, 8] and all(p["bucket"] is None for p in passes)
    assert all(p["engine_ms"] > 0 and p["eager_ms"] > 0 for p in passes)

    device = [(0, 100), (50, 120), (200, 300), (1300, 1400)]  # µs
    phases = [(90, 250, "engine.collect"), (100, 150, "engine.launch"), (500, 2000, "engine.encode")]
    t = idle_gaps(device, phases)
    assert t["idle_ms_by_host_phase"] == {"outside the engine": 1.0, "engine.launch": 0.08}
    assert abs(t["device_busy_ms"] - 0.32) < 1e-9 and t["span_ms"] == 1.4


def test_kernel_shares_of_the_critical_path_add_up_to_the_span(capsys):
    """Overlapping kernels (programmatic dependent launch) are charged only past the latest end before them,
    and a gap goes to the kernel after it, so the shares add up to first start to last end."""
    from scripts.profile_step import group_kernels, print_kernels

    spans = [("b", 5.0, 10.0), ("a", 0.0, 10.0), ("c", 20.0, 2.0), ("b", 21.0, 0.5)]  # (name, start, µs)
    table = {k["name"]: k for k in group_kernels(spans)}
    assert {n: (k["count"], k["us"], k["path_us"]) for n, k in table.items()} == {
        "a": (1, 10.0, 10.0), "b": (2, 10.5, 5.0), "c": (1, 2.0, 7.0)
    }  # fmt: skip
    assert [k["name"] for k in group_kernels(spans)] == ["a", "c", "b"]
    assert group_kernels([]) == []
    print_kernels(group_kernels(spans))
    assert "| c | 1 | 7.0 | 2.0 |" in capsys.readouterr().out.splitlines()


def test_profile_quantizes_the_random_checkpoint_it_profiles(tmp_path):
    """--quant profiles an RTN checkpoint of the random model (for the int8/int4 decode graphs' replays on a GPU;
    int4's groups of 128 inputs are wider than the tiny model)."""
    run(["scripts/profile_step.py", "--smoke", "--quant", "int8_wo", "--rows", "2", "--new-tokens", "2", "--out",
         str(tmp_path)], tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["quant_algo"] == "W8A16" and report["host_split"]["tokens_per_s"] > 0


def test_kernel_asm_compiles_the_attention_and_norm_kernels_for_hopper_without_a_gpu(tmp_path):
    """The decode step's other kernels compile for sm_90 as the runtime launches them (attention with its
    context split and its early reads, the norm-first LayerNorm) at one row and at 20, with PDL's wait, and
    no norm kernel is compiled where PyTorch's runs instead (`fused.TORCH_NORM_ROWS`)."""
    pytest.importorskip("triton")
    from serve.runtime import fused

    shapes = "self attention,cross attention,layer norm"
    rows = f"1,20,{fused.TORCH_NORM_ROWS[1]}"
    run(["scripts/kernel_asm.py", "--shapes", shapes, "--formats", "fp16,int8", "--rows", rows, "--out",
         str(tmp_path)], tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "kernel_asm.json").read_text())
    expected = {(s, r) for s in shapes.split(",") for r in (1, 20)} | {
        (s, fused.TORCH_NORM_ROWS[1]) for s in ("self attention", "cross attention")
    }
    assert {(r["shape"], r["rows"]) for r in report} == expected and {r["fmt"] for r in report} == {"fp16"}
    for r in report:
        assert 0 < r["registers"] <= 255 and r["spilled bytes"] == 0, r
        ptx = (tmp_path / f"{r['shape'].replace(' ', '_')}-fp16-{r['rows']}rows.ptx").read_text()
        assert ".target sm_90" in ptx and "griddepcontrol.wait" in ptx


def test_kernel_asm_compiles_every_row_variant_of_the_runtimes_linears_for_hopper_without_a_gpu(tmp_path):
    """A linear with a LayerNorm (QKV) and one without (the attention output), in every format, at one and
    four rows (register dot products, up to `fused.REGISTER_ROWS`) and at 20 (tl.dot tiles), compiled for
    sm_90 as `fused.linear_triton` would launch them: code that Triton's interpreter runs can still fail to
    compile for the GPU. Each report counts what the kernel does, the machine code after its wait and the
    registers it takes (one row spills none), and the PTX is Hopper's."""
    pytest.importorskip("triton")
    run(
        ["scripts/kernel_asm.py", "--shapes", "dense,qkv", "--formats", "fp16,int8,int4", "--rows", "1,4,20",
         "--out", str(tmp_path)],
        tmp_path,
    )  # fmt: skip
    report = json.loads((tmp_path / "kernel_asm.json").read_text())
    assert sorted((r["shape"], r["fmt"], r["rows"], r["arch"]) for r in report) == sorted(
        (shape, fmt, rows, 90)
        for shape in ("dense", "qkv")
        for fmt in ("fp16", "int8", "int4")
        for rows in (1, 4, 20)
    )
    for r in report:
        assert r["global loads"] and r["barriers"] > 0 and r["layout conversions"] >= 0
        assert 0 < r["registers"] <= 255 and r["spilled bytes"] >= 0  # read from the cubin
        if r["rows"] == 1:  # the batch-1 step's kernels keep everything in registers
            assert r["spilled bytes"] == 0, r
        ptx = (tmp_path / f"{r['shape']}-{r['fmt']}-{r['rows']}rows.ptx").read_text()
        assert ".target sm_90" in ptx and "griddepcontrol.wait" in ptx  # compiled with PDL's wait
        sass = (tmp_path / f"{r['shape']}-{r['fmt']}-{r['rows']}rows.sass").read_text()
        assert "ACQBULK" in sass and 0 < r["after the wait"] < sass.count(";")  # the wait, found in SASS


def test_kernel_asm_counts_spills_in_the_stack_frame_as_spilled():
    """ptxas puts a Triton kernel's spills in its stack frame, not in local memory: both count. (In a
    subprocess: importing kernel_asm turns Triton's interpreter off for the process.)"""
    pytest.importorskip("triton")
    usage = "Function _linear_kernel:\n  REG:32 STACK:3512 SHARED:1024 LOCAL:8 CONSTANT[0]:696 TEXTURE:0\n"
    code = (
        "from scripts import kernel_asm\n"
        f"kernel_asm.cuobjdump = lambda cubin, flag: {usage!r}\n"
        "print(kernel_asm.resources(b''))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "{'registers': 32, 'spilled bytes': 3520}"
