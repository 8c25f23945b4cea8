"""Build one variant of the Quest kernels into the kernel-hub layout, without Nix.

Compiles ``torch-ext/torch_binding.cpp`` and ``quest/*.cu`` with ``torch.utils.cpp_extension`` for the installed
torch and CUDA, and writes ``build/torch<XY>-<abi>-cu<ABC>-<cpu>-linux/`` holding the shared library, the Python
package (``__init__.py``, ``_ops.py``) and ``metadata.json``: the layout that ``kernels.get_local_kernel`` and, once
uploaded, ``kernels.get_kernel`` load.

    python cuda/build_variant.py                 # archs of the visible GPU (or 8.0 and 9.0 without one)
    python cuda/build_variant.py --archs "9.0"   # explicit TORCH_CUDA_ARCH_LIST
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "torch-ext" / "quest_kernels"
KERNEL_NAME = "quest-kernels"
KERNEL_VERSION = 1


def variant_name() -> str:
    """Name of the variant for the installed torch, e.g. ``torch211-cxx11-cu130-x86_64-linux``."""
    import torch

    if torch.version.cuda is None:
        raise SystemExit("This torch has no CUDA support; the Quest kernels need a CUDA build of torch.")
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    abi = "cxx11" if torch.compiled_with_cxx11_abi() else "cxx98"
    cuda = "".join(torch.version.cuda.split(".")[:2])
    return f"torch{major}{minor}-{abi}-cu{cuda}-{platform.machine()}-{platform.system().lower()}"


def sources() -> list[Path]:
    return [HERE / "torch-ext" / "torch_binding.cpp", *sorted((HERE / "quest").glob("*.cu"))]


def source_digest() -> str:
    """Digest of everything compiled or shipped: it names the op namespace, unique per build."""
    digest = hashlib.sha256()
    files = sorted((HERE / "quest").iterdir()) + sorted((HERE / "torch-ext").glob("*.*"))
    files += sorted(PACKAGE.glob("*.py"))
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def default_archs() -> str:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "8.0;9.0"


def build(archs: str, out_dir: Path, verbose: bool) -> Path:
    import torch.utils.cpp_extension as cpp

    name = f"_quest_kernels_{source_digest()}"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    variant_dir = out_dir / variant_name()
    with tempfile.TemporaryDirectory(prefix="quest-build-") as tmp:
        cpp.load(
            name=name,
            sources=[str(p) for p in sources()],
            extra_include_paths=[str(HERE / "quest"), str(HERE / "torch-ext")],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--resource-usage"],
            build_directory=tmp,
            is_python_module=False,
            verbose=verbose,
        )
        if variant_dir.exists():
            shutil.rmtree(variant_dir)
        variant_dir.mkdir(parents=True)
        shutil.copy2(Path(tmp) / f"{name}.so", variant_dir / f"{name}.so")
    shutil.copy2(PACKAGE / "__init__.py", variant_dir / "__init__.py")
    (variant_dir / "_ops.py").write_text(
        "import torch\n\n"
        f"from . import {name}  # noqa: F401  (importing the library registers its ops)\n\n"
        f"ops = torch.ops.{name}\n\n\n"
        "def add_op_namespace_prefix(op_name: str) -> str:\n"
        '    """The op\'s qualified name, e.g. for torch.library.register_fake."""\n'
        f'    return f"{name}::{{op_name}}"\n'
    )
    metadata = {
        "id": name,
        "name": KERNEL_NAME,
        "version": KERNEL_VERSION,
        "license": "Apache-2.0",
        "python-depends": [],
        "backend": {"type": "cuda", "archs": [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]},
    }
    (variant_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return variant_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=None, help="CUDA capabilities, ';'-separated (TORCH_CUDA_ARCH_LIST)")
    parser.add_argument("--out", type=Path, default=HERE / "build", help="output folder (default: cuda/build)")
    parser.add_argument("--verbose", action="store_true", help="show compiler commands and register usage")
    args = parser.parse_args(argv)
    variant_dir = build(args.archs or default_archs(), args.out, args.verbose)
    print(f"built {variant_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
