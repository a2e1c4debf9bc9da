"""Which dtype policy Keras trains in on this machine (`train.precision`).

`auto` is mixed_float16 on a GPU and, on a CPU whose flags list bfloat16 instructions,
mixed_bfloat16 only where a bfloat16 convolution step measures clearly faster than a
float32 one in this process; float32 elsewhere.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def configure_device(precision: str = "auto") -> str:
    """Set Keras's dtype policy for `precision` (`train.precision`) and return it; `auto`
    is `auto_policy()`."""
    import keras

    policy = auto_policy() if precision == "auto" else precision
    if keras.mixed_precision.global_policy().name != policy:
        keras.mixed_precision.set_global_policy(policy)
    return policy


@functools.cache
def auto_policy() -> str:
    """mixed_float16 on a GPU; on a CPU with bfloat16 instructions (AMX or AVX-512 BF16),
    mixed_bfloat16 where this process measures a bfloat16 convolution step clearly faster
    than a float32 one; float32 elsewhere. The flags alone do not tell: the base model's epoch
    took 0.55x the float32 time in bfloat16 on an AMD EPYC with AVX-512 BF16, and 1.6x on
    an Intel Xeon with the same flag and no AMX (`bench/README.md`)."""
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    return choose_policy(gpu, cpu_flags(), bfloat16_speedup)


# /proc/cpuinfo flags of CPUs whose oneDNN kernels may compute in bfloat16: Intel's AMX
# units (Xeon 4th generation on) and AVX-512 BF16 (Intel Cooper Lake on, AMD Zen 4 on).
BFLOAT16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# bfloat16 must beat float32 by this much on the convolution step: training speedups
# measured are about 2x or 0.6x, and a margin keeps a noisy measurement from flipping
# the choice between runs
BFLOAT16_MIN_SPEEDUP = 1.25


def choose_policy(gpu: bool, flags: set[str], speedup: Callable[[], float]) -> str:
    """`auto`'s rule; `speedup()` (float32 time / bfloat16 time) runs only when it matters."""
    if gpu:
        return "mixed_float16"
    if flags & BFLOAT16_FLAGS and speedup() >= BFLOAT16_MIN_SPEEDUP:
        return "mixed_bfloat16"
    return "float32"


def bfloat16_speedup(repeats: int = 5) -> float:
    """float32 seconds / bfloat16 seconds for one training step of a 3x3 convolution (a
    batch of 128 28x28x32 maps to 64 filters, forward and both gradients), best of
    `repeats` each, the two dtypes measured in turn twice (about a second on a 2-core
    CPU). A convolution, not a matmul: that is what the models spend their time in, and
    a 1024 or 2048 square matmul swung from 0.3x to 2.5x between runs on one AMD EPYC
    where this step measures 1.9x (`bench/README.md`)."""
    import tensorflow as tf

    def step_seconds(dtype) -> float:
        x = tf.cast(tf.random.stateless_normal((128, 28, 28, 32), seed=(0, 0)), dtype)
        w = tf.cast(tf.random.stateless_normal((3, 3, 32, 64), seed=(0, 1)), dtype)

        def step():
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                loss = tf.reduce_sum(tf.nn.conv2d(x, w, 1, "SAME"))
            for gradient in tape.gradient(loss, [x, w]):
                gradient.numpy()

        step()  # warm-up: oneDNN picks and caches its kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return min(times)

    float32, bfloat16 = [], []
    for _ in range(2):
        float32.append(step_seconds(tf.float32))
        bfloat16.append(step_seconds(tf.bfloat16))
    speedup = min(float32) / min(bfloat16)
    log.info("bfloat16 convolution step %.2fx as fast as float32", speedup)
    return speedup


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()
