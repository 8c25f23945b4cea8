# Replaced by the build (cuda/build_variant.py, or kernel-builder) with the build's own op namespace.
import torch

from . import _quest_kernels_dev  # noqa: F401  (importing the library registers its ops)

ops = torch.ops._quest_kernels_dev


def add_op_namespace_prefix(op_name: str) -> str:
    """The op's qualified name, e.g. for torch.library.register_fake."""
    return f"_quest_kernels_dev::{op_name}"
