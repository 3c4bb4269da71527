"""One benchmark cell: run the product's own CLI as subprocesses and measure the result.

Per compressed cell: ``hfbconvert compress`` (wall time, CPU time and peak RSS of that
process alone, via ``wait4``), ``hfbconvert eval`` (top-1/top-5/agreement),
``hfbconvert export onnx`` (file bytes, onnxruntime check), then onnxruntime CPU latency
of the exported model against the original model's ONNX, interleaved in the same process
so that both see the same machine load. The int8 baseline is onnxruntime's own static
quantization of the original model's FP32 ONNX export.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cases import Method, ModelCase

EVAL_BATCH = 64
# calibration images for `export onnx --verify`: real ones, since random noise puts an int8
# model outside the activation ranges it was calibrated on (a correctness check only)
VERIFY_IMAGES = 64


# ------------------------------------------------------------------------ subprocesses


def hfb_prefix() -> list[str]:
    """The installed ``hfbconvert`` console script next to this interpreter, else
    ``python -m hfbconvert.cli`` (same code)."""
    script = Path(sys.executable).parent / "hfbconvert"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "hfbconvert.cli"]


@dataclass
class ProcResult:
    name: str
    command: str  # as a user would type it ("hfbconvert ...")
    rc: int | None  # None: killed on timeout
    wall_s: float
    cpu_s: float | None
    peak_rss_mb: float | None
    stdout: str
    stderr: str
    log: str = ""
    timed_out: bool = False
    json: dict | None = None
    json_error: str | None = None

    def ok(self) -> bool:
        return self.rc == 0 and self.json is not None

    def error(self) -> str:
        if self.timed_out:
            return f"{self.name}: timed out after {self.wall_s:.0f} s"
        if self.rc not in (0, None):
            lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
            tail = " | ".join(lines[-3:])[-400:] if lines else "(no stderr)"
            return f"{self.name}: exit {self.rc}: {tail}"
        if self.json is None:
            return f"{self.name}: no JSON on stdout ({self.json_error})"
        return ""

    def summary(self) -> dict:
        return {"name": self.name, "command": self.command, "rc": self.rc,
                "timed_out": self.timed_out, "wall_s": round(self.wall_s, 3),
                "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 3),
                "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
                "log": self.log}


def _tree_rss(proc) -> int:
    """RSS of a process and its children (bytes), 0 when it is gone."""
    import psutil

    try:
        total = proc.memory_info().rss
        for ch in proc.children(recursive=True):
            try:
                total += ch.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        p.kill()


def _wait(p: subprocess.Popen, ps, t0: float, timeout: float | None):
    """Wait for ``p``, polling its RSS; (wait status, rusage, polled peak, timed out)."""
    peak = 0
    while True:
        if hasattr(os, "wait4"):
            pid, st, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                return st, ru, peak, False
        elif p.poll() is not None:
            return None, None, peak, False
        peak = max(peak, _tree_rss(ps))
        if timeout is not None and time.perf_counter() - t0 > timeout:
            _kill(p)
            if hasattr(os, "wait4"):
                _, st, ru = os.wait4(p.pid, 0)
                return st, ru, peak, True
            p.wait()
            return None, None, peak, True
        time.sleep(0.1)


def run_cli(name: str, args: list[str], log_dir: Path, timeout: float | None = None,
            env: dict | None = None) -> ProcResult:
    """Run ``hfbconvert ARGS``; stdout parsed as JSON. Peak RSS and CPU time come from the
    kernel's accounting of this child alone (``os.wait4``), with psutil polling as a
    cross-check / fallback."""
    import psutil

    cmd = hfb_prefix() + [str(a) for a in args]
    shown = shlex.join(["hfbconvert", *[str(a) for a in args]])
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    t0 = time.perf_counter()
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True)
        ps = psutil.Process(p.pid)
        status = None
        try:
            status, rusage, peak, timed_out = _wait(p, ps, t0, timeout)
        except BaseException:  # Ctrl-C: the child runs in its own session, stop it too
            _kill(p)
            p.wait()
            raise
        if status is not None:
            p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    cpu = rss = None
    if rusage is not None:
        cpu = rusage.ru_utime + rusage.ru_stime
        # ru_maxrss is KiB on Linux, bytes on macOS
        rss_b = rusage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        rss = max(rss_b, peak) / 2**20
    elif peak:
        rss = peak / 2**20
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    res = ProcResult(name, shown, None if timed_out else p.returncode, wall, cpu, rss, stdout,
                     stderr, str(err_path), timed_out)
    if stdout.strip():
        try:
            res.json = json.loads(stdout)
        except json.JSONDecodeError as exc:
            res.json_error = str(exc)
    else:
        res.json_error = "stdout empty"
    return res


# ------------------------------------------------------------------------ onnxruntime


def ort_session(path: str | Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_pair(base, sess, resolution: int, repeats: tuple[int, int],
                 warmup: int = 3) -> dict:
    """Median onnxruntime latency (ms) of ``sess`` and of the baseline ``base`` at batch 1
    and 32, runs interleaved (alternating which goes first), and their ratio."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for batch, reps in ((1, repeats[0]), (32, repeats[1])):
        x = rng.standard_normal((batch, 3, resolution, resolution), dtype=np.float32)
        feeds = [{s.get_inputs()[0].name: x} for s in (base, sess)]
        for _ in range(warmup if batch == 1 else 1):
            base.run(None, feeds[0])
            sess.run(None, feeds[1])
        times: list[list[float]] = [[], []]
        for i in range(max(1, reps)):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for j in order:
                s = (base, sess)[j]
                t = time.perf_counter()
                s.run(None, feeds[j])
                times[j].append(time.perf_counter() - t)
        b_ms = statistics.median(times[0]) * 1e3
        m_ms = statistics.median(times[1]) * 1e3
        out[f"b{batch}"] = {"baseline_ms": round(b_ms, 3), "ms": round(m_ms, 3),
                            "ratio": round(m_ms / b_ms, 4) if b_ms > 0 else None,
                            "repeats": max(1, reps)}
    return out


def ort_logits(sess, images) -> np.ndarray:
    """Logits of an onnxruntime session over a CalibData (normalized per batch)."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x.numpy()})[0] for x, _ in images.batches(EVAL_BATCH)]
    return np.concatenate(outs, 0)


def accuracy(logits: np.ndarray, labels, label_offset: int,
             ref_logits: np.ndarray | None = None) -> dict:
    # stable: a tied top-1 (common with int8 logits) is the first index, as argmax and
    # the per-image bits count it
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    n = logits.shape[0]
    res: dict[str, Any] = {"n": n, "top1": None, "top5": None, "agreement": None}
    if labels is not None:
        y = labels.numpy().reshape(-1, 1) + label_offset
        res["top1"] = float((top5[:, :1] == y).sum() / n)
        res["top5"] = float((top5 == y).any(1).sum() / n)
    if ref_logits is not None:
        res["agreement"] = float((ref_logits.argmax(1) == top5[:, 0]).sum() / n)
    return res


# ------------------------------------------------------------------------ model context


@dataclass
class ModelContext:
    """What every cell of one model shares: resolved paths, the original's ONNX, its
    onnxruntime session and (lazily) its logits on the eval set."""

    case: ModelCase
    model: str
    calib: str
    eval_data: str
    work: Path
    threads: int
    repeats: tuple[int, int]
    keep: bool = False
    info: Any = None
    original_onnx: Path | None = None
    base_session: Any = None
    original_cost: dict | None = None
    _eval_images: Any = None
    _eval_logits: np.ndarray | None = None
    env: dict = field(default_factory=lambda: dict(os.environ))

    def load_info(self) -> None:
        from hfbconvert.costs import model_cost
        from hfbconvert.models.loading import load_model

        net, info = load_model(self.model)
        self.info = info
        self.original_cost = model_cost(net, info.resolution).totals()

    def eval_images(self):
        if self._eval_images is None:
            from hfbconvert.calib.presets import preset_for
            from hfbconvert.calib.readers import load_images

            # same subset and preprocessing as `hfbconvert eval --size N --seed 0`
            self._eval_images = load_images(self.eval_data, preset_for(self.info),
                                             size=self.case.eval_size, seed=0)
        return self._eval_images

    def eval_logits(self) -> np.ndarray:
        if self._eval_logits is None:
            self._eval_logits = ort_logits(self.base_session, self.eval_images())
        return self._eval_logits


def _eval_args(ctx: ModelContext, model_path: str) -> list[str]:
    # --per-image: correctness bits and predictions per image, so that two results files
    # can later be compared paired (bench/compare.py)
    args = ["eval", model_path, "--data", ctx.eval_data, "--json", "--per-image", "--seed", "0"]
    if ctx.case.eval_size:
        args += ["--data-size", str(ctx.case.eval_size)]
    return args


def _export_args(model_path: str, onnx_path: Path, calib: str) -> list[str]:
    return ["export", "onnx", model_path, "-o", str(onnx_path), "--force", "--json",
            "--no-report", "--calib", calib, "--calib-size", str(VERIFY_IMAGES), "--seed", "0"]


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(1.0, deadline - time.monotonic())


def _new_cell(ctx: ModelContext, method: Method) -> dict:
    return {"model": ctx.case.key, "method": method.key, "label": method.label,
            "family": method.family, "kind": method.kind, "status": "ok", "errors": [],
            "steps": []}


def _record(cell: dict, r: ProcResult) -> bool:
    cell["steps"].append(r.summary())
    if not r.ok():
        cell["errors"].append(r.error())
        cell["status"] = "failed"
        return False
    return True


def _eval_into(cell: dict, r: ProcResult) -> None:
    j = r.json or {}
    cell.update(top1=j.get("top1"), top5=j.get("top5"), agreement=j.get("agreement"),
                n_eval=j.get("n"))
    for k in ("top1_ci95", "agreement_ci95", "kl", "kl_ci95", "per_image"):
        if j.get(k) is not None:
            cell[k] = j[k]


def per_image_from_logits(logits: np.ndarray, data, label_offset: int,
                          ref_logits: np.ndarray | None = None) -> dict:
    """The per-image record `hfbconvert eval --per-image` writes, for a model evaluated
    here (onnxruntime int8): same images fingerprint, bits and predictions; with the
    original's logits on the same images also agreement bits and per-image KL."""
    import torch

    from hfbconvert.evaluation import PerImage, kl_per_image, per_image_record

    pred = logits.argmax(1).astype(np.int64)
    correct = None
    if data.labels is not None:
        correct = pred == data.labels.numpy().astype(np.int64) + label_offset
    ref_pred = kl = None
    if ref_logits is not None:
        ref_pred = ref_logits.argmax(1).astype(np.int64)
        kl = kl_per_image(torch.from_numpy(ref_logits), torch.from_numpy(logits)).numpy()
    return per_image_record(PerImage(pred=pred, correct=correct, ref_pred=ref_pred, kl=kl),
                            data)


def _verify_summary(v: dict | None) -> dict | None:
    """The headline of `export onnx --verify` (the per-image detail stays in the logs)."""
    if not v:
        return v
    return {k: v.get(k) for k in ("passed", "n_images", "max_abs_diff", "max_rel_diff",
                                  "agreement")}


def _cost_into(cell: dict, cost: dict) -> None:
    for k in ("muls", "adds", "params", "energy_pj", "energy_with_weight_reads_pj"):
        cell[k] = cost.get(k)
    cell["cost_bytes"] = cost.get("bytes")


def _latency_into(cell: dict, ctx: ModelContext, onnx_path: Path) -> None:
    try:
        sess = ort_session(onnx_path, ctx.threads)
        cell["latency"] = latency_pair(ctx.base_session, sess, ctx.info.resolution, ctx.repeats)
    except Exception as exc:  # onnxruntime raises its own types
        cell["errors"].append(f"latency: {type(exc).__name__}: {str(exc)[:300]}")
        cell["status"] = "failed"


# ------------------------------------------------------------------------ cells


def original_cell(ctx: ModelContext, method: Method, deadline: float | None) -> dict:
    """Eval + ONNX export of the unmodified model (the reference of every other cell)."""
    cell = _new_cell(ctx, method)
    logs = ctx.work / "logs" / ctx.case.key / method.key
    try:
        ctx.load_info()
        _cost_into(cell, ctx.original_cost)
    except Exception as exc:
        cell["errors"].append(f"load: {type(exc).__name__}: {exc}")
        cell["status"] = "failed"
        return cell
    onnx_path = ctx.work / ctx.case.key / "original.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    r = run_cli("export", _export_args(ctx.model, onnx_path, ctx.calib), logs,
                _remaining(deadline), ctx.env)
    if _record(cell, r):
        cell["onnx_bytes"] = (r.json.get("export") or {}).get("bytes")
        cell["verify"] = _verify_summary(r.json.get("verify"))
        ctx.original_onnx = onnx_path
        ctx.base_session = ort_session(onnx_path, ctx.threads)
        _latency_into(cell, ctx, onnx_path)  # original vs itself: the noise floor
    if not ctx.model.startswith("builtin:"):
        cell["pt_bytes"] = Path(ctx.model).stat().st_size
    r = run_cli("eval", _eval_args(ctx, ctx.model), logs, _remaining(deadline), ctx.env)
    if _record(cell, r):
        _eval_into(cell, r)
    return cell


def compress_cell(ctx: ModelContext, method: Method, deadline: float | None,
                  seed: int = 0) -> dict:
    cell = _new_cell(ctx, method)
    cell["seed"] = seed
    logs = ctx.work / "logs" / ctx.case.key / method.key
    out_dir = ctx.work / ctx.case.key / method.key
    out_dir.mkdir(parents=True, exist_ok=True)
    pt = out_dir / "model.hfb.pt"
    onnx_path = out_dir / "model.onnx"
    args = ["compress", ctx.model, "--calib", ctx.calib]
    if ctx.case.calib_size:
        args += ["--calib-size", str(ctx.case.calib_size)]
    args += [*method.args, "--steps", str(ctx.case.steps), "-o", str(pt), "--force", "--json",
             "--min-agreement", "0", "--seed", str(seed)]
    cell["steps_finetune"] = ctx.case.steps
    r = run_cli("compress", args, logs, _remaining(deadline), ctx.env)
    cell["convert_wall_s"] = round(r.wall_s, 2)
    cell["convert_cpu_s"] = None if r.cpu_s is None else round(r.cpu_s, 2)
    cell["convert_peak_rss_mb"] = None if r.peak_rss_mb is None else round(r.peak_rss_mb, 1)
    if not _record(cell, r):
        return cell
    j = r.json
    _cost_into(cell, j.get("cost") or {})
    cell["original_cost_from_cli"] = {k: (j.get("original_cost") or {}).get(k)
                                      for k in ("muls", "adds", "params", "bytes")}
    cell["compress_timings"] = j.get("timings")
    cell["stages"] = j.get("stages")
    # the fine-tune's held-apart curve, best step, revert and lr cuts: without them a cell
    # whose top-1 equals the fit's cannot say whether its fine-tune was thrown away
    cell["finetune"] = j.get("finetune")
    cell["pt_bytes"] = pt.stat().st_size if pt.exists() else None

    r = run_cli("eval", _eval_args(ctx, str(pt)), logs, _remaining(deadline), ctx.env)
    if _record(cell, r):
        _eval_into(cell, r)

    r = run_cli("export", _export_args(str(pt), onnx_path, ctx.calib), logs,
                _remaining(deadline), ctx.env)
    exported = _record(cell, r)
    if r.json:
        cell["onnx_bytes"] = (r.json.get("export") or {}).get("bytes")
        cell["onnx_custom_ops"] = (r.json.get("export") or {}).get("custom_ops")
        cell["verify"] = _verify_summary(r.json.get("verify"))
    if onnx_path.exists() and ctx.base_session is not None:
        if not exported:  # e.g. the verify check failed: still a runnable file
            cell["onnx_bytes"] = cell.get("onnx_bytes") or onnx_path.stat().st_size
        _latency_into(cell, ctx, onnx_path)
    if not ctx.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return cell


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed images."""

    def __init__(self, data, name: str, batch: int = 16) -> None:
        self._it = iter([{name: x.numpy()} for x, _ in data.batches(batch)])

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        pass


INT8_SETTINGS = {"quant_format": "QDQ", "per_channel": True, "calibrate_method": "MinMax",
                 "activation_type": "QInt8", "weight_type": "QInt8",
                 "pre_process": "onnxruntime.quantization.quant_pre_process"}


def int8_cell(ctx: ModelContext, method: Method, deadline: float | None) -> dict:
    """onnxruntime static int8 quantization of the original FP32 ONNX, evaluated with
    onnxruntime on the same eval images (agreement: against the FP32 ONNX)."""
    cell = _new_cell(ctx, method)
    cell["int8_settings"] = dict(INT8_SETTINGS, calib_images=ctx.case.int8_calib)
    if ctx.original_onnx is None or ctx.base_session is None:
        cell.update(status="failed", errors=["int8: no original ONNX export to quantize"])
        return cell
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from hfbconvert.calib.presets import preset_for
        from hfbconvert.calib.readers import load_images

        reader_cls = type("BenchReader", (_Reader, CalibrationDataReader), {})
        out_dir = ctx.work / ctx.case.key / method.key
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        calib = load_images(ctx.calib, preset_for(ctx.info), size=ctx.case.int8_calib, seed=0)
        src = out_dir / "prep.onnx"
        try:
            quant_pre_process(str(ctx.original_onnx), str(src))
        except Exception as exc:  # pre-processing is an optimisation; fall back to raw
            cell["int8_settings"]["pre_process"] = f"skipped ({type(exc).__name__})"
            src = ctx.original_onnx
        q_path = out_dir / "model.int8.onnx"
        name = ctx.base_session.get_inputs()[0].name
        quantize_static(str(src), str(q_path), reader_cls(calib, name),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        cell["convert_wall_s"] = round(time.perf_counter() - t0, 2)
        cell["onnx_bytes"] = q_path.stat().st_size
        sess = ort_session(q_path, ctx.threads)
        data = ctx.eval_images()
        q_logits = ort_logits(sess, data)
        acc = accuracy(q_logits, data.labels, ctx.info.label_offset, ctx.eval_logits())
        cell["per_image"] = per_image_from_logits(q_logits, data, ctx.info.label_offset,
                                                  ctx.eval_logits())
        ref = accuracy(ctx.eval_logits(), data.labels, ctx.info.label_offset)
        cell.update(top1=acc["top1"], top5=acc["top5"], agreement=acc["agreement"],
                    n_eval=acc["n"], fp32_onnx_top1=ref["top1"])
        cost = dict(ctx.original_cost or {})
        # same operation counts as the FP32 model, but 8-bit MULs and 32-bit accumulation
        from hfbconvert.costs import ENERGY_PJ

        cell.update(muls=cost.get("muls"), adds=cost.get("adds"), params=cost.get("params"),
                    cost_bytes=None, energy_pj=(cost.get("muls", 0) * ENERGY_PJ["int8_mul"]
                                                + cost.get("adds", 0) * ENERGY_PJ["int32_add"]),
                    energy_note="int8 MUL + int32 ADD (accumulate) constants")
        cell["latency"] = latency_pair(ctx.base_session, sess, ctx.info.resolution, ctx.repeats)
        if not ctx.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    except Exception as exc:
        cell["errors"].append(f"int8: {type(exc).__name__}: {str(exc)[:400]}")
        cell["status"] = "failed"
    return cell


def run_cell(ctx: ModelContext, method: Method, deadline: float | None,
             seed: int = 0) -> dict:
    """One cell; ``seed`` is the compressed cells' ``compress --seed`` (calibration sample,
    fit, fine-tune batches)."""
    t0 = time.perf_counter()
    try:
        if method.kind == "compress":
            cell = compress_cell(ctx, method, deadline, seed)
        else:
            cell = {"original": original_cell, "int8": int8_cell}[method.kind](
                ctx, method, deadline)
    except Exception as exc:  # a broken cell must never end the run
        cell = _new_cell(ctx, method)
        cell.update(status="failed", errors=[f"harness: {type(exc).__name__}: {exc}"])
    cell["cell_wall_s"] = round(time.perf_counter() - t0, 2)
    return cell
