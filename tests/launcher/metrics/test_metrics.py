"""launcher.metrics: metrics.jsonl rows, resume truncation, TensorBoard, throughput / MFU arithmetic, device peaks."""

import json
import math
import sys
import warnings

import pytest
import torch

from data_pipeline import files
from launcher.metrics import logger as metrics
from launcher.metrics import throughput
from launcher.metrics.logger import MetricsLogger, read_metrics
from launcher.metrics.memory import memory_stats
from launcher.metrics.peaks import device_peak_flops, lookup_peak_flops
from launcher.metrics.throughput import ThroughputMeter


def lines_of(path):
    return path.read_text().splitlines()


def test_rows_are_strict_json_with_nonfinite_values(tmp_path):
    with MetricsLogger(tmp_path, is_main=True, total_steps=10, tensorboard=False, progress=False) as logger:
        logger.log(
            1,
            loss=torch.tensor(2.5),
            lr=1e-3,
            grad_norm=float("nan"),
            scale=float("inf"),
            low=float("-inf"),
            skipped=False,
            note="warmup",
            count=3,
        )
        logger.log(2, loss=float("nan"))
    rows = [json.loads(line, parse_constant=pytest.fail) for line in lines_of(tmp_path / "metrics.jsonl")]
    assert rows[0]["kind"] == "train" and rows[0]["step"] == 1 and isinstance(rows[0]["time"], float)
    assert rows[0]["loss"] == 2.5 and rows[0]["lr"] == 1e-3 and rows[0]["count"] == 3
    assert (rows[0]["grad_norm"], rows[0]["scale"], rows[0]["low"]) == ("nan", "inf", "-inf")
    assert rows[0]["skipped"] is False and rows[0]["note"] == "warmup"
    assert rows[1] == {"kind": "train", "step": 2, "time": rows[1]["time"], "loss": "nan"}
    back = read_metrics(tmp_path)
    assert math.isnan(back[0]["grad_norm"]) and back[0]["scale"] == math.inf and back[0]["low"] == -math.inf


def test_eval_and_whitebox_rows(tmp_path):
    layers = [
        {"layer": 0, "rc": 1.5, "rc_per_head": [0.5, 1.0], "hoyer": 0.2},
        {"layer": 1, "rc": 1.25, "rc_per_head": [0.75, 0.5], "hoyer": float("nan")},
    ]
    with MetricsLogger(tmp_path, True, 10, tensorboard=False, progress=False) as logger:
        logger.log(5, loss=3.0)
        logger.log_eval(5, loss=2.75, perplexity=15.6)
        logger.log_whitebox(5, layers)
        logger.log_whitebox(6, [{"rc": 9.0}])  # no "layer": its index
    rows = read_metrics(tmp_path)
    assert [row["kind"] for row in rows] == ["train", "eval", "whitebox", "whitebox", "whitebox"]
    assert rows[1]["loss"] == 2.75 and rows[1]["perplexity"] == 15.6
    white = read_metrics(tmp_path, kind="whitebox")
    assert [(row["step"], row["layer"]) for row in white] == [(5, 0), (5, 1), (6, 0)]
    assert white[1]["rc_per_head"] == [0.75, 0.5] and math.isnan(white[1]["hoyer"])


def test_reserved_names_are_refused(tmp_path):
    with (
        MetricsLogger(tmp_path, True, 10, tensorboard=False, progress=False) as logger,
        pytest.raises(ValueError, match="reserved"),
    ):
        logger.log(1, kind="x")


def test_truncate_after_keeps_rows_up_to_step_atomically(tmp_path):
    with MetricsLogger(tmp_path, True, 10, tensorboard=False, progress=False) as logger:
        for step in range(1, 9):
            logger.log(step, loss=float(step))
        logger.log_eval(4, loss=0.5)
        logger.log_eval(8, loss=0.25)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "step": 9, "lo')  # a write cut by a crash
    with MetricsLogger(tmp_path, True, 10, tensorboard=False, progress=False) as logger:
        assert logger.truncate_after(4) == 6  # steps 5..8, eval at 8, the partial line
        logger.log(5, loss=50.0)  # appends after the kept rows
    rows = read_metrics(tmp_path)
    assert [(row["kind"], row["step"]) for row in rows] == [("train", s) for s in range(1, 5)] + [
        ("eval", 4),
        ("train", 5),
    ]
    assert rows[-1]["loss"] == 50.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_truncate_after_failure_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    with MetricsLogger(tmp_path, True, 10, tensorboard=False, progress=False) as logger:
        for step in range(1, 4):
            logger.log(step, loss=1.0)
        before = (tmp_path / "metrics.jsonl").read_text()

        def broken_replace(*args):
            raise OSError("disk gone")

        monkeypatch.setattr(files.os, "replace", broken_replace)  # the rename of atomic_write
        with pytest.raises(OSError, match="disk gone"):
            logger.truncate_after(1)
        monkeypatch.undo()
        assert (tmp_path / "metrics.jsonl").read_text() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
        logger.log(4, loss=1.0)  # still usable
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    logger = MetricsLogger(out, is_main=False, total_steps=10, progress="lines")
    logger.log(1, loss=1.0, tokens_per_s=10.0)
    logger.log_eval(1, loss=1.0)
    logger.log_whitebox(1, [{"rc": 1.0}])
    assert logger.truncate_after(0) == 0
    logger.close()
    assert not out.exists()
    assert capsys.readouterr().err == ""


def test_tensorboard_scalars_read_back_and_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, True, 10, progress=False) as logger:
        for step in range(1, 7):
            logger.log(step, loss=float(step), note="text is skipped")
            logger.log_whitebox(step, [{"layer": 0, "rc": 2.0 * step, "rc_per_head": [1.0, 1.0]}])
        logger.log_eval(6, loss=0.5)
    with MetricsLogger(tmp_path, True, 10, progress=False) as logger:  # resume from step 4
        logger.truncate_after(4)
        logger.log(5, loss=50.0)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "eval/loss", "whitebox/rc/layer_0"} <= set(tags) and "train/note" not in tags
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 50.0),
    ]
    # everything after the resumed step is purged, whatever its tag
    assert [(e.step, e.value) for e in events.Scalars("whitebox/rc/layer_0")] == [(s, 2.0 * s) for s in range(1, 5)]
    assert events.Scalars("eval/loss") == []


def test_missing_tensorboard_warns_once_and_continues(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(metrics, "_warned_no_tensorboard", False)
    logger = MetricsLogger(tmp_path, True, 10, progress=False)
    with pytest.warns(RuntimeWarning, match="TensorBoard"):
        logger.log(1, loss=1.0)
    logger.log(2, loss=1.0)
    logger.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with MetricsLogger(tmp_path / "b", True, 10, progress=False) as logger:
            logger.log(1, loss=1.0)
    assert len(read_metrics(tmp_path)) == 2 and not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize("progress", ["lines", "bar"])
def test_progress_line(tmp_path, capsys, progress):
    with MetricsLogger(tmp_path, True, 100, tensorboard=False, progress=progress) as logger:
        logger.log(10, loss=3.14159, tokens_per_s=12345.0, mfu=0.4123, eta_s=3725.0)
    err = capsys.readouterr().err
    for text in ("3.1416", "12.35k", "41.2%", "1:02:05"):
        assert text in err
    assert "10/100" in err


def test_bad_records_in_the_progress_line_and_warnings_on_the_console_without_progress(tmp_path, capsys):
    bad = {"total": 2, "by_reason": {"invalid_json": 2}, "by_source": {"a.jsonl": 2}, "first": ["a.jsonl: line 3"]}
    with MetricsLogger(tmp_path, True, 100, tensorboard=False, progress="lines") as logger:
        logger.log(10, loss=1.0, bad_records=bad)
    assert "step 10/100 | loss 1.0000 | bad 2" in capsys.readouterr().err
    with MetricsLogger(tmp_path, True, 100, tensorboard=False, progress=False) as logger:
        logger.warn(10, "2 bad records skipped so far")
    assert capsys.readouterr().err == "step 10 warning: 2 bad records skipped so far\n"
    rows = read_metrics(tmp_path)
    assert rows[0]["bad_records"] == bad and {k: v for k, v in rows[1].items() if k != "time"} == {
        "kind": "train",
        "step": 10,
        "event": "warning",
        "message": "2 bad records skipped so far",
    }


def test_throughput_meter_arithmetic():
    meter = ThroughputMeter(
        tokens_per_step=4096, flops_per_token=1e6, peak_flops=1e10, world_size=4, total_steps=100, window=3
    )
    assert meter.stats(0) == {"tokens": 0}
    for seconds in (9.0, 0.5, 0.5, 0.5):  # the window keeps the last three
        meter.record(seconds)
    stats = meter.stats(10)
    assert stats["step_time_s"] == pytest.approx(0.5)
    assert stats["tokens_per_s"] == pytest.approx(4096 / 0.5)
    assert stats["tokens_per_s_per_device"] == pytest.approx(4096 / 0.5 / 4)
    # MFU = model FLOPs of a step / (step time x peak of all devices)
    assert stats["mfu"] == pytest.approx(1e6 * 4096 / (0.5 * 1e10 * 4))
    assert stats["eta_s"] == pytest.approx(90 * 0.5)
    assert stats["tokens"] == 10 * 4096
    meter.record(3.0, steps=2)  # an interval of two steps
    assert meter.step_time == pytest.approx((0.5 + 0.5 + 3.0) / 4)
    assert "mfu" not in ThroughputMeter(1, 1.0).stats(1) and "eta_s" not in ThroughputMeter(1, 1.0).stats(1)


def test_throughput_meter_tick_skips_the_first_interval(monkeypatch):
    clock = iter([100.0, 102.0, 103.0, 200.0, 201.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = ThroughputMeter(10, 1.0, total_steps=5)
    assert meter.tick() is None  # starts the clock
    assert meter.tick() == 2.0 and meter.tick() == 1.0
    meter.restart()  # e.g. after eval: the gap 103 -> 200 is not counted
    assert meter.tick() is None and meter.tick() == 1.0
    assert meter.step_time == pytest.approx(4.0 / 3)


def test_device_peak_flops_measured_on_cpu():
    flops, source = device_peak_flops(torch.device("cpu"), torch.float32, repeats=2)
    assert flops > 1e8 and source.startswith("measured: ") and "fp32 GEMM" in source


@pytest.mark.parametrize(
    "name, dtype, tf32, expected",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, (989.4e12, "table:H100 SXM bf16")),
        ("NVIDIA H100 PCIe", torch.bfloat16, False, (756.5e12, "table:H100 PCIe bf16")),
        ("NVIDIA H100 NVL", "fp16", False, (835.5e12, "table:H100 NVL fp16")),
        ("NVIDIA H200", torch.bfloat16, False, (989.4e12, "table:H200 SXM bf16")),
        ("NVIDIA GH200 480GB", torch.bfloat16, False, (989.4e12, "table:GH200 bf16")),
        ("NVIDIA A100-SXM4-80GB", torch.float32, True, (156e12, "table:A100 tf32")),
        ("NVIDIA A100 80GB PCIe", torch.float32, False, (19.5e12, "table:A100 fp32")),
        ("NVIDIA A10G", torch.bfloat16, False, (70e12, "table:A10G bf16")),
        ("NVIDIA A10", torch.bfloat16, False, (125e12, "table:A10 bf16")),
        ("NVIDIA L4", torch.bfloat16, False, (121e12, "table:L4 bf16")),
        ("NVIDIA L40S", torch.bfloat16, False, (362.05e12, "table:L40S bf16")),
        ("Tesla V100-SXM2-32GB", torch.float16, False, (125e12, "table:V100 SXM2 fp16")),
        ("Tesla V100-PCIE-16GB", torch.float32, True, (14e12, "table:V100 PCIe fp32")),  # no TF32 on Volta
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, (165.2e12, "table:RTX 4090 bf16")),
    ],
)
def test_peak_table_lookup(name, dtype, tf32, expected):
    flops, source = lookup_peak_flops(name, dtype, tf32=tf32)
    assert flops == pytest.approx(expected[0]) and source == expected[1]


def test_peak_table_misses():
    assert lookup_peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 on Volta: measured
    assert lookup_peak_flops("Some Future GPU", torch.bfloat16) is None
    with pytest.raises(ValueError, match="dtype"):
        lookup_peak_flops("NVIDIA H100", torch.int8)


def test_memory_stats_on_cpu():
    stats = memory_stats(torch.device("cpu"))
    assert stats["mem_rss_gib"] > 0
    assert stats.get("mem_max_rss_gib", stats["mem_rss_gib"]) >= stats["mem_rss_gib"] * 0.5
