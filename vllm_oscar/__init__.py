"""vllm-oscar: the OSCAR INT2 KV cache (arXiv 2605.17757) as a vLLM plugin.

Importing this package is cheap and never imports vLLM; :func:`register` (the
``vllm.general_plugins`` entry point) does the vLLM wiring lazily and idempotently.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """vLLM general-plugin entry point. Safe to call any number of times, in any process.

    The vLLM wiring (the ``oscar_int2`` cache dtype, the attention backend) is applied by
    :mod:`vllm_oscar.vllm_patches` once it exists; until then registration only marks the plugin as
    loaded, so that vLLM processes start with the plugin present and unchanged behaviour.
    """
    global _registered
    if _registered:
        return
    try:
        from vllm_oscar import vllm_patches  # noqa: PLC0415  (lazy: keeps `import vllm_oscar` light)
    except ImportError as exc:
        if exc.name != "vllm_oscar.vllm_patches":
            raise
    else:
        vllm_patches.apply()
    _registered = True
