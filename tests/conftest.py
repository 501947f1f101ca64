"""Test setup: simulate 8 CPU devices before JAX starts (DESIGN.md, principle 4)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_compiled_programs() -> None:
    """Persistent compilation cache for the suite: many tests build the same tiny model and train step again (each
    ``train()`` call, each kill-and-resume subprocess, each module after :func:`_release_compiled_programs`), and
    XLA:CPU compilation is most of their time. Identical programs are compiled once per test session and then read
    from disk (the resume test of a 3-run loop: ~2x faster). A fresh directory per session unless
    ``JAXTOK_TEST_COMPILE_CACHE`` names one to keep between runs; exported through the environment so subprocesses
    started by tests share it."""
    import atexit
    import shutil
    import tempfile

    cache = os.environ.get("JAXTOK_TEST_COMPILE_CACHE")
    if not cache:
        cache = tempfile.mkdtemp(prefix="jaxtok-test-xla-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_share_compiled_programs()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps each executable's code into its own memory
    regions; one process compiling the whole suite's ~thousands of programs reaches the kernel's
    ``vm.max_map_count`` (65530) and the next compile segfaults. Modules do not share compiled programs."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    """The real Qwen3 tokenizer directory (tests/real_tokenizers.py), built once per session (~4 s)."""
    import real_tokenizers

    return real_tokenizers.build_qwen3(tmp_path_factory.mktemp("qwen3_tokenizer"))


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
    """The real Llama-3 Instruct tokenizer directory, built once per session (~4 s)."""
    import real_tokenizers

    return real_tokenizers.build_llama3(tmp_path_factory.mktemp("llama3_tokenizer"))

