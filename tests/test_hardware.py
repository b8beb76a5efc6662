"""What the machine offers: bf16 only where it is fast, and each process's share of the CPU threads."""

import torch
from accelerate import Accelerator

from attrclf.hardware import configure_threads, resolve_mixed_precision

from .conftest import tiny_config


def test_mixed_precision_auto_uses_bf16_only_where_it_is_fast(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    capabilities = {"avx2": True, "avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert resolve_mixed_precision("auto") == "no"
    capabilities["amx_bf16"] = True
    assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("no") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_mixed_precision("auto") is None  # `accelerate launch --mixed_precision fp16` decides


def test_each_process_gets_its_share_of_the_cores_or_the_flag(tmp_path, tiny_data, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr("os.cpu_count", lambda: 8)
        accelerator = Accelerator(cpu=True)
        assert configure_threads(tiny_config(tiny_data, tmp_path), accelerator) == 8 // accelerator.num_processes
        assert configure_threads(tiny_config(tiny_data, tmp_path, cpu_threads=1), accelerator) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_an_explicit_thread_count_holds_beside_a_gpu_too(tmp_path, tiny_data):
    # on the GPU box several trainings each kept every core when --cpu-threads was ignored there
    class OnGpu:
        device = torch.device("cuda")
        num_processes = 1

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert configure_threads(tiny_config(tiny_data, tmp_path), OnGpu()) == 3  # torch's own, untouched
        assert configure_threads(tiny_config(tiny_data, tmp_path, cpu_threads=2), OnGpu()) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
