"""transformers next to this project's `kernels` package.

transformers 5 depends on Hugging Face's hub package `kernels`, whose import name is the name
of this project's attention package. With the project first on the path, transformers finds a
`kernels` installed (the hub package's metadata), imports its names from ours, and no model
can be imported ("cannot import name 'CUDAProperties' from 'kernels'"). Every use of
transformers here calls `import_transformers()` first: when the importable `kernels` is ours,
it tells transformers that hub kernels are unavailable (the import-time check) and switched off
(USE_HUB_KERNELS, read by from_pretrained, which otherwise asks for them): an optional speed-up
that transformers does without.
"""
from __future__ import annotations

import os


def _unavailable(*args, **kwargs) -> bool:
    return False


def import_transformers():
    """The transformers module, with hub kernels switched off where `kernels` is this project's.
    Must run before transformers imports its models (they bind the check when imported)."""
    import transformers
    from transformers import utils
    from transformers.utils import import_utils

    import kernels

    if hasattr(kernels, "group_attention"):  # ours, not the hub package
        utils.is_kernels_available = import_utils.is_kernels_available = _unavailable
        os.environ["USE_HUB_KERNELS"] = "NO"
    return transformers
