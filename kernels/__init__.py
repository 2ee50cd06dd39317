"""Triton kernels of odmt-components, installed as ``odmt_components.kernels``.

This folder stands alone: it imports torch and triton, never ``odmt_components``.
- ``reference``: plain-PyTorch definitions of what the kernels compute (no triton needed).
- ``attention``: ID-masked fused attention, forward and backward (custom op
  ``odmt::id_masked_attention``).
- ``inbatch_loss``: debiased in-batch softmax cross-entropy with false-negative exclusion and
  the fused three-branch mutual distillation (custom ops ``odmt::debiased_inbatch_ce`` and
  ``odmt::mutual_distillation``).

The Triton modules are imported on demand (``from odmt_components.kernels import attention``)
so that the reference path works where triton is not installed.
"""

if __name__ == "kernels":
    # Imported as a top-level module: the repository root is on sys.path (e.g. `python -m
    # pytest` run there) and transformers probes for the Hugging Face `kernels` package by
    # that name. Stay an empty module without __version__, which transformers reads as "not
    # installed", instead of loading a second copy of this package under the wrong name.
    __all__: list[str] = []
else:
    from .reference import (
        BRANCHES,
        DistillationLosses,
        debiased_inbatch_cross_entropy_reference,
        id_masked_attention_allowed,
        id_masked_attention_reference,
        inbatch_exclusion_mask,
        mutual_distillation_reference,
    )

    __all__ = [
        "BRANCHES",
        "DistillationLosses",
        "debiased_inbatch_cross_entropy_reference",
        "id_masked_attention_allowed",
        "id_masked_attention_reference",
        "inbatch_exclusion_mask",
        "mutual_distillation_reference",
    ]
