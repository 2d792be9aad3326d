"""Sample platform files and tool outputs of real Jetsons, for the jetson tests.

Device-tree strings follow the upstream and JetPack DTBs (tegra234-p3737-0000+p3701-0005, tegra234-p3768-0000+
p3767-0005-super, tegra264-p4071-0000+p3834-0008); nv_tegra_release lines and tegrastats lines are as boards print
them (quoted in public bring-up notes and parser tests, dates and GCIDs included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Board:
    compatible: bytes
    model: bytes
    release: str


_TAIL = ("# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
         "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n")


def release(major: str, revision: str, gcid: str, date: str) -> str:
    """An /etc/nv_tegra_release as JetPack 6/7 write it."""
    return (f"# R{major} (release), REVISION: {revision}, GCID: {gcid}, BOARD: generic, EABI: aarch64, DATE: {date}\n"
            + _TAIL)


AGX_ORIN_64GB = Board(
    b"nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0",
    b"NVIDIA Jetson AGX Orin Developer Kit\0",
    release("36", "4.3", "38968081", "Wed Jan  8 01:49:37 UTC 2025"))
ORIN_NANO_SUPER = Board(
    b"nvidia,p3768-0000+p3767-0005-super\0nvidia,p3767-0005\0nvidia,tegra234\0",
    b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\0",
    release("36", "4.7", "42132812", "Thu Sep 18 22:54:44 UTC 2025"))
ORIN_NX_16GB = Board(
    b"nvidia,p3768-0000+p3767-0000\0nvidia,p3767-0000\0nvidia,tegra234\0",
    b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\0",
    release("36", "4.4", "41062509", "Mon Jun 16 16:07:13 UTC 2025"))
AGX_THOR = Board(
    b"nvidia,p4071-0000+p3834-0008\0nvidia,p3834-0008\0nvidia,tegra264\0",
    b"NVIDIA Jetson AGX Thor Developer Kit\0",
    release("38", "2.1", "41844464", "Fri Aug 22 00:56:01 UTC 2025"))
AGX_XAVIER = Board(b"nvidia,p2972-0000\0nvidia,tegra194\0", b"Jetson-AGX\0",
                   "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 "
                   "19:57:35 UTC 2023\n")
RASPBERRY_PI = b"raspberrypi,5-model-b\0brcm,bcm2712\0"

# dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\t${Version}\n' nvidia-jetpack libnvinfer10 nvidia-l4t-core
DPKG_ORIN_JP62 = ("nvidia-jetpack\tii \t6.2+b77\nlibnvinfer10\tii \t10.3.0.30-1+cuda12.5\n"
                  "nvidia-l4t-core\tii \t36.4.3-20250107174145\n")
CUDA_VERSION_JSON = '{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}, "cuda_cudart": {"version": "12.6.68"}}'


def write_root(root: Path, board: Board | None, *, cuda_json: str | None = None) -> Path:
    """A fake filesystem root holding ``board``'s files (nothing for an x86 machine: ``board=None``)."""
    root.mkdir(parents=True, exist_ok=True)
    if board is not None:
        (root / "proc/device-tree").mkdir(parents=True)
        (root / "proc/device-tree/compatible").write_bytes(board.compatible)
        (root / "proc/device-tree/model").write_bytes(board.model)
        (root / "etc").mkdir()
        (root / "etc/nv_tegra_release").write_text(board.release)
    if cuda_json is not None:
        (root / "usr/local/cuda").mkdir(parents=True)
        (root / "usr/local/cuda/version.json").write_text(cuda_json)
    return root


# tegrastats lines.
TEGRA_AGX_ORIN_JP6 = (
    "05-09-2026 18:42:06 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) CPU [14%@2188,5%@2112,8%@2035,"
    "14%@2201,46%@1267,47%@1267,2%@1267,10%@1267,4%@1036,5%@1036,6%@1036,10%@1036] EMC_FREQ 3%@2133 GR3D_FREQ 0%@[0,0] "
    "NVENC 79%@166 NVDEC off NVJPG off NVJPG1 off VIC 36%@115 OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 "
    "cpu@52.562C soc2@48.437C soc0@49.093C tj@52.562C soc1@49.656C VDD_GPU_SOC 2412mW/2412mW VDD_CPU_CV 1607mW/1607mW "
    "VIN_SYS_5V0 4707mW/4707mW")
TEGRA_AGX_ORIN_DLA = (
    "11-21-2025 08:49:48 RAM 13983/62780MB (lfb 424x4MB) SWAP 126/31390MB (cached 0MB) CPU [90%@2201,100%@2201,"
    "100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201] EMC_FREQ "
    "1%@2133 GR3D_FREQ 14%@[407,407] VIC_FREQ 115 NVDLA0_FREQ @1600 APE 174 CV0@73.625C CPU@77.281C Tboard@62C "
    "SOC2@70C Tdiode@62.25C SOC0@69.531C CV1@72.5C GPU@69.125C tj@77.281C SOC1@68.968C CV2@67.25C VDD_GPU_SOC "
    "3150mW/2971mW VDD_CPU_CV 14312mW/12415mW VIN_SYS_5V0 4968mW/5048mW VDDQ_VDD2_1V8AO 1091mW/1091mW")
TEGRA_AGX_ORIN_IDLE = (
    "04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) CPU [0%@729,0%@729,0%@729,"
    "0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] VIC_FREQ 729 "
    "APE 174 CV0@-256C CPU@44.562C Tboard@32C SOC2@40.093C Tdiode@33C SOC0@41.093C CV1@-256C GPU@-256C tj@44.343C "
    "SOC1@41.25C CV2@-256C VDD_GPU_SOC 2340mW/2340mW VDD_CPU_CV 390mW/390mW VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW "
    "VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW")
TEGRA_AGX_ORIN_MAXAVG = (
    "10-01-2026 11:05:58 RAM 8207/62878MB (lfb 80x4MB) SWAP 85/6144MB (cached 0MB) CPU [9%@729,8%@729,9%@729,7%@729,"
    "3%@1190,19%@1190,3%@1190,57%@1190,6%@729,5%@729,1%@729,1%@729] GR3D_FREQ 0% cpu@47.906C/48.343C "
    "soc2@45.375C/45.406C soc0@45.5C/45.593C tj@47.906C/48.343C soc1@47.093C/47.25C VDD_GPU_SOC 3034mW/3049mW/3412mW "
    "VDD_CPU_CV 1137mW/1296mW/2273mW VIN_SYS_5V0 4939mW/4924mW/5040mW")
TEGRA_ORIN_NANO = (
    "09-17-2026 02:10:16 RAM 1483/7620MB (lfb 105x4MB) SWAP 253/12002MB (cached 2MB) CPU [0%@729,0%@729,0%@729,0%@729,"
    "0%@729,0%@729] GR3D_FREQ 62%@612 cpu@47.75C soc2@46.718C soc0@47.25C gpu@50C tj@50C soc1@48.093C "
    "VDD_IN 4541mW/4541mW VDD_CPU_GPU_CV 521mW/521mW VDD_SOC 1446mW/1473mW")
TEGRA_ORIN_NX = (
    "08-21-2026 18:23:23 RAM 6567/15656MB (lfb 54x4MB) SWAP 3109/7828MB (cached 5MB) CPU [31%@1984,54%@1984,50%@1984,"
    "64%@1984,54%@1984,55%@1984,55%@1984,100%@1984] GR3D_FREQ 7% cv0@57.281C cpu@58.937C soc2@54.687C soc0@55.125C "
    "cv1@55.437C gpu@54.375C tj@58.937C soc1@56.375C cv2@54.656C VDD_IN 12673mW/8213mW VDD_CPU_GPU_CV 7050mW/3122mW "
    "VDD_SOC 2121mW/1931mW")
TEGRA_ORIN_OFFLINE_CORES = (
    "09-27-2026 23:15:28 RAM 980/7620MB (lfb 77x4MB) SWAP 33/3810MB (cached 0MB) CPU [off,off] GR3D_FREQ 0% "
    "cpu@49.468C VDD_IN 12000mW/7598mW VDD_CPU_GPU_CV 481mW/481mW VDD_SOC 2608mW/2608mW")
TEGRA_THOR_JP71 = (
    "04-21-2026 15:50:52 RAM 105265/125772MB (lfb 34x4MB) CPU [0%@972,0%@972,0%@972,0%@972,0%@972,0%@972,1%@972,0%@972,"
    "0%@972,0%@972,0%@972,8%@972,0%@972,0%@972] EMC_FREQ 0%@2750 GR3D_FREQ @[314,314,314] NVENC0_FREQ @314 "
    "NVENC1_FREQ @314 NVDEC0_FREQ @314 NVDEC1_FREQ @314 NVJPG0_FREQ @314 VIC off OFA_FREQ @315 PVA0_FREQ off APE 300 "
    "cpu@37.343C tj@38.875C soc012@37.468C gpu@38.875C soc345@37.406C VDD_GPU 1962mW/1962mW VDD_CPU_SOC_MSS "
    "5887mW/5887mW VIN_SYS_5V0 5635mW/5635mW VIN 19780mW/19780mW")
TEGRA_THOR_JP72 = (
    "07-02-2026 13:45:44 RAM 36529/125749MB (lfb 12x4MB) SWAP 11/4096MB (cached 9MB) CPU [2%@972,1%@972,0%@972,0%@972,"
    "0%@972,0%@972,0%@972,0%@972,0%@972,0%@972,0%@972,0%@972,0%@972,2%@972] cpu@60.406C tj@63.281C soc012@58.468C "
    "gpu@62.906C soc345@63.281C VDD_GPU 37528mW/37528mW/37528mW VDD_CPU_SOC_MSS 18961mW/18961mW/18961mW "
    "VIN_SYS_5V0 18331mW/18331mW/18331mW VIN 87426mW/43713mW/87426mW")
TEGRA_THOR_IDLE_NEGATIVE = (
    "05-14-2026 21:36:35 RAM 26063/125772MB (lfb 35x4MB) CPU [2%@972,0%@972] VDD_GPU -392mW/-392mW "
    "VDD_CPU_SOC_MSS 3924mW/3835mW VIN_SYS_5V0 5064mW/5055mW VIN 15004mW/15096mW")

# nvpmodel -q outputs.
NVPMODEL_AGX_ORIN = "NV Power Mode: MAXN\n0\n"
NVPMODEL_WARN = "NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN\n0\n"
NVPMODEL_ORIN_NANO_SUPER = "NV Power Mode: MAXN_SUPER\n2\n"
NVPMODEL_THOR = "NV Power Mode: 120W\n1\n"
NVPMODEL_REBOOT = ("NVPM WARN: Golden image context is already created\nNVPM WARN: Reboot required for changing to "
                   "this power mode: 0\nNVPM WARN: DO YOU WANT TO REBOOT NOW? enter YES/yes to confirm:\n"
                   "NVPM ERROR: optMask is 1, no request for power mode\n")
NVPMODEL_CONF_AGX_ORIN = ("< POWER_MODEL ID=0 NAME=MAXN >\nCPU_ONLINE CORE_0 1\n< POWER_MODEL ID=1 NAME=MODE_15W >\n"
                          "< POWER_MODEL ID=2 NAME=MODE_30W >\n< POWER_MODEL ID=3 NAME=MODE_50W >\n")
NVPMODEL_CONF_ORIN_NANO_SUPER = ("< POWER_MODEL ID=0 NAME=15W >\n< POWER_MODEL ID=1 NAME=25W >\n"
                                 "< POWER_MODEL ID=2 NAME=MAXN_SUPER >\n")
