"""Copy-paste fixes for what a workstation lacks, for Arch/CachyOS (pacman) and Debian/Ubuntu
(apt). `orchctl doctor` prints them under each failed check; the provisioner puts them in the
EnvironmentMissing it raises when a build tool is missing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fix:
    arch: str  # Arch Linux, CachyOS, Manjaro, EndeavourOS
    debian: str  # Debian, Ubuntu, Pop!_OS, Mint
    note: str = ""

    def text(self) -> str:
        lines = [f"  Arch / CachyOS:   {self.arch}", f"  Debian / Ubuntu:  {self.debian}"]
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


DRIVER = Fix(
    "sudo pacman -S nvidia-open nvidia-utils && sudo reboot   (GTX 10xx and older: nvidia)",
    "sudo ubuntu-drivers install && sudo reboot   (Debian: sudo apt install nvidia-driver)",
    "check with: nvidia-smi   (it lists every GPU)",
)
DRIVER_UPDATE = Fix(
    "sudo pacman -Syu nvidia-utils && sudo reboot",
    "sudo ubuntu-drivers install && sudo reboot   (or a newer nvidia-driver-NNN package)",
    "or install the CUDA toolkit release the driver supports (nvidia-smi shows it)",
)
NVML_PYTHON = Fix(
    "pip install nvidia-ml-py   (in the environment orchctl runs in)",
    "pip install nvidia-ml-py   (in the environment orchctl runs in)",
)
CMAKE = Fix("sudo pacman -S cmake", "sudo apt install cmake")
COMPILER = Fix("sudo pacman -S base-devel", "sudo apt install build-essential")
NINJA = Fix(
    "sudo pacman -S ninja",
    "sudo apt install ninja-build",
    "optional: builds are faster with it",
)
GIT = Fix("sudo pacman -S git", "sudo apt install git")
NVCC = Fix(
    "sudo pacman -S cuda && source /etc/profile.d/cuda.sh   (nvcc is in /opt/cuda/bin)",
    "sudo apt install nvidia-cuda-toolkit",
    "Ubuntu's toolkit can lag the driver: NVIDIA's cuda-toolkit-12-8 (or newer) apt "
    "repository is at https://developer.nvidia.com/cuda-downloads",
)
OLD_GPU_TOOLKIT = Fix(
    "sudo pacman -U an older cuda package (12.x) from the Arch archive, or the cuda12.9 AUR "
    "package",
    "sudo apt install cuda-toolkit-12-9   (from NVIDIA's repository)",
    "CUDA 13 builds for compute capability 7.5 (RTX 20xx) and newer only",
)
DISK = Fix(
    "sudo pacman -Scc   (clears the package cache), or free space under ~/.cache",
    "sudo apt clean   (clears the package cache), or free space under ~/.cache",
)
