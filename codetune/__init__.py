"""codetune: QLoRA fine-tuning of a code LLM on your own repository, on one small GPU.

Importing the package checks that the installed torch is recent enough, from its package metadata
alone: torch itself is not imported here (`inspect` and `compare` start without it). The floor is
2.6: the training step calls `torch.nn.utils.get_total_norm` and `clip_grads_with_norm_` (new in
2.6), and transformers 5.24 disables itself below 2.6. setup.cfg states the same floor.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

TORCH_FLOOR = (2, 6)
TORCH_INSTALL = ("pip install 'torch>=2.6' --index-url https://download.pytorch.org/whl/cu126 "
                 "(cu128 for RTX 50-series cards; .../whl/cpu without a GPU)")


class TorchVersionError(ImportError):
    """The installed torch is older than codetune needs, or missing."""


def check_torch_version(version: str | None) -> None:
    """Raise TorchVersionError unless `version` (torch's, None when not installed) is at least TORCH_FLOOR.

    Only major.minor count, so a pre-release of the floor (NVIDIA's containers ship e.g. 2.6.0a0+...) passes;
    a version string without them is not judged here.
    """
    floor = ".".join(map(str, TORCH_FLOOR))
    if version is None:
        raise TorchVersionError(f"codetune needs torch >= {floor} (not installed); install the CUDA build: "
                                f"{TORCH_INSTALL}")
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and (int(found[1]), int(found[2])) < TORCH_FLOOR:
        raise TorchVersionError(f"codetune needs torch >= {floor} (found {version}); install the CUDA build: "
                                f"{TORCH_INSTALL}")


def _installed_torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        # Importable without metadata (a source build on the path): its version cannot be read cheaply.
        return "unknown" if importlib.util.find_spec("torch") is not None else None


check_torch_version(_installed_torch_version())
