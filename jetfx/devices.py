"""Which device a computation can run on, checked before a model is loaded onto it.

torch's own messages ("Torch not compiled with CUDA enabled", "Expected one of cpu, cuda, ipu, …")
say what failed but not what to do; `check_device` says both.
"""

from __future__ import annotations

import torch

from .errors import InputError

CUDA_INSTALL = ("install a CUDA build of torch, e.g. pip install torch --index-url "
                "https://download.pytorch.org/whl/cu126 (pick the index for your CUDA driver at "
                "https://pytorch.org/get-started/locally/), or run on a machine with a GPU")


def check_device(device) -> torch.device:
    """`device` (a string such as 'cpu', 'cuda', 'cuda:1', 'mps', or a torch.device) as a
    torch.device this torch can use; an `InputError` that says what to do otherwise."""
    if isinstance(device, torch.device):
        d = device
    else:
        if not isinstance(device, str) or not device.strip():
            raise InputError(f"a device is needed, such as 'cpu', 'cuda' or 'cuda:1'; got {device!r}")
        try:
            d = torch.device(device.strip())
        except RuntimeError:
            raise InputError(f"unknown device {device!r}: use cpu, cuda, cuda:N (the N-th GPU) or mps") from None
    if d.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise InputError(f"device {str(d)!r}: this torch ({torch.__version__}) was built without CUDA; "
                             f"{CUDA_INSTALL}; or use the CPU (device 'cpu')")
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError(f"device {str(d)!r}: torch has CUDA but sees no GPU (check the driver with nvidia-smi "
                             "and CUDA_VISIBLE_DEVICES); or use the CPU (device 'cpu')")
        if d.index is not None and d.index >= count:
            raise InputError(f"device {str(d)!r}: there {'is' if count == 1 else 'are'} only {count} GPU"
                             f"{'' if count == 1 else 's'} (cuda:0 … cuda:{count - 1})")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("device 'mps' is not available (it needs Apple silicon and a torch built with MPS); "
                             "use the CPU (device 'cpu')")
    elif d.type != "cpu":
        raise InputError(f"device {str(d)!r} is not supported by jetfx: use cpu, cuda, cuda:N or mps")
    return d
