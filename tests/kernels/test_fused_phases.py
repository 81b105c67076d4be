"""The arithmetic of bench/fused_phases.py (its kernel timers run on GPUs only)."""

import torch

from bench.fused_phases import phase_cycles, phase_names, residency


def stamps_of(programs):
    """int64 stamps in fused_mlp's layout from (sm, start, end, [per-block stamp lists])."""
    rows = [[sm, start, end, *(t for block in blocks for t in block)] for sm, start, end, blocks
            in programs]  # fmt: skip
    return torch.tensor(rows, dtype=torch.int64)


def test_phase_cycles_are_medians_of_stamp_differences():
    # L = 1: stamps per block = 2L + 4 = 6, phases = 5
    a = [[0, 10, 30, 30, 40, 41], [100, 120, 130, 130, 150, 151]]
    b = [[0, 30, 60, 60, 70, 71], [0, 10, 30, 30, 35, 36]]
    stamps = stamps_of([(0, 0, 1, a), (1, 0, 1, b)])
    assert len(phase_names(1)) == 5
    # per phase, the four blocks' durations: [10, 20, 30, 10], [20, 10, 30, 20], [0] * 4,
    # [10, 20, 10, 5], [1] * 4; torch's median of an even count is the lower middle value
    assert phase_cycles(stamps, 1, 2) == [10.0, 20.0, 0.0, 10.0, 1.0]


def test_residency_counts_programs_overlapping_on_one_sm():
    block = [[0] * 6]
    stamps = stamps_of([(0, 0, 100, block), (0, 50, 150, block), (1, 0, 100, block)])
    most, mean = residency(stamps)
    assert most == 2
    assert abs(mean - 300 / 250) < 1e-12  # SM 0: 1, 2, 1 over 50 ns each; SM 1: 1


def test_back_to_back_programs_do_not_overlap():
    block = [[0] * 6]
    stamps = stamps_of([(3, 0, 100, block), (3, 100, 200, block)])
    assert residency(stamps) == (1, 1.0)
