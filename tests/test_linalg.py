"""Directional ablation arithmetic: writers lose their r-component, readers stop responding to r, on any axis."""

import torch

from checks.linalg import along, project_out, project_out_norm_preserving, unit


def test_writer_and_reader_and_fused_axes():
    torch.manual_seed(0)
    r = torch.randn(16)
    w = torch.randn(16, 8)  # writer: residual on axis 0
    assert along(project_out(w, r, 0), r, 0).abs().max() < 1e-5
    rd = torch.randn(8, 16)  # reader: residual on axis 1
    assert (project_out(rd, r, 1) @ unit(r)).abs().max() < 1e-5
    fused = torch.randn(4, 8, 16)  # gpt-oss down [E, I, H]
    out = project_out(fused, r, 2)
    for e in range(4):  # same as editing each expert's 2-D matrix
        assert torch.allclose(out[e], project_out(fused[e], r, 1), atol=1e-6)
    assert along(out, r, 2).abs().max() < 1e-5


def test_scale_two_reflects_and_norm_preserving_keeps_norms():
    torch.manual_seed(1)
    r, w = torch.randn(16), torch.randn(16, 8)
    assert torch.allclose(along(project_out(w, r, 0, 2.0), r, 0), -along(w, r, 0), atol=1e-5)
    out = project_out_norm_preserving(w, r, 0)
    assert torch.allclose(out.norm(dim=0), w.norm(dim=0), atol=1e-5)
    assert along(out, r, 0).abs().max() < 1e-5
