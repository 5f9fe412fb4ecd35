"""ONNX Runtime execution providers and sessions.

onnxruntime-gpu lists TensorRT and CUDA as "available" whenever it was built with them, even on
a machine without a GPU; asking for them there logs a failed library load and falls back to CPU.
So the automatic choice first checks, quietly, that the libraries those providers need load.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from workers.errors import ModelLoadError, ProviderError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# TensorRT is opt-in (INFERQ_EXECUTION_PROVIDERS): with dynamic batch and sequence shapes it
# builds a new engine per shape range unless profiles and an engine cache are configured.
_GPU_ORDER = (CUDA,)

# ORT severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. Warnings on the CPU path
# (e.g. unused initializers removed by the optimizer) are noise for operators.
_LOG_ERRORS_ONLY = 3

# Counts devices in a child process: cuInit in this process would break CUDA in any worker
# process forked from it later.
_DEVICE_COUNT_SCRIPT = """
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
n = ctypes.c_int(0)
sys.exit(0 if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(n)) == 0
         and n.value > 0 else 1)
"""


def choose_providers(preference: tuple[str, ...] | None) -> list[str]:
    """Execution providers in priority order, always ending with the CPU provider.

    ``None`` picks CUDA only where its libraries load and a device exists (TensorRT is opt-in).
    An explicit preference is a demand: a provider that is unknown, not built into this
    onnxruntime, or unable to run here raises ProviderError instead of silently falling back.
    Names match case-insensitively, with or without the ``ExecutionProvider`` suffix.
    """
    available = ort.get_available_providers()
    if preference is None:
        chosen = [p for p in _GPU_ORDER if p in available and _unusable_reason(p) is None]
        return [*chosen, CPU]

    chosen = []
    for raw in preference:
        name = _canonical(raw)
        if name not in available:
            raise ProviderError(
                f"execution provider {name} is not built into the installed onnxruntime; "
                f"available: {', '.join(available)}"
            )
        if sys.platform.startswith("linux"):  # elsewhere, trust the operator
            reason = _unusable_reason(name)
            if reason is not None:
                raise ProviderError(f"execution provider {name} cannot run here: {reason}")
        if name not in chosen:
            chosen.append(name)
    if CPU not in chosen:
        chosen.append(CPU)  # ORT places unsupported nodes on CPU anyway; say so explicitly
    return chosen


def open_session(
    path: Path, providers: Sequence[str], threads: int
) -> tuple[ort.InferenceSession, str]:
    """Open ``path`` and return the session with the provider it really runs on."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # batches are the unit of parallelism; one graph run uses the intra-op pool only
    options.inter_op_num_threads = 1
    # ORT's pool threads spin-wait between runs by default; on a machine shared with the
    # consume loop and the store that burns the cores the next batch needs (measured here:
    # 124 vs 215 sentences/s next to a busy process, no loss on an idle machine)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads > 0:
        options.intra_op_num_threads = threads
    options.log_severity_level = _LOG_ERRORS_ONLY
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # ORT raises its own pybind exception types, not exported
        raise ModelLoadError(f"cannot open ONNX model {path}: {exc}") from exc
    return session, session.get_providers()[0]


def _canonical(raw: str) -> str:
    wanted = raw.strip().lower()
    for name in ort.get_all_providers():
        lowered = name.lower()
        if wanted in (lowered, lowered.removesuffix("executionprovider")):
            return name
    raise ProviderError(
        f"unknown execution provider {raw!r}; known: {', '.join(ort.get_all_providers())}"
    )


def _unusable_reason(provider: str) -> str | None:
    """Why ``provider`` cannot run on this machine, or None when it can (cheap, silent)."""
    if provider not in _GPU_ORDER:
        return None  # CPU and the providers we do not probe are taken at their word
    if not sys.platform.startswith("linux"):
        return "GPU detection is implemented for Linux only"
    missing = _first_unloadable(["libcuda.so.1"])
    if missing:
        return f"the CUDA driver library does not load ({missing})"
    libs = _runtime_libraries(provider)
    if _first_unloadable(libs):
        # CUDA from pip wheels (onnxruntime-gpu[cuda,cudnn]) is found only after this;
        # it prints on failure, which the probe must not
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            ort.preload_dlls()
    missing = _first_unloadable(libs)
    if missing:
        return f"a library {provider} needs does not load ({missing})"
    if not _has_cuda_device():
        return "no CUDA device is visible"
    return None


def _runtime_libraries(provider: str) -> list[str]:
    # the sonames the provider libraries link against (readelf -d on onnxruntime-gpu 1.31)
    major = _cuda_major()
    cuda = [f"libcudart.so.{major}", f"libcublas.so.{major}", f"libcublasLt.so.{major}"]
    if provider == TENSORRT:
        return [*cuda, "libcudnn.so.9", "libnvinfer.so.10", "libnvonnxparser.so.10"]
    return cuda


def _cuda_major() -> str:
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return "12"
    version = getattr(info, "cuda_version", None) or "12"
    return str(version).split(".")[0]


def _first_unloadable(names: Sequence[str]) -> str | None:
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            return name
    return None


def _has_cuda_device() -> bool:
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _DEVICE_COUNT_SCRIPT],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("CUDA device probe failed: %s", exc)
        return False
    return probe.returncode == 0
