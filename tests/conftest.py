"""One persistent XLA compilation cache for the whole test run.

Many tests compile the same programs: the RL loop's prefill, decode, log-probs and train step of the tiny preset,
traced anew in each test's jitted closures and in the subprocesses that restart runs. With the cache each distinct
program is compiled once per run and loaded from disk after (the key is the program, the compile options, the devices
and the jax version). It lives in a temporary directory of this run, so every run starts empty, as a clean CI machine
does; subprocesses find it through the environment. A JAX_COMPILATION_CACHE_DIR set by the caller is used and kept.
"""

import os
import shutil
import tempfile

import jax

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="noisygrpo-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny programs compile in < 1 s each
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
