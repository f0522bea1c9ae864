"""The benchmark machinery on tiny models at 16 tokens: table, JSON, PNG, ratios from the same run, bars, profile.
No timing assertions: the machine is shared."""

import json

import pytest

from ssmdiff import bench


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--models", "DiS-T/2", "--tokens", "16", "--dtype", "fp32", "--batch", "2", "--repeats", "2",
                     "--warmup", "0", "--budget", "5", "--matmul-seconds", "0.2", "--num-classes", "10", "--no-isolate", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "models.json").read_text())


def test_outputs_and_rows(tiny_run, capsys):
    out, result = tiny_run
    rows = {r["model"]: r for r in result["rows"]}
    # The DiT pair is added automatically and both are measured in the same run.
    assert set(rows) == {"DiS-T/2", "DiT-T/2"}
    for r in rows.values():
        assert r["status"] == "ok"
        assert r["tokens"] == 16 and r["input_size"] == 8 and r["batch"] == 2 and r["dtype"] == "fp32"
        assert 1 <= len(r["train_times_s"]) <= 2
        assert r["train_ips"] == pytest.approx(2 / r["train_step_s"])
        assert r["sample_ips"] == pytest.approx(2 / r["sample_step_s"])
        assert r["gflops"] > 0 and r["params"] > 0
        # MFU: real flops (2 x multiply-adds) x 3 for forward + backward, over the rate measured in this run.
        rate = result["matmul_flops"]["fp32"]
        assert r["train_mfu"] == pytest.approx(6 * r["gflops"] * 1e9 * 2 / r["train_step_s"] / rate)
        assert r["train_extra_mb"] is None or r["train_extra_mb"] >= 0
    # The mixers see the extra (time, class) tokens: longer than the 16 image tokens.
    assert rows["DiS-T/2"]["mixer_len"] == 18
    dis, dit = rows["DiS-T/2"], rows["DiT-T/2"]
    assert dis["baseline"] == "DiT-T/2" and "train_speed_ratio" not in dit
    assert dis["train_speed_ratio"] == pytest.approx(dis["train_ips"] / dit["train_ips"])
    assert dis["sample_speed_ratio"] == pytest.approx(dis["sample_ips"] / dit["sample_ips"])
    assert dis["gflops_ratio"] == pytest.approx(dis["gflops"] / dit["gflops"])
    assert (out / "models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = bench.format_table(result)
    assert "DiS-T/2" in table and "DiT-T/2" in table and f"{dis['train_speed_ratio']:.2f}" in table


def test_token_and_spec_helpers():
    assert bench.input_size_for("DiS-S/2", 1024) == 64
    assert bench.input_size_for("DiffuSSM-S", 1024) == 32  # no patchify: every latent cell is a token
    assert [bench.default_batch(n) for n in (256, 1024, 4096)] == [16, 4, 1]
    assert bench.baseline_for("DiffuSSM-S") == "DiT-S/2"
    assert bench.baseline_for("DiS-B/2") == "DiT-B/2"
    assert bench.baseline_for("DiT-S/2") is None
    assert bench.parse_model_spec("DiS-S/2:mixer=mamba2,d_state=32") == ("DiS-S/2", {"mixer": "mamba2", "d_state": 32})
    with pytest.raises(ValueError, match="perfect square"):
        bench.input_size_for("DiS-S/2", 1000)
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_model_spec("DiS-S/2:mamba2")
    with pytest.raises(ValueError, match="unknown model"):
        bench.run_model_benchmark(["DiS-Q/2"], [16], ["fp32"], isolate=False)


def test_bad_cli_input_exits_cleanly(tmp_path, capsys):
    assert bench.main(["--models", "NotAModel", "--tokens", "16", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    # A bad override fails before anything is measured (it used to fail after its DiT pair had been timed).
    for spec, message in (("DiS-T/2:mixer=foo", "unknown mixer 'foo'"), ("DiS-T/2:depth=x", "wrong type"),
                          ("DiS-T/2:compile=maybe", "compile must be true or false")):
        assert bench.main(["--models", spec, "--tokens", "16", "--no-isolate", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr()
        assert message in err.err and "DiT-T/2" not in err.out, (spec, err)
    for flag, value in (("--batch", "0"), ("--threads", "-2"), ("--budget", "nan"), ("--matmul-seconds", "0"),
                        ("--warmup", "-1"), ("--num-classes", "-1"), ("--rounds", "0"), ("--tokens", "x")):
        with pytest.raises(SystemExit) as e:
            bench.main([flag, value, "--out", str(tmp_path)])
        assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threads"):
        bench.run_model_benchmark(["DiT-T/2"], [16], ["fp32"], threads=-2, isolate=False)


def _row(model, tokens, dtype, train, sample, gflops, extra_mb, batch=1):
    family = model.split("-")[0]
    return {"model": model, "name": model, "family": family, "overrides": {}, "tokens": tokens, "dtype": dtype,
            "status": "ok", "train_ips": train, "sample_ips": sample, "gflops": gflops, "batch": batch,
            "train_extra_mb": extra_mb, "train_mfu": 0.1,
            "baseline": None if family == "DiT" else "DiT-S/2"}


def test_speed_bar_needs_the_median_step_too():
    """A fastest step that beats DiT while the median step does not (a lucky stochastic-depth draw) is parity, not
    the bar met; both ratios are recorded."""
    dit = dict(_row("DiT-S/2", 1024, "bf16", 1.0, 4.0, 30.0, 100.0, batch=4), train_median_s=4.0, sample_median_s=1.0)
    dis = dict(_row("DiS-S/2", 1024, "bf16", 1.06, 4.4, 32.0, 100.0, batch=4), train_median_s=4.04,
               sample_median_s=0.9)
    bars = bench.check_bars([dit, dis])
    train, sample = bars["DiS-S/2 train @1024 >= 1x DiT-S/2"], bars["DiS-S/2 sample @1024 >= 1x DiT-S/2"]
    assert train["ratio"] == pytest.approx(1.06) and train["ratio_median"] == pytest.approx(4.0 / 4.04)
    assert not train["met"]
    assert sample["ratio_median"] == pytest.approx(1.0 / 0.9) and sample["met"]


def test_bars_from_rows():
    rows = [
        _row("DiT-S/2", 1024, "fp32", 1.0, 4.0, 30.0, 100.0),
        _row("DiS-S/2", 1024, "fp32", 1.5, 3.0, 32.0, 100.0),
        _row("DiS-S/2", 1024, "bf16", 0.5, 5.0, 32.0, 100.0),  # the fastest dtype counts, per phase
        _row("DiT-S/2", 4096, "fp32", 0.2, 1.0, 240.0, 400.0),
        _row("DiS-S/2", 4096, "fp32", 0.3, 3.0, 130.0, 900.0),
        _row("DiM-S/2", 256, "fp32", 9.0, 9.0, 16.0, 10.0),  # below 1024 tokens: no speed bar
        _row("DiT-S/2", 256, "fp32", 1.0, 1.0, 6.0, 10.0),
    ]
    bars = bench.check_bars(rows)
    train = bars["DiS-S/2 train @1024 >= 1x DiT-S/2"]
    assert train["ratio"] == pytest.approx(1.5) and train["met"] and train["gflops_ratio"] == pytest.approx(32 / 30)
    assert bars["DiS-S/2 sample @1024 >= 1x DiT-S/2"]["ratio"] == pytest.approx(1.25)
    # At 4096 the bar is 2x the matched pair: 1.5x train is not enough, 3x sample is.
    assert not bars["DiS-S/2 train @4096 >= 2x DiT-S/2"]["met"]
    assert bars["DiS-S/2 sample @4096 >= 2x DiT-S/2"]["met"]
    assert bars["DiS-S/2 sample @4096 >= 2x DiT-S/2"]["gflops_ratio"] == pytest.approx(130 / 240)
    assert not any("@256" in k for k in bars)
    assert "ratio_median" not in train  # rows without median step times: judged by the fastest step alone
    # 900/100 MB for 4x the tokens: 2.25x worse than linear.
    mem = bars["DiS-S/2 fp32 memory linear in tokens"]
    assert mem["growth_vs_linear"] == pytest.approx(2.25) and not mem["met"] and mem["basis"] == "batch 1"
    # Rows of one batch at several lengths take precedence: memory vs length at a fixed batch.
    same = [_row("DiffuSSM-S", 1024, "fp32", 1, 1, 14.0, 100.0, batch=1),
            _row("DiffuSSM-S", 4096, "fp32", 1, 1, 57.0, 420.0, batch=1),
            _row("DiffuSSM-S", 256, "fp32", 1, 1, 3.5, 400.0, batch=16)]
    mem = bench.check_bars(same)["DiffuSSM-S fp32 memory linear in tokens"]
    assert mem["basis"] == "batch 1" and mem["growth_vs_linear"] == pytest.approx(1.05) and mem["met"]
    # The grid's batch shrinks as tokens grow (4 at 1024, 1 at 4096): per image, a part that does not grow with the
    # batch reads superlinear; a memory probe at batch 1 puts both token counts on one batch.
    grid = [_row("DiffuSSM-S", 1024, "fp32", 1, 1, 14.0, 400.0, batch=4),
            _row("DiffuSSM-S", 4096, "fp32", 1, 1, 57.0, 600.0, batch=1)]
    mem = bench.check_bars(grid)["DiffuSSM-S fp32 memory linear in tokens"]
    assert mem["basis"] == "per image" and mem["growth_vs_linear"] == pytest.approx(1.5) and not mem["met"]
    grid[0]["memory_probe"] = {"batch": 1, "train_extra_mb": 200.0, "train_peak_mb": 300.0}
    mem = bench.check_bars(grid)["DiffuSSM-S fp32 memory linear in tokens"]
    assert mem["basis"] == "batch 1" and mem["growth_vs_linear"] == pytest.approx(0.75) and mem["met"]
    grid[0]["memory_probe"] = {"batch": 1, "status": "failed", "reason": "out of memory"}  # a failed probe: per image
    assert bench.check_bars(grid)["DiffuSSM-S fp32 memory linear in tokens"]["basis"] == "per image"
    ratios = bench.compute_ratios([dict(r) for r in rows])
    dis = next(r for r in ratios if r["model"] == "DiS-S/2" and r["tokens"] == 4096)
    assert dis["train_speed_ratio"] == pytest.approx(1.5)
    assert dis["train_memory_ratio"] == pytest.approx(900 / 400)
    assert dis["gflops_ratio"] == pytest.approx(130 / 240)


def test_profile_summary():
    table, summary = bench.profile_training_step("DiT-T/2", tokens=16, dtype="fp32", batch=2, num_classes=10,
                                                 row_limit=5, warmup=0)
    assert "Self CPU" in table
    assert len(summary["top"]) == 5
    assert summary["self_cpu_s_total"] == pytest.approx(sum(summary["categories"].values()))
    assert "matmul" in summary["categories"]
    assert summary["plain_step_s"] > 0 and "without)" in bench._print_profile(summary, table)
    # Products by shape: DiT-T/2's qkv projection (batch 2 x 16 tokens = 32 rows, width 128 -> 384, DiT conditions
    # through adaLN, not a token) among them, with its flops counted from the shapes.
    products = summary["products"]
    assert products and all(r["gflops_per_s"] > 0 and r["calls"] >= 1 for r in products)
    assert any(r["op"] == "addmm" and "(32, 128) x (128, 384)" in r["shapes"] for r in products), products
    assert "matrix products by shape" in bench._print_profile(summary, table)


def test_product_flops_from_shapes():
    assert bench._product_flops("aten::mm", [[4, 8], [8, 3]]) == 2 * 4 * 8 * 3
    assert bench._product_flops("aten::addmm", [[3], [4, 8], [8, 3], [], []]) == 2 * 4 * 8 * 3
    assert bench._product_flops("aten::bmm", [[2, 4, 8], [2, 8, 3]]) == 2 * 2 * 4 * 8 * 3
    assert bench._product_flops("aten::baddbmm", [[2, 4, 3], [2, 4, 8], [2, 8, 3], [], []]) == 2 * 2 * 4 * 8 * 3
    assert bench._product_flops("aten::mm", [[]]) is None
    assert bench._product_flops("aten::add", [[4], [4]]) is None


def test_compile_flag_compiles_every_model_in_warmup(monkeypatch):
    import torch

    compiled = []

    def fake_compile(model, **kw):  # records the call; inductor itself is too slow for the default suite
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = bench.run_model_benchmark(["DiS-T/2"], [16], ["fp32"], batch=2, num_classes=10, warmup=1, repeats=1,
                                       budget_s=5, isolate=False, matmul_seconds=0.1, compile=True,
                                       progress=lambda *_: None)
    assert sorted(compiled) == ["DiS", "DiT"] and result["environment"]["compile"] is True
    assert all(r["status"] == "ok" for r in result["rows"])
    with pytest.raises(ValueError, match="warmup"):
        bench.run_model_benchmark(["DiT-T/2"], [16], ["fp32"], warmup=0, compile=True, isolate=False,
                                  matmul_seconds=0.1, progress=lambda *_: None)
    assert bench.build_parser().parse_args(["--compile"]).compile is True

    # compile=true in a spec compiles that configuration only; the bars take the DiT pair's fastest run option
    compiled.clear()
    result = bench.run_model_benchmark(["DiS-T/2:compile=true", "DiT-T/2:compile=true"], [1024], ["fp32"], batch=1,
                                       num_classes=10, warmup=1, repeats=1, budget_s=30, isolate=False,
                                       matmul_seconds=0.1, progress=lambda *_: None)
    assert sorted(compiled) == ["DiS", "DiT"] and result["environment"]["compile"] is False
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"DiT-T/2", "DiT-T/2:compile=True", "DiS-T/2:compile=True"}
    assert all(r["status"] == "ok" for r in rows.values())
    fastest_dit = max(("DiT-T/2", "DiT-T/2:compile=True"), key=lambda m: rows[m]["train_ips"])
    bar = result["bars"]["DiS-T/2 train @1024 >= 1x DiT-T/2"]
    assert bar["dit"] == f"{fastest_dit} fp32" and bar["ssm"] == "DiS-T/2:compile=True fp32"


def test_profile_takes_constructor_overrides():
    _, summary = bench.profile_training_step("DiS-T/2", tokens=16, dtype="fp32", batch=1, num_classes=0,
                                             row_limit=200, warmup=0, overrides={"mixer": "mamba2"})
    assert summary["model"] == "DiS-T/2:mixer=mamba2"
    ops = [op for op, _, _ in summary["top"]]
    assert any("ssd" in op for op in ops) and not any("selective_scan" in op for op in ops), ops  # Mamba-2 ran
    with pytest.raises(ValueError, match="allowed overrides"):
        bench.profile_training_step("DiS-T/2", tokens=16, dtype="fp32", batch=1, overrides={"foo": 1})


def test_isolated_run_measures_sampling_memory_above_live_memory():
    """In a fresh subprocess, the sampling forward's extra peak memory is measured after the training step's freed
    memory has been returned (it used to read ~0 MB above a resident set still holding the step's activations)."""
    cfg = {"name": "DiS-T/2", "overrides": {}, "tokens": 256, "batch": 4, "dtype": "fp32", "device": "cpu",
           "num_classes": 10, "warmup": 0, "repeats": 1, "budget_s": 30.0, "threads": 1}
    row = bench._run_isolated(cfg, timeout_s=120)
    assert row["sample_extra_mb"] > 0.5, row
    assert row["train_extra_mb"] > row["sample_extra_mb"]


def test_rounds_keep_every_step_and_report_the_fastest(tmp_path):
    result = bench.run_model_benchmark(["DiT-T/2"], [16], ["fp32"], batch=2, num_classes=10, warmup=0, repeats=2,
                                       budget_s=5, isolate=False, matmul_seconds=0.1, rounds=2,
                                       progress=lambda *_: None)
    (row,) = result["rows"]
    assert row["status"] == "ok" and len(row["train_times_s"]) == 4 and len(row["sample_times_s"]) == 4
    assert row["train_step_s"] == min(row["train_times_s"]) and row["train_ips"] == pytest.approx(2 / row["train_step_s"])
    assert row["sample_step_s"] == min(row["sample_times_s"])
    assert result["settings"]["rounds"] == 2
    with pytest.raises(ValueError, match="rounds"):
        bench.run_model_benchmark(["DiT-T/2"], [16], ["fp32"], rounds=0, isolate=False)


def test_memory_probes_measure_larger_batches_again_at_the_smallest():
    """Rows of a model at token counts with different batches get a memory-only training step and sampling forward
    at the smallest batch (rows already at that batch do not), and the memory bar and plot use that batch."""
    lines = []
    result = bench.run_model_benchmark(["DiS-T/2"], [16, 64], ["fp32"], num_classes=10, warmup=0, repeats=1,
                                       budget_s=5, isolate=False, matmul_seconds=0.1, progress=lines.append)
    rows = {(r["model"], r["tokens"]): r for r in result["rows"]}
    small, large = rows[("DiS-T/2", 16)], rows[("DiS-T/2", 64)]
    assert (small["batch"], large["batch"]) == (16, 16)  # the default batch: no probe needed
    assert "memory_probe" not in small and "memory_probe" not in large
    result = bench.run_model_benchmark(["DiS-T/2"], [256, 1024], ["fp32"], num_classes=10, warmup=0, repeats=1,
                                       budget_s=5, isolate=False, matmul_seconds=0.1, progress=lines.append)
    rows = {(r["model"], r["tokens"]): r for r in result["rows"]}
    small, large = rows[("DiS-T/2", 256)], rows[("DiS-T/2", 1024)]
    assert (small["batch"], large["batch"]) == (16, 4)
    probe = small["memory_probe"]
    assert probe["batch"] == 4 and probe["train_extra_mb"] > 0 and probe["sample_extra_mb"] > 0
    assert "memory_probe" not in large
    # DiT rows are probed too: the plot's memory panels put every model at one batch
    dit = {r["tokens"]: r for r in result["rows"] if r["family"] == "DiT"}
    assert dit[256]["memory_probe"]["batch"] == 4 and "memory_probe" not in dit[1024]
    assert any("memory probe: train extra" in line and "sample extra" in line for line in lines)
    assert result["bars"]["DiS-T/2 fp32 memory linear in tokens"]["basis"] == "batch 4"
    values, batches = bench.memory_at_one_batch(result["rows"], "sample_extra_mb")
    assert batches == {4} and values[id(small)] == probe["sample_extra_mb"]
    assert values[id(large)] == large["sample_extra_mb"]
    off = bench.run_model_benchmark(["DiS-T/2"], [256, 1024], ["fp32"], num_classes=10, warmup=0, repeats=1,
                                    budget_s=5, isolate=False, matmul_seconds=0.1, memory_probes=False,
                                    progress=lambda *_: None)
    assert not any("memory_probe" in r for r in off["rows"])
    assert bench.build_parser().parse_args(["--no-memory-probes"]).no_memory_probes is True


def _training_fails(monkeypatch):
    """Every training step raises, as a CUDA out-of-memory error does; sampling forwards still run."""
    import torch.nn.functional as F

    def oom(*args, **kwargs):
        raise RuntimeError("out of memory (test)\nsecond line")

    monkeypatch.setattr(F, "mse_loss", oom)


def test_failed_training_step_still_measures_sampling(monkeypatch, tmp_path):
    """A configuration whose training step fails is measured again for sampling alone: the row is "partial" with
    the reason, its training fields are None, sampling ratios and the table and plot still come out, and later
    rounds measure sampling alone too."""
    _training_fails(monkeypatch)
    lines = []
    result = bench.run_model_benchmark(["DiS-T/2"], [16], ["fp32"], batch=2, num_classes=10, warmup=0, repeats=2,
                                       budget_s=5, isolate=False, matmul_seconds=0.1, rounds=2, progress=lines.append)
    rows = {r["model"]: r for r in result["rows"]}
    dis, dit = rows["DiS-T/2"], rows["DiT-T/2"]
    for r in (dis, dit):
        assert r["status"] == "partial" and "out of memory (test)" in r["reason"] and "second line" not in r["reason"]
        assert r["train_ips"] is None and r["train_mfu"] is None and r["train_extra_mb"] is None
        assert len(r["sample_times_s"]) == 4 and r["sample_ips"] == pytest.approx(2 / min(r["sample_times_s"]))
        assert r["sample_mfu"] > 0
    assert dis["sample_speed_ratio"] == pytest.approx(dis["sample_ips"] / dit["sample_ips"])
    assert "train_speed_ratio" not in dis
    table = bench.format_table(result)
    assert "sampling alone (train columns '-')" in table and "DiS-T/2 16 tok fp32: training failed" in table
    assert any("sampling measured alone" in line for line in lines)
    assert bench.plot_results(result, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_partial_rows_count_for_the_sampling_bars_only():
    dit = _row("DiT-S/2", 1024, "bf16", 1.0, 4.0, 30.0, 100.0)
    dis = dict(_row("DiS-S/2", 1024, "bf16", None, 5.0, 32.0, None), status="partial", train_mfu=None,
               reason="training failed (out of memory); sampling measured alone")
    bars = bench.check_bars([dit, dis])
    assert bars["DiS-S/2 sample @1024 >= 1x DiT-S/2"]["ratio"] == pytest.approx(1.25)
    assert not any("train" in k or "memory" in k for k in bars)
    # a DiT pair that trained in another dtype still makes a training bar for the SSM rows that trained
    rows = [dit, dis, _row("DiS-S/2", 1024, "fp32", 2.0, 1.0, 32.0, 50.0)]
    assert bench.check_bars(rows)["DiS-S/2 train @1024 >= 1x DiT-S/2"]["ratio"] == pytest.approx(2.0)


def test_gpu_check_bar_from_a_partial_row(tmp_path, monkeypatch, benchmark_module):
    """gpu_check's DiM-H bar is about sampling: when training does not fit, the bench's partial row measures it."""
    _training_fails(monkeypatch)
    mod = benchmark_module("gpu_check")
    assert mod.main(["--device", "cpu", "--quick", "--stages", "dim-h", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]["dim-h"]["result"]
    assert result["bar"]["fp32_sample_ips"] > 0 and all(r["train_ips"] is None for r in result["rows"].values())
    assert len(result["not_ok"]) == 4 and all("partial: training failed" in x for x in result["not_ok"])


def test_table_warns_when_mfu_exceeds_100_percent(tiny_run):
    """An understated matmul rate (a busy machine during its loop) shows up as MFU above 100%: the table says so."""
    _, result = tiny_run
    assert "warning: MFU above 100%" not in bench.format_table(result) or any(
        max(r["train_mfu"], r["sample_mfu"]) > 1 for r in result["rows"])
    bad = json.loads(json.dumps(result))
    bad["rows"][0]["train_mfu"] = 1.3
    table = bench.format_table(bad)
    assert "warning: MFU above 100%" in table and bad["rows"][0]["model"] in table.split("warning:")[1]


def test_step_breakdown_benchmark(capsys, benchmark_module):
    """benchmarks/step.py: a plain step and the same step split by op (each compiled kernel one op), and AdamW's
    per-tensor loop against fused; bad sizes rejected."""
    from ssmdiff.ssm.ops import _scan_cpu

    mod = benchmark_module("step")
    plain, timed, ops = mod.step_breakdown("DiS-T/2", 16, 2, "fp32", warmup=1, num_classes=10)
    assert plain > 0 and timed > 0
    if _scan_cpu.available():
        assert ops["selective_scan_fwd"][0] == ops["selective_scan_bwd"][0] > 0
    assert any(k.startswith(("mm ", "addmm ", "bmm ")) and "float32" in k for k in ops)
    assert mod.main(["--model", "DiT-T/2", "--tokens", "16", "--batch", "2", "--top", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "training step" in out and "AdamW over" in out and "fused" in out
    # A spec with overrides, as `ssmdiff bench --models` takes it: the Mamba-2 mixer's own kernels appear.
    assert mod.main(["--model", "DiS-T/2:mixer=mamba2", "--tokens", "16", "--batch", "2", "--top", "40",
                     "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "DiS-T/2:mixer=mamba2, 16 tokens" in out
    if _scan_cpu.available():
        assert "ssd_scan_bwd" in out and "selective_scan_bwd" not in out
    # --sample: one sampling forward split by op, no backward and no optimizer comparison
    plain, _, ops = mod.step_breakdown("DiS-T/2", 16, 2, "fp32", warmup=1, num_classes=10, phase="sample")
    assert plain > 0 and not any("bwd" in k or "backward" in k for k in ops)
    if _scan_cpu.available():
        assert ops["selective_scan_fwd"][0] > 0
    assert mod.main(["--model", "DiS-T/2", "--tokens", "16", "--batch", "2", "--top", "3", "--sample"]) == 0
    out = capsys.readouterr().out
    assert "sampling forward" in out and "AdamW" not in out
    with pytest.raises(SystemExit):
        mod.main(["--sample", "--toggle", "ssmdiff.models.dis.SKIP_DROPPED_SAMPLES"])
    with pytest.raises(ValueError, match="phase"):
        mod.step_breakdown("DiS-T/2", 16, 2, "fp32", phase="eval")
    with pytest.raises(SystemExit):
        mod.main(["--tokens", "0"])
    with pytest.raises(SystemExit):
        mod.main(["--tokens", "15"])
    with pytest.raises(SystemExit):
        mod.main(["--model", "DiS-T/2:mixer"])
    # --toggle: steps alternate a module-level switch; each setting's times and the ratios; the switch is restored.
    import ssmdiff.models.dis as dis

    times = mod.toggle_steps("DiS-T/2", 16, 2, "fp32", "ssmdiff.models.dis.SKIP_DROPPED_SAMPLES", steps=2,
                             warmup=0, num_classes=10)
    assert len(times[True]) == len(times[False]) == 2 and min(times[True] + times[False]) > 0
    assert dis.SKIP_DROPPED_SAMPLES is True
    assert mod.main(["--model", "DiS-T/2", "--tokens", "16", "--batch", "2", "--steps", "1",
                     "--toggle", "ssmdiff.ssm.modules.mamba.FUSED_DIRECTION"]) == 0
    out = capsys.readouterr().out
    assert "off / on: median" in out and "AdamW" not in out
    for bad in ("SKIP_DROPPED_SAMPLES", "ssmdiff.models.nope.X", "ssmdiff.models.dis.DiS", "ssmdiff.models.dis.nope"):
        with pytest.raises(SystemExit):
            mod.main(["--tokens", "16", "--toggle", bad])
    err = capsys.readouterr().err
    assert "no on/off switch nope" in err and "cannot import ssmdiff.models.nope" in err


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys, benchmark_module):
    """benchmarks/gpu_check.py: its stages run end to end on tiny models (--device cpu --quick) and write one JSON
    report with the DiM bar against the third-party figure; asking for CUDA where there is none is one clear error."""
    mod = benchmark_module("gpu_check")
    assert mod.main(["--device", "cpu", "--quick", "--stages", "env", "scan", "dim-h", "grid", "--out",
                     str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"env", "scan", "dim-h", "grid"} and all(s["status"] == "ok" for s in stages.values())
    assert stages["env"]["result"]["scan_backend"] in ("cpu", "torch")
    scan = stages["scan"]["result"]["backends"]["torch"]
    assert scan["max_rel_diff_vs_torch"] == 0 and scan["forward_ms"] > 0 and scan["forward_backward_ms"] > 0
    bar = stages["dim-h"]["result"]["bar"]
    assert bar["model"] == "DiM-T/2" and bar["third_party_ips"] == 25.1 and bar["fp32_sample_ips"] > 0
    assert set(stages["dim-h"]["result"]["rows"]) == {"DiT-T/2 fp32", "DiT-T/2 bf16", "DiM-T/2 fp32", "DiM-T/2 bf16"}
    assert (tmp_path / "dim_h" / "models.json").exists() and (tmp_path / "grid" / "models.json").exists()
    assert "DiM-H bar: DiM-T/2 samples" in capsys.readouterr().out
    import torch

    if not torch.cuda.is_available():
        assert mod.main(["--out", str(tmp_path)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
